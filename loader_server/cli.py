"""The ``loader-server`` command: ``serve`` batches, or run the ``demo`` end to end."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from loader_client.errors import ConfigError

from .config import ServerConfig, default_workers

__all__ = ["main", "build_parser", "config_from_args", "add_setting_arguments", "HelpFormatter"]

EXIT_CONFIG = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each setting's default as its definition says (`shown_default` on the action).

    A flag that sets a boolean shows whether it is in effect by default (``on``/``off``), never
    the value of the setting it changes.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = getattr(action, "shown_default", None)
        if shown is None:
            return super()._get_help_string(action)
        text = (action.help or "").replace("%", "%%")
        return f"{text} (default: {shown.replace('%', '%%')})" if shown else text


def add_setting_arguments(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per ServerConfig setting in `names` (default: all), built from the field's definition."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    for name in fields if names is None else names:
        f = fields[name]
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None  # required: from the flag, the file or the environment
        if meta.get("flags"):  # booleans: each flag sets one value
            group = p.add_mutually_exclusive_group() if len(meta["flags"]) > 1 else p
            for flag, (value, text) in meta["flags"].items():
                action = group.add_argument(flag, dest=name, action="store_const", const=value, default=default,
                                            help=text)
                action.shown_default = "on" if value == default else "off"  # type: ignore[attr-defined]
            continue
        shown = meta.get("shown")
        if shown is None:
            shown = "" if default is None else str(default)
        action = p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, choices=meta.get("choices"),
                                metavar=meta.get("metavar"), help=meta["help"])
        action.shown_default = shown  # type: ignore[attr-defined]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every server setting; each can also come from --config or LOADER_<NAME>."""
    action = p.add_argument("--config", default=None, metavar="FILE",
                            help="TOML file of settings (keys as the flags, e.g. batch_size = 64); "
                                 "LOADER_<NAME> variables override it, flags override both")
    action.shown_default = ""  # type: ignore[attr-defined]
    action = p.add_argument("--print-config", action="store_true",
                            help="check the settings and the data set, print them as TOML (each with where it "
                                 "came from; --config reads it back), then exit")
    action.shown_default = "off"  # type: ignore[attr-defined]
    add_setting_arguments(p)


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
    bench = sub.add_parser("bench", formatter_class=fmt, help="measure throughput side by side with other loaders",
                           description="Benchmark the service against the per-core limit, the classic generator "
                                       "and torch DataLoader; write JSON, a markdown table and a plot.")
    from loader_bench import add_bench_arguments  # the benchmark is a package of its own

    add_bench_arguments(bench)
    simulate = sub.add_parser("simulate", formatter_class=fmt,
                              help="simulate a fleet of loader hosts and trainer ranks; check exactly-once and load",
                              description="Drive the real session, sampling, fail-over and balanced-merge logic with "
                                          "many loader hosts and trainer ranks in one process (simulated clock, "
                                          "network and workers; random host deaths and returns, slow hosts). "
                                          "Exit 0 only when every check holds.")
    from .simulation.command import add_simulate_arguments

    add_simulate_arguments(simulate)
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `serve` flags alone (defaults included; no file, no environment)."""
    from .layered import PARSERS, resolve

    return resolve({k: v for k, v in vars(args).items() if k in PARSERS and v is not None}, None, {})[0]


def explicit_serve_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The settings given on the command line itself, so that file and environment can fill the rest."""
    from .layered import PARSERS

    parser = build_parser()
    for action in subparser(parser, "serve")._actions:
        action.default = argparse.SUPPRESS
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k in PARSERS}


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .data.batch_spec import batch_spec
    from .data.datasets import load_dataset
    from .layered import format_config, resolve
    from .logs import setup_logging

    require_opencv("serve")
    config, sources = resolve(explicit_serve_flags(argv), args.config)
    setup_logging(config.log_level, config.log_format)  # indexing a large data set logs what it did
    dataset = load_dataset(config)
    spec = batch_spec(config, dataset)  # every check of the settings against the data, before printing them
    if args.print_config:
        print(format_config(config, sources))
        return 0
    from .pipeline import batch  # noqa: F401  (loaded before the workers fork, so that each starts at once)
    from .server import Server, install_signal_handlers

    server = Server(config, dataset, spec)
    install_signal_handlers(server)
    return server.run()


def require_opencv(command: str) -> None:
    """Exit 2 with what to install when OpenCV (the server's decoder) cannot be imported.

    `serve`, `check` and `demo` import it here, in the process that forks the workers, as they
    always have: forked workers then start with the decoder already loaded.
    """
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"`loader-server {command}` decodes images with OpenCV, which cannot be imported here ({exc}): "
            "install the server with `python3 -m pip install \"loader-service[server]\"` (it adds "
            "opencv-python-headless), or `python3 -m pip install opencv-python` if you want the desktop build; "
            "never both"
        ) from None


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `loader-server`; returns the exit code (2 for bad settings or data)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
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
        if args.command == "simulate":
            from .simulation.command import run_simulate

            return run_simulate(args)
        if args.command == "bench":
            from loader_bench import run_bench

            return run_bench(args)
        require_opencv("demo")
        from .demo import run_demo

        return run_demo(args)
    except ConfigError as exc:
        print(f"loader-server: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
