"""The bare RPC worker process: loopback only, a ready line, a free port, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.engine import Done, Engine, EngineConfig, GenerateRequest
from backends.rpc_worker import BindRefused, check_bind, resolve_share
from tests.conftest import Worker

pytestmark = pytest.mark.processes


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port`, read from the kernel."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(addr)
    return found


def test_ready_line_names_a_loopback_endpoint(
    rpc_workers: Callable[..., Worker], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    worker = rpc_workers("--share-mib", "512", "--cache-dir", str(cache))
    ready = worker.ready
    assert ready["event"] == "ready" and ready["version"] == 1
    assert ready["share_bytes"] == 512 * 2**20
    assert ready["rpc_protocol"] == "7.0.0"
    assert ready["cache_dir"] == str(cache) and cache.is_dir()
    host, port = worker.endpoint.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert listening_addresses(int(port)) == {"0100007F"}  # 127.0.0.1 and nothing else
    with socket.create_connection((host, int(port)), timeout=2):
        pass


def test_two_workers_get_different_free_ports(rpc_workers: Callable[..., Worker]) -> None:
    assert rpc_workers().endpoint != rpc_workers().endpoint


def test_sigterm_stops_the_worker(rpc_workers: Callable[..., Worker]) -> None:
    worker = rpc_workers()
    port = int(worker.endpoint.rsplit(":", 1)[1])
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=5) == 0
    time.sleep(0.1)
    assert listening_addresses(port) == set()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10"])
def test_non_loopback_bind_is_refused(host: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "backends.rpc_worker", "--host", host],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "refusing to listen" in proc.stderr and "--unsafe-bind" in proc.stderr


def test_bind_rules() -> None:
    check_bind("127.0.0.1", unsafe_bind=False)
    check_bind("127.3.4.5", unsafe_bind=False)
    check_bind("localhost", unsafe_bind=False)
    check_bind("10.0.0.5", unsafe_bind=True)
    with pytest.raises(BindRefused):
        check_bind("10.0.0.5", unsafe_bind=False)
    with pytest.raises(BindRefused):
        check_bind("example.org", unsafe_bind=False)


def test_share_defaults_to_half_and_is_bounded() -> None:
    assert resolve_share(None, 8 * 2**30) == 4 * 2**30
    assert resolve_share(100, 8 * 2**30) == 100 * 2**20
    for bad in (0, -5, 9000):
        with pytest.raises(ValueError, match="--share-mib"):
            resolve_share(bad, 8 * 2**30)


def test_share_bigger_than_ram_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "backends.rpc_worker", "--share-mib", str(10**9)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "--share-mib must be between" in proc.stderr
    assert json.loads(proc.stdout or "null") is None


def test_garbage_on_the_rpc_port_is_dropped_and_the_worker_still_serves(
    rpc_workers: Callable[..., Worker], tiny_model: Path
) -> None:
    worker = rpc_workers()
    host, port = worker.endpoint.rsplit(":", 1)
    for payload in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"\xff" * 64):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(payload)
            s.settimeout(2)
            with contextlib.suppress(ConnectionResetError):  # a reset is a refusal too
                assert s.recv(100) == b""  # closed without an answer
    assert worker.proc.poll() is None
    config = EngineConfig(model_path=str(tiny_model), n_ctx=256,
                          rpc_endpoints=(worker.endpoint,))
    with Engine(config) as engine:
        done = list(engine.generate(GenerateRequest(id="a", prompt="hi", max_tokens=4)))[-1]
    assert isinstance(done, Done) and len(done.tokens) == 4
