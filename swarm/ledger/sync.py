"""Keeps this node's ledger replica current: publishes its own entries, spreads them by gossip,
and pulls what it lacks from peers (on every admission and every `sync_every_s`).

Gossip alone is not enough with py-libp2p 0.8.1: it drops above a rate limit and overflows
32-message queues in a burst, silently. The pull sync (anti-entropy) makes every replica
converge anyway: the requester sends a digest of what it has; the responder streams back
what the requester lacks, each entry sealed and signed exactly as on the gossip topic.

Version 2 (`SYNC_PROTOCOL_V2`) digests one fingerprint per owner, so with the ledger's owner
cap the digest cannot outgrow its frame however many entries there are; the responder sends
every entry of each owner whose fingerprint differs, then an empty frame to say it is done, so
a sync cut short is seen as a failure. Version 1 (one line per entry) is still served, and
used towards peers that speak only it. A failed pull is logged as a warning (once while a
peer keeps failing) and shown in /api/status (`SyncHealth`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub

from swarm.ledger.rules import (
    MAX_MESSAGE_BYTES,
    MAX_OWNER_CHARS,
    MAX_OWNERS,
    Entry,
    Ledger,
    Record,
    Rejected,
    SignedEntry,
    open_entry,
    seal_entry,
    sign_entry,
)
from swarm.net.host import parse_versioned, read_frame, reset_quietly, write_frame, write_json_frame
from swarm.net.members_only import Admissions, AdmittedPubsub
from swarm.trust.identity import Identity

log = logging.getLogger(__name__)

SYNC_PROTOCOL = "/covey/ledger-sync/1.0.0"
SYNC_PROTOCOL_V2 = "/covey/ledger-sync/2.0.0"
PUSH_PROTOCOL = "/covey/ledger-push/1.0.0"
MAX_PUSH_ENTRIES = 16
PUSH_ACK_TIMEOUT_S = 2.0
SYNC_VERSION = 1
SYNC_VERSION_V2 = 2
SYNC_TIMEOUT_S = 15.0
MAX_SYNC_ENTRIES = 10_000
MAX_DIGEST_BYTES = 1024 * 1024
FINGERPRINT_CHARS = 16
# A version 2 request at its largest: MAX_OWNERS lines of `"owner": "fingerprint", `.
DIGEST_BOUND = 64 + MAX_OWNERS * (MAX_OWNER_CHARS + FINGERPRINT_CHARS + 8)
assert DIGEST_BOUND <= MAX_DIGEST_BYTES, "the owner cap lets a sync digest outgrow its frame"
DONE = b""  # the empty frame that ends a version 2 reply
WARN_AGAIN_S = 600.0  # a peer that keeps failing, or an owner over quota, is warned of again


def make_gossip(host: IHost, admissions: Admissions) -> tuple[Pubsub, GossipSub]:
    router = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        # Peers are admitted members, often on one LAN or one machine: the defaults' limit of
        # 10 messages a second and its demand for 3 distinct IPs in a mesh only lose updates.
        max_messages_per_topic_per_second=100.0,
        eclipse_protection_enabled=False,
    )
    return AdmittedPubsub(host, router, admissions), router


def digest(ledger: Ledger) -> dict[str, int]:
    """A version 1 digest: one line per entry (unbounded; kept for version 1 peers)."""
    return {f"{owner} {key}": r.entry.seq for (owner, key), r in ledger.records.items()}


def newer_than(ledger: Ledger, have: dict[str, int]) -> list[SignedEntry]:
    """The entries a peer with the version 1 digest `have` lacks (pure)."""
    return [
        r.signed for (owner, key), r in ledger.records.items()
        if r.entry.seq > have.get(f"{owner} {key}", 0)
    ]


def fingerprint(records: Iterable[Record]) -> str:
    """What one owner's entries in a replica are, in a few characters: equal when both
    replicas hold the same (key, seq) pairs."""
    lines = sorted(f"{r.entry.key} {r.entry.seq}\n" for r in records)
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:FINGERPRINT_CHARS]


def owner_digest(ledger: Ledger) -> dict[str, str]:
    """A version 2 digest: owner -> fingerprint, at most MAX_OWNERS lines."""
    return {owner: fingerprint(records) for owner, records in ledger.by_owner().items()}


def lacking(ledger: Ledger, owners: dict[str, Any]) -> list[SignedEntry]:
    """Every entry of each owner whose fingerprint in the digest `owners` differs (pure).

    Whole owners, not single entries: at most MAX_OWNER_ENTRIES each, and the requester drops
    the ones it already has."""
    return [r.signed for owner, records in ledger.by_owner().items()
            if owners.get(owner) != fingerprint(records) for r in records]


@dataclass
class SyncHealth:
    """How this node's pulls and merges fare: what /api/status shows under "ledger"."""

    last_error: str | None = None
    last_error_peer: str | None = None
    last_error_at: float | None = None
    last_ok_at: float | None = None
    failures: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # verdict -> entries refused
    failing: dict[str, float] = field(default_factory=dict)  # peer -> when last warned

    def failed(self, peer: str, error: str, now: float) -> bool:
        """Note a failed pull; True when it is worth a warning (the peer's first failure, or
        the first in WARN_AGAIN_S), so a peer that keeps failing does not flood the log."""
        self.last_error, self.last_error_peer, self.last_error_at = error, peer, now
        self.failures += 1
        if now - self.failing.get(peer, -WARN_AGAIN_S) < WARN_AGAIN_S:
            return False
        self.failing[peer] = now
        return True

    def succeeded(self, peer: str, now: float) -> bool:
        """Note a pull that worked; True when the peer had been failing."""
        self.last_ok_at = now
        return self.failing.pop(peer, None) is not None

    def to_status(self, ledger: Ledger) -> dict[str, Any]:
        return {"entries": len(ledger.records), "owners": len(ledger.usage),
                "refused_over_quota": self.refused["quota"] + self.refused["full"],
                "sync_failures": self.failures, "last_sync_error": self.last_error,
                "last_sync_error_peer": self.last_error_peer,
                "last_sync_error_at": _rounded(self.last_error_at),
                "last_sync_ok_at": _rounded(self.last_ok_at)}


def _rounded(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


class SyncFailed(Exception):
    """A pull that did not complete; the message says how far it got."""


class LedgerSync:
    def __init__(
        self,
        host: IHost,
        identity: Identity,
        ledger_key: bytes,
        topic: str,
        admissions: Admissions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.identity = identity
        self.ledger = Ledger()
        self._key = ledger_key
        self._topic = topic
        self._admissions = admissions
        self._clock = clock
        self._last_seq = 0
        self.health = SyncHealth()
        self._over_quota: dict[str, float] = {}  # owner -> when last warned of
        self.pubsub, self.router = make_gossip(host, admissions)
        self.changed = trio.Event()

    # -- publishing ------------------------------------------------------------------------

    def next_seq(self) -> int:
        """Milliseconds since the epoch, strictly increasing, so restarts continue upwards."""
        self._last_seq = max(self._last_seq + 1, int(self._clock() * 1000))
        return self._last_seq

    async def publish(self, key: str, value: dict[str, Any], ttl_s: float) -> SignedEntry:
        entry = Entry(self.identity.peer_id.to_base58(), key, self.next_seq(), self._clock(),
                      ttl_s, value)
        signed = sign_entry(entry, self.identity.sign)
        self._apply(signed)
        try:
            await self.pubsub.publish(self._topic, seal_entry(self._key, signed))
        except Exception as exc:  # noqa: BLE001 - peers still get it by pull sync
            log.debug("gossip publish failed: %r", exc)
        return signed

    # -- gossip ------------------------------------------------------------------------------

    async def run_gossip(self) -> None:
        await self.pubsub.wait_until_ready()
        self.pubsub.set_topic_validator(self._topic, self._validate, is_async_validator=True)
        subscription = await self.pubsub.subscribe(self._topic)
        while True:
            message = await subscription.get()
            self._receive(message.data, "gossip")

    async def _validate(self, forwarder: ID, message: Any) -> bool:
        # Async on purpose: an exception in a sync validator stops the whole host.
        if forwarder != self.host.get_id() and not self._admissions.is_admitted(forwarder):
            return False
        try:
            open_entry(self._key, message.data)
        except Rejected:
            return False
        return True

    def _receive(self, message: bytes, via: str) -> str:
        try:
            signed = open_entry(self._key, message)
        except Rejected as exc:
            log.debug("dropped ledger message from %s: %s", via, exc)
            return "rejected"
        return self._apply(signed)

    def _apply(self, signed: SignedEntry) -> str:
        now = self._clock()
        verdict = self.ledger.apply(signed, now)
        if verdict == "accepted":
            self.changed.set()
            self.changed = trio.Event()
        elif verdict in ("quota", "full"):
            self.health.refused[verdict] += 1
            owner = signed.entry.owner
            if now - self._over_quota.get(owner, -WARN_AGAIN_S) >= WARN_AGAIN_S:
                self._over_quota[owner] = now
                log.warning("refusing ledger entries of %s: %s", owner,
                            "over its quota" if verdict == "quota"
                            else f"the ledger already holds {MAX_OWNERS} owners")
        return verdict

    # -- pull sync ------------------------------------------------------------------------

    async def handle_sync(self, stream: INetStream) -> None:
        """Serve a version 1 pull: read the requester's digest, stream back every newer
        entry."""
        with trio.fail_after(SYNC_TIMEOUT_S):
            have = await self._read_request(stream, SYNC_VERSION, "have")
            for signed in newer_than(self.ledger, have)[:MAX_SYNC_ENTRIES]:
                await write_frame(stream, seal_entry(self._key, signed))
        await stream.close()

    async def handle_sync_v2(self, stream: INetStream) -> None:
        """Serve a version 2 pull: every entry of each owner the requester's digest lacks or
        has otherwise, then DONE."""
        with trio.fail_after(SYNC_TIMEOUT_S):
            owners = await self._read_request(stream, SYNC_VERSION_V2, "owners")
            for signed in lacking(self.ledger, owners)[:MAX_SYNC_ENTRIES]:
                await write_frame(stream, seal_entry(self._key, signed))
            await write_frame(stream, DONE)
        await stream.close()

    async def _read_request(self, stream: INetStream, version: int, name: str
                            ) -> dict[str, Any]:
        request = parse_versioned(await read_frame(stream, MAX_DIGEST_BYTES), version,
                                  "sync request")
        digest_ = request.get(name)
        if not isinstance(digest_, dict):
            raise ValueError("sync request without a digest")
        return digest_

    async def pull(self, peer: ID) -> int:
        """Fetch what `peer` has that we lack; returns how many entries were new. Raises
        when the pull fails, after noting it in `health` (and the log).

        Each entry is applied as it arrives, so a peer that stops mid-sync still leaves
        everything it did send.
        """
        try:
            accepted = await self._pull(peer)
        except Exception as exc:
            why = str(exc) or type(exc).__name__
            if self.health.failed(peer.to_base58(), why, self._clock()):
                log.warning("ledger sync with %s failed: %s", peer, why)
            else:
                log.debug("ledger sync with %s failed again: %r", peer, exc)
            raise
        if self.health.succeeded(peer.to_base58(), self._clock()):
            log.info("ledger sync with %s works again", peer)
        return accepted

    async def _pull(self, peer: ID) -> int:
        stream = await self.host.new_stream(
            peer, [TProtocol(SYNC_PROTOCOL_V2), TProtocol(SYNC_PROTOCOL)])
        v2 = stream.get_protocol() == SYNC_PROTOCOL_V2
        accepted = 0
        try:
            with trio.fail_after(SYNC_TIMEOUT_S):
                # Towards a version 1 peer an empty digest: it sends everything it holds (at
                # most MAX_SYNC_ENTRIES), where a full one could outgrow the frame.
                request = ({"version": SYNC_VERSION_V2, "owners": owner_digest(self.ledger)}
                           if v2 else {"version": SYNC_VERSION, "have": {}})
                await write_json_frame(stream, request)
                await stream.close()  # our side is done; theirs ends with DONE, or EOF
                for got in range(MAX_SYNC_ENTRIES + 1):
                    try:
                        message = await read_frame(stream, MAX_MESSAGE_BYTES)
                    except Exception as exc:
                        if not v2:  # EOF (done), reset or garbage: a version 1 pull stops
                            break
                        raise SyncFailed(f"the sync ended after {got} entries, unfinished "
                                         f"({type(exc).__name__})") from exc
                    if v2 and message == DONE:
                        break
                    if self._receive(message, f"sync with {peer}") == "accepted":
                        accepted += 1
                else:
                    if v2:
                        raise SyncFailed(f"the peer sent over {MAX_SYNC_ENTRIES} entries")
        finally:
            await reset_quietly(stream)
        return accepted

    # -- direct push (for what must arrive now, e.g. a goodbye) --------------------------------

    async def push(self, peer: ID, signed: SignedEntry) -> None:
        stream = await self.host.new_stream(peer, [TProtocol(PUSH_PROTOCOL)])
        try:
            await write_frame(stream, seal_entry(self._key, signed))
            await stream.close()
            # Wait for the receiver to close its side, i.e. to have read the entry: Yamux in
            # py-libp2p 0.8.1 drops data still buffered when the connection closes, which a
            # goodbye followed at once by shutdown would otherwise hit.
            with trio.move_on_after(PUSH_ACK_TIMEOUT_S), contextlib.suppress(Exception):
                while await stream.read(1024):
                    pass
        finally:
            await reset_quietly(stream)

    async def handle_push(self, stream: INetStream) -> None:
        with trio.fail_after(SYNC_TIMEOUT_S):
            for _ in range(MAX_PUSH_ENTRIES):
                try:
                    message = await read_frame(stream, MAX_MESSAGE_BYTES)
                except Exception:  # noqa: BLE001 - EOF ends the push; garbage ends it too
                    break
                self._receive(message, f"push from {stream.muxed_conn.peer_id}")

    def status(self) -> dict[str, Any]:
        """What /api/status shows under "ledger"."""
        return self.health.to_status(self.ledger)

    def drop_old(self) -> None:
        now = self._clock()
        self.ledger.drop_old(now)
        self._over_quota = {o: t for o, t in self._over_quota.items()
                            if now - t < WARN_AGAIN_S}
        self.health.failing = {p: t for p, t in self.health.failing.items()
                               if now - t < WARN_AGAIN_S}
