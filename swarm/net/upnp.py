"""UPnP port mapping: when this node cannot be reached from the internet and its router offers
UPnP IGD, map the libp2p listen port there so that members elsewhere dial it directly.

The mapped address goes into the node's reach entry, marked as UPnP (peers that reach the node
through it show the link as "UPnP"); the mapping is renewed while the node runs and removed
when it stops. Opt-out: `covey node --no-upnp` (remembered), or COVEY_NO_UPNP=1 (the tests set
it: nothing may send SSDP on a real network from a test).

The IGD client sits behind `Gateway`: `MiniupnpcGateway` is a thin adapter over miniupnpc
(blocking calls, run in a thread), and `PortMapper` and the decisions are tested with a fake.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

import multiaddr
import trio

log = logging.getLogger(__name__)

NO_UPNP_ENV = "COVEY_NO_UPNP"
LEASE_S = 3600  # the mapping's lease on the router; renewed at half of it
RETRY_S = 60.0  # after a refused mapping
DISCOVER_MS = 2000
REMOVE_TIMEOUT_S = 5.0
DESCRIPTION = "Covey node"
UPNP = "UPnP"  # the link type of a peer reached at its mapped address


class Gateway(Protocol):
    """A router's IGD, as far as Covey uses it. Calls block."""

    def discover(self) -> str | None:
        """The router's external IP, or None when there is no usable IGD."""

    def add(self, port: int, lease_s: int) -> bool:
        """Forward external TCP `port` to this machine's same port."""

    def remove(self, port: int) -> bool: ...


class MiniupnpcGateway:
    """`Gateway` over miniupnpc (SSDP discovery on the local network, then SOAP)."""

    def __init__(self) -> None:
        import miniupnpc  # only here: a node with UPnP off never loads it

        self._igd = miniupnpc.UPnP()
        self._igd.discoverdelay = DISCOVER_MS

    def discover(self) -> str | None:
        try:
            if not self._igd.discover():
                return None
            self._igd.selectigd()
            return str(self._igd.externalipaddress()) or None
        except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception on "no IGD"
            log.debug("no UPnP gateway: %r", exc)
            return None

    def add(self, port: int, lease_s: int) -> bool:
        try:
            return bool(self._igd.addportmapping(port, "TCP", self._igd.lanaddr, port,
                                                 DESCRIPTION, "", lease_s))
        except Exception as exc:  # noqa: BLE001 - the router's refusal (a conflict, no rights)
            log.debug("UPnP: mapping port %s refused: %r", port, exc)
            return False

    def remove(self, port: int) -> bool:
        try:
            return bool(self._igd.deleteportmapping(port, "TCP"))
        except Exception as exc:  # noqa: BLE001 - already gone, or the router left
            log.debug("UPnP: removing port %s: %r", port, exc)
            return False


# -- decisions (pure) ---------------------------------------------------------------------------

def upnp_allowed(setting: bool, environ: dict[str, str] | None = None) -> bool:
    """The user's setting, unless COVEY_NO_UPNP is set (to anything but "" or "0")."""
    flag = (os.environ if environ is None else environ).get(NO_UPNP_ENV, "")
    return setting and flag in ("", "0")


def _ip4(addr: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(multiaddr.Multiaddr(addr).value_for_protocol("ip4"))
    except Exception:  # noqa: BLE001 - no ip4 part, or garbage
        return None


def port_to_map(allowed: bool, lan_only: bool, addrs: Iterable[str]) -> int | None:
    """The TCP port to map: None when UPnP is off, the node is LAN-only, one of its own
    addresses is already public, or it listens on loopback only (a router cannot forward there).
    """
    if not allowed or lan_only:
        return None
    ports = []
    for addr in addrs:
        ip = _ip4(addr)
        if ip is None:
            continue
        if ip.is_global:
            return None
        if not ip.is_loopback:
            ports.append(int(multiaddr.Multiaddr(addr).value_for_protocol("tcp")))
    return ports[0] if ports else None


def mapped_addr(external_ip: str, port: int) -> str | None:
    """The address others dial, or None when the router's own external IP is not public
    (a second NAT behind it: the mapping would reach no one)."""
    try:
        if not ipaddress.IPv4Address(external_ip).is_global:
            return None
    except ValueError:
        return None
    return f"/ip4/{external_ip}/tcp/{port}"


def via_upnp(remote: Iterable[str], mapped: Iterable[str]) -> bool:
    """Whether a direct connection's remote address is one the peer mapped by UPnP."""
    ours = {a.partition("/p2p/")[0] for a in mapped}
    return any(a.partition("/p2p/")[0] in ours for a in remote)


# -- the mapping's life -------------------------------------------------------------------------

class PortMapper:
    """Maps one port on the router while `run` runs; `addrs` is what the reach entry
    publishes as mapped."""

    def __init__(self, gateway: Callable[[], Gateway], changed: Callable[[], None]) -> None:
        self._gateway = gateway
        self._changed = changed
        self.mapped: str | None = None

    @property
    def addrs(self) -> tuple[str, ...]:
        return (self.mapped,) if self.mapped else ()

    async def run(self, port: int) -> None:
        try:
            gateway = await trio.to_thread.run_sync(self._gateway)
        except ImportError as exc:  # a build without miniupnpc: no mapping, no harm
            log.info("UPnP: unavailable (%s)", exc)
            return
        external = await trio.to_thread.run_sync(gateway.discover)
        addr = mapped_addr(external, port) if external else None
        if addr is None:
            log.info("UPnP: no router with a public address offers port mapping%s",
                     f" (its external address is {external})" if external else "")
            return
        try:
            while True:
                ok = await trio.to_thread.run_sync(gateway.add, port, LEASE_S)
                if (addr if ok else None) != self.mapped:
                    self.mapped = addr if ok else None
                    log.info("UPnP: %s", f"reachable at {addr}" if ok else
                             f"the router refused to map port {port}")
                    self._changed()
                await trio.sleep(LEASE_S / 2 if ok else RETRY_S)
        finally:
            if self.mapped is not None:
                self.mapped = None
                with trio.CancelScope(shield=True), trio.move_on_after(REMOVE_TIMEOUT_S):
                    # A router gone silent must not hold the node's exit past the timeout.
                    await trio.to_thread.run_sync(  # type: ignore[call-arg]  # trio 0.35 has it
                        partial(gateway.remove, port), abandon_on_cancel=True)
