"""The ledger: a replicated map of signed, sealed entries, one owner per key.

Each entry is keyed by (owner peer id, key) and signed by the owner's Ed25519 key, so nobody
can write or overwrite another peer's entries. Messages travel sealed with the swarm's ledger
key. A newer `seq` replaces an older one; equal or lower sequence numbers are replays. Entries
carry a time to live: owners re-publish (heartbeat) well within it, so an entry whose owner
stopped goes offline after its ttl and is dropped after `DROP_AFTER_S`.

Each owner has a quota (`MAX_OWNER_ENTRIES` entries, `MAX_OWNER_BYTES` bytes) and the replica
holds at most `MAX_OWNERS` owners: an entry beyond them is refused, so one member flooding the
ledger cannot crowd out the others, and a sync digest (one line per owner) stays bounded. The
sequence numbers remembered against replays are forgotten once no replay could be accepted.

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
MAX_OWNER_CHARS = 64  # an Ed25519 peer id has 52
# An honest node publishes four keys (node, models, worker, federated) of well under 40 KiB.
MAX_OWNER_ENTRIES = 32
MAX_OWNER_BYTES = 128 * 1024
MAX_OWNERS = 4096
# A slot's seq is kept this long after its newest entry was issued, then forgotten: by then
# every entry with a seq as low is refused as expired anyway (its issued_at is no later).
FORGET_SEQ_AFTER_S = MAX_TTL_S + 2 * MAX_CLOCK_SKEW_S


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
    if not 0 < len(entry.owner) <= MAX_OWNER_CHARS:
        raise Rejected("entry owner is empty or too long")
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
    size: int = 0  # bytes of the signed entry, counted against its owner's quota

    @property
    def entry(self) -> Entry:
        return self.signed.entry


@dataclass(frozen=True)
class Seen:
    """The highest seq accepted in a slot, and when that entry was issued."""

    seq: int
    issued_at: float


@dataclass(frozen=True)
class Usage:
    """What one owner takes in the replica: slots remembered (held, or dropped but with
    their seq still kept) and bytes of the entries held."""

    slots: int = 0
    bytes: int = 0


def within_quota(use: Usage, new_slot: bool, freed: int, size: int) -> bool:
    """Whether an owner using `use` may store an entry of `size` bytes in a slot it has no
    seq for yet (`new_slot`), or in place of an entry of `freed` bytes (0: none held)."""
    slots = use.slots + (1 if new_slot else 0)
    return slots <= MAX_OWNER_ENTRIES and use.bytes - freed + size <= MAX_OWNER_BYTES


def forgettable(seen: Seen, now: float) -> bool:
    """Whether a dropped slot's seq can be forgotten: no replay of it would be accepted."""
    return now - seen.issued_at > FORGET_SEQ_AFTER_S


@dataclass
class Ledger:
    """The local replica. `apply` decides; it never raises for a well-formed SignedEntry."""

    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    # Highest seq accepted per key, kept after a record is dropped (until `forgettable`) so
    # that an old message replayed later cannot bring it back.
    seen: dict[tuple[str, str], Seen] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)

    def apply(self, signed: SignedEntry, now: float) -> str:
        """Returns "accepted", or why not: "duplicate", "replay", "future", "expired",
        "quota" (over the owner's quota) or "full" (a new owner, with MAX_OWNERS held)."""
        entry = signed.entry
        slot = (entry.owner, entry.key)
        seen = self.seen.get(slot)
        high = seen.seq if seen is not None else 0
        if entry.seq == high:
            return "duplicate"
        if entry.seq < high:
            return "replay"
        if entry.issued_at > now + MAX_CLOCK_SKEW_S:
            return "future"
        if entry.issued_at + entry.ttl_s + MAX_CLOCK_SKEW_S < now:
            return "expired"
        use = self.usage.get(entry.owner)
        if use is None and len(self.usage) >= MAX_OWNERS:
            return "full"
        use = use or Usage()
        old = self.records.get(slot)
        freed = old.size if old is not None else 0
        size = len(signed.to_bytes())
        if not within_quota(use, seen is None, freed, size):
            return "quota"
        self.seen[slot] = Seen(entry.seq, entry.issued_at)
        self.records[slot] = Record(signed, now, expiry(entry, now), size)
        self.usage[entry.owner] = Usage(use.slots + (1 if seen is None else 0),
                                        use.bytes - freed + size)
        return "accepted"

    def drop_old(self, now: float) -> list[tuple[str, str]]:
        """Drop entries long offline, and forget the seqs no replay could use any more."""
        gone = [slot for slot, r in self.records.items() if now - r.expires_at > DROP_AFTER_S]
        for slot in gone:
            size = self.records.pop(slot).size
            use = self.usage[slot[0]]
            self.usage[slot[0]] = Usage(use.slots, use.bytes - size)
        forget = [slot for slot, s in self.seen.items()
                  if slot not in self.records and forgettable(s, now)]
        for slot in forget:
            del self.seen[slot]
            use = self.usage[slot[0]]
            if use.slots > 1:
                self.usage[slot[0]] = Usage(use.slots - 1, use.bytes)
            else:
                del self.usage[slot[0]]
        return gone

    def entries(self) -> list[SignedEntry]:
        return [r.signed for r in self.records.values()]

    def get(self, owner: str, key: str) -> Record | None:
        return self.records.get((owner, key))

    def by_key(self, key: str) -> list[Record]:
        return [r for (_, k), r in self.records.items() if k == key]

    def by_owner(self) -> dict[str, list[Record]]:
        """Every owner's records, each owner's sorted by key."""
        out: dict[str, list[Record]] = {}
        for slot in sorted(self.records):
            out.setdefault(slot[0], []).append(self.records[slot])
        return out


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
