"""Worker leases: a ggml RPC server serves one client at a time, so a client first leases it.

The lease lives on one stream of `/covey/worker-lease/1.0.0`. The holder acquires it, then
renews it every `RENEW_EVERY_S`; the worker ends it when renewals stop (`TTL_S`), when the
holder releases it or hangs up, or when worker mode is turned off, in which case it first
says "revoked" so the holder can finish its reply and move elsewhere. It also ends a lease
that carried no RPC bytes for `IDLE_S`: the RPC server serves one connection at a time, so a
holder that renews but sends nothing must not keep it from everyone else for ever.

Fair hand-over: a member that asks for the worker while another holds it is told "busy" and
counted as waiting; the holder then keeps the lease at most `HANDOVER_S` more, is told
"revoked" (as when worker mode goes off: it finishes its reply within `HANDOVER_GRACE_S` and
re-plans), and for `CLAIM_S` after that the worker is kept for those who waited. The worker's
ledger entry says that members wait and when it will be free (`HandOver`).

Frames (JSON): holder {"version": 1, "op": "acquire" | "renew" | "release"}; worker
{"ok": true, "ttl_s"} or {"ok": false, "code": "busy" | "off" | "revoked" | "barred",
"message"} ("barred": the worker cut this peer off for breaking the RPC rules, for a while). The
reply to acquire may carry more: "direct_secret" (hex) admits the holder to the worker's direct
TLS path (swarm/workers/direct_tls.py); "busy" may carry "free_within_s", when the holder must
have handed over. A peer that does not know a field ignores it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from swarm.net.host import (
    parse_versioned,
    read_frame,
    read_json_frame,
    reset_quietly,
    write_json_frame,
)
from swarm.net.relay import is_relayed

log = logging.getLogger(__name__)

PROTOCOL = "/covey/worker-lease/1.0.0"
WIRE_VERSION = 1
TTL_S = 15.0
RENEW_EVERY_S = 4.0
MAX_FRAME_BYTES = 1024
CONNECT_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 3.0  # a renewal unanswered this long: the worker or the link is gone
# Twice what an honest client keeps an idle session (swarm/routes/sharded.py IDLE_RELEASE_S).
IDLE_S = 600.0
TURNED_OFF = "worker mode was turned off"
# How long a holder keeps the worker once another member asks for it: long enough to finish a
# long reply, short enough that a member waiting for it is not shut out for an afternoon.
HANDOVER_S = 300.0
HANDOVER_GRACE_S = 20.0  # as when worker mode goes off: the holder finishes its reply
CLAIM_S = 60.0  # after a hand-over, how long the worker is kept for the members who waited
WAITING = "another member is waiting for this worker"


class LeaseRefused(Exception):
    """The worker said no: `code` is busy (someone else holds it) or off."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_op(data: bytes) -> str:
    op = parse_versioned(data, WIRE_VERSION, "lease message").get("op")
    if op not in ("acquire", "renew", "release"):
        raise ValueError(f"unknown lease op {op!r}")
    return str(op)


@dataclass
class IdleClock:
    """Whether a counter of relayed bytes has stood still longer than `idle_s`."""

    idle_s: float
    seen: int | None = None
    since: float = 0.0

    def expired(self, count: int, now: float) -> bool:
        if count != self.seen:
            self.seen, self.since = count, now
            return False
        return now - self.since > self.idle_s


def handover_phase(due: float | None, grace_s: float, now: float) -> str:
    """Where a lease others wait for stands: "keep" (nobody waits, or before `due`), "finish"
    (the holder is told and finishes its reply) or "end" (the grace is over)."""
    if due is None or now < due:
        return "keep"
    return "finish" if now < due + grace_s else "end"


@dataclass
class HandOver:
    """Who waits for a leased worker and when its holder must give it up (times in trio
    seconds; pure). A member counts as waiting until it takes the lease, or for `wait_s`
    after it last asked."""

    after_s: float = HANDOVER_S
    grace_s: float = HANDOVER_GRACE_S
    claim_s: float = CLAIM_S
    waiting: dict[str, float] = field(default_factory=dict)  # peer -> when it last asked
    due: float | None = None  # when the holder is told to finish
    yielded: dict[str, float] = field(default_factory=dict)  # former holder -> kept out until

    @property
    def wait_s(self) -> float:
        return self.after_s + self.grace_s + self.claim_s

    def forget_old(self, now: float) -> None:
        self.waiting = {p: t for p, t in self.waiting.items() if now - t < self.wait_s}
        self.yielded = {p: t for p, t in self.yielded.items() if t > now}

    def asked(self, peer: str, now: float) -> bool:
        """`peer` asked while someone holds the worker; True when that changes what the
        worker's entry says (the first to wait starts the clock)."""
        new = peer not in self.waiting
        self.waiting[peer] = now
        if self.due is None:
            self.due = now + self.after_s
            return True
        return new

    def kept_from(self, peer: str, now: float) -> bool:
        """Whether `peer`, who just handed the worker over, must let the waiting take it."""
        self.forget_old(now)
        return peer in self.yielded and any(p != peer for p in self.waiting)

    def granted(self, peer: str, now: float) -> None:
        """`peer` holds the worker now: the clock starts again if others still wait."""
        self.waiting.pop(peer, None)
        self.forget_old(now)
        self.due = now + self.after_s if self.waiting else None

    def ended(self, peer: str, now: float, handed_over: bool) -> None:
        self.due = None
        if handed_over:
            self.yielded[peer] = now + self.claim_s

    def free_within(self, now: float) -> float | None:
        """Seconds until the holder must have handed over; None while nobody waits."""
        if self.due is None:
            return None
        return max(0.0, self.due + self.grace_s - now)


@dataclass
class _Held:
    peer_id: str
    stream: INetStream
    idle: IdleClock
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)
    told: bool = False  # that it must hand the worker over


class LeaseDesk:
    """The worker's side: who holds the lease, and the protocol handler that grants it."""

    def __init__(self, on_change: Callable[[], None], on_end: Callable[[str], None],
                 ttl_s: float = TTL_S,
                 on_grant: Callable[[str], dict[str, Any]] = lambda peer: {},
                 relayed: Callable[[], int] = lambda: 0, idle_s: float = IDLE_S,
                 handover: HandOver | None = None) -> None:
        self.accepting = False
        self.refusal = "worker mode is off on this machine"  # why, while not accepting
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self._relayed = relayed  # RPC bytes relayed so far, both ways: the holder's use
        self._held: _Held | None = None
        self._on_change = on_change
        self._on_end = on_end  # e.g. cut the old holder's tunnels
        self._on_grant = on_grant  # extra fields for the holder, e.g. its direct-path secret
        self._barred: dict[str, float] = {}  # peer -> trio time its bar ends
        self.handover = handover or HandOver()

    @property
    def holder(self) -> str | None:
        return self._held.peer_id if self._held is not None else None

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        with trio.fail_after(CONNECT_TIMEOUT_S):
            op = parse_op(await read_frame(stream, MAX_FRAME_BYTES))
        if op != "acquire":
            raise ValueError("a lease starts with acquire")
        if not self.accepting:
            await write_json_frame(stream, {"ok": False, "code": "off",
                                            "message": self.refusal})
            return
        if self._barred.get(peer, -1.0) > trio.current_time():
            await write_json_frame(stream, {"ok": False, "code": "barred", "message":
                                            "this worker cut you off for an RPC violation"})
            return
        now = trio.current_time()
        if self._held is not None and self._held.peer_id != peer:
            if self.handover.asked(peer, now):
                self._on_change()
            free = self.handover.free_within(now) or 0.0
            await write_json_frame(stream, {
                "ok": False, "code": "busy", "free_within_s": free,
                "message": f"leased by {self._held.peer_id}; handed over within {free:.0f} s"})
            return
        if self._held is None and self.handover.kept_from(peer, now):
            await write_json_frame(stream, {"ok": False, "code": "busy",
                                            "message": f"handed over: {WAITING}"})
            return
        if self._held is not None:  # the same holder again (it reconnected): the new one wins
            self._held.scope.cancel()
            await self._held.ended.wait()
        held = _Held(peer, stream, IdleClock(self.idle_s))
        held.idle.expired(self._relayed(), now)
        self._held = held
        self.handover.granted(peer, now)
        self._on_change()
        handed_over = False
        try:
            grant = {**self._on_grant(peer), "ok": True, "ttl_s": self.ttl_s}
            await write_json_frame(stream, grant)
            with held.scope:
                while True:
                    with trio.fail_after(self.ttl_s):
                        op = parse_op(await read_frame(stream, MAX_FRAME_BYTES))
                    if op == "release":
                        return
                    now = trio.current_time()
                    phase = handover_phase(self.handover.due, self.handover.grace_s, now)
                    if phase == "end":
                        log.info("handing the worker over: %s had it %.0f s after another "
                                 "member asked", peer, self.handover.after_s)
                        handed_over = True
                        return
                    if phase == "finish" and not held.told:
                        held.told = True
                        await write_json_frame(stream, {"ok": False, "code": "revoked",
                                                        "message": WAITING})
                        continue
                    if held.idle.expired(self._relayed(), now):
                        log.info("ending the lease of %s: no RPC bytes for %.0f s", peer,
                                 self.idle_s)
                        await write_json_frame(stream, {
                            "ok": False, "code": "revoked",
                            "message": f"the lease carried nothing for {self.idle_s:.0f} s"})
                        return
                    await write_json_frame(stream, {"ok": True, "ttl_s": self.ttl_s})
        finally:
            if self._held is held:
                self._held = None
                self.handover.ended(peer, trio.current_time(), handed_over)
                self._on_change()
            self._on_end(peer)
            held.ended.set()
            log.info("lease of %s ended", peer)

    def evict(self, peer_id: str, bar_s: float) -> None:
        """End `peer_id`'s lease now, without a grace period, and grant it no new one for
        `bar_s`: it broke the RPC rules. Its tunnels and direct connections go with the lease
        (`on_end`)."""
        now = trio.current_time()
        self._barred = {p: t for p, t in self._barred.items() if t > now}
        self._barred[peer_id] = now + bar_s
        if self._held is not None and self._held.peer_id == peer_id:
            self._held.scope.cancel()

    async def revoke(self, grace_s: float, message: str = TURNED_OFF) -> None:
        """Stop granting; tell the holder (`message` says why), give it `grace_s` to finish
        and release. With no grace the lease ends at once, and with it the holder's relays."""
        self.accepting = False
        held = self._held
        if held is None:
            return
        try:
            with trio.move_on_after(2):
                await write_json_frame(held.stream, {"ok": False, "code": "revoked",
                                                     "message": message})
        except Exception as exc:  # noqa: BLE001 - the holder may be gone already
            log.debug("could not tell %s of the revoke: %r", held.peer_id, exc)
        with trio.move_on_after(grace_s):
            await held.ended.wait()
        held.scope.cancel()
        await held.ended.wait()


@dataclass
class Lease:
    """The holder's side of one lease, kept alive by `hold` until released."""

    peer_id: str
    granted: dict[str, Any] = field(default_factory=dict)  # the worker's acquire reply
    remote_ip: str | None = None  # where the lease's own connection reaches the worker
    lost: trio.Event = field(default_factory=trio.Event)  # the worker or the link is gone
    revoked: trio.Event = field(default_factory=trio.Event)  # worker mode turned off there
    why: str = ""
    _release: trio.Event = field(default_factory=trio.Event)
    _check: trio.Event = field(default_factory=trio.Event)

    def release(self) -> None:
        self._release.set()

    def check_now(self) -> None:
        """Renew at once rather than at the next beat: a worker that died shows as lost in
        about a round trip (the engine just died; which worker went with it?)."""
        self._check.set()


async def hold(host: IHost, peer_id: str, *,
               task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Acquire the lease of `peer_id`'s worker (LeaseRefused if refused), hand the `Lease` to
    `task_status`, then renew it until it is released or lost. Never raises after start."""
    with trio.fail_after(CONNECT_TIMEOUT_S):
        stream = await host.new_stream(ID.from_base58(peer_id), [TProtocol(PROTOCOL)])
    lease = Lease(peer_id)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await _op(stream, "acquire")
            reply = await read_json_frame(stream, MAX_FRAME_BYTES)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            code = reply.get("code", "refused") if isinstance(reply, dict) else "refused"
            message = reply.get("message", "") if isinstance(reply, dict) else ""
            raise LeaseRefused(str(code), str(message))
        lease.granted = reply
        # Over a relayed connection the remote address is the relay's: no direct path to try.
        address = None if is_relayed(host, stream.muxed_conn.peer_id) else \
            stream.get_remote_address()
        lease.remote_ip = address[0] if address else None
        task_status.started(lease)
        await _keep(stream, lease)
    finally:
        await reset_quietly(stream)


async def ask_turn(host: IHost, peer_id: str) -> None:
    """Ask for a worker another member holds, without waiting for it: the worker counts this
    node as waiting, so its holder hands it over within HANDOVER_S. A worker that turns out to
    be free (the ledger was behind) is given back at once. Never raises."""
    try:
        with trio.fail_after(2 * CONNECT_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                lease = await nursery.start(hold, host, peer_id)
                lease.release()
    except Exception as exc:  # noqa: BLE001 - "busy" is the answer expected
        log.debug("asked for the worker of %s: %r", peer_id, exc)


async def _keep(stream: INetStream, lease: Lease) -> None:
    try:
        while True:
            with trio.move_on_after(RENEW_EVERY_S):
                async with trio.open_nursery() as nursery:
                    for event in (lease._release, lease._check):
                        nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)
            lease._check = trio.Event()
            if lease._release.is_set():
                with trio.move_on_after(2):
                    await _op(stream, "release")
                return
            with trio.fail_after(CHECK_TIMEOUT_S):
                await _op(stream, "renew")
                reply = await read_json_frame(stream, MAX_FRAME_BYTES)
            if isinstance(reply, dict) and reply.get("code") == "revoked":
                lease.why = (WAITING if reply.get("message") == WAITING
                             else "worker mode was turned off there")
                lease.revoked.set()
                # Keep renewing quietly: the worker holds the lease through its grace period.
                continue
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                raise ValueError(f"unexpected lease reply {reply!r}")
    except Exception as exc:  # noqa: BLE001 - a vanished worker fails in many ways
        lease.why = lease.why or f"the lease broke ({type(exc).__name__})"
        log.info("lease of %s lost: %r", lease.peer_id, exc)
    finally:
        lease.lost.set()


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _op(stream: INetStream, op: str) -> None:
    await write_json_frame(stream, {"version": WIRE_VERSION, "op": op})
