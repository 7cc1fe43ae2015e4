"""Routes: the ways a node can serve a generation, and the one place that picks among them.

A route streams `Token` events then one `Done` for a `GenerateRequest`. Today there is the
`local` route (this machine's engine); the `sharded` and `federated` routes plug into the same
`Route` protocol later. `choose_route` is pure: the API asks it, never the routes themselves.

Back-pressure lives in each route: one generation at a time per engine, a bounded number
waiting, and `Busy` (an HTTP 429 with Retry-After) beyond that. A consumer that stops reading
(a client that disconnects) stops the generation and frees the engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from backends.engine import Engine, EngineError, GenerationFailed
from backends.engine_protocol import Done, EngineConfig, GenerateRequest, Token
from backends.model_store import DEFAULT_MODEL, ModelNotFound, ModelStore

log = logging.getLogger(__name__)

ROUTE_NAMES = ("auto", "local", "sharded", "federated")
# A federated node with the model first (it holds the whole model and is meant to serve),
# then workers, then this machine alone.
AUTO_ORDER = ("federated", "sharded", "local")


class RouteError(Exception):
    """The request cannot be routed; `status` is the HTTP status to answer with."""

    status = 400
    code = "route_unavailable"


class ModelUnknown(RouteError):
    status = 404
    code = "model_not_found"


class RequestRefused(RouteError):
    """The engine refused this request (it stays loaded): too long for the context, say."""

    status = 400
    code = "context_length_exceeded"


class Busy(RouteError):
    status = 429
    code = "busy"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Served:
    """A route's note that `machine` serves what follows (again after a failover, with a
    `notice` saying so)."""

    machine: str
    notice: str | None = None


class Route(Protocol):
    name: str

    def model_ids(self) -> list[str]: ...

    def machines(self, model: str) -> list[str]: ...

    def generate(
        self, request: GenerateRequest, model: str
    ) -> AsyncIterator[Token | Done | Served]: ...


def choose_route(requested: str, routes: Sequence[Route], model: str) -> Route:
    """The route for `model`: the one asked for, or with "auto" the first that has it in
    AUTO_ORDER. Raises RouteError / ModelUnknown with a message for the client."""
    if requested not in ROUTE_NAMES:
        raise RouteError(f"covey_route must be one of {', '.join(ROUTE_NAMES)}")
    by_name = {r.name: r for r in routes}
    if requested != "auto":
        route = by_name.get(requested)
        if route is None:
            raise RouteError(f"the {requested} route is not available on this node")
        if model not in route.model_ids():
            raise ModelUnknown(f"model {model!r} is not served by the {requested} route")
        return route
    for name in AUTO_ORDER:
        route = by_name.get(name)
        if route is not None and model in route.model_ids():
            return route
    raise ModelUnknown(f"the model {model!r} does not exist in this swarm")


@dataclass
class _Run:
    """One generation running on an engine thread, feeding a trio channel."""

    request_id: str
    events: trio.MemoryReceiveChannel[Any]
    finished: trio.Event


class LocalRoute:
    """This machine's engine, started on first use with the requested model."""

    name = "local"

    def __init__(
        self,
        store: ModelStore,
        machine: str,
        max_waiting: int = 4,
        engine_factory: Callable[[EngineConfig], Engine] = Engine,
        n_ctx: int = 4096,
    ) -> None:
        self.store = store
        self.machine = machine
        self.max_waiting = max_waiting
        self._engine_factory = engine_factory
        self._n_ctx = n_ctx
        self._engine: Engine | None = None
        self._engine_model: str | None = None
        self._lock = trio.Lock()
        self._waiting = 0
        self._recent_s = 10.0  # a rough duration of one generation, for Retry-After

    def model_ids(self) -> list[str]:
        # The bundled default is always servable; it is registered on first use.
        return sorted({*self.store.names(), DEFAULT_MODEL})

    def machines(self, model: str) -> list[str]:
        return [self.machine]

    async def generate(self, request: GenerateRequest, model: str) -> AsyncIterator[Token | Done]:
        if self._waiting >= self.max_waiting:
            retry = max(1, int(self._recent_s * (self._waiting + 1) / 2))
            raise Busy(f"this node's engine is busy ({self._waiting} requests waiting); "
                       f"retry in {retry} s", retry)
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        started = trio.current_time()
        try:
            engine = await self._engine_for(model)
            run = self._start(engine, request)
            try:
                async for event in run.events:
                    if isinstance(event, BaseException):
                        raise event
                    yield event
            finally:
                # The consumer may be gone (client disconnected): end the generation and wait
                # until the engine is free before the next request may use it.
                with trio.CancelScope(shield=True):
                    if not run.finished.is_set():
                        engine.stop(run.request_id)
                    async for _ in run.events:
                        pass
                    await run.finished.wait()
        except GenerationFailed as exc:
            # The engine is fine; the request was not (e.g. longer than the context).
            raise RequestRefused(str(exc)) from None
        except EngineError:
            await self._drop_engine()
            raise
        finally:
            self._recent_s = 0.7 * self._recent_s + 0.3 * (trio.current_time() - started)
            self._lock.release()

    def _start(self, engine: Engine, request: GenerateRequest) -> _Run:
        send, receive = trio.open_memory_channel[Any](256)
        finished = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def pump() -> None:  # the engine's API blocks: it runs on its own thread
            try:
                for event in engine.generate(request):
                    trio.from_thread.run(send.send, event, trio_token=token)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer to raise
                with contextlib.suppress(Exception):  # the consumer may be gone already
                    trio.from_thread.run(send.send, exc, trio_token=token)
            finally:
                try:
                    trio.from_thread.run_sync(send.close, trio_token=token)
                    trio.from_thread.run_sync(finished.set, trio_token=token)
                except trio.RunFinishedError:
                    pass

        threading.Thread(target=pump, name=f"engine-{request.id}", daemon=True).start()
        return _Run(request.id, receive, finished)

    async def _engine_for(self, model: str) -> Engine:
        if self._engine is not None and self._engine_model == model:
            return self._engine
        await self._drop_engine()
        try:
            if model == DEFAULT_MODEL:
                path: Path = (await trio.to_thread.run_sync(self.store.ensure_default)).path
            else:
                path = self.store.get(model).path
        except ModelNotFound:
            raise ModelUnknown(f"the model {model!r} is not in this node's store") from None
        engine = await trio.to_thread.run_sync(
            self._engine_factory, EngineConfig(model_path=str(path), n_ctx=self._n_ctx)
        )
        try:
            await trio.to_thread.run_sync(engine.wait_loaded)
        except BaseException:
            await trio.to_thread.run_sync(engine.close)
            raise
        self._engine, self._engine_model = engine, model
        log.info("engine loaded %s", model)
        return engine

    async def _drop_engine(self) -> None:
        engine, self._engine, self._engine_model = self._engine, None, None
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)

    async def close(self) -> None:
        await self._drop_engine()
