"""Caps on unproven connections: per source address, in all, loopback, IPv6 /64, release; and
the libp2p side's wait for admission (released once admitted, closed when too slow)."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID

from swarm.net.source_caps import SourceCaps, Ticket, source_of
from swarm.net.unadmitted import UnadmittedLimits


def fill(caps: SourceCaps, host: str, n: int) -> list[Ticket | None]:
    return [caps.enter(host) for _ in range(n)]


def test_one_address_gets_its_share_and_no_more() -> None:
    caps = SourceCaps(per_source=8, total=64)
    held = fill(caps, "203.0.113.9", 400)
    assert sum(t is not None for t in held) == 8
    assert caps.unproven == 8 and caps.held_by("203.0.113.9") == 8
    # Another address is not affected by the first one's flood.
    assert caps.enter("198.51.100.7") is not None


def test_the_total_holds_across_addresses() -> None:
    caps = SourceCaps(per_source=8, total=20)
    admitted = [t for i in range(10) for t in fill(caps, f"10.0.0.{i}", 3) if t is not None]
    assert len(admitted) == 20
    assert caps.enter("10.0.1.1") is None


def test_a_proven_or_closed_connection_frees_its_place_once() -> None:
    caps = SourceCaps(per_source=2, total=10)
    first, second = fill(caps, "192.0.2.1", 2)
    assert first is not None and second is not None
    assert caps.enter("192.0.2.1") is None
    caps.leave(first)
    caps.leave(first)  # a second leave (admitted, then closed) frees nothing more
    assert caps.unproven == 1
    third = caps.enter("192.0.2.1")
    assert third is not None
    assert caps.enter("192.0.2.1") is None
    caps.leave(second)
    caps.leave(third)
    assert caps.unproven == 0 and caps.held_by("192.0.2.1") == 0


def test_members_behind_one_nat_join_one_after_another() -> None:
    # Each admitted member leaves the count, so a whole office behind one address gets in.
    caps = SourceCaps(per_source=2, total=4)
    for _ in range(50):
        ticket = caps.enter("198.51.100.1")
        assert ticket is not None
        caps.leave(ticket)


def test_loopback_is_exempt_only_from_the_per_address_cap() -> None:
    caps = SourceCaps(per_source=2, total=5, exempt_loopback=True)
    assert sum(t is not None for t in fill(caps, "127.0.0.1", 10)) == 5
    strict = SourceCaps(per_source=2, total=5)
    assert sum(t is not None for t in fill(strict, "127.0.0.1", 10)) == 2


@pytest.mark.parametrize(("host", "source"), [
    ("203.0.113.9", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::7%eth0", "2001:db8:1:2::/64"),
    ("unknown", "unknown"),
])
def test_sources(host: str, source: str) -> None:
    assert source_of(host) == source


def test_one_ipv6_network_counts_as_one_source() -> None:
    caps = SourceCaps(per_source=8, total=64)
    held = [caps.enter(f"2001:db8:0:7::{i:x}") for i in range(1, 100)]
    assert sum(t is not None for t in held) == 8


PEER = ID(b"\x00\x01peer")


def test_admission_frees_the_place_and_slowness_closes_the_connection() -> None:
    admitted: set[ID] = set()
    closed: list[str] = []

    async def main() -> None:
        limits = UnadmittedLimits(per_source=1, total=10, window_s=1.0, exempt_loopback=False)
        limits.watch(admitted.__contains__)

        async def close() -> None:
            closed.append("slow")

        async with trio.open_nursery() as nursery:
            quick = limits.enter(("192.0.2.5", 4001))
            assert quick is not None
            assert limits.enter(("192.0.2.5", 4002)) is None  # its one place is taken
            nursery.start_soon(limits.hold, quick, PEER, close)
            await trio.sleep(0.2)
            admitted.add(PEER)
            limits.admitted()
            await trio.sleep(0.1)
            assert not quick.held and limits.caps.unproven == 0
            slow = limits.enter(("192.0.2.5", 4003))
            assert slow is not None
            started = trio.current_time()
            await limits.hold(slow, ID(b"\x00\x01other"), close)
            assert 0.9 < trio.current_time() - started < 1.5
        assert closed == ["slow"]

    trio.run(main)


def test_without_a_gatekeeper_a_connection_counts_until_its_handshake_only() -> None:
    async def main() -> None:
        limits = UnadmittedLimits(per_source=1, total=10, exempt_loopback=False)
        ticket = limits.enter(("192.0.2.5", 4001))
        assert ticket is not None

        async def never() -> None:
            raise AssertionError("closed")

        await limits.hold(ticket, PEER, never)
        assert limits.caps.unproven == 0

    trio.run(main)
