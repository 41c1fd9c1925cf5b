"""Both sides of every documented limit and every schema range, with the numbers written out.

Each expected number here is the documented one (README: "positions below 2**31, seeds below
2**63", "at most 128 characters", the --help defaults, ...), never read from the code's own
constants: a bound widened or narrowed in the code must fail a test here. Each range is tested
at its last accepted value and at the first refused one, on both ends.

Pure and in-process (message schemas, client options, `loader-server serve --print-config`
run through `loader_server.cli.main`): this file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import ClientOptions, ConfigError, ProtocolError
from loader_client.contract import messages as m  # the message schemas (one place to update if they move)
from loader_client.contract import schema
from loader_client.contract.protocol import PROTOCOL_VERSION
from loader_server.cli import build_parser, main, subparser
from loader_server.config import ServerConfig
from loader_server.runtime import worker_messages as wm

from .conftest import unique_label_list

I32 = 2**31 - 1  # "positions and epochs below 2**31"
I63 = 2**63 - 1  # "seeds below 2**63"
U64 = 2**64 - 1
TIB = 2**40

# ---------------------------------------------------------------------------- message schemas
_ARENA = {"id": 1, "pid": 10, "fd": 3, "inode": 99, "slots": 4, "stride": 4096}
#: A valid wire map of every message class, on which one field at a time is replaced.
VALID: dict[type[schema.Message], dict[str, Any]] = {
    m.Hello: {},
    m.Credit: {"n": 1},
    m.Ping: {},
    m.Release: {"slots": [0]},
    m.ArenaHandle: dict(_ARENA),
    m.ShmRef: {"slot": 0, "arrays": [["x", "|u1", [1]]]},
    m.Welcome: {"num_samples": 10, "num_classes": 2, "batch_size": 2, "steps_per_epoch": 5, "rank": 0,
                "world_size": 1, "seed": 1, "epoch": 0, "batch": 0, "mode": "epoch", "in_order": True,
                "drop_last": True, "shuffle": True, "x_shape": [4, 4, 3], "x_dtype": "|u1", "layout": "hwc", "color": "rgb",
                "class_names": ["a"], "fingerprint": "f", "heartbeat_s": 0.5, "max_message_bytes": 1 << 20},
    m.Batch: {"epoch": 0, "batch": 0, "steps": 1, "arrays": [["y", "<i8", [2]]]},
    m.Error: {"kind": "server", "message": "m"},
    m.Goodbye: {"reason": "r"},
    m.HealthReply: {"ok": True, "workers_ready": 0, "workers": 0, "clients": 0, "batches_sent": 0},
    m.BadFile: {"path": "a.jpg", "reason": "empty"},
    m.SourcesRequest: {"indices": [0]},
    m.SourcesReply: {"sources": ["a.jpg"], "dataset": "train.txt", "version": "0123456789abcdef"},
    m.Drawn: {"op": "flip", "values": [1]},
    m.SampleManifest: {"index": 0, "source": "a.jpg"},
    m.Manifest: {"epoch": 0, "batch": 0, "samples": []},
    wm.Ready: {"worker": 0, "pid": 1},
    wm.Task: {"id": 0, "indices": b"", "seed": 0, "epoch": 0, "augment": False},
    wm.Forget: {"arena": 0},
    wm.Result: {"id": 0, "arrays": [], "build_s": 0.0},
    wm.Failed: {"id": 0, "kind": "server", "message": "m", "reason": "r"},
    wm.Skipped: {"id": 0},
}

#: (message, field, lowest accepted, highest accepted): the documented ranges, written out.
RANGES: list[tuple[type[schema.Message], str, float, float]] = [
    # Any int32 rank and world size pass the schema (the session names a bad pair); the world size is
    # at most 65,536.
    (m.Hello, "rank", -I32, I32), (m.Hello, "world_size", -I32, 65_536), (m.Hello, "epoch", 0, I32),
    (m.Hello, "batch", 0, I32), (m.Hello, "seed", 0, I63), (m.Hello, "credit", 0, I32),
    (m.Credit, "n", 1, I32),
    # A trainer's cumulative wait and wall time, in seconds (about 31 years at most).
    (m.Credit, "wait_s", 0.0, 1e9), (m.Credit, "wall_s", 0.0, 1e9), (m.Ping, "wait_s", 0.0, 1e9),
    (m.Ping, "wall_s", 0.0, 1e9),
    (m.ArenaHandle, "id", 0, I63), (m.ArenaHandle, "pid", 1, I32), (m.ArenaHandle, "fd", 0, I32),
    (m.ArenaHandle, "inode", 0, U64), (m.ArenaHandle, "slots", 1, 1024), (m.ArenaHandle, "stride", 1, TIB),
    (m.ArenaHandle, "key_slot", 0, 127),  # a page after the last slot: 128 keys of 32 bytes
    (m.ShmRef, "slot", 0, 1023),
    (m.Welcome, "num_samples", 0, I63), (m.Welcome, "num_classes", 1, I63), (m.Welcome, "batch_size", 1, I32),
    (m.Welcome, "steps_per_epoch", 1, I32), (m.Welcome, "rank", 0, 65_535), (m.Welcome, "world_size", 1, 65_536),
    (m.Welcome, "seed", 0, I63), (m.Welcome, "epoch", 0, I32), (m.Welcome, "batch", 0, I32),
    (m.Welcome, "heartbeat_s", 0.001, 3600.0), (m.Welcome, "max_message_bytes", 1, TIB),
    (m.Batch, "epoch", 0, I32), (m.Batch, "batch", 0, I32), (m.Batch, "steps", 1, I32),
    (m.Error, "exit_code", -256, 256), (m.Error, "bad_count", 0, I32),
    (m.SampleManifest, "index", 0, I63), (m.Manifest, "epoch", 0, I32), (m.Manifest, "batch", 0, I32),
    (m.HealthReply, "workers_ready", 0, I32), (m.HealthReply, "workers", 0, I32), (m.HealthReply, "clients", 0, I32),
    (m.HealthReply, "batches_sent", 0, I63),
    (wm.Ready, "worker", 0, I32), (wm.Ready, "pid", 1, I32),
    (wm.Task, "id", 0, I63), (wm.Task, "seed", 0, I63), (wm.Task, "epoch", 0, I32), (wm.Task, "slot", 0, I32),
    (wm.Forget, "arena", 0, I63),
    (wm.Result, "id", 0, I63), (wm.Result, "build_s", 0.0, 1e9), (wm.Result, "cache_hits", 0, I32),
    (wm.Result, "cache_misses", 0, I32),
    (wm.Failed, "id", 0, I63), (wm.Skipped, "id", 0, I63),
]

#: (message, field, one unit, longest accepted): text "at most 128 characters" for names, and the other
#: lengths. A unit is a character, a byte, or a one-item list (lists of that item).
LENGTHS: list[tuple[type[schema.Message], str, Any, int]] = [
    (m.Hello, "client", "n", 128), (m.Hello, "fingerprint", "f", 64), (m.Hello, "share", "s", 128),
    (m.Welcome, "share", "s", 128),
    (m.Hello, "shm_key", "a", 32),  # 16 random bytes in hex (and nothing but lower-case hex: tested below)
    (m.ArenaHandle, "token", "t", 64),  # a 128-bit token in hex is 32: at most 64 characters pass
    (m.Release, "slots", [0], 1024), (m.ShmRef, "arrays", [["x", "|u1", [1]]], 1),
    (m.Welcome, "mode", "e", 16), (m.Welcome, "x_shape", [1], 8), (m.Welcome, "x_dtype", "u", 8),
    (m.Welcome, "layout", "h", 8), (m.Welcome, "color", "r", 8), (m.Welcome, "fingerprint", "f", 64),
    (m.Welcome, "class_names", ["c"], 1 << 20),
    (m.Batch, "arrays", [["y", "<i8", [2]]], 64),
    (m.Error, "kind", "k", 32), (m.Error, "message", "m", 65_536), (m.Error, "path", "p", 4096),
    (m.Error, "reason", "r", 1024), (m.Error, "traceback", "t", 65_536),
    (m.Goodbye, "reason", "r", 1024),
    # every bad file of a batch: 64 named at most; a file's path 4096, its reason a code of 64
    (m.Error, "bad", [{"path": "p", "reason": "r"}], 64), (m.BadFile, "path", "p", 4096), (m.BadFile, "reason", "r", 64),
    # sources: 200 indices a request, each source at most 4096 characters (the reply fits a 1 MiB header)
    (m.SourcesRequest, "indices", [0], 200), (m.SourcesReply, "sources", ["s"], 200),
    (m.SourcesReply, "dataset", "d", 4096), (m.SourcesReply, "version", "v", 64),
    # a manifest: 1024 samples, a source of 512 characters, 16 augmentations of 8 numbers each
    (m.Manifest, "samples", [{"index": 0, "source": "a"}], 1024), (m.SampleManifest, "source", "s", 512),
    (m.SampleManifest, "augment", [{"op": "flip", "values": [1]}], 16), (m.Drawn, "op", "o", 32),
    (m.Drawn, "values", [0.5], 8),
    (wm.Result, "manifest", [{"index": 0, "source": "a"}], 1024), (wm.Failed, "bad", [["p", "c"]], 1 << 20),
    (wm.Task, "indices", b"\0", 8 * 2**24),  # 16 Mi sample indices of 8 bytes
    (wm.Result, "arrays", [["y", "<i8", [2]]], 64), (wm.Result, "bad", [["p", "c", "r"]], 1 << 20),
    (wm.Result, "shm_arrays", [["x", "|u1", [1]]], 1),
    (wm.Failed, "kind", "k", 32), (wm.Failed, "message", "m", 65_536), (wm.Failed, "reason", "r", 1024),
    (wm.Failed, "path", "p", 4096), (wm.Failed, "traceback", "t", 65_536),
    # hosts a worker found to answer one request per connection, sent with its next answer (16 at most)
    (wm.Result, "serial_hosts", ["h"], 16), (wm.Failed, "serial_hosts", ["h"], 16),
]

#: (message, list field, lowest item, highest item) for lists whose items are ranged.
ITEM_RANGES: list[tuple[type[schema.Message], str, float, float]] = [
    (m.Release, "slots", 0, 1023), (m.Welcome, "x_shape", 0, TIB), (m.SourcesRequest, "indices", 0, I63),
]


def _decode(cls: type[schema.Message], **fields: Any) -> schema.Message:
    return schema.decode_fields(cls, {**VALID[cls], **fields}, f"a test {cls.__name__}")


def _below(value: float) -> float:
    return value - 1 if isinstance(value, int) else float(np.nextafter(value, -np.inf))


def _above(value: float) -> float:
    return value + 1 if isinstance(value, int) else float(np.nextafter(value, np.inf))


def _spec_of(cls: type[schema.Message], name: str) -> schema.Spec:
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}[name]  # type: ignore[arg-type]


def _message_classes() -> list[type[schema.Message]]:
    return [c for c in (*vars(m).values(), *vars(wm).values())
            if isinstance(c, type) and issubclass(c, schema.Message) and c is not schema.Message]


@pytest.mark.parametrize(("cls", "name", "lo", "hi"), RANGES, ids=[f"{c.__name__}.{n}" for c, n, _, _ in RANGES])
def test_every_message_number_is_accepted_at_its_documented_ends_and_refused_one_past(
        cls: type[schema.Message], name: str, lo: float, hi: float) -> None:
    for value in (lo, hi):
        assert getattr(_decode(cls, **{name: value}), name) == value
    for value in (_below(lo), _above(hi)):
        with pytest.raises(ProtocolError, match=f"field '{name}' must be between"):
            _decode(cls, **{name: value})


@pytest.mark.parametrize(("cls", "name", "item", "longest"), LENGTHS,
                         ids=[f"{c.__name__}.{n}" for c, n, _, _ in LENGTHS])
def test_every_message_length_is_accepted_at_its_documented_limit_and_refused_one_longer(
        cls: type[schema.Message], name: str, item: Any, longest: int) -> None:
    def value(n: int) -> Any:
        return item * n  # n characters, n bytes, or a list of n items

    assert len(getattr(_decode(cls, **{name: value(longest)}), name)) == longest
    with pytest.raises(ProtocolError, match=f"field '{name}' is longer than"):
        _decode(cls, **{name: value(longest + 1)})


@pytest.mark.parametrize(("cls", "name", "lo", "hi"), ITEM_RANGES, ids=[f"{c.__name__}.{n}" for c, n, _, _ in ITEM_RANGES])
def test_list_items_are_accepted_at_their_documented_ends_and_refused_one_past(
        cls: type[schema.Message], name: str, lo: int, hi: int) -> None:
    assert getattr(_decode(cls, **{name: [lo, hi]}), name) == [lo, hi]
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ProtocolError, match="item must be between"):
            _decode(cls, **{name: [bad]})


def test_the_boundary_tables_cover_every_ranged_field_of_every_message() -> None:
    """A new bounded field must get its written-out range here (the table is the check, not the code)."""
    ranged, lengths, items = set(), set(), set()
    for cls in _message_classes():
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            s = f.metadata["spec"]
            if s.lo is not None or s.hi is not None:
                ranged.add((cls, f.name))
            if s.max_len is not None and f.name != "stats":
                lengths.add((cls, f.name))
            if s.items is not None and (s.items.lo is not None or s.items.hi is not None):
                items.add((cls, f.name))
    assert ranged == {(c, n) for c, n, _, _ in RANGES}
    assert lengths == {(c, n) for c, n, _, _ in LENGTHS}
    assert items == {(c, n) for c, n, _, _ in ITEM_RANGES}
    assert set(VALID) == {c for c in _message_classes() if any(True for _ in dataclasses.fields(c))  # type: ignore[arg-type]
                          } - {m.StatsReply}


def test_text_fields_shown_to_people_refuse_control_characters() -> None:
    for cls, name in [(m.Hello, "client"), (m.Hello, "fingerprint"), (m.Hello, "share"), (m.Welcome, "share"),
                      (m.Welcome, "mode"), (m.Error, "kind"),
                      (wm.Failed, "kind")]:
        assert _spec_of(cls, name).text, (cls, name)
        with pytest.raises(ProtocolError, match="control characters"):
            _decode(cls, **{name: "a\nb"})


def test_a_hellos_arena_key_is_32_lower_case_hex_digits() -> None:
    assert _decode(m.Hello, shm_key="0123456789abcdef" * 2).shm_key == "0123456789abcdef" * 2  # type: ignore[attr-defined]
    for bad in ["A" * 32, "g" * 32, "a" * 31, "a" * 30 + "\n\n", ""]:
        with pytest.raises(ProtocolError, match="shm_key"):
            _decode(m.Hello, shm_key=bad)


# ---------------------------------------------------------------------------- client options
#: (option, last accepted low, first refused low, last accepted high, first refused high)
CLIENT_RANGES = [
    # (no client lives at the 1 ms floor of timeout_s: it must exceed its 50 ms heartbeat floor)
    ("timeout_s", 0.051, 0.0009, 1e6, 1.000001e6),
    ("prefetch", 1, 0, 64, 65),  # the server never holds more than 64 batches of credit
    ("max_message_bytes", 1, 0, TIB, TIB + 1),
    ("seed", 0, -1, I63, I63 + 1),
    ("world_size", 1, 0, 65_536, 65_537),
]


@pytest.mark.parametrize(("name", "lo", "under", "hi", "over"), CLIENT_RANGES, ids=[r[0] for r in CLIENT_RANGES])
def test_client_options_accept_their_documented_ends_and_refuse_one_past(name: str, lo: float, under: float,
                                                                         hi: float, over: float) -> None:
    base: dict[str, Any] = {"timeout_s": 30.0}
    for value in (lo, hi):
        extra = {"rank": value - 1} if name == "world_size" else {}
        assert getattr(ClientOptions(**{**base, name: value, **extra}), name) == value
    for value in (under, over, math.nan, math.inf, -math.inf):  # NaN passes every range comparison
        with pytest.raises(ConfigError, match=f"`{name}`"):
            ClientOptions(**{**base, name: value})


def test_client_name_heartbeat_and_saved_position_limits() -> None:
    assert ClientOptions(name="n" * 128).name == "n" * 128  # "printable text of 1 to 128 characters"
    for bad in ("n" * 129, "", "a\nb"):
        with pytest.raises(ConfigError, match="`name`"):
            ClientOptions(name=bad)
    # The client never pings more often than every 50 ms, and pings below its timeout.
    assert ClientOptions(timeout_s=10, heartbeat_s=0.05).heartbeat_s == 0.05
    with pytest.raises(ConfigError, match="`heartbeat_s`"):
        ClientOptions(timeout_s=10, heartbeat_s=0.049)
    for bad in (10, math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match="`heartbeat_s`"):
            ClientOptions(timeout_s=10, heartbeat_s=bad)
    assert ClientOptions(timeout_s=10, heartbeat_s=9.99).heartbeat_s == 9.99
    assert ClientOptions(timeout_s=0.1).heartbeat_s == 0.05  # a third of 0.1 s is below the floor
    assert ClientOptions(timeout_s=30).heartbeat_s == 1.0  # a third of 30 s is above the 1 s default
    assert ClientOptions(timeout_s=1.5).heartbeat_s == 0.5
    state = {"epoch": I32, "batch": I32, "seed": I63}
    assert ClientOptions(state=state).start().epoch == I32
    for key, bad in (("epoch", I32 + 1), ("batch", I32 + 1), ("seed", I63 + 1), ("epoch", -1)):
        with pytest.raises(ConfigError, match=rf'`state\["{key}"\]`'):
            ClientOptions(state={**state, key: bad})
    assert ClientOptions(rank=65_535, world_size=65_536).rank == 65_535
    for rank, world in ((65_536, 65_536), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match="out of range"):
            ClientOptions(rank=rank, world_size=world)


# ---------------------------------------------------------------------------- server settings
#: (flags of the row, whether they are accepted, what the refusal names): each row beside its neighbour
#: across one documented limit (README's flag table and --help).
SERVER_LIMITS: list[tuple[str, list[str], bool, str]] = [
    ("batch-size 1", ["--batch-size", "1"], True, ""),
    ("batch-size 0", ["--batch-size", "0"], False, "`batch_size` must be >= 1"),
    ("batch-size = samples", ["--batch-size", "10"], True, ""),  # 10 samples, drop-last: one batch
    ("batch-size > samples", ["--batch-size", "11"], False, "`batch_size` 11 is larger than the data set"),
    ("workers 1", ["--workers", "1"], True, ""),
    ("workers 0", ["--workers", "0"], False, "`workers` must be >= 1"),
    ("prefetch 1", ["--prefetch", "1"], True, ""),
    ("prefetch 0", ["--prefetch", "0"], False, "`prefetch` must be >= 1"),
    ("read-threads 0", ["--read-threads", "0"], True, ""),
    ("read-threads -1", ["--read-threads", "-1"], False, "`read_threads` must be >= 0"),
    ("latency 0", ["--simulate-read-latency-ms", "0"], True, ""),
    ("latency < 0", ["--simulate-read-latency-ms", "-0.001"], False, "`simulate_read_latency_ms` must be >= 0"),
    ("size 1x1", ["--size", "1x1"], True, ""),
    ("size 0x1", ["--size", "0x1"], False, "`size` must be between 1x1 and 16384x16384"),
    ("size 1x0", ["--size", "1x0"], False, "`size` must be between 1x1 and 16384x16384"),
    ("size 16384 wide", ["--size", "16384x1"], True, ""),
    ("size 16385 wide", ["--size", "16385x1"], False, "`size` must be between 1x1 and 16384x16384"),
    ("size 16384 high", ["--size", "1x16384"], True, ""),
    ("size 16385 high", ["--size", "1x16385"], False, "`size` must be between 1x1 and 16384x16384"),
    ("pad-value 0", ["--pad-value", "0"], True, ""),
    ("pad-value -1", ["--pad-value", "-1"], False, "`pad_value` must be >= 0, got -1 (its range: 0 to 255)"),
    ("pad-value 255", ["--pad-value", "255"], True, ""),
    ("pad-value 256", ["--pad-value", "256"], False, "`pad_value` must be <= 255, got 256 (its range: 0 to 255)"),
    ("seed 0", ["--seed", "0"], True, ""),
    ("seed -1", ["--seed", "-1"], False, "`seed` must be >= 0, got -1 (its range: 0 to 9223372036854775807)"),
    ("seed 2**63-1", ["--seed", str(I63)], True, ""),
    ("seed 2**63", ["--seed", str(I63 + 1)], False,
     "`seed` must be <= 9223372036854775807, got 9223372036854775808 (its range: 0 to 9223372036854775807)"),
    ("split-seed 0", ["--subset", "val", "--val-fraction", "0.5", "--split-seed", "0"], True, ""),
    ("split-seed -1", ["--subset", "val", "--val-fraction", "0.5", "--split-seed", "-1"], False,
     "`split_seed` must be >= 0, got -1 (its range: 0 to 9223372036854775807)"),
    ("split-seed 2**63-1", ["--subset", "val", "--val-fraction", "0.5", "--split-seed", str(I63)], True, ""),
    ("split-seed 2**63", ["--subset", "val", "--val-fraction", "0.5", "--split-seed", str(I63 + 1)], False,
     "`split_seed` must be <= 9223372036854775807, got 9223372036854775808"),
    # 10 samples: val holds round(10 x F), and each side needs one. 0.05 x 10 = 0.5 rounds up to 1.
    ("val-fraction 0", ["--subset", "train", "--val-fraction", "0"], False, "needs `val_fraction` between 0 and 1"),
    ("val-fraction 1", ["--subset", "train", "--val-fraction", "1"], False, "needs `val_fraction` between 0 and 1"),
    ("val 0.04 of 10", ["--subset", "val", "--val-fraction", "0.04"], False, "gives 0 validation samples"),
    ("val 0.05 of 10", ["--subset", "val", "--val-fraction", "0.05", "--batch-size", "1"], True, ""),
    ("val 0.94 of 10", ["--subset", "train", "--val-fraction", "0.94", "--batch-size", "1"], True, ""),
    ("val 0.95 of 10", ["--subset", "train", "--val-fraction", "0.95"], False, "gives 10 validation samples"),
    ("max-pixels 1", ["--max-pixels", "1"], True, ""),
    ("max-pixels 0", ["--max-pixels", "0"], False, "`max_pixels` must be >= 1"),
    ("max-file-bytes 1", ["--max-file-bytes", "1"], True, ""),
    ("max-file-bytes 0", ["--max-file-bytes", "0"], False, "`max_file_bytes` must be >= 1"),
    ("max-clients 1", ["--max-clients", "1"], True, ""),
    ("max-clients 0", ["--max-clients", "0"], False, "`max_clients` must be >= 1"),
    ("connections 1", ["--max-connections-per-host", "1"], True, ""),
    ("connections 0", ["--max-connections-per-host", "0"], False, "`max_connections_per_host` must be >= 1"),
    ("max-bad 0", ["--max-bad", "0"], True, ""),
    ("max-bad -1", ["--max-bad", "-1"], False, "`max_bad` must be a whole count >= 1 or a fraction in [0, 1)"),
    ("max-bad 0.999", ["--max-bad", "0.999"], True, ""),
    ("max-bad 1", ["--max-bad", "1"], True, ""),
    ("max-bad 1.5", ["--max-bad", "1.5"], False, "`max_bad` must be a whole count >= 1 or a fraction in [0, 1)"),
    ("steps-per-epoch 1", ["--mode", "random", "--steps-per-epoch", "1"], True, ""),
    ("steps-per-epoch 0", ["--mode", "random", "--steps-per-epoch", "0"], False, "`steps_per_epoch` must be >= 1"),
    ("std > 0", ["--dtype", "float32", "--mean", "0,0,0", "--std", "0.001,1,1"], True, ""),
    ("std 0", ["--dtype", "float32", "--mean", "0,0,0", "--std", "0,1,1"], False, "`std` values must be > 0"),
    ("log-interval 0", ["--log-interval-s", "0"], True, ""),
    ("log-interval < 0", ["--log-interval-s", "-0.001"], False, "`log_interval_s` must be >= 0"),
    ("metrics-port 1", ["--metrics-port", "1"], True, ""),
    ("metrics-port 0", ["--metrics-port", "0"], False, "`metrics_port` must be a TCP port (1..65535)"),
    ("metrics-port 65535", ["--metrics-port", "65535"], True, ""),
    ("metrics-port 65536", ["--metrics-port", "65536"], False, "`metrics_port` must be a TCP port (1..65535)"),
    ("batch-timeout 0.01", ["--batch-timeout-s", "0.01"], True, ""),
    ("batch-timeout 0.009", ["--batch-timeout-s", "0.009"], False, "`batch_timeout_s` must be >= 0.01, got 0.009"),
    ("batch-timeout 604800", ["--batch-timeout-s", "604800"], True, ""),
    ("batch-timeout 604801", ["--batch-timeout-s", "604801"], False, "`batch_timeout_s` must be <= 604800, got 604801.0"),
    ("heartbeat 0.01", ["--heartbeat-s", "0.01"], True, ""),
    ("heartbeat 0.009", ["--heartbeat-s", "0.009"], False, "`heartbeat_s` must be >= 0.01, got 0.009"),
    ("heartbeat 3600", ["--heartbeat-s", "3600", "--client-timeout-s", "7200"], True, ""),
    ("heartbeat 3601", ["--heartbeat-s", "3601", "--client-timeout-s", "7200"], False,
     "`heartbeat_s` must be <= 3600, got 3601.0"),
    ("client-timeout just above heartbeat", ["--heartbeat-s", "1", "--client-timeout-s", "1.001"], True, ""),
    ("client-timeout = heartbeat", ["--heartbeat-s", "1", "--client-timeout-s", "1"], False,
     "`client_timeout_s` must be larger than `heartbeat_s`"),
    # --cache-size S: between the output's shorter side and 16384 (here 8x12: from 8).
    ("cache-size = shorter side", ["--size", "8x12", "--augment", "rrc", "--cache-size", "8"], True, ""),
    ("cache-size < shorter side", ["--size", "8x12", "--augment", "rrc", "--cache-size", "7"], False,
     "`cache_size` must be between the output's shorter side (8) and 16384"),
    ("cache-size 16384", ["--size", "8x12", "--augment", "rrc", "--cache-size", "16384"], True, ""),
    ("cache-size 16385", ["--size", "8x12", "--augment", "rrc", "--cache-size", "16385"], False,
     "`cache_size` must be <= 16384, got 16385 (its range: 1 to 16384)"),
    # The README's settings range table ("| setting | range | bounded by |"), both ends of each range.
    ("read-ahead-tasks 0", ["--read-ahead-tasks", "0"], True, ""),
    ("read-ahead-tasks -1", ["--read-ahead-tasks", "-1"], False,
     "`read_ahead_tasks` must be >= 0, got -1 (its range: 0 to 64)"),
    ("read-ahead-tasks 64", ["--read-ahead-tasks", "64"], True, ""),
    ("read-ahead-tasks 65", ["--read-ahead-tasks", "65"], False,
     "`read_ahead_tasks` must be <= 64, got 65 (its range: 0 to 64)"),
    ("read-connections 0", ["--read-connections", "0"], True, ""),
    ("read-connections -1", ["--read-connections", "-1"], False,
     "`read_connections` must be >= 0, got -1 (its range: 0 to 64)"),
    ("read-connections 64", ["--read-connections", "64"], True, ""),
    ("read-connections 65", ["--read-connections", "65"], False,
     "`read_connections` must be <= 64, got 65 (its range: 0 to 64)"),
    ("remote-attempts 1", ["--remote-attempts", "1"], True, ""),
    ("remote-attempts 0", ["--remote-attempts", "0"], False,
     "`remote_attempts` must be >= 1, got 0 (its range: 1 to 100)"),
    ("remote-attempts 100", ["--remote-attempts", "100"], True, ""),
    ("remote-attempts 101", ["--remote-attempts", "101"], False,
     "`remote_attempts` must be <= 100, got 101 (its range: 1 to 100)"),
    ("remote-timeout-s 0.01", ["--remote-timeout-s", "0.01"], True, ""),
    ("remote-timeout-s 0.009", ["--remote-timeout-s", "0.009"], False,
     "`remote_timeout_s` must be >= 0.01, got 0.009 (its range: 0.01 to 86400)"),
    ("remote-timeout-s 86400", ["--remote-timeout-s", "86400"], True, ""),
    ("remote-timeout-s 86401", ["--remote-timeout-s", "86401"], False,
     "`remote_timeout_s` must be <= 86400, got 86401.0 (its range: 0.01 to 86400)"),
    ("remote-inflight-mb 0.01", ["--remote-inflight-mb", "0.01"], True, ""),
    ("remote-inflight-mb 0.009", ["--remote-inflight-mb", "0.009"], False,
     "`remote_inflight_mb` must be >= 0.01, got 0.009 (its range: 0.01 to 1048576)"),
    ("remote-inflight-mb 1048576", ["--remote-inflight-mb", "1048576"], True, ""),
    ("remote-inflight-mb 1048577", ["--remote-inflight-mb", "1048577"], False,
     "`remote_inflight_mb` must be <= 1048576, got 1048577.0 (its range: 0.01 to 1048576)"),
    ("page-cache-mb 0", ["--page-cache-mb", "0"], True, ""),
    ("page-cache-mb -0.001", ["--page-cache-mb", "-0.001"], False,
     "`page_cache_mb` must be >= 0, got -0.001 (its range: 0 to 1048576)"),
    ("page-cache-mb 1048576", ["--page-cache-mb", "1048576"], True, ""),
    ("page-cache-mb 1048577", ["--page-cache-mb", "1048577"], False,
     "`page_cache_mb` must be <= 1048576, got 1048577.0 (its range: 0 to 1048576)"),
    ("remote-recheck-s 0", ["--remote-recheck-s", "0"], True, ""),
    ("remote-recheck-s -0.001", ["--remote-recheck-s", "-0.001"], False,
     "`remote_recheck_s` must be >= 0, got -0.001 (its range: 0 to 604800)"),
    ("remote-recheck-s 604800", ["--remote-recheck-s", "604800"], True, ""),
    ("remote-recheck-s 604801", ["--remote-recheck-s", "604801"], False,
     "`remote_recheck_s` must be <= 604800, got 604801.0 (its range: 0 to 604800)"),
    ("share-window 0", ["--share-window", "0"], True, ""),
    ("share-window -1", ["--share-window", "-1"], False,
     "`share_window` must be >= 0, got -1 (its range: 0 to 1048576)"),
    ("share-window 1048576", ["--share-window", "1048576"], True, ""),
    ("share-window 1048577", ["--share-window", "1048577"], False,
     "`share_window` must be <= 1048576, got 1048577 (its range: 0 to 1048576)"),
    ("workers-min 1", ["--workers", "auto", "--workers-min", "1"], True, ""),
    ("workers-min 0", ["--workers", "auto", "--workers-min", "0"], False,
     "`workers_min` must be >= 1, got 0 (its range: 1 to 1024)"),
    ("workers-min 1024", ["--workers", "auto", "--workers-min", "1024"], True, ""),
    ("workers-min 1025", ["--workers", "auto", "--workers-min", "1025"], False,
     "`workers_min` must be <= 1024, got 1025 (its range: 1 to 1024)"),
    ("workers-max 1", ["--workers", "auto", "--workers-max", "1"], True, ""),
    ("workers-max 0", ["--workers", "auto", "--workers-max", "0"], False,
     "`workers_max` must be >= 1, got 0 (its range: 1 to 1024)"),
    ("workers-max 1024", ["--workers", "auto", "--workers-max", "1024"], True, ""),
    ("workers-max 1025", ["--workers", "auto", "--workers-max", "1025"], False,
     "`workers_max` must be <= 1024, got 1025 (its range: 1 to 1024)"),
    ("workers-min = workers-max", ["--workers", "auto", "--workers-min", "4", "--workers-max", "4"], True, ""),
    ("workers-min > workers-max", ["--workers", "auto", "--workers-min", "5", "--workers-max", "4"], False,
     "`workers_min` 5 is above `workers_max` 4"),
    ("workers-min with fixed workers", ["--workers", "2", "--workers-min", "1"], False,
     "`workers_min` applies to --workers auto only; --workers 2 is fixed"),
    ("scale-interval-s 0.01", ["--scale-interval-s", "0.01"], True, ""),
    ("scale-interval-s 0.009", ["--scale-interval-s", "0.009"], False,
     "`scale_interval_s` must be >= 0.01, got 0.009 (its range: 0.01 to 86400)"),
    ("scale-interval-s 86400", ["--scale-interval-s", "86400"], True, ""),
    ("scale-interval-s 86401", ["--scale-interval-s", "86401"], False,
     "`scale_interval_s` must be <= 86400, got 86401.0 (its range: 0.01 to 86400)"),
    ("target-stall 0.001", ["--target-stall", "0.001"], True, ""),
    ("target-stall 0.0009", ["--target-stall", "0.0009"], False,
     "`target_stall` must be >= 0.001, got 0.0009 (its range: 0.001 to 0.999)"),
    ("target-stall 0.999", ["--target-stall", "0.999"], True, ""),
    ("target-stall 0.9991", ["--target-stall", "0.9991"], False,
     "`target_stall` must be <= 0.999, got 0.9991 (its range: 0.001 to 0.999)"),
    ("max-clients-per-peer 1", ["--max-clients-per-peer", "1"], True, ""),
    ("max-clients-per-peer 0", ["--max-clients-per-peer", "0"], False,
     "`max_clients_per_peer` must be >= 1, got 0 (its range: 1 to 4096)"),
    ("max-clients-per-peer 4096", ["--max-clients-per-peer", "4096"], True, ""),
    ("max-clients-per-peer 4097", ["--max-clients-per-peer", "4097"], False,
     "`max_clients_per_peer` must be <= 4096, got 4097 (its range: 1 to 4096)"),
    ("workers 1024", ["--workers", "1024"], True, ""),
    ("workers 1025", ["--workers", "1025"], False, "`workers` must be <= 1024, got 1025 (its range: 1 to 1024)"),
    ("prefetch 1000", ["--prefetch", "1000"], True, ""),
    ("prefetch 1001", ["--prefetch", "1001"], False, "`prefetch` must be <= 1000, got 1001 (its range: 1 to 1000)"),
    ("read-threads 1024", ["--read-threads", "1024"], True, ""),
    ("read-threads 1025", ["--read-threads", "1025"], False,
     "`read_threads` must be <= 1024, got 1025 (its range: 0 to 1024)"),
    ("max-clients 4096", ["--max-clients", "4096"], True, ""),
    ("max-clients 4097", ["--max-clients", "4097"], False,
     "`max_clients` must be <= 4096, got 4097 (its range: 1 to 4096)"),
    ("connections 65536", ["--max-connections-per-host", "65536"], True, ""),
    ("connections 65537", ["--max-connections-per-host", "65537"], False,
     "`max_connections_per_host` must be <= 65536, got 65537 (its range: 1 to 65536)"),
    ("latency 60000", ["--simulate-read-latency-ms", "60000"], True, ""),
    ("latency 60001", ["--simulate-read-latency-ms", "60001"], False,
     "`simulate_read_latency_ms` must be <= 60000, got 60001.0 (its range: 0 to 60000)"),
    ("log-interval 86400", ["--log-interval-s", "86400"], True, ""),
    ("log-interval 86401", ["--log-interval-s", "86401"], False,
     "`log_interval_s` must be <= 86400, got 86401.0 (its range: 0 to 86400)"),
    ("client-timeout 0.02", ["--heartbeat-s", "0.01", "--client-timeout-s", "0.02"], True, ""),
    ("client-timeout 0.019", ["--heartbeat-s", "0.01", "--client-timeout-s", "0.019"], False,
     "`client_timeout_s` must be >= 0.02, got 0.019 (its range: 0.02 to 604800)"),
    ("client-timeout 604800", ["--client-timeout-s", "604800"], True, ""),
    ("client-timeout 604801", ["--client-timeout-s", "604801"], False,
     "`client_timeout_s` must be <= 604800, got 604801.0 (its range: 0.02 to 604800)"),
    ("steps-per-epoch 2**31-1", ["--mode", "random", "--steps-per-epoch", str(I32)], True, ""),
    ("steps-per-epoch 2**31", ["--mode", "random", "--steps-per-epoch", str(I32 + 1)], False,
     "`steps_per_epoch` must be <= 2147483647, got 2147483648 (its range: 1 to 2147483647)"),
    ("max-pixels 2**40", ["--max-pixels", str(TIB)], True, ""),
    ("max-pixels 2**40+1", ["--max-pixels", str(TIB + 1)], False,
     "`max_pixels` must be <= 1099511627776, got 1099511627777 (its range: 1 to 1099511627776)"),
    ("max-file-bytes 2**40", ["--max-file-bytes", str(TIB)], True, ""),
    ("max-file-bytes 2**40+1", ["--max-file-bytes", str(TIB + 1)], False,
     "`max_file_bytes` must be <= 1099511627776, got 1099511627777 (its range: 1 to 1099511627776)"),
    ("max-message-bytes 2**40", ["--max-message-bytes", str(TIB)], True, ""),
    ("max-message-bytes 2**40+1", ["--max-message-bytes", str(TIB + 1)], False,
     "`max_message_bytes` must be <= 1099511627776, got 1099511627777 (its range: 1 to 1099511627776)"),
    # One batch of 2 x 8x8x3 uint8 is 384 bytes: the largest message must hold it.
    ("max-message-bytes = batch", ["--batch-size", "2", "--size", "8x8", "--max-message-bytes", "384"], True, ""),
    ("max-message-bytes < batch", ["--batch-size", "2", "--size", "8x8", "--max-message-bytes", "383"], False,
     "one batch would be 384 bytes, above `max_message_bytes` (383)"),
]


@pytest.fixture(scope="module")
def ten_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unique_label_list(tmp_path_factory.mktemp("ten"), 10, size=(8, 8))


#: Settings of one data set kind: their rows serve the ten samples as that kind.
KIND_OF_SETTING = {"--page-cache-mb": "parquet"}


@pytest.mark.parametrize(("row", "flags", "accepted", "message"), SERVER_LIMITS, ids=[r[0] for r in SERVER_LIMITS])
def test_server_settings_on_each_side_of_their_documented_limits(
        ten_samples: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, row: str,
        flags: list[str], accepted: bool, message: str) -> None:
    for name in [k for k in __import__("os").environ if k.startswith("LOADER_")]:
        monkeypatch.delenv(name)
    data = str(ten_samples)
    if any(KIND_OF_SETTING.get(flag) == "parquet" for flag in flags):
        from loader_server.data.datasets import load_dataset
        from loader_server.sample_data import write_parquet

        tables = ten_samples.parent / "tables"
        data = str(tables / "train-*.parquet") if tables.exists() else write_parquet(
            load_dataset(ServerConfig(data=data)), tables, 10)
    code = main(["serve", "--data", data, "--batch-size", "2", *flags, "--print-config"])
    out, err = capsys.readouterr()
    if accepted:
        assert code == 0, err
    else:
        assert code == 2 and message in err, (code, err)


# ---------------------------------------------------------------------------- documented defaults
#: Each flag's default as the README's flag table documents it (the number, as a user reads it).
DOCUMENTED_DEFAULTS = {
    "--batch-size": "32", "--size": "224x224", "--seed": "0", "--bind": "tcp://127.0.0.1:5555",
    "--prefetch": "auto", "--mode": "epoch", "--resize": "stretch", "--interpolation": "linear",
    "--pad-value": "0", "--color": "rgb", "--dtype": "uint8", "--layout": "hwc", "--read-threads": "auto",
    "--simulate-read-latency-ms": "0", "--on-error": "raise", "--max-bad": "0.1%", "--max-pixels": "178956970",
    "--batch-timeout-s": "120", "--heartbeat-s": "1", "--client-timeout-s": "30", "--metrics-host": "127.0.0.1",
    "--log-level": "INFO", "--log-format": "text", "--log-interval-s": "30", "--subset": "all",
    "--val-fraction": "0", "--split-seed": "0",
    # The security table: sessions, connections per address, bytes read per file (256 MiB).
    "--max-clients": "64", "--max-connections-per-host": "256", "--max-file-bytes": str(256 * 1024 * 1024),
    "--max-message-bytes": str(1024**3),
}


def _same(shown: str, documented: str) -> bool:
    try:
        return float(shown) == float(documented)
    except ValueError:
        return shown == documented


def test_help_shows_the_documented_default_of_every_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    text = subparser(build_parser(), "serve").format_help()
    shown = {}
    for entry in re.split(r"\n(?=  -)", text):
        flag = re.match(r"\s+(--[a-z-]+)", entry)
        default = re.search(r"\(default: ([^)]*)\)\s*$", " ".join(entry.split()))
        if flag and default:
            shown[flag.group(1)] = default.group(1)
    wrong = {f: (shown.get(f), d) for f, d in DOCUMENTED_DEFAULTS.items() if not _same(shown.get(f, "?"), d)}
    assert not wrong, f"--help default differs from the README's (shown, documented): {wrong}"


# ---------------------------------------------------------------------------- the schema's own rules, written out
@pytest.mark.parametrize(("cls", "fields", "message"), [
    (m.Hello, {"client": 5}, "a test Hello field 'client' must be str or None, got int"),
    (m.Hello, {"rank": "0"}, "a test Hello field 'rank' must be int, got str"),
    (m.Hello, {"rank": True}, "a test Hello field 'rank' must be int, got bool"),
    (m.Hello, {"shm": 1}, "a test Hello field 'shm' must be bool, got int"),
    (m.Welcome, {"shm": [1]}, "a test Welcome field 'shm' must be a map or None, got list"),
    (m.Welcome, {"heartbeat_s": "1"}, "a test Welcome field 'heartbeat_s' must be float, got str"),
    (m.Hello, {"epoch": -1}, "a test Hello field 'epoch' must be between 0 and 2147483647, got -1"),
    (m.Welcome, {"shm": {**_ARENA, "pid": 0}}, "a test Welcome field 'shm' field 'pid' must be between 1 and "
                                               "2147483647, got 0"),
    (m.Hello, {"client": "a\nb"}, "a test Hello field 'client' holds control characters: 'a\\nb'"),
    (m.Hello, {"client": "\n" + "b" * 70}, "a test Hello field 'client' holds control characters: "
                                          "'\\n" + "b" * 57 + "..."),
    (m.Hello, {"client": "\n" + "b" * 56}, "a test Hello field 'client' holds control characters: "
                                          "'\\n" + "b" * 56 + "'"),  # a repr of 60 characters: shown whole
    (m.Hello, {"path": "/etc/passwd"}, "field 'path' is not allowed in a test Hello"),
    (m.Welcome, {"heartbeat_s": float("nan")}, "a test Welcome field 'heartbeat_s' must be a finite number, got nan"),
    (m.Welcome, {"heartbeat_s": float("inf")}, "a test Welcome field 'heartbeat_s' must be a finite number, got inf"),
    (m.Hello, {"shm_key": "X" * 32}, "a test Hello field 'shm_key' must match [0-9a-f]{32}, got '" + "X" * 32 + "'"),
    (m.Credit, {"n": None}, "a test Credit field 'n' must be int, got NoneType"),
])
def test_refusals_name_the_message_the_field_the_rule_and_the_value(cls: type[schema.Message], fields: dict[str, Any],
                                                                    message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _decode(cls, **fields)
    assert str(info.value) == message


def test_a_missing_required_field_and_the_defaults_of_optional_ones_even_from_a_cold_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for cold in (False, True):
        if cold:
            monkeypatch.setattr(schema, "_SPECS", {})  # as in a fresh process
        with pytest.raises(ProtocolError, match="^field 'n' is required in a test Credit$"):
            schema.decode_fields(m.Credit, {}, "a test Credit")
        hello = schema.decode_fields(m.Hello, {}, "a test Hello")
        assert hello == m.Hello(rank=0, world_size=1, epoch=0, batch=0, seed=None, fingerprint=None, credit=0,
                                client=None, shm=False, augment=True, share=None)
        assert schema.decode_fields(wm.Result, {"id": 1, "arrays": [], "build_s": 0.5}, "r").bad == []


def test_an_int_is_taken_for_a_float_and_becomes_one() -> None:
    welcome = _decode(m.Welcome, heartbeat_s=2)
    assert welcome.heartbeat_s == 2.0 and type(welcome.heartbeat_s) is float  # type: ignore[attr-defined]


def test_an_unexpected_message_type_names_what_was_expected() -> None:
    with pytest.raises(ProtocolError) as info:
        schema.decode({"v": 2, "t": "batch"}, m.CLIENT_REQUESTS, "from a test")
    assert str(info.value) == ("unexpected message type 'batch' from a test; expected one of bye, credit, health, "
                               "hello, ping, release, sources, stats")
    with pytest.raises(ProtocolError, match="^a 'credit' message from a test field 'n' must be between 1 and"):
        schema.decode({"v": 2, "t": "credit", "n": 0}, m.CLIENT_REQUESTS, "from a test")


def test_bytes_and_text_survive_the_wire_as_themselves() -> None:
    import msgpack

    task = wm.Task(id=3, indices=np.arange(4, dtype=np.int64).tobytes(), seed=1, epoch=2, augment=True)
    header = msgpack.unpackb(schema.encode(task), raw=False)
    assert isinstance(header["indices"], bytes) and header["t"] == "task" and header["v"] == PROTOCOL_VERSION
    assert schema.decode(header, wm.TO_WORKER, "from a test") == task


def test_spec_and_item_carry_every_rule_into_the_field() -> None:
    nested = schema.spec(dict, type(None), default=None, nested=m.ArenaHandle)
    assert nested.default is None and nested.metadata["spec"] == schema.Spec((dict, type(None)), nested=m.ArenaHandle)
    listed = schema.spec(list, default_factory=list, max_len=5, items=schema.item(int, lo=0, hi=9))
    assert listed.default_factory() == []
    assert listed.metadata["spec"] == schema.Spec((list,), None, None, 5, False, schema.Spec((int,), 0, 9), None)
    plain = schema.spec(str, max_len=8, text=True)
    assert plain.default is dataclasses.MISSING and plain.metadata["spec"] == schema.Spec((str,), max_len=8, text=True)
    ranged = schema.spec(int, default=3, lo=1, hi=4)
    assert ranged.default == 3 and ranged.metadata["spec"] == schema.Spec((int,), 1, 4, None, False, None, None)
    assert schema.item(str, max_len=3, text=True, nested=None) == schema.Spec((str,), None, None, 3, True, None, None)
    assert schema.item(dict, nested=m.ShmRef) == schema.Spec((dict,), nested=m.ShmRef)
    assert schema.item(float, lo=0.5, hi=1.5) == schema.Spec((float,), 0.5, 1.5)
    matched = schema.spec(str, type(None), default=None, max_len=4, pattern="[a-f]{4}")
    assert matched.metadata["spec"] == schema.Spec((str, type(None)), max_len=4, pattern="[a-f]{4}")


def test_wire_text_escapes_bytes_that_are_not_utf8_and_cuts_long_text_in_the_middle() -> None:
    """A file name as a message field (a sources reply, a manifest): at most N characters, never invalid text."""
    assert schema.wire_text("abcdefghij", 10) == "abcdefghij"  # exactly the limit: whole
    assert schema.wire_text("abcdefghij", 9) == "abc...hij"  # 9: the dots and 3 characters on each side
    assert schema.wire_text("abcdefghijk", 8) == "ab...ijk"  # 8: 5 left, the odd one at the end
    assert schema.wire_text("café.jpg", 8) == "café.jpg"  # UTF-8 text is kept as it is
    undecodable = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 name read from a POSIX folder
    assert schema.wire_text(undecodable, 64) == "caf\\xe9.jpg"  # 11 characters once escaped
    assert schema.wire_text(undecodable, 10) == "caf....jpg"  # counted after escaping: cut to 10
