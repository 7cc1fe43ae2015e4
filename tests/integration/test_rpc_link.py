"""Choosing the path to a leased worker: direct TLS when offered and reachable, else the libp2p
tunnel; real libp2p hosts and a real DirectServer on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from swarm.ledger.entries import WorkerOffer
from swarm.net.host import isolate
from swarm.workers.direct_tls import DirectServer, load_or_create_certificate, new_secret
from swarm.workers.engine_only import EngineOnly
from swarm.workers.lease import Lease
from swarm.workers.rpc_link import DIRECT, TUNNEL, direct_target, open_link
from swarm.workers.tunnel import TUNNEL_PROTOCOL, TunnelServer, parse_loopback_endpoint
from tests.conftest import greedy_on_worker
from tests.integration.test_rpc_filter_live import FilteringProxy
from tests.integration.test_tunnel import run, running_host

pytestmark = pytest.mark.processes


def offer(port: int | None = None, sha256: str | None = None) -> WorkerOffer:
    return WorkerOffer(1 << 30, 1 << 30, 2, "3.0.0", "leased", "me", port, sha256,
                       peer_id="peer", name="w1")


def lease(secret: bytes | None, ip: str | None = "127.0.0.1") -> Lease:
    granted = {"ok": True} | ({"direct_secret": secret.hex()} if secret else {})
    return Lease("peer", granted=granted, remote_ip=ip)


def test_direct_is_tried_only_with_an_offer_a_secret_and_an_address() -> None:
    secret = new_secret()
    assert direct_target(offer(4433, "ab" * 32), lease(secret)) == (
        ("127.0.0.1", 4433), "ab" * 32, secret)
    assert direct_target(offer(), lease(secret)) is None  # the worker offers no direct path
    assert direct_target(offer(4433, "ab" * 32), lease(None)) is None  # an older worker
    assert direct_target(offer(4433, "ab" * 32), lease(secret, ip=None)) is None
    bad = Lease("peer", granted={"direct_secret": "zz"}, remote_ip="127.0.0.1")
    assert direct_target(offer(4433, "ab" * 32), bad) is None
    short = Lease("peer", granted={"direct_secret": "ab" * 8}, remote_ip="127.0.0.1")
    assert direct_target(offer(4433, "ab" * 32), short) is None


def _echo_server() -> tuple[socket.socket, str]:
    """A loopback echo server standing in for the worker's RPC server."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


async def _round_trip(endpoint: str) -> bytes:
    host, port = parse_loopback_endpoint(endpoint)
    sock = await trio.open_tcp_stream(host, port)
    await sock.send_all(b"ping")
    data = await sock.receive_some(16)
    await sock.aclose()
    return data


@dataclass
class Worker:
    rpc: str  # the echo server standing in for the RPC server
    port: int  # the direct path's
    sha256: str
    secret: bytes  # the one its lease gave us


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    listener, rpc = _echo_server()
    cert = load_or_create_certificate(tmp_path)
    server = DirectServer(cert, rpc, bind="127.0.0.1")
    secret = new_secret()
    server.allow(secret)
    yield Worker(rpc, server.start(), cert.sha256, secret)
    server.close()
    listener.close()


def test_the_link_is_direct_when_it_works_and_the_tunnel_otherwise(worker: Worker) -> None:
    rpc, port, secret = worker.rpc, worker.port, worker.secret

    async def body() -> None:
        async with running_host() as worker_host, running_host() as client_host:
            client_id = client_host.get_id().to_base58()
            tunnels = TunnelServer(lambda peer: rpc if peer == client_id else None)
            worker_host.set_stream_handler(TProtocol(TUNNEL_PROTOCOL),
                                           isolate("tunnel", tunnels.handle))
            await client_host.connect(PeerInfo(worker_host.get_id(), worker_host.get_addrs()))
            good = WorkerOffer(1 << 30, 1 << 30, 2, "3.0.0", "leased", client_id, port,
                               worker.sha256, peer_id=worker_host.get_id().to_base58(), name="w1")
            cases = [
                (good, lease(secret), DIRECT),
                # a certificate that is not the one in the ledger: never direct
                (replace(good, direct_sha256="00" * 32), lease(secret), TUNNEL),
                (good, lease(new_secret()), TUNNEL),  # a secret the worker never gave
                # nothing listens there (a firewall, say)
                (replace(good, direct_port=_closed_port()), lease(secret), TUNNEL),
                (replace(good, direct_port=None), lease(secret), TUNNEL),
            ]
            for chosen, held, expected in cases:
                async with trio.open_nursery() as nursery:
                    endpoint, path = await nursery.start(open_link, client_host, chosen, held)
                    assert path == expected, (chosen, path)
                    assert await _round_trip(endpoint) == b"ping"
                    nursery.cancel_scope.cancel()

    run(body)


def test_a_lost_lease_cuts_the_direct_link(worker: Worker) -> None:
    async def body() -> None:
        held = lease(worker.secret)
        async with trio.open_nursery() as nursery:
            endpoint, path = await nursery.start(open_link, None,
                                                 offer(worker.port, worker.sha256), held)
            assert path == DIRECT
            host, p = parse_loopback_endpoint(endpoint)
            sock = await trio.open_tcp_stream(host, p)
            await sock.send_all(b"ping")
            assert await sock.receive_some(16) == b"ping"
            held.lost.set()  # the worker vanished without a reset reaching us
            # An EOF or a reset: llama.cpp fails at once either way.
            with trio.fail_after(3), contextlib.suppress(trio.BrokenResourceError):
                assert await sock.receive_some(16) == b""
            nursery.cancel_scope.cancel()

    run(body)


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# --- only the engine: a local process that races it to the endpoint is refused ---------------

MARKER = b"RACER: not the engine"
RACER = """
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=30)
print("connected", flush=True)
try:
    s.sendall(sys.argv[2].encode())
    data = s.recv(64)
except OSError:
    data = b""
print("answered" if data else "closed", flush=True)
"""


def start_racer(endpoint: str) -> subprocess.Popen[str]:
    """Another local process: connects to `endpoint`, sends MARKER and waits for a reply."""
    proc = subprocess.Popen([sys.executable, "-c", RACER, endpoint, MARKER.decode()],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "connected"
    return proc


def racer_outcome(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=20)
    return out.strip()


@pytest.mark.parametrize("path", [DIRECT, TUNNEL])
def test_a_process_racing_the_engine_to_the_link_is_refused_and_the_engine_served(
        path: str, tiny_model: Path, rpc_workers: Callable[..., Any], tmp_path: Path) -> None:
    worker = rpc_workers()
    alone = greedy_on_worker(tiny_model, worker.endpoint)
    # The worker's side of the link: a relay whose command filter would flag MARKER.
    relay = FilteringProxy(worker.endpoint)
    cert = load_or_create_certificate(tmp_path)
    direct = DirectServer(cert, relay.endpoint, bind="127.0.0.1")
    secret = new_secret()
    direct.allow(secret)
    port = direct.start()
    clients: list[str] = []  # the one peer the worker's tunnel lets in
    tunnels = TunnelServer(lambda peer: relay.endpoint if peer in clients else None)
    racers: list[subprocess.Popen[str]] = []

    async def body() -> Any:
        async with running_host() as worker_host, running_host() as client_host:
            client_id = client_host.get_id().to_base58()
            clients.append(client_id)
            worker_host.set_stream_handler(TProtocol(TUNNEL_PROTOCOL),
                                           isolate("tunnel", tunnels.handle))
            await client_host.connect(PeerInfo(worker_host.get_id(), worker_host.get_addrs()))
            chosen = WorkerOffer(1 << 30, 1 << 30, 2, "3.0.0", "leased", client_id,
                                 port if path == DIRECT else None, cert.sha256,
                                 peer_id=worker_host.get_id().to_base58(), name="w1")
            gate = EngineOnly()
            async with trio.open_nursery() as nursery:
                endpoint, opened = await nursery.start(open_link, client_host, chosen,
                                                       lease(secret), gate)
                assert opened == path
                # First: connected before the engine even exists.
                racers.append(await trio.to_thread.run_sync(start_racer, endpoint))

                def engine_started(pid: int) -> None:
                    gate.expect_pid(pid)
                    racers.append(start_racer(endpoint))  # and one while the engine runs

                done = await trio.to_thread.run_sync(greedy_on_worker, tiny_model, endpoint,
                                                     engine_started)
                outcomes = [await trio.to_thread.run_sync(racer_outcome, p) for p in racers]
                nursery.cancel_scope.cancel()
                return done, outcomes

    async def bounded() -> Any:
        with trio.fail_after(90):
            return await body()

    try:
        done, outcomes = trio.run(bounded)
    finally:
        for proc in racers:
            proc.kill()
        direct.close()
        relay.close()
    assert outcomes == ["closed", "closed"]  # refused without a byte back
    assert done.tokens == alone.tokens and len(done.tokens) == 24  # the engine got through
    assert relay.violations == []  # no byte of a racer reached the worker
    server_stats = direct.stats if path == DIRECT else tunnels.stats
    assert server_stats.connections == len(relay.filters) > 0  # the engine's, all of them
    assert server_stats.refused == 0  # refused on the client machine, not by the worker
