"""Data on an object store or a web server: ``s3://bucket/key`` and ``http(s)://host/path``.

`RemoteStorage` reads objects for the data set kinds stored in files (list files, class
folders, tar shards, Parquet tables) the way `reading.LocalStorage` reads files:

* **requests**: plain HTTP/1.1 GETs with a ``Range`` header on persistent connections, one per
  thread and host (`_Connection`, reused across requests and reopened after a fork), signed
  with AWS Signature V4 for ``s3://`` (`sign_v4`; ``Range`` is not signed, so one signature
  serves every range of an object for up to 60 s, well inside the 15 minutes S3 allows, and
  new credentials sign again), with botocore's credential chain
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
  the shared config files, SSO, web identity, the instance or container role). The endpoint
  and region come from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
  ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile, as for the AWS CLI. Listings (at start,
  and to re-check versions) go through a botocore client;
* **faults**: a timeout, a dropped connection, a 5xx (503 SlowDown included) or a 429 is
  retried with exponential backoff and full jitter, up to ``--remote-attempts`` attempts of at
  most ``--remote-timeout-s`` each; then the read fails with a `DecodeError` of code
  ``unavailable`` that names the URL, the status (or the network error) and the number of
  attempts: the trainer gets it as `BadSampleError`, in skip mode too (a store that does not
  answer is not a bad file to replace). A 404 or 403 is not retried: that object is a bad file
  (``not_found``, ``permission_denied``) and the bad-file policy applies;
* **versions**: every object's ETag (or, from a web server without one, Last-Modified) and
  size are known from the listing or a HEAD when the data set is opened. Each read sends
  ``If-Match`` with that ETag, so an object overwritten since is answered 412 and never served:
  the sample is bad with code ``changed``; so it is when a 206's ``Content-Range`` (or a 416's
  ``bytes */length``) gives the object another complete length than the size indexed, the one sign
  from a web server that gives neither ETag nor Last-Modified (`_another_range`). ``version(url)``
  (what a cached record is checked against) re-checks the store at most every
  ``--remote-recheck-s`` seconds per folder, in a background thread (the last known state
  answers meanwhile), so a record decoded from an object overwritten since is not served from
  the cache either;
* **bytes in flight**: at most ``--remote-inflight-mb`` of range requests per worker process
  are outstanding at once (a request larger than the bound runs alone).

Nothing secret is logged: messages name URLs (``s3://bucket/key``), never a signed request, and a URL's
userinfo or a presigned URL's signature (`redact`) never appears in a message, a log line or
``--print-config``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import logging
import os
import queue
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from loader_client.contract.errors import ConfigError

from ..redaction import redact
from .reading import DEFAULT_MAX_FILE_BYTES, DecodeError, Version

if TYPE_CHECKING:
    from ..options import DataOptions

__all__ = [
    "DEFAULT_INFLIGHT_BYTES",
    "REMOTE_SCHEMES",
    "ObjectInfo",
    "RemoteFile",
    "RemoteStorage",
    "RetryPolicy",
    "is_remote",
    "reads_remote",
    "redact",
    "remote_storage",
    "sign_v4",
    "split_url",
    "storage_of",
]

log = logging.getLogger("loader_server")

REMOTE_SCHEMES = ("s3://", "http://", "https://")
#: Default bound on the bytes of range requests in flight per worker process.
DEFAULT_INFLIGHT_BYTES = 64 << 20
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_remote(location: str) -> bool:
    """Whether `location` names an object (``s3://``, ``http://``, ``https://``) rather than a local path."""
    return location.startswith(REMOTE_SCHEMES)


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, key or path without the leading slash)."""
    scheme, _, rest = url.partition("://")
    where, _, key = rest.partition("/")
    if not where:
        raise ConfigError(f"{url!r} names no {'bucket' if scheme == 's3' else 'host'}")
    return scheme, where, key


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried: `attempts` in all, each at most `timeout_s`, backoff from `base_s` doubling
    up to `max_backoff_s`, each wait drawn uniformly below it (full jitter)."""

    attempts: int = 8
    timeout_s: float = 30.0
    base_s: float = 0.2
    max_backoff_s: float = 10.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_backoff_s, self.base_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a HEAD says of an object: its size and ETag (or Last-Modified, quoted as such)."""

    size: int
    etag: str

    @property
    def version(self) -> tuple[int, int]:
        """(a 63-bit hash of the ETag, the size): what records and indexes are checked against."""
        return int.from_bytes(hashlib.blake2b(self.etag.encode(), digest_size=8).digest(), "little") >> 1, self.size


class _Failure(Exception):
    def __init__(self, status: int | None, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry = status, reason, retry


class _TooLarge(Exception):
    """A 2xx answer whose body is over the bytes asked for (`size`: as it said, or as far as it was read)."""

    def __init__(self, size: int, status: int) -> None:
        super().__init__(size)
        self.size, self.status = size, status


class _BadResponse(Exception):
    """The server's answer is not HTTP/1.1 as this reader takes it (`status`: its status, where it had one)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


_HEAD_LIMIT = 1 << 16
#: A connection's receive buffer: from _BUFFER_MIN, grown to the largest response up to _BUFFER_MAX (a larger body
#: is received into a buffer of its own).
_BUFFER_MIN = 1 << 16
_BUFFER_MAX = 1 << 18
#: A response's header line as this reader takes it (RFC 9112 5): ``name:value``, the name a token (so no whitespace
#: before the colon; an obs-fold continuation line, which starts with a space or a tab, is unfolded first), no CR,
#: LF or NUL in the value, up to the line's end. Each match is one line, so a head is all such lines when _FIELD
#: finds as many as it has line ends.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD = re.compile(rf"\r\n({_TOKEN.pattern}):([^\r\n\x00]*)(?=\r\n|\Z)")
#: An obs-fold: a line end followed by the spaces or tabs that make the next line continue a field's value.
_OBS_FOLD = re.compile(r"\r\n[ \t]+")
#: The most interim (1xx) answers before a response (a peer that sends them forever holds a thread no longer).
_MAX_INTERIM = 10
#: The most header lines of one response (http.client's bound; an S3 answer has about 10).
_MAX_FIELDS = 100
_ERROR_BODY = 1 << 16
#: A status line (RFC 9112 4): a status code of 100..599 (RFC 9110 15), a reason phrase of tabs, spaces, visible
#: characters and obs-text (no CR, NUL or other control character), which may be left out.
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([1-5][0-9]{2})(?: [\t -~\x80-\xff]*)?")
_LENGTH = re.compile(r"[0-9]{1,18}")
#: A chunk's line (RFC 9112 7.1): its size in hexadecimal (leading zeros, then at most 15 digits), then extensions
#: (not read) after whitespace and a semicolon; no CR, LF or NUL anywhere (a reader that ended the line at a bare LF
#: would take another size).
_CHUNK_LINE = re.compile(rb"0*([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n\x00]*)?")


class _Connection:
    """One persistent HTTP/1.1 connection (TLS for https), one request at a time.

    The standard library's http.client costs 0.54 ms of CPU per 40 KB range GET on this machine
    (header parsing through the email package, a buffered file over the socket); this receives
    into the connection's own buffer with ``recv_into`` and copies the body out once. It takes what
    range GETs, HEADs and listings return: a Content-Length body, a chunked one, or one that ends
    when the server closes; ``Connection: close`` closes it after the response.

    Every request has a deadline (its attempt's ``--remote-timeout-s``): each socket operation
    waits at most until it, so a server that drips a byte at a time cannot hold a worker. An
    answer that is not HTTP as this reader takes it (a bad status line, header lines or framing
    fields as `_fields` refuses them, a bad chunk) is `_BadResponse` and the connection is closed. Through an
    ``http://`` proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``): plain requests in absolute
    form, ``https`` through a CONNECT tunnel.
    """

    def __init__(self, parts: urllib.parse.SplitResult, timeout: float, tls: ssl.SSLContext | None = None,
                 proxy: urllib.parse.SplitResult | None = None) -> None:
        self.https = parts.scheme == "https"
        self.hostname = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        shown = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self.host = f"{shown}:{parts.port}" if parts.port else shown  # the Host header: never the userinfo
        self.timeout = timeout
        self.tls = tls if tls is not None else (ssl.create_default_context() if self.https else None)
        self.proxy = proxy
        self.auth: dict[str, str] = {}
        if parts.username is not None:  # https://user:password@host/...: HTTP basic authentication
            self.auth["Authorization"] = _basic(parts.username, parts.password)
        self.proxy_auth: dict[str, str] = {}
        if proxy is not None and proxy.username is not None:
            self.proxy_auth["Proxy-Authorization"] = _basic(proxy.username, proxy.password)
        self.sock: socket.socket | None = None
        # What was received and not yet taken: rbuf[lo:hi]. One buffer per connection, grown to the largest
        # response that fits in _BUFFER_MAX, so that a range GET is one recv_into and one copy of its body.
        self.rbuf = bytearray(_BUFFER_MIN)
        self.view = memoryview(self.rbuf)
        self.lo = self.hi = 0

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
                self.lo = self.hi = 0

    @staticmethod
    def _arm(sock: socket.socket, deadline: float) -> None:
        """Let the next socket operation wait until the deadline at most."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the attempt's deadline passed")
        sock.settimeout(left)

    def _open(self, deadline: float) -> socket.socket:
        where = (self.proxy.hostname or "", self.proxy.port or 80) if self.proxy else (self.hostname, self.port)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the attempt's deadline passed")
        sock = socket.create_connection(where, timeout=left)
        self.sock, self.lo, self.hi = sock, 0, 0
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A known send buffer (the kernel doubles this, for its bookkeeping): `pipeline` never sends more request
        # bytes before reading than _PIPELINE_SEND_BYTES, well inside it, so sendall never waits on the server.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        if self.proxy is not None and self.https:
            self._tunnel(sock, deadline)
        if self.tls is not None:
            self._arm(sock, deadline)
            sock = self.sock = self.tls.wrap_socket(sock, server_hostname=self.hostname)
        return sock

    def _tunnel(self, sock: socket.socket, deadline: float) -> None:
        """CONNECT through the proxy to the origin; the TLS session then runs inside the tunnel."""
        lines = [f"CONNECT {self.hostname}:{self.port} HTTP/1.1", f"Host: {self.hostname}:{self.port}",
                 *(f"{k}: {v}" for k, v in self.proxy_auth.items())]
        self._arm(sock, deadline)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, _, _ = self._head(sock, deadline)
        if not 200 <= status < 300:
            self.close()
            proxy = f"{self.proxy.hostname}:{self.proxy.port or 80}" if self.proxy else ""
            raise _Failure(status, f"the proxy {proxy} refused the tunnel to {self.hostname}:{self.port}"
                                   + (" (Proxy-Authorization: set the user and password in HTTPS_PROXY)"
                                      if status == 407 else ""), status >= 500)
        if self.hi > self.lo:
            raise _BadResponse("the proxy sent bytes after accepting the tunnel", status)

    def _unasked(self) -> None:
        """Close the connection where the server sent bytes after its last answer that no request asked for (a body
        after a HEAD's answer, a 204's or a 304's, or an answer sent ahead): they are never the next answer."""
        if self.hi > self.lo:
            self.close()

    def _room(self, need: int) -> None:
        """Make room for `need` pending bytes from rbuf's start: the pending ones moved to the front, the buffer
        grown (to at most _BUFFER_MAX, or `need`) when it is too small."""
        pending = self.hi - self.lo
        size = len(self.rbuf)
        if need > size:
            size = min(max(need, 2 * size), max(need, _BUFFER_MAX))
            grown = bytearray(size)
            grown[:pending] = self.view[self.lo : self.hi]
            self.rbuf, self.view = grown, memoryview(grown)
        elif pending:
            self.view[:pending] = self.view[self.lo : self.hi]
        self.lo, self.hi = 0, pending

    def _more(self, sock: socket.socket, deadline: float) -> None:
        """Receive what the server sent next (at least a byte) after the pending bytes."""
        if self.lo == self.hi:  # nothing pending: receive from the buffer's start, into all of it
            self.lo = self.hi = 0
        elif self.hi == len(self.rbuf):
            self._room(self.hi - self.lo + _BUFFER_MIN if self.lo == 0 else 0)
        self._arm(sock, deadline)
        got = sock.recv_into(self.view[self.hi :])
        if not got:
            raise ConnectionResetError("the server closed the connection")
        self.hi += got

    def _line(self, sock: socket.socket, deadline: float) -> bytes:
        while (end := self.rbuf.find(b"\r\n", self.lo, self.hi)) < 0:
            if self.hi - self.lo > _HEAD_LIMIT:
                raise _BadResponse("a line of over 64 KB")
            self._more(sock, deadline)
        line = bytes(self.view[self.lo : end])
        self.lo = end + 2
        return line

    def _exact(self, sock: socket.socket, n: int, deadline: float) -> bytes | bytearray:
        """The next `n` bytes: received into rbuf and copied out once (bytes) when they fit in _BUFFER_MAX, else
        into a buffer of their own (a bytearray)."""
        pending = self.hi - self.lo
        if n <= _BUFFER_MAX:
            if not pending:
                self.lo = self.hi = 0
            if self.lo + n > len(self.rbuf):
                self._room(n)
            while self.hi - self.lo < n:
                self._arm(sock, deadline)
                got = sock.recv_into(self.view[self.hi :])
                if not got:
                    raise ConnectionResetError(f"the server closed the connection after {self.hi - self.lo} of {n} "
                                               "bytes")
                self.hi += got
            body = bytes(self.view[self.lo : self.lo + n])
            self.lo += n
            return body
        big = bytearray(n)
        have = min(n, pending)
        big[:have] = self.view[self.lo : self.lo + have]
        self.lo += have
        view = memoryview(big)
        while have < n:
            self._arm(sock, deadline)
            got = sock.recv_into(view[have:])
            if not got:
                raise ConnectionResetError(f"the server closed the connection after {have} of {n} bytes")
            have += got
        return big

    def _head(self, sock: socket.socket, deadline: float) -> tuple[int, str, dict[str, str]]:
        """(status, status line, fields as `_fields` reads them) of the next final response (interim 1xx answers,
        each head read by `_fields` too, skipped, at most _MAX_INTERIM of them): for a single request and a
        pipelined one alike. A 101 is refused: no request asks for an upgrade (RFC 9110 15.2.2), and after one the
        connection is no longer HTTP."""
        for _ in range(_MAX_INTERIM + 1):
            while (end := self.rbuf.find(b"\r\n\r\n", self.lo, self.hi)) < 0:
                if self.hi - self.lo > _HEAD_LIMIT:
                    raise _BadResponse("response headers of over 64 KB")
                self._more(sock, deadline)
            text = str(self.view[self.lo : end], "latin-1")
            self.lo = end + 4
            at = text.find("\r\n")
            first = text if at < 0 else text[:at]
            m = _STATUS_LINE.fullmatch(first)
            if m is None:
                raise _BadResponse(f"not an HTTP/1.1 status line: {first[:80]!r}")
            status = int(m.group(1))
            fields = {} if at < 0 else _fields(text, at, status, first)
            if status == 101:
                raise _BadResponse("101 Switching Protocols to a request that asked for no upgrade", status)
            if status >= 200:
                break  # 100 Continue and other interim answers: the real one follows
        else:
            raise _BadResponse(f"over {_MAX_INTERIM} interim (1xx) answers before the answer")
        return status, first, fields

    def encode(self, method: str, target: str, headers: dict[str, str]) -> bytes:
        """The bytes of one request to this connection's host (through its proxy, with its authentication)."""
        if self.proxy is not None and not self.https:  # a plain request through a proxy: absolute form
            target = f"http://{self.host}{target}"
            headers = {**self.proxy_auth, **headers}
        if self.auth:
            headers = {**self.auth, **headers}
        return (f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
                + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) + "\r\n").encode("latin-1")

    def request(self, method: str, target: str, headers: dict[str, str], max_bytes: int,
                deadline: float) -> tuple[int, dict[str, str], bytes]:
        """One request and its response, within `deadline` (time.monotonic()); the connection is closed after
        any error (`_BadResponse` for an answer that is not HTTP as this reader takes it)."""
        status: int | None = None
        try:
            self._unasked()
            sock = self.sock or self._open(deadline)
            data = self.encode(method, target, headers)
            self._arm(sock, deadline)
            sock.sendall(data)
            status, line, fields = self._head(sock, deadline)
            return self._body(sock, method, status, line, fields, max_bytes, deadline)
        except _BadResponse as exc:
            self.close()
            if exc.status is None:
                exc.status = status
            raise
        except ssl.SSLError:  # (a certificate error is a ValueError too): the TLS session's, said as such
            self.close()
            raise
        except (ValueError, IndexError, UnicodeError, OverflowError, MemoryError) as exc:  # a malformed answer
            self.close()
            raise _BadResponse(f"{type(exc).__name__}: {exc}", status) from None
        except BaseException:
            self.close()
            raise

    def pipeline(self, requests: Sequence[tuple[bytes, int]], timeout: float,
                 done: Callable[[int, int, dict[str, str], bytes], bool]) -> tuple[int, BaseException | None]:
        """HTTP/1.1 pipelining: send the encoded GETs `requests` ((bytes, max_bytes) each; at most
        _PIPELINE_SEND_BYTES in all, so that sending never waits for the server to read: see `_open`) back to
        back, then read their answers in order, calling ``done(k, status, fields, body)`` as each arrives; a
        False from it stops (the connection is closed: its later answers are not to be trusted). Each answer
        has its own deadline, `timeout` from when the one before it ended (a pipeline's last answer waits
        for every one before it).

        Returns (how many were answered, the error that stopped the rest, or None): after an error (which
        closes the connection) or an answer that closed it (``Connection: close``), the rest are unanswered,
        and the caller's to read again."""
        answered = 0
        try:
            deadline = time.monotonic() + timeout
            self._unasked()
            sock = self.sock or self._open(deadline)
            self._arm(sock, deadline)
            sock.sendall(b"".join([data for data, _ in requests]))
            for _, max_bytes in requests:
                deadline = time.monotonic() + timeout
                status, line, fields = self._head(sock, deadline)
                status, fields, body = self._body(sock, "GET", status, line, fields, max_bytes, deadline)
                answered += 1
                if not done(answered - 1, status, fields, body):
                    self.close()
                    break
                if self.sock is None:  # Connection: close (or an error body too large): the rest unanswered
                    break
            return answered, None
        except (_BadResponse, _TooLarge, ssl.SSLError, ValueError, IndexError, UnicodeError, OverflowError,
                MemoryError, OSError) as exc:
            self.close()  # what was answered stands; the rest is read again by the caller
            return answered, exc
        except BaseException:
            self.close()
            raise

    def _body(self, sock: socket.socket, method: str, status: int, line: str, fields: dict[str, str],
              max_bytes: int, deadline: float) -> tuple[int, dict[str, str], bytes]:
        limit = max_bytes if status < 300 else _ERROR_BODY
        connection = fields.get("connection")
        keep = not line.startswith("HTTP/1.0") and (connection is None or "close" not in _tokens(connection))
        body: bytes | bytearray
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "transfer-encoding" in fields:  # (`_fields` let it through only as "chunked", without a length)
            body = self._chunked(sock, limit, status, deadline)
        elif "content-length" in fields:
            size = int(fields["content-length"])  # (a byte count: `_fields` checked it)
            if size > limit:
                self.close()
                if status < 300:
                    raise _TooLarge(size, status)
                return status, fields, b""  # an error of over 64 KB: its status is enough
            body = self._exact(sock, size, deadline)
        else:  # the body ends when the server closes the connection
            keep = False
            body = bytearray(self.view[self.lo : self.hi])
            self.lo = self.hi
            while len(body) <= limit:
                self._arm(sock, deadline)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                body += chunk
            if len(body) > limit and status < 300:
                self.close()
                raise _TooLarge(len(body), status)
        if not keep:
            self.close()
        return status, fields, body if type(body) is bytes else bytes(body)

    def _chunked(self, sock: socket.socket, limit: int, status: int, deadline: float) -> bytearray:
        body = bytearray()
        while True:
            line = self._line(sock, deadline)
            m = _CHUNK_LINE.fullmatch(line)
            if m is None:
                raise _BadResponse(f"a chunk line {line[:40]!r} that is not a hexadecimal size (and extensions)",
                                   status)
            size = int(m.group(1), 16)
            if size == 0:  # trailers (not read), up to the empty line: at most as many lines and bytes as a head
                lines, total = 0, 0
                while trailer := self._line(sock, deadline):
                    lines, total = lines + 1, total + len(trailer) + 2
                    if lines > _MAX_FIELDS or total > _HEAD_LIMIT:
                        raise _BadResponse(f"over {_MAX_FIELDS} trailer lines or 64 KB of them", status)
                    if b"\r" in trailer or b"\n" in trailer or b"\x00" in trailer:
                        raise _BadResponse(f"a CR, LF or NUL in the trailer line {trailer[:80]!r}", status)
                return body
            if len(body) + size > limit:
                self.close()
                if status < 300:
                    raise _TooLarge(len(body) + size, status)
                return body  # an error of over 64 KB: its status is enough (as with a Content-Length)
            body += self._exact(sock, size, deadline)
            if self._line(sock, deadline):
                raise _BadResponse(f"a chunk longer than its size {size}", status)


def _fields(text: str, at: int, status: int, line: str) -> dict[str, str]:
    """The header fields of a response head `text` (decoded as latin-1, its lines from `at` on) as
    ``{lower-cased name: value}``: the one reader of every answer, a single request's or a pipelined one's.

    The peer is not trusted (RFC 9112): `_BadResponse` for a line that is not ``name:value`` with a token for
    a name, whitespace between a name and its colon (5.1) or before the first line (2.2), a CR, LF or NUL in a value,
    over _MAX_FIELDS lines, a Content-Length that is not one byte count (identical duplicates are one, as 6.3
    allows), Content-Range twice, a Transfer-Encoding other than ``chunked`` alone (6.1), one beside a
    Content-Length (6.3: an attempt to smuggle an answer) or in an HTTP/1.0 answer. A field said twice
    otherwise is one, its values joined with ", " (RFC 9110 5.3). Whatever fields frame a body are checked
    here: `_Connection._body` takes them as they are. An obs-fold (a line that starts with a space or a tab,
    continuing the one before) is replaced with a space before the fields are read, as RFC 9112 5.2 asks of a
    user agent: a folded value is then checked like any other (a folded Content-Length is one byte count)."""
    lines = text.count("\r\n", at)
    if lines > _MAX_FIELDS:
        raise _BadResponse(f"over {_MAX_FIELDS} header lines", status)
    pairs = _FIELD.findall(text, at)
    if len(pairs) != lines:
        if text.startswith((" ", "\t"), at + 2):  # (RFC 9112 2.2: a recipient may refuse it)
            raise _BadResponse(f"whitespace before the first header line {text[at + 2 : at + 82]!r}", status)
        if _OBS_FOLD.search(text, at):  # a user agent replaces each obs-fold with a space (RFC 9112 5.2)
            return _fields(text[:at] + _OBS_FOLD.sub(" ", text[at:]), at, status, line)
        _refuse_line(text[at + 2 :], status)
    fields = {name.lower(): value.strip() for name, value in pairs}
    if len(fields) < len(pairs):  # a field said more than once
        fields = {}
        for name, value in pairs:
            name, value = name.lower(), value.strip()
            if name in fields:
                if name == "content-range":
                    raise _BadResponse("Content-Range twice", status)
                value = f"{fields[name]}, {value}"
            fields[name] = value
    length = fields.get("content-length")
    if length is not None and not _LENGTH.fullmatch(length):
        said = {v.strip() for v in length.split(",")}
        if len(said) > 1 and all(_LENGTH.fullmatch(v) for v in said):
            raise _BadResponse(f"Content-Length with different values {length[:40]!r}", status)
        if len(said) > 1 or not _LENGTH.fullmatch(said.pop()):
            raise _BadResponse(f"Content-Length {length[:40]!r} is not a byte count", status)
        fields["content-length"] = length.split(",")[0].strip()
    coding = fields.get("transfer-encoding")
    if coding is not None:
        if coding.lower() != "chunked":
            raise _BadResponse(f"Transfer-Encoding {coding[:40]!r}: this reader takes chunked alone", status)
        if length is not None:
            raise _BadResponse("both Transfer-Encoding and Content-Length", status)
        if line.startswith("HTTP/1.0"):
            raise _BadResponse("Transfer-Encoding in an HTTP/1.0 answer", status)
    return fields


def _refuse_line(lines: str, status: int) -> NoReturn:
    """`_BadResponse` naming the first of the header `lines` that is not ``name:value`` as `_fields` takes it."""
    for line in lines.split("\r\n"):
        name, sep, value = line.partition(":")
        if line[:1] in (" ", "\t"):
            why = ": an obs-fold continuation line (RFC 9112 5.2)"
        elif not sep or not name:
            why = ""
        elif name.rstrip(" \t") != name:
            why = ": whitespace between the field name and its colon (RFC 9112 5.1)"
        elif not _TOKEN.fullmatch(name):
            why = ": a field name that is not a token"
        elif "\r" in value or "\n" in value or "\x00" in value:
            why = ": a CR, LF or NUL in the value"
        else:
            continue
        raise _BadResponse(f"a malformed header line {line[:80]!r}{why}", status)
    raise _BadResponse("malformed header lines", status)  # (not reached: one line above is named)


#: A 206 answer's Content-Range of one range (RFC 9110 14.4: the unit is case-insensitive; the complete length
#: may be ``*``, unknown).
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)", re.IGNORECASE)


def _another_range(fields: dict[str, str], offset: int, size: int, indexed: int | None) -> tuple[str, str] | None:
    """None where a 206 answer's Content-Range is the range asked (`size` bytes at `offset`) of an object of the
    `indexed` size (or of a size it does not know, ``*``); else (code, what it holds, in words):

    * ``changed``: it starts at `offset` but the object's complete length is not the size indexed: the object
      was replaced since it was indexed (for a store that gives neither ETag nor Last-Modified, the only sign);
      its end is then the new object's, not the one asked;
    * ``read_failed``: no Content-Range (RFC 9110 15.3.7: a 206 of one range says which it is; without it, an
      answer out of step could not be told from the range asked), or another range (another start or end),
      or one that is not ``bytes first-last/length``."""
    said = fields.get("content-range")
    if said is None:
        return "read_failed", "a 206 without Content-Range"
    m = _CONTENT_RANGE.fullmatch(said.strip())
    if m is None or int(m[1]) != offset:
        return "read_failed", repr(said[:80])
    if m[3] != "*" and indexed is not None and int(m[3]) != indexed:
        return "changed", _replaced(indexed, f"Content-Range {said[:80]!r}", int(m[3]))
    if int(m[2]) != offset + size - 1:
        return "read_failed", repr(said[:80])
    return None


def _replaced(indexed: int, answer: str, length: int) -> str:
    """What an answer that gives the object another complete `length` than the size `indexed` says: the object
    was replaced since it was indexed (a 206's Content-Range, a 416's ``bytes */length``)."""
    return (f"the object changed since it was indexed: indexed with {indexed} bytes, the store now answers {answer} "
            f"(an object of {length} bytes): restart the server to index it again")


def _tokens(value: str) -> list[str]:
    """The lower-cased items of a comma-separated field value (``Connection: keep-alive, close``)."""
    return [item.strip() for item in value.lower().split(",")]


def _basic(user: str, password: str | None) -> str:
    import base64

    raw = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


_UNKNOWN: Any = object()


class _Route(NamedTuple):
    """Where the requests for one URL go: its HTTP URL and parts, its connections' key, the request target."""

    http_url: str
    parts: urllib.parse.SplitResult
    key: tuple[str, str]
    target: str
    s3: bool


#: How long a request signature is reused for the same object (S3 takes a request signed up to 15 minutes
#: before it arrives), and how many URLs' routes and signatures a process keeps.
_SIGNATURE_REUSE_S = 60.0
_KEPT_URLS = 4096
#: The most range GETs sent back to back on one connection before reading their answers, and the most bytes of
#: them: a quarter of the send buffer each connection asks for (the kernel doubles SO_SNDBUF), so sending a
#: pipeline never waits for the server to read (a server that answers the first request before reading the
#: next would otherwise deadlock with us, each blocked on a full buffer).
_PIPELINE_MAX = 32
_SEND_BUFFER = 1 << 16
_PIPELINE_SEND_BYTES = _SEND_BUFFER // 2


class _Budget:
    """Bytes of requests in flight in this process, bounded (a request larger than the bound runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.peak = limit, 0, 0
        self.waiting = 0  # threads waiting for room
        self.cond = threading.Condition()

    def acquire(self, size: int) -> None:
        with self.cond:
            while self.used and self.used + size > self.limit:
                self.waiting += 1
                try:
                    self.cond.wait()
                finally:
                    self.waiting -= 1
            self.used += size
            if self.used > self.peak:
                self.peak = self.used

    def release(self, size: int) -> None:
        with self.cond:
            self.used -= size
            if self.waiting:
                self.cond.notify_all()

    @contextmanager
    def take(self, size: int) -> Iterator[None]:
        self.acquire(size)
        try:
            yield
        finally:
            self.release(size)


class RemoteStorage:
    """Objects of one kind of location (S3, or HTTP(S) servers), read with ranges, retries and version checks.

    Made in the server before its workers fork: everything that holds a socket or a thread
    (connections, the botocore client and credentials) is made again in each process, on first use.
    """

    def __init__(self, policy: RetryPolicy | None = None, inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
                 recheck_s: float = 60.0) -> None:
        self.policy = policy or RetryPolicy()
        self.inflight_bytes = inflight_bytes
        self.recheck_s = recheck_s
        self._infos: dict[str, ObjectInfo | None] = {}  # url -> as indexed (None: gone)
        self._checked: dict[str, float] = {}  # folder (S3) or object url -> monotonic time of its last check
        self._now: dict[str, dict[str, ObjectInfo]] = {}  # the same -> {url: info} as last checked
        self._refreshing: set[str] = set()  # folders or objects queued for a re-check in the background
        self._rechecks: queue.SimpleQueue[tuple[str, str]] | None = None  # this process's re-check thread's queue
        self._lists: dict[tuple[str, bool], dict[str, ObjectInfo]] = {}  # listings made while opening data sets
        self._lock = threading.Lock()
        self._pid = -1
        self._open: list[_Connection] = []  # every connection of this process
        self._local = threading.local()
        self._rng = random.Random()
        self._budget = _Budget(inflight_bytes)
        self._s3: dict[str, Any] | None = None
        self._routes: dict[str, _Route] = {}  # url -> where its requests go (bounded: `_route`)
        self._signed: dict[tuple[str, str], tuple[Any, float, dict[str, str]]] = {}  # (method, url) -> signature
        self.requests = 0  # this process's requests (attempts), for metrics and the benchmark
        self._serial: set[tuple[str, str]] = set()  # hosts that answer one request of a pipeline (read_ranges)
        self._heads: dict[str, tuple[Any, Any, bytes]] = {}  # url -> (info, signature, its requests' first lines)

    # ------------------------------------------------------------------ per process
    def _fresh(self) -> None:
        """After a fork: new connections, client, credentials and budget (the parent's are not ours)."""
        if self._pid != os.getpid():  # not under the lock: a lock held by another thread at the fork stays held
            self._open = []  # the parent's sockets: not ours to use or close
            self._lock = threading.Lock()
            self._local = threading.local()
            self._budget = _Budget(self.inflight_bytes)
            self._s3 = None
            self._routes, self._signed = {}, {}
            self._rng = random.Random()
            self._refreshing, self._rechecks = set(), None  # the parent's re-check thread is not in this process
            self.requests = 0
            self._serial, self._heads = set(), {}
            self._pid = os.getpid()

    def _s3_setup(self) -> dict[str, Any]:
        """The botocore session, credentials, client and endpoint of this process (made once)."""
        self._fresh()
        if self._s3 is not None:
            return self._s3
        with self._lock:
            if self._s3 is None:
                try:
                    import botocore.session
                    from botocore.config import Config
                except ImportError as exc:
                    raise ConfigError(f"s3:// data is read with botocore, which cannot be imported here ({exc}): "
                                      "install the `s3` extra: `python3 -m pip install \".[server,s3]\"`") from None
                # botocore's INFO lines say where the credentials came from: not for our logs
                logging.getLogger("botocore").setLevel(logging.WARNING)
                session = botocore.session.get_session()
                timeout = self.policy.timeout_s
                unsigned = {}
                if session.get_credentials() is None:  # no credentials anywhere: unsigned requests (public buckets)
                    from botocore import UNSIGNED

                    unsigned = {"signature_version": UNSIGNED}
                config = Config(retries={"max_attempts": self.policy.attempts, "mode": "standard"},
                                connect_timeout=timeout, read_timeout=timeout, max_pool_connections=4, **unsigned)
                region = os.environ.get("AWS_REGION") or session.get_config_variable("region") or "us-east-1"
                try:
                    client = session.create_client("s3", region_name=region, config=config)
                except Exception as exc:  # botocore's own errors: a bad profile, a bad endpoint
                    raise ConfigError(f"cannot set up the S3 client ({type(exc).__name__}: {exc}): check AWS_PROFILE, "
                                      "AWS_ENDPOINT_URL and the AWS config files") from None
                endpoint = client.meta.endpoint_url.rstrip("/")
                s3_config = dict(client.meta.config.s3 or {})  # the profile's `s3 =` settings, merged by botocore
                if s3_config.get("use_accelerate_endpoint"):
                    raise ConfigError("the AWS config sets s3 use_accelerate_endpoint, which this reader does not "
                                      "use (its requests would go to the regional endpoint): remove it from the "
                                      "profile for the loader, or set AWS_ENDPOINT_URL_S3")
                style = str(s3_config.get("addressing_style") or "auto")
                if style not in ("auto", "virtual", "path"):
                    raise ConfigError(f"the AWS config sets s3 addressing_style = {style!r}: expected auto, "
                                      "virtual or path")
                bundle = session.get_config_variable("ca_bundle")  # AWS_CA_BUNDLE or the profile's ca_bundle
                tls = None
                if endpoint.startswith("https://"):
                    try:
                        tls = ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()
                    except (OSError, ssl.SSLError) as exc:
                        raise ConfigError(f"AWS_CA_BUNDLE (or the profile's ca_bundle) {bundle!r} cannot be "
                                          f"loaded ({exc}): name a PEM file of CA certificates") from None
                _proxy_for(urllib.parse.urlsplit(endpoint))  # an unusable proxy setting: refused now, at start
                self._s3 = {"session": session, "client": client, "endpoint": endpoint, "region": region,
                            "aws": (urllib.parse.urlsplit(endpoint).hostname or "").endswith("amazonaws.com"),
                            "style": style, "tls": tls, "bundle": bundle}
            return self._s3

    # ------------------------------------------------------------------ URLs and requests
    def _http_url(self, url: str) -> str:
        """The HTTP URL a request for `url` goes to (S3: as the profile's s3 addressing_style says: path or
        virtual-hosted; auto, botocore's default: virtual-hosted on AWS for a bucket name that is a DNS label)."""
        scheme, where, key = split_url(url)
        if scheme != "s3":
            return url
        s3 = self._s3_setup()
        quoted = urllib.parse.quote(key, safe="/~")
        dns = re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", where) is not None
        if s3["style"] == "virtual" or (s3["style"] == "auto" and s3["aws"] and dns):
            parts = urllib.parse.urlsplit(s3["endpoint"])
            return f"{parts.scheme}://{where}.{parts.netloc}/{quoted}"
        return f"{s3['endpoint']}/{where}/{quoted}"

    def _sign(self, url: str, http_url: str, method: str, headers: dict[str, str]) -> dict[str, str]:
        signature = self._signature(url, http_url, method)
        return headers if signature is None else {**headers, **signature}

    def _signature(self, url: str, http_url: str, method: str) -> dict[str, str] | None:
        """The signature headers of a request for `url` (None: unsigned): the same dict while it is reused."""
        if not url.startswith("s3://"):
            return None
        s3 = self._s3_setup()
        creds = s3["session"].get_credentials()
        if creds is None:  # no credentials anywhere: unsigned (a public bucket)
            return None
        frozen = creds.get_frozen_credentials()  # refreshed by botocore when they expire (roles, SSO)
        key = (method, http_url)
        now = time.time()
        kept = self._signed.get(key)
        if kept is None or kept[0] != frozen or not 0 <= now - kept[1] < _SIGNATURE_REUSE_S:
            if len(self._signed) >= _KEPT_URLS:
                self._signed.clear()
            kept = self._signed[key] = (frozen, now, sign_v4(method, http_url, {}, frozen.access_key,
                                                             frozen.secret_key, frozen.token, s3["region"], now))
        signature: dict[str, str] = kept[2]
        return signature

    def _route(self, url: str) -> _Route:
        """Where the requests for `url` go, worked out once per URL (at most `_KEPT_URLS` kept)."""
        route = self._routes.get(url)
        if route is None:
            http_url = self._http_url(url)
            parts = urllib.parse.urlsplit(http_url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            route = _Route(http_url, parts, (parts.scheme, parts.netloc), target, url.startswith("s3://"))
            if len(self._routes) >= _KEPT_URLS:
                self._routes.clear()
            self._routes[url] = route
        return route

    def _connection(self, route: _Route) -> _Connection:
        """This thread's connection to the route's host (opened on first use)."""
        conns: dict[tuple[str, str], _Connection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(route.key)
        if conn is None:
            parts = route.parts
            tls = self._s3_setup()["tls"] if route.s3 and parts.scheme == "https" else None  # S3: AWS_CA_BUNDLE
            conn = conns[route.key] = _Connection(parts, self.policy.timeout_s, tls, _proxy_for(parts))
            with self._lock:
                self._open.append(conn)  # kept here, not only by its thread: closed by `close`, never collected open
        return conn

    def _once(self, url: str, method: str, headers: dict[str, str],
              max_bytes: int) -> tuple[int, dict[str, str], bytes]:
        """One attempt: (status, lower-cased headers, body)."""
        self.requests += 1
        route = self._route(url)
        signed = self._sign(url, route.http_url, method, headers) if route.s3 else headers
        conn, path = self._connection(route), route.target
        try:  # the whole attempt within --remote-timeout-s, however slowly the server answers
            return conn.request(method, path, signed, max_bytes, time.monotonic() + self.policy.timeout_s)
        except _TooLarge as exc:
            if "Range" in headers:  # (a range's size is no --max-file-bytes: the server answered more than asked)
                raise DecodeError(redact(url), f"asked for a range of {max_bytes} bytes, the server answered HTTP "
                                               f"{exc.status} with {exc.size} bytes"
                                               + (": it ignores Range requests; serve the data from a server that "
                                                  "answers them (206)" if exc.status == 200 else ""),
                                  "read_failed") from None
            raise DecodeError(redact(url), f"object of {exc.size} bytes exceeds --max-file-bytes {max_bytes}",
                              "too_large") from None
        except (_BadResponse, OSError) as exc:  # (OSError: timeouts and TLS errors too)
            conn.close()
            raise _attempt_failure(exc, self.policy.timeout_s) from None

    def _request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200, 206), max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 what: str = "GET", prior: _Failure | None = None) -> tuple[int, dict[str, str], bytes]:
        """A request with retries; DecodeError naming the URL, the status and the attempts when it fails.
        `prior`: how a first attempt made elsewhere (a pipelined request) failed; this goes on from attempt 2,
        after its backoff, as if it had made that attempt."""
        self._fresh()
        policy = self.policy
        started = time.monotonic()
        failure = _Failure(None, "not tried", False)
        attempt = 0
        if prior is not None:
            failure, attempt = prior, 1
            if failure.retry and attempt < policy.attempts:
                time.sleep(policy.backoff(attempt, self._rng))
        while attempt < policy.attempts and (attempt == 0 or failure.retry):
            attempt += 1
            try:
                status, head, body = self._once(url, method, dict(headers or {}), max_bytes)
            except _Failure as exc:
                failure = exc
            else:
                if status in ok:
                    return status, head, body
                failure = _status_failure(status, head, body)
            if not failure.retry or attempt == policy.attempts:
                break
            time.sleep(policy.backoff(attempt, self._rng))
        took = time.monotonic() - started
        shown = f"HTTP {failure.status} " if failure.status is not None else ""
        tries = f"after {attempt} attempt{'s' if attempt > 1 else ''} in {took:.1f} s"
        code = {404: "not_found", 403: "permission_denied", 401: "permission_denied", 412: "changed"}.get(
            failure.status or 0, "unavailable" if failure.retry else "read_failed")
        hint = {"not_found": "", "changed": "", "permission_denied": ": check the credentials (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID) and the bucket policy"}.get(code, "")
        raise DecodeError(redact(url), f"{what} failed {tries}: {shown}{failure.reason}{hint}", code)

    # ------------------------------------------------------------------ what objects exist
    def head(self, url: str) -> ObjectInfo:
        """Size and ETag of one object, asked now (DecodeError when it cannot be had)."""
        if url.startswith("s3://"):
            _, bucket, key = split_url(url)
            found = self._list(f"s3://{bucket}/{key}", exact=True)
            info = found.get(url)
            if info is None:
                raise DecodeError(redact(url), "object not found", "not_found")
            return info
        _, head, _ = self._request(url, "HEAD", ok=(200,), what="HEAD")
        if "content-length" not in head:  # (RFC 9110 9.3.2 lets a HEAD answer leave it out)
            raise DecodeError(redact(url), "its HEAD answer has no Content-Length: its size cannot be known; serve "
                                           "it from a server that says it (S3, nginx and Apache do)", "read_failed")
        return ObjectInfo(int(head["content-length"]),
                          head.get("etag") or ("last-modified:" + head.get("last-modified", "")))

    def list(self, prefix: str, shallow: bool = False) -> dict[str, ObjectInfo]:
        """Every object under `prefix` (``s3://bucket/folder/``; `shallow`: not in its sub-folders): URL -> info,
        in key order. Listings are kept: opening a data set lists each prefix once."""
        if not prefix.startswith("s3://"):
            raise ConfigError(f"{prefix!r}: a web server cannot be listed; name the files (a list file, brace "
                              "ranges such as train-{000..099}.tar) or put them on S3")
        with self._lock:
            kept = self._lists.get((prefix, shallow))
        if kept is None:
            kept = self._list(prefix, exact=False, shallow=shallow)
            with self._lock:
                self._lists[(prefix, shallow)] = kept
        return kept

    def holds_objects(self, prefix: str) -> bool:
        """Whether any object lies under `prefix` (``s3://bucket/folder/``): one request for one key, for a hint."""
        from botocore.exceptions import BotoCoreError, ClientError

        _, bucket, key = split_url(prefix)
        try:
            page = self._s3_setup()["client"].list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except (BotoCoreError, ClientError):
            return False
        return bool(page.get("Contents"))

    def _list(self, prefix: str, exact: bool, remember: bool = True, shallow: bool = False) -> dict[str, ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        _, bucket, key = split_url(prefix)
        client = self._s3_setup()["client"]
        found: dict[str, ObjectInfo] = {}
        at = time.monotonic()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key, **({"Delimiter": "/"} if shallow else {}))
            for page in pages:
                for item in page.get("Contents", []):
                    if exact and item["Key"] != key:
                        continue
                    found[f"s3://{bucket}/{item['Key']}"] = ObjectInfo(int(item["Size"]), str(item.get("ETag", "")))
                if exact and found:
                    break
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            raise DecodeError(prefix, f"listing failed after {attempts} attempt{'s' if attempts > 1 else ''}: "
                                      f"HTTP {status} "
                                      f"{error.get('Code', '')} {error.get('Message', '')}".rstrip(),
                              "not_found" if error.get("Code") == "NoSuchBucket" else "read_failed") from None
        except BotoCoreError as exc:
            from botocore.exceptions import ConnectionError as BotoConnectionError

            where = ""
            if isinstance(exc, BotoConnectionError):  # a mistyped or stopped endpoint: say where it came from
                where = (f" (after {self.policy.attempts} attempts, --remote-attempts); the endpoint "
                         f"{self._s3_setup()['endpoint']} comes from AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or the "
                         "profile's endpoint_url (else AWS's own): check it and that the store is up")
            raise DecodeError(prefix, f"listing failed: {exc}{where}", "unavailable") from None
        if remember:
            with self._lock:
                for url, info in found.items():
                    self._infos.setdefault(url, info)
            if not exact and prefix.endswith("/"):  # whole folders listed: their state now, for `current`
                scopes = {prefix} if shallow else {prefix, *map(_scope, found)}
                self._known(scopes, found, at)
        return found

    def _known(self, scopes: set[str], found: dict[str, ObjectInfo], at: float) -> None:
        """`found` (None: unknown) as the state of the folders (or objects) `scopes`, as checked at time `at`."""
        by_scope: dict[str, dict[str, ObjectInfo]] = {scope: {} for scope in scopes}
        for url, info in found.items():
            objects = by_scope.get(_scope(url) if url not in by_scope else url)
            if objects is not None:
                objects[url] = info
        with self._lock:
            for scope, objects in by_scope.items():
                if at >= self._checked.get(scope, -1.0):
                    self._checked[scope], self._now[scope] = at, objects

    def remember(self, infos: dict[str, ObjectInfo]) -> None:
        """The objects as the data set was indexed: later reads must find exactly these versions."""
        with self._lock:
            self._infos.update(infos)

    def info(self, url: str) -> ObjectInfo | None:
        """The object as indexed (listing or HEAD on first use); None when it does not exist."""
        with self._lock:
            if url in self._infos:
                return self._infos[url]
        try:
            info: ObjectInfo | None = self.head(url)
        except DecodeError as exc:
            if exc.code != "not_found":
                raise
            info = None
        with self._lock:
            self._infos.setdefault(url, info)
            return self._infos[url]

    def current(self, url: str) -> ObjectInfo | None:
        """The object as the store has it, re-checked at most every `recheck_s` per folder (S3: one listing of
        the folder) or per object (a web server: a HEAD); None when it is gone or could not be checked.

        A state older than `recheck_s` is re-checked in the background (one thread per process), and the
        last known state is the answer meanwhile: a folder of a million objects (a thousand LIST pages)
        never holds a worker's read-ahead. So a change is seen at most `recheck_s` plus one listing
        after it is made. The first check of a folder that no listing covered yet, and every check
        with `recheck_s` 0, is made at once."""
        self._fresh()
        scope = _scope(url)
        now = time.monotonic()
        with self._lock:
            last = self._checked.get(scope)
            known = self._now.get(scope, {}).get(url)
            if last is not None and (now - last < self.recheck_s or self.recheck_s > 0):
                if now - last >= self.recheck_s and scope not in self._refreshing:
                    self._refreshing.add(scope)
                    if self._rechecks is None:
                        self._rechecks = queue.SimpleQueue()
                        threading.Thread(target=self._recheck_loop, args=(self._rechecks,), daemon=True,
                                         name="loader-recheck").start()
                    self._rechecks.put((scope, url))
                return known
        self._check(scope, url)
        with self._lock:
            return self._now.get(scope, {}).get(url)

    def _check(self, scope: str, url: str) -> None:
        """Ask the store for the state of `scope` now (unknown, so no record is served, if it cannot say)."""
        at = time.monotonic()
        try:
            seen = (self._list(scope, exact=False, remember=False, shallow=True) if scope != url
                    else {url: self.head(url)})
        except DecodeError:
            seen = {}  # gone, or the store does not answer: nothing is served from a record until it does
        self._known({scope}, seen, at)

    def _recheck_loop(self, rechecks: queue.SimpleQueue[tuple[str, str]]) -> None:
        while True:
            scope, url = rechecks.get()
            try:
                self._check(scope, url)
            except Exception as exc:  # a bug or a setting: never a dead re-check thread, never a stale record
                log.warning("re-checking %s failed (%s: %s): its records are not served until it succeeds",
                            scope, type(exc).__name__, exc)
                self._known({scope}, {}, time.monotonic())
            finally:
                with self._lock:
                    self._refreshing.discard(scope)

    # ------------------------------------------------------------------ reads
    def _conditions(self, url: str) -> dict[str, str]:
        info = self._infos.get(url, _UNKNOWN)  # (a dict read is atomic: no lock once indexed)
        if info is _UNKNOWN:
            info = self.info(url)
        if info is None:
            raise DecodeError(redact(url), "object not found", "not_found")
        if info.etag.startswith("last-modified:"):
            stamp = info.etag.removeprefix("last-modified:")
            return {"If-Unmodified-Since": stamp} if stamp else {}
        return {"If-Match": info.etag} if info.etag else {}

    def _unsatisfiable(self, url: str, fields: dict[str, str], offset: int, size: int, name: str) -> DecodeError:
        """The error of a 416 answer to a range of the object as indexed: ``changed`` where its Content-Range
        (``bytes */length``, RFC 9110 15.5.17) says another length (the object was replaced by a shorter one);
        else ``read_failed``, naming the status."""
        said = fields.get("content-range", "")
        m = re.fullmatch(r"bytes \*/(\d{1,19})", said.strip(), re.IGNORECASE)
        indexed = self._indexed_size(url)
        if m is not None and indexed is not None and int(m[1]) != indexed:
            return DecodeError(name, f"{redact(url)}: "
                               f"{_replaced(indexed, f'HTTP 416 with Content-Range {said[:80]!r}', int(m[1]))}",
                               "changed")
        return DecodeError(name, f"asked for bytes {offset}-{offset + size - 1} of {redact(url)}, the server "
                                 f"answered HTTP 416 Range Not Satisfiable{f' ({said[:80]!r})' if said else ''}",
                           "read_failed")

    def _indexed_size(self, url: str) -> int | None:
        """The object's size as indexed (what a 206's Content-Range must say is its complete length)."""
        info = self._infos.get(url)  # (known by now: `_conditions` asked for it before the request)
        return None if info is None else info.size

    def read(self, url: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """A whole object, as it was when indexed (DecodeError ``changed`` when it was overwritten since)."""
        headers = self._conditions(url)
        info = self.info(url)
        size = info.size if info is not None else 0
        if size > max_bytes:
            raise DecodeError(redact(url), f"object of {size} bytes exceeds --max-file-bytes {max_bytes}", "too_large")
        with self._budget.take(max(size, 1)):
            _, _, body = self._request(url, headers=headers, max_bytes=max_bytes)
        return body

    def read_range(self, url: str, offset: int, size: int, describe: Callable[[int], str], i: int,
                   prior: _Failure | None = None) -> bytes:
        """`size` bytes at `offset` of the object, as indexed; errors name the sample ``describe(i)``. `prior`: how
        a pipelined first attempt failed (`read_ranges`)."""
        self._fresh()
        try:
            headers = self._conditions(url)
            headers["Range"] = f"bytes={offset}-{offset + size - 1}"
            budget = self._budget
            budget.acquire(size)
            try:
                status, head, body = self._request(url, headers=headers, ok=(200, 206, 416), max_bytes=size,
                                                   prior=prior)
            finally:
                budget.release(size)
        except DecodeError as exc:
            shown = redact(url)
            raise DecodeError(describe(i), f"{shown}: {exc.reason}" if exc.path == shown else str(exc),
                              exc.code) from None
        if status == 416:
            raise self._unsatisfiable(url, head, offset, size, describe(i))
        if status == 200:  # a server that ignores Range sends the whole object
            body = body[offset : offset + size]
        elif (other := _another_range(head, offset, size, self._indexed_size(url))) is not None:
            code, said = other
            if code == "changed":
                raise DecodeError(describe(i), f"{redact(url)}: {said}", code)
            raise DecodeError(describe(i), f"asked for bytes {offset}-{offset + size - 1} of {redact(url)}, the "
                                           f"server answered {said}", code)
        if len(body) != size:
            raise DecodeError(describe(i), f"truncated: {len(body)} of {size} bytes at offset {offset} of "
                                           f"{redact(url)}", "truncated")
        return body

    def read_ranges(self, items: Sequence[tuple[str, int, int, Callable[[int], str], int]],
                    deliver: Callable[[int, bytes | Exception], None], retry: Executor) -> None:
        """The range reads `items` ((url, offset, size, describe, i) each, as `read_range` takes them) pipelined
        on this thread's connections (HTTP/1.1): ``deliver(k, bytes or error)`` is called exactly once per item,
        here as its answer arrives, or on a thread of `retry`.

        Consecutive items of one host go out as pipelines of at most _PIPELINE_MAX requests, at most
        _PIPELINE_SEND_BYTES of request bytes (see `_Connection._open`) and at most the bytes-in-flight bound
        (``--remote-inflight-mb``; a larger range goes alone, as with `read_range`). What a pipeline leaves
        (an answer that is not 2xx, a timeout, a broken connection, a ``Connection: close``, an answer to
        another range) is handed to `retry`, which reads each with `read_range`: the retries, backoff,
        errors and bad-file policy of a single read, the pipelined attempt counted as its first when it
        was answered, and never a backoff sleep on this thread, which goes on with the next pipeline. A host
        that answers a pipeline's first request only (it closes the connection after it) is remembered:
        its reads then go to `retry`, one request per connection, and a line says so once."""
        self._fresh()

        def hand(k: int, prior: _Failure | None) -> None:  # to `retry`, at once: never behind the next pipeline
            try:
                retry.submit(self._read_left, items[k], prior, k, deliver)
            except RuntimeError as exc:  # the pool is shut down (the worker is stopping)
                deliver(k, exc)

        todo: list[tuple[int, _Route, bytes, int]] = []
        heads = self._heads
        for k, (url, offset, size, _, _) in enumerate(items):
            route = self._route(url)
            info = self._infos.get(url, _UNKNOWN)  # (indexed: no request; else read_range asks, and says)
            if info is _UNKNOWN or info is None or route.key in self._serial:
                hand(k, None)
                continue
            # The request up to its Range line (target, Host, If-Match, signature), made once per object and
            # signature: the same bytes for every range of it while the signature is reused.
            signature = self._signature(url, route.http_url, "GET") if route.s3 else None
            kept = heads.get(url)
            if kept is None or kept[0] is not info or kept[1] is not signature:
                if len(heads) >= _KEPT_URLS:
                    heads.clear()
                headers = self._conditions(url)
                if signature is not None:
                    headers.update(signature)
                kept = heads[url] = (info, signature, self._connection(route).encode("GET", route.target,
                                                                                    headers)[:-2])
            todo.append((k, route, b"%sRange: bytes=%d-%d\r\n\r\n" % (kept[2], offset, offset + size - 1), size))
        budget, timeout = self._budget, self.policy.timeout_s
        at = 0
        while at < len(todo):
            route = todo[at][1]
            conn = self._connection(route)
            chunk: list[tuple[int, int]] = []  # (k, size)
            requests: list[tuple[bytes, int]] = []
            sent_bytes = total = 0
            for k, other, data, size in todo[at : at + _PIPELINE_MAX]:
                if other.key != route.key:
                    break
                if chunk and (sent_bytes + len(data) > _PIPELINE_SEND_BYTES or total + size > budget.limit):
                    break
                chunk.append((k, size))
                requests.append((data, size))
                sent_bytes += len(data)
                total += size
            at += len(chunk)
            outcome = {"stopped": False, "ranges": 0}  # an answer refused as out of step; the ranges answered

            def done(j: int, status: int, fields: dict[str, str], body: bytes,
                     chunk: list[tuple[int, int]] = chunk, outcome: dict[str, Any] = outcome) -> bool:
                k = chunk[j][0]
                url, offset, size, describe, i = items[k]
                if status == 200:  # a server that ignores Range sends the whole object
                    body = body[offset : offset + size]
                elif status == 416:  # (not retried: a single read would say the same)
                    outcome["ranges"] += 1
                    deliver(k, self._unsatisfiable(url, fields, offset, size, describe(i)))
                    return True
                elif status != 206:  # its first attempt, failed: read again (or not) as a single read would
                    hand(k, _status_failure(status, fields, body))
                    return True
                elif (other := _another_range(fields, offset, size, self._indexed_size(url))) is not None:
                    if other[0] == "changed":  # in step (its start is the one asked), of an object replaced since
                        outcome["ranges"] += 1
                        deliver(k, DecodeError(describe(i), f"{redact(url)}: {other[1]}", "changed"))
                        return True
                    outcome["stopped"] = True  # out of step: this connection's later answers are not trusted
                    hand(k, _Failure(206, f"a pipelined answer not for the range asked ({other[1]})", True))
                    return False
                outcome["ranges"] += 1
                if len(body) != size:
                    deliver(k, DecodeError(describe(i), f"truncated: {len(body)} of {size} bytes at offset {offset} "
                                                        f"of {redact(url)}", "truncated"))
                else:
                    deliver(k, body)
                return True

            self.requests += len(chunk)
            budget.acquire(total)
            try:
                answered, error = conn.pipeline(requests, timeout, done)
            finally:
                budget.release(total)
            if answered < len(chunk):
                rest = answered
                if not outcome["stopped"]:  # (a refused answer is handed on already)
                    k = chunk[answered][0]
                    rest += 1
                    if isinstance(error, (TimeoutError, _BadResponse)):  # late or malformed: its first attempt
                        hand(k, _attempt_failure(error, timeout))
                    else:  # never answered (a closed or broken connection): read again from the first attempt
                        hand(k, None)
                    if answered == 1 == outcome["ranges"] and len(chunk) > 1 and (
                            error is None or isinstance(error, ConnectionError)):
                        self._one_at_a_time(route)
                for k, _ in chunk[rest:]:
                    hand(k, None)

    def _read_left(self, item: tuple[str, int, int, Callable[[int], str], int], prior: _Failure | None, k: int,
                   deliver: Callable[[int, bytes | Exception], None]) -> None:
        try:
            data = self.read_range(*item, prior=prior)
        except Exception as exc:
            deliver(k, exc)
        else:
            deliver(k, data)

    def _one_at_a_time(self, route: _Route) -> None:
        """`route`'s host answered only the first request of a pipeline: one request per connection from now on,
        and a line says so (`serial_host_found`)."""
        if route.key not in self._serial:
            self._serial.add(route.key)
            serial_host_found(redact(f"{route.key[0]}://{route.key[1]}"))  # (not its userinfo: a password)

    def release_thread(self) -> None:
        """Close this thread's connections (a thread that ends: its connections are not reused)."""
        conns: dict[tuple[str, str], _Connection] | None = getattr(self._local, "conns", None)
        if not conns:
            return
        self._local.conns = {}
        with self._lock:
            self._open = [c for c in self._open if c not in conns.values()]
        for conn in conns.values():
            conn.close()

    def version(self, url: str) -> Version | None:
        """What a cached record of the object is checked against: its ETag's hash and size now (None: gone,
        or changed since indexing, so that no record of it is served)."""
        indexed = self.info(url)
        now = self.current(url)
        if indexed is None or now is None or now != indexed:
            return None
        h, size = indexed.version
        return h, size, 0, 0

    def open(self, url: str, window: int = 8 << 20) -> RemoteFile:
        """The object as indexed, as a read-only seekable file (for indexing it where it lies: no local copy)."""
        info = self.info(url)
        if info is None:
            raise DecodeError(redact(url), "object not found", "not_found")
        return RemoteFile(self, url, info.size, window)

    def close(self) -> None:
        """Close this process's connections (the next request opens new ones)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            conns, self._open = self._open, []
            self._local = threading.local()
        for conn in conns:
            conn.close()
        if self._s3 is not None:
            self._s3["client"].close()

    def stats(self) -> dict[str, int]:
        """This process's requests and peak bytes in flight."""
        return {"requests": self.requests, "peak_inflight_bytes": self._budget.peak}


class RemoteFile(io.RawIOBase):
    """One object as indexed, read where it lies: ``read``/``seek``/``tell`` (tarfile, pyarrow) and slices
    (``f[a:b]``, as of an mmap), served from one window of `window` bytes read ahead with a range GET
    (each carrying the indexed ETag). A read past the window moves it, so a sequential walk of a tar
    shard's headers costs one request per window and skips members larger than a window; a read larger
    than the window is one request of its own. Nothing is written to local disk."""

    def __init__(self, storage: RemoteStorage, url: str, size: int, window: int) -> None:
        super().__init__()
        self.storage, self.url, self.size, self.window = storage, url, size, max(window, 1)
        self.name = url
        self._pos = 0
        self._start = 0
        self._buf = b""

    def __len__(self) -> int:
        return self.size

    def _get(self, start: int, stop: int) -> bytes:
        start, stop = max(0, min(start, self.size)), max(0, min(stop, self.size))
        if stop <= start:
            return b""
        if self._start <= start and stop <= self._start + len(self._buf):
            return self._buf[start - self._start : stop - self._start]
        if stop - start > self.window:  # larger than a window: a request of its own, the window stays
            return self.storage.read_range(self.url, start, stop - start, lambda _: self.url, 0)
        end = min(self.size, start + self.window)
        self._buf = self.storage.read_range(self.url, start, end - start, lambda _: self.url, 0)
        self._start = start
        return self._buf[: stop - start]

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a RemoteFile is sliced with [start:stop]")
        start, stop, _ = item.indices(self.size)
        return self._get(start, stop)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """At most what is left of the object (io's `read` allocates the `size` asked: a damaged tar header's
        size, read by tarfile, would be a buffer of that many bytes)."""
        left = max(0, self.size - self._pos)
        data = self._get(self._pos, self._pos + (left if size is None or size < 0 else min(size, left)))
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self._get(self._pos, self._pos + len(view))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


_KEYS: dict[tuple[str, str, str], bytes] = {}


def sign_v4(method: str, url: str, headers: dict[str, str], access_key: str, secret_key: str, token: str | None,
            region: str, now: float | None = None) -> dict[str, str]:
    """`headers` plus AWS Signature Version 4 for S3 (unsigned payload; host, date and token signed).

    botocore's signer (`S3SigV4Auth`) gives the same signature; this one keeps the day's signing
    key and builds no request object, which costs 25 us a request instead of 120 (measured on
    this machine, where every request's CPU competes with decoding).
    """
    parts = urllib.parse.urlsplit(url)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    day = amz_date[:8]
    signed = {"host": parts.netloc, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz_date}
    if token:
        signed["x-amz-security-token"] = token
    names = ";".join(sorted(signed))
    query = "&".join(sorted(parts.query.split("&"))) if parts.query else ""
    canonical = (f"{method}\n{parts.path or '/'}\n{query}\n"
                 + "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)) + f"\n{names}\nUNSIGNED-PAYLOAD")
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _KEYS.get((secret_key, day, region))
    if key is None:
        key = ("AWS4" + secret_key).encode()
        for part in (day, region, "s3", "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        _KEYS.clear()  # one day, one region, one secret at a time
        _KEYS[(secret_key, day, region)] = key
    signature = hmac.digest(key, to_sign.encode(), "sha256").hex()
    out = {**headers, "X-Amz-Date": amz_date, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
           "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={names}, "
                            f"Signature={signature}"}
    if token:
        out["X-Amz-Security-Token"] = token
    return out


def _attempt_failure(exc: _BadResponse | OSError, timeout_s: float) -> _Failure:
    """How an attempt that got no usable answer failed (a timeout, a malformed answer, TLS, the network), as the
    error after the retries says it; every one is retried."""
    if isinstance(exc, TimeoutError):
        return _Failure(None, f"timed out after {timeout_s:g} s", True)
    if isinstance(exc, _BadResponse):
        return _Failure(exc.status, f"a malformed response: {exc}", True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Failure(None, f"TLS: {exc.verify_message or exc}: the server's certificate is not trusted here "
                              "(AWS_CA_BUNDLE names the CA bundle for s3://, SSL_CERT_FILE for https://)", True)
    return _Failure(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True)


#: Hosts that answered only the first request of a pipeline, found in this process and not yet reported:
#: kept here in a worker process (`report_serial_hosts`), whose server says it once per host; None: logged
#: where found (the server's own process, a cache build, the benchmark).
_SERIAL_FOUND: list[str] | None = None
_SERIAL_LOCK = threading.Lock()
#: Hosts a worker keeps for its server at most (more are logged by the worker itself).
SERIAL_HOSTS_KEPT = 16


def serial_host_line(host: str) -> str:
    """What is said once of a host (``scheme://host:port``) that answers only the first request of a pipeline."""
    return (f"{host} answered only the first of a pipeline of range requests (it closed the connection): "
            "reading from it one request per connection from now on")


def serial_host_found(host: str) -> None:
    """Say, once per process, that `host` answers one request per connection: kept for this worker's server
    (`report_serial_hosts`), or logged here."""
    with _SERIAL_LOCK:
        if _SERIAL_FOUND is not None and len(_SERIAL_FOUND) < SERIAL_HOSTS_KEPT:
            _SERIAL_FOUND.append(host)
            return
    log.warning("%s", serial_host_line(host))


def report_serial_hosts() -> None:
    """In a worker process: the hosts found to answer one request per connection are kept for
    `serial_hosts_found`, which the worker sends to its server with its next answer (so every worker of a
    server finding the same host gives one line, the server's), instead of logged by each worker."""
    global _SERIAL_FOUND
    with _SERIAL_LOCK:
        _SERIAL_FOUND = []


def serial_hosts_found() -> list[str]:
    """The hosts kept since the last call (`report_serial_hosts`), at most SERIAL_HOSTS_KEPT."""
    with _SERIAL_LOCK:
        if not _SERIAL_FOUND:
            return []
        found = _SERIAL_FOUND[:]
        _SERIAL_FOUND.clear()
        return found


def _status_failure(status: int, head: dict[str, str], body: bytes) -> _Failure:
    code = ""
    m = re.search(rb"<Code>([^<]{1,64})</Code>", body[:4096])
    if m:
        code = m.group(1).decode("ascii", "replace")
    reason = http.client.responses.get(status, "")
    text = f"{code or reason}".strip()
    if status == 412:
        text = "the object changed since it was indexed (its ETag no longer matches): restart the server to index " \
               "it again"
    return _Failure(status, text, status in _RETRY_STATUS or status >= 500)


def _proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    """The proxy a request to `parts` goes through, as botocore chooses it for the listings (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``NO_PROXY``, in either case); ConfigError for one this reader cannot use."""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    host = parts.hostname or ""
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    found = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if found.scheme != "http" or not found.hostname:
        raise ConfigError(f"{parts.scheme.upper()}_PROXY is {redact(proxy)!r}: objects are read through an "
                          "http:// proxy only (https through its CONNECT tunnel); set HTTPS_PROXY=http://host:port, "
                          f"or add {host} to NO_PROXY")
    return found


def reads_remote(dataset: object) -> bool:
    """Whether a data set (or the data set a subset is taken from) reads objects from a store."""
    while hasattr(dataset, "parent"):
        dataset = dataset.parent
    return getattr(dataset, "remote", None) is not None or isinstance(getattr(dataset, "storage", None), RemoteStorage)


def _scope(url: str) -> str:
    """What one re-check covers: an S3 object's folder (one listing), or the object itself (a HEAD)."""
    return url.rsplit("/", 1)[0] + "/" if url.startswith("s3://") else url


def storage_of(options: DataOptions | None = None) -> RemoteStorage:
    """The process's storage for s3:// and http(s):// data under these settings (``--remote-*``; None: their
    defaults). The one place where a data set's objects get their storage: every path that lists or reads
    objects (the kind's detection, list files, class folders, shards and tables) takes it from here."""
    if options is None:
        from ..options import DataOptions

        options = DataOptions(data="")
    return remote_storage(RetryPolicy(attempts=options.remote_attempts, timeout_s=options.remote_timeout_s),
                          int(options.remote_inflight_mb * (1 << 20)), options.remote_recheck_s)


_STORAGES: dict[tuple[Any, ...], RemoteStorage] = {}


def remote_storage(policy: RetryPolicy | None = None, inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
                   recheck_s: float = 60.0) -> RemoteStorage:
    """The process's storage for these settings (one per setting combination, shared by the data sets)."""
    key = (policy or RetryPolicy(), inflight_bytes, recheck_s)
    storage = _STORAGES.get(key)
    if storage is None:
        storage = _STORAGES[key] = RemoteStorage(*key)
    return storage
