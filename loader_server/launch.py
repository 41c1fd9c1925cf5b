"""Start and stop ``loader-server serve`` as a child process: for the demo, the benchmark and the tests.

A training script starts its server with `loader_client.local_server` (the documented way);
`ServerProcess` is the same child process with what tests and benchmarks need besides: a
given or private endpoint, its output in a log file, `workers`, `session_processes`, and the
log quoted in its errors. Both wait for readiness with `loader_client.local.wait_ready` (ask
``health`` until it answers ok, failing at once if the process exits) and tie the server to
their own process the same way: ``serve --watch-stdin`` reads a pipe whose write end only this
process holds, so a caller that dies without calling `stop` (even by SIGKILL) leaves no server
behind. `stop` sends SIGTERM, waits, then SIGKILLs, and returns the exit code. The server runs
in a session of its own, so that a Ctrl-C meant for the caller does not reach it (the caller
stops it) and so that `session_processes` can find a worker left behind even after the server
itself is gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from loader_client.contract.errors import LoaderError
from loader_client.local import connect_address, stop_process, wait_ready

__all__ = ["ServerProcess", "ServerProcessError", "alive", "children_of", "connect_address"]

#: Seconds a server gets to drain and exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Lines of the server's log quoted in an error.
_LOG_TAIL_LINES = 60


class ServerProcessError(LoaderError):
    """The server process did not start, become ready, or stop as asked; the message quotes its log."""


class ServerProcess:
    """``loader-server serve --data DATA --bind ENDPOINT ARGS...`` as a child process.

    `endpoint` defaults to an ipc socket in a private (0700) temporary folder, `log` to a file
    there; that folder is removed by `stop` (the log text is kept for `log_text`).
    """

    def __init__(self, data: str | os.PathLike[str], *args: str, endpoint: str | None = None,
                 log: str | os.PathLike[str] | None = None, python: str = sys.executable) -> None:
        self._private: str | None = None
        if endpoint is None or log is None:
            self._private = tempfile.mkdtemp(prefix="loader-server-")
        self.endpoint = endpoint or f"ipc://{self._private}/server.sock"
        self.log = Path(log) if log is not None else Path(self._private or ".") / "server.log"
        self.args: list[str] = ["serve", "--data", os.fspath(data), "--bind", self.endpoint, *args]
        self.exit_code: int | None = None  # set by stop()
        self.terminated = False  # stop() sent SIGTERM to a running server
        self._log_cache: str | None = None
        self.started = time.perf_counter()
        with open(self.log, "wb") as f:  # stdin: the lifeline (see the module's docstring)
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [python, "-m", "loader_server", *self.args[:1], "--watch-stdin", *self.args[1:]],
                stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self) -> str:
        """The command line, as a user would type it."""
        return "loader-server " + " ".join(self.args)

    # ------------------------------------------------------------------ readiness
    def wait_ready(self, timeout_s: float = 60.0, **curve: Any) -> dict[str, Any]:
        """Ask ``health`` until the server answers ok (it has a ready worker); returns the answer.

        `curve`: `server_public_key` and `client_keys` for a server started with --curve-dir.
        Raises `ServerProcessError` with the server's log if it exits first or `timeout_s` passes.
        """
        try:
            return wait_ready(self.endpoint, timeout_s, self.proc.poll, **curve)
        except LoaderError as exc:
            raise self.failure(str(exc)) from None

    def failure(self, what: str) -> ServerProcessError:
        """An error saying that the server `what`, with the tail of its log."""
        tail = "\n".join(self.log_text().splitlines()[-_LOG_TAIL_LINES:])
        return ServerProcessError(f"`{self.command()}` (pid {self.pid}) {what}; its log ({self.log}):\n"
                                  f"{tail or '(empty)'}")

    # ------------------------------------------------------------------ processes
    def workers(self) -> list[int]:
        """Live worker processes (a killed one not yet reaped is left out)."""
        return [pid for pid in children_of(self.pid) if alive(pid)]

    def session_processes(self) -> list[int]:
        """Live processes of the server's session other than the server: its workers, or
        workers it left behind once it is gone (the socket janitor leaves the session)."""
        return [pid for pid in _session_members(self.pid) if pid != self.pid]

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout_s`, and return the exit code (0: a clean drain).

        A server that does not stop in time is killed and `ServerProcessError` is raised.
        A server that has exited already (or was reaped by the caller) just reports its code.
        """
        try:
            self.terminated = self.terminated or self.proc.poll() is None
            self.exit_code, killed = stop_process(self.proc, timeout_s)
        finally:
            self._forget_private()
        if killed:
            raise self.failure(f"did not stop within {timeout_s:g} s of SIGTERM and was killed")
        return self.exit_code

    def log_text(self) -> str:
        if self._log_cache is not None:
            return self._log_cache
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _forget_private(self) -> None:
        if self._private is not None and self.proc.returncode is not None:
            self._log_cache = self.log_text()
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[str]:
    return [entry for entry in os.listdir("/proc") if entry.isdigit()]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (read from /proc)."""
    return [int(p) for p in _pids() if (f := _stat_fields(p)) is not None and int(f[1]) == pid]


def _session_members(sid: int) -> list[int]:
    return [int(p) for p in _pids() if (f := _stat_fields(p)) is not None and int(f[3]) == sid and f[0] != "Z"]


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"
