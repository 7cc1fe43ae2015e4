"""The engine process and its supervisor, on the real llama.cpp with the tiny model: local
and RPC generation, stopping, and every way the engine can die turning into a typed error
while the test process lives on."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.engine import (
    Done,
    Engine,
    EngineConfig,
    EngineCrashed,
    EngineHung,
    EngineLoadFailed,
    GenerateRequest,
    GenerationFailed,
    Token,
    Watchdog,
    WorkerLost,
    WorkerUnreachable,
)
from backends.layer_split import layers_per_device
from tests.conftest import Worker
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.processes

HELLO = ({"role": "user", "content": "hello world"},)


def ask(max_tokens: int = 16, id: str = "q") -> GenerateRequest:
    return GenerateRequest(id=id, messages=HELLO, max_tokens=max_tokens, temperature=0)


def run(config: EngineConfig, request: GenerateRequest) -> tuple[list[Token], Done]:
    with Engine(config) as engine:
        events = list(engine.generate(request))
    tokens = [e for e in events if isinstance(e, Token)]
    assert isinstance(events[-1], Done)
    return tokens, events[-1]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with room for thousands of tokens, for generations that must still be
    running when the test acts."""
    return write_tiny_gguf(tmp_path_factory.mktemp("long") / "long.gguf", context_length=8192)


def free_port_without_listener() -> tuple[socket.socket, int]:
    """A port bound (so nobody else takes it) but not listening: connections are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def test_local_generation_streams_tokens_and_reports(tiny_model: Path) -> None:
    tokens, done = run(EngineConfig(model_path=str(tiny_model), n_ctx=256), ask(12))
    assert [t.token for t in tokens] == list(done.tokens)
    assert len(done.tokens) == 12 and done.finish_reason == "length"
    assert "".join(t.text for t in tokens) == done.text
    assert done.prompt_tokens > 5
    assert done.timings.prompt_tokens_per_s > 0 and done.timings.generation_tokens_per_s > 0


def test_a_continued_request_counts_only_its_own_prompt(tiny_model: Path) -> None:
    """After a failover the next attempt's prompt ends with the reply so far; usage must still
    count the original prompt, so the engine does not count the continuation as prompt."""
    plain = GenerateRequest(id="p", prompt="Once upon a time", max_tokens=8, temperature=0)
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        for request in (ask(8), plain):
            first = list(engine.generate(request))[-1]
            assert isinstance(first, Done) and len(first.tokens) == 8
            continued = list(engine.generate(GenerateRequest(**{
                **request.__dict__, "id": "c", "continuation": first.text})))[-1]
            assert isinstance(continued, Done)
            assert continued.prompt_tokens == first.prompt_tokens
            assert continued.timings.prompt_eval_tokens > 0


def test_loaded_reports_layers_on_cpu(tiny_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        loaded = engine.wait_loaded()
    assert loaded.n_layers == 4 and loaded.load_s > 0
    assert [(d.name, d.layers, d.holds_output) for d in loaded.devices] == [("CPU", 4, True)]


def test_second_turn_reuses_the_cached_prefix(tiny_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        first = list(engine.generate(ask(4)))[-1]
        turns = (*HELLO, {"role": "assistant", "content": first.text},
                 {"role": "user", "content": "the cat"})
        second = list(engine.generate(
            GenerateRequest(id="t2", messages=turns, max_tokens=4, temperature=0)))[-1]
    assert first.timings.prompt_eval_tokens == first.prompt_tokens
    assert 0 < second.timings.prompt_eval_tokens <= second.prompt_tokens - first.prompt_tokens
    assert second.timings.prompt_tokens_per_s > 0


def test_same_seed_same_sample_and_engine_is_reusable(tiny_model: Path) -> None:
    sampled = GenerateRequest(id="s", messages=HELLO, max_tokens=20, temperature=1.0, seed=7)
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        first = list(engine.generate(sampled))[-1]
        second = list(engine.generate(sampled))[-1]
        other = list(engine.generate(GenerateRequest(**{**sampled.__dict__, "seed": 8})))[-1]
    assert first.tokens == second.tokens
    assert other.tokens != first.tokens


def test_stop_ends_a_long_generation(long_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(long_model), n_ctx=8192)) as engine:
        events = engine.generate(ask(6000, id="long"))
        for seen, event in enumerate(events):
            if isinstance(event, Done):
                break
            if seen == 4:
                engine.stop("long")
        assert isinstance(event, Done)
        assert event.finish_reason == "cancelled"
        assert len(event.tokens) < 1000


def test_abandoned_reply_does_not_leak_into_the_next(tiny_model: Path) -> None:
    config = EngineConfig(model_path=str(tiny_model), n_ctx=256)
    _, fresh = run(config, ask(10))
    with Engine(config) as engine:
        for i, _event in enumerate(engine.generate(ask(200))):
            if i == 2:
                break
        again = list(engine.generate(ask(10)))
    assert all(isinstance(e, Token) for e in again[:-1])
    assert again[-1].tokens == fresh.tokens


def test_a_late_stop_does_not_cancel_the_next_request_with_that_id(tiny_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        list(engine.generate(ask(3, id="same")))
        engine.stop("same")  # arrives after that reply finished
        done = list(engine.generate(ask(10, id="same")))[-1]
    assert done.finish_reason == "length" and len(done.tokens) == 10


def test_prompt_too_long_is_refused_and_engine_survives(tiny_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        with pytest.raises(GenerationFailed, match="does not fit the context"):
            list(engine.generate(ask(10_000)))
        assert isinstance(list(engine.generate(ask(3)))[-1], Done)


@pytest.mark.parametrize("split", [(1.0, 1.0), (1.0, 3.0), (3.0, 1.0)])
def test_rpc_split_matches_local_and_follows_split(
    tiny_model: Path, rpc_workers: Callable[..., Worker], split: tuple[float, float]
) -> None:
    local = EngineConfig(model_path=str(tiny_model), n_ctx=256, deterministic=True)
    w1, w2 = rpc_workers(), rpc_workers()
    remote = EngineConfig(
        model_path=str(tiny_model),
        n_ctx=256,
        deterministic=True,
        rpc_endpoints=(w1.endpoint, w2.endpoint),
        tensor_split=split,
    )
    sampled = GenerateRequest(id="s", messages=HELLO, max_tokens=24, temperature=1.0, seed=3)
    with Engine(local) as engine:
        local_greedy = list(engine.generate(ask(24)))[-1]
        local_sampled = list(engine.generate(sampled))[-1]
    with Engine(remote) as engine:
        loaded = engine.wait_loaded()
        remote_greedy = list(engine.generate(ask(24)))[-1]
        remote_sampled = list(engine.generate(sampled))[-1]
    assert remote_greedy.tokens == local_greedy.tokens
    assert remote_sampled.tokens == local_sampled.tokens
    by_endpoint = {d.endpoint: d.layers for d in loaded.devices}
    assert [by_endpoint.get(w1.endpoint, 0), by_endpoint.get(w2.endpoint, 0)] == (
        layers_per_device(4, split)
    )


def test_unreachable_endpoint_is_named_quickly(tiny_model: Path) -> None:
    holder, port = free_port_without_listener()
    with holder:
        started = time.monotonic()
        config = EngineConfig(model_path=str(tiny_model), rpc_endpoints=(f"127.0.0.1:{port}",))
        with pytest.raises(WorkerUnreachable) as caught, Engine(config) as engine:
            engine.wait_loaded()
    assert caught.value.endpoints == (f"127.0.0.1:{port}",)
    assert time.monotonic() - started < 15


def test_silent_endpoint_is_named_after_the_connect_deadline(tiny_model: Path) -> None:
    """Something accepts connections at the endpoint but never speaks RPC."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        config = EngineConfig(model_path=str(tiny_model), rpc_endpoints=(endpoint,))
        with pytest.raises(WorkerUnreachable, match="did not answer") as caught, Engine(
            config, Watchdog(connect_s=2)
        ) as engine:
            engine.wait_loaded()
    assert caught.value.endpoints == (endpoint,)
    assert time.monotonic() - started < 10


def test_load_reports_progress(tiny_model: Path) -> None:
    seen: list[float] = []
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        engine.wait_loaded(seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 1.0


def test_worker_killed_mid_generation_is_named(
    long_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    w1, w2 = rpc_workers(), rpc_workers()
    config = EngineConfig(
        model_path=str(long_model), n_ctx=8192, rpc_endpoints=(w1.endpoint, w2.endpoint)
    )
    with Engine(config, Watchdog(token_s=20)) as engine:
        engine.wait_loaded()
        killed_at = None
        with pytest.raises(WorkerLost) as caught:
            for i, _event in enumerate(engine.generate(ask(6000))):
                if i == 3:
                    w2.kill()
                    killed_at = time.monotonic()
        assert killed_at is not None and time.monotonic() - killed_at < 25
        assert w2.endpoint in caught.value.endpoints
        assert w1.endpoint not in caught.value.endpoints
        with pytest.raises(WorkerLost):  # the engine stays dead, it does not pretend
            list(engine.generate(ask(3)))
    _, done = run(EngineConfig(model_path=str(long_model), n_ctx=256), ask(3))
    assert len(done.tokens) == 3  # and the parent can carry on with a new engine


def test_hung_engine_is_killed_by_the_watchdog(long_model: Path) -> None:
    config = EngineConfig(model_path=str(long_model), n_ctx=8192)
    with Engine(config, Watchdog(token_s=1.0)) as engine:
        engine.wait_loaded()
        started = None
        with pytest.raises(EngineHung):
            for i, _event in enumerate(engine.generate(ask(6000))):
                if i == 3:
                    os.kill(engine.pid, signal.SIGSTOP)
                    started = time.monotonic()
        assert started is not None and time.monotonic() - started < 10
        assert engine._proc.poll() is not None  # really gone, not left stopped


def test_engine_killed_mid_generation_is_a_crash(long_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(long_model), n_ctx=8192)) as engine:
        engine.wait_loaded()
        with pytest.raises(EngineCrashed) as caught:
            for i, _event in enumerate(engine.generate(ask(6000))):
                if i == 3:
                    os.kill(engine.pid, signal.SIGKILL)
    assert caught.value.returncode == -signal.SIGKILL


def test_non_gguf_file_fails_to_load(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("these are my notes, not a model")
    with pytest.raises(EngineLoadFailed, match="could not load"), Engine(
        EngineConfig(model_path=str(bad))
    ) as engine:
        engine.wait_loaded()


def test_close_never_hangs_on_a_stuck_engine(tiny_model: Path) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256), Watchdog(close_s=1))
    engine.wait_loaded()
    os.kill(engine.pid, signal.SIGSTOP)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert engine._proc.poll() is not None


@pytest.mark.gemma
def test_gemma_answers_and_rpc_split_is_token_identical(
    gemma_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    question = GenerateRequest(
        id="g",
        messages=({"role": "user", "content": "What is the capital of France?"},),
        max_tokens=32,
        temperature=0,
    )
    _, local = run(EngineConfig(model_path=str(gemma_model), n_ctx=1024, deterministic=True),
                   question)
    assert "Paris" in local.text
    w1, w2 = rpc_workers(), rpc_workers()
    config = EngineConfig(
        model_path=str(gemma_model),
        n_ctx=1024,
        deterministic=True,
        rpc_endpoints=(w1.endpoint, w2.endpoint),
        tensor_split=(1.0, 2.0),
    )
    with Engine(config) as engine:
        loaded = engine.wait_loaded()
        remote = list(engine.generate(question))[-1]
    assert remote.tokens == local.tokens
    assert [d.layers for d in loaded.devices] == layers_per_device(18, (1.0, 2.0))


def test_engine_dying_while_loading_is_a_failed_load(tiny_model: Path) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_model)))
    os.kill(engine.pid, signal.SIGKILL)  # before it could even import llama.cpp
    with pytest.raises(EngineLoadFailed, match="SIGKILL"):
        engine.wait_loaded()
    engine.close()


def test_garbage_on_the_engine_input_is_refused_and_it_carries_on(tiny_model: Path) -> None:
    with Engine(EngineConfig(model_path=str(tiny_model), n_ctx=256)) as engine:
        engine.wait_loaded()
        assert engine._proc.stdin is not None
        engine._proc.stdin.write(b"\x00\xffnot json\n{\"v\": 1, \"type\": \"Rm\"}\n")
        engine._proc.stdin.flush()
        done = list(engine.generate(ask(5)))[-1]
        assert len(done.tokens) == 5
        assert "could not read" in engine.stderr_tail
