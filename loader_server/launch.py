"""Start and stop ``loader-server serve`` as a child process: for the demo, the benchmark and the tests.

`ServerProcess` starts ``python -m loader_server serve`` on a given or private endpoint, with its
output in a log file; `wait_ready` asks the server's ``health`` request until it answers ok (a
worker is ready), failing with the server's log if the process exits or the deadline passes;
`stop` sends SIGTERM, waits, then SIGKILLs, and returns the exit code; `workers` lists the live
worker processes. The server runs in a session of its own, so that a Ctrl-C meant for the caller
does not reach it (the caller stops it) and so that `session_processes` can find a worker left
behind even after the server itself is gone. The flip side: a caller that dies without calling
`stop` (SIGKILL) leaves its server running; use it as a context manager, or `stop` in a finally.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from loader_client import health
from loader_client.contract.errors import LoaderError

__all__ = ["ServerProcess", "ServerProcessError", "alive", "children_of", "connect_address"]

#: Seconds a server gets to drain and exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Lines of the server's log quoted in an error.
_LOG_TAIL_LINES = 60
#: Seconds between two health requests while waiting for readiness.
_READY_POLL_S = 0.05


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
        with open(self.log, "wb") as f:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [python, "-m", "loader_server", *self.args], stdin=subprocess.DEVNULL, stdout=f,
                stderr=subprocess.STDOUT, start_new_session=True)

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
        address = connect_address(self.endpoint)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with code {self.proc.returncode} before it was ready")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(f"was not ready within {timeout_s:g} s (last health answer: {last})")
            try:
                answer = health(address, timeout_s=min(0.5, remaining), **curve)
            except LoaderError as exc:  # not bound yet, or busy: ask again
                last = str(exc)
            else:
                if answer.get("ok") is True:
                    return answer
                last = ", ".join(f"{k}={v}" for k, v in answer.items())
            time.sleep(_READY_POLL_S)

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
            if self.proc.poll() is None:
                self.terminated = True
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.exit_code = self.proc.wait()
                raise self.failure(f"did not stop within {timeout_s:g} s of SIGTERM and was killed") from None
            return self.exit_code
        finally:
            self._forget_private()

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


def connect_address(endpoint: str) -> str:
    """Where a client on this host connects to reach a server bound to `endpoint`
    (a wildcard bind such as tcp://0.0.0.0:PORT or tcp://*:PORT is reached over loopback)."""
    for wildcard, loopback in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"), ("tcp://*:", "tcp://127.0.0.1:"),
                               ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(wildcard):
            return loopback + endpoint[len(wildcard):]
    return endpoint


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
