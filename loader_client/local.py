"""One script: a loader server started by the training script, whose life is tied to the trainer's.

    import loader_client
    with loader_client.local_server(data="train.txt", batch_size=64, size="224x224", workers=8) as endpoint:
        for x, y in loader_client.LoaderClient(endpoint).epoch():
            ...

`local_server` starts the ``loader-server serve`` command (this package never imports the
server's code) with every keyword a ``serve`` setting of the same name (`batch_size`,
`shuffle=False` for ``--no-shuffle``, ...), and returns once the server answers ``health``
with a ready worker, so the first batch does not wait for its start-up. The settings reach the
server as ``LOADER_<KEY>`` variables, which outrank a `config` file and the trainer's own
``LOADER_*`` variables as flags would; the server checks them before it reads the data set,
and a bad one raises `ConfigError` naming the keyword.

The server stops with the trainer, however it ends: `stop` (the ``with`` block's end) sends
SIGTERM and waits; a trainer that exits without it, or is killed (even by SIGKILL), closes the
write end of a pipe that the server reads as its standard input (``--watch-stdin``): the
kernel closes it when the trainer dies, the server stops as on SIGTERM, and its workers stop
with it (they hold a parent-death signal). The server runs in a session of its own, so a
Ctrl-C in the terminal reaches the trainer only, which stops it on the way out.

Its log (warnings and errors by default: ``log_level="WARNING"``) goes to the trainer's
stderr, or to the file `log`. `wait_ready`, `connect_address` and `poll_health` are also what
`loader_server.launch.ServerProcess` (the tests' and the benchmark's server) uses.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any

from .contract.errors import ConfigError, LoaderError, LoaderTimeoutError
from .endpoints import parse_endpoint
from .queries import health

__all__ = ["LocalServer", "connect_address", "local_server", "stop_process", "wait_ready"]

#: Seconds a server gets to drain and exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Default wait for the server to answer health with a ready worker (indexing a large list takes a while).
START_TIMEOUT_S = 600.0
#: Lines of the server's output quoted in an error.
_TAIL_LINES = 40
#: Seconds between two health requests while waiting for readiness.
_READY_POLL_S = 0.05
#: What the server logs unless the caller asks for more (its INFO lines every few seconds would
#: interleave with the trainer's progress bar on the same terminal).
_DEFAULT_LOG_LEVEL = "WARNING"
#: How the server writes the error that stops it (bad settings or data: exit code 2).
_ERROR_PREFIX = "loader-server: error: "


def connect_address(endpoint: str) -> str:
    """Where a client on this host connects to reach a server bound to `endpoint`
    (a wildcard bind such as tcp://0.0.0.0:PORT or tcp://*:PORT is reached over loopback)."""
    for wildcard, loopback in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"), ("tcp://*:", "tcp://127.0.0.1:"),
                               ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(wildcard):
            return loopback + endpoint[len(wildcard):]
    return endpoint


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, bool]:
    """SIGTERM `proc` unless it has exited, wait up to `timeout_s`, SIGKILL it after that, and close the lifeline
    (its standard input); returns its exit code and whether it had to be killed."""
    killed = False
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    assert proc.returncode is not None
    return proc.returncode, killed


def wait_ready(endpoint: str, timeout_s: float, exited: Callable[[], int | None], **curve: Any) -> dict[str, Any]:
    """Ask ``health`` at `endpoint` until the server answers ok (a worker is ready); return the answer.

    `exited` returns the server process's exit code once it has exited (None while it runs):
    `LoaderError` says so at once rather than wait out `timeout_s`; `LoaderTimeoutError` after
    `timeout_s`, with the last answer. `curve`: the keys of a server started with --curve-dir.
    """
    address = connect_address(endpoint)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        code = exited()
        if code is not None:
            raise LoaderError(f"exited with code {code} before it was ready")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LoaderTimeoutError(f"was not ready within {timeout_s:g} s (last health answer: {last})")
        try:
            answer = health(address, timeout_s=min(0.5, remaining), **curve)
        except LoaderError as exc:  # not bound yet, or busy: ask again
            last = str(exc)
        else:
            if answer.get("ok") is True:
                return answer
            last = ", ".join(f"{k}={v}" for k, v in answer.items())
        time.sleep(_READY_POLL_S)


def _setting_text(key: str, value: Any) -> str:
    """A keyword's value as the server reads a ``LOADER_<KEY>`` variable (ConfigError naming `key` if none)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str, os.PathLike)):
        text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        if "\0" in text:
            raise ConfigError(f"local_server({key}=...): a NUL character cannot reach the server")
        return text
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)  # mean=(0.5, 0.4, 0.3), as the flag takes it
    raise ConfigError(f"local_server({key}={value!r}): a setting is text, a number, True/False, a path or a list "
                      f"of numbers, as `loader-server serve --{key.replace('_', '-')}` takes it; got "
                      f"{type(value).__name__}")


def _server_command() -> list[str]:
    if importlib.util.find_spec("loader_server") is None:  # looked up, not imported
        raise ConfigError("local_server starts `loader-server serve`, which is not installed in this Python "
                          f"({sys.executable}): install the server here (`python3 -m pip install "
                          "\"loader-service[server]\"`), or pass command=[\"/path/to/loader-server\"]")
    return [sys.executable, "-m", "loader_server"]


class LocalServer:
    """A ``loader-server serve`` child process tied to this one; see `local_server`.

    `endpoint` is where to connect; `pid` the server's process id; `stop()` ends it (the ``with``
    block does); `running()` says whether it still runs.
    """

    def __init__(self, settings: Mapping[str, Any], *, start_timeout_s: float = START_TIMEOUT_S,
                 log: str | os.PathLike[str] | None = None, command: Sequence[str] | None = None,
                 config: str | os.PathLike[str] | None = None) -> None:
        if "data" not in settings or settings["data"] in (None, ""):
            raise ConfigError("local_server needs data=PATH: a list file, a folder of class sub-folders or arrays, "
                              "as `loader-server serve --data` takes")
        if settings.get("curve_dir"):
            raise ConfigError("local_server serves this host: leave out curve_dir (its ipc:// socket or loopback "
                              "port needs no keys); a server for other hosts is `loader-server serve`")
        if not (isinstance(start_timeout_s, (int, float)) and start_timeout_s > 0):
            raise ConfigError(f"local_server(start_timeout_s={start_timeout_s!r}): a number of seconds > 0")
        self._private: str | None = None
        if settings.get("bind") is None:
            self._private = tempfile.mkdtemp(prefix="loader-local-")  # mode 0700: this user only
            settings = {**settings, "bind": f"ipc://{self._private}/loader.sock"}
        settings = {"log_level": _DEFAULT_LOG_LEVEL, **settings}
        env = dict(os.environ)
        given = {key.upper(): key for key in settings}
        for key, value in settings.items():
            if value is None:  # the server's default, even over a LOADER_* variable of the trainer's
                env.pop(f"LOADER_{key.upper()}", None)
            else:
                env[f"LOADER_{key.upper()}"] = _setting_text(key, value)
        self.endpoint = str(settings["bind"])
        parse_endpoint(connect_address(self.endpoint))  # a malformed bind: EndpointError now
        self._given = given
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._log_path = os.fspath(log) if log is not None else None
        argv = [*(command if command is not None else _server_command()), "serve", "--watch-stdin",
                *(["--config", os.fspath(config)] if config is not None else [])]
        self.command = " ".join(argv)
        out: IO[bytes] | int = subprocess.PIPE
        if self._log_path is not None:
            out = open(self._log_path, "ab")  # handed to the child, closed below
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        except OSError as exc:
            self._forget_private()
            raise ConfigError(f"local_server cannot start `{self.command}`: {exc.strerror or exc}") from None
        finally:
            if not isinstance(out, int):
                out.close()
        self.pid = self._proc.pid
        self._forwarder: threading.Thread | None = None
        if self._proc.stdout is not None:
            self._forwarder = threading.Thread(target=self._forward, args=(self._proc.stdout,),
                                               name=f"loader-server-{self.pid}-log", daemon=True)
            self._forwarder.start()
        try:
            wait_ready(self.endpoint, start_timeout_s, self._proc.poll)
        except BaseException as exc:
            code = self._proc.poll()
            self.stop()
            if isinstance(exc, LoaderError):
                raise self._failure(str(exc), code, type(exc)) from None
            raise

    # ------------------------------------------------------------------ the server's output
    def _forward(self, stream: IO[bytes]) -> None:
        """The server's output, line by line, to this process's stderr (its tail kept for errors)."""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            if line.startswith(_ERROR_PREFIX):
                continue  # raised as local_server's own error (ConfigError, LoaderError), in the caller's words
            try:
                print(line, file=sys.stderr, flush=True)
            except (OSError, ValueError):  # stderr closed: keep reading, so the server never blocks
                pass
        stream.close()

    def output_tail(self) -> list[str]:
        """The last lines the server wrote (from the log file when `log` was given)."""
        if self._forwarder is not None:
            self._forwarder.join(timeout=2.0)  # after an exit: the last lines are read
            return list(self._tail)
        try:
            with open(self._log_path or os.devnull, errors="replace") as f:
                return list(collections.deque(f.read().splitlines(), maxlen=_TAIL_LINES))
        except OSError:
            return []

    def _failure(self, what: str, code: int | None, kind: type[LoaderError] = LoaderError) -> LoaderError:
        """The error of a server that did not come up: its own `error:` line for bad settings, else its output."""
        tail = self.output_tail()
        errors = [line[len(_ERROR_PREFIX):] for line in tail if line.startswith(_ERROR_PREFIX)]
        if code == 2 and errors:
            message = errors[-1]
            for upper, key in self._given.items():  # the server names the variable it was given
                message = message.replace(f"environment variable LOADER_{upper}", f"local_server({key}=...)")
            return ConfigError(message if message.startswith("local_server(") else f"local_server: {message}")
        shown = "\n".join(tail) or "(no output)"
        where = f" (its log: {self._log_path})" if self._log_path else ""
        return kind(f"local_server: `{self.command}` (pid {self.pid}) {what}{where}; its last output:\n{shown}")

    # ------------------------------------------------------------------ lifetime
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout_s` (then SIGKILL), and return the exit code (0: a clean stop)."""
        try:
            code, killed = stop_process(self._proc, timeout_s)
        finally:
            self._forget_private()
        if killed:
            raise LoaderError(f"local_server: `{self.command}` (pid {self.pid}) did not stop within {timeout_s:g} s "
                              "of SIGTERM and was killed")
        return code

    def _forget_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def __enter__(self) -> str:
        return self.endpoint

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            code = self.stop()
        except LoaderError:
            if exc is None:
                raise
            return
        if code != 0 and exc is None:
            raise self._failure(f"exited with code {code}", code)


def local_server(*, data: str | os.PathLike[str], start_timeout_s: float = START_TIMEOUT_S,
                 log: str | os.PathLike[str] | None = None, command: Sequence[str] | None = None,
                 config: str | os.PathLike[str] | None = None, **settings: Any) -> LocalServer:
    """Start ``loader-server serve`` for this training script, ready, and tied to its life.

    Every keyword besides `start_timeout_s`, `log`, `command` and `config` is a ``serve`` setting, named
    as in a settings file: ``batch_size=64``, ``size="224x224"``, ``workers=8``,
    ``shuffle=False`` (``--no-shuffle``), ``drop_last=False`` (``--keep-last``),
    ``subset="val"``, ``augment="rrc,flip"``, ``mean=(0.5, 0.5, 0.5)``; None means the
    server's default. The server listens on an ``ipc://`` socket in a private folder (shared
    memory, no port to choose) unless `bind` says otherwise, and logs warnings and errors
    (``log_level``) to this process's stderr, or to the file `log`.

    Returns once the server answers health with a ready worker; use it as a context manager
    (``with local_server(...) as endpoint:``) or call `stop()`. Raises `ConfigError` naming the
    keyword for a bad setting, `LoaderError` with the server's output if it fails to start
    (a missing data set, say), `LoaderTimeoutError` if it is not ready within `start_timeout_s`.
    `config`: a settings file (``serve --config``), which the keywords override. `command`: the
    server command, for a ``loader-server`` of another environment (default: this Python's
    ``-m loader_server``).
    """
    return LocalServer({"data": data, **settings}, start_timeout_s=start_timeout_s, log=log, command=command,
                       config=config)
