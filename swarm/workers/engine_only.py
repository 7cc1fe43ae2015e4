"""Which local process may use a loopback RPC endpoint: the engine it was opened for.

A client's loopback endpoint (`TunnelClient`, `DirectClient`) carries whatever arrives to a
leased worker, so any local process that connected there could use the lease. An
`EngineOnly` gate admits a connection only when the engine process it was told of
(`expect_pid`) owns the connecting socket, or this node's own process does (it holds the
lease anyway, and the engine supervisor probes endpoints from here). TCP has no SO_PEERCRED,
so ownership is found the way `ss -p` finds it: the process's own TCP sockets (psutil reads
/proc/PID/fd and /proc/net/tcp* on Linux, asks the kernel on macOS and Windows) are searched
for the far end of the accepted connection. Only the expected process is searched, so a
check costs a few milliseconds.

The engine's PID is known only once it has been spawned, after the endpoints were opened; a
connection that comes before is held until it is known (`wait_pid`) and then checked, so a
process that races the engine to the endpoint is refused all the same.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import trio

log = logging.getLogger(__name__)

ENGINE_WAIT_S = 10.0  # how long a connection waits for the engine's PID before refusal
_POLL_S = 0.05

Address = tuple[Any, ...]  # a socket address: (host, port) or (host, port, flow, scope)


def _key(address: Address) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """(ip, port), an IPv4-mapped IPv6 address as the IPv4 one (an AF_INET6 socket reaching
    127.0.0.1 shows in /proc/net/tcp6 as ::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(address[1])


def connection_ends(sock: Any) -> tuple[Address, Address] | None:
    """(own address, peer address) of an accepted socket (plain or trio); None when the
    peer is gone already."""
    try:
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None


def owns_far_end(connections: Iterable[tuple[Address, Address | tuple[()]]], local: Address,
                 peer: Address) -> bool:
    """Whether one of a process's TCP `connections` ((laddr, raddr) pairs, as psutil gives
    them) is the far end of an accepted socket whose own address is `local` and whose peer
    is `peer`: that socket's laddr is our `peer` and its raddr our `local`."""
    want = (_key(peer), _key(local))
    return any(raddr and (_key(laddr), _key(raddr)) == want for laddr, raddr in connections)


def process_owns(pid: int, local: Address, peer: Address) -> bool:
    """Whether process `pid` owns the far end of the accepted socket (`local`, `peer`).
    False when the process is gone or may not be inspected. Blocks for a few ms."""
    try:
        process = psutil.Process(pid)
        # IPv4 first (llama.cpp's sockets): a table at a time costs less than both at once.
        for kind in ("tcp4", "tcp6"):
            connections = process.net_connections(kind=kind)
            if owns_far_end(((c.laddr, c.raddr) for c in connections), local, peer):
                return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        log.warning("cannot see the sockets of process %d; refusing its connection", pid)
        return False
    return False


class EngineOnly:
    """The gate of one engine's endpoints (one per sharded session, shared by its links).

    Thread-safe: the direct path asks from its relay threads, the tunnel from trio through
    a thread, and the engine's PID arrives from the thread that spawned it.
    """

    def __init__(self, owns: Callable[[int, Address, Address], bool] = process_owns) -> None:
        self._owns = owns
        self._pid: int | None = None
        self._changed = threading.Condition()
        self._refused = 0

    @property
    def pid(self) -> int | None:
        return self._pid

    def expect_pid(self, pid: int) -> None:
        """From now on the engine process `pid` (alone, besides this one) may connect."""
        with self._changed:
            self._pid = pid
            self._changed.notify_all()

    def admits_now(self, local: Address, peer: Address) -> bool | None:
        """True when the engine or this process owns the connecting socket; False when
        neither does; None when it is not ours and no engine is known yet (`wait_pid`,
        then ask again). Blocks while it looks (a few ms)."""
        pid = self._pid
        if pid is not None and self._owns(pid, local, peer):
            return True
        if self._owns(os.getpid(), local, peer):
            return True
        return False if pid is not None else None

    def wait_pid(self, timeout: float = ENGINE_WAIT_S,
                 stop: Callable[[], bool] = lambda: False) -> int | None:
        """The engine's PID, waiting up to `timeout` for it (or until `stop()` is true)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pid is None and not stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, _POLL_S * 4))
            return self._pid

    def admits(self, local: Address, peer: Address, wait_s: float = ENGINE_WAIT_S,
               stop: Callable[[], bool] = lambda: False) -> bool:
        """`admits_now`, waiting for the engine if need be (in a thread: it blocks)."""
        verdict = self.admits_now(local, peer)
        if verdict is None and self.wait_pid(wait_s, stop) is not None:
            verdict = self.admits_now(local, peer)
        return bool(verdict)

    def refused(self, where: str, ends: tuple[Address, Address] | None) -> None:
        """Log a refused connection: a warning the first time, then at debug level (a local
        process must not be able to flood the log)."""
        with self._changed:
            self._refused += 1
            first = self._refused == 1
        level = logging.WARNING if first else logging.DEBUG
        engine = f"the engine (pid {self._pid})" if self._pid is not None else "no engine yet"
        port = ends[1][1] if ends is not None else "?"
        log.log(level, "%s: refused a local connection from port %s: not from %s "
                "(%d refused so far)", where, port, engine, self._refused)


async def trio_admits(gate: EngineOnly, local: Address, peer: Address,
                      wait_s: float = ENGINE_WAIT_S,
                      limiter: trio.CapacityLimiter | None = None) -> bool:
    """`gate`'s answer for a connection accepted in trio, waiting for the engine if need
    be. The waiting polls in trio rather than holding a thread: connections that come early
    must not use up the node's worker threads."""
    verdict = await trio.to_thread.run_sync(gate.admits_now, local, peer, limiter=limiter)
    if verdict is not None:
        return verdict
    with trio.move_on_after(wait_s):
        while gate.pid is None:
            await trio.sleep(_POLL_S)
    if gate.pid is None:
        return False
    return bool(await trio.to_thread.run_sync(gate.admits_now, local, peer, limiter=limiter))
