"""Network endpoints written "HOST:PORT": the one parser, and the one loopback test; and the
local RPC endpoints a worker node's relays open, "unix:PATH" or a loopback "HOST:PORT".

IPv6 hosts go in brackets ("[::1]:5000"), as in URLs; the brackets are not part of the host
this returns. A host with a colon outside brackets is refused: "::1:5000" could mean either.
"unix:PATH" is the node's private channel to its RPC server: a Unix socket of mode 0600.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

UNIX_PREFIX = "unix:"


def split_host_port(endpoint: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ValueError for anything else."""
    host, sep, port_text = endpoint.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif any(c in host for c in ":[]"):
        host = ""
    # isdigit() alone admits "²" and other digits int() refuses.
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{endpoint!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{endpoint!r}: the port must be 1 to 65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True for "localhost" and any loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LocalEndpoint:
    """A ggml RPC server on this machine: a Unix socket path, or a loopback (host, port)."""

    family: socket.AddressFamily
    address: str | tuple[str, int]

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return UNIX_PREFIX + self.address
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_endpoint(endpoint: str) -> LocalEndpoint:
    """"unix:/abs/path" or a loopback "HOST:PORT"; ValueError for anything off this machine."""
    if endpoint.startswith(UNIX_PREFIX):
        path = endpoint[len(UNIX_PREFIX):]
        if not path.startswith("/"):
            raise ValueError(f"{endpoint!r}: a Unix socket endpoint takes an absolute path")
        return LocalEndpoint(socket.AF_UNIX, path)
    host, port = split_host_port(endpoint)
    if not is_loopback(host):
        raise ValueError(f"{endpoint}: not a loopback address")
    return LocalEndpoint(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))


def connect_local(endpoint: LocalEndpoint, timeout: float) -> socket.socket:
    """A blocking socket connected to `endpoint` (TCP_NODELAY on TCP: RPC is small requests
    and replies, and Nagle would add a delayed-ACK wait to each); OSError if it is down."""
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(endpoint.address)
        if endpoint.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock
