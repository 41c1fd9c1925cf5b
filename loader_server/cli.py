"""The ``loader-server`` command: ``serve`` batches, or run the ``demo`` end to end."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from loader_client.errors import ConfigError

from .batch import AUTO_READ_THREADS, SLOW_READ_S
from .config import INTERPOLATIONS, RESIZE_MODES, ServerConfig, default_workers

__all__ = ["main", "build_parser", "config_from_args"]

EXIT_CONFIG = 2


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every server setting; each can also come from --config or LOADER_<NAME>."""
    d = ServerConfig.__dataclass_fields__
    p.add_argument("--config", default=None,
                   help="TOML file of settings (keys as the flags, e.g. batch_size = 64); "
                        "LOADER_<NAME> variables override it, flags override both")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    p.add_argument("--data", default=None,
                   help="list file of `path label` (or `path,label`) lines, or a folder of class sub-folders")
    p.add_argument("--labels", default=None, help="array data: labels .npy, one per row of --data x.npy")
    p.add_argument("--offsets", default=None,
                   help="ragged array data: offsets .npy (n + 1 positions) into the values of --data")
    p.add_argument("--maxlen", type=int, default=None, help="ragged array data: pad or truncate sequences to this")
    p.add_argument("--pad", choices=("pre", "post"), default="pre", help="ragged: where padding goes")
    p.add_argument("--truncate", choices=("pre", "post"), default="pre", help="ragged: which end is cut")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="samples per batch")
    p.add_argument("--size", default="224x224", help="output WIDTHxHEIGHT, as cv2.resize takes it")
    p.add_argument("--workers", type=int, default=default_workers(), help="worker processes (CPUs - 1 on this machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle; same seed, same batches")
    p.add_argument("--bind", default=d["bind"].default, help="endpoint to serve on: tcp://HOST:PORT or ipc://PATH")
    p.add_argument("--curve-dir", default=None,
                   help="encrypt and authenticate with CurveZMQ: DIR/server.key_secret and an allow-list of "
                        "client public keys in DIR/clients/*.key (see `loader-server keygen`)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without CURVE (anyone who reaches it gets data)")
    p.add_argument("--prefetch", type=int, default=d["prefetch"].default,
                   help="batches built ahead per client (bounds memory: prefetch x batch bytes)")
    p.add_argument("--mode", choices=("epoch", "random"), default="epoch",
                   help="epoch: a permutation per epoch; random: draw with replacement, endless")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep file order in epoch mode")
    last = p.add_mutually_exclusive_group()
    last.add_argument("--drop-last", dest="drop_last", action="store_true", default=True,
                      help="drop the short last batch of an epoch (len // batch_size batches)")
    last.add_argument("--keep-last", dest="drop_last", action="store_false", help="keep the short last batch")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="batches per epoch in random mode (default: samples // batch size)")
    p.add_argument("--unordered", dest="in_order", action="store_false",
                   help="send batches as they complete instead of in stream order (faster, not reproducible)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                   help="stretch to WxH, letterbox (keep aspect, pad), or crop (shorter side, centre)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="linear",
                   help="resize interpolation (area costs about 6x linear)")
    p.add_argument("--pad-value", type=int, default=0, help="letterbox padding value (0..255)")
    p.add_argument("--color", choices=("rgb", "bgr", "gray"), default="rgb", help="channel order of x")
    p.add_argument("--dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8 pixels, or float32 scaled to [0, 1] (4x the bytes on the wire)")
    p.add_argument("--layout", choices=("hwc", "chw"), default="hwc", help="image layout inside a batch")
    p.add_argument("--augment", default=None,
                   help='training augmentations, e.g. "rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)"; '
                        "seeded by (seed, epoch, sample); clients that pass augment=False get none")
    p.add_argument("--transform", default=None,
                   help="package.module:function(image, rng) -> image, run on every decoded image in the workers")
    p.add_argument("--collate", default=None,
                   help="package.module:function(arrays, rng) -> dict of extra per-sample arrays for each batch")
    p.add_argument("--no-reduced-decode", dest="reduced_decode", action="store_false",
                   help="decode JPEGs at full size even when 1/2, 1/4 or 1/8 would still cover the output")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad file: raise (the trainer gets an error naming it) or skip (replace the sample "
                        "with another of the same batch, log the file once, count it)")
    p.add_argument("--max-bad", default="0.1%",
                   help="skip mode: more bad files than this (a count, or a percentage of the index) is an error")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"].default,
                   help="refuse larger images before decoding them (decompression bombs)")
    p.add_argument("--no-shm", dest="shm", action="store_false",
                   help="never use shared memory, even for clients on this host (frames over the socket)")
    p.add_argument("--read-threads", type=int, default=None,
                   help="file reads in flight per worker, overlapping slow storage with decoding; 0 reads inline; "
                        f"default: inline while reads are fast, {AUTO_READ_THREADS} threads once they average "
                        f"over {SLOW_READ_S * 1000:g} ms")
    p.add_argument("--simulate-read-latency-ms", type=float, default=0.0,
                   help="benchmark option: add this latency to every file read (simulates network storage)")
    p.add_argument("--mean", type=_floats, default=None, help="per-channel mean, float32 only: (x/255-mean)/std")
    p.add_argument("--std", type=_floats, default=None, help="per-channel std, float32 only")
    p.add_argument("--max-file-bytes", type=int, default=d["max_file_bytes"].default,
                   help="files larger than this (and devices) are bad files, refused before they are read")
    p.add_argument("--max-clients", type=int, default=d["max_clients"].default,
                   help="sessions served at once; more clients are refused with a clear error")
    p.add_argument("--batch-timeout-s", type=float, default=d["batch_timeout_s"].default,
                   help="a worker that makes no progress on a batch this long is hung: its stack is logged, "
                        "it is killed and replaced, and the batch is built again")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat interval to idle clients")
    p.add_argument("--client-timeout-s", type=float, default=30.0,
                   help="drop a client silent for this long (its trainer died)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="json: one JSON object per line, for log collectors")
    p.add_argument("--log-interval-s", type=float, default=d["log_interval_s"].default,
                   help="log a throughput line this often (0: never)")
    p.add_argument("--metrics-host", default=d["metrics_host"].default,
                   help="address the metrics endpoint listens on (0.0.0.0: reachable by a Prometheus elsewhere)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (off by default)")


def _add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the commands that ask a running server something."""
    p.add_argument("endpoint", nargs="?", default=ServerConfig.__dataclass_fields__["bind"].default,
                   help="the server's endpoint")
    p.add_argument("--timeout-s", type=float, default=5.0, help="seconds to wait for the answer")
    p.add_argument("--server-public-key", default=None,
                   help="a CURVE server: its public key file (server.key) or Z85 text")
    p.add_argument("--client-keys", default=None,
                   help="a CURVE server: this client's .key_secret file, whose public key the server allows")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
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
    check = sub.add_parser("check", formatter_class=fmt, help="decode every sample and report the bad files",
                           description="Decode every sample of a data set in parallel, write a report of bad "
                                       "files (path, reason), print a summary; exit 1 if any file is bad.")
    from .check import add_check_arguments

    add_check_arguments(check)
    bench = sub.add_parser("bench", formatter_class=fmt, help="measure throughput side by side with other loaders",
                           description="Benchmark the service against the per-core limit, the classic generator "
                                       "and torch DataLoader; write JSON, a markdown table and a plot.")
    from loader_bench import add_bench_arguments  # the benchmark is a package of its own

    add_bench_arguments(bench)
    demo.add_argument("--out", default=None, help="folder for the sample images (default: a temporary folder)")
    demo.add_argument("--images", type=int, default=1024, help="number of sample images to generate")
    demo.add_argument("--epochs", type=int, default=2, help="epochs to consume")
    demo.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    demo.add_argument("--size", default="224x224", help="output WIDTHxHEIGHT")
    demo.add_argument("--workers", type=int, default=default_workers(), help="worker processes")
    demo.add_argument("--timeout-s", type=float, default=60.0, help="give up if the server is silent this long")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `serve` flags alone (defaults included; no file, no environment)."""
    from .layered import PARSERS, resolve

    return resolve({k: v for k, v in vars(args).items() if k in PARSERS and v is not None}, None, {})[0]


def explicit_serve_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The settings given on the command line itself, so that file and environment can fill the rest."""
    from .layered import PARSERS

    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["serve"]._actions:  # type: ignore[union-attr]
        action.default = argparse.SUPPRESS
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k in PARSERS}


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import dataclasses

    from .arrays import is_array_data, load_arrays
    from .index import load_index
    from .layered import format_config, resolve
    from .logs import setup_logging
    from .server import Server, install_signal_handlers

    config, sources = resolve(explicit_serve_flags(argv), args.config)
    if args.print_config:
        print(format_config(config, sources))
        return 0
    setup_logging(config.log_level, config.log_format)
    index: Any
    if is_array_data(config.data):
        index = load_arrays(config.data, config.labels, config.offsets, config.maxlen, config.pad, config.truncate)
        config = dataclasses.replace(config, sample_shape=index.sample_shape, sample_dtype=index.sample_dtype)
    else:
        index = load_index(config.data)
    if config.mode == "epoch" and config.drop_last and len(index) < config.batch_size:
        raise ConfigError(
            f"`batch_size` {config.batch_size} is larger than the data set ({len(index)} samples in "
            f"{config.data}) and the last batch is dropped: lower --batch-size or pass --keep-last"
        )
    server = Server(config, index)
    install_signal_handlers(server)
    return server.run()


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
        answer = health(args.endpoint, timeout_s=args.timeout_s, **curve)
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
        print(json.dumps(server_stats(args.endpoint, timeout_s=args.timeout_s, **curve), indent=2))
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
        if args.command == "bench":
            from loader_bench import run_bench

            return run_bench(args)
        from .demo import run_demo

        return run_demo(args)
    except ConfigError as exc:
        print(f"loader-server: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
