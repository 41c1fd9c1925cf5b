"""The server's end of `loader_client.local_server`'s lifeline: stop when the trainer is gone.

``serve --watch-stdin`` reads its standard input, a pipe whose only write end the trainer
holds, on a daemon thread. The trainer never writes; when it exits or is killed (SIGKILL
included), the kernel closes that end, the read returns end-of-file, and the server is sent
SIGTERM: the same clean stop as ``kill PID`` (goodbyes, workers stopped, socket removed), or,
before its signal handlers are installed (while it indexes its data set), the default end of
the process. Should the clean stop hang, the process exits `_EXIT_GRACE_S` later anyway; its
workers follow it through their parent-death signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

__all__ = ["stop_when_stdin_closes"]

log = logging.getLogger("loader_server")
#: Seconds the clean stop may take once the trainer is gone, before the process exits regardless.
_EXIT_GRACE_S = 60.0
_EXIT_CODE = 3


def _watch(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass  # nobody writes; anything written is ignored
    except OSError:
        pass  # a read error means the pipe is gone too
    log.warning("the process that started this server (its standard input) is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_EXIT_GRACE_S)
    log.error("the server did not stop within %g s of its starter's end: exiting", _EXIT_GRACE_S)
    os._exit(_EXIT_CODE)


def stop_when_stdin_closes() -> None:
    """Start the daemon thread that stops this process when its standard input reaches end-of-file."""
    threading.Thread(target=_watch, args=(0,), name="loader-lifeline", daemon=True).start()
