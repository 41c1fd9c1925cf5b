"""The ``loader-server`` command: ``serve`` batches, or run the ``demo`` end to end.

Each command's flags come from arguments.py (or the tool's own module); ``bench`` is the
benchmark package `loader_bench`, loaded by name when that command runs, since the product
never imports its benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from loader_client.contract.errors import ConfigError

from .arguments import HelpFormatter, add_serve_arguments, explicit_serve_flags, require_opencv
from .config import ServerConfig, default_workers

__all__ = ["BENCH_PACKAGE", "build_parser", "config_from_args", "main", "subparser"]

EXIT_CONFIG = 2
#: The package that `loader-server bench` runs (it imports the product; the product never imports it).
BENCH_PACKAGE = "loader_bench"


def _add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the commands that ask a running server something."""
    p.add_argument("endpoint", nargs="?", default=None,
                   help="the server's endpoint (default: the `bind` setting that `serve` resolves from "
                        "--config and LOADER_BIND, asked on loopback when it binds every interface)")
    p.add_argument("--config", default=None, help="the TOML settings file that `serve` reads, for its `bind`")
    p.add_argument("--timeout-s", type=float, default=5.0, help="seconds to wait for the answer")
    p.add_argument("--server-public-key", default=None,
                   help="a CURVE server: its public key file (server.key) or Z85 text")
    p.add_argument("--client-keys", default=None,
                   help="a CURVE server: this client's .key_secret file, whose public key the server allows")


def _endpoint(args: argparse.Namespace) -> str:
    """The endpoint argument, else where `serve` with the same file and environment listens."""
    if args.endpoint:
        return str(args.endpoint)
    from .layered import resolve

    bind = resolve({"data": "-"}, args.config)[0].bind  # the data set does not matter here
    host = bind.removeprefix("tcp://").rsplit(":", 1)[0] if bind.startswith("tcp://") else None
    loopback = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "[::]": "[::1]"}.get(host or "")
    return bind.replace(f"tcp://{host}:", f"tcp://{loopback}:", 1) if loopback else bind


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    parser = argparse.ArgumentParser(prog="loader-server", formatter_class=fmt,
                                     description="Serve decoded image batches to loader clients over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", formatter_class=fmt, help="serve a data set",
                           description="Serve batches of a data set until SIGINT or SIGTERM.")
    add_serve_arguments(serve)
    demo = sub.add_parser("demo", formatter_class=fmt, help="generate sample data, serve it, check 2 epochs",
                          description="Generate a labelled image set, start `serve` on it, consume epochs "
                                      "with the client, check every sample arrives exactly once per epoch.")
    health = sub.add_parser("health", formatter_class=fmt, help="exit 0 if a server answers and has a ready worker",
                            description="Liveness and readiness check (for container health checks).")
    _add_endpoint_arguments(health)
    keygen = sub.add_parser("keygen", formatter_class=fmt, help="create CurveZMQ key pairs",
                            description="Create DIR/NAME.key (public) and DIR/NAME.key_secret (keep private). "
                                        "The server's directory holds server.key_secret and, in clients/, the "
                                        "public .key of every client allowed in.")
    keygen.add_argument("dir", help="where to write the key files")
    keygen.add_argument("--name", default="server", help="file name stem: server, or a client's name")
    stats = sub.add_parser("stats", formatter_class=fmt, help="print a running server's statistics as JSON",
                           description="Images/s, batches ready, workers, errors, clients of a running server.")
    _add_endpoint_arguments(stats)
    check = sub.add_parser("check", formatter_class=fmt, help="read every sample and report the bad ones",
                           description="Read every sample of a data set once (images decoded in parallel, array "
                                       "rows gathered), write a report of the bad files or rows (path, reason), "
                                       "print a summary; exit 1 if any is bad.")
    from .check import add_check_arguments

    add_check_arguments(check)
    cache = sub.add_parser("cache", formatter_class=fmt, help="manage the decoded-sample cache (cache build)",
                           description="Fill a decoded-sample cache (--cache DIR) ahead of training.")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    build = cache_sub.add_parser("build", formatter_class=fmt, help="decode every sample into the cache, in parallel",
                                 description="Decode every sample of a data set into the cache that `serve` with the "
                                             "same settings will use; records already valid are kept.")
    from .cache_build import add_cache_build_arguments

    add_cache_build_arguments(build)
    # Its flags belong to loader_bench (`loader-server bench --help` lists them): main() hands every
    # word after `bench` to that package.
    sub.add_parser("bench", formatter_class=fmt, add_help=False,
                   help="measure throughput side by side with other loaders",
                   description="Benchmark the service against the per-core limit, the classic generator and torch "
                               "DataLoader; write JSON, a markdown table and a plot.")
    simulate = sub.add_parser("simulate", formatter_class=fmt,
                              help="simulate a fleet of loader hosts and trainer ranks; check exactly-once and load",
                              description="Drive the real session, sampling, fail-over and balanced-merge logic with "
                                          "many loader hosts and trainer ranks in one process (simulated clock, "
                                          "network and workers; random host deaths and returns, slow hosts). "
                                          "Exit 0 only when every check holds.")
    from .simulation.command import add_simulate_arguments

    add_simulate_arguments(simulate)
    replay = sub.add_parser("replay", formatter_class=fmt, help="rebuild one batch of a stream, bitwise, into a .npz",
                            description="Rebuild batch B of epoch E (of a rank's share) with the settings `serve` "
                                        "used, bitwise as the client received it: arrays x, y and index in an npz "
                                        "file, and optionally its manifest.")
    from .replay import add_replay_arguments

    add_replay_arguments(replay)
    demo.add_argument("--out", default=None, help="folder for the sample images (default: a temporary folder)")
    demo.add_argument("--images", type=int, default=1024, help="number of sample images to generate")
    demo.add_argument("--epochs", type=int, default=2, help="epochs to consume")
    demo.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    demo.add_argument("--size", default="224x224", help="output WIDTHxHEIGHT")
    demo.add_argument("--workers", type=int, default=default_workers(), help="worker processes")
    demo.add_argument("--timeout-s", type=float, default=60.0, help="give up if the server is silent this long")
    return parser


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one COMMAND of `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def unrecognized(command: argparse.ArgumentParser, rest: Sequence[str]) -> str:
    """The error for words `command` does not take, with what to do: the flag meant (``--batchsize``: did you mean
    ``--batch-size``?), or quotes where the shell expanded a pattern of --data into several paths."""
    import difflib

    joined = " ".join(rest)
    shown = joined if len(joined) <= 300 else joined[:300] + " ..."
    hints = []
    flags = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
    for word in rest:
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.7)
            if close:
                hints.append(f"{name}: did you mean {close[0]}?")
    if any(word.startswith("-") for word in rest):
        hints.append(f"`{command.prog} --help` lists every flag")
    if any(not word.startswith("-") and os.path.exists(word) for word in rest):
        hints.append("the shell expanded a pattern into several paths: quote it, as in --data 'shards/train-*.tar' "
                     "or --data 'shards/train-{000000..000099}.tar', or join paths with ::")
    return f"unrecognized arguments: {shown}" + "".join(f"; {hint}" for hint in hints)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `serve` flags alone (defaults included; no file, no environment)."""
    from .layered import PARSERS, resolve

    return resolve({k: v for k, v in vars(args).items() if k in PARSERS and v is not None}, None, {})[0]


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`serve`; `argv` is the whole command line, `serve` first."""
    from .data.batch_spec import batch_spec
    from .data.datasets import load_dataset
    from .layered import format_config, resolve
    from .logs import setup_logging

    if args.watch_stdin:  # first: a trainer killed while this server indexes its data stops it too
        from .lifeline import stop_when_stdin_closes

        stop_when_stdin_closes()
    require_opencv("serve")
    config, sources = resolve(explicit_serve_flags(argv[1:]), args.config)  # the words after `serve`
    setup_logging(config.log_level, config.log_format)  # indexing a large data set logs what it did
    dataset = load_dataset(config)
    spec = batch_spec(config, dataset)  # every check of the settings against the data, before printing them
    if args.print_config:
        print(format_config(config, sources))
        return 0
    from .data.scan import startup_scan

    known_bad = startup_scan(config, dataset)  # missing or unreadable files: exit 2 now, or counted for skip
    from .pipeline import batch  # noqa: F401  (loaded before the workers fork, so that each starts at once)
    from .server import Server, install_signal_handlers

    server = Server(config, dataset, spec, known_bad=known_bad)
    install_signal_handlers(server)
    try:
        return server.run()
    finally:
        if args.watch_stdin:
            _remove_private_folder(config.bind)


def _remove_private_folder(bind: str) -> None:
    """The folder `loader_client.local_server` made for this server's socket, once the socket is gone:
    a trainer killed with SIGKILL cannot remove it. Only an empty folder of that name (rmdir)."""
    if not bind.startswith("ipc://"):
        return
    folder = os.path.dirname(bind.removeprefix("ipc://"))
    if os.path.basename(folder).startswith("loader-local-"):
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (a file of the trainer's), or gone already: left as it is


def _curve_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """CURVE keys of `health` and `stats`, for a server started with --curve-dir."""
    from loader_client.security import load_key_pair, load_public_key

    if bool(args.server_public_key) != bool(args.client_keys):
        raise ConfigError("--server-public-key and --client-keys go together: a CURVE server needs both")
    if not args.server_public_key:
        return {}
    try:
        return {"server_public_key": load_public_key(args.server_public_key),
                "client_keys": load_key_pair(args.client_keys)}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--server-public-key/--client-keys: {exc}; pass the server's server.key and this "
                          "client's .key_secret file (from `loader-server keygen`)") from None


def _health(args: argparse.Namespace) -> int:
    from loader_client import LoaderError, health

    curve = _curve_arguments(args)  # a usage error (exit 2), not an unhealthy server
    try:
        answer = health(_endpoint(args), timeout_s=args.timeout_s, **curve)
    except ConfigError:
        raise  # a malformed endpoint is a usage error (exit 2), not an unhealthy server
    except LoaderError as exc:
        print(f"loader-server health: {exc}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in answer.items()))
    return 0 if answer.get("ok") else 1


def _keygen(args: argparse.Namespace) -> int:
    from .keys import create_key_pair

    public, secret = create_key_pair(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from loader_client import LoaderError, server_stats

    curve = _curve_arguments(args)
    try:
        print(json.dumps(server_stats(_endpoint(args), timeout_s=args.timeout_s, **curve), indent=2))
    except ConfigError:
        raise  # a malformed endpoint: exit 2
    except LoaderError as exc:
        print(f"loader-server stats: {exc}", file=sys.stderr)
        return 1
    return 0


def _bench(argv: Sequence[str]) -> int:
    """`loader-server bench ARGS`: the benchmark package's own command line, loaded by name."""
    try:
        bench = importlib.import_module(BENCH_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != BENCH_PACKAGE:
            raise
        raise ConfigError(f"`loader-server bench` runs the benchmark package {BENCH_PACKAGE}, which is not installed "
                          "here: install loader-service from its source tree (`python3 -m pip install .`), which "
                          "ships it") from None
    code: int = bench.main(argv, prog="loader-server bench")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `loader-server`; returns the exit code (2 for bad settings or data)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # the words after `bench` are the benchmark's own flags
    if rest and args.command != "bench":
        parser.error(unrecognized(subparser(parser, args.command), rest))
    try:
        if args.command == "serve":
            return _serve(args, argv)
        if args.command == "health":
            return _health(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "check":
            from .check import run_check

            return run_check(args)
        if args.command == "cache":
            from .cache_build import run_cache_build

            return run_cache_build(args)
        if args.command == "replay":
            from .replay import run_replay

            return run_replay(args, argv[1:])
        if args.command == "simulate":
            from .simulation.command import run_simulate

            return run_simulate(args)
        if args.command == "bench":
            return _bench(rest)
        require_opencv("demo")
        from .demo import run_demo

        return run_demo(args)
    except ConfigError as exc:
        from .redaction import redact

        print(f"loader-server: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
