"""Fair hand-over of a worker's lease: a member asking for a busy worker gets it within
HANDOVER_S (plus the grace), the holder is told first and re-plans, and the worker's entry
says that someone waits. The real lease protocol runs over in-memory streams under trio's
MockClock, so the minutes pass at once."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from swarm.ledger.entries import WorkerEntry
from swarm.trust.identity import Identity
from swarm.workers.lease import (
    HANDOVER_GRACE_S,
    HANDOVER_S,
    RENEW_EVERY_S,
    WAITING,
    HandOver,
    Lease,
    LeaseDesk,
    LeaseRefused,
    ask_turn,
    handover_phase,
    hold,
)

WORKER = Identity(b"w" * 32).peer_id.to_base58()
ALICE = Identity(b"a" * 32).peer_id.to_base58()
BOB = Identity(b"b" * 32).peer_id.to_base58()
CAROL = Identity(b"c" * 32).peer_id.to_base58()


class FakeStream:
    """One end of an in-memory stream, shaped like a libp2p stream."""

    def __init__(self, inner: trio.testing.StapledStream, peer: str) -> None:
        self.inner = inner
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer))

    async def read(self, n: int = 65536) -> bytes:
        return await self.inner.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.inner.send_all(data)

    async def close(self) -> None:
        await self.inner.send_eof()

    async def reset(self) -> None:
        await self.inner.aclose()

    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)


class FakeHost:
    """What `hold` needs of a host: a stream to the worker, whose desk answers it."""

    def __init__(self, me: str, desk: LeaseDesk, nursery: trio.Nursery) -> None:
        self.me, self.desk, self.nursery = me, desk, nursery

    def get_network(self) -> Any:
        """No libp2p connections to look at: a direct (not relayed) link."""
        return SimpleNamespace(get_connections=lambda _peer: [])

    async def new_stream(self, peer: Any, protocols: Any) -> FakeStream:
        mine, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, FakeStream(theirs, self.me))
        return FakeStream(mine, WORKER)

    async def _serve(self, stream: FakeStream) -> None:
        try:
            await self.desk.handle(stream)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the node's `isolate` does the same
            pass
        finally:
            await stream.reset()


def busy_desk(changes: list[str]) -> LeaseDesk:
    counter = itertools.count()
    # RPC bytes keep flowing: the holder is busy, not idle.
    desk = LeaseDesk(lambda: changes.append("change"), lambda peer: changes.append(f"end {peer}"),
                     relayed=lambda: next(counter))
    desk.accepting = True
    return desk


async def lease(nursery: trio.Nursery, desk: LeaseDesk, who: str) -> Lease:
    host = FakeHost(who, desk, nursery)
    return await nursery.start(hold, host, WORKER)


Body = Callable[[trio.Nursery, LeaseDesk, list[str]], Awaitable[None]]


def run(body: Body) -> None:
    """`body(nursery, desk, changes)` against a desk whose holder is busy, minutes passing at
    once; `changes` records the desk's calls back (entry changed, lease ended)."""

    async def main() -> None:
        changes: list[str] = []
        desk = busy_desk(changes)
        async with trio.open_nursery() as nursery:
            await body(nursery, desk, changes)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_phases() -> None:
    assert handover_phase(None, 20, 1e9) == "keep"
    assert handover_phase(100, 20, 99.9) == "keep"
    assert handover_phase(100, 20, 100) == "finish"
    assert handover_phase(100, 20, 120) == "end"


def test_nobody_waiting_the_holder_keeps_the_worker() -> None:
    async def main(nursery: trio.Nursery, desk: LeaseDesk, changes: list[str]) -> None:
        held = await lease(nursery, desk, ALICE)
        for _ in range(4):
            await trio.sleep(HANDOVER_S)
            assert desk.holder == ALICE and not held.revoked.is_set()
        assert desk.handover.free_within(trio.current_time()) is None

    run(main)


def test_a_waiting_member_gets_the_worker_within_the_handover_time() -> None:
    async def main(nursery: trio.Nursery, desk: LeaseDesk, changes: list[str]) -> None:
        held = await lease(nursery, desk, ALICE)
        await trio.sleep(1000)  # Alice has had it a while already: that does not count
        asked = trio.current_time()
        changes.clear()
        with pytest.raises(LeaseRefused) as refused:
            await lease(nursery, desk, BOB)
        assert refused.value.code == "busy"
        assert f"within {HANDOVER_S + HANDOVER_GRACE_S:.0f} s" in str(refused.value)
        assert changes == ["change"]  # the worker's entry is published again
        assert desk.handover.waiting.keys() == {BOB}
        # Asking again changes nothing: the clock started with the first ask.
        await trio.sleep(60)
        with pytest.raises(LeaseRefused):
            await lease(nursery, desk, BOB)
        assert desk.handover.due == asked + HANDOVER_S

        await trio.sleep_until(asked + HANDOVER_S - 1)
        assert not held.revoked.is_set() and desk.holder == ALICE
        await trio.sleep_until(asked + HANDOVER_S + RENEW_EVERY_S + 0.5)
        assert held.revoked.is_set() and held.why == WAITING  # Alice re-plans
        assert not held.lost.is_set()  # ...and finishes its reply meanwhile
        # Alice does not let go: the worker takes the lease back after the grace.
        await held.lost.wait()
        assert trio.current_time() <= asked + HANDOVER_S + HANDOVER_GRACE_S + RENEW_EVERY_S
        assert desk.holder is None and f"end {ALICE}" in changes
        # Alice cannot grab it back while Bob waits; Bob gets it.
        with pytest.raises(LeaseRefused):
            await lease(nursery, desk, ALICE)
        bobs = await lease(nursery, desk, BOB)
        assert desk.holder == BOB and not bobs.revoked.is_set()
        assert desk.handover.due is None and desk.handover.waiting == {}

    run(main)


def test_an_honest_holder_releases_and_the_next_waiter_starts_the_clock_again() -> None:
    async def main(nursery: trio.Nursery, desk: LeaseDesk, changes: list[str]) -> None:
        held = await lease(nursery, desk, ALICE)
        for who in (BOB, CAROL):
            with pytest.raises(LeaseRefused):
                await lease(nursery, desk, who)
        await held.revoked.wait()
        held.release()
        await held.lost.wait()
        await trio.sleep(0.1)
        assert desk.holder is None
        bobs = await lease(nursery, desk, BOB)
        # Carol still waits: Bob has HANDOVER_S, not for ever.
        assert desk.handover.waiting.keys() == {CAROL}
        free = desk.handover.free_within(trio.current_time())
        assert free == HANDOVER_S + HANDOVER_GRACE_S
        await trio.sleep(HANDOVER_S + RENEW_EVERY_S + 1)
        assert bobs.revoked.is_set()

    run(main)


def test_asking_for_a_turn_counts_as_waiting_and_gives_a_free_worker_back() -> None:
    async def main(nursery: trio.Nursery, desk: LeaseDesk, changes: list[str]) -> None:
        await ask_turn(FakeHost(BOB, desk, nursery), WORKER)  # type: ignore[arg-type]
        await trio.sleep(1)
        assert desk.holder is None and desk.handover.waiting == {}  # free: given back
        held = await lease(nursery, desk, ALICE)
        await ask_turn(FakeHost(BOB, desk, nursery), WORKER)  # type: ignore[arg-type]
        assert desk.handover.waiting.keys() == {BOB}
        await trio.sleep(HANDOVER_S + RENEW_EVERY_S + 1)
        assert held.revoked.is_set()

    run(main)


def test_the_claim_window_ends_and_the_old_holder_may_return() -> None:
    handover = HandOver()
    handover.asked(BOB, 0.0)
    handover.ended(ALICE, 320.0, handed_over=True)
    assert handover.kept_from(ALICE, 321.0)
    assert not handover.kept_from(CAROL, 321.0)  # never held it: not kept out
    assert not handover.kept_from(ALICE, 320.0 + handover.claim_s + 1)
    # A member that asked once and never came back stops counting as waiting.
    handover.asked(CAROL, 400.0)
    handover.forget_old(400.0 + handover.wait_s + 1)
    assert handover.waiting == {}


def test_the_worker_entry_says_who_waits_and_old_readers_ignore_it() -> None:
    entry = WorkerEntry(1 << 30, 2 << 30, 4, "3.0.0", "leased", ALICE, waiting=2,
                        free_within_s=290)
    value = entry.to_value()
    assert value["handover"] == {"waiting": 2, "free_within_s": 290}
    assert WorkerEntry.from_value(value) == entry
    # What an older worker publishes (no hand-over) reads as nobody waiting...
    older = {k: v for k, v in value.items() if k != "handover"}
    assert WorkerEntry.from_value(older).waiting == 0
    # ...a malformed one is dropped, not the whole entry...
    for bad in ({"waiting": -1, "free_within_s": 3}, {"waiting": 1}, "soon", None):
        parsed = WorkerEntry.from_value({**value, "handover": bad})
        assert (parsed.waiting, parsed.free_within_s) == (0, None)
    # ...and while nobody waits the field is absent, as before.
    assert "handover" not in WorkerEntry(1, 1, 1, "3.0.0", "idle").to_value()
