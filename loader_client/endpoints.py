"""Endpoints: validated at once, and a plain-words cause when nothing answers at one.

A client endpoint is ``tcp://HOST:PORT`` (HOST a name, an IPv4 address or ``[IPv6]``, PORT
1..65535) or ``ipc://PATH``. Anything else raises `EndpointError` with a correct example,
before a socket exists. When a server does not answer within the client's timeout,
`why_silent` probes the endpoint with a plain socket (no ZeroMQ) to name the real cause: no
socket file, a host name that does not resolve, nothing listening on the port, or a server
that accepted the connection but did not answer.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Any

from .contract.endpoint_text import missing_scheme_hint
from .contract.errors import EndpointError

__all__ = ["Endpoint", "parse_endpoint", "same_host", "tcp_listener_uids", "why_silent"]

_EXAMPLE = "for example tcp://127.0.0.1:5555, tcp://loader-host:5555 or ipc:///tmp/loader.sock"
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_MAX_IPC_PATH = 4096
_PROBE_S = 2.0


@dataclass(frozen=True)
class Endpoint:
    """A checked endpoint: ``scheme`` tcp (with `host`, `port`) or ipc (with `path`)."""

    text: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return self.text

    @property
    def same_host(self) -> bool:
        """ipc:// and loopback tcp:// endpoints are on this host."""
        if self.scheme == "ipc":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_endpoint(text: object) -> Endpoint:
    """Check `text` and split it; raise `EndpointError` showing a correct example otherwise."""
    if not isinstance(text, str):
        raise EndpointError(f"an endpoint is a string such as tcp://127.0.0.1:5555, got {type(text).__name__}")
    shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
    if not text.isprintable():
        raise EndpointError(f"endpoint {shown} holds control characters; {_EXAMPLE}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise EndpointError(f"endpoint {shown} has no scheme{missing_scheme_hint(text)}: use tcp://HOST:PORT or "
                            f"ipc://PATH, {_EXAMPLE}")
    if scheme == "ipc":
        if not rest or len(rest) > _MAX_IPC_PATH:
            raise EndpointError(f"endpoint {shown} names no socket path: use ipc://PATH, for example ipc:///tmp/loader.sock")
        return Endpoint(text, "ipc", path=rest)
    if scheme != "tcp":
        raise EndpointError(f"endpoint {shown} uses scheme {scheme!r}, which a loader server does not speak: "
                            f"use tcp://HOST:PORT or ipc://PATH, {_EXAMPLE}")
    host, colon, port_text = rest.rpartition(":")
    if not colon or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EndpointError(f"endpoint {shown} needs a port between 1 and 65535: tcp://HOST:PORT, {_EXAMPLE}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise EndpointError(f"endpoint {shown}: {host} is not an IPv6 address; {_EXAMPLE}") from None
        host = host[1:-1]
    elif not _HOST_NAME.match(host):
        what = "no host" if not host else f"host {host!r} is not a host name or an address"
        raise EndpointError(f"endpoint {shown} has {what}; {_EXAMPLE}")
    return Endpoint(text, "tcp", host=host, port=int(port_text))


def tcp_listener_uids(endpoint: Endpoint) -> set[int]:
    """The uids owning a socket that listens where a connection to loopback `endpoint` lands: its address
    (127.0.0.1 and ::1 for ``localhost``) or its family's wildcard, on its port (from /proc/net/tcp and
    tcp6 of this network namespace, where loopback is). Empty when none listens (yet) or /proc says nothing."""
    if endpoint.host == "localhost":
        wanted = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    else:
        try:
            wanted = {ipaddress.ip_address(endpoint.host)}
        except ValueError:
            return set()
    wanted |= {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
    uids: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, port = fields[1].partition(":")
            try:
                if int(port, 16) != endpoint.port:
                    continue
                raw = bytes.fromhex(address)  # 32-bit words in the host's byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                if ip in wanted:
                    uids.add(int(fields[7]))
            except ValueError:
                continue
    return uids


def same_host(text: str) -> bool:
    """True for ipc:// and loopback tcp:// endpoints (False for anything unparsable)."""
    try:
        return parse_endpoint(text).same_host
    except EndpointError:
        return False


def why_silent(endpoint: Endpoint, timeout_s: float) -> str:
    """The cause, in words, of no answer from `endpoint` within `timeout_s` (probes it once)."""
    start = f"start it with `loader-server serve --data PATH --bind {endpoint}`"
    if endpoint.scheme == "ipc":
        path = endpoint.path
        if path.startswith("@"):  # abstract namespace: nothing on disk to look at
            return _probe(socket.AF_UNIX, "\0" + path[1:], endpoint, timeout_s, start)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return f"there is no socket file at {path}: no server is running there; {start}"
        except OSError as exc:
            return f"the socket file {path} cannot be reached ({exc.strerror}); check the folder's permissions"
        if not stat.S_ISSOCK(mode):
            return f"{path} is not a socket file; check the path, or {start}"
        return _probe(socket.AF_UNIX, path, endpoint, timeout_s, start)
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"the host name {endpoint.host!r} does not resolve ({exc.strerror}); check the name in {endpoint}"
    family, _, _, _, address = infos[0]
    return _probe(family, address, endpoint, timeout_s, start)


def _probe(family: int, address: Any, endpoint: Endpoint, timeout_s: float, start: str) -> str:
    where = endpoint.path if endpoint.scheme == "ipc" else f"port {endpoint.port} of {endpoint.host}"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(_PROBE_S)
        try:
            s.connect(address)
        except ConnectionRefusedError:
            if endpoint.scheme == "ipc":
                return f"nothing listens on the socket file {where} (a server that stopped left it behind); {start}"
            return f"nothing listens on {where} (connection refused); {start}"
        except PermissionError:
            return f"this user may not connect to {where} (permission denied): run the trainer as the server's user"
        except TimeoutError:
            return f"{where} did not accept a connection within {_PROBE_S:g} s: a firewall or a host that is down"
        except OSError as exc:
            return f"{where} cannot be reached ({exc.strerror or exc})"
    waited = round(timeout_s, 1)  # the time waited so far: 2.0021 s reads as 2 s
    return (f"a server accepted the connection on {where} but did not answer within {waited:g} s: it may be "
            "busy starting, stuck, not a loader server, or expecting CURVE keys; raise timeout_s if it is slow "
            "to start")
