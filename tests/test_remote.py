"""The object reader's HTTP side against real local HTTP servers (no store needed): framing, retries, errors.

tests/test_s3.py runs everything against a real S3 store; these cover what a store does not
send on demand: chunked and close-delimited bodies, a server that drops the connection, one
that does not answer at all, and the bounds.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from loader_server.data.reading import DecodeError
from loader_server.data.remote import ObjectInfo, RemoteStorage, RetryPolicy, sign_v4

BODY = bytes(range(256)) * 40


def _serve(answer: Callable[[bytes], bytes | None]) -> Iterator[str]:
    """A TCP server that reads one request head at a time and writes `answer(head)` (None: close)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def client(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not stop.is_set():
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                reply = answer(head)
                if reply is None:
                    return
                conn.sendall(reply)
                if b"Connection: close" in reply:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=client, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _range(head: bytes) -> tuple[int, int]:
    line = next(x for x in head.split(b"\r\n") if x.lower().startswith(b"range:"))
    lo, hi = line.split(b"=")[1].split(b"-")
    return int(lo), int(hi)


@pytest.fixture
def framings() -> Iterator[str]:
    """/length, /chunked and /close bodies of the same ranges; HEAD answers the size."""

    def answer(head: bytes) -> bytes:
        method, path = head.split(b" ")[:2]
        if method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"v1\"\r\n\r\n" % len(BODY)
        lo, hi = _range(head)
        part = BODY[lo : hi + 1]
        if path.endswith(b"/chunked"):
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(part[k : k + 700]), part[k : k + 700])
                              for k in range(0, len(part), 700))
            return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
        if path.endswith(b"/close"):
            return b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\n\r\n" + part
        return b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nETag: \"v1\"\r\n\r\n%s" % (len(part), part)

    yield from _serve(answer)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_bodies_of_every_framing_on_one_reused_connection(framings: str, framing: str) -> None:
    storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
    url = f"{framings}/obj/{framing}"
    storage.remember({url: ObjectInfo(len(BODY), '"v1"')})
    for lo, n in [(0, 10), (300, 5000), (9000, 1240)]:
        assert storage.read_range(url, lo, n, str, 0) == BODY[lo : lo + n]
    assert storage.stats()["requests"] == 3  # no retry was needed
    storage.close()


def test_head_gives_size_and_etag(framings: str) -> None:
    storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
    assert storage.head(f"{framings}/obj/length") == ObjectInfo(len(BODY), '"v1"')
    storage.close()


def test_a_server_that_drops_connections_is_retried_then_named_with_the_attempts() -> None:
    seen = []

    def answer(head: bytes) -> bytes | None:
        seen.append(head)
        if len(seen) <= 2:
            return None  # close without an answer
        lo, hi = _range(head)
        return b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n%s" % (hi - lo + 1, BODY[lo : hi + 1])

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=3, base_s=0.01, max_backoff_s=0.05, timeout_s=5))
        url = f"{base}/flaky.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        assert storage.read_range(url, 10, 20, str, 0) == BODY[10:30]  # the third attempt
        seen.clear()
        storage.policy = RetryPolicy(attempts=2, base_s=0.01, max_backoff_s=0.05, timeout_s=5)
        with pytest.raises(DecodeError) as caught:
            storage.read_range(url, 0, 10, lambda i: "flaky.tar:member", 0)
        message = str(caught.value)
        assert message.startswith("flaky.tar:member: ") and url in message and "after 2 attempts" in message
        assert caught.value.code == "unavailable"
        storage.close()


def test_a_silent_server_times_out_in_bounded_time() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/silent.jpg"
        storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=0.5, base_s=0.01, max_backoff_s=0.05))
        storage.remember({url: ObjectInfo(10, "")})
        started = time.monotonic()
        with pytest.raises(DecodeError) as caught:
            storage.read(url)
        assert time.monotonic() - started < 10
        assert "timed out after 0.5 s" in str(caught.value) and "after 2 attempts" in str(caught.value)
        storage.close()
    finally:
        listener.close()


def test_404_is_a_bad_file_not_retried() -> None:
    calls = []

    def answer(head: bytes) -> bytes:
        calls.append(head)
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=5, base_s=0.01))
        with pytest.raises(DecodeError) as caught:
            storage.read(f"{base}/gone.jpg")
        assert caught.value.code == "not_found" and len(calls) == 1
        storage.close()


def test_an_object_over_max_file_bytes_is_refused_before_its_body_is_read(framings: str) -> None:
    storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
    url = f"{framings}/obj/length"
    storage.remember({url: ObjectInfo(len(BODY), '"v1"')})
    with pytest.raises(DecodeError) as caught:
        storage.read(url, max_bytes=100)
    assert caught.value.code == "too_large"
    storage.close()


def test_sigv4_signs_as_botocore_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    headers = sign_v4("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"},
                      "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "token", "us-east-1",
                      now=1369353600.0)  # 2013-05-24, the date of AWS's S3 SigV4 examples
    auth = headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                           "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=")
    assert headers["X-Amz-Date"] == "20130524T000000Z" and headers["X-Amz-Security-Token"] == "token"
    assert headers["Range"] == "bytes=0-9"
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    # botocore signs the same canonical request to the same signature when given the same headers to sign.
    from botocore.config import Config
    from botocore.credentials import Credentials

    request = AWSRequest("GET", "https://examplebucket.s3.amazonaws.com/test.txt")
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})  # UNSIGNED-PAYLOAD, as ours
    signer = S3SigV4Auth(Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "token"),
                         "s3", "us-east-1")
    import datetime

    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC))
    signer.add_auth(request)
    theirs = request.headers["Authorization"]
    assert theirs.split("Signature=")[1] == auth.split("Signature=")[1], (theirs, auth)
