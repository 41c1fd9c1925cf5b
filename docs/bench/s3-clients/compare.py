"""Compare S3 client libraries on range GETs of tar members from a local SeaweedFS.

Usage: python compare.py ENDPOINT CLIENT [--requests N] [--threads T]
CLIENT: boto3 | obstore | s3fs | urllib3-sigv4 | loader (this project's reader, run from the
repository). Prints one JSON line: requests/s, MB/s and CPU
ms per request of this process (the client's own cost: signing, parsing, copying).

The object is one 48 MB "shard" in bucket `bench`, key `shard.tar` (written by the boto3 run
with --setup). Ranges: 25-100 KB at random offsets, the same sequence for every client.

How results.jsonl was made: a store in one shell (`python -m loader_bench.object_store up`,
which prints the AWS_* exports), each candidate in a venv of its own (`python3 -m venv v-X &&
v-X/bin/pip install X numpy`; urllib3-sigv4 runs in the botocore venv), then two alternated
rounds of, for each client, `--threads 1 --requests 300` and `--threads 16 --requests 1000`.
Installed size: the venv's site-packages less that of a venv with numpy alone; import time: the
median of 5 fresh interpreters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

BUCKET, KEY, SIZE = "bench", "shard.tar", 48 << 20


def ranges(n: int) -> list[tuple[int, int]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        size = rng.randint(25_000, 100_000)
        out.append((rng.randrange(0, SIZE - size), size))
    return out


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_boto3(endpoint: str):
    import boto3
    from botocore.config import Config

    local = threading.local()

    def client():
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name="us-east-1",
                config=Config(max_pool_connections=64, retries={"max_attempts": 1}))
        return c

    def get(off: int, size: int) -> bytes:
        r = client().get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={off}-{off + size - 1}")
        return r["Body"].read()

    return get, client


def make_obstore(endpoint: str):
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})

    def get(off: int, size: int) -> bytes:
        return bytes(obstore.get_range(store, KEY, start=off, length=size))

    return get, None


def make_s3fs(endpoint: str):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"})

    def get(off: int, size: int) -> bytes:
        return fs.cat_file(f"{BUCKET}/{KEY}", start=off, end=off + size)

    return get, fs


def make_urllib3(endpoint: str):
    import botocore.session
    import urllib3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    creds = botocore.session.get_session().get_credentials().get_frozen_credentials()
    signer = S3SigV4Auth(creds, "s3", "us-east-1")
    pool = urllib3.PoolManager(maxsize=64)
    url = f"{endpoint}/{BUCKET}/{KEY}"

    def get(off: int, size: int) -> bytes:
        req = AWSRequest("GET", url, headers={"Range": f"bytes={off}-{off + size - 1}"})
        signer.add_auth(req)
        r = pool.request("GET", url, headers=dict(req.headers.items()), preload_content=True)
        assert r.status == 206, r.status
        return r.data

    return get, None


def make_loader(endpoint: str):
    from loader_server.data.remote import RemoteStorage

    storage = RemoteStorage()
    url = f"s3://{BUCKET}/{KEY}"

    def get(off: int, size: int) -> bytes:
        return storage.read_range(url, off, size, str, 0)

    return get, storage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("client")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--setup", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_ENDPOINT_URL", a.endpoint)
    if a.setup:
        import boto3

        c = boto3.client("s3", endpoint_url=a.endpoint)
        try:
            c.create_bucket(Bucket=BUCKET)
        except c.exceptions.ClientError:
            pass
        c.put_object(Bucket=BUCKET, Key=KEY, Body=random.Random(1).randbytes(SIZE))
        return
    started_import = time.perf_counter()
    get, _ = {"boto3": make_boto3, "obstore": make_obstore, "s3fs": make_s3fs,
              "urllib3-sigv4": make_urllib3, "loader": make_loader}[a.client](a.endpoint)
    setup_s = time.perf_counter() - started_import
    work = ranges(a.requests)
    for off, size in work[:20]:  # warm: connections, credentials
        assert len(get(off, size)) == size
    c0, t0 = cpu(), time.perf_counter()
    total = 0
    if a.threads == 1:
        for off, size in work:
            total += len(get(off, size))
    else:
        with ThreadPoolExecutor(a.threads) as pool:
            for data in pool.map(lambda r: get(*r), work):
                total += len(data)
    wall, used = time.perf_counter() - t0, cpu() - c0
    print(json.dumps({"client": a.client, "threads": a.threads, "requests": a.requests,
                      "req_per_s": round(a.requests / wall, 1), "MB_per_s": round(total / wall / 1e6, 1),
                      "cpu_ms_per_req": round(used / a.requests * 1000, 3), "setup_s": round(setup_s, 2),
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
