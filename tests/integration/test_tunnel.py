"""The RPC tunnel with two real libp2p hosts on loopback: bytes through it unchanged, refusals,
EOF, half-close and resets carried both ways, and real llama.cpp RPC through it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from backends.engine import (
    Engine,
    EngineConfig,
    EngineError,
    GenerateRequest,
    Token,
    Watchdog,
)
from swarm.net.host import build_host, isolate
from swarm.trust.identity import Identity
from swarm.workers.engine_only import EngineOnly
from swarm.workers.rpc_guard import COMPUTE_HEADROOM_BYTES, LeaseGuard
from swarm.workers.tunnel import (
    TUNNEL_PROTOCOL,
    TunnelClient,
    TunnelServer,
    parse_loopback_endpoint,
)
from tests.conftest import Worker, greedy_on_worker
from tests.support.inprocess_swarm import running
from tests.support.rpc_attacks import check_each_attack_is_cut_off

pytestmark = pytest.mark.processes

TIMEOUT_S = 30


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(TIMEOUT_S):
            await test()

    trio.run(bounded)


def running_host() -> AbstractAsyncContextManager[IHost]:
    return running(build_host(Identity(Ed25519PrivateKey.new().to_bytes())))


@dataclass
class Far:
    """A TCP server standing in for the worker's RPC endpoint; records what it saw."""

    endpoint: str = ""
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    saw_eof: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class Tunnel:
    client: TunnelClient
    server: TunnelServer
    far: Far
    client_host: IHost
    worker_host: IHost

    async def connect(self) -> trio.SocketStream:
        assert self.client.endpoint is not None
        host, port = parse_loopback_endpoint(self.client.endpoint)
        return await trio.open_tcp_stream(host, port)


FarHandler = Callable[[trio.SocketStream, Far], Awaitable[None]]


async def echo(sock: trio.SocketStream, far: Far) -> None:
    """Echo until EOF, then close: a half-close from the client ends the conversation."""
    while data := await sock.receive_some(65536):
        far.received += data
        await sock.send_all(data)
    far.saw_eof.set()


async def record_until_eof(sock: trio.SocketStream, far: Far) -> None:
    try:
        while data := await sock.receive_some(65536):
            far.received += data
    except trio.BrokenResourceError:
        pass  # a reset is an end too
    far.saw_eof.set()


@asynccontextmanager
async def tunnel(
    handler: FarHandler = echo, allow: bool = True,
    guard: Callable[[str], LeaseGuard | None] | None = None,
) -> AsyncIterator[Tunnel]:
    far = Far()

    async def serve(sock: trio.SocketStream) -> None:
        far.accepted += 1
        try:
            await handler(sock, far)
        except trio.BrokenResourceError:
            far.saw_eof.set()
        finally:
            await sock.aclose()
            far.closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        far.endpoint = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with running_host() as worker_host, running_host() as client_host:
            client_id = client_host.get_id().to_base58()
            server = TunnelServer(
                lambda peer: far.endpoint if allow and peer == client_id else None, guard
            )
            worker_host.set_stream_handler(TProtocol(TUNNEL_PROTOCOL),
                                           isolate("tunnel", server.handle))
            await client_host.connect(PeerInfo(worker_host.get_id(), worker_host.get_addrs()))
            client = TunnelClient(client_host, worker_host.get_id().to_base58())
            await nursery.start(client.open)
            yield Tunnel(client, server, far, client_host, worker_host)
            client.close()
        nursery.cancel_scope.cancel()


async def read_all(sock: trio.SocketStream) -> bytes:
    """Everything until EOF; a reset counts as the end too."""
    out = bytearray()
    try:
        while data := await sock.receive_some(1 << 20):
            out += data
    except trio.BrokenResourceError:
        pass
    return bytes(out)


async def receive_exactly(sock: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await sock.receive_some(n - len(out))
        assert data, "EOF too early"
        out += data
    return bytes(out)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def test_bytes_round_trip_unchanged_small_and_multi_megabyte() -> None:
    async def main() -> None:
        async with tunnel() as t:
            assert t.client.endpoint is not None
            assert parse_loopback_endpoint(t.client.endpoint)[0] == "127.0.0.1"
            sock = await t.connect()
            await sock.send_all(b"ping")
            assert await sock.receive_some(100) == b"ping"

            # Request-reply, as ggml RPC talks: py-libp2p's yamux can deadlock when both
            # directions of a connection are saturated at once (its reader loop answers pings
            # under the writer's lock), which RPC never does.
            payload = os.urandom(24 * 1024 * 1024 + 12345)
            got = bytearray(b"ping")
            sizes = [3 * 1024 * 1024, 7, (1 << 20) - 7, 100_000, 1]
            offset = 0
            while offset < len(payload):
                piece = payload[offset:offset + sizes[offset % len(sizes)]]
                offset += len(piece)
                await sock.send_all(piece)
                got += await receive_exactly(sock, len(piece))
            await sock.send_eof()
            got += await read_all(sock)
            await sock.aclose()
            assert bytes(got) == b"ping" + payload  # echoed byte for byte, then EOF
            assert bytes(t.far.received) == b"ping" + payload
            await wait_for(lambda: t.client.stats.active == 0 and t.server.stats.active == 0)
            for stats in (t.client.stats, t.server.stats):
                assert stats.bytes_up == stats.bytes_down == len(payload) + 4
                assert stats.connections == 1 and stats.failed == 0

    run(main)


def test_many_connections_one_after_another_and_at_once() -> None:
    async def main() -> None:
        async with tunnel() as t:

            async def one(i: int) -> None:
                sock = await t.connect()
                message = f"hello {i}".encode() * 1000
                await sock.send_all(message)
                await sock.send_eof()
                assert await read_all(sock) == message
                await sock.aclose()

            for i in range(5):
                await one(i)
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert t.far.accepted == 13

    run(main)


def test_refused_peer_gets_no_bytes_and_is_closed() -> None:
    async def main() -> None:
        async with tunnel(allow=False) as t:
            sock = await t.connect()
            with suppress(trio.BrokenResourceError):
                await sock.send_all(b"\x00" * 100)
            with trio.fail_after(5):
                assert await read_all(sock) == b""  # EOF or reset, never an answer
            await sock.aclose()
            assert t.far.accepted == 0 and bytes(t.far.received) == b""
            await wait_for(lambda: t.server.stats.refused == 1)
            assert t.server.stats.bytes_up == t.server.stats.bytes_down == 0

    run(main)


def test_far_server_closing_gives_the_client_eof() -> None:
    async def say_bye(sock: trio.SocketStream, far: Far) -> None:
        await sock.send_all(b"bye")

    async def main() -> None:
        async with tunnel(say_bye) as t:
            sock = await t.connect()
            with trio.fail_after(5):
                assert await read_all(sock) == b"bye"
            await sock.aclose()

    run(main)


def test_client_closing_closes_the_worker_side_connection() -> None:
    async def main() -> None:
        async with tunnel(record_until_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"x" * 1000)
            await wait_for(lambda: len(t.far.received) == 1000)
            await sock.aclose()
            with trio.fail_after(5):
                await t.far.saw_eof.wait()
                await t.far.closed.wait()
            await wait_for(lambda: t.server.stats.active == 0 and t.client.stats.active == 0)

    run(main)


def test_half_close_carries_both_ways() -> None:
    async def answer_after_eof(sock: trio.SocketStream, far: Far) -> None:
        while data := await sock.receive_some(65536):
            far.received += data
        far.saw_eof.set()  # the client's half-close arrived; this side may still talk
        await sock.send_all(b"got %d" % len(far.received))

    async def main() -> None:
        async with tunnel(answer_after_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"y" * 5000)
            await sock.send_eof()
            with trio.fail_after(5):
                assert await read_all(sock) == b"got 5000"
            await sock.aclose()

    run(main)


def test_client_reset_resets_the_worker_side() -> None:
    async def main() -> None:
        async with tunnel(record_until_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"z" * 10)
            await wait_for(lambda: len(t.far.received) == 10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            await sock.aclose()  # an RST, as when a process dies with unread data
            with trio.fail_after(5):
                await t.far.closed.wait()

    run(main)


def test_closing_the_tunnel_or_revoking_the_lease_cuts_open_connections() -> None:
    async def main() -> None:
        async with tunnel(record_until_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"a")
            await wait_for(lambda: t.server.stats.active == 1)
            assert t.server.revoke(t.client_host.get_id().to_base58()) == 1
            with trio.fail_after(5):
                assert await read_all(sock) == b""
                await t.far.closed.wait()
            await sock.aclose()

        async with tunnel(record_until_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"a")
            await wait_for(lambda: t.server.stats.active == 1)
            endpoint = t.client.endpoint
            t.client.close()
            with trio.fail_after(5):
                assert await read_all(sock) == b""
                await t.far.closed.wait()
            await sock.aclose()
            assert endpoint is not None
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*parse_loopback_endpoint(endpoint))

    run(main)


def test_cutting_tunnels_mid_transfer_leaves_the_libp2p_connection_working() -> None:
    """py-libp2p breaks a whole connection when a write is cancelled halfway; the tunnel's
    teardown must never do that."""

    async def sink_or_echo(sock: trio.SocketStream, far: Far) -> None:
        first = await sock.receive_some(65536)
        if first.startswith(b"still there?"):
            await echo_rest(sock, far, first)
            return
        far.received += first
        await record_until_eof(sock, far)

    async def echo_rest(sock: trio.SocketStream, far: Far, first: bytes) -> None:
        await sock.send_all(first)
        await echo(sock, far)

    async def main() -> None:
        async with tunnel(sink_or_echo) as t:
            worker = t.worker_host.get_id()
            conn = t.client_host.get_network().get_connections(worker)[0]
            for round_no in range(8):
                sock = await t.connect()
                blob = os.urandom(1 << 20)

                async def flood(sock: trio.SocketStream = sock, blob: bytes = blob) -> None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while True:
                            await sock.send_all(blob)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood)
                    start = len(t.far.received)
                    await wait_for(lambda start=start: len(t.far.received) > start + (4 << 20))
                    if round_no % 2:
                        t.server.revoke(t.client_host.get_id().to_base58())
                    else:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00" * 2)
                        await sock.aclose()
                    await wait_for(lambda: t.client.stats.active == 0
                                   and t.server.stats.active == 0)
                    nursery.cancel_scope.cancel()
                await sock.aclose()
                check = await t.connect()
                await check.send_all(b"still there?")
                await check.send_eof()
                assert await read_all(check) == b"still there?"
                await check.aclose()
                assert t.client_host.get_network().get_connections(worker) == [conn]

    run(main)


def test_lost_libp2p_connection_closes_both_ends() -> None:
    async def main() -> None:
        async with tunnel(record_until_eof) as t:
            sock = await t.connect()
            await sock.send_all(b"a")
            await wait_for(lambda: t.server.stats.active == 1)
            await t.worker_host.disconnect(t.client_host.get_id())
            with trio.fail_after(5):
                assert await read_all(sock) == b""
                await t.far.closed.wait()
            await sock.aclose()

    run(main)


def test_unreachable_worker_endpoint_resets_the_client() -> None:
    async def main() -> None:
        async with tunnel() as t:
            with socket.socket() as s:  # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                t.far.endpoint = f"127.0.0.1:{s.getsockname()[1]}"
            sock = await t.connect()
            with trio.fail_after(5):
                assert await read_all(sock) == b""
            await sock.aclose()
            await wait_for(lambda: t.server.stats.failed == 1)

    run(main)


def test_endpoints_must_be_loopback() -> None:
    assert parse_loopback_endpoint("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_loopback_endpoint("[::1]:5000") == ("::1", 5000)
    for bad in ("10.0.0.1:5000", "0.0.0.0:5000", "127.0.0.1:0", "127.0.0.1", "example.org:80"):
        with pytest.raises(ValueError):
            parse_loopback_endpoint(bad)


def test_llama_cpp_rpc_through_the_tunnel_matches_loopback(
    tiny_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    worker = rpc_workers()

    direct = greedy_on_worker(tiny_model, worker.endpoint)

    async def main() -> None:
        async def relay(sock: trio.SocketStream, far: Far) -> None:
            raise AssertionError("the tunnel must reach the real worker, not this")

        async with tunnel(relay) as t:
            t.far.endpoint = worker.endpoint
            assert t.client.endpoint is not None
            tunnelled = await trio.to_thread.run_sync(
                greedy_on_worker, tiny_model, t.client.endpoint, t.client.gate.expect_pid)
            assert tunnelled.tokens == direct.tokens
            assert len(tunnelled.tokens) == 24
            stats = t.client.stats
            assert stats.connections >= 1 and stats.bytes_up > 0 and stats.bytes_down > 0

    run(main)


def test_the_worker_side_filters_rpc_and_cuts_off_a_holder_that_breaks_the_rules(
    tiny_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    """With the worker's filter on the tunnel: llama.cpp's own RPC passes unchanged (its
    buffers back in the share once it is done); a custom op, an out-of-bounds write or an
    allocation beyond the share is stopped before the worker sees it, and reported."""
    worker = rpc_workers()
    share = 64 << 20
    direct = greedy_on_worker(tiny_model, worker.endpoint)
    leases: list[LeaseGuard] = []

    async def main() -> None:
        async def relay(sock: trio.SocketStream, far: Far) -> None:
            raise AssertionError("the tunnel must reach the real worker, not this")

        async with tunnel(relay, guard=lambda peer: leases[-1]) as t:
            t.far.endpoint = worker.endpoint
            assert t.client.endpoint is not None
            client_id = t.client_host.get_id().to_base58()

            def new_lease() -> tuple[str, list[tuple[str, str]]]:
                assert t.client.endpoint is not None
                reported: list[tuple[str, str]] = []

                def cut_off(peer: str, reason: str) -> None:
                    reported.append((peer, reason))
                    t.server.revoke(peer)  # what the worker does on a violation

                leases.append(LeaseGuard(client_id, share, cut_off))
                return t.client.endpoint, reported

            _, reported = new_lease()
            filtered = await trio.to_thread.run_sync(greedy_on_worker, tiny_model,
                                                     t.client.endpoint, t.client.gate.expect_pid)
            assert filtered.tokens == direct.tokens and reported == []
            await wait_for(lambda: t.server.stats.active == 0)
            assert leases[-1].share.used_bytes == 0
            await trio.to_thread.run_sync(
                check_each_attack_is_cut_off, new_lease, lambda: worker.proc.poll() is None,
                share + COMPUTE_HEADROOM_BYTES)

    run(main)


def test_worker_dying_mid_generation_fails_the_engine_promptly(
    tiny_model: Path, rpc_workers: Callable[..., Worker]
) -> None:
    """llama.cpp must see the far end go (EOF or reset) through the tunnel, not hang until a
    watchdog fires."""
    worker = rpc_workers()
    request = GenerateRequest(id="k", prompt="Once upon a time", max_tokens=200, temperature=0)

    def generate_until_killed(endpoint: str, gate: EngineOnly) -> tuple[str, float]:
        config = EngineConfig(model_path=str(tiny_model), n_ctx=256, rpc_endpoints=(endpoint,))
        with Engine(config, watchdog=Watchdog(token_s=60.0)) as engine:
            gate.expect_pid(engine.pid)
            engine.wait_loaded()
            try:
                for event in engine.generate(request):
                    if isinstance(event, Token) and worker.proc.poll() is None:
                        killed_at = time.monotonic()
                        worker.kill()
            except EngineError as exc:
                return type(exc).__name__, time.monotonic() - killed_at
        return "finished", 0.0

    async def main() -> None:
        async with tunnel() as t:
            t.far.endpoint = worker.endpoint
            assert t.client.endpoint is not None
            outcome, after_s = await trio.to_thread.run_sync(generate_until_killed,
                                                             t.client.endpoint, t.client.gate)
            assert outcome != "finished"
            assert after_s < 10, f"the engine took {after_s:.1f} s to notice ({outcome})"
            await wait_for(lambda: t.client.stats.active == 0 and t.server.stats.active == 0)

    run(main)
