"""UPnP port mapping, without a router: when a node asks for a mapping, what it publishes, that
it removes the mapping when it stops, and how a peer reached at a mapped address shows. The IGD
is a fake behind `Gateway`; nothing here sends SSDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from app.cli.command import build_parser
from swarm.ledger.entries import ReachEntry
from swarm.net.reach import link_label
from swarm.net.upnp import (
    NO_UPNP_ENV,
    PortMapper,
    mapped_addr,
    port_to_map,
    upnp_allowed,
    via_upnp,
)
from swarm.node.main import resolve_settings
from swarm.node.settings import load_settings, save_settings
from swarm.trust.token import new_token

LAN = "/ip4/192.168.1.20/tcp/4001"


def test_a_node_asks_for_a_mapping_only_when_it_cannot_be_reached_and_may() -> None:
    assert port_to_map(True, False, ["/ip4/127.0.0.1/tcp/5", LAN]) == 4001
    assert port_to_map(False, False, [LAN]) is None  # --no-upnp
    assert port_to_map(True, True, [LAN]) is None  # LAN-only
    assert port_to_map(True, False, [LAN, "/ip4/1.1.1.1/tcp/4001"]) is None  # public
    assert port_to_map(True, False, ["/ip4/127.0.0.1/tcp/4001"]) is None  # loopback only


def test_covey_no_upnp_in_the_environment_overrides_the_setting() -> None:
    assert upnp_allowed(True, {}) and upnp_allowed(True, {NO_UPNP_ENV: "0"})
    assert not upnp_allowed(True, {NO_UPNP_ENV: "1"})
    assert not upnp_allowed(False, {})


def test_a_router_behind_another_nat_maps_nothing_useful() -> None:
    assert mapped_addr("198.51.100.9", 4001) is None  # documentation range: not global
    assert mapped_addr("100.64.0.5", 4001) is None  # carrier-grade NAT
    assert mapped_addr("8.8.4.4", 4001) == "/ip4/8.8.4.4/tcp/4001"
    assert mapped_addr("garbage", 4001) is None


class FakeIgd:
    def __init__(self, external: str | None = "8.8.4.4", accepts: bool = True) -> None:
        self.external, self.accepts = external, accepts
        self.mapped: dict[int, int] = {}  # port -> lease
        self.removed: list[int] = []

    def discover(self) -> str | None:
        return self.external

    def add(self, port: int, lease_s: int) -> bool:
        if self.accepts:
            self.mapped[port] = lease_s
        return self.accepts

    def remove(self, port: int) -> bool:
        self.removed.append(port)
        return self.mapped.pop(port, None) is not None


def _map_for_a_while(igd: FakeIgd) -> tuple[tuple[str, ...], int]:
    """Run a PortMapper on `igd` briefly: what it published meanwhile, how often it said so."""
    changes: list[int] = []
    seen: list[tuple[str, ...]] = []

    async def main() -> None:
        mapper = PortMapper(lambda: igd, lambda: changes.append(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mapper.run, 4001)
            await trio.sleep(0.5)
            seen.append(mapper.addrs)
            nursery.cancel_scope.cancel()
        assert mapper.addrs == ()

    trio.run(main)
    return seen[0], len(changes)


def test_the_mapping_is_published_while_the_node_runs_and_removed_when_it_stops() -> None:
    igd = FakeIgd()
    published, changes = _map_for_a_while(igd)
    assert published == ("/ip4/8.8.4.4/tcp/4001",) and changes == 1
    assert igd.removed == [4001] and igd.mapped == {}


@pytest.mark.parametrize("igd", [FakeIgd(external=None), FakeIgd(accepts=False),
                                 FakeIgd(external="10.0.0.1")])
def test_no_router_a_refusing_one_or_a_double_nat_publish_nothing(igd: FakeIgd) -> None:
    assert _map_for_a_while(igd) == ((), 0)
    assert igd.removed == []


def test_the_reach_entry_carries_the_mapped_address_first_and_older_entries_still_read() -> None:
    mapped = "/ip4/8.8.4.4/tcp/4001"
    entry = ReachEntry((mapped, LAN), (), False, (mapped,))
    assert ReachEntry.from_value(entry.to_value()) == entry
    older = ReachEntry((LAN,), (), False).to_value()
    assert "upnp" not in older and ReachEntry.from_value(older).upnp == ()
    with pytest.raises(ValueError):
        ReachEntry.from_value({**older, "upnp": "8.8.4.4"})


def test_a_peer_reached_at_its_mapped_address_shows_as_upnp() -> None:
    mapped = ("/ip4/8.8.4.4/tcp/4001",)
    assert via_upnp(["/ip4/8.8.4.4/tcp/4001/p2p/QmPeer"], mapped)
    assert not via_upnp([LAN], mapped)
    assert link_label(None, upnp=True) == "UPnP"
    assert link_label(None) == "direct" and link_label("office", upnp=True) == \
        "relayed via office"


def test_no_upnp_is_remembered(tmp_path: Path) -> None:
    token = new_token().encode()

    def start(*options: str) -> bool:
        args = build_parser().parse_args(["node", "--token", token, *options])
        settings = resolve_settings(args, tmp_path)
        save_settings(tmp_path, settings)
        return settings.upnp

    assert start() is True
    assert start("--no-upnp") is False
    assert start() is False and load_settings(tmp_path).upnp is False  # type: ignore[union-attr]
    assert start("--upnp") is True
