"""Worker mode: this machine donates memory to the swarm through a ggml RPC worker process.

On: start `backends.rpc_worker` on a Unix socket only this node can open (mode 0600, in a folder
of mode 0700 under the data directory; loopback TCP on Windows), with a tensor cache in the data
directory, grant one lease at a time (`swarm/workers/lease.py`), and let only the lease holder
through: over the libp2p RPC tunnel, or over the direct TLS path (`swarm/workers/direct_tls.py`)
with the secret its lease carries. Off: stop granting leases, let the holder finish (it
re-plans), then stop the process. The ledger's "worker" entry says what this worker donates, who
holds it, and where the direct path listens with which certificate (the ledger is signed, so
clients can pin it).
Every byte a holder sends or receives passes its lease's RPC command filter
(`swarm/workers/rpc_guard.py`); a holder that breaks the rules is cut off and barred.

The node watches its RPC process: one that dies unexpectedly (killed, or aborted by a bad
frame) ends the lease at once, so its holder fails over now rather than timing out, takes the
worker entry out of the ledger, and is started again with the same share after a short
backoff (swarm/workers/restarts.py), which republishes the entry; a crash loop stops worker
mode with an error in /api/status.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from backends import ggml
from backends.compute import compute_env
from backends.ggml_rpc_wire import GGML_OP_COUNT
from backends.rpc_worker import resolve_share
from swarm.ledger.entries import WorkerEntry
from swarm.workers.direct_tls import DirectServer, load_or_create_certificate
from swarm.workers.lease import LeaseDesk
from swarm.workers.restarts import CRASH_LOOP, RestartPolicy, exit_text
from swarm.workers.rpc_guard import LeaseGuard
from swarm.workers.tensor_cache import prune as prune_cache

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
REVOKE_GRACE_S = 20.0  # how long a holder may finish its reply after worker mode goes off
STOP_TIMEOUT_S = 5.0
VIOLATION_BAR_S = 3600.0  # how long a holder cut off for an RPC violation gets no new lease
SOCKET_NAME = "rpc.sock"
# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
MAX_SOCKET_PATH = 100


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


def private_socket_dir(data_dir: Path) -> Path:
    """A folder of mode 0700 for the RPC server's socket: "rpc" in the data directory, or a
    fresh one in the temporary directory where that path is too long for a socket."""
    folder = data_dir / "rpc"
    if len(str(folder / SOCKET_NAME)) > MAX_SOCKET_PATH:
        return Path(tempfile.mkdtemp(prefix="covey-rpc-"))  # made with mode 0700
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # a folder made before, or under another umask
    return folder


def listen_args(data_dir: Path) -> list[str]:
    """Where the RPC worker listens: a private Unix socket, or loopback TCP on Windows (its
    ggml build has no Unix sockets)."""
    if sys.platform == "win32":
        return ["--host", "127.0.0.1"]
    return ["--socket", str(private_socket_dir(data_dir) / SOCKET_NAME)]


class WorkerService:
    def __init__(self, data_dir: Path, on_change: Callable[[], None],
                 on_lease_end: Callable[[str], None], direct_bind: str | None = None,
                 name_of: Callable[[str], str] = str,
                 tunnel_bytes: Callable[[], int] = lambda: 0,
                 policy: RestartPolicy | None = None) -> None:
        """`direct_bind`: the address the direct TLS path listens on (the node's libp2p listen
        address, so it is reachable exactly where the node is); None turns the path off.
        `name_of(peer_id)`: how the log names a peer. `tunnel_bytes`: RPC bytes the libp2p
        tunnel relayed so far (a lease that carries none for long ends)."""
        self.data_dir = data_dir
        self.cache_dir = data_dir / "tensor-cache"
        self.share_bytes = 0
        self.endpoint: str | None = None
        self.desk = LeaseDesk(on_change, self._lease_ended, on_grant=self._granted,
                              relayed=self._relayed)
        self.nursery: trio.Nursery | None = None  # the node's, set when it runs: the watchers
        self.policy = policy or RestartPolicy()
        self.restarts = 0  # since worker mode was turned on
        self.last_exit: str | None = None  # how the RPC process last died unexpectedly
        self.error: str | None = None  # why worker mode stopped by itself
        self._wanted = False  # worker mode is on (the process may be restarting)
        self._crashes: list[float] = []
        self._tunnel_bytes = tunnel_bytes
        self.direct: DirectServer | None = None
        self._direct_bind = direct_bind
        self._direct_sha256 = ""
        self._secrets: dict[str, bytes] = {}  # lease holder -> its direct-path secret
        self._on_lease_end = on_lease_end
        self._process: trio.Process | None = None
        self._on_change = on_change
        self._lock = trio.Lock()
        self._guards: dict[str, LeaseGuard] = {}  # lease holder -> its RPC filters
        self._name_of = name_of
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.violations = 0  # holders cut off for breaking the RPC rules

    def _granted(self, peer_id: str) -> dict[str, Any]:
        """A fresh secret per lease: only the holder (told over the Noise-authenticated lease
        stream) can open the direct path, and only while it holds the lease."""
        self._trio_token = trio.lowlevel.current_trio_token()
        guard = LeaseGuard(peer_id, self.share_bytes, self._violation_seen)
        self._guards[peer_id] = guard
        if self.direct is None:
            return {}
        secret = secrets.token_bytes(32)
        self._secrets[peer_id] = secret
        self.direct.allow(secret, guard)
        return {"direct_secret": secret.hex()}

    def lease_guard(self, peer_id: str) -> LeaseGuard | None:
        """The RPC filters of the lease holder's connections; None for anyone else."""
        return self._guards.get(peer_id) if peer_id == self.desk.holder else None

    def _violation_seen(self, peer_id: str, reason: str) -> None:
        """From a relay (a direct-path thread, or trio's): cut the holder off in trio."""
        assert self._trio_token is not None  # set when the lease was granted
        self._trio_token.run_sync_soon(self._cut_off, peer_id, reason)

    def _cut_off(self, peer_id: str, reason: str) -> None:
        self.violations += 1
        log.warning("%s (%s) broke the RPC rules (%s): cutting its connections, revoking its "
                    "lease, and granting it none for %d s", self._name_of(peer_id), peer_id,
                    reason, VIOLATION_BAR_S)
        self._lease_ended(peer_id)  # both paths at once; the lease's own end repeats it harmlessly
        self.desk.evict(peer_id, VIOLATION_BAR_S)

    def _lease_ended(self, peer_id: str) -> None:
        self._guards.pop(peer_id, None)
        secret = self._secrets.pop(peer_id, None)
        if secret is not None and self.direct is not None:
            self.direct.revoke(secret)  # its open connections are cut at once
        self._on_lease_end(peer_id)

    def _relayed(self) -> int:
        direct = self.direct.stats.counters() if self.direct is not None else {}
        return self._tunnel_bytes() + direct.get("bytes_up", 0) + direct.get("bytes_down", 0)

    @property
    def enabled(self) -> bool:
        return self._process is not None

    def ledger_value(self, free_bytes: int, cores: int) -> dict[str, Any]:
        holder = self.desk.holder
        port, sha256 = ((self.direct.port, self._direct_sha256) if self.direct is not None
                        else (None, None))
        waiting, free_within = self._handover()
        return WorkerEntry(self.share_bytes, free_bytes, cores, ggml.RPC_PROTOCOL_VERSION,
                           "leased" if holder else "idle", holder, port, sha256,
                           ggml_op_count=GGML_OP_COUNT, waiting=waiting,
                           free_within_s=free_within).to_value()

    def _handover(self) -> tuple[int, int | None]:
        """(members waiting for the lease, whole seconds until its holder must hand over)."""
        handover = self.desk.handover
        if not handover.waiting:
            return 0, None
        now = trio.current_time()
        handover.forget_old(now)
        free = handover.free_within(now) if self.desk.holder else None
        return len(handover.waiting), None if free is None else math.ceil(free)

    def status(self) -> dict[str, Any]:
        waiting, free_within = self._handover()
        return {"enabled": self.enabled, "share_bytes": self.share_bytes,
                "state": "leased" if self.desk.holder else "idle",
                "leased_by": self.desk.holder,
                "waiting": waiting, "free_within_s": free_within,
                "direct_port": self.direct.port if self.direct is not None else None,
                "rpc_violations": self.violations,
                "rpc_server": {"pid": self._process.pid if self._process is not None else None,
                               "restarts": self.restarts, "last_exit": self.last_exit,
                               "error": self.error}}

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
            self._wanted, self.error, self.last_exit = False, None, None
            self.restarts, self._crashes = 0, []
            await trio.to_thread.run_sync(prune_cache, self.cache_dir, share)
            await self._launch()
            self._wanted = True
            log.info("worker mode on: donating %d MiB on %s", share >> 20, self.endpoint)

    async def _launch(self) -> None:
        """Start the RPC process and the direct path to it, watch it, and take leases."""
        self._process, self.endpoint = await self._start_process(self.share_bytes)
        await self._start_direct(self.endpoint)
        if self.nursery is not None:
            self.nursery.start_soon(self._watch, self._process)
        self.desk.refusal = "worker mode is off on this machine"
        self.desk.accepting = True
        self._on_change()

    async def _watch(self, process: trio.Process) -> None:
        await process.wait()
        if self._process is not process:
            return  # stopped on purpose
        try:
            await self._recover(process)
        except Exception:  # noqa: BLE001 - the node's nursery must outlive its worker
            log.exception("recovering from the RPC server's exit failed")

    async def _recover(self, process: trio.Process) -> None:
        how = exit_text(process.returncode)
        log.warning("the RPC server (pid %d) stopped unexpectedly (%s); ending its lease",
                    process.pid, how)
        async with self._lock:
            if self._process is not process:
                return
            self.last_exit = how
            self.desk.refusal = "the worker's RPC server is restarting"
            # Nothing is left to finish: the holder fails over now, its relays cut.
            await self.desk.revoke(0, "the worker's RPC server stopped")
            await self._stop_process()
            self._on_change()  # the entry goes until the server is back
        await self._restart()

    async def _restart(self) -> None:
        """Start the RPC process again after the policy's backoff, or give up on a crash
        loop. Turning worker mode off or on meanwhile wins."""
        while True:
            now = trio.current_time()
            self._crashes = [*self.policy.recent(self._crashes, now), now]
            delay = self.policy.delay(self._crashes, now)
            if delay is None:
                log.error("%s (%d times in %.0f s); turn worker mode on again to retry",
                          CRASH_LOOP, len(self._crashes), self.policy.window_s)
                self._wanted, self.error = False, CRASH_LOOP
                self._on_change()
                return
            await trio.sleep(delay)
            async with self._lock:
                if not self._wanted or self._process is not None:
                    return
                try:
                    await self._launch()
                except OSError as exc:  # WorkerStartFailed, or no process at all
                    log.warning("restarting the RPC server failed: %s", exc)
                    continue
                self.restarts += 1
                log.info("RPC server restarted on %s", self.endpoint)
                return

    async def disable(self) -> None:
        async with self._lock:
            self._wanted = False
            await self.desk.revoke(REVOKE_GRACE_S)
            await self._stop_process()
            self._on_change()
            log.info("worker mode off")

    async def _start_process(self, share: int) -> tuple[trio.Process, str]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "backends.rpc_worker", *listen_args(self.data_dir),
                "--share-mib", str(max(share >> 20, 1)), "--cache-dir", str(self.cache_dir),
                "--parent-pid", str(os.getpid())]  # a node killed outright takes it along
        env = compute_env()
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

    async def _start_direct(self, target: str) -> None:
        """The direct TLS path to `target`; without it, clients use the libp2p tunnel."""
        if self._direct_bind is None:
            return
        try:
            cert = await trio.to_thread.run_sync(load_or_create_certificate, self.data_dir)
            server = DirectServer(cert, target, bind=self._direct_bind)
            await trio.to_thread.run_sync(server.start)
        except OSError as exc:
            log.warning("direct TLS path unavailable (%s); peers use the libp2p tunnel", exc)
            return
        self.direct, self._direct_sha256 = server, cert.sha256
        log.info("direct TLS path on %s:%d", self._direct_bind, server.port)

    async def _stop_process(self) -> None:
        direct, self.direct = self.direct, None
        self._secrets.clear()
        if direct is not None:
            await trio.to_thread.run_sync(direct.close)
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
        self._wanted = False
        self.desk.accepting = False
        await self._stop_process()
