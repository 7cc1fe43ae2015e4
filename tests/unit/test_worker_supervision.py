"""The worker watches its RPC server: a child that dies ends the lease at once and comes back
with the same share; a crash loop stops worker mode with an error. The restart policy, the
lease's idle clock and the tensor cache's cap, on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from swarm.net.host import read_json_frame, write_json_frame
from swarm.workers.lease import IdleClock
from swarm.workers.restarts import CRASH_LOOP, RestartPolicy, exit_text
from swarm.workers.tensor_cache import CachedFile, files_to_evict
from swarm.workers.worker import WorkerService

HOLDER = "peer-holder"
_CHILD = ("import json, sys, time; print(json.dumps({'endpoint': '127.0.0.1:9'}), flush=True); "
          "time.sleep(120)")


class End:
    """One end of an in-memory stream, shaped like the libp2p stream the lease desk reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: HOLDER))

    async def read(self, n: int) -> bytes:
        return bytes(await self._stream.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def reset(self) -> None:
        await self._stream.aclose()


def test_restarts_back_off_and_a_crash_loop_stops() -> None:
    policy = RestartPolicy(max_per_window=3, window_s=60, first_delay_s=0.5, max_delay_s=1.5)
    assert policy.delay([100.0], 100.0) == 0.5
    assert policy.delay([99.0, 100.0], 100.0) == 1.0
    assert policy.delay([98.0, 99.0, 100.0], 100.0) == 1.5
    assert policy.delay([97.0, 98.0, 99.0, 100.0], 100.0) is None
    # Crashes older than the window no longer count.
    assert policy.delay([10.0, 20.0, 30.0, 100.0], 100.0) == 0.5
    assert policy.recent([10.0, 50.0, 100.0], 100.0) == [50.0, 100.0]
    assert exit_text(-signal.SIGKILL) == "signal SIGKILL"
    assert exit_text(134) == "exit status 134"


def test_an_idle_clock_expires_only_when_nothing_moves() -> None:
    clock = IdleClock(idle_s=10)
    assert not clock.expired(0, 0.0)
    assert not clock.expired(0, 9.0)
    assert not clock.expired(500, 15.0)  # bytes moved: the clock starts again
    assert not clock.expired(500, 25.0)
    assert clock.expired(500, 25.5)


async def _fake_start(service: WorkerService, share: int) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process([sys.executable, "-c", _CHILD],
                                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    ready = json.loads(await process.stdout.receive_some(4096))
    return process, str(ready["endpoint"])


def _service(tmp_path: Path, ended: list[str], policy: RestartPolicy) -> WorkerService:
    service = WorkerService(tmp_path, lambda: None, ended.append, policy=policy)
    service._start_process = lambda share: _fake_start(service, share)  # type: ignore[method-assign]
    return service


async def _until(check: Any, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


@pytest.mark.processes
def test_a_killed_rpc_server_ends_the_lease_at_once_and_comes_back(tmp_path: Path) -> None:
    trio.run(_killed_comes_back, tmp_path)


async def _killed_comes_back(tmp_path: Path) -> None:
    ended: list[str] = []
    service = _service(tmp_path, ended, RestartPolicy(first_delay_s=0.1))
    async with trio.open_nursery() as nursery:
        service.nursery = nursery
        await service.enable(64 << 20)
        first = service.status()["rpc_server"]["pid"]
        assert first and service.enabled
        holder_side, worker_side = trio.testing.memory_stream_pair()
        holder = End(holder_side)
        nursery.start_soon(service.desk.handle, End(worker_side))
        await write_json_frame(holder, {"version": 1, "op": "acquire"})
        assert (await read_json_frame(holder, 1024))["ok"] is True
        assert service.desk.holder == HOLDER

        service._process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        with trio.fail_after(2):  # the holder hears it now, not at its next renewal
            said = await read_json_frame(holder, 1024)
        assert (said["code"], said["message"]) == ("revoked", "the worker's RPC server stopped")
        await _until(lambda: ended == [HOLDER], 2)  # ... and its relays were cut
        await _until(lambda: service.status()["rpc_server"]["pid"] not in (None, first), 5)
        status = service.status()
        assert status["enabled"] and status["share_bytes"] == 64 << 20
        assert status["rpc_server"] == {"pid": status["rpc_server"]["pid"], "restarts": 1,
                                        "last_exit": "signal SIGKILL", "error": None}
        assert (status["state"], status["leased_by"]) == ("idle", None)
        assert service.desk.accepting  # the next client gets the fresh server
        await service.close()
        nursery.cancel_scope.cancel()


@pytest.mark.processes
def test_a_crash_loop_stops_worker_mode_with_an_error(tmp_path: Path) -> None:
    trio.run(_crash_loop, tmp_path)


async def _crash_loop(tmp_path: Path) -> None:
    ended: list[str] = []
    service = _service(tmp_path, ended, RestartPolicy(max_per_window=2, first_delay_s=0.05))
    async with trio.open_nursery() as nursery:
        service.nursery = nursery
        await service.enable(64 << 20)
        pids: list[int] = []
        for _ in range(3):
            await _until(lambda: service._process is not None, 5)
            assert service._process is not None
            pids.append(service._process.pid)
            service._process.send_signal(signal.SIGKILL)
            await _until(lambda: service.error is not None or (
                service._process is not None and service._process.pid != pids[-1]), 5)
        await _until(lambda: service.error is not None, 5)
        status = service.status()
        assert not status["enabled"] and status["rpc_server"]["error"] == CRASH_LOOP
        assert status["rpc_server"]["pid"] is None and status["rpc_server"]["restarts"] == 2
        assert len(set(pids)) == 3
        assert not service.desk.accepting
        # Turned on again by the user, it starts afresh.
        await service.enable(64 << 20)
        assert service.enabled and service.status()["rpc_server"]["error"] is None
        await service.close()
        nursery.cancel_scope.cancel()



def _cached(folder: Path, name: str, size: int, mtime: float) -> Path:
    path = folder / name
    path.write_bytes(b"w" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_the_oldest_cached_tensors_go_until_the_cache_fits() -> None:
    files = [CachedFile(Path(n), size, mtime)
             for n, size, mtime in [("new", 40, 30.0), ("old", 50, 10.0), ("mid", 30, 20.0)]]
    assert [f.path.name for f in files_to_evict(files, 70)] == ["old"]
    assert [f.path.name for f in files_to_evict(files, 40)] == ["old", "mid"]
    assert files_to_evict(files, 120) == []
    assert len(files_to_evict(files, 0)) == 3


@pytest.mark.processes
def test_turning_worker_mode_on_prunes_the_tensor_cache_to_the_share(tmp_path: Path) -> None:
    cache = tmp_path / "tensor-cache"
    cache.mkdir()
    old = _cached(cache, "0123456789abcdef", 3 << 20, 1_000.0)
    newer = _cached(cache, "fedcba9876543210", 2 << 20, 2_000.0)

    async def run() -> None:
        service = _service(tmp_path, [], RestartPolicy())
        async with trio.open_nursery() as nursery:
            service.nursery = nursery
            await service.enable(2 << 20)
            await service.close()

    trio.run(run)
    assert not old.exists() and newer.exists()  # 5 MiB on disk for a 2 MiB share
