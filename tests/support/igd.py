"""A UPnP IGD on a test's NAT router: miniupnpd in the router's namespace, answering SSDP on
the home's side only, with the nftables chains it fills and the router's forward rule that
lets a mapped connection in. Only in namespaces a test made: nothing reaches a real network.

Needs miniupnpd built for nftables (Debian: miniupnpd-nftables; or COVEY_MINIUPNPD naming the
binary, e.g. one unpacked with `dpkg -x` so that no service starts on this machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.netns import NatHome, Netns

_CHAINS = """table inet filter {
  chain miniupnpd { }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
                     jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
                      jump postrouting_miniupnpd; }
}
"""


def miniupnpd() -> str | None:
    return os.environ.get("COVEY_MINIUPNPD") or shutil.which("miniupnpd")


def _device(netns: Netns, ns: str, ip: str) -> str:
    for line in netns.run(ns, ["ip", "-o", "-4", "addr"]).stdout.splitlines():
        if f" {ip}/" in line:
            return line.split()[1].split("@")[0]
    raise AssertionError(f"no interface with {ip} in {ns}")


def start_igd(netns: Netns, home: NatHome, lan_gateway: str, workdir: Path
              ) -> subprocess.Popen[bytes]:
    """miniupnpd on `home`'s router: maps ports 1024+ to the home's own address only."""
    binary = miniupnpd()
    assert binary is not None
    wan, lan = _device(netns, home.router, home.wan_ip), _device(netns, home.router, lan_gateway)
    rules, conf = workdir / "igd.nft", workdir / "miniupnpd.conf"
    rules.write_text(_CHAINS)
    netns.run(home.router, ["nft", "-f", str(rules)])
    # A router that offers UPnP lets the connections it maps through its firewall.
    netns.run(home.router, ["iptables", "-w", "-I", "FORWARD", "1", "-i", wan, "-m", "conntrack",
                            "--ctstate", "DNAT", "-j", "ACCEPT"])
    conf.write_text("\n".join([
        f"ext_ifname={wan}", f"listening_ip={lan}", "http_port=0", "enable_natpmp=no",
        "enable_upnp=yes", "secure_mode=yes", "upnp_table_name=filter",
        "upnp_nat_table_name=filter", "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd", "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"allow 1024-65535 {home.ip}/32 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""]))
    log = (workdir / "miniupnpd.log").open("ab")
    return netns.popen(home.router, [binary, "-d", "-4", "-f", str(conf),
                                     "-P", str(workdir / "miniupnpd.pid")],
                       stdout=log, stderr=log)


def mapped_ports(netns: Netns, home: NatHome) -> str:
    """The router's nftables chain of mapped ports, as `nft` lists it."""
    return netns.run(home.router, ["nft", "list", "chain", "inet", "filter",
                                   "prerouting_miniupnpd"]).stdout
