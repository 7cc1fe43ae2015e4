"""Keeps this node's ledger replica current: publishes its own entries, spreads them by gossip,
and pulls what it lacks from peers (on every admission and every `sync_every_s`).

Gossip alone is not enough with py-libp2p 0.8.1: it drops above a rate limit and overflows
32-message queues in a burst, silently. The pull sync (anti-entropy) makes every replica
converge anyway: the requester sends what it has (owner, key, seq); the responder streams back
every newer entry, each one sealed and signed exactly as on the gossip topic.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub

from swarm.ledger.rules import (
    MAX_MESSAGE_BYTES,
    Entry,
    Ledger,
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
PUSH_PROTOCOL = "/covey/ledger-push/1.0.0"
MAX_PUSH_ENTRIES = 16
PUSH_ACK_TIMEOUT_S = 2.0
SYNC_VERSION = 1
SYNC_TIMEOUT_S = 15.0
MAX_SYNC_ENTRIES = 10_000
MAX_DIGEST_BYTES = 1024 * 1024


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
    return {f"{owner} {key}": r.entry.seq for (owner, key), r in ledger.records.items()}


def newer_than(ledger: Ledger, have: dict[str, int]) -> list[SignedEntry]:
    """The entries a peer with `have` lacks (pure)."""
    return [
        r.signed for (owner, key), r in ledger.records.items()
        if r.entry.seq > have.get(f"{owner} {key}", 0)
    ]


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
        verdict = self.ledger.apply(signed, self._clock())
        if verdict == "accepted":
            self.changed.set()
            self.changed = trio.Event()
        return verdict

    # -- pull sync ------------------------------------------------------------------------

    async def handle_sync(self, stream: INetStream) -> None:
        """Serve a pull: read the requester's digest, stream back every newer entry."""
        with trio.fail_after(SYNC_TIMEOUT_S):
            request = parse_versioned(await read_frame(stream, MAX_DIGEST_BYTES), SYNC_VERSION,
                                      "sync request")
            have = request.get("have")
            if not isinstance(have, dict):
                raise ValueError("sync request without a digest")
            for signed in newer_than(self.ledger, have)[:MAX_SYNC_ENTRIES]:
                await write_frame(stream, seal_entry(self._key, signed))
        await stream.close()

    async def pull(self, peer: ID) -> int:
        """Fetch what `peer` has that we lack; returns how many entries were new.

        Each entry is applied as it arrives, so a peer that stops mid-sync still leaves
        everything it did send.
        """
        stream = await self.host.new_stream(peer, [TProtocol(SYNC_PROTOCOL)])
        accepted = 0
        try:
            with trio.fail_after(SYNC_TIMEOUT_S):
                request = {"version": SYNC_VERSION, "have": digest(self.ledger)}
                await write_json_frame(stream, request)
                await stream.close()  # our side is done; theirs ends with EOF
                for _ in range(MAX_SYNC_ENTRIES):
                    try:
                        message = await read_frame(stream, MAX_MESSAGE_BYTES)
                    except Exception:  # noqa: BLE001 - EOF (done), reset or garbage: stop here
                        break
                    if self._receive(message, f"sync with {peer}") == "accepted":
                        accepted += 1
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

    def drop_old(self) -> None:
        self.ledger.drop_old(self._clock())
