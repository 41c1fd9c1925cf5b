"""The running server: sessions (pure state), the worker supervisor, arenas, the client transport.

`loader_server.server` is the event loop that wires these together.
"""
