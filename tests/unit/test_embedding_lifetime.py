"""How long the embedding engine lives: unloaded once idle or when the generation engine needs
its memory, and a request whose client is gone stopped between batches."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from backends import embedding
from backends.engine import GenerationFailed
from backends.engine_protocol import Done, EmbedRequest, EngineConfig, GenerateRequest
from backends.generation.context_size import auto_context, needs_room
from backends.gguf_info import GGUFInfo, estimate_memory, read_gguf_info
from backends.store.model_store import ModelStore
from swarm.routes.embeddings import LocalEmbedder, idle_expired, stoppable_embed
from swarm.routes.local import LocalRoute
from tests.support.tiny_gguf import write_tiny_gguf

IDLE_S = 300.0


class FakeEngine:
    """An embedding engine whose `embed` runs until `stop` when `blocks`, then fails as the
    engine does for a stopped request."""

    def __init__(self, blocks: bool = False) -> None:
        self.blocks = blocks
        self.stopped = threading.Event()
        self.embedding = threading.Event()
        self.stop_ids: list[str] = []
        self.closed = False

    def wait_loaded(self) -> None:
        pass

    def embed(self, request: EmbedRequest) -> Any:
        self.embedding.set()
        if self.blocks:
            assert self.stopped.wait(10)
            raise GenerationFailed("stopped after 1 of 3 inputs")
        return embedding_reply(request)

    def generate(self, request: GenerateRequest) -> Iterator[Any]:
        yield Done(request.id, "stop", "", 1, ())

    def stop(self, request_id: str) -> None:
        self.stop_ids.append(request_id)
        self.stopped.set()

    def close(self) -> None:
        self.closed = True


def embedding_reply(request: EmbedRequest) -> Any:
    from backends.engine_protocol import Embeddings

    return Embeddings(request.id, tuple((1.0,) for _ in request.inputs), 3)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("lifetime")
    store = ModelStore(root / "models")
    store.import_file(write_tiny_gguf(root / "tiny.gguf"), "tiny")
    return store


def test_idle_expires_only_when_not_busy() -> None:
    assert idle_expired(0.0, IDLE_S, IDLE_S, busy=False)
    assert not idle_expired(0.0, IDLE_S - 1, IDLE_S, busy=False)
    assert not idle_expired(0.0, 10 * IDLE_S, IDLE_S, busy=True)


def test_the_engine_is_unloaded_after_the_idle_period(store: ModelStore) -> None:
    engines: list[FakeEngine] = []

    def factory(config: EngineConfig) -> Any:
        assert config.embedding
        engines.append(FakeEngine())
        return engines[-1]

    embedder = LocalEmbedder(store, "here", engine_factory=factory, idle_s=IDLE_S)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(embedder.run)
            await embedder.embed("tiny", ("a",), 100)
            await trio.sleep(IDLE_S - 10)
            seen["before"] = (embedder.loaded, engines[0].closed)
            await embedder.embed("tiny", ("b",), 100)  # used again: the clock starts over
            await trio.sleep(IDLE_S - 10)
            seen["again"] = (embedder.loaded, engines[0].closed)
            await trio.sleep(30)
            # The engine closes in a worker thread: give it real time, boundedly.
            for _ in range(500):
                if engines[0].closed:
                    break
                await trio.to_thread.run_sync(time.sleep, 0.01)
            seen["after"] = (embedder.loaded, engines[0].closed)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == {"before": ("tiny", False), "again": ("tiny", False),
                    "after": (None, True)}
    assert len(engines) == 1


def test_a_cancelled_caller_stops_the_batch_and_waits_for_the_engine() -> None:
    engine = FakeEngine(blocks=True)
    request = EmbedRequest("embed-7", ("a", "b", "c"), 100)
    seen: dict[str, Any] = {}

    async def main() -> None:
        with trio.move_on_after(0.5) as scope:
            await stoppable_embed(cast(Any, engine), request)
        seen["cancelled"] = scope.cancelled_caught
        seen["engine was free"] = engine.stopped.is_set()

    trio.run(main)
    assert seen == {"cancelled": True, "engine was free": True}
    assert engine.stop_ids == ["embed-7"]


def test_an_uncancelled_embed_returns_its_vectors_and_stops_nothing() -> None:
    engine = FakeEngine()
    request = EmbedRequest("embed-8", ("a", "b"), 100)
    got = trio.run(stoppable_embed, cast(Any, engine), request)
    assert len(got.vectors) == 2 and engine.stop_ids == []


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> GGUFInfo:
    tiny = read_gguf_info(write_tiny_gguf(tmp_path_factory.mktemp("room") / "tiny.gguf"))
    return dataclasses.replace(tiny, context_length=32768)


def test_room_is_needed_when_it_would_buy_a_longer_or_fitting_context(info: GGUFInfo) -> None:
    roomy = 1 << 40
    assert not needs_room(info, None, roomy, 1 << 30)  # the full context fits anyway
    tight = estimate_memory(info, 4096).total_bytes * 2
    assert auto_context(info, tight) < auto_context(info, tight * 4)
    assert needs_room(info, None, tight, tight * 3)
    assert not needs_room(info, None, tight, 0)
    chosen = 8192
    need = estimate_memory(info, chosen).total_bytes
    assert needs_room(info, chosen, need - 1, 1 << 20)
    assert not needs_room(info, chosen, need + 1, 1 << 20)


class FakeReclaimable:
    def __init__(self, held: int) -> None:
        self.held = held
        self.released = 0

    def held_bytes(self) -> int:
        return self.held

    async def release(self) -> None:
        self.released += 1
        self.held = 0


@pytest.mark.parametrize(("available", "released"), [(0, 1), (1 << 40, 0)])
def test_the_generation_engine_takes_back_the_embedding_engines_memory(
        store: ModelStore, available: int, released: int) -> None:
    route = LocalRoute(store, "here", engine_factory=lambda config: FakeEngine(),
                       available=lambda: available)
    other = FakeReclaimable(held=1 << 30)
    route.reclaimable.append(other)

    async def main() -> None:
        async for _ in route.generate(GenerateRequest(id="g", prompt="hi"), "tiny"):
            pass

    trio.run(main)
    assert other.released == released


def test_embed_stops_between_batches(tmp_path: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(str(write_tiny_gguf(tmp_path / "tiny.gguf")), n_ctx=64, n_batch=64,
                          n_ubatch=64, embedding=True, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    inputs = [[1, *range(260, 300)]] * 4  # one input a batch
    done: list[int] = []
    with pytest.raises(embedding.Cancelled, match="after 1 of 4 inputs"):
        embedding.embed(llm, inputs, 1000, done.append, stopped=lambda: bool(done))
    assert done == [1]
    vectors, _ = embedding.embed(llm, inputs, 1000)
    assert len(vectors) == 4
