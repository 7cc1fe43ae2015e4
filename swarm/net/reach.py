"""Reaching the members this node cannot simply dial, and saying how each one is reached.

Every node publishes a "reach" ledger entry (`ReachEntry`): its direct addresses, whether it
relays for the swarm, and the circuits (`…/p2p/RELAY/p2p-circuit`) it holds a slot on. A node
that is not reachable itself keeps reservations on up to `RESERVE_ON` relays it finds there.
Each round, every live member that is not connected is dialled: its direct addresses first
(those its router maps by UPnP among them; skipped for a while after they failed), then its
circuits through a relay. Admission then runs on the connection like on any other, so every
Covey protocol works over it. A member reached through a relay only is then offered a hole
punch (`swarm.net.holepunch`), which makes the connection direct where both NATs allow it.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from swarm.ledger.entries import REACH_KEY, ReachEntry, read
from swarm.ledger.rules import Ledger, is_live
from swarm.net import relay as circuit
from swarm.net.bulk_path import Relayed
from swarm.net.discovery import transport_addrs
from swarm.net.holepunch import HOLE_PUNCHED, HolePunch
from swarm.net.relay_limits import RelayLimits
from swarm.net.upnp import UPNP, via_upnp

log = logging.getLogger(__name__)

RESERVE_ON = 2
ROUND_S = 2.0
DIAL_TIMEOUT_S = 5.0
DIRECT_RETRY_S = 60.0
DIRECT = "direct"


def is_public(addr: str) -> bool:
    """Whether a multiaddr's IP is on the public internet (so others can dial it)."""
    try:
        ip = multiaddr.Multiaddr(addr).value_for_protocol("ip4")
        return ipaddress.ip_address(ip).is_global
    except Exception:  # noqa: BLE001 - no ip4 part, or garbage
        return False


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(multiaddr.Multiaddr(addr).value_for_protocol("ip4")).is_loopback
    except Exception:  # noqa: BLE001
        return False


def live_entries(ledger: Ledger, me: str, now: float) -> dict[str, ReachEntry]:
    """Each other member's live, well-formed reach entry, by owner."""
    found = {}
    for record in ledger.by_key(REACH_KEY):
        owner = record.entry.owner
        if owner == me or not is_live(record, now):
            continue
        entry = read(ReachEntry.from_value, record.entry.value)
        if entry is not None:
            found[owner] = entry
    return found


def pick_relays(entries: Mapping[str, ReachEntry], connected: Collection[str], n: int) -> list[str]:
    """Up to `n` relays to reserve on: connected ones first, then by peer id (stable)."""
    offers = [owner for owner, entry in entries.items() if entry.relay]
    return sorted(offers, key=lambda owner: (owner not in connected, owner))[:n]


def dials_circuit(me: str, peer: str, reachable_by_circuit: bool, mapped: bool = False,
                  peer_mapped: bool = False) -> bool:
    """Whether this node opens the circuit to `peer`. When both hold circuits only the lower
    peer id dials, so two circuits never cross (one connection per peer: the crossing pair
    would each keep its own and close the other's). Where one side's router maps its port by
    UPnP, the other dials: the mapped address first, a circuit only if that fails."""
    if mapped != peer_mapped:
        return peer_mapped
    return not reachable_by_circuit or me < peer


def link_label(relay_name: str | None, upnp: bool = False, punched: bool = False) -> str:
    if relay_name is not None:
        return f"relayed via {relay_name}"
    if punched:
        return HOLE_PUNCHED
    return UPNP if upnp else DIRECT


def _only_relay(conns: Collection[INetConn]) -> ID | None:
    """The relay of a peer's connections when all run through one; None if any is direct."""
    relays = [circuit.relay_of_connection(c) for c in conns]
    return relays[0] if relays and None not in relays else None


def _name(peer: ID, names: Mapping[str, str]) -> str:
    return names.get(peer.to_base58(), peer.to_base58()[-8:])


@dataclass
class Held:
    """A reservation this node holds on a relay."""

    granted_at: float
    expires_at: float
    circuits: tuple[str, ...]

    def due(self, now: float) -> bool:
        return now >= self.granted_at + (self.expires_at - self.granted_at) / 2


class Reach:
    def __init__(self, host: IHost, ledger: Ledger, *, reserves: bool, offers_relay: bool,
                 is_banned: Callable[[ID], bool], changed: Callable[[], None],
                 is_admitted: Callable[[ID], bool] | None = None) -> None:
        self.host = host
        self.ledger = ledger
        self.reserves = reserves
        self.offers_relay = offers_relay
        self.dials = True  # off for a LAN-only node: it meets peers by mDNS alone
        self.upnp: tuple[str, ...] = ()  # this node's addresses its router maps (UPnP)
        self._is_banned = is_banned
        self._changed = changed
        self.held: dict[ID, Held] = {}
        self._direct_failed: dict[ID, float] = {}
        self._dialing: set[ID] = set()
        self.circuit_caps: dict[ID, int | None] = {}  # peer -> the cap of the circuit we opened
        self.stop_side = circuit.StopSide(host, lambda relay: relay in self.held)
        # Punching needs to know who is a member; without that it stays off.
        self.holepunch = HolePunch(host, is_admitted) if is_admitted is not None else None
        self._warming = False  # learning the observed IPs for the hole punch

    def entry(self, addrs: list[str]) -> ReachEntry:
        """This node's reach entry: `addrs`, the router's UPnP mappings first."""
        circuits = [c for held in self.held.values() for c in held.circuits]
        upnp = self.upnp
        direct = [*upnp, *(a for a in addrs if not is_loopback(a) and a not in upnp)]
        return ReachEntry(tuple(direct)[:8], tuple(circuits)[:8], self.offers_relay, upnp[:8])

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    def links(self, names: Mapping[str, str]) -> dict[str, str]:
        """How each connected peer is reached: "direct", "hole-punched" (direct after a hole
        punch), "UPnP" (at the address its router maps) or "relayed via NAME"."""
        relays = self.relays(names)
        entries = live_entries(self.ledger, self.host.get_id().to_base58(), time.time())
        out = {}
        for peer, conns in self.host.get_network().get_connections_map().items():
            owner = peer.to_base58()
            remote = [str(a) for c in conns for a in c.get_transport_addresses()]
            mapped = entries[owner].upnp if owner in entries else ()
            punched = self.holepunch is not None and any(map(self.holepunch.is_punched, conns))
            out[owner] = link_label(relays.get(owner), via_upnp(remote, mapped), punched)
        return out

    def relays(self, names: Mapping[str, str]) -> dict[str, str]:
        """The connected peers reached only through a relay: peer id -> the relay's name."""
        out = {}
        for peer, conns in self.host.get_network().get_connections_map().items():
            relay = _only_relay(conns)
            if relay is not None:
                out[peer.to_base58()] = _name(relay, names)
        return out

    def relayed(self, peer_id: str, names: Mapping[str, str]) -> Relayed | None:
        """The relay `peer_id` is reached through and its circuit's byte cap; None when the
        peer is reached directly (or not connected: a dial will find out)."""
        peer = ID.from_base58(peer_id)
        relay = _only_relay(self.host.get_network().get_connections(peer))
        if relay is None:
            return None
        caps = self.stop_side.caps | self.circuit_caps
        return Relayed(_name(relay, names), caps.get(peer, RelayLimits().circuit_bytes))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                me = self.host.get_id().to_base58()
                entries = live_entries(self.ledger, me, time.time())
                if self.reserves:
                    await self._keep_reservations(entries)
                for owner, entry in entries.items() if self.dials else ():
                    peer = ID.from_base58(owner)
                    if (peer not in self._dialing and not self._connected(peer)
                            and not self._is_banned(peer)):
                        self._dialing.add(peer)
                        nursery.start_soon(self._reach, peer, entry)
                if self.holepunch is not None:
                    for peer in self.holepunch.candidates():
                        nursery.start_soon(self.holepunch.punch, peer)
                    if not self._warming:
                        self._warming = True
                        nursery.start_soon(self._warm)
                await trio.sleep(ROUND_S)

    async def _warm(self) -> None:
        try:
            if self.holepunch is not None:
                await self.holepunch.warm()
        except Exception as exc:  # noqa: BLE001 - a member that went away; next round again
            log.debug("observed addresses not learnt: %r", exc)
        finally:
            self._warming = False

    # -- reservations ---------------------------------------------------------------------------

    async def _keep_reservations(self, entries: Mapping[str, ReachEntry]) -> None:
        connected = {p.to_base58() for p in self.host.get_network().get_connections_map()}
        chosen = pick_relays(entries, connected, RESERVE_ON)
        before = {relay: held.circuits for relay, held in self.held.items()}
        for relay in [r for r in self.held if r.to_base58() not in chosen
                      or not self._connected(r)]:
            del self.held[relay]
        for owner in chosen:
            relay = ID.from_base58(owner)
            held = self.held.get(relay)
            if held is not None and not held.due(time.time()):
                continue
            if not self._connected(relay) and not await self._dial_direct(relay, entries[owner]):
                continue
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    expires, addrs = await circuit.reserve(self.host, relay)
            except Exception as exc:  # noqa: BLE001 - the relay is full, gone or refuses us
                log.info("no relay slot on %s: %r", relay, exc)
                self.held.pop(relay, None)
                continue
            circuits = tuple(circuit.circuit_addr(a, relay) for a in addrs
                             if not is_loopback(a))
            self.held[relay] = Held(time.time(), expires, circuits)
            if held is None:
                log.info("holding a relay slot on %s", relay)
        if {relay: held.circuits for relay, held in self.held.items()} != before:
            self._changed()

    # -- dialling members -----------------------------------------------------------------------

    async def _reach(self, peer: ID, entry: ReachEntry) -> None:
        try:
            if await self._dial_direct(peer, entry):
                return
            me = self.host.get_id().to_base58()
            if not dials_circuit(me, peer.to_base58(), bool(self.held), bool(self.upnp),
                                 bool(entry.upnp)):
                return
            for address in entry.circuits:
                found = circuit.relay_of(address)
                if found is None or found[0] == self.host.get_id():
                    continue
                if await self._dial_circuit(peer, *found):
                    return
        finally:
            self._dialing.discard(peer)

    async def _dial_direct(self, peer: ID, entry: ReachEntry) -> bool:
        failed = self._direct_failed.get(peer)
        addrs = transport_addrs(list(entry.addrs), peer.to_base58())
        if not addrs or (failed is not None and time.monotonic() - failed < DIRECT_RETRY_S):
            return False
        try:
            if await self._dial_mapped(peer, entry):
                return True
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in addrs]))
        except Exception as exc:  # noqa: BLE001 - behind NAT, or gone
            log.debug("no direct path to %s: %r", peer, exc)
            self._direct_failed[peer] = time.monotonic()
            return False
        self._direct_failed.pop(peer, None)
        return True

    async def _dial_mapped(self, peer: ID, entry: ReachEntry) -> bool:
        """Dial the addresses `peer`'s router maps by UPnP, each on its own: among the
        peer's other known addresses is the port its NAT picked for an outgoing connection,
        which a NAT drops silently, and a dial that tries that one first times out."""
        for addr in transport_addrs(list(entry.upnp), peer.to_base58()):
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.get_network().dial_addr(multiaddr.Multiaddr(addr), peer)
                return True
            except Exception as exc:  # noqa: BLE001 - the mapping does not work from here
                log.debug("no path to %s at its mapped %s: %r", peer, addr, exc)
        return False

    async def _dial_circuit(self, peer: ID, relay: ID, relay_addr: str) -> bool:
        try:
            with trio.fail_after(DIAL_TIMEOUT_S * 2):
                if not self._connected(relay):
                    await self.host.connect(PeerInfo(relay, [multiaddr.Multiaddr(relay_addr)]))
                await circuit.dial(self.host, relay, peer, self.circuit_caps)
        except Exception as exc:  # noqa: BLE001 - the relay or the peer is gone, or refuses
            log.info("no circuit to %s via %s: %r", peer, relay, exc)
            return False
        log.info("connected to %s through relay %s", peer, relay)
        return True
