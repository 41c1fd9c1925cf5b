"""The running server: sessions (pure state), the worker supervisor, the worker process itself
(worker.py, which runs the pipeline), arenas, the client transport.

`loader_server.server` is the event loop that wires these together.
"""
