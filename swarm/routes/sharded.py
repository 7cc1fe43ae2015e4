"""Sharded route: one model's layers spread over the swarm's workers, driven from this node.

For a request, plan a placement over the idle workers in the ledger (`swarm/routes/placement.py`),
lease each chosen worker, open an RPC tunnel to each, and run the engine with the tunnels as
its RPC endpoints and the placement's `tensor_split`. The set (a "session") stays loaded for
the next request while it still matches the plan, and the plan keeps the loaded workers while
they hold the model: a worker that joins is used from the next request on only if it adds
needed capacity (no reload for nothing); an idle session gives its workers back after
`IDLE_RELEASE_S`.

Failover: when a worker is lost mid-reply, ggml aborts the engine process. The route marks
the lost worker unusable for a while, plans again with the rest (or, if nothing fits, runs
on this machine alone), restarts the engine and replays the prompt plus the text produced
so far (`swarm/routes/failover.py`), so the reply goes on; the stream carries a notice naming
the lost machine. This machine takes over only if the model fits its free memory; otherwise the
reply ends saying so and which workers are missing. The session opener is injectable, so
failover is tested in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost

from backends import ggml
from backends.engine import Engine, EngineError, GenerationFailed
from backends.engine_protocol import Done, EngineConfig, GenerateRequest, Token
from backends.errors import ModelStoreError
from backends.ggml_rpc_wire import GGML_OP_COUNT
from backends.gguf_info import estimate_memory
from backends.sizes import human_bytes
from backends.store.bundled import offered
from backends.store.model_store import ModelStore
from swarm.exception_groups import first_leaf
from swarm.ledger.entries import WorkerOffer
from swarm.net.bulk_path import Relayed, bulk_path
from swarm.routes.auto import fits
from swarm.routes.failover import AttemptFailed, Events, Progress, with_failover
from swarm.routes.local import EngineGate, LocalRoute, engine_events, model_entry, start_engine
from swarm.routes.placement import (
    Excluded,
    Placement,
    PlacementError,
    plan_placement,
    usable_workers,
)
from swarm.routes.route import RequestRefused, RouteError, Served
from swarm.workers.engine_only import EngineOnly
from swarm.workers.lease import Lease, ask_turn, hold
from swarm.workers.rpc_link import open_link

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
UNUSABLE_S = 60.0  # a worker that failed is left out of plans this long
REFUSED_S = 10.0  # ... and one that refused its lease (the ledger will catch up)
ASK_EVERY_S = 30.0  # how often a worker someone else holds is asked for again
LOST_WAIT_S = 4.0  # after the engine dies, how long to wait for the lease that broke
IDLE_RELEASE_S = 300.0


class NoWorkers(RouteError):
    """No placement over the swarm's workers holds the model (the message says why)."""


class WorkerFailed(Exception):
    """A worker refused its lease or could not be reached while a session was opening."""

    def __init__(self, peer_id: str, why: BaseException) -> None:
        super().__init__(f"{peer_id}: {why!r}")
        self.peer_id = peer_id


@dataclass
class Session:
    """A loaded sharded engine and the leases and tunnels it runs on."""

    model: str
    deterministic: bool
    placement: Placement
    leases: dict[str, Lease]
    endpoints: list[str] = field(default_factory=list)  # the links' local ends
    paths: dict[str, str] = field(default_factory=dict)  # worker name -> direct TLS or tunnel
    gate: EngineOnly = field(default_factory=EngineOnly)  # the links admit `engine` alone
    engine: Engine | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_used: float = field(default_factory=time.monotonic)

    def broken(self) -> list[str]:
        """Peer ids whose lease was lost or revoked: the session must not start a new reply."""
        return [p for p, lease in self.leases.items()
                if lease.lost.is_set() or lease.revoked.is_set()]

    def names(self) -> dict[str, str]:
        return {w.peer_id: w.name for w in self.placement.workers}

    def served(self) -> list[str]:
        """What the reply's metadata names: each worker and the layers it holds."""
        return [f"{w.name} ({n} layers)"
                for w, n in zip(self.placement.workers, self.placement.layers, strict=True)]


# Leases a placement's workers, opens a link to each and starts the engine over them. Raises
# WorkerFailed for a worker that cannot be leased or reached, EngineError if the engine does
# not start (having given back what it took). Injectable, so failover is testable in-process.
SessionOpener = Callable[[str, bool, Placement], Awaitable[Session]]


class ShardedRoute:
    name = "sharded"

    def __init__(self, host: IHost, store: ModelStore, offers: Callable[[], list[WorkerOffer]],
                 names: Callable[[], dict[str, str]], fallback: LocalRoute, n_ctx: int = 4096,
                 engine_factory: Callable[[EngineConfig], Engine] = Engine,
                 open_session: SessionOpener | None = None,
                 ram_of: Callable[[], dict[str, int]] | None = None,
                 relayed: Callable[[str], Relayed | None] = lambda peer_id: None) -> None:
        self.host = host
        self._relayed = relayed  # peer id -> its relay, when reached only through one
        self.store = store
        self.fallback = fallback
        self._offers = offers
        self._names = names
        self._ram_of = ram_of  # peer id -> the RAM its node reports; None: no check
        self._n_ctx = n_ctx
        self._engine_factory = engine_factory
        self._open_session = open_session or self._open_on_workers
        self.gate = EngineGate(4, "the sharded engine")
        self.nursery: trio.Nursery | None = None  # the node's, set when it runs
        self.session: Session | None = None
        self._unusable: dict[str, float] = {}  # peer id -> until (monotonic)
        self._asked: dict[str, float] = {}  # leased worker -> when we asked for it (monotonic)

    # -- what the API asks -------------------------------------------------------------------

    def _usable(self) -> tuple[list[WorkerOffer], list[Any]]:
        now = time.monotonic()
        unusable = {p for p, until in self._unusable.items() if until > now}
        return usable_workers(self._offers(), ggml.RPC_PROTOCOL_VERSION,
                              self.host.get_id().to_base58(), unusable, self._names(),
                              ggml_op_count=GGML_OP_COUNT,
                              ram_of=self._ram_of() if self._ram_of else None)

    def model_ids(self) -> list[str]:
        """This node's models that the swarm's free workers can hold now."""
        if not self._usable()[0]:
            return []
        return [m for m in sorted({*self.store.names(), *offered()}) if not self.why_not(m)]

    def why_not(self, model: str) -> str | None:
        """Why a model this node has cannot be sharded now (for a request that insists)."""
        return self.planned(model)[1]

    def planned(self, model: str) -> tuple[tuple[str, ...], str | None]:
        """The workers a request for `model` would be spread over now (the fewest that hold
        it), or none and why not (None: this node does not have the model)."""
        if model not in {*self.store.names(), *offered()}:
            return (), None
        try:
            return tuple(w.name for w in self._plan(model).workers), None
        except NoWorkers as exc:
            return (), str(exc)
        except ModelStoreError:  # a bundled model, not registered yet
            return (), f"{model!r} is not ready in this node's store yet"

    def machines(self, model: str) -> list[str]:
        if self.session is not None and self.session.model == model:
            return self.session.served()
        return sorted(w.name for w in self._usable()[0])

    # -- generating --------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, model: str
                       ) -> AsyncGenerator[Token | Done | Served, None]:
        async with self.gate.turn(), aclosing(with_failover(
                request, lambda part, progress: self._attempt(part, model, progress),
                MAX_ATTEMPTS, _give_up)) as events:
            async for event in events:
                yield event

    async def _attempt(self, request: GenerateRequest, model: str, progress: Progress) -> Events:
        """One try on a session that matches the plan for the workers usable now."""
        try:
            session = await self._session_for(model, request.deterministic)
        except EngineError as exc:  # it did not load on these workers: plan again
            lost = progress.lost or f"the sharded engine did not start ({exc})"
            raise AttemptFailed(lost) from exc
        except WorkerFailed as failed:
            # The ledger was behind (someone else leased it, or worker mode went off there):
            # plan without that worker for a little while.
            log.info("worker %s could not be leased (%s); planning without it",
                     failed.peer_id, failed.__cause__ or failed)
            self._unusable[failed.peer_id] = time.monotonic() + REFUSED_S
            raise AttemptFailed(None) from failed
        except NoWorkers:
            if progress.lost is None:
                raise
            session = None
        if session is None:
            # Nothing left to shard on: this machine alone, if the model fits here.
            self._check_fallback(model, progress)
            yield Served(self.fallback.machine, f"{progress.lost}; continuing on this machine")
            async with aclosing(self.fallback.generate(request, model)) as events:
                async for event in events:
                    yield event
            return
        others = ", ".join(w.name for w in session.placement.workers)
        notice = f"{progress.lost}; continuing on {others}" if progress.lost else None
        for i, machine in enumerate(session.served()):
            yield Served(machine, notice if i == 0 else None)
        assert session.engine is not None
        try:
            async with aclosing(engine_events(session.engine, request)) as events:
                async for event in events:
                    yield event
        except GenerationFailed as exc:
            raise RequestRefused(str(exc)) from None
        except EngineError as exc:
            who = ", ".join(await self._forget(session, exc)) or "a worker"
            lost = f"{who} left mid-reply" if progress.produced else f"{who} failed"
            raise AttemptFailed(lost) from exc
        finally:
            session.last_used = time.monotonic()

    def _check_fallback(self, model: str, progress: Progress) -> None:
        """Refuse to continue on this machine when the model does not fit its free memory
        (it would swap for minutes): say so, and which workers are missing."""
        need, free = self.fallback.need_bytes(model), self.fallback.free_bytes()
        if fits(need, free):
            return
        missing = ", ".join(f"{e.name} ({e.reason})" for e in self._usable()[1]) or "none known"
        raise RouteError(
            f"{progress.lost}; this machine cannot take over: {model!r} needs "
            f"{human_bytes(need or 0)} and {human_bytes(free)} is free here. Workers missing "
            f"or unusable: {missing}")

    async def _forget(self, session: Session, exc: EngineError) -> list[str]:
        """The engine died: find the workers that left, keep them out of plans for a while,
        and close the session. Returns the lost workers' names."""
        for lease in session.leases.values():
            lease.check_now()
        with trio.move_on_after(LOST_WAIT_S):
            while not session.broken():
                await trio.sleep(0.05)
        lost = session.broken()
        names = session.names()
        log.warning("sharded engine failed (%r); lost workers: %s", exc,
                    ", ".join(names[p] for p in lost) or "none identified")
        until = time.monotonic() + UNUSABLE_S
        for peer in lost or list(session.leases):  # unknown: distrust the whole set
            self._unusable[peer] = until
        if self.session is session:
            await self.close_session()
        else:
            session.scope.cancel()
        return [names[p] for p in lost]

    # -- sessions ----------------------------------------------------------------------------

    def _ask_turns(self) -> None:
        """A chat found no room: ask the workers other members hold, so that each holder
        hands its worker over within lease.HANDOVER_S (at most once per ASK_EVERY_S each)."""
        now = time.monotonic()
        self._asked = {p: t for p, t in self._asked.items() if now - t < ASK_EVERY_S}
        for excluded in self._usable()[1]:
            if excluded.reason.startswith("leased by") and excluded.peer_id not in self._asked:
                self._asked[excluded.peer_id] = now
                if self.nursery is not None:
                    self.nursery.start_soon(ask_turn, self.host, excluded.peer_id)

    def _plan(self, model: str) -> Placement:
        entry = self.store.get(model)
        usable, excluded = self._usable()
        sha256 = entry.manifest.sha256
        cached = {o.peer_id for o in usable if sha256 is not None and sha256 in o.cached}
        usable, cut = over_relays(usable, cached, self._relayed, entry.info.file_size)
        excluded = [*excluded, *cut]
        try:
            return plan_placement(estimate_memory(entry.info, self._n_ctx), entry.info.n_layers,
                                  usable, excluded=excluded, holding=self._holding(model),
                                  cached=cached)
        except PlacementError as exc:
            raise NoWorkers(f"cannot shard {model!r}: {exc}") from None

    def _holding(self, model: str) -> tuple[str, ...]:
        """The workers that hold `model`'s layers now, in device order (a lost one does not)."""
        session = self.session
        if session is None or session.model != model:
            return ()
        broken = set(session.broken())
        return tuple(w.peer_id for w in session.placement.workers if w.peer_id not in broken)

    async def _session_for(self, model: str, deterministic: bool) -> Session:
        await model_entry(self.store, model)  # registers the bundled default if need be
        try:
            placement = self._plan(model)
        except NoWorkers:
            self._ask_turns()
            raise
        current = self.session
        if current is not None:
            same = (current.model == model and current.deterministic == deterministic
                    and _layout(current.placement) == _layout(placement)
                    and not current.broken())
            if same:
                return current
            await self.close_session()
        self.session = await self._open_session(model, deterministic, placement)
        return self.session

    async def _open_on_workers(self, model: str, deterministic: bool,
                               placement: Placement) -> Session:
        """The default `SessionOpener`: leases and links over the swarm, then the engine."""
        assert self.nursery is not None, "the node sets the nursery before serving"
        try:
            session: Session = await self.nursery.start(self._keep, model, deterministic,
                                                        placement)
        except BaseExceptionGroup as group:  # trio wraps what _keep raised
            raise first_leaf(group, BaseException) or group from None
        entry = await model_entry(self.store, model)
        config = EngineConfig(model_path=str(entry.path), rpc_endpoints=tuple(session.endpoints),
                              tensor_split=placement.tensor_split, n_ctx=self._n_ctx,
                              n_threads=self.fallback.n_threads, deterministic=deterministic)

        def spawn(config: EngineConfig) -> Engine:
            engine = self._engine_factory(config)
            session.gate.expect_pid(engine.pid)  # its early connections wait for this
            return engine

        try:
            session.engine = await start_engine(spawn, config)
        except EngineError as exc:
            await self._forget(session, exc)
            raise
        except BaseException:
            session.scope.cancel()
            raise
        log.info("sharded engine loaded %s on %s via %s", model, placement.describe(),
                 session.paths)
        return session

    async def _keep(self, model: str, deterministic: bool, placement: Placement, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the leases and tunnels of one session until it is closed."""
        session = Session(model, deterministic, placement, {})
        with session.scope:
            async with trio.open_nursery() as nursery:
                for worker in placement.workers:
                    try:
                        session.leases[worker.peer_id] = await nursery.start(
                            hold, self.host, worker.peer_id)
                    except Exception as exc:  # noqa: BLE001 - refused, gone, or not a worker
                        raise WorkerFailed(worker.peer_id, exc) from None
                for worker in placement.workers:
                    endpoint, path = await nursery.start(
                        open_link, self.host, worker, session.leases[worker.peer_id],
                        session.gate)
                    session.endpoints.append(endpoint)
                    session.paths[worker.name] = path
                task_status.started(session)
                nursery.start_soon(self._release_when_done, session)

    async def _release_when_done(self, session: Session) -> None:
        """Give the workers back when the session goes idle, or once a worker is revoked and
        the reply running on it has ended."""
        while True:
            await trio.sleep(1)
            idle = time.monotonic() - session.last_used > IDLE_RELEASE_S
            if (idle or session.broken()) and not self.gate.busy:
                break
        if self.session is session:
            await self.close_session()
        else:
            session.scope.cancel()


    def links(self) -> dict[str, str]:
        """How this node reaches each worker of the loaded session (for /api/status)."""
        return dict(self.session.paths) if self.session is not None else {}

    async def close_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        for lease in session.leases.values():
            lease.release()
        if session.engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(session.engine.close)
        with trio.move_on_after(2):
            await trio.sleep(0.2)  # let the releases go out before the streams are reset
        session.scope.cancel()

    async def close(self) -> None:
        await self.close_session()


def over_relays(usable: Sequence[WorkerOffer], cached: set[str],
                relayed: Callable[[str], Relayed | None], weights: int
                ) -> tuple[list[WorkerOffer], list[Excluded]]:
    """Leave out the workers reached only through a relay whose cap would cut loading their
    share of the weights (reckoned as all of them: the share is not known before the plan);
    a worker with the model in its tensor cache loads nothing and stays in."""
    kept, cut = [], []
    for offer in usable:
        path = bulk_path(offer.name, None if offer.peer_id in cached else
                         relayed(offer.peer_id), weights, "loading the model's weights")
        if path.go:
            kept.append(offer)
        else:
            cut.append(Excluded(offer.name, offer.peer_id,
                                f"{path.why}; used once there is a direct path"))
    return kept, cut


def _layout(placement: Placement) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """What a loaded engine depends on: which workers, in order, and the split (a worker's
    ledger entry changes when we lease it, and that must not count as a new plan)."""
    return tuple(w.peer_id for w in placement.workers), placement.tensor_split


def _give_up(causes: Sequence[BaseException]) -> RouteError:
    return RouteError("the sharded engine failed repeatedly; see the node's log")

