"""Who may reach the API from where: browser origins (CORS) and the Host names a listener
answers to.

CORS is opt-in (`covey node --cors-origin ORIGIN`, repeatable): only an origin on the list gets
Access-Control-Allow-* headers, and only its preflight (OPTIONS with
Access-Control-Request-Method) is answered without the API key, since a browser sends none
there. Any other origin gets no CORS header at all, so the browser keeps the page from reading
anything. The Host allow-list guards against DNS rebinding: a listener answers only to the
names of its own addresses and the ones the user added (`--api-host`, e.g.
host.docker.internal). All pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_METHODS = "GET, POST, OPTIONS"
# Headers a browser client may read: the reply's notes beyond the body.
EXPOSED_HEADERS = "x-covey-max-tokens-lowered, retry-after"
PREFLIGHT_MAX_AGE_S = 600
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP header name
_HOST_NAME = re.compile(r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:.]+\]$|^[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*$")


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]` in lower case, as a browser sends it; ValueError otherwise."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ValueError(f"{origin!r} is not an origin like http://localhost:3000")
    host = parts.netloc.lower()
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    return f"{parts.scheme}://{host.removesuffix(default)}"


def check_host_name(name: str) -> str:
    """A bare host name or address for `--api-host`; ValueError otherwise."""
    if not name or not _HOST_NAME.match(name):
        raise ValueError(f"--api-host {name!r}: give a host name such as host.docker.internal")
    return name.lower()


def host_values(names: Iterable[str], port: int) -> frozenset[str]:
    """The Host header values that name one of `names` on `port` (IPv6 in brackets; with no
    port when it is HTTP's default)."""
    out = set()
    for name in names:
        host = f"[{name}]" if ":" in name and not name.startswith("[") else name
        out.add(f"{host.lower()}:{port}")
        if port == 80:
            out.add(host.lower())
    return frozenset(out)


@dataclass(frozen=True)
class CorsPolicy:
    """The browser origins allowed to call the API (normalized; empty: none)."""

    origins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, origins: Iterable[str]) -> CorsPolicy:
        return cls(frozenset(normalize_origin(o) for o in origins))

    def allows(self, origin: str | None) -> bool:
        if not origin or not self.origins:
            return False
        try:
            return normalize_origin(origin) in self.origins
        except ValueError:
            return False

    def is_preflight(self, method: str, headers: Mapping[str, str]) -> bool:
        """A browser's preflight, to be answered here; without a list, none is (the request
        goes through the gate like any other: 401 without the key)."""
        return bool(self.origins) and method == "OPTIONS" and "origin" in headers \
            and "access-control-request-method" in headers

    def preflight_headers(self, headers: Mapping[str, str]) -> dict[str, str] | None:
        """The answer's headers to an allowed origin's preflight; None to refuse it."""
        origin = headers.get("origin")
        if not self.allows(origin):
            return None
        assert origin is not None
        asked = [h.strip().lower() for h in
                 headers.get("access-control-request-headers", "").split(",") if h.strip()]
        if not all(_TOKEN.match(h) for h in asked):
            return None
        out = {**self._common(origin), "access-control-allow-methods": ALLOWED_METHODS,
               "access-control-max-age": str(PREFLIGHT_MAX_AGE_S)}
        if asked:
            out["access-control-allow-headers"] = ", ".join(asked)
        return out

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """What an actual response carries for `origin`: nothing unless it is allowed."""
        if not self.allows(origin):
            return {"vary": "Origin"} if self.origins else {}
        assert origin is not None
        return {**self._common(origin), "access-control-expose-headers": EXPOSED_HEADERS}

    @staticmethod
    def _common(origin: str) -> dict[str, str]:
        return {"access-control-allow-origin": origin, "vary": "Origin"}
