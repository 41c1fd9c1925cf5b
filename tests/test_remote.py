"""The object reader's HTTP side against real local HTTP servers (no store needed): framing, retries, errors.

tests/test_s3.py runs everything against a real S3 store; these cover what a store does not
send on demand: chunked and close-delimited bodies, a server that drops the connection, one
that does not answer at all, and the bounds.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loader_client.contract.errors import ConfigError
from loader_server.data.reading import DecodeError
from loader_server.data.remote import ObjectInfo, RemoteStorage, RetryPolicy, sign_v4

BODY = bytes(range(256)) * 40


def _read_head(conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes] | None:
    """(the next request head, the bytes after it) read from `conn` after `buf`; None when it closes first."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _serve(answer: Callable[[bytes], bytes | None], tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A TCP server that reads one request head at a time and writes `answer(head)` (None: close)."""

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        buf = b""
        while not stop.is_set():
            got = _read_head(conn, buf)
            if got is None:
                return
            head, buf = got
            reply = answer(head)
            if reply is None:
                return
            conn.sendall(reply)
            if b"Connection: close" in reply:
                return

    yield from _serve_sockets(handle, tls)


def _serve_sockets(handle: Callable[[socket.socket, threading.Event], None],
                   tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A TCP server on loopback (TLS with `tls`) that runs `handle(connection, stop)` on a thread per connection;
    yields its http(s):// base URL and stops (the handlers see `stop` set) after."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def client(raw: socket.socket) -> None:
        try:
            with raw:
                conn = raw
                if tls is not None:
                    raw.settimeout(10)
                    conn = tls.wrap_socket(raw, server_side=True)
                with conn:
                    handle(conn, stop)
        except OSError:
            pass  # the client went away (or refused the certificate)

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
        yield f"{'https' if tls else 'http'}://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _partial(head: bytes) -> bytes:
    """A 206 answer to the range GET `head`, of BODY, framed by Content-Length."""
    lo, hi = _range(head)
    return (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n%s"
            % (lo, hi, len(BODY), hi - lo + 1, BODY[lo : hi + 1]))


def _said(lo: int, hi: int) -> bytes:
    """The Content-Range line of a 206 answer of bytes lo..hi of BODY (RFC 9110 15.3.7: a 206 of one range has
    one)."""
    return b"Content-Range: bytes %d-%d/%d\r\n" % (lo, hi, len(BODY))


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
            chunks = b"".join(b"%018x ;ext=\"v\"\r\n%s\r\n" % (len(part[k : k + 700]), part[k : k + 700])
                              for k in range(0, len(part), 700))  # leading zeros, a space and an extension
            return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n"
                    + _said(lo, hi) + b"\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
        if path.endswith(b"/close"):
            return b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\n" + _said(lo, hi) + b"\r\n" + part
        return (b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nETag: \"v1\"\r\n%s\r\n%s"
                % (len(part), _said(lo, hi), part))

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


def test_a_head_answer_without_a_size_is_an_error_that_says_so() -> None:
    """A HEAD answer may leave Content-Length out (RFC 9110 9.3.2, where a GET's body is chunked): the object's size
    was then taken as -1, and a tar shard served so was indexed as one that 'holds no samples'."""
    for base in _serve(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"v1\"\r\n\r\n"):
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        with pytest.raises(DecodeError) as caught:
            storage.head(f"{base}/shard-0.tar")
        assert caught.value.path == f"{base}/shard-0.tar" and caught.value.code == "read_failed"
        assert "its HEAD answer has no Content-Length: its size cannot be known" in caught.value.reason
        storage.close()


def piped_ranges(storage: RemoteStorage, url: str, spans: list[tuple[int, int]],
                 describe: Callable[[int], str] = str) -> dict[int, bytes | Exception]:
    """`spans` read with `read_ranges` (what it leaves read on a pool of 4 threads): each answer, delivered once,
    waited for with a deadline."""
    from concurrent.futures import ThreadPoolExecutor

    got: dict[int, bytes | Exception] = {}
    lock = threading.Lock()
    twice: list[int] = []
    arrived = threading.Event()

    def deliver(k: int, result: bytes | Exception) -> None:
        with lock:
            if k in got:
                twice.append(k)
            got[k] = result
            if len(got) == len(spans):
                arrived.set()

    with ThreadPoolExecutor(4) as retry:
        storage.read_ranges([(url, lo, n, describe, k) for k, (lo, n) in enumerate(spans)], deliver, retry)
        assert arrived.wait(60), f"{len(got)} of {len(spans)} answers"
    assert not twice, f"delivered twice: {twice}"
    return got


def single_ranges(storage: RemoteStorage, url: str, spans: list[tuple[int, int]],
                  describe: Callable[[int], str] = str) -> dict[int, bytes | Exception]:
    """`spans` read one after the other with `read_range` (as --read-connections 0 reads): each one's bytes or
    DecodeError, as `piped_ranges` gives them."""
    got: dict[int, bytes | Exception] = {}
    for k, (lo, n) in enumerate(spans):
        try:
            got[k] = storage.read_range(url, lo, n, describe, k)
        except DecodeError as exc:
            got[k] = exc
    return got


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_pipelined_ranges_of_every_framing(framings: str, framing: str) -> None:
    """Ranges sent back to back on one connection, answered in order; after a ``Connection: close`` answer the
    rest is read again (by the retry pool), and that host is read one request per connection from then on."""
    storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
    url = f"{framings}/obj/{framing}"
    storage.remember({url: ObjectInfo(len(BODY), '"v1"')})
    spans = [(0, 10), (300, 5000), (9000, 1240), (17, 1)]
    for _ in range(2):
        assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
    assert storage.stats()["requests"] == (2 * len(spans) if framing != "close" else len(spans) + 3 + len(spans))
    storage.close()


def test_pipelined_ranges_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # https:// trusts the CAs OpenSSL's default paths name

    for base in _serve(_partial, tls=_tls(cert, key)):
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        url = f"{base}/obj.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(k * 211, 100 + k) for k in range(40)]  # two pipelines: 32 and 8
        assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert storage.stats()["requests"] == 40
        storage.close()


def test_pipelined_ranges_left_by_a_drop_or_an_error_status_are_read_again_with_the_retries() -> None:
    """A 503 SlowDown mid-pipeline and a dropped connection: every range delivered once; the 503 counts as its
    first attempt (retried after a backoff on the retry pool), the dropped ones are read again from the first."""
    seen: list[bytes] = []

    def answer(head: bytes) -> bytes | None:
        seen.append(head)
        lo, hi = _range(head)
        if len(seen) == 2:
            body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>"
            return b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        if len(seen) == 4:
            return None  # the connection drops with requests 4 and 5 unanswered
        return _partial(head)

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=3, base_s=0.01, max_backoff_s=0.05, timeout_s=5))
        url = f"{base}/flaky.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(k * 100, 50 + k) for k in range(5)]
        assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert len(seen) == 4 + 3  # (the 5th never reached the server) the 503 and the two dropped ones again
        storage.close()


def test_a_range_failing_in_a_pipeline_gets_the_errors_of_a_single_read() -> None:
    """Every answer 503: the pipelined attempt is the first of --remote-attempts; then the error names the URL,
    the status and the attempts, as `read_range` does; a 404 is not retried; a truncated answer is refused."""
    seen: list[bytes] = []

    def answer(head: bytes) -> bytes:
        seen.append(head)
        lo, hi = _range(head)
        if b"/gone" in head.split(b"\r\n", 1)[0]:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        if b"/short" in head.split(b"\r\n", 1)[0]:
            return b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/10240\r\nContent-Length: 3\r\n\r\nabc" % (
                lo, hi)
        body = b"<Error><Code>SlowDown</Code></Error>"
        return b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=3, base_s=0.01, max_backoff_s=0.05, timeout_s=5))
        for name in ("busy", "gone", "short"):
            storage.remember({f"{base}/{name}.tar": ObjectInfo(len(BODY), "")})
        got = piped_ranges(storage, f"{base}/busy.tar", [(0, 10), (10, 10)], lambda i: f"busy.tar:{i}")
        assert len(seen) == 2 * 3  # two ranges, three attempts each (the first pipelined)
        for k, error in got.items():
            assert isinstance(error, DecodeError) and error.code == "unavailable", error
            message = str(error)
            assert message.startswith(f"busy.tar:{k}: ") and f"{base}/busy.tar" in message, message
            assert "HTTP 503 SlowDown" in message and "after 3 attempts" in message, message
        seen.clear()
        got = piped_ranges(storage, f"{base}/gone.tar", [(0, 10), (10, 10)])
        assert len(seen) == 2 and all(isinstance(e, DecodeError) and e.code == "not_found" for e in got.values())
        got = piped_ranges(storage, f"{base}/short.tar", [(0, 10), (10, 10)])
        assert all(isinstance(e, DecodeError) and e.code == "truncated" for e in got.values()), got
        storage.close()


def test_an_answer_for_another_range_is_refused_and_read_again_alone() -> None:
    """A pipelined answer whose Content-Range is not the range asked: never served; the connection is dropped
    (its later answers are out of step) and the rest read again; a server that always answers another range
    for it is a named error."""
    seen: list[bytes] = []

    def answer(head: bytes) -> bytes:
        seen.append(head)
        lo, hi = _range(head)
        if len(seen) == 2 or b"/wrong" in head.split(b"\r\n", 1)[0]:
            lo, hi = lo + 1, hi + 1  # the bytes of another range, as its length
        return (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/10240\r\nContent-Length: %d\r\n\r\n%s"
                % (lo, hi, hi - lo + 1, BODY[lo : hi + 1]))

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=2, base_s=0.01, max_backoff_s=0.05, timeout_s=5))
        url, wrong = f"{base}/obj.tar", f"{base}/wrong.tar"
        storage.remember({url: ObjectInfo(len(BODY), ""), wrong: ObjectInfo(len(BODY), "")})
        spans = [(k * 100, 50 + k) for k in range(6)]
        assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        got = piped_ranges(storage, wrong, [(0, 10)])
        assert isinstance(got[0], DecodeError) and got[0].code == "read_failed", got
        assert "the server answered 'bytes 1-10/10240'" in str(got[0]), got
        storage.close()


def test_a_host_that_answers_only_the_first_of_a_pipeline_is_read_one_request_per_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    """It closes the connection after the first answer (no Connection: close said): the rest are read again,
    the host is remembered (one log line), and its later reads are one request per connection."""
    seen: list[int] = []

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        got = _read_head(conn)
        if got is None:
            return
        seen.append(1)
        conn.sendall(_partial(got[0]))

    for base in _serve_sockets(handle):
        storage = RemoteStorage(RetryPolicy(attempts=3, base_s=0.01, max_backoff_s=0.05, timeout_s=5))
        url = f"{base}/once.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(k * 100, 50 + k) for k in range(5)]
        with caplog.at_level("WARNING", logger="loader_server"):
            for _ in range(3):
                assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert len(seen) == 3 * 5  # each range answered once
        lines = [r.getMessage() for r in caplog.records if "answered only the first" in r.getMessage()]
        assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
        storage.close()


def test_each_pipelined_answer_has_its_own_deadline_and_a_stalled_one_is_an_error_in_bounded_time() -> None:
    """Answers 0.2 s apart with a 1 s timeout: a pipeline of 10 (2 s in all) completes, as no answer took over
    1 s. A server that stops answering after the second: the rest time out, are retried, then fail naming the
    timeout and the attempts (every wait here has its deadline)."""
    stall, released = threading.Event(), threading.Event()
    answers_left = [2]  # once stalled: two more answers, then none on any connection

    def answer(head: bytes) -> bytes | None:
        if stall.is_set():
            if answers_left[0] <= 0:
                released.wait(30)  # holds the connection, never answers
                return None
            answers_left[0] -= 1
        else:
            time.sleep(0.2)
        return _partial(head)

    for base in _serve(answer):
        storage = RemoteStorage(RetryPolicy(attempts=2, base_s=0.01, max_backoff_s=0.05, timeout_s=1))
        url = f"{base}/slow.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(k * 100, 50 + k) for k in range(10)]
        assert piped_ranges(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert storage.stats()["requests"] == 10
        stall.set()
        storage.close()
        storage.policy = RetryPolicy(attempts=2, base_s=0.01, max_backoff_s=0.05, timeout_s=0.5)
        got = piped_ranges(storage, url, spans[:4])
        assert got[0] == BODY[0:50] and got[1] == BODY[100:151]
        for k in (2, 3):
            error = got[k]
            assert isinstance(error, DecodeError) and error.code == "unavailable", error
            assert "timed out after 0.5 s" in str(error) and "after 2 attempts" in str(error), error
        storage.close()
        released.set()


def test_a_server_that_drops_connections_is_retried_then_named_with_the_attempts() -> None:
    seen = []

    def answer(head: bytes) -> bytes | None:
        seen.append(head)
        if len(seen) <= 2:
            return None  # close without an answer
        return _partial(head)

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


# ---------------------------------------------------------------------------- a bad store
GOOD_0_9 = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10240\r\nContent-Length: 10\r\n\r\n" + BODY[:10]
MALFORMED = {
    "negative length": b"HTTP/1.1 206 Partial Content\r\nContent-Length: -5\r\n\r\n",
    "length not a number": b"HTTP/1.1 206 Partial Content\r\nContent-Length: 1e3\r\n\r\n",
    "negative chunk": b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk longer than said": b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
    "status not digits": b"HTTP/1.1 2O6 Partial Content\r\nContent-Length: 10\r\n\r\n0123456789",
    "header without a colon": b"HTTP/1.1 206 Partial Content\r\nContent-Length 10\r\n\r\n0123456789",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "chunked in HTTP/1.0": b"HTTP/1.0 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
    "endless interim answers": b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 206 Partial Content\r\n"
                               b"Content-Length: 10\r\n\r\n0123456789",
    "endless trailers": b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n"
                        + b"X-T: 1\r\n" * 101 + b"\r\n",
    # A 101 to a request that asked for no upgrade (RFC 9110 15.2.2): after it the connection is not HTTP; a reader
    # that took it as a final answer kept the connection and read what followed as the next answer.
    "switching protocols unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                                   b"Content-Length: 0\r\n\r\n" + GOOD_0_9,
    # Status codes are 100..599 (RFC 9110 15): one below 100 was skipped as an interim answer, one over 599 retried.
    "a status below 100": b"HTTP/1.1 099 Early\r\n\r\n" + GOOD_0_9,
    "a status over 599": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "a CR in the reason phrase": b"HTTP/1.1 206 Partial\rContent\r\nContent-Range: bytes 0-9/10240\r\n"
                                 b"Content-Length: 10\r\n\r\n0123456789",
    # A chunk line or a trailer with a bare LF (or CR) reads as two lines to a reader that ends lines there: the
    # chunk's size differs between them, and what one takes as data the other takes as the next answer.
    "an LF in a chunk extension": b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10240\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\na;x\n5\r\n0123456789\r\n0\r\n\r\n",
    "whitespace before a chunk size": b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10240\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n a\r\n0123456789\r\n0\r\n\r\n",
    "an LF in a trailer": b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10240\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\nX-T: 1\nX-U: 2\r\n\r\n",
    # An interim answer's head is read by the same rules as the answer's.
    "a malformed interim head": b"HTTP/1.1 103 Early Hints\r\nLink : </a>\r\n\r\n" + GOOD_0_9,
}
#: Cases of MALFORMED refused before or without a status of 206.
NOT_206 = {"status not digits", "not HTTP", "endless interim answers", "switching protocols unasked",
           "a status below 100", "a status over 599", "a CR in the reason phrase", "a malformed interim head"}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_response_is_a_named_error_retried_on_a_new_connection(case: str) -> None:
    connections: list[int] = []
    requests: list[bytes] = []

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        connections.append(1)
        got = _read_head(conn)
        if got is None:
            return
        requests.append(got[0])
        conn.sendall(MALFORMED[case])
        conn.settimeout(10)
        while conn.recv(65536):  # until the reader closes its side: it must not reuse this connection
            pass

    for base in _serve_sockets(handle):
        storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
        url = f"{base}/bad/{case.replace(' ', '-')}.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        with pytest.raises(DecodeError) as caught:
            storage.read_range(url, 0, 10, lambda i: "bad.tar:member", 0)
        message = str(caught.value)
        assert message.startswith("bad.tar:member: ") and url in message, message
        assert "after 2 attempts" in message and "a malformed response" in message, message
        if case not in NOT_206:
            assert "HTTP 206" in message, message  # the status, where the answer had one
        assert caught.value.code == "unavailable"
        assert len(requests) == 2 and len(connections) == 2  # retried, each on a connection of its own
        storage.close()


#: Answers RFC 9112 forbids, each framed so that a reader that took it would serve wrong bytes or read the next
#: answer out of step (a smuggled one): (the head's fields and body, with {lo}/{hi} the range asked; what the
#: error says). The one header reader (`remote._fields`) refuses each, for a single and a pipelined read alike.
REFUSED = {
    "two different lengths": (b"Content-Length: 10\r\nContent-Length: 11\r\n\r\n0123456789X",
                              "Content-Length with different values '10, 11'"),
    "a list of two lengths": (b"Content-Length: 10, 4\r\n\r\n0123456789", "Content-Length with different values"),
    "two content ranges": (b"Content-Range: bytes {lo}-{hi}/10240\r\nContent-Range: bytes 0-9/10240\r\n"
                           b"Content-Length: 10\r\n\r\n0123456789", "Content-Range twice"),
    "chunked and a length": (b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
                             "both Transfer-Encoding and Content-Length"),
    "a length and chunked": (b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
                             "both Transfer-Encoding and Content-Length"),
    "a coding other than chunked": (b"Transfer-Encoding: gzip, chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
                                    "Transfer-Encoding 'gzip, chunked': this reader takes chunked alone"),
    "gzip alone with a length": (b"Transfer-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789",
                                 "Transfer-Encoding 'gzip'"),
    "chunked twice": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
                      "Transfer-Encoding 'chunked, chunked'"),
    "a space before the colon": (b"Content-Length : 10\r\n\r\n0123456789",
                                 "'Content-Length : 10': whitespace between the field name and its colon"),
    "a tab before the colon": (b"Content-Range\t: bytes {lo}-{hi}/10240\r\nContent-Length: 10\r\n\r\n0123456789",
                               "whitespace between the field name and its colon"),
    "whitespace before the first line": (b" X-Note: a\r\nContent-Length: 10\r\n\r\n0123456789",
                                         "whitespace before the first header line ' X-Note: a"),
    "a folded length of two numbers": (b"Content-Length: 10\r\n 11\r\n\r\n0123456789X",
                                       "Content-Length '10 11' is not a byte count"),
    "a fold that hides a bare CR": (b"X-Note: a\r\n b\rc\r\nContent-Length: 10\r\n\r\n0123456789",
                                    "a CR, LF or NUL in the value"),
    "a bare LF in a line": (b"Content-Length: 10\nX-A: b\r\n\r\n0123456789", "a CR, LF or NUL in the value"),
    "a NUL in a value": (b"Content-Length: 10\r\nX-A: b\x00c\r\n\r\n0123456789", "a CR, LF or NUL in the value"),
    "a bare CR in a value": (b"X-A: b\rc\r\nContent-Length: 10\r\n\r\n0123456789", "a CR, LF or NUL in the value"),
    "a CR before the line end": (b"Content-Length: 10\r\r\n\r\n0123456789", "a CR, LF or NUL in the value"),
    "a name that is not a token": (b"Content Length: 10\r\n\r\n0123456789", "a field name that is not a token"),
    "over 100 header lines": (b"X-A: 1\r\n" * 100 + b"Content-Length: 10\r\n\r\n0123456789",
                              "over 100 header lines"),
}
#: What RFC 9110/9112 let a reader take, said unusually: read as the same bytes.
ACCEPTED = {
    "identical duplicate lengths": b"Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n",
    "a list of one length": b"Content-Length: {n}, {n}\r\n\r\n",
    "names and units in any case": b"content-LENGTH: {n}\r\nCONTENT-RANGE: Bytes {lo}-{hi}/10240\r\n\r\n",
    "whitespace around values": b"Content-Length: \t {n} \t\r\nX-Empty:\r\nX-A:b\r\n\r\n",
    "100 header lines": b"X-A: 1\r\n" * 98 + b"Content-Range: bytes {lo}-{hi}/10240\r\nContent-Length: {n}\r\n\r\n",
    "an obs-fold line (a space, RFC 9112 5.2)": b"Content-Length: {n}\r\nX-Note: a\r\n  folded\r\n\r\n",
    "a folded length": b"Content-Length:\r\n\t{n}\r\n\r\n",
}


def _unusual_server(case: str) -> Iterator[str]:
    """Answers the range at offset 0 well and every other one as REFUSED[case] (or MALFORMED[case]; ACCEPTED[case]
    answers every range, well)."""

    def answer(head: bytes) -> bytes:
        lo, hi = _range(head)
        fill = {b"{lo}": b"%d" % lo, b"{hi}": b"%d" % hi, b"{n}": b"%d" % (hi - lo + 1)}
        if case in ACCEPTED:
            fields = ACCEPTED[case]
            for key, value in fill.items():
                fields = fields.replace(key, value)
            said = b"" if b"content-range:" in fields.lower() else _said(lo, hi)
            return b"HTTP/1.1 206 Partial Content\r\n" + said + fields + BODY[lo : hi + 1]
        if lo == 0:
            return (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/10240\r\nContent-Length: %d\r\n\r\n%s"
                    % (lo, hi, hi - lo + 1, BODY[lo : hi + 1]))
        if case in MALFORMED:
            return MALFORMED[case]
        fields = REFUSED[case][0]
        for key, value in fill.items():
            fields = fields.replace(key, value)
        return b"HTTP/1.1 206 Partial Content\r\n" + fields

    yield from _serve(answer)


@pytest.mark.parametrize("case", sorted(REFUSED) + sorted(MALFORMED))
def test_an_answer_rfc_9112_forbids_is_refused_alike_by_a_single_and_a_pipelined_read(case: str) -> None:
    """A single read (`read_range`, as --read-connections 0 reads) and a pipelined one (`read_ranges`, as
    --read-connections K >= 1 reads: the refused answer's range, its first attempt failed, and the one after it,
    never answered, handed to the read pool) end with the same error: a malformed response, named, retried,
    with the URL and the attempts; never a byte of the refused answer. The good answer before it is served."""
    for base in _unusual_server(case):
        url = f"{base}/unusual.tar"
        spans = [(0, 10), (10, 10), (20, 10)]
        describe = "unusual.tar:{}".format
        said: dict[str, list[str]] = {}
        for how in ("single", "pipelined"):
            storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
            storage.remember({url: ObjectInfo(len(BODY), "")})
            got = (single_ranges if how == "single" else piped_ranges)(storage, url, spans, describe)
            storage.close()
            assert got[0] == BODY[:10], (how, got[0])
            for k in (1, 2):
                error = got[k]
                assert isinstance(error, DecodeError) and error.code == "unavailable", (how, k, error)
                message = str(error)
                assert message.startswith(f"unusual.tar:{k}: ") and url in message, message
                assert "after 2 attempts in " in message and " a malformed response: " in message, message
                if case in REFUSED:
                    assert "HTTP 206 a malformed response: " in message and REFUSED[case][1] in message, message
                said.setdefault(how, []).append(re.sub(r" in [0-9.]+ s:", "", message))
        assert said["single"] == said["pipelined"]


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_an_unusual_answer_rfc_9112_allows_is_read_by_a_single_and_a_pipelined_read(case: str) -> None:
    for base in _unusual_server(case):
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        url = f"{base}/unusual.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(0, 10), (10, 300), (5000, 17)]
        want = {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert single_ranges(storage, url, spans) == want and piped_ranges(storage, url, spans) == want
        assert storage.stats()["requests"] == 2 * len(spans)  # no retry: every answer was taken
        storage.close()


def test_connection_close_among_other_options_closes_the_connection() -> None:
    """``Connection: keep-alive, close`` (a list: RFC 9110 7.6.1) ends the connection after the answer, for a single
    and a pipelined read: this server answers one request per connection and then holds it without a word, so a
    reader that kept the connection would time out."""
    connections: list[int] = []

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        connections.append(1)
        got = _read_head(conn)
        if got is None:
            return
        lo, hi = _range(got[0])
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nConnection: keep-alive\r\nConnection: Keep-Alive, Close\r\n"
                     b"Content-Length: %d\r\n%s\r\n%s" % (hi - lo + 1, _said(lo, hi), BODY[lo : hi + 1]))
        stop.wait(30)

    for base in _serve_sockets(handle):
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=2))
        url = f"{base}/once.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        spans = [(0, 10), (100, 20), (300, 30)]
        want = {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert single_ranges(storage, url, spans) == want
        assert len(connections) == 3
        assert piped_ranges(storage, url, spans) == want
        assert len(connections) == 6  # the pipeline's first answer closed it: the others read again, alone
        storage.close()


def test_an_error_answer_with_a_large_chunked_body_is_its_status_not_a_file_too_large() -> None:
    """A 503 whose chunked body is over the 64 KB read of an error body: the attempt failed with that status (retried,
    then 'unavailable'), as for the same body framed by Content-Length; it was the object's error `too_large`
    ('object of 70000 bytes exceeds --max-file-bytes 10'), not retried, and the bad-file policy applied."""
    def answer(head: bytes) -> bytes:
        body = b"<Error><Code>SlowDown</Code></Error>" + b" " * 70000
        return b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)

    for base in _serve(answer):
        url = f"{base}/busy.tar"
        for how in (single_ranges, piped_ranges):
            storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
            storage.remember({url: ObjectInfo(len(BODY), "")})
            got = how(storage, url, [(0, 10), (10, 10)])
            storage.close()
            for error in got.values():
                assert isinstance(error, DecodeError) and error.code == "unavailable", (how, error)
                assert "HTTP 503 " in str(error) and "after 2 attempts" in str(error), error


def test_a_206_without_content_range_is_never_served() -> None:
    """RFC 9110 15.3.7: a 206 of one range says which range it holds. Without Content-Range, an answer out of step
    (another range's bytes, of the length asked) could not be told from the right one and was served."""
    for base in _serve(lambda head: b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n%s" % (
            _range(head)[1] - _range(head)[0] + 1, BODY[_range(head)[0] + 1 : _range(head)[1] + 2])):
        url = f"{base}/shifted.tar"
        for how in (single_ranges, piped_ranges):
            storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
            storage.remember({url: ObjectInfo(len(BODY), "")})
            got = how(storage, url, [(0, 10), (10, 10), (100, 5)])
            storage.close()
            for k, error in got.items():
                assert isinstance(error, DecodeError) and error.code == "read_failed", (how, k, error)
                assert "the server answered a 206 without Content-Range" in str(error), error


def test_bytes_no_request_asked_for_are_never_read_as_the_next_answer() -> None:
    """Bytes a server sends after an answer, unasked (a HEAD answered with a body, which RFC 9112 6.3 says is no
    body of the answer; a whole answer sent ahead, for a range not asked yet), are dropped with the connection
    before the next request: they were read as that request's answer (an error, or another answer's bytes)."""

    def answer(head: bytes) -> bytes:
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"X" * 20  # a body after a HEAD's answer
        lo, hi = _range(head)
        ahead = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/10240\r\nContent-Length: 10\r\n\r\n"
                 % (hi + 1, hi + 10) + b"Y" * 10) if lo == 0 else b""
        return _partial(head) + ahead  # (one send: it arrives with the answer)

    for base in _serve(answer):
        url = f"{base}/ahead.tar"
        for how in (single_ranges, piped_ranges):
            storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
            assert storage.head(url).size == 20
            storage.remember({url: ObjectInfo(len(BODY), "")})
            for lo in (0, 10):  # one at a time: the answer sent ahead of the second is in the buffer by then
                assert how(storage, url, [(lo, 10)]) == {0: BODY[lo : lo + 10]}, how
            storage.close()


def test_a_server_that_ignores_range_is_said_so_not_a_file_over_max_file_bytes() -> None:
    """A server that answers a range request with the whole object (200, RFC 9110 14.2 lets it): a range shorter
    than the object is an error that says so; it said 'object of 10240 bytes exceeds --max-file-bytes 10', which
    no --max-file-bytes fixes. A range of the whole object is served from it."""
    for base in _serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)):
        url = f"{base}/whole.tar"
        for how in (single_ranges, piped_ranges):
            storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
            storage.remember({url: ObjectInfo(len(BODY), "")})
            got = how(storage, url, [(0, 10), (100, 20), (0, len(BODY))])
            assert got[2] == BODY, how
            for k in (0, 1):
                error = got[k]
                assert isinstance(error, DecodeError) and error.code == "read_failed", (how, error)
                assert f"asked for a range of {(10, 20)[k]} bytes, the server answered HTTP 200 with {len(BODY)} " \
                       "bytes: it ignores Range requests" in str(error), error
                assert "--max-file-bytes" not in str(error), error
            storage.close()


def test_pipelined_answers_split_at_every_byte_are_read_the_same() -> None:
    """Three pipelined answers (an interim answer, chunks with an extension and trailers, an obs-fold, lengths), sent
    in two parts split at each of their byte boundaries, then one byte at a time: every range is read right, in one
    pipeline (no request made again), whatever the reader had received when it parsed."""
    spans = [(0, 10), (100, 37), (1000, 5)]
    answers = []
    for k, (lo, n) in enumerate(spans):
        part, said = BODY[lo : lo + n], _said(lo, lo + n - 1)
        if k == 0:
            answers.append(b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\nHTTP/1.1 206 Partial Content\r\nTransfer-Encoding: "
                           b"chunked\r\n" + said + b"\r\n3;a=b\r\n" + part[:3] + b"\r\n%x\r\n" % (n - 3) + part[3:]
                           + b"\r\n0\r\nT: 1\r\n\r\n")
        else:
            answers.append(b"HTTP/1.1 206 Partial Content\r\nX-F: a\r\n b\r\n" + said
                           + b"Content-Length: %d\r\n\r\n" % n + part)
    stream = b"".join(answers)
    cuts = [[stream[:k], stream[k:]] for k in range(1, len(stream))] + [[stream[k : k + 1] for k in range(len(stream))]]
    cut: list[list[bytes]] = []

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for _ in spans:  # the whole pipeline first
            got = _read_head(conn, buf)
            if got is None:
                return
            buf = got[1]
        for piece in cut[0]:
            conn.sendall(piece)
            time.sleep(0.0005)  # (pacing only: a reader that parses what it has must meet each split)
        conn.settimeout(10)
        while conn.recv(65536):
            pass

    for base in _serve_sockets(handle):
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=10))
        url = f"{base}/split.tar"
        storage.remember({url: ObjectInfo(len(BODY), "")})
        want = {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        for pieces in cuts:
            cut[:] = [pieces]
            assert piped_ranges(storage, url, spans) == want, [len(p) for p in pieces]
            storage.close()  # the next split on a connection of its own
        assert storage.stats()["requests"] == len(spans) * len(cuts)


def test_a_server_that_drips_bytes_is_cut_off_at_the_attempts_deadline() -> None:
    """--remote-timeout-s bounds a whole attempt: a byte every 0.2 s (each socket read well inside 1 s) would
    take 40 s for this body; the read fails once its 1 s attempts are spent, and says so."""
    dripped: list[int] = []

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        if _read_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 200\r\n" + _said(0, 199) + b"\r\n")
        for k in range(200):
            if stop.is_set():
                return
            conn.sendall(BODY[k : k + 1])
            dripped.append(k)
            time.sleep(0.2)

    for base in _serve_sockets(handle):
        storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=1, base_s=0.01, max_backoff_s=0.05))
        url = f"{base}/drip.jpg"
        storage.remember({url: ObjectInfo(200, "")})
        with pytest.raises(DecodeError) as caught:
            storage.read_range(url, 0, 200, lambda i: "drip.jpg", 0)
        message = str(caught.value)
        assert "timed out after 1 s" in message and "after 2 attempts" in message, message
        assert len(dripped) < 2 * 200  # neither attempt was let run to its end
        storage.close()


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made with the openssl tool."""
    cert, key = folder / "ca.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def _tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _s3_answer(seen: list[str]) -> Callable[[bytes], bytes]:
    """A minimal S3: ListObjectsV2 of bucket `bkt` (one object, d/x.bin) and range GETs of it."""

    def answer(head: bytes) -> bytes:
        line = head.split(b"\r\n", 1)[0].decode()
        seen.append(line)
        target = line.split(" ")[1]
        if "list-type=2" in target:
            body = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name><Prefix>d/</Prefix>'
                    b"<KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents>"
                    b'<Key>d/x.bin</Key><Size>%d</Size><ETag>"v1"</ETag></Contents></ListBucketResult>' % len(BODY))
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(body),
                                                                                                      body)
        lo, hi = _range(head)
        return b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nETag: \"v1\"\r\n%s\r\n%s" % (
            hi - lo + 1, _said(lo, hi), BODY[lo : hi + 1])

    return answer


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Only the AWS settings a test sets: keys, a region, no config files, no proxies."""
    for name in [k for k in os.environ if k.startswith("AWS_") or k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_s3_reads_trust_the_ca_bundle_the_listings_trust(aws: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AWS_CA_BUNDLE (a private CA, as in a company's store) is used for the range GETs too, not only by
    botocore for the listings; a bundle that does not trust the store is a named TLS error."""
    cert, key = _certificate(tmp_path)
    seen: list[str] = []
    for base in _serve(_s3_answer(seen), tls=_tls(cert, key)):
        aws.setenv("AWS_ENDPOINT_URL", base)
        aws.setenv("AWS_CA_BUNDLE", str(cert))
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        assert storage.list("s3://bkt/d/") == {"s3://bkt/d/x.bin": ObjectInfo(len(BODY), '"v1"')}  # botocore
        assert storage.read_range("s3://bkt/d/x.bin", 100, 50, str, 0) == BODY[100:150]  # this reader
        assert seen[-1].startswith("GET /bkt/d/x.bin ")
        storage.close()
        aws.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")  # the public CAs only
        other = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        other.remember({"s3://bkt/d/x.bin": ObjectInfo(len(BODY), '"v1"')})
        with pytest.raises(DecodeError) as caught:
            other.read_range("s3://bkt/d/x.bin", 0, 10, str, 0)
        assert "certificate" in str(caught.value) and "AWS_CA_BUNDLE" in str(caught.value), str(caught.value)
        other.close()


def test_https_through_an_http_proxy_tunnel_as_botocore_goes(aws: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HTTPS_PROXY: the listing (botocore) and the range GETs (this reader) both go through the proxy's
    CONNECT tunnel, with the proxy's credentials; NO_PROXY names hosts reached directly."""
    cert, key = _certificate(tmp_path)
    tls = _tls(cert, key)
    tunnels: list[bytes] = []
    seen: list[str] = []
    answer = _s3_answer(seen)

    def proxy(conn: socket.socket, stop: threading.Event) -> None:
        got = _read_head(conn)
        if got is None:
            return
        tunnels.append(got[0] + b"\r\n\r\n")
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with tls.wrap_socket(conn, server_side=True) as inner:  # the proxy is the store too: the tunnel's far end
            buf = b""
            while (got := _read_head(inner, buf)) is not None:
                head, buf = got
                inner.sendall(answer(head))

    for base in _serve_sockets(proxy):
        port = base.rsplit(":", 1)[1]
        aws.setenv("AWS_ENDPOINT_URL", "https://127.0.0.1:9")  # nothing listens there: only the tunnel reaches it
        aws.setenv("AWS_CA_BUNDLE", str(cert))
        aws.setenv("HTTPS_PROXY", f"http://user:pa%40ss@127.0.0.1:{port}")
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        assert list(storage.list("s3://bkt/d/")) == ["s3://bkt/d/x.bin"]
        assert storage.read_range("s3://bkt/d/x.bin", 7, 9, str, 0) == BODY[7:16]
        assert len(tunnels) == 2 and all(t.startswith(b"CONNECT 127.0.0.1:9 HTTP/1.") for t in tunnels)
        assert b"Proxy-Authorization: Basic dXNlcjpwYUBzcw==" in tunnels[1]  # user:pa@ss, from this reader
        storage.close()
        aws.setenv("NO_PROXY", "127.0.0.1")
        direct = RemoteStorage(RetryPolicy(attempts=1, timeout_s=2, base_s=0.01))
        direct.remember({"s3://bkt/d/x.bin": ObjectInfo(len(BODY), '"v1"')})
        with pytest.raises(DecodeError, match="ConnectionRefusedError"):
            direct.read_range("s3://bkt/d/x.bin", 0, 10, str, 0)  # straight to port 9, past the proxy
        assert len(tunnels) == 2
        direct.close()


def test_plain_http_through_a_proxy_and_a_proxy_this_reader_cannot_use(aws: pytest.MonkeyPatch) -> None:
    lines: list[bytes] = []

    def answer(head: bytes) -> bytes:
        lines.append(head.split(b"\r\n", 1)[0])
        return _partial(head)

    for base in _serve(answer):
        aws.setenv("HTTP_PROXY", base)
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        url = "http://images.example.invalid:8080/train/1.jpg"  # resolved by the proxy, never here
        storage.remember({url: ObjectInfo(len(BODY), "")})
        assert storage.read_range(url, 3, 4, str, 0) == BODY[3:7]
        assert lines == [b"GET http://images.example.invalid:8080/train/1.jpg HTTP/1.1"]
        storage.close()
    aws.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    aws.setenv("AWS_ENDPOINT_URL", "https://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY is 'socks5://127.0.0.1:1080': objects are read through an "
                                          r"http:// proxy only .* or add 127.0.0.1 to NO_PROXY"):
        RemoteStorage().list("s3://bkt/d/")  # at start: opening a data set lists or reads before any worker


@pytest.mark.parametrize(("style", "endpoint", "expected"), [
    ("virtual", "http://store.example.invalid:9000", "http://bkt.store.example.invalid:9000/d/x.bin"),
    ("path", "http://s3.us-east-1.amazonaws.com", "http://s3.us-east-1.amazonaws.com/bkt/d/x.bin"),
    ("auto", "http://s3.us-east-1.amazonaws.com", "http://bkt.s3.us-east-1.amazonaws.com/d/x.bin"),
    ("auto", "http://store.example.invalid:9000", "http://store.example.invalid:9000/bkt/d/x.bin"),
])
def test_the_profiles_s3_addressing_style_is_the_style_of_the_reads(aws: pytest.MonkeyPatch, tmp_path: Path,
                                                                    style: str, endpoint: str, expected: str) -> None:
    """``s3 = addressing_style = ...`` in the AWS config decides where the GETs go, as it does for botocore's
    listings (seen through a proxy, which gets every request in absolute form: no name is resolved here)."""
    lines: list[bytes] = []

    def answer(head: bytes) -> bytes:
        lines.append(head.split(b"\r\n", 1)[0])
        return _partial(head)

    (tmp_path / "config").write_text(f"[default]\ns3 =\n    addressing_style = {style}\n")
    aws.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    aws.setenv("AWS_ENDPOINT_URL", endpoint)
    for base in _serve(answer):
        aws.setenv("HTTP_PROXY", base)
        storage = RemoteStorage(RetryPolicy(attempts=1, timeout_s=5))
        storage.remember({"s3://bkt/d/x.bin": ObjectInfo(len(BODY), '"v1"')})
        assert storage.read_range("s3://bkt/d/x.bin", 0, 8, str, 0) == BODY[:8]
        assert lines == [f"GET {expected} HTTP/1.1".encode()]
        storage.close()


def test_no_password_or_presigned_signature_is_printed_or_logged(aws: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A URL's userinfo and a presigned query are credentials: --print-config, the log and the errors of
    `check` name the objects without them."""
    import sys

    root = Path(__file__).resolve().parent.parent
    secret_query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDPRESIGNED%2F20260101&X-Amz-Signature=5ec7e7"
    listing = b"img/1.jpg 0\nimg/2.jpg 1\n"

    def answer(head: bytes) -> bytes:
        method, target = head.split(b" ")[:2]
        assert b"Authorization: Basic dXNlcjpodW50ZXIy" in head  # user:hunter2, sent as basic authentication
        if target.startswith(b"/list.txt"):
            body = b"" if method == b"HEAD" else listing
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"l1\"\r\n\r\n%s" % (len(listing), body)
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    for base in _serve(answer):
        data = f"{base.replace('http://', 'http://user:hunter2@')}/list.txt?{secret_query}"
        shown = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", data, "--print-config",
                                "--batch-size", "1", "--log-level", "DEBUG"],
                               capture_output=True, text=True, timeout=120, cwd=root)
        report = tmp_path / "bad.tsv"
        checked = subprocess.run([sys.executable, "-m", "loader_server", "check", "--data", data, "--report",
                                  str(report)], capture_output=True, text=True, timeout=120, cwd=root)
        assert shown.returncode == 0, shown.stderr
        assert f'data = "{base.replace("http://", "http://***@")}/list.txt?<redacted>"' in shown.stdout
        assert checked.returncode == 1 and "2  not_found" in checked.stdout, checked.stdout + checked.stderr
        assert report.read_text().splitlines()[0] == f"{base.replace('http://', 'http://***@')}/img/1.jpg\tobject " \
                                                     "not found"
        for text in (shown.stdout + shown.stderr, checked.stdout + checked.stderr, report.read_text()):
            assert "hunter2" not in text and "AKIDPRESIGNED" not in text and "5ec7e7" not in text, text


def test_errors_sent_to_trainers_and_log_lines_carry_no_url_secret() -> None:
    import logging

    from loader_server.logs import _JsonFormatter, _TextFormatter
    from loader_server.runtime.outgoing import error_message

    text = "https://u:pw@h/k.jpg?X-Amz-Signature=deadbeef: GET failed, and https://h/k2?Signature=beef&Expires=1."
    sent = error_message("bad_sample", text, path="https://u:pw@h/k.jpg")
    assert sent.message == "https://***@h/k.jpg?<redacted>: GET failed, and https://h/k2?<redacted>."
    assert sent.path == "https://***@h/k.jpg"
    record = logging.LogRecord("loader_server", logging.WARNING, __file__, 1, "bad: %s", (text,), None)
    for formatter in (_TextFormatter("%(message)s"), _JsonFormatter()):
        line = formatter.format(record)
        assert "pw@" not in line and "deadbeef" not in line and "beef&" not in line and "https://***@h/k.jpg" in line


def test_an_object_replaced_by_one_of_another_length_is_changed_by_its_content_range() -> None:
    """A web server that gives neither ETag nor Last-Modified: If-Match cannot catch an object replaced since it
    was indexed, and a 206's Content-Range is the only sign (its complete length, RFC 9110 14.4). A read whose
    answer says another length than the size indexed is the bad sample ``changed``, naming the URL, the size
    indexed and the new one, by a single and a pipelined read alike, as a 412 is; so is a 416 whose
    ``bytes */length`` says another length (a range past the end of a shorter object). ``*`` (length unknown) is
    read; a Content-Range that ends elsewhere than the end asked is refused as another range."""
    now = {"body": BODY, "total": b"%d" % len(BODY), "end": 0}

    def answer(head: bytes) -> bytes:
        body = now["body"]
        lo, hi = _range(head)
        if lo >= len(body):
            return b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */%d\r\nContent-Length: 0\r\n\r\n" % (
                len(body))
        hi = min(hi, len(body) - 1) + now["end"]
        return (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%s\r\nContent-Length: %d\r\n\r\n%s"
                % (lo, hi, now["total"], hi - lo + 1, body[lo : hi + 1]))

    spans = [(0, 100), (5000, 100), (10000, 240)]
    for base in _serve(answer):
        url = f"{base}/obj.tar"
        for how in (single_ranges, piped_ranges):
            storage = RemoteStorage(RetryPolicy(attempts=2, timeout_s=5, base_s=0.01, max_backoff_s=0.05))
            storage.remember({url: ObjectInfo(len(BODY), "")})  # indexed: no ETag, no Last-Modified
            now.update(body=BODY, total=b"%d" % len(BODY), end=0)
            assert how(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}, how
            now["total"] = b"*"  # a length the server does not know: the range is read
            assert how(storage, url, spans) == {k: BODY[lo : lo + n] for k, (lo, n) in enumerate(spans)}, how
            now.update(body=BODY[:7000], total=b"7000")  # replaced by a shorter object mid-run
            got = how(storage, url, spans)
            for k, error in got.items():
                assert isinstance(error, DecodeError) and error.code == "changed", (how, k, error)
                assert error.path == str(k) and f"{url}: the object changed since it was indexed: indexed " \
                       "with 10240 bytes, the store now answers " in error.reason, error
                assert "(an object of 7000 bytes): restart the server to index it again" in error.reason, error
            assert "Content-Range 'bytes 0-99/7000'" in str(got[0]) and "HTTP 416" in str(got[2]), got
            now.update(body=BODY + b"x" * 10, total=b"10250")  # by a longer one: the same ranges, another length
            got = how(storage, url, spans)
            assert all(isinstance(e, DecodeError) and e.code == "changed" and "(an object of 10250 bytes)" in str(e)
                       for e in got.values()), (how, got)
            now.update(body=BODY, total=b"%d" % len(BODY), end=-1)  # one byte short of the end asked
            got = how(storage, url, spans)
            for k, error in got.items():
                assert isinstance(error, DecodeError) and error.code == "read_failed", (how, k, error)
            assert "the server answered 'bytes 0-98/10240'" in str(got[0]), got
            storage.close()


def test_a_server_says_once_that_a_host_answers_one_request_per_connection(start_server: Any,
                                                                          tmp_path: Path) -> None:
    """Tar shards over http:// from a web server that closes each connection after one answer (without saying
    so), served by two workers: each worker finds it on its own connections and reads from it one request per
    connection from then on, and the server's log says so once for the host (it said it once per worker), its
    userinfo not said. Every sample is served."""
    import http.server

    from loader_client import LoaderClient
    from loader_server.config import ServerConfig
    from loader_server.data.datasets import load_dataset
    from loader_server.sample_data import write_tar_shards

    from .conftest import unique_label_list

    files = load_dataset(ServerConfig(data=str(unique_label_list(tmp_path / "files", 24, size=(16, 12)))))
    shards = Path(write_tar_shards(files, tmp_path / "tar", 6)).parent
    gets = [0]

    class OneAnswer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            gets[0] += 1
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            path = shards / self.path.lstrip("/")
            if "/" in self.path.lstrip("/") or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            asked = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
            if asked is not None and not head:
                lo, hi = int(asked[1]), min(int(asked[2]), len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
                data = data[lo : hi + 1]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            self.close_connection = not head  # after one GET answer, without a Connection: close

        def log_message(self, *args: Any) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneAnswer)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{web.server_address[1]}"
        data = f"http://reader:hunter2@{host}/train-{{000000..000003}}.tar"
        server = start_server(data, "--batch-size", "4", "--size", "16x12", "--workers", "2",
                              "--index-dir", str(tmp_path / "index"), "--remote-attempts", "3")
        with LoaderClient(server.endpoint, timeout_s=60) as client:
            seen = [int(i) for _ in range(2) for batch in client.epoch() for i in client.last.indices]
        assert sorted(seen) == sorted(list(range(24)) * 2), seen
        server.stop()
        lines = [x for x in server.log_text().splitlines() if "answered only the first of a pipeline" in x]
        assert len(lines) == 1 and f"http://***@{host} answered only the first" in lines[0], server.log_text()
        assert "hunter2" not in server.log_text()
        assert gets[0] > 8  # (its ranges, one request per connection)
    finally:
        web.shutdown()
        web.server_close()
        thread.join(10)
