"""The contract both ends share: what may travel between a client, a server and its workers.

    errors.py     the exception hierarchy (and `from_wire`, which rebuilds one from an error message)
    protocol.py   the framing: a msgpack header, raw array frames, the protocol version
    schema.py     typed message fields, checked at the boundary
    messages.py   every client <-> server message, defined once
    shm.py        sealed shared-memory arenas (the same-host fast path) and their handle
    normalize.py  uint8 -> float32 arithmetic, applied by either end

It imports numpy and msgpack only: neither pyzmq nor the client nor the server, so
``import loader_client.contract.errors`` (the server does) loads nothing else of ours. The
import rule is checked by tests/test_imports.py.
"""
