"""The local route: this machine's engine, and the pieces other routes reuse to run one.

Owns the engine's turn-taking (`EngineGate`: one generation at a time, a bounded queue, `Busy`
beyond), streaming one generation off the engine's blocking API (`engine_events`), starting an
engine (`start_engine`) and finding a model in the store (`model_entry`). `LocalRoute` loads
the requested model on first use and keeps it loaded for the next request; what else holds
memory it needs (`Reclaimable`: the embedding engine) gives it back before it loads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from backends.engine import Engine, EngineError, GenerationFailed
from backends.engine_protocol import Done, EngineConfig, GenerateRequest, Token
from backends.errors import ModelStoreError
from backends.generation.context_size import context_for, needs_room
from backends.gguf_info import GGUFInfo, estimate_memory
from backends.memory import memory_bytes
from backends.store.bundled import BUNDLED, BundledModelMissing, offered
from backends.store.model_store import ModelEntry, ModelNotFound, ModelStore
from swarm.routes.route import Busy, ModelUnknown, RequestRefused

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """One generation running on an engine thread, feeding a trio channel."""

    request_id: str
    events: trio.MemoryReceiveChannel[Any]
    finished: trio.Event


class Reclaimable(Protocol):
    """Something on this machine holding memory it can give back (the embedding engine)."""

    def held_bytes(self) -> int: ...

    async def release(self) -> None: ...


class EngineGate:
    """One generation at a time on an engine, at most `max_waiting` waiting, Busy beyond."""

    def __init__(self, max_waiting: int, what: str) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self._what = what
        self._lock = trio.Lock()
        self._recent_s = 10.0  # a rough duration of one generation, for Retry-After

    @property
    def full(self) -> bool:
        """A request now would be answered `Busy`."""
        return self.waiting >= self.max_waiting

    @property
    def busy(self) -> bool:
        """A generation is running or waiting."""
        return self._lock.locked() or self.waiting > 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncGenerator[None, None]:
        if self.full:
            retry = max(1, int(self._recent_s * (self.waiting + 1) / 2))
            raise Busy(f"{self._what} is busy ({self.waiting} requests waiting); "
                       f"retry in {retry} s", retry)
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        started = trio.current_time()
        try:
            yield
        finally:
            self._recent_s = 0.7 * self._recent_s + 0.3 * (trio.current_time() - started)
            self._lock.release()


async def engine_events(engine: Engine, request: GenerateRequest
                        ) -> AsyncGenerator[Token | Done, None]:
    """The events of one generation on `engine` (its API blocks, so it runs on a thread).

    A consumer that stops reading (the client disconnected) stops the generation, and this
    waits until the engine is free before the next request may use it."""
    run = _start(engine, request)
    try:
        async for event in run.events:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        with trio.CancelScope(shield=True):
            if not run.finished.is_set():
                engine.stop(run.request_id)
            async for _ in run.events:
                pass
            await run.finished.wait()


def _start(engine: Engine, request: GenerateRequest) -> _Run:
    send, receive = trio.open_memory_channel[Any](256)
    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def pump() -> None:
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


async def model_entry(store: ModelStore, model: str) -> ModelEntry:
    """The store's model (a bundled one is registered on first use); ModelUnknown if there is
    none."""
    try:
        if model in BUNDLED:
            return await trio.to_thread.run_sync(store.ensure, model)
        return store.get(model)
    except ModelNotFound:
        raise ModelUnknown(f"the model {model!r} is not in this node's store") from None
    except BundledModelMissing as exc:
        raise ModelUnknown(str(exc)) from None


async def start_engine(factory: Callable[[EngineConfig], Engine], config: EngineConfig
                       ) -> Engine:
    """A started engine with its model loaded; closed again if loading fails."""
    engine = await trio.to_thread.run_sync(factory, config)
    try:
        await trio.to_thread.run_sync(engine.wait_loaded)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(engine.close)
        raise
    return engine


class LocalRoute:
    """This machine's engine, started on first use with the requested model."""

    name = "local"

    def __init__(
        self,
        store: ModelStore,
        machine: str,
        max_waiting: int = 4,
        engine_factory: Callable[[EngineConfig], Engine] = Engine,
        n_ctx: int | None = None,  # None: the model's trained context, capped by memory
        n_threads: int | None = None,
        available: Callable[[], int] = lambda: memory_bytes().available,
    ) -> None:
        self.store = store
        self.machine = machine
        self._engine_factory = engine_factory
        self._n_ctx = n_ctx
        self.n_threads = n_threads  # None: the engine's choice (the physical cores)
        self._engine: Engine | None = None
        self._engine_model: tuple[str, bool] | None = None
        self._engine_bytes = 0  # the loaded model's estimate: what dropping the engine frees
        self.loaded_ctx: int | None = None  # the engine's context length; None: none loaded
        self._available = available
        self.gate = EngineGate(max_waiting, "this node's engine")
        self.reclaimable: list[Reclaimable] = []  # asked for their memory before a load

    def model_ids(self) -> list[str]:
        # The bundled models are always servable; they are registered on first use.
        return sorted({*self.store.names(), *offered()})

    def machines(self, model: str) -> list[str]:
        return [self.machine]

    def need_bytes(self, model: str) -> int | None:
        """Memory `model` takes on this machine's engine; None when the store cannot say (the
        bundled default before it is registered, a model not here)."""
        try:
            info = self.store.get(model).info
            return estimate_memory(info, self._ctx(info)).total_bytes
        except ModelStoreError:
            return None

    def _ctx(self, info: GGUFInfo) -> int:
        return context_for(info, self._n_ctx, self.free_bytes())

    def free_bytes(self) -> int:
        """This machine's available memory, counting what unloading its engine gives back."""
        return self._available() + self._engine_bytes

    async def generate(self, request: GenerateRequest, model: str
                       ) -> AsyncGenerator[Token | Done, None]:
        async with self.gate.turn():
            try:
                engine = await self._engine_for(model, request.deterministic)
                # aclosing: a consumer that leaves must stop the generation before the gate
                # lets the next request onto the engine.
                async with contextlib.aclosing(engine_events(engine, request)) as events:
                    async for event in events:
                        yield event
            except GenerationFailed as exc:
                # The engine is fine; the request was not (e.g. longer than the context).
                raise RequestRefused(str(exc)) from None
            except EngineError:
                await self._drop_engine()
                raise

    async def _engine_for(self, model: str, deterministic: bool) -> Engine:
        if self._engine is not None and self._engine_model == (model, deterministic):
            return self._engine
        await self._drop_engine()
        entry = await model_entry(self.store, model)
        for other in self.reclaimable:
            if needs_room(entry.info, self._n_ctx, self.free_bytes(), other.held_bytes()):
                await other.release()
        config = EngineConfig(model_path=str(entry.path), n_ctx=self._ctx(entry.info),
                              n_threads=self.n_threads, deterministic=deterministic)
        engine = await start_engine(self._engine_factory, config)
        self._engine, self._engine_model = engine, (model, deterministic)
        self._engine_bytes = self.need_bytes(model) or 0
        self.loaded_ctx = config.n_ctx
        log.info("engine loaded %s", model)
        return engine

    async def _drop_engine(self) -> None:
        engine, self._engine, self._engine_model = self._engine, None, None
        self._engine_bytes = 0
        self.loaded_ctx = None
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)

    async def close(self) -> None:
        await self._drop_engine()
