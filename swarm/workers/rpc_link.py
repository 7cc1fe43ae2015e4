"""The path from this node to a leased worker's RPC server: direct TLS when it can, else libp2p.

The direct TLS path (`swarm/workers/direct_tls.py`) is several times faster than a libp2p stream in
Python, so it is the first choice whenever the worker offers it in the signed ledger, its lease
carried a secret, and a probe gets through from here (same LAN, no firewall in the way). When
any of that fails, the libp2p tunnel (`swarm/workers/tunnel.py`), which reaches every admitted peer,
carries the bytes instead. Either way llama.cpp sees one loopback endpoint per worker, which
admits only the engine process named to its `EngineOnly` gate (swarm/workers/engine_only.py).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost

from swarm.ledger.entries import WorkerOffer
from swarm.workers.direct_tls import DirectClient, DirectUnavailable
from swarm.workers.engine_only import EngineOnly
from swarm.workers.lease import Lease
from swarm.workers.tunnel import TunnelClient

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
DIRECT = "direct TLS"
TUNNEL = "libp2p tunnel"


def direct_target(offer: WorkerOffer, lease: Lease) -> tuple[tuple[str, int], str, bytes] | None:
    """(address, pinned certificate sha256, secret) when the direct path is worth a try."""
    secret_hex = lease.granted.get("direct_secret")
    if offer.direct_port is None or offer.direct_sha256 is None or lease.remote_ip is None:
        return None
    if not isinstance(secret_hex, str):
        return None
    try:
        secret = bytes.fromhex(secret_hex)
    except ValueError:
        return None
    if len(secret) != 32:
        return None
    return (lease.remote_ip, offer.direct_port), offer.direct_sha256, secret


async def open_link(host: IHost, offer: WorkerOffer, lease: Lease, gate: EngineOnly | None = None,
                    *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve one loopback endpoint that reaches `offer`'s RPC server and admits only the
    process `gate` names (the engine; without a gate, only this process); hands
    (endpoint, path name) to `task_status`, then runs until cancelled."""
    target = direct_target(offer, lease)
    if target is not None:
        client = DirectClient(*target, gate=gate)
        try:
            await trio.to_thread.run_sync(client.probe, PROBE_TIMEOUT_S)
        except DirectUnavailable as exc:
            log.info("direct path to %s unavailable (%s); using the libp2p tunnel",
                     offer.name, exc)
        else:
            await _serve_direct(client, lease, task_status)
            return
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(TunnelClient(host, offer.peer_id, gate).open)
        task_status.started((endpoint, TUNNEL))


async def _serve_direct(client: DirectClient, lease: Lease, task_status: Any) -> None:
    endpoint = await trio.to_thread.run_sync(client.start)
    try:
        task_status.started((endpoint, DIRECT))
        # A lease that is lost (the worker vanished without a reset) cuts the connections, so
        # llama.cpp fails at once instead of waiting on a dead TCP peer.
        await lease.lost.wait()
        log.info("lease lost; closing the direct path to %s", lease.peer_id)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(client.close)
