"""Finding the swarm's other nodes: mDNS on the LAN, the Kademlia DHT across networks, and
the bootstrap addresses from the token or the command line.

Discovery only dials; admission decides who stays. The mDNS record is sealed with a key from
the token, under a service type derived from it, so LAN neighbours without the token learn
nothing. In the DHT each node provides itself under rendezvous keys that rotate every hour
(`swarm.trust.keys`), so outsiders cannot look the swarm up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from swarm.net import mdns
from swarm.trust.keys import SwarmKeys, rendezvous_epochs
from swarm.trust.seal import SealError, seal, unseal

log = logging.getLogger(__name__)

MDNS_CONTEXT = "covey-mdns-v1"
MDNS_RECORD_VERSION = 1
DIAL_TIMEOUT_S = 10.0
FAST_SEARCH_S = 2.0  # how often to look while the node is young or alone
SLOW_SEARCH_S = 15.0
YOUNG_S = 60.0
REPROVIDE_S = 60.0


def mdns_record(keys: SwarmKeys, peer_id: str, addrs: Sequence[str]) -> bytes:
    body = {"version": MDNS_RECORD_VERSION, "peer_id": peer_id, "addrs": list(addrs)[:8]}
    return seal(keys.mdns_key, json.dumps(body).encode(), MDNS_CONTEXT)


def read_mdns_record(keys: SwarmKeys, payload: bytes) -> PeerInfo | None:
    """The peer an mDNS record announces, or None for anything not sealed by this swarm."""
    try:
        body = json.loads(unseal(keys.mdns_key, payload, MDNS_CONTEXT))
        if body.get("version") != MDNS_RECORD_VERSION:
            return None
        peer = ID.from_base58(body["peer_id"])
        addrs = [multiaddr.Multiaddr(a) for a in transport_addrs(body["addrs"], str(peer))]
    except (SealError, ValueError, KeyError, TypeError, AttributeError):
        return None
    except Exception:  # noqa: BLE001 - multiaddr/base58 raise assorted types on garbage
        return None
    return PeerInfo(peer, addrs) if addrs else None


def transport_addrs(addrs: object, peer_id: str) -> list[str]:
    """The dialable part of each advertised address; any naming another peer is dropped."""
    if not isinstance(addrs, list):
        return []
    out = []
    for addr in addrs[:8]:
        if not isinstance(addr, str):
            continue
        transport, _, owner = addr.partition("/p2p/")
        if owner and owner != peer_id:
            continue
        out.append(transport)
    return out


def dial_candidates(
    found: Sequence[PeerInfo], me: ID, connected: Callable[[ID], bool], banned: Callable[[ID], bool]
) -> list[PeerInfo]:
    """Which found peers to dial: not us, not already connected, not kept out (pure)."""
    chosen: dict[ID, PeerInfo] = {}
    for info in found:
        if info.peer_id == me or connected(info.peer_id) or banned(info.peer_id):
            continue
        chosen.setdefault(info.peer_id, info)
    return list(chosen.values())


class Discovery:
    def __init__(
        self,
        host: IHost,
        keys: SwarmKeys,
        listen_ips: Sequence[str],
        bootstrap: Sequence[str],
        lan_only: bool,
        is_banned: Callable[[ID], bool],
    ) -> None:
        self.host = host
        self.keys = keys
        self.listen_ips = list(listen_ips)
        self.bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in bootstrap]
        self.lan_only = lan_only
        self._is_banned = is_banned
        self.dht: KadDHT | None = None if lan_only else KadDHT(host, DHTMode.SERVER)
        self._found_send, self._found = trio.open_memory_channel[PeerInfo](256)
        self._mdns: mdns.MdnsService | None = None
        self._started = time.monotonic()

    # -- dialling ---------------------------------------------------------------------------

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def dial(self, info: PeerInfo, via: str) -> bool:
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(info)
        except Exception as exc:  # noqa: BLE001 - unreachable peers are routine
            log.debug("could not reach %s found by %s: %r", info.peer_id, via, exc)
            return False
        log.info("connected to %s (found by %s)", info.peer_id, via)
        return True

    async def run_dialer(self) -> None:
        """Dial what mDNS finds (its callbacks run on zeroconf's thread and only enqueue)."""
        async with trio.open_nursery() as nursery:
            async for info in self._found:
                for chosen in dial_candidates(
                    [info], self.host.get_id(), self._connected, self._is_banned
                ):
                    nursery.start_soon(self.dial, chosen, "mDNS")

    # -- mDNS -----------------------------------------------------------------------------

    async def start_mdns(self, advertised: Sequence[str]) -> None:
        interfaces = mdns.mdns_interfaces_for(self.listen_ips)
        port = _first_port(advertised)
        record = mdns_record(self.keys, self.host.get_id().to_base58(), advertised)
        token = trio.lowlevel.current_trio_token()

        def on_found(payload: bytes) -> None:  # zeroconf's thread
            info = read_mdns_record(self.keys, payload)
            if info is None:
                return
            with contextlib.suppress(trio.WouldBlock, trio.RunFinishedError):
                trio.from_thread.run_sync(self._found_send.send_nowait, info, trio_token=token)

        instance = self.keys.mdns_tag.hex()[:6] + self.host.get_id().to_base58()[-20:]
        self._mdns = mdns.MdnsService(
            mdns.service_type_from_tag(self.keys.mdns_tag), instance, record, interfaces, port,
            on_found,
        )
        if await trio.to_thread.run_sync(self._mdns.start):
            log.info("mDNS discovery on %s", ", ".join(interfaces))

    async def stop_mdns(self) -> None:
        if self._mdns is not None:
            service, self._mdns = self._mdns, None
            await trio.to_thread.run_sync(service.close)

    # -- DHT and bootstrap -------------------------------------------------------------------

    async def run_wide_area(self) -> None:
        """Keep bootstrap peers connected; unless LAN-only, provide ourselves in the DHT and
        look for the others there."""
        last_provided: dict[int, float] = {}
        while True:
            await self._connect_bootstrap()
            if self.dht is not None and self.dht.get_routing_table_size() > 0:
                await self._provide(last_provided)
                await self._search()
            young = time.monotonic() - self._started < YOUNG_S
            await trio.sleep(FAST_SEARCH_S if young or not self._others() else SLOW_SEARCH_S)

    async def _connect_bootstrap(self) -> None:
        for info in dial_candidates(
            self.bootstrap, self.host.get_id(), self._connected, self._is_banned
        ):
            self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
            if await self.dial(info, "bootstrap") and self.dht is not None:
                await self.add_to_dht(info.peer_id)

    async def add_to_dht(self, peer: ID) -> None:
        if self.dht is None:
            return
        try:
            await self.dht.add_peer(peer)
        except Exception as exc:  # noqa: BLE001
            log.debug("DHT add_peer %s: %r", peer, exc)

    async def _provide(self, last_provided: dict[int, float]) -> None:
        assert self.dht is not None
        current, _, following = rendezvous_epochs(time.time())
        for epoch in (current, following):
            if time.monotonic() - last_provided.get(epoch, -1e9) < REPROVIDE_S:
                continue
            try:
                await self.dht.provide(self.keys.rendezvous(epoch).hex())
                last_provided[epoch] = time.monotonic()
            except Exception as exc:  # noqa: BLE001
                log.debug("DHT provide failed: %r", exc)
        for epoch in [e for e in last_provided if e < current]:
            del last_provided[epoch]

    async def _search(self) -> None:
        assert self.dht is not None
        current = rendezvous_epochs(time.time())[0]
        try:
            with trio.move_on_after(DIAL_TIMEOUT_S):
                found = await self.dht.find_providers(self.keys.rendezvous(current).hex(), 20)
        except Exception as exc:  # noqa: BLE001
            log.debug("DHT lookup failed: %r", exc)
            return
        for info in dial_candidates(
            found or [], self.host.get_id(), self._connected, self._is_banned
        ):
            await self.dial(info, "DHT")

    def _others(self) -> int:
        return len(self.host.get_network().get_connections_map())


def _first_port(addrs: Sequence[str]) -> int:
    for a in addrs:
        try:
            return int(multiaddr.Multiaddr(a).value_for_protocol("tcp"))
        except Exception:  # noqa: BLE001
            continue
    return 0
