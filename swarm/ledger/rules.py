"""The ledger: a replicated map of signed, sealed entries, one owner per key.

Each entry is keyed by (owner peer id, key) and signed by the owner's Ed25519 key, so nobody
can write or overwrite another peer's entries. Messages travel sealed with the swarm's ledger
key. A newer `seq` replaces an older one; equal or lower sequence numbers are replays. Entries
carry a time to live: owners re-publish (heartbeat) well within it, so an entry whose owner
stopped goes offline after its ttl and is dropped after `DROP_AFTER_S`.

Everything here is pure: callers pass `now` (wall-clock seconds) and move the bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from swarm.trust.seal import SealError, seal, unseal

ENTRY_VERSION = 1
SEAL_CONTEXT = "covey-ledger-v1"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_VALUE_BYTES = 16 * 1024
MAX_KEY_CHARS = 64
MAX_TTL_S = 3600.0
MAX_CLOCK_SKEW_S = 120.0
DROP_AFTER_S = 300.0


class Rejected(ValueError):
    """A ledger message that must not be applied; the message says why (for debug logs)."""


@dataclass(frozen=True)
class Entry:
    owner: str
    key: str
    seq: int
    issued_at: float
    ttl_s: float
    value: dict[str, Any]
    version: int = ENTRY_VERSION

    def __post_init__(self) -> None:
        # 0 and 0.0 serialise differently; the signature must not depend on which was passed.
        object.__setattr__(self, "issued_at", float(self.issued_at))
        object.__setattr__(self, "ttl_s", float(self.ttl_s))

    def signing_bytes(self) -> bytes:
        return b"covey-ledger-entry-v1\n" + _canonical(asdict(self))


@dataclass(frozen=True)
class SignedEntry:
    entry: Entry
    signature: bytes

    def to_bytes(self) -> bytes:
        body = {"entry": asdict(self.entry), "sig": base64.b64encode(self.signature).decode()}
        return _canonical(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedEntry:
        try:
            body = json.loads(data)
            raw = body["entry"]
            entry = Entry(
                owner=_typed(raw["owner"], str),
                key=_typed(raw["key"], str),
                seq=_typed(raw["seq"], int),
                issued_at=float(_typed(raw["issued_at"], (int, float))),
                ttl_s=float(_typed(raw["ttl_s"], (int, float))),
                value=_typed(raw["value"], dict),
                version=_typed(raw["version"], int),
            )
            signature = base64.b64decode(_typed(body["sig"], str), validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise Rejected(f"malformed entry: {exc}") from None
        if set(raw) != set(asdict(entry)) or set(body) != {"entry", "sig"}:
            raise Rejected("entry has unknown or missing fields")
        return cls(entry, signature)


def sign_entry(entry: Entry, sign: Callable[[bytes], bytes]) -> SignedEntry:
    return SignedEntry(entry, sign(entry.signing_bytes()))


def seal_entry(ledger_key: bytes, signed: SignedEntry) -> bytes:
    return seal(ledger_key, signed.to_bytes(), SEAL_CONTEXT)


def open_entry(ledger_key: bytes, message: bytes) -> SignedEntry:
    """Unseal, parse and check a message's shape and signature; raises Rejected."""
    # Deferred: checking a signature needs libp2p's peer ids, and the pure readers of the
    # ledger (peer_view, the API's views) must load without libp2p.
    from swarm.trust.identity import verify

    if len(message) > MAX_MESSAGE_BYTES:
        raise Rejected(f"message of {len(message)} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        plain = unseal(ledger_key, message, SEAL_CONTEXT)
    except SealError as exc:
        raise Rejected(str(exc)) from None
    signed = SignedEntry.from_bytes(plain)
    check_shape(signed.entry)
    if not verify(signed.entry.owner, signed.entry.signing_bytes(), signed.signature):
        raise Rejected("signature does not match the owner's key")
    return signed


def check_shape(entry: Entry) -> None:
    if entry.version != ENTRY_VERSION:
        raise Rejected(f"entry version {entry.version} is not {ENTRY_VERSION}")
    if not 0 < len(entry.key) <= MAX_KEY_CHARS:
        raise Rejected("entry key is empty or too long")
    if entry.seq <= 0:
        raise Rejected("sequence number must be positive")
    if not 0 <= entry.ttl_s <= MAX_TTL_S:
        raise Rejected(f"ttl {entry.ttl_s} outside 0..{MAX_TTL_S}")
    if len(_canonical(entry.value)) > MAX_VALUE_BYTES:
        raise Rejected("entry value is too large")


@dataclass
class Record:
    signed: SignedEntry
    received_at: float
    expires_at: float

    @property
    def entry(self) -> Entry:
        return self.signed.entry


@dataclass
class Ledger:
    """The local replica. `apply` decides; it never raises for a well-formed SignedEntry."""

    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    # Highest seq ever accepted per key, kept after a record is dropped so that an old
    # message replayed later cannot bring it back.
    high_seq: dict[tuple[str, str], int] = field(default_factory=dict)

    def apply(self, signed: SignedEntry, now: float) -> str:
        """Returns "accepted", or why not: "duplicate", "replay", "future" or "expired"."""
        entry = signed.entry
        slot = (entry.owner, entry.key)
        high = self.high_seq.get(slot, 0)
        if entry.seq == high:
            return "duplicate"
        if entry.seq < high:
            return "replay"
        if entry.issued_at > now + MAX_CLOCK_SKEW_S:
            return "future"
        if entry.issued_at + entry.ttl_s + MAX_CLOCK_SKEW_S < now:
            return "expired"
        self.high_seq[slot] = entry.seq
        self.records[slot] = Record(signed, now, expiry(entry, now))
        return "accepted"

    def drop_old(self, now: float) -> list[tuple[str, str]]:
        gone = [slot for slot, r in self.records.items() if now - r.expires_at > DROP_AFTER_S]
        for slot in gone:
            del self.records[slot]
        return gone

    def entries(self) -> list[SignedEntry]:
        return [r.signed for r in self.records.values()]

    def get(self, owner: str, key: str) -> Record | None:
        return self.records.get((owner, key))

    def by_key(self, key: str) -> list[Record]:
        return [r for (_, k), r in self.records.items() if k == key]


def expiry(entry: Entry, now: float) -> float:
    """When an entry received now stops counting as live.

    Counted from our own clock so that modest clock differences between machines do not
    matter, less the entry's age by the owner's clock (at most half its ttl): an entry that
    reached us late through a sync must not look fresher than it is.
    """
    age = min(max(now - entry.issued_at, 0.0), entry.ttl_s / 2)
    return now + entry.ttl_s - age


def is_live(record: Record, now: float) -> bool:
    return now < record.expires_at


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"expected {kind}, got {type(value).__name__}")
    return value
