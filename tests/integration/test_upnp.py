"""UPnP port mapping with a real IGD, in network namespaces only: home 1's router runs
miniupnpd; home 1's node maps its port there and publishes the mapped address; home 2 (behind
its own NAT, no UPnP) then dials home 1 directly at it, and shows the link as "UPnP"; when
home 1's node stops, the mapping is gone from the router."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarm.trust.token import new_token
from tests.integration.test_reach import _link
from tests.support.igd import mapped_ports, miniupnpd, start_igd
from tests.support.netns import Netns, nat_skip_reason, two_homes
from tests.support.node_harness import launch_homes, launch_node, wait_started, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(nat_skip_reason() is not None, reason=str(nat_skip_reason())),
    pytest.mark.skipif(miniupnpd() is None, reason="needs miniupnpd (nftables build), or "
                                                   "COVEY_MINIUPNPD naming one"),
]

# Addresses that count as public (a router with a private outside address maps nothing of
# use): they exist only on the namespaces' own bridge.
PUBLIC_NET = "11.0.0.0/24"


def test_a_home_behind_a_upnp_router_is_dialled_directly_at_its_mapped_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = new_token().encode()
    with Netns() as netns:
        net = two_homes(netns, PUBLIC_NET)
        start_igd(netns, net.home1, "192.168.1.1", tmp_path)
        monkeypatch.setenv("COVEY_NO_UPNP", "0")  # home 1 alone may ask its router
        office, home1 = (wait_started(n) for n in launch_homes(
            netns, net, token, tmp_path, [("home1", net.home1, [])]))
        monkeypatch.setenv("COVEY_NO_UPNP", "1")
        wait_until(lambda: "4001" in mapped_ports(netns, net.home1), 20,
                   "home 1's router to map its port", [home1])
        time.sleep(3)  # the mapped address goes out with home 1's next reach entry
        boot = f"/ip4/{net.public_ip}/tcp/4001/p2p/{office.peer_id}"
        home2 = wait_started(launch_node(netns, net.home2.ns, token, "home2", tmp_path,
                                         "--bootstrap", boot,
                                         "--listen", f"/ip4/{net.home2.ip}/tcp/4002"))
        wait_until(lambda: _link(home2, "home1") == "UPnP", 30,
                   "home 2 to reach home 1 at its mapped port", [home1, home2])
        assert "UPnP: reachable at /ip4/11.0.0.11/tcp/4001" in home1.log()
        assert _link(home2, "office") == "direct"
        assert home1.stop() == 0
        assert "4001" not in mapped_ports(netns, net.home1)  # removed on the way out
