"""Worker mode: this machine donates memory to the swarm through a ggml RPC worker process.

On: start `backends.rpc_worker` on 127.0.0.1 with a tensor cache in the data directory, grant
one lease at a time (`swarm/lease.py`), and let only the lease holder through the RPC tunnel.
Off: stop granting leases, let the holder finish (it re-plans), then stop the process.
The ledger's "worker" entry says what this worker donates and who holds it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from backends import ggml
from backends.rpc_worker import resolve_share
from swarm.lease import LeaseDesk
from swarm.placement import WORKER_VALUE_VERSION

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
REVOKE_GRACE_S = 20.0  # how long a holder may finish its reply after worker mode goes off
STOP_TIMEOUT_S = 5.0


class WorkerStartFailed(OSError):
    """The RPC worker process did not start; the message says why."""


def share_bytes(share_mib: int | None, share_percent: float | None, total: int) -> int:
    """What the user donates: MiB, or a percentage of RAM, else half of it."""
    if share_mib is not None and share_percent is not None:
        raise ValueError("give the share in MiB or as a percentage, not both")
    if share_percent is not None:
        if not 0 < share_percent <= 100:
            raise ValueError("the share must be between 1 and 100 percent of RAM")
        return int(total * share_percent / 100)
    return resolve_share(share_mib, total)


class WorkerService:
    def __init__(self, data_dir: Path, on_change: Callable[[], None],
                 on_lease_end: Callable[[str], None]) -> None:
        self.cache_dir = data_dir / "tensor-cache"
        self.share_bytes = 0
        self.endpoint: str | None = None
        self.desk = LeaseDesk(on_change, on_lease_end)
        self._process: trio.Process | None = None
        self._on_change = on_change
        self._lock = trio.Lock()

    @property
    def enabled(self) -> bool:
        return self._process is not None

    def ledger_value(self, free_bytes: int, cores: int) -> dict[str, Any]:
        holder = self.desk.holder
        return {"version": WORKER_VALUE_VERSION, "donated_bytes": self.share_bytes,
                "free_bytes": free_bytes, "cores": cores,
                "rpc_protocol": ggml.RPC_PROTOCOL_VERSION,
                "state": "leased" if holder else "idle", "leased_by": holder}

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "share_bytes": self.share_bytes,
                "state": "leased" if self.desk.holder else "idle",
                "leased_by": self.desk.holder}

    def tunnel_target(self, peer_id: str) -> str | None:
        """The RPC endpoint for the lease holder; nobody else gets through."""
        if self.endpoint is not None and peer_id == self.desk.holder:
            return self.endpoint
        return None

    async def enable(self, share: int) -> None:
        async with self._lock:
            if self._process is not None and share == self.share_bytes:
                self.desk.accepting = True
                return
            await self._stop_process()
            self.share_bytes = share
            self._process, self.endpoint = await self._start_process(share)
            self.desk.accepting = True
            self._on_change()
            log.info("worker mode on: donating %d MiB on %s", share >> 20, self.endpoint)

    async def disable(self) -> None:
        async with self._lock:
            await self.desk.revoke(REVOKE_GRACE_S)
            await self._stop_process()
            self._on_change()
            log.info("worker mode off")

    async def _start_process(self, share: int) -> tuple[trio.Process, str]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "backends.rpc_worker", "--host", "127.0.0.1",
                "--share-mib", str(max(share >> 20, 1)), "--cache-dir", str(self.cache_dir),
                "--parent-pid", str(os.getpid())]  # a node killed outright takes it along
        env = {**os.environ, "GGML_NO_BACKTRACE": "1", "OMP_WAIT_POLICY": "passive"}
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=env,
                                                   start_new_session=True)
        assert process.stdout is not None
        line = b""
        with trio.move_on_after(READY_TIMEOUT_S):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                line += chunk
        try:
            ready = json.loads(line)
            return process, str(ready["endpoint"])
        except (ValueError, KeyError, TypeError):
            process.kill()
            await process.wait()
            raise WorkerStartFailed(
                f"the RPC worker did not start (exit status {process.returncode}); see the "
                "node's log") from None

    async def _stop_process(self) -> None:
        process, self._process, self.endpoint = self._process, None, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def close(self) -> None:
        self.desk.accepting = False
        await self._stop_process()
