"""The node's own /api endpoints: what a running node shows and lets its owner change.

`NodeApi(node).add_routes(api)` registers them on the loopback API. Each POST body is read by
`swarm.api.body.parse_body` into one of the request dataclasses below, and checked whole
before anything changes. swarm/api/openapi.py documents these endpoints (tests check it
against this module).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

from backends.memory import memory_bytes
from backends.store.model_store import DEFAULT_MODEL, DiskFull, ModelExists, ModelStore
from swarm.api.body import null_ok, parse_body
from swarm.api.server import HttpError, LocalApi, Request, Response
from swarm.ledger.entries import MAX_NAME_CHARS, ROLES
from swarm.ledger.peer_view import peers_view
from swarm.ledger.rules import is_live
from swarm.node.model_copy import AmbiguousModel, CopyError
from swarm.workers.worker import share_bytes

if TYPE_CHECKING:
    from swarm.node.daemon import Node

STATUS_VERSION = 1


@dataclass(frozen=True)
class NodeUpdate:
    """POST /api/node: a new name, new roles, or both."""

    name: str | None = None
    roles: list[str] | None = None


@dataclass(frozen=True)
class FederatedSwitch:
    """POST /api/federated: serve a model's whole requests for the swarm, or stop."""

    enabled: bool
    model: str = DEFAULT_MODEL


@dataclass(frozen=True)
class WorkerSwitch:
    """POST /api/worker: worker mode on (donating a share of memory) or off."""

    enabled: bool
    share_mib: int | None = null_ok()
    share_percent: float | None = null_ok()


@dataclass(frozen=True)
class CopyRequest:
    """POST /api/models/copy: copy a model from the peers that offer it, or cancel that."""

    model: str
    sha256: str | None = null_ok()
    cancel: bool = False


def checked_update(update: NodeUpdate) -> tuple[str | None, tuple[str, ...] | None]:
    """(name trimmed, roles without duplicates), None for what stays; HttpError(400) if
    either is out of range, so that nothing changes unless all of it can."""
    name = None
    if update.name is not None:
        name = update.name.strip()
        if not 0 < len(name) <= MAX_NAME_CHARS:
            raise HttpError(400, f"name must be 1 to {MAX_NAME_CHARS} characters", param="name")
    roles = None
    if update.roles is not None:
        if not set(update.roles) <= set(ROLES):
            raise HttpError(400, f"roles must be a list drawn from {', '.join(ROLES)}",
                            param="roles")
        roles = tuple(dict.fromkeys(update.roles))
    return name, roles


def local_models(store: ModelStore) -> list[dict[str, Any]]:
    """The models peers may copy from this node, each with its facts (parameters, ...)."""
    rows = []
    for manifest in store.shareable():
        facts = store.facts(manifest.name)
        rows.append({**asdict(manifest), "facts": asdict(facts) if facts else None})
    return rows


class NodeApi:
    """The /api handlers of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def add_routes(self, api: LocalApi) -> None:
        api.add_route("GET", "/api/status", self.get_status)
        api.add_route("GET", "/api/peers", self.get_peers)
        api.add_route("GET", "/api/ledger", self.get_ledger)
        api.add_route("POST", "/api/node", self.update_node)
        api.add_route("POST", "/api/federated", self.set_federated)
        api.add_route("POST", "/api/worker", self.set_worker)
        api.add_route("GET", "/api/models", self.get_models)
        api.add_route("POST", "/api/models/copy", self.copy_model)

    def status(self) -> dict[str, Any]:
        node = self.node
        direct = node.worker.direct
        # What a slow sharded chat is debugged with: on the client, the path to each worker
        # (sharded_links); on a worker, how the RPC bytes it serves arrive and how often
        # connections fail or are refused (a refused direct path means the slower tunnel).
        traffic = {"tunnel": node.tunnels.stats.counters(),
                   "direct": direct.stats.counters() if direct is not None else None}
        return {
            "version": STATUS_VERSION,
            "peer_id": node.peer_id.to_base58(),
            "name": node.name,
            "addresses": node.addresses(),
            "swarm_id": node.keys.swarm_id,
            "roles": list(node.roles),
            "lan_only": node.config.lan_only,
            "connected_peers": sorted(node.admitted_ids()),
            "federated": node.federated.ledger_value() | {"enabled": node.federated.enabled},
            "worker": node.worker.status() | {"rpc_traffic": traffic},
            "sharded_links": node.sharded_route.links(),
            "default_models": node.bundled.status(),
            "ctx": {"setting": node.config.ctx, "loaded": node.local_route.loaded_ctx},
            # Copies under way or finished, each with the path its bytes take ("direct" over
            # TLS, else "libp2p"), and the direct path this node serves copies on.
            "copies": [j.to_dict() for j in node.copier.jobs.values()],
            "copy_direct": node.copy_direct.status(),
            "ledger": node.sync.status(),
        }

    async def get_status(self, request: Request) -> Response:
        return Response.json(self.status())

    async def get_peers(self, request: Request) -> Response:
        node = self.node
        peers = peers_view(node.sync.ledger, node.peer_id.to_base58(), node.admitted_ids(),
                           time.time(), node.links())
        return Response.json({"version": STATUS_VERSION, "peers": peers})

    async def get_ledger(self, request: Request) -> Response:
        now = time.time()
        entries = [
            {"owner": owner, "key": key, "seq": r.entry.seq, "live": is_live(r, now)}
            for (owner, key), r in sorted(self.node.sync.ledger.records.items())
        ]
        return Response.json({"version": STATUS_VERSION, "entries": entries})

    async def update_node(self, request: Request) -> Response:
        name, roles = checked_update(parse_body(request.json(), NodeUpdate))
        node = self.node
        if name is not None:
            node.name = name
            node.local_route.machine = name
        if roles is not None:
            node.roles = roles
        node.changed()
        return Response.json(self.status())

    async def set_federated(self, request: Request) -> Response:
        switch = parse_body(request.json(), FederatedSwitch, extra=True)
        node = self.node
        if switch.model not in node.local_route.model_ids():
            raise HttpError(404, f"the model {switch.model!r} is not in this node's store",
                            code="model_not_found", param="model")
        node.federated.models = [switch.model] if switch.enabled else []
        node.changed()
        return Response.json(self.status())

    async def set_worker(self, request: Request) -> Response:
        """Off lets the lease holder finish its reply (up to 20 s) in the background."""
        switch = parse_body(request.json(), WorkerSwitch)
        worker = self.node.worker
        if not switch.enabled:
            worker.desk.accepting = False
            self.node.nursery.start_soon(worker.disable)
            return Response.json(self.status())
        try:
            share = share_bytes(switch.share_mib, switch.share_percent,
                                memory_bytes().total)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        try:
            await worker.enable(share)
        except OSError as exc:
            raise HttpError(500, str(exc)) from None
        return Response.json(self.status())

    async def get_models(self, request: Request) -> Response:
        """This node's models, the ones peers offer, and the copies under way or finished."""
        node = self.node
        swarm: dict[tuple[str, str], dict[str, Any]] = {}
        for offer in node.copy_offers():
            row = swarm.setdefault((offer.model.name, offer.model.sha256),
                                   {**asdict(offer.model), "machines": []})
            row["machines"].append(offer.machine)
        # Reading a GGUF header the first time takes a moment: not on the node's loop.
        local = await trio.to_thread.run_sync(local_models, node.store)
        return Response.json({"version": STATUS_VERSION, "local": local,
                              "swarm": [swarm[k] for k in sorted(swarm)],
                              "copies": [j.to_dict() for j in node.copier.jobs.values()]})

    async def copy_model(self, request: Request) -> Response:
        """Start (or cancel) copying a model; poll GET /api/models for progress."""
        wanted = parse_body(request.json(), CopyRequest)
        copier = self.node.copier
        if wanted.cancel:
            job = copier.cancel(wanted.model)
            if job is None:
                raise HttpError(404, f"no copy of {wanted.model!r} to cancel", param="model")
            return Response.json(job.to_dict())
        try:
            job = copier.start(self.node.nursery, wanted.model, wanted.sha256)
        except ModelExists as exc:
            raise HttpError(409, str(exc), code="model_exists", param="model") from None
        except AmbiguousModel as exc:
            raise HttpError(409, str(exc), code="sha256_required", param="sha256") from None
        except DiskFull as exc:
            raise HttpError(507, str(exc), code="insufficient_storage", param="model") from None
        except CopyError as exc:
            raise HttpError(404, str(exc), code="model_not_found", param="model") from None
        return Response.json(job.to_dict())
