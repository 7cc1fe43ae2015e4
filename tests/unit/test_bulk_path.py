"""Bulk transfers and relays, the pure part: a transfer the relay's cap would cut waits for a
direct path and says why in plain words; one it allows goes, slowly, and says so; a copy takes
a direct source over a relayed one."""

from __future__ import annotations

import pytest

from swarm.ledger.entries import SharedModel
from swarm.net.bulk_path import Relayed, bulk_path
from swarm.node.model_copy import Offer, usable_sources
from swarm.routes.placement import NotEnoughMemory, plan_placement
from swarm.routes.sharded import over_relays
from tests.unit.test_placement import offer, uniform

MiB = 1 << 20
VIA_R = Relayed("office", 256 * MiB)
MODEL = SharedModel("m", 900 * MiB, "ab" * 32)


def test_a_direct_peer_goes_without_a_word() -> None:
    path = bulk_path("home2", None, 50 << 30, "the copy")
    assert path.go and path.notice is None


def test_a_transfer_the_relay_cap_would_cut_waits_and_says_why() -> None:
    path = bulk_path("home2", VIA_R, 900 * MiB, "the copy")
    assert not path.go
    assert path.notice == (
        "home2 is reachable only through a relay (office), which ends a connection after "
        "256.0 MiB: the copy (900.0 MiB) would be cut short there. Waiting for a direct path "
        "to home2; it starts as soon as there is one.")
    assert not bulk_path("home2", VIA_R, 240 * MiB, "the copy").go  # no room for the rest


def test_a_small_transfer_goes_through_the_relay_and_says_it_is_slow() -> None:
    path = bulk_path("home2", VIA_R, 100 * MiB, "the copy")
    assert path.go
    assert path.notice == "home2 is reachable only through a relay (office): the copy goes " \
                          "that way, slowly"
    assert bulk_path("home2", Relayed("office", None), 50 << 30, "the copy").go  # no cap named


def test_a_copy_takes_direct_sources_over_relayed_ones() -> None:
    direct, relayed = Offer(MODEL, "P1", "desk"), Offer(MODEL, "P2", "home2")
    links = {"P2": VIA_R}
    assert usable_sources([relayed, direct], links.get, 900 * MiB) == ([direct], None)
    # Only a relayed source whose circuit the copy would overrun: nothing yet, and why.
    none, why = usable_sources([relayed], links.get, 900 * MiB)
    assert none == [] and why is not None and "Waiting for a direct path to home2" in why
    # What is left of a resumed copy fits the circuit: it goes, slowly.
    assert usable_sources([relayed], links.get, 10 * MiB) == (
        [relayed], "home2 is reachable only through a relay (office): the copy goes that way, "
                   "slowly")


def test_a_sharded_plan_leaves_out_a_relayed_worker_the_cap_would_cut_and_says_why() -> None:
    home2, desk = offer("home2", 1 << 30), offer("desk", 1 << 30)
    links = {"peer-home2": VIA_R}
    kept, cut = over_relays([home2, desk], set(), links.get, 900 * MiB)
    assert kept == [desk] and [c.name for c in cut] == ["home2"]
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(uniform(24, 60 * MiB), 24, kept, excluded=cut)
    assert ("not used: home2 (reachable only through a relay (office), which ends a connection "
            "after 256.0 MiB: loading the model's weights (900.0 MiB) would be cut short there; "
            "used once there is a direct path)") in str(err.value)
    # With the weights in its tensor cache, or small enough for the circuit, it is used.
    assert over_relays([home2], {"peer-home2"}, links.get, 900 * MiB) == ([home2], [])
    assert over_relays([home2], set(), links.get, 100 * MiB) == ([home2], [])
