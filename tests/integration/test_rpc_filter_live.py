"""The RPC command filter between llama.cpp and a real worker: honest generation through it is
unchanged, and a peer that sends a function-pointer op is cut off before the worker sees it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.ggml_rpc_wire import Cmd
from swarm.workers.rpc_filter import RpcFilter, ShareAccount, Violation
from tests.conftest import Worker, greedy_on_worker
from tests.support.rpc_attacks import hostile_custom_op

pytestmark = pytest.mark.processes

SHARE = 2 * 2**30


@dataclass
class FilteringProxy:
    """A loopback TCP relay to `target` that runs each connection through its own RpcFilter,
    as the tunnel and direct-TLS relays will: requests through feed, replies through
    feed_reply before the client sees them, and both sides closed on a Violation."""

    target: str
    share: ShareAccount = field(default_factory=lambda: ShareAccount(SHARE))
    violations: list[str] = field(default_factory=list)
    filters: list[RpcFilter] = field(default_factory=list)
    endpoint: str = ""

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                host, port = self.target.rsplit(":", 1)
                server = socket.create_connection((host, int(port)))
                flt = RpcFilter(self.share)
                self.filters.append(flt)
                lock = threading.Lock()  # the two pumps share one filter
                ways = ((client, server, flt.feed), (server, client, flt.feed_reply))
                pumps = [threading.Thread(target=self._pump, daemon=True,
                                          args=(a, b, step, lock, (client, server)))
                         for a, b, step in ways]
                for t in pumps:
                    t.start()
                threading.Thread(target=self._close_after, args=(pumps, flt), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, step: Callable[[bytes], bytes],
              lock: threading.Lock, both: tuple[socket.socket, socket.socket]) -> None:
        try:
            while chunk := src.recv(1024 * 1024):
                with lock:
                    out = step(chunk)
                if out:
                    dst.sendall(out)
        except Violation as exc:
            self.violations.append(exc.reason)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _close_after(pumps: list[threading.Thread], flt: RpcFilter) -> None:
        for t in pumps:
            t.join()
        flt.close()

    def close(self) -> None:
        self._listener.close()


@contextlib.contextmanager
def proxy_to(worker: Worker) -> Iterator[FilteringProxy]:
    p = FilteringProxy(worker.endpoint)
    try:
        yield p
    finally:
        p.close()


def alive(worker: Worker, wait_s: float = 1.0) -> bool:
    time.sleep(wait_s)
    return worker.proc.poll() is None


@contextlib.contextmanager
def filtered_run_matching_direct(model: Path, worker: Worker) -> Iterator[FilteringProxy]:
    """Generate on `worker` directly, then through a filtering proxy (yielded, still open):
    the same greedy tokens, no violation, real commands filtered."""
    direct = greedy_on_worker(model, worker.endpoint)
    with proxy_to(worker) as proxy:
        filtered = greedy_on_worker(model, proxy.endpoint)
        assert filtered.tokens == direct.tokens and len(filtered.tokens) == 24
        assert proxy.violations == []
        counts = sum((f.commands for f in proxy.filters), start=Counter[Cmd]())
        print(f"\ncommands through the filter: { {c.name: n for c, n in counts.items()} }")
        assert counts[Cmd.SET_TENSOR] > 0 and counts[Cmd.GRAPH_COMPUTE] > 0
        deadline = time.monotonic() + 10  # the engine has exited: every connection ends
        while proxy.share.used_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.share.used_bytes == 0
        yield proxy


def test_generation_through_the_filter_is_unchanged_and_a_custom_op_is_cut_off(
    tiny_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    worker = rpc_workers()
    with filtered_run_matching_direct(tiny_model, worker) as proxy:
        assert hostile_custom_op(proxy.endpoint) == b""
        assert proxy.violations == ["graph node op CUSTOM is not allowed"]
        assert alive(worker)
        again = greedy_on_worker(tiny_model, proxy.endpoint)
        assert again.tokens == greedy_on_worker(tiny_model, worker.endpoint).tokens


def test_without_the_filter_the_same_frames_kill_a_worker(
    rpc_workers: Callable[..., Worker]
) -> None:
    """What the filter stops is real: the worker jumps to the peer's address and dies."""
    worker = rpc_workers()
    hostile_custom_op(worker.endpoint)
    assert not alive(worker)


@pytest.mark.gemma
def test_gemma_through_the_filter_is_unchanged(
    gemma_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    """A real model's graphs use only allowed ops and stay inside their buffers."""
    with filtered_run_matching_direct(gemma_model, rpc_workers()):
        pass
