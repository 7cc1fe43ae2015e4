"""Embeddings on this machine: an engine of its own, loaded in embedding mode on first use.

A llama.cpp context made for generation cannot pool hidden states, so embeddings take a second
engine process with the same model file (its weights are memory-mapped, so the page cache holds
them once) and a small context. It loads on the first /v1/embeddings request, stays for the
next, and serves one request at a time with a bounded queue, like the generation engine.
It is unloaded once idle for `IDLE_UNLOAD_S`, or sooner when the generation engine needs the
memory (`release`). A request whose caller is cancelled (its client hung up) is stopped
between batches. A model only a federated peer serves is embedded there, by that peer's own
`LocalEmbedder` (`swarm/routes/federated_embeddings.py`); one only workers hold is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Callable

import trio

from backends.engine import Engine, EngineError, GenerationFailed
from backends.engine_protocol import Embeddings, EmbedRequest, EngineConfig
from backends.gguf_info import estimate_memory
from backends.store.model_store import ModelStore
from swarm.routes.local import EngineGate, model_entry, start_engine
from swarm.routes.route import ModelUnknown, RequestRefused

log = logging.getLogger(__name__)

# The longest input, in tokens: the context and the batch of the embedding engine. Gemma 3's
# sliding window is 512 too, and every token is an output of the batch (llama.cpp pools over
# them), so a larger batch would grow the compute buffer by n_vocab floats per token.
EMBED_CTX = 512
# Clients embed in bursts (indexing a folder, then queries now and then): an engine kept this
# long serves the next burst without a reload, and gives its memory back between them.
IDLE_UNLOAD_S = 300.0
# One request's limits, the same for a client of this node and for a federated peer's.
MAX_INPUTS = 128
MAX_TOTAL_TOKENS = 4096


def idle_expired(last_used: float, now: float, idle_s: float, busy: bool) -> bool:
    """Whether an engine last used at `last_used` has been idle for `idle_s` by `now`."""
    return not busy and now - last_used >= idle_s


async def stoppable_embed(engine: Engine, request: EmbedRequest) -> Embeddings:
    """`engine.embed(request)` on a thread. Cancelling the caller stops the engine before its
    next batch, and this still waits until the engine is free before it raises."""
    token = trio.lowlevel.current_trio_token()
    finished = trio.Event()
    result: list[Embeddings | Exception] = []

    def work() -> None:
        try:
            result.append(engine.embed(request))
        except Exception as exc:  # noqa: BLE001 - raised again in the caller's task
            result.append(exc)
        with contextlib.suppress(trio.RunFinishedError):  # the node is gone already
            trio.from_thread.run_sync(finished.set, trio_token=token)

    threading.Thread(target=work, name=f"engine-{request.id}", daemon=True).start()
    try:
        await finished.wait()
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            engine.stop(request.id)
            await finished.wait()
        raise
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


class LocalEmbedder:
    """This machine's embedding engine, started on first use with the requested model."""

    route = "local"

    def __init__(self, store: ModelStore, machine: str, max_waiting: int = 4,
                 engine_factory: Callable[[EngineConfig], Engine] = Engine,
                 n_threads: int | None = None, idle_s: float = IDLE_UNLOAD_S) -> None:
        self.store = store
        self.machine = machine
        self._engine_factory = engine_factory
        self._n_threads = n_threads
        self._engine: Engine | None = None
        self._model: str | None = None
        self._bytes = 0  # the loaded engine's estimate: what unloading it gives back
        self._last_used = -math.inf
        self.idle_s = idle_s
        self._ids = itertools.count(1)
        self.gate = EngineGate(max_waiting, "this node's embedding engine")

    async def embed(self, model: str, inputs: tuple[str | tuple[int, ...], ...],
                    max_total_tokens: int) -> Embeddings:
        """The unit vectors of `inputs`; RouteError (ModelUnknown, RequestRefused, Busy) for
        the client, EngineError when the engine failed (it is dropped, the next call starts
        a new one)."""
        async with self.gate.turn():
            engine = await self._engine_for(model)
            request = EmbedRequest(id=f"embed-{next(self._ids)}", inputs=inputs,
                                   max_total_tokens=max_total_tokens)
            try:
                return await stoppable_embed(engine, request)
            except trio.Cancelled:
                log.info("embedding request %s stopped: its client is gone", request.id)
                raise
            except GenerationFailed as exc:
                raise RequestRefused(str(exc)) from None  # the engine is fine
            except EngineError:
                await self.close()
                raise
            finally:
                self._last_used = trio.current_time()

    async def _engine_for(self, model: str) -> Engine:
        if self._engine is not None and self._model == model:
            return self._engine
        try:
            entry = await model_entry(self.store, model)
        except ModelUnknown as exc:  # the loaded engine stays, for the next request
            raise ModelUnknown(f"{exc}; embeddings run on this node's own models only, or on "
                               "a federated node that serves the model, not on workers"
                               ) from None
        await self.close()
        # Deterministic: no repacked copy of the weights; they stay mapped from the file, whose
        # pages the generation engine shares.
        config = EngineConfig(model_path=str(entry.path), n_ctx=EMBED_CTX, n_batch=EMBED_CTX,
                              n_threads=self._n_threads, deterministic=True, embedding=True)
        self._engine = await start_engine(self._engine_factory, config)
        self._model = model
        self._bytes = estimate_memory(entry.info, EMBED_CTX).total_bytes
        log.info("embedding engine loaded %s", model)
        return self._engine

    @property
    def loaded(self) -> str | None:
        """The model the embedding engine holds now, if it is loaded."""
        return self._model

    def held_bytes(self) -> int:
        """Memory that unloading the engine would give back; 0 while a request uses it."""
        return 0 if self._engine is None or self.gate.busy else self._bytes

    async def release(self) -> None:
        """Unload the engine for memory the node needs, unless a request is using it."""
        if self._engine is not None and not self.gate.busy:
            log.info("embedding engine unloaded: the node needs its memory")
            await self.close()

    async def run(self) -> None:
        """Unload the engine once it has been idle for `idle_s` (for the node's lifetime)."""
        while True:
            now = trio.current_time()
            if self._engine is not None and idle_expired(self._last_used, now, self.idle_s,
                                                         self.gate.busy):
                log.info("embedding engine unloaded after %.0f s idle", self.idle_s)
                await self.close()
            wait = self.idle_s if self._engine is None else self._last_used + self.idle_s - now
            await trio.sleep(max(wait, 1.0))

    async def close(self) -> None:
        engine, self._engine, self._model, self._bytes = self._engine, None, None, 0
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)
