"""The RPC command filter as a worker's relays use it: one account per lease, one filter per
connection, and what happens on the first violation.

A lease holder reaches the worker's RPC server over the libp2p tunnel (swarm/workers/tunnel.py,
trio) and the direct TLS path (swarm/workers/direct_tls.py, two threads per connection), and
llama.cpp opens several connections per lease. `LeaseGuard` holds the lease's `ShareAccount`
(the worker's donated share plus room for compute buffers, drawn on by all of them) and hands
each connection a `GuardedConnection`, whose `feed`/`check_reply` the relay calls on every
chunk before forwarding it. One lock per lease serialises the filters, which are not
thread-safe and share the account. The first `Violation` on any connection marks the whole
lease: its other connections fail at their next chunk, and `on_violation(peer_id, reason)` is
called once, from whichever thread saw it, to cut the holder off and revoke its lease.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from swarm.workers.rpc_filter import RpcFilter, ShareAccount, Violation

# The worker's tensor cache names its files by a 64-bit FNV-1a hash anyone can collide, so a
# holder that may write it could swap the weights a later holder loads: writes are refused
# (the cache flag cleared); reading what the worker cached itself stays allowed.
CACHE_WRITES = False

# What a lease may allocate beyond the share. The client's placement fits the weights and the
# KV cache into each worker's share; llama.cpp then allocates its compute buffer (the graph's
# intermediates) on every device on top: on the worker holding the output layer that is
# n_ubatch x n_vocab logits, 70 MiB for the tests' tiny model, 512 MiB for a 256k vocabulary.
COMPUTE_HEADROOM_BYTES = 1 << 30

_R = TypeVar("_R")


class LeaseGuard:
    """The filters of one lease's connections; see the module doc."""

    def __init__(self, peer_id: str, share_bytes: int,
                 on_violation: Callable[[str, str], None]) -> None:
        self.peer_id = peer_id
        self.share = ShareAccount(share_bytes + COMPUTE_HEADROOM_BYTES)
        self.violation: str | None = None  # the first one's reason
        self._on_violation = on_violation
        self._lock = threading.Lock()

    def connection(self) -> GuardedConnection:
        """The filter of one new relayed connection; `close` it when the connection ends."""
        return GuardedConnection(self, RpcFilter(self.share, cache_writes=CACHE_WRITES))

    def _violated(self, reason: str) -> None:
        with self._lock:
            first = self.violation is None
            if first:
                self.violation = reason
        if first:
            self._on_violation(self.peer_id, reason)


class GuardedConnection:
    """One connection's `RpcFilter` under its lease's lock; a violation anywhere in the lease
    ends it too."""

    def __init__(self, lease: LeaseGuard, flt: RpcFilter) -> None:
        self._lease = lease
        self._filter = flt

    def feed(self, data: bytes | memoryview) -> bytes | memoryview:
        """Client -> server: what the server may receive now (see `RpcFilter.feed`)."""
        return self._guarded(self._filter.feed, data)

    def check_reply(self, data: bytes | memoryview) -> None:
        """Server -> client: call before forwarding `data` itself (see `RpcFilter.check_reply`)."""
        self._guarded(self._filter.check_reply, data)

    def _guarded(self, step: Callable[[Any], _R], data: bytes | memoryview) -> _R:
        lease = self._lease
        try:
            with lease._lock:
                if lease.violation is not None:
                    raise Violation(f"the lease was cut off: {lease.violation}")
                return step(data)
        except Violation as exc:
            lease._violated(exc.reason)
            raise

    def close(self) -> None:
        """The connection ended: its buffers are free again in the lease's share."""
        with self._lease._lock:
            self._filter.close()
