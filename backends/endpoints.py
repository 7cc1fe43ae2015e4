"""Network endpoints written "HOST:PORT": the one parser, and the one loopback test.

IPv6 hosts go in brackets ("[::1]:5000"), as in URLs; the brackets are not part of the host
this returns. A host with a colon outside brackets is refused: "::1:5000" could mean either.
"""

from __future__ import annotations

import ipaddress


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
