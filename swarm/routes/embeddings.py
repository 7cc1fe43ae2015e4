"""Embeddings on this machine: an engine of its own, loaded in embedding mode on first use.

A llama.cpp context made for generation cannot pool hidden states, so embeddings take a second
engine process with the same model file (its weights are memory-mapped, so the page cache holds
them once) and a small context. It loads on the first /v1/embeddings request, stays for the
next, and serves one request at a time with a bounded queue, like the generation engine.
Embeddings never leave this machine: a model only a federated peer or workers hold is refused.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import trio

from backends.engine import Engine, EngineError, GenerationFailed
from backends.engine_protocol import Embeddings, EmbedRequest, EngineConfig
from backends.store.model_store import ModelStore
from swarm.routes.local import EngineGate, model_entry, start_engine
from swarm.routes.route import ModelUnknown, RequestRefused

log = logging.getLogger(__name__)

# The longest input, in tokens: the context and the batch of the embedding engine. Gemma 3's
# sliding window is 512 too, and every token is an output of the batch (llama.cpp pools over
# them), so a larger batch would grow the compute buffer by n_vocab floats per token.
EMBED_CTX = 512


class LocalEmbedder:
    """This machine's embedding engine, started on first use with the requested model."""

    route = "local"

    def __init__(self, store: ModelStore, machine: str, max_waiting: int = 4,
                 engine_factory: Callable[[EngineConfig], Engine] = Engine,
                 n_threads: int | None = None) -> None:
        self.store = store
        self.machine = machine
        self._engine_factory = engine_factory
        self._n_threads = n_threads
        self._engine: Engine | None = None
        self._model: str | None = None
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
                return await trio.to_thread.run_sync(engine.embed, request)
            except GenerationFailed as exc:
                raise RequestRefused(str(exc)) from None  # the engine is fine
            except EngineError:
                await self.close()
                raise

    async def _engine_for(self, model: str) -> Engine:
        if self._engine is not None and self._model == model:
            return self._engine
        await self.close()
        try:
            entry = await model_entry(self.store, model)
        except ModelUnknown as exc:
            raise ModelUnknown(f"{exc}; embeddings run on this node's own models only, not on "
                               "federated peers or workers") from None
        # Deterministic: no repacked copy of the weights; they stay mapped from the file, whose
        # pages the generation engine shares.
        config = EngineConfig(model_path=str(entry.path), n_ctx=EMBED_CTX, n_batch=EMBED_CTX,
                              n_threads=self._n_threads, deterministic=True, embedding=True)
        self._engine = await start_engine(self._engine_factory, config)
        self._model = model
        log.info("embedding engine loaded %s", model)
        return self._engine

    async def close(self) -> None:
        engine, self._engine, self._model = self._engine, None, None
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)
