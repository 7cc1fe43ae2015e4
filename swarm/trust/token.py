"""The swarm token: the one string a user pastes to join a swarm.

Format: ``covey1`` followed by lowercase base32 (no padding) of::

    u16 body length | body | first 4 bytes of sha256(body)
    body = u8 len | network id | u8 len | secret | u8 count | (u16 len | utf-8 multiaddr)*

The body length and checksum let a parse tell a truncated token from a mistyped one. Every key
the swarm uses is derived from the token (see `swarm.trust.keys`); nothing else is secret.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import struct
from dataclasses import dataclass

PREFIX = "covey"
VERSION = 1
NETWORK_ID_BYTES = 16
SECRET_BYTES = 32
MAX_BOOTSTRAP = 16
_CHECKSUM_BYTES = 4
_B32_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")


class TokenError(ValueError):
    """A token that cannot be used; the message says what is wrong in words a user follows."""


@dataclass(frozen=True)
class SwarmToken:
    network_id: bytes
    secret: bytes
    bootstrap: tuple[str, ...] = ()

    def encode(self) -> str:
        body = bytearray()
        body += bytes([len(self.network_id)]) + self.network_id
        body += bytes([len(self.secret)]) + self.secret
        body += bytes([len(self.bootstrap)])
        for addr in self.bootstrap:
            raw = addr.encode()
            body += struct.pack(">H", len(raw)) + raw
        framed = struct.pack(">H", len(body)) + bytes(body) + _checksum(bytes(body))
        text = base64.b32encode(framed).decode().rstrip("=").lower()
        return f"{PREFIX}{VERSION}{text}"


def new_token(bootstrap: tuple[str, ...] | list[str] = ()) -> SwarmToken:
    """A fresh swarm: random network id and secret, optional bootstrap addresses."""
    addrs = tuple(bootstrap)
    for i, addr in enumerate(addrs, 1):
        check_bootstrap_address(addr, i)
    if len(addrs) > MAX_BOOTSTRAP:
        raise TokenError(f"At most {MAX_BOOTSTRAP} bootstrap addresses fit in a token.")
    return SwarmToken(
        secrets.token_bytes(NETWORK_ID_BYTES), secrets.token_bytes(SECRET_BYTES), addrs
    )


def parse_token(text: str) -> SwarmToken:
    """Parse a pasted token; whitespace and line breaks inside it are ignored."""
    compact = re.sub(r"\s+", "", text).lower()
    if not compact:
        raise TokenError("The token is empty. Paste the whole line that `covey token new` printed.")
    if not compact.startswith(PREFIX):
        raise TokenError(
            f"This is not a Covey swarm token: a token starts with '{PREFIX}{VERSION}'."
        )
    digit = compact[len(PREFIX) : len(PREFIX) + 1]
    if digit != str(VERSION):
        shown = digit if digit.isdigit() else "none"
        raise TokenError(
            f"This token is in format version {shown}; this Covey reads version {VERSION}. "
            "Use the same Covey version on every machine."
        )
    payload = compact[len(PREFIX) + 1 :]
    framed = _decode_base32(payload)
    return _parse_framed(framed)


def _decode_base32(payload: str) -> bytes:
    if not payload:
        raise TokenError("The token is truncated: only its prefix is there. Copy the whole line.")
    for pos, ch in enumerate(payload):
        if ch not in _B32_ALPHABET:
            raise TokenError(
                f"The token has a character that cannot be in a token ({ch!r} at position "
                f"{pos + len(PREFIX) + 2}). Copy it again rather than typing it."
            )
    if len(payload) * 5 % 8 >= 5:
        raise TokenError(
            "The token's length is wrong: it was cut short or has a stray character at its end. "
            "Copy the whole line again."
        )
    padded = payload.upper() + "=" * (-len(payload) % 8)
    try:
        return base64.b32decode(padded)
    except ValueError:
        raise TokenError("The token is truncated: it ends part-way through.") from None


def _parse_framed(framed: bytes) -> SwarmToken:
    if len(framed) < 2:
        raise TokenError("The token is truncated. Copy the whole line.")
    (body_len,) = struct.unpack(">H", framed[:2])
    expected = 2 + body_len + _CHECKSUM_BYTES
    if len(framed) < expected:
        raise TokenError(
            f"The token is truncated: {expected - len(framed)} of its {expected} bytes are "
            "missing. Copy the whole line."
        )
    if len(framed) > expected:
        raise TokenError("The token has extra characters at its end. Copy exactly one token.")
    body = framed[2 : 2 + body_len]
    if framed[2 + body_len :] != _checksum(body):
        raise TokenError("The token is damaged: a character was changed. Copy it again.")
    return _parse_body(body)


def _parse_body(body: bytes) -> SwarmToken:
    reader = _Reader(body)
    network_id = reader.sized(1, "network id")
    if len(network_id) != NETWORK_ID_BYTES:
        raise TokenError(
            f"The token's network id is {len(network_id)} bytes; it must be {NETWORK_ID_BYTES}."
        )
    secret = reader.sized(1, "secret")
    if len(secret) != SECRET_BYTES:
        raise TokenError(f"The token's secret is {len(secret)} bytes; it must be {SECRET_BYTES}.")
    count = reader.byte("bootstrap count")
    if count > MAX_BOOTSTRAP:
        raise TokenError(f"The token lists {count} bootstrap addresses; at most {MAX_BOOTSTRAP}.")
    addrs = []
    for i in range(1, count + 1):
        raw = reader.sized(2, f"bootstrap address {i}")
        try:
            addr = raw.decode()
        except UnicodeDecodeError:
            raise TokenError(f"Bootstrap address {i} in the token is not text.") from None
        check_bootstrap_address(addr, i)
        addrs.append(addr)
    if reader.remaining():
        raise TokenError("The token has unexpected bytes after its bootstrap addresses.")
    return SwarmToken(network_id, secret, tuple(addrs))


def check_bootstrap_address(addr: str, index: int = 1) -> None:
    """A bootstrap address must be a TCP multiaddr ending in the node's /p2p/ peer id."""
    import multiaddr  # the one place the token touches libp2p's address parser

    where = f"Bootstrap address {index} ({addr!r})"
    try:
        parsed = multiaddr.Multiaddr(addr)
        names = [p.name for p in parsed.protocols()]
    except Exception as exc:  # noqa: BLE001 - the parser raises many types
        raise TokenError(f"{where} is not a multiaddr: {exc}") from None
    if not names or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise TokenError(f"{where} must start with /ip4/, /ip6/ or /dns4/.")
    if "tcp" not in names:
        raise TokenError(f"{where} needs a /tcp/PORT part.")
    if names[-1] != "p2p":
        raise TokenError(f"{where} must end with /p2p/<peer id> of the bootstrap node.")
    if "ip4" in names and parsed.value_for_protocol("ip4") == "0.0.0.0":
        raise TokenError(f"{where} uses 0.0.0.0, which no machine can dial.")


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:_CHECKSUM_BYTES]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self, what: str) -> int:
        return self._take(1, what)[0]

    def sized(self, width: int, what: str) -> bytes:
        (length,) = struct.unpack(">B" if width == 1 else ">H", self._take(width, what))
        return self._take(length, what)

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int, what: str) -> bytes:
        if self._pos + n > len(self._data):
            raise TokenError(f"The token's {what} is cut short: its lengths do not add up.")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk
