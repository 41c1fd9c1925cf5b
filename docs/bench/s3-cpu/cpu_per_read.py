"""Loader CPU per sample read: tar members on a real S3 store (SeaweedFS) against the same shards on local disk.

What `loader-server bench --extras s3` shows as "loader CPU ms/image" is decode plus read; this
isolates the read. The corpus's images (``--data``, default /work/shared/corpus/train.txt, about
25 KB each) are written as 8 tar shards, put on a SeaweedFS started here on free loopback ports
(stopped after, SIGTERM then SIGKILL after a grace period, its folder removed), and read through
the data set's real byte source (`PackedIndex.read`, what a worker's read step calls):

* ``seq``: one read after the other on this thread, in a shuffled order (as an epoch reads);
* ``ahead``: batches of 64 through the worker's `Reader` (`read_ahead`: 64 read-ahead threads
  for objects; local disk reads inline, as the worker does by default), every future then waited for;
* ``pipeK`` (s3): the same batches through a `Reader` with ``--read-connections K`` (``--pipe``), pipelined;
  checked byte for byte against local disk on 256 reads first;
* ``range``: `RemoteStorage.read_range` alone (no data set), for the s3 rows.

Each row is the median over `--repeat` passes of the CPU this process spent (time.process_time:
every thread) per read, and the wall time per read. The store runs on the last core and this
process on the others (as the benchmark pins them), so the store's CPU is not counted.

    flock /work/bench.lock python docs/bench/s3-cpu/cpu_per_read.py [--profile seq|ahead] [--reads N]

``--profile seq`` prints cProfile's top functions of the sequential s3 reads (``--profile pipe``: of
`RemoteStorage.read_ranges`, 32 ranges a call, on this thread, as one pipelining thread runs them); ``--profile ahead``
runs the read-ahead s3 reads for `--profile-s` seconds for py-spy (``--pyspy PATH``) to sample.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def _measure(fn, order: np.ndarray, repeat: int) -> dict[str, float]:
    cpu, wall, sys_ = [], [], []
    fn(order[:64])  # warm: connections, threads, the store's chunk cache
    for _ in range(repeat):
        c0, w0, t0 = time.process_time(), time.perf_counter(), os.times()
        fn(order)
        t1 = os.times()
        cpu.append((time.process_time() - c0) / len(order) * 1e6)
        wall.append((time.perf_counter() - w0) / len(order) * 1e6)
        sys_.append((t1.system - t0.system) / len(order) * 1e6)
    return {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall),
            "sys_us": statistics.median(sys_), "cpu_us_all": [round(c, 1) for c in cpu]}


def _floor(storage, where):
    """The least a Python range GET can cost here: requests signed and built before the pass, one socket,
    one recv_into per read into a buffer, the head parsed for Content-Length alone (no checks, no retries)."""
    import socket
    import urllib.parse

    from loader_server.data.remote import sign_v4

    s3 = storage._s3_setup()
    frozen = s3["session"].get_credentials().get_frozen_credentials()
    signed: dict[str, bytes] = {}
    requests = []
    for url, off, size in where:
        http_url = storage._http_url(url)
        if http_url not in signed:
            headers = sign_v4("GET", http_url, {}, frozen.access_key, frozen.secret_key, frozen.token, s3["region"])
            parts = urllib.parse.urlsplit(http_url)
            signed[http_url] = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode()
        requests.append(signed[http_url] + f"Range: bytes={off}-{off + size - 1}\r\n\r\n".encode())
    parts = urllib.parse.urlsplit(s3["endpoint"])
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    view = memoryview(buf)

    def run(idx: np.ndarray) -> None:
        for k in range(len(idx)):
            sock.sendall(requests[k])
            have = sock.recv_into(view)
            while (end := buf.find(b"\r\n\r\n", 0, have)) < 0:
                have += sock.recv_into(view[have:])
            at = buf.find(b"\r\ncontent-length: ", 0, end) + 18
            if at < 18:
                at = buf.find(b"\r\nContent-Length: ", 0, end) + 18
            total = end + 4 + int(buf[at : buf.find(b"\r\n", at)])
            while have < total:
                have += sock.recv_into(view[have:])
            bytes(view[end + 4 : total])

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", default="/work/shared/corpus/train.txt")
    ap.add_argument("--reads", type=int, default=2000, help="reads per pass")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", choices=("seq", "ahead", "pipe"), default=None)
    ap.add_argument("--profile-s", type=float, default=20.0)
    ap.add_argument("--pyspy", default="/tmp/pyspy/bin/py-spy")
    ap.add_argument("--pipe", type=int, nargs="*", default=[4, 8],
                    help="--read-connections of the pipelined rows (s3 pipeK)")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="s3 reads through the delaying proxy (then only the ahead and pipe rows)")
    ap.add_argument("--out", default=None, help="append the figures as one JSON line to this file")
    args = ap.parse_args()

    from loader_bench.object_store import start_store
    from loader_server.data.datasets import load_dataset
    from loader_server.data.interface import byte_source
    from loader_server.options import DataOptions, ReadOptions
    from loader_server.pipeline.steps import Reader
    from loader_server.sample_data import write_tar_shards

    scratch = Path(tempfile.mkdtemp(prefix="cpu-per-read-"))
    store = proxy = None
    cores = sorted(os.sched_getaffinity(0))
    try:
        corpus = load_dataset(DataOptions(data=args.data))
        local_data = write_tar_shards(corpus, scratch / "tar", max(1, len(corpus) // 8))
        shards = sorted((scratch / "tar").glob("*.tar"))
        store = start_store(("bench",), root=scratch / "store", options=("-s3.cacheCapacityMB=256",))
        assert store.proc is not None
        if len(cores) > 1:
            _pin(store.proc.pid, {cores[-1]})
            os.sched_setaffinity(0, set(cores[:-1]))
        for shard in shards:
            store.put("bench", f"tar/{shard.name}", shard.read_bytes())
            shard.read_bytes()  # local disk at its best: in the page cache
        if args.delay_ms:  # through the benchmark's delaying proxy, on the store's core
            from loader_bench.latency_proxy import start_proxy

            host, port = store.endpoint.removeprefix("http://").split(":")
            proxy = start_proxy((host, int(port)), args.delay_ms)
            if len(cores) > 1:
                _pin(proxy.proc.pid, {cores[-1]})
            os.environ.update(store.env(proxy.endpoint))
        else:
            os.environ.update(store.env())
        index_dir = str(scratch / "index")
        sets = {"local": load_dataset(DataOptions(data=local_data, index_dir=index_dir)),
                "s3": load_dataset(DataOptions(data="s3://bench/tar/", index_dir=index_dir))}
        n = len(sets["local"])
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(n) for _ in range(-(-args.reads // n))])[: args.reads]
        sizes = np.array([len(byte_source(sets["local"]).read(int(i))) for i in order[:200]])
        print(f"{n} samples, member size mean {sizes.mean() / 1e3:.1f} KB; store on core {cores[-1]}, "
              f"this process on {sorted(os.sched_getaffinity(0))}; load {os.getloadavg()[0]:.2f}", flush=True)

        rows: dict[str, dict[str, float]] = {}
        for name, ds in sets.items():
            src = byte_source(ds)
            reader = Reader(ReadOptions(read_connections=0), ds)  # one read thread per sample

            def seq(idx: np.ndarray, read=src.read) -> None:
                for i in idx:
                    read(int(i))

            def ahead(idx: np.ndarray, reader=reader) -> None:
                for b in range(0, len(idx), 64):
                    batch = idx[b : b + 64]
                    if reader.pool is None:
                        for i in batch:
                            reader.read_inline(int(i))
                        continue
                    futures = [reader.submit(int(i)) for i in batch]
                    for f in futures:
                        f.result()

            if args.profile == "seq" and name == "s3":
                prof = cProfile.Profile(time.thread_time)  # CPU, not the wait for the store
                prof.enable()
                seq(order)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            if args.profile == "pipe" and name == "s3":
                from concurrent.futures import ThreadPoolExecutor

                where = [src.remote_range(int(i)) for i in order]
                got: list[object] = []

                def deliver(k: int, result: object, got: list[object] = got) -> None:
                    got.append(result)

                with ThreadPoolExecutor(4) as retry:
                    src.storage.read_ranges([(u, o, n, src.describe, 0) for _, u, o, n in where[:32]], deliver, retry)
                    prof = cProfile.Profile(time.thread_time)
                    c0 = time.process_time()
                    prof.enable()
                    for b in range(0, len(where), 32):
                        src.storage.read_ranges([(u, o, n, src.describe, 0) for _, u, o, n in where[b : b + 32]],
                                                deliver, retry)
                    prof.disable()
                    print(f"read_ranges: {(time.process_time() - c0) / len(where) * 1e6:.1f} us/read CPU (profiled)")
                assert all(isinstance(r, bytes) for r in got)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            if args.profile == "ahead" and name == "s3":
                deadline = time.monotonic() + args.profile_s + 3
                spy = subprocess.Popen([args.pyspy, "record", "-p", str(os.getpid()), "-d", str(args.profile_s),
                                        "-r", "250", "-f", "raw", "-o", str(scratch / "ahead.txt"), "--threads"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                while time.monotonic() < deadline:
                    ahead(order[:512])
                spy.wait(timeout=60)
                shutil.copy(scratch / "ahead.txt", "/tmp/cpu_per_read_ahead.txt")
                print("py-spy raw stacks: /tmp/cpu_per_read_ahead.txt")
            def versions(idx: np.ndarray, version=src.version) -> None:
                for i in idx:
                    version(int(i))

            if name == "s3":  # the same batches pipelined on K connections per process
                local_src = byte_source(sets["local"])
                for conns in args.pipe:
                    piped = Reader(ReadOptions(read_connections=conns), ds)
                    assert piped.connections == conns
                    check = [int(i) for i in order[:256]]
                    got = [f.result() for f in piped.submit_many(check)]
                    assert got == [local_src.read(i) for i in check], "pipelined reads differ from local disk"

                    def pipe(idx: np.ndarray, reader=piped) -> None:
                        for b in range(0, len(idx), 64):
                            for f in reader.submit_many([int(i) for i in idx[b : b + 64]]):
                                f.result()

                    rows[f"s3 pipe{conns}"] = _measure(pipe, order, args.repeat)
            rows[f"{name} ahead"] = _measure(ahead, order, args.repeat)
            if args.delay_ms:
                continue
            rows[f"{name} version"] = _measure(versions, order, args.repeat)
            rows[f"{name} seq"] = _measure(seq, order, args.repeat)
            if name == "s3":
                storage, files = src.storage, src.files
                pos, span, starts = src.pos, src.span, src.starts
                where = [(files[int(np.searchsorted(starts, i, side="right")) - 1], int(pos[i]), int(span[i]))
                         for i in order]

                def ranges(idx: np.ndarray, storage=storage, where=where) -> None:
                    for k in range(len(idx)):
                        url, off, size = where[k]
                        storage.read_range(url, off, size, str, 0)

                rows["s3 range"] = _measure(ranges, order, args.repeat)
                rows["s3 floor"] = _measure(_floor(storage, where), order, args.repeat)
        print(f"{'read':12} {'CPU us/read':>12} {'of it kernel':>13} {'wall us/read':>13}  each pass (CPU us)")
        for name, row in rows.items():
            print(f"{name:12} {row['cpu_us']:12.1f} {row['sys_us']:13.1f} {row['wall_us']:13.1f}  "
                  f"{row['cpu_us_all']}")
        for mode in ("ahead",) if args.delay_ms else ("seq", "ahead"):
            print(f"s3 - local, {mode}: {rows[f's3 {mode}']['cpu_us'] - rows[f'local {mode}']['cpu_us']:.1f} us/read")
        print(f"load {os.getloadavg()[0]:.2f}")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip(),
                                    "load": os.getloadavg()[0], "rows": rows}) + "\n")
    finally:
        os.sched_setaffinity(0, set(cores))
        if proxy is not None:
            print(f"proxy carried: {proxy.stop()}")
        if store is not None:
            store.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
