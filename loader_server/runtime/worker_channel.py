"""The private channel between the server and its workers.

An ipc socket file inside a folder of mode 0700 that only the server's user can enter, so no
other local user can connect, whatever `--bind` says. Workers are also known by random routing
ids that only the server's forked children have: a message from any other id is ignored (and
logged at most once a minute). Messages are bounded in size (a batch plus its header) and the
receive queue is bounded. A janitor removes the folder if the server is SIGKILLed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import zmq

from loader_client.contract import protocol
from loader_client.contract.schema import Message, decode, encode

from .transport import start_janitor
from .worker_messages import FROM_WORKER

__all__ = ["WorkerChannel"]

log = logging.getLogger("loader_server")

_RECEIVE_QUEUE = 4096
_UNKNOWN_PEER_LOG_S = 60.0


class WorkerChannel:
    """The server's end: a ROUTER socket in a private folder."""

    def __init__(self, ctx: zmq.Context[Any], max_message_bytes: int) -> None:
        self.folder = tempfile.mkdtemp(prefix="loader-workers-")  # mode 0700
        self.endpoint = f"ipc://{self.folder}/w.sock"
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + protocol.MAX_HEADER_BYTES)
        self.sock.setsockopt(zmq.RCVHWM, _RECEIVE_QUEUE)
        self.sock.bind(self.endpoint)
        start_janitor(self.folder)
        self._unknown_logged = 0.0
        self.unknown_messages = 0

    def send(self, identity: bytes, message: Message) -> bool:
        """Send to a worker without blocking; False when it cannot take it (not connected)."""
        try:
            self.sock.send_multipart([identity, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def recv(self) -> tuple[bytes, list[zmq.Frame]] | None:
        """(identity, frames) of the next message, or None."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return frames[0].bytes, frames[1:]

    def decode(self, frames: list[zmq.Frame], worker_id: int) -> Message:
        header = protocol.unpack(frames[0])
        protocol.check_version(header, peer=f"worker {worker_id}")
        return decode(header, FROM_WORKER, f"from worker {worker_id}")

    def unknown_peer(self) -> None:
        """Count (and log at most once a minute) a message from a peer that is not our worker."""
        self.unknown_messages += 1
        now = time.monotonic()
        if now - self._unknown_logged >= _UNKNOWN_PEER_LOG_S:
            self._unknown_logged = now
            log.warning("ignored %d message(s) on the worker socket from a peer that is not one of our workers",
                        self.unknown_messages)

    def close(self) -> None:
        self.sock.close(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)
        if os.path.exists(self.folder):  # pragma: no cover
            log.warning("could not remove %s", self.folder)
