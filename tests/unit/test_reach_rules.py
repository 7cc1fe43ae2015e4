"""Reach across NAT, the pure parts: the relay's slots and caps, circuit addresses, the "reach"
ledger entry, whom to reserve on and who dials, and how the link shows to the user."""

from __future__ import annotations

import pytest

from app.cli.swarm import format_peers
from swarm.ledger.entries import NODE_KEY, REACH_KEY, ReachEntry
from swarm.ledger.peer_view import peers_view
from swarm.ledger.rules import Entry, Ledger, sign_entry
from swarm.net.reach import dials_circuit, is_public, link_label, live_entries, pick_relays
from swarm.net.relay import (
    ByteBudget,
    OpenRate,
    Pacer,
    RelayLimits,
    Slots,
    circuit_addr,
    relay_of,
)
from swarm.node.local_facts import collect_node_info
from swarm.trust.identity import Identity

A, B, C, D = (Identity(bytes([n]) * 32) for n in (1, 2, 3, 4))
NOW = 1_800_000_000.0


def test_reservations_are_capped_and_expire() -> None:
    slots = Slots(RelayLimits(max_reservations=2, reservation_s=60))
    assert slots.reserve(A.peer_id, 0) == 60
    assert slots.reserve(B.peer_id, 0) == 60
    assert slots.reserve(C.peer_id, 0) is None  # full
    assert slots.reserve(A.peer_id, 30) == 90  # a refresh is not a new slot
    assert slots.has_reservation(B.peer_id, 59) and not slots.has_reservation(B.peer_id, 61)
    assert slots.reserve(C.peer_id, 61) == 121  # B's slot expired and freed room


def test_circuits_are_capped_in_all_and_per_peer_and_released() -> None:
    slots = Slots(RelayLimits(max_circuits=2, max_circuits_per_peer=1))
    assert slots.open(A.peer_id, B.peer_id)
    assert not slots.open(C.peer_id, B.peer_id)  # B is already an end of one
    assert not slots.open(B.peer_id, C.peer_id)
    assert slots.open(C.peer_id, D.peer_id)
    assert not slots.open(D.peer_id, A.peer_id)
    slots.close(A.peer_id, B.peer_id)
    assert slots.open(B.peer_id, A.peer_id) and slots.open_circuits == 2
    for pair in ((B.peer_id, A.peer_id), (C.peer_id, D.peer_id)):
        slots.close(*pair)
    assert slots.open_circuits == 0 and slots.circuits == {}


def test_circuit_opens_are_rated_per_member_after_a_burst() -> None:
    rate = OpenRate(per_min=60, burst=3)
    assert [rate.allow(A.peer_id, 0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow(B.peer_id, 0)  # another member has its own bucket
    assert not rate.allow(A.peer_id, 0.5)  # half a token refilled: not enough
    assert rate.allow(A.peer_id, 1.0) and not rate.allow(A.peer_id, 1.0)
    assert [rate.allow(A.peer_id, 1000) for _ in range(4)] == [True, True, True, False]


def test_the_open_rate_forgets_members_whose_bucket_filled_up() -> None:
    rate = OpenRate(per_min=60, burst=1)
    rate.PRUNE_AT = 2
    assert rate.allow(A.peer_id, 0) and rate.allow(B.peer_id, 0)
    assert rate.allow(C.peer_id, 10)  # A and B are full again: forgotten
    assert set(rate.buckets) == {C.peer_id}


def test_a_circuit_byte_budget_refuses_the_chunk_that_overruns_it() -> None:
    budget = ByteBudget(100)
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1)
    assert not ByteBudget(10).take(11)


def test_the_pacer_holds_relayed_bytes_to_its_rate() -> None:
    clock = [0.0]
    pacer = Pacer(1000.0, clock=lambda: clock[0])
    assert pacer.delay(200) == 0  # within the burst
    waits = [pacer.delay(1000) for _ in range(3)]
    assert waits[0] == pytest.approx(0.95) and waits[2] == pytest.approx(2.95)
    clock[0] = 100.0  # idle for long: no debt carried over beyond the burst
    assert pacer.delay(100) == 0


def test_circuit_addresses_name_their_relay() -> None:
    addr = circuit_addr(f"/ip4/203.0.113.5/tcp/4001/p2p/{A.peer_id}", A.peer_id)
    assert addr == f"/ip4/203.0.113.5/tcp/4001/p2p/{A.peer_id}/p2p-circuit"
    assert relay_of(addr) == (A.peer_id, "/ip4/203.0.113.5/tcp/4001")
    for bad in ("/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p-circuit",
                "/ip4/1.2.3.4/tcp/1/p2p/notapeer/p2p-circuit"):
        assert relay_of(bad) is None


def test_reach_entry_round_trip_and_refusals() -> None:
    entry = ReachEntry(("/ip4/10.0.0.2/tcp/1",), (circuit_addr("/ip4/1.2.3.4/tcp/1", A.peer_id),),
                       False)
    assert ReachEntry.from_value(entry.to_value()) == entry
    for bad in ({**entry.to_value(), "relay": 1}, {**entry.to_value(), "addrs": ["a"] * 9},
                {**entry.to_value(), "circuits": [5]}, {**entry.to_value(), "version": 2},
                {**entry.to_value(), "addrs": ["x" * 300]}):
        with pytest.raises(ValueError):
            ReachEntry.from_value(bad)


def _publish(ledger: Ledger, who: Identity, key: str, value: dict, issued: float = NOW) -> None:
    ledger.apply(sign_entry(Entry(who.peer_id.to_base58(), key, 1, issued, 30.0, value),
                            who.sign), issued)


def test_relays_come_from_live_entries_connected_first() -> None:
    ledger = Ledger()
    relay = ReachEntry((), (), True).to_value()
    _publish(ledger, A, REACH_KEY, relay)  # this node
    _publish(ledger, B, REACH_KEY, relay)
    _publish(ledger, C, REACH_KEY, relay)
    _publish(ledger, D, REACH_KEY, relay, issued=NOW - 100)  # gone
    entries = live_entries(ledger, A.peer_id.to_base58(), NOW)
    assert set(entries) == {B.peer_id.to_base58(), C.peer_id.to_base58()}
    c = C.peer_id.to_base58()
    assert pick_relays(entries, {c}, 1) == [c]
    assert len(pick_relays(entries, set(), 2)) == 2
    assert pick_relays({c: ReachEntry((), (), False)}, {c}, 2) == []


def test_only_the_lower_peer_id_dials_when_both_are_behind_nat() -> None:
    assert dials_circuit("a", "b", reachable_by_circuit=True)
    assert not dials_circuit("b", "a", reachable_by_circuit=True)
    assert dials_circuit("b", "a", reachable_by_circuit=False)  # the other cannot reach us


def test_the_side_without_a_upnp_mapping_dials_the_mapped_one() -> None:
    # The mapped side waits to be dialled at its mapped address (a circuit would win the race
    # and the direct path would never be used); the other falls back to a circuit if need be.
    assert not dials_circuit("a", "b", reachable_by_circuit=True, mapped=True)
    assert dials_circuit("b", "a", reachable_by_circuit=True, peer_mapped=True)
    assert dials_circuit("a", "b", True, mapped=True, peer_mapped=True)  # both: peer id order
    assert not dials_circuit("b", "a", True, mapped=True, peer_mapped=True)


def test_public_addresses() -> None:
    assert is_public("/ip4/8.8.8.8/tcp/1")
    assert not is_public("/ip4/192.168.1.2/tcp/1") and not is_public("/ip4/127.0.0.1/tcp/1")
    assert not is_public("/dns4/example.com/tcp/1")


def test_peers_show_how_each_connected_peer_is_reached() -> None:
    ledger = Ledger()
    for who, name in ((A, "me"), (B, "home2"), (C, "office"), (D, "home3")):
        _publish(ledger, who, NODE_KEY, collect_node_info(name, ()).to_value())
    b, c, d = B.peer_id.to_base58(), C.peer_id.to_base58(), D.peer_id.to_base58()
    links = {b: link_label("office"), c: link_label(None), d: link_label(None, punched=True)}
    rows = {r["name"]: r for r in peers_view(ledger, A.peer_id.to_base58(), {b, c, d}, NOW,
                                             links)}
    assert rows["home2"]["link"] == "relayed via office"
    assert rows["office"]["link"] == "direct" and rows["me"]["link"] is None
    table = format_peers(list(rows.values()), NOW).splitlines()
    assert "relayed via office" in next(line for line in table if line.startswith("home2"))
    assert "hole-punched" in next(line for line in table if line.startswith("home3"))
