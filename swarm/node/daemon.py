"""The node daemon: one libp2p host, its gatekeeper, ledger, discovery and local HTTP API.

`Node.run` is the whole lifetime of a node under trio: listen, admit peers, publish this
machine's info as a heartbeat, keep the ledger in sync, find other nodes, serve the API on
127.0.0.1, and on stop say goodbye (an entry that expires at once) so peers show it offline
immediately rather than after the heartbeat's ttl. The /api endpoints that show and change
the node are in `swarm.node.api_handlers`.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as DHT_PROTOCOL
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from backends.store.model_store import ModelStore
from swarm.api.cors import CorsPolicy
from swarm.api.embeddings import EmbeddingsApi
from swarm.api.files import load_or_create_secret, remove_api_info, write_api_info
from swarm.api.openai_api import OpenAiApi
from swarm.api.server import LocalApi, Request, Response
from swarm.ledger.entries import (
    FEDERATED_KEY,
    MODELS_KEY,
    NODE_KEY,
    REACH_KEY,
    WORKER_KEY,
    NodeInfo,
    WorkerOffer,
    read,
)
from swarm.ledger.rules import SignedEntry, is_live
from swarm.ledger.sync import PUSH_PROTOCOL, SYNC_PROTOCOL, SYNC_PROTOCOL_V2, LedgerSync
from swarm.net import mdns
from swarm.net.bulk_path import Relayed
from swarm.net.discovery import Discovery
from swarm.net.gatekeeper import Gatekeeper
from swarm.net.holepunch import OBSERVED_PROTOCOL
from swarm.net.holepunch import PROTOCOL_ID as HOLEPUNCH_PROTOCOL
from swarm.net.host import build_host, parse_multiaddrs
from swarm.net.reach import Reach, is_public
from swarm.net.relay import HOP_PROTOCOL, STOP_PROTOCOL, RelayHop, RelayLimits
from swarm.net.upnp import MiniupnpcGateway, PortMapper, port_to_map, upnp_allowed
from swarm.node.api_handlers import NodeApi
from swarm.node.background import keep_running
from swarm.node.copy_direct import PROTOCOL as COPY_DIRECT_PROTOCOL
from swarm.node.copy_direct import DirectCopyService
from swarm.node.local_facts import collect_node_info, covey_version
from swarm.node.model_copy import PROTOCOL as COPY_PROTOCOL
from swarm.node.model_copy import Copier, CopyServer, Offer, shared_value
from swarm.node.model_copy import offers as copy_offers
from swarm.routes.auto import RoutePrefs
from swarm.routes.embeddings import LocalEmbedder
from swarm.routes.federated import PROTOCOL as FEDERATED_PROTOCOL
from swarm.routes.federated import Candidate, FederatedRoute, FederatedService, served_models
from swarm.routes.federated import candidates as federated_candidates
from swarm.routes.local import LocalRoute
from swarm.routes.preparing import BundledModels
from swarm.routes.router import Router
from swarm.routes.sharded import ShardedRoute
from swarm.trust.identity import load_or_create_identity
from swarm.trust.keys import SwarmKeys
from swarm.trust.token import SwarmToken
from swarm.workers.lease import PROTOCOL as LEASE_PROTOCOL
from swarm.workers.tunnel import TUNNEL_PROTOCOL, TunnelServer
from swarm.workers.worker import WorkerService

log = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
# The sharded route's context without --ctx: its memory is other machines', so no trained
# context capped by this machine's memory.
SHARDED_CTX = 4096
COALESCE_S = 0.1


class ListenFailed(OSError):
    """None of the listen addresses could be bound."""


@dataclass
class NodeConfig:
    data_dir: Path
    token: SwarmToken
    name: str
    listen: tuple[str, ...] = DEFAULT_LISTEN
    api_port: int = 0
    lan_only: bool = False
    bootstrap: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    heartbeat_s: float = 10.0
    entry_ttl_s: float = 30.0
    sync_every_s: float = 10.0
    ban_s: float = 60.0
    api_listen: tuple[str, int] | None = None  # the OpenAI API on a network address
    api_key: str | None = None
    federated_model: str | None = None  # serve this model for the swarm
    upload_limit_bytes_s: float | None = None  # cap on sending model copies to peers
    direct_copy: bool = True  # model copies over the direct TLS path where the link allows
    worker_share_bytes: int | None = None  # start in worker mode, donating this much
    threads: int | None = None  # engine threads; None: the physical cores
    bundled_models: tuple[str, ...] = ()  # bundled defaults to register as the node starts
    ctx: int | None = None  # context length; None: the model's trained one, capped by memory
    cors_origins: tuple[str, ...] = ()  # browser origins that may call the API
    api_hosts: tuple[str, ...] = ()  # more Host names the API answers to
    routing: RoutePrefs = RoutePrefs()  # may prompts leave this machine; a preferred route
    relay: bool | None = None  # relay for the swarm's members; None: when publicly reachable
    relay_limits: RelayLimits = RelayLimits()
    upnp: bool = True  # map the listen port on the router when not reachable (COVEY_NO_UPNP)


def listen_ips(listen: tuple[str, ...]) -> list[str]:
    return [multiaddr.Multiaddr(a).value_for_protocol("ip4") for a in listen]


def expand_wildcards(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Advertise concrete addresses: a peer cannot dial 0.0.0.0."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        if "/ip4/0.0.0.0/" not in text:
            out.append(addr)
            continue
        for ip in mdns.expand_listen_ip("0.0.0.0"):
            out.append(multiaddr.Multiaddr(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1)))
    return out


class Node:
    def __init__(self, config: NodeConfig) -> None:
        covey_version()  # read once, now: later it may not be able to open a file (EMFILE)
        self.config = config
        self.name = config.name
        self.roles = config.roles
        self.keys = SwarmKeys.derive(config.token)
        self.identity = load_or_create_identity(config.data_dir)
        self.peer_id = self.identity.peer_id
        self.host = build_host(self.identity, expand_wildcards)
        self.gatekeeper = Gatekeeper(self.host, self.keys.admission_key, self._on_admitted,
                                     ban_s=config.ban_s)
        self.sync = LedgerSync(self.host, self.identity, self.keys.ledger_key,
                               self.keys.gossip_topic, self.gatekeeper)
        self.discovery = Discovery(
            self.host, self.keys, listen_ips(config.listen),
            [*config.token.bootstrap, *config.bootstrap], config.lan_only,
            self.gatekeeper.is_banned,
        )
        self.reach = Reach(self.host, self.sync.ledger, reserves=True, offers_relay=False,
                           is_banned=self.gatekeeper.is_banned, changed=self.changed,
                           is_admitted=self.gatekeeper.is_admitted)
        self.relay_hop = RelayHop(self.host, self.gatekeeper.is_admitted, config.relay_limits)
        self.port_mapper = PortMapper(MiniupnpcGateway, self._mapping_changed)
        cors = CorsPolicy.of(config.cors_origins)
        self.api = LocalApi(load_or_create_secret(config.data_dir), cors=cors,
                            host_names=config.api_hosts)
        self.api_port: int | None = None
        self.store = ModelStore(config.data_dir / "models")
        self.local_route = LocalRoute(self.store, self.name, n_threads=config.threads,
                                      n_ctx=config.ctx)
        self.bundled = BundledModels(self.store.ensure, config.bundled_models)
        self.copy_server = CopyServer(self.store, config.upload_limit_bytes_s)
        self.copy_direct = DirectCopyService(
            self.store, config.data_dir, listen_ips(config.listen)[0] if config.direct_copy
            else None, config.upload_limit_bytes_s, self.host)
        self.copier = Copier(self.host, self.store, self.copy_offers, self.changed,
                             direct=config.direct_copy, relayed=self.relayed)
        self.federated = FederatedService(self.local_route, self.changed, self.bundled)
        if config.federated_model:
            self.federated.models = [config.federated_model]
        self.federated_route = FederatedRoute(self.host, self.federated,
                                              self._federated_candidates, self._federated_models)
        self.worker = WorkerService(config.data_dir, self.changed, self._lease_ended,
                                    direct_bind=listen_ips(config.listen)[0],
                                    name_of=lambda peer: self._names().get(peer, peer),
                                    tunnel_bytes=self._tunnel_bytes)
        self.tunnels = TunnelServer(self.worker.tunnel_target, self.worker.lease_guard)
        self.sharded_route = ShardedRoute(self.host, self.store, self._worker_offers,
                                          self._names, self.local_route,
                                          n_ctx=config.ctx or SHARDED_CTX,
                                          ram_of=self._ram_totals, relayed=self.relayed)
        self.router = Router(self.local_route, self.federated_route, self.sharded_route,
                             lambda: self.config.routing, self.bundled)
        self.openai = OpenAiApi(self.router, self.relayed_machines)
        self.embedder = LocalEmbedder(self.store, self.name, n_threads=config.threads)
        self.local_route.reclaimable.append(self.embedder)
        self.federated.embedder = self.embedder
        self.embeddings = EmbeddingsApi(self.embedder, self.federated_route)
        self.network_api: LocalApi | None = None
        if config.api_listen is not None:
            if not config.api_key:
                raise ValueError("--api-listen exposes the API on a network: it needs an API key")
            self.network_api = LocalApi(config.api_key, cors=cors, host_names=config.api_hosts)
            self._add_openai_routes(self.network_api)
        self._stop = trio.Event()
        self._info_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._pulling: set[ID] = set()
        self._roles_published: set[str] = set()  # survives a restart of the heartbeat
        self._add_routes()

    def stop(self) -> None:
        self._stop.set()

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery of `run`, for work that outlives an API request."""
        assert self._nursery is not None, "the node is not running"
        return self._nursery

    def addresses(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                self.host.run(listen_addrs=parse_multiaddrs(self.config.listen))
            )
            stack.push_async_callback(self._close_host)
            if not self.host.get_transport_addrs():
                # py-libp2p only logs a failed listen and carries on listening on nothing.
                raise ListenFailed(
                    f"could not listen on {', '.join(self.config.listen)}: the port is in use "
                    "or the address is not on this machine"
                )
            self.gatekeeper.install()
            self._decide_reach()
            guarded = [
                (SYNC_PROTOCOL, "ledger-sync", self.sync.handle_sync),
                (SYNC_PROTOCOL_V2, "ledger-sync", self.sync.handle_sync_v2),
                (PUSH_PROTOCOL, "ledger-push", self.sync.handle_push),
                (FEDERATED_PROTOCOL, "federated", self.federated.handle),
                (COPY_PROTOCOL, "model-copy", self.copy_server.handle),
                (COPY_DIRECT_PROTOCOL, "model-copy-direct", self.copy_direct.handle),
                (LEASE_PROTOCOL, "worker-lease", self.worker.desk.handle),
                (TUNNEL_PROTOCOL, "rpc-tunnel", self.tunnels.handle),
                (STOP_PROTOCOL, "relay-stop", self.reach.stop_side.handle),
            ]
            if self.reach.holepunch is not None:
                guarded += [(HOLEPUNCH_PROTOCOL, "hole-punch", self.reach.holepunch.handle),
                            (OBSERVED_PROTOCOL, "observed", self.reach.holepunch.handle_observed)]
            if self.reach.offers_relay:
                guarded.append((HOP_PROTOCOL, "relay-hop", self.relay_hop.handle))
            if self.discovery.dht is not None:
                # KadDHT answers everyone by default: an outsider would learn the members'
                # peer ids and addresses from its routing table.
                guarded.append((DHT_PROTOCOL, "dht", self.discovery.dht.handle_stream))
            for protocol, name, handler in guarded:
                self.host.set_stream_handler(
                    TProtocol(protocol), self.gatekeeper.guard(name, handler)
                )
            await stack.enter_async_context(background_trio_service(self.sync.pubsub))
            await stack.enter_async_context(background_trio_service(self.sync.router))
            if self.discovery.dht is not None:
                await stack.enter_async_context(background_trio_service(self.discovery.dht))
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery = nursery
            self.sharded_route.nursery = nursery
            self.worker.nursery = nursery
            for name, loop in (("admission", self.gatekeeper.run),
                               ("gossip", self.sync.run_gossip),
                               ("heartbeat", self._heartbeat),
                               ("ledger sync", self._sync_loop),
                               ("dialer", self.discovery.run_dialer),
                               ("wide-area discovery", self.discovery.run_wide_area),
                               ("reach", self.reach.run),
                               ("embedding engine idle", self.embedder.run)):
                nursery.start_soon(keep_running, name, loop)
            upnp_port = port_to_map(upnp_allowed(self.config.upnp), self.config.lan_only,
                                    self.addresses())
            if upnp_port is not None:
                nursery.start_soon(keep_running, "UPnP", partial(self.port_mapper.run, upnp_port))
            await nursery.start(self.bundled.run)
            stack.push_async_callback(self.local_route.close)
            stack.push_async_callback(self.embedder.close)
            stack.push_async_callback(self.worker.close)
            stack.push_async_callback(self.copy_direct.close)
            stack.push_async_callback(self.sharded_route.close)
            if self.config.worker_share_bytes is not None:
                await self.worker.enable(self.config.worker_share_bytes)
            stack.push_async_callback(self.discovery.stop_mdns)
            await self.discovery.start_mdns(self.addresses())
            self.api_port = await nursery.start(self.api.serve, self.config.api_port)
            if self.network_api is not None and self.config.api_listen is not None:
                host, port = self.config.api_listen
                # A wildcard listens on every address: clients name whichever they reach.
                own = mdns.expand_listen_ip(host) if host in ("0.0.0.0", "::") else []
                await nursery.start(partial(self.network_api.serve_network, names=own),
                                    host, port)
            write_api_info(self.config.data_dir, self.api_port, os.getpid())
            stack.callback(remove_api_info, self.config.data_dir, os.getpid())
            log.info("node %s (%s) in swarm %s, listening on %s; API on 127.0.0.1:%s",
                     self.peer_id, self.name, self.keys.swarm_id, ", ".join(self.addresses()),
                     self.api_port)
            task_status.started(self)
            await self._stop.wait()
            await self._say_goodbye()
            nursery.cancel_scope.cancel()

    def _mapping_changed(self) -> None:
        """The router mapped this node's port, or the mapping went: say so in the ledger."""
        self.reach.upnp = self.port_mapper.addrs
        self.changed()

    def _decide_reach(self) -> None:
        """Relay for the swarm when told to or when reachable from the internet; hold relay
        slots when not reachable. A LAN-only node dials nobody it did not find by mDNS."""
        public = any(is_public(a) for a in self.addresses())
        self.reach.offers_relay = public if self.config.relay is None else self.config.relay
        self.reach.reserves = not (self.reach.offers_relay or public or self.config.lan_only)
        self.reach.dials = not self.config.lan_only

    async def _close_host(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.host.close()

    # -- swarm tasks --------------------------------------------------------------------------

    async def _on_admitted(self, peer: ID) -> None:
        await self.discovery.add_to_dht(peer)
        if self._nursery is not None:
            self._nursery.start_soon(self._pull, peer)

    async def _pull(self, peer: ID) -> None:
        """One pull at a time per peer, each on its own: a hung peer delays no one else."""
        if peer in self._pulling:
            return
        self._pulling.add(peer)
        try:
            await self.sync.pull(peer)
        except Exception as exc:  # noqa: BLE001 - the peer left or misbehaved; next round
            log.debug("ledger sync with %s failed: %r", peer, exc)  # warned of in sync.pull
        finally:
            self._pulling.discard(peer)

    def node_value(self) -> dict[str, Any]:
        active = (("worker", self.worker.enabled), ("federated", self.federated.enabled))
        roles = (*self.roles, *(r for r, on in active if on and r not in self.roles))
        return collect_node_info(self.name, roles).to_value()

    def _role_entries(self) -> list[tuple[str, bool, dict[str, Any]]]:
        """(ledger key, on, value) of each role this node can take for the swarm."""
        info = collect_node_info(self.name, ())
        return [(FEDERATED_KEY, self.federated.enabled, self.federated.ledger_value()),
                (WORKER_KEY, self.worker.enabled,
                 self.worker.ledger_value(info.ram_free, info.cores))]

    async def _heartbeat(self) -> None:
        """Publish this node's info every `heartbeat_s`, and soon after any change.

        Changes within `COALESCE_S` go out as one entry. Each entry goes to every directly
        connected peer at once as well as onto gossip (which may drop it in a burst)."""
        while True:
            ttl = self.config.entry_ttl_s
            for key, value in ((NODE_KEY, self.node_value()),
                               (MODELS_KEY, shared_value(self.store.shareable())),
                               (REACH_KEY, self.reach.entry(self.addresses()).to_value())):
                self._push_to_all(await self.sync.publish(key, value, ttl))
            for key, on, value in self._role_entries():
                if on or key in self._roles_published:
                    # A role turned off says so at once (ttl 0) rather than going stale.
                    self._push_to_all(await self.sync.publish(key, value, ttl if on else 0))
                if on:
                    self._roles_published.add(key)
                else:
                    self._roles_published.discard(key)
            with trio.move_on_after(self.config.heartbeat_s):
                await self._info_changed.wait()
                await trio.sleep(COALESCE_S)
            self._info_changed = trio.Event()

    def changed(self) -> None:
        self._info_changed.set()

    def _names(self) -> dict[str, str]:
        return {r.entry.owner: str(r.entry.value.get("name", "?"))
                for r in self.sync.ledger.by_key(NODE_KEY)}

    def _ram_totals(self) -> dict[str, int]:
        """The RAM each peer's node entry reports: what a worker's donation is checked against."""
        found = {}
        for r in self.sync.ledger.by_key(NODE_KEY):
            info = read(NodeInfo.from_value, r.entry.value)
            if info is not None:
                found[r.entry.owner] = info.ram_total
        return found

    def links(self) -> dict[str, str]:
        """How each connected peer is reached, by peer id: "direct", "hole-punched" or "relayed
        via NAME"."""
        return self.reach.links(self._names())

    def relayed(self, peer_id: str) -> Relayed | None:
        """The relay `peer_id` is reached through (None: directly), for bulk transfers."""
        return self.reach.relayed(peer_id, self._names())

    def relayed_machines(self) -> dict[str, str]:
        """Machine name -> the relay's name, for the peers reached only through a relay."""
        names = self._names()
        return {names.get(peer, peer[-8:]): relay
                for peer, relay in self.reach.relays(names).items()}

    def admitted_ids(self) -> set[str]:
        return {p.to_base58() for p in self.gatekeeper.admitted}

    def _federated_candidates(self, model: str) -> list[Candidate]:
        return federated_candidates(self.sync.ledger, model, self.admitted_ids(),
                                    self.peer_id.to_base58(), time.time(), self._names())

    def _federated_models(self) -> list[str]:
        return served_models(self.sync.ledger, self.admitted_ids(), self.peer_id.to_base58(),
                             time.time())

    def _worker_offers(self) -> list[WorkerOffer]:
        """Live worker entries of admitted peers (this node cannot lease itself)."""
        now, admitted, names = time.time(), self.admitted_ids(), self._names()
        offers = []
        for record in self.sync.ledger.by_key(WORKER_KEY):
            owner = record.entry.owner
            if owner in admitted and is_live(record, now):
                offer = WorkerOffer.from_ledger(owner, names.get(owner, owner[-8:]),
                                                record.entry.value)
                if offer is not None:
                    offers.append(offer)
        return offers

    def _lease_ended(self, peer_id: str) -> None:
        self.tunnels.revoke(peer_id)

    def _tunnel_bytes(self) -> int:
        return self.tunnels.stats.bytes_up + self.tunnels.stats.bytes_down

    def copy_offers(self) -> list[Offer]:
        return copy_offers(self.sync.ledger, self.admitted_ids(), self.peer_id.to_base58(),
                           time.time(), self._names())

    def _push_to_all(self, signed: SignedEntry) -> None:
        if self._nursery is None:
            return
        for peer in list(self.gatekeeper.admitted):
            self._nursery.start_soon(self._push_quietly, peer, signed)

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(self.config.sync_every_s)
            self.sync.drop_old()
            assert self._nursery is not None  # started from within run()
            for peer in list(self.gatekeeper.admitted):
                self._nursery.start_soon(self._pull, peer)  # skips a peer already pulling

    async def _say_goodbye(self) -> None:
        """Tell every connected peer directly (gossip may not have a mesh yet)."""
        with trio.move_on_after(2):
            goodbyes = [await self.sync.publish(NODE_KEY, self.node_value(), 0),
                         await self.sync.publish(MODELS_KEY, shared_value([]), 0),
                         await self.sync.publish(REACH_KEY, self.reach.entry([]).to_value(), 0)]
            for key, on, value in self._role_entries():
                if on:
                    goodbyes.append(await self.sync.publish(key, value, 0))
            async with trio.open_nursery() as nursery:
                for peer in list(self.gatekeeper.admitted):
                    for goodbye in goodbyes:
                        nursery.start_soon(self._push_quietly, peer, goodbye)

    async def _push_quietly(self, peer: ID, signed: SignedEntry) -> None:
        try:
            await self.sync.push(peer, signed)
        except Exception as exc:  # noqa: BLE001 - gossip or the next pull sync covers it
            log.debug("push to %s failed: %r", peer, exc)

    # -- local API ----------------------------------------------------------------------------

    def _add_routes(self) -> None:
        NodeApi(self).add_routes(self.api)
        self._add_openai_routes(self.api)

    def _add_openai_routes(self, api: LocalApi) -> None:
        api.add_route("GET", "/v1/models", self.openai.models)
        api.add_route("GET", "/v1/models/{model}", self.openai.model)
        api.add_route("POST", "/v1/chat/completions", self.openai.chat_completions)
        api.add_route("POST", "/v1/completions", self.openai.completions)
        # A client that gives up on a large batch stops it (between llama.cpp batches).
        api.add_route("POST", "/v1/embeddings", self.embeddings.embeddings, stop_on_hangup=True)
        node_api = api is self.api  # the network listener serves /v1 only

        async def openapi(request: Request) -> Response:
            from swarm.api.openapi import openapi_document

            return Response.json(openapi_document(node_api=node_api))

        api.add_route("GET", "/openapi.json", openapi)
