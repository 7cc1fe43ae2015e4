"""RPC tunnels: ggml RPC bytes between a client node and a worker node, over libp2p streams.

Owns the `/covey/rpc-tunnel/1.0.0` protocol. On the client, a `TunnelClient` listens on a
loopback port for one leased worker; llama.cpp's RPC client (in the engine process) connects
there, and each accepted connection becomes one stream to the worker's node. On the worker, a
`TunnelServer` turns each stream from a peer that its `allowed` callback lets in (the lease
holder) into one connection to the worker's RPC server (its private Unix socket). Between a
socket and a stream, bytes are pumped both ways; an EOF travels as a half-close, and a reset
or a failure on either side resets the other, so llama.cpp never hangs on a tunnel whose far
end is gone.

Also owns `tune_yamux`, the frame-size change the tunnel's throughput depends on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF
from libp2p.stream_muxer.yamux import yamux

from backends.endpoints import LocalEndpoint, is_loopback, local_endpoint, split_host_port
from swarm.workers.engine_only import EngineOnly, connection_ends, trio_admits
from swarm.workers.rpc_filter import Violation
from swarm.workers.rpc_guard import GuardedConnection, LeaseGuard

log = logging.getLogger(__name__)

TUNNEL_PROTOCOL = "/covey/rpc-tunnel/1.0.0"

# py-libp2p costs far more per call than per byte (each yamux frame and Noise message passes
# through several trio locks and checkpoints), so the tunnel moves data in big pieces. One read
# from a local socket, and one from a stream (which returns whatever yamux has buffered):
TCP_READ_BYTES = 1024 * 1024
STREAM_READ_BYTES = 1024 * 1024
# py-libp2p's yamux sends at most 64 KiB per DATA frame, header included, and Noise carries at
# most 65,519 plaintext bytes per message, so every full frame went out as two Noise messages
# (the second of 17 bytes). Frames of up to 1 MiB (Noise splits them into full messages) give
# about twice the bulk throughput of stock frames; see `tune_yamux` and bench/tunnel.py.
YAMUX_FRAME_BYTES = 1024 * 1024

CONNECT_TIMEOUT_S = 10.0  # opening a stream to the worker node, or the worker's local socket

_LINGER_RESET = struct.pack("ii", 1, 0)


def tune_yamux(frame_bytes: int = YAMUX_FRAME_BYTES) -> None:
    """Let this process's yamux send DATA frames of up to `frame_bytes` (py-libp2p: 64 KiB).

    Only the sender's framing changes, so it is safe with any peer: yamux limits a frame by
    the receive window alone (py-libp2p's receiver accepts up to 16 MiB, go-yamux up to the
    window), and a frame never exceeds the sender's window. A 1 MiB frame holds the
    connection's writer for a few milliseconds; ggml RPC is request-reply, so only other
    protocols' small messages can wait behind it. Idempotent; never lowers the size. Call once
    per process, before traffic matters (the tunnel classes call it).
    """
    yamux.MAX_MESSAGE_SIZE = max(yamux.MAX_MESSAGE_SIZE, frame_bytes + yamux.HEADER_SIZE)


@dataclass
class LinkStats:
    """Counters of one end of an RPC path (this tunnel, or the direct TLS path), shown in
    /api/status. "Up" is toward the worker, "down" toward the client."""

    connections: int = 0  # connections relayed (server: admitted; client: accepted locally)
    active: int = 0  # relayed connections now open
    refused: int = 0  # server: not admitted; client: not the engine's, or could not be carried
    failed: int = 0  # connections that ended by a reset or an error rather than by closing
    bytes_up: int = 0
    bytes_down: int = 0

    def counters(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(LinkStats)}


def parse_loopback_endpoint(endpoint: str) -> tuple[str, int]:
    """("127.0.0.1", port) from "127.0.0.1:port"; ValueError unless the host is loopback."""
    host, port = split_host_port(endpoint)
    if not is_loopback(host):
        raise ValueError(f"{endpoint}: not a loopback address")
    return host, port


async def open_local(endpoint: LocalEndpoint) -> trio.SocketStream:
    """A stream to the worker's RPC server: the async twin of `connect_local`."""
    sock = trio.socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        await sock.connect(endpoint.address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # it turns TCP_NODELAY on where there is TCP


def _nodelay(sock: trio.SocketStream) -> None:
    # trio sets TCP_NODELAY on every SocketStream already; RPC latency depends on it, so say it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


class _Splice:
    """Pumps one socket and one stream into each other until both directions end.

    py-libp2p's writes are not cancel-safe: Noise encrypts (spending a nonce) before the
    bytes go out, so a cancel landing inside a write desyncs Noise or cuts a frame in half,
    and the whole connection to that peer is broken for every protocol. So every libp2p write
    here runs shielded, and stream reads go through `_read_some`, whose only cancel points are
    waits; cancelling a pump (to end a tunnel) then only ever lands where it is safe.
    """

    def __init__(
        self, sock: trio.SocketStream, stream: INetStream, stats: LinkStats, *, client: bool,
        guard: GuardedConnection | None = None,
    ) -> None:
        self.sock = sock
        self.stream = stream
        self.stats = stats
        self.client = client  # on the client the socket is llama.cpp's; up = socket -> stream
        # The worker's filter: the socket is its RPC server's, the stream the lease holder's.
        self.guard = guard
        self.broken = False
        self._scope = trio.CancelScope()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._socket_to_stream)
                    nursery.start_soon(self._stream_to_socket)
        except BaseException:  # cancelled from outside (the tunnel closes or is revoked)
            await self._abort()
            raise
        if self.broken:
            self.stats.failed += 1
            await self._abort()
        else:
            await self._finish()

    def _break(self) -> None:
        self.broken = True
        self._scope.cancel()

    def _count(self, n: int, from_socket: bool) -> None:
        if from_socket == self.client:
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    async def _socket_to_stream(self) -> None:
        while True:
            try:
                data = await self.sock.receive_some(TCP_READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._break()  # reset by the local end
                return
            try:
                with trio.CancelScope(shield=True):
                    if not data:
                        # yamux FIN: the far socket sees EOF (NetStream has it, INetStream not)
                        await self.stream.close_write()  # type: ignore[attr-defined]
                        return
                    if self.guard is not None:
                        self.guard.check_reply(data)
                    await self.stream.write(data)
            except Violation:
                self._break()  # the guard reported it
                return
            except Exception as exc:  # noqa: BLE001 - libp2p raises assorted errors
                log.debug("tunnel stream write failed: %r", exc)
                self._break()
                return
            self._count(len(data), from_socket=True)

    async def _stream_to_socket(self) -> None:
        while True:
            try:
                data = await _read_some(self.stream, STREAM_READ_BYTES)
            except Exception as exc:  # noqa: BLE001 - reset, or the connection died
                log.debug("tunnel stream read failed: %r", exc)
                self._break()
                return
            try:
                if not data:
                    if _connection_gone(self.stream):
                        self._break()  # yamux reports a dead connection as a plain EOF
                        return
                    await self.sock.send_eof()
                    return
                approved = data if self.guard is None else self.guard.feed(data)
                if approved:
                    await self.sock.send_all(approved)
            except (trio.BrokenResourceError, trio.ClosedResourceError, Violation):
                self._break()
                return
            self._count(len(data), from_socket=False)
            try:
                await _credit(self.stream, len(data))
            except Exception as exc:  # noqa: BLE001 - the connection died
                log.debug("tunnel window update failed: %r", exc)
                self._break()
                return

    async def _finish(self) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.stream.close()  # the FIN went out already: this only forgets it
            with contextlib.suppress(Exception):
                await self.sock.aclose()

    async def _abort(self) -> None:
        """Reset both: the stream with a yamux RST, the socket with a TCP RST."""
        await _reset_stream(self.stream)
        await _reset_socket(self.sock)


async def _read_some(stream: INetStream, max_bytes: int) -> bytes:
    """Up to `max_bytes` from `stream`, b"" at EOF; raises when it was reset. The caller must
    pass the count to `_credit` once it has delivered the bytes.

    `INetStream.read` would do, but py-libp2p's yamux sends its window update inside it,
    after taking the data and before returning it: that costs a frame's write on the way of
    every reply, and a cancel landing in that write would desync Noise (see `_Splice`). Here
    the wait is the only cancel point, and the window update comes after the delivery.
    """
    muxed = stream.muxed_stream  # type: ignore[attr-defined]  # NetStream's, not in INetStream
    if not isinstance(muxed, yamux.YamuxStream):
        try:
            return await stream.read(max_bytes)
        except StreamEOF:
            return b""
    try:
        return await muxed.conn.read_stream(muxed.stream_id, max_bytes)
    except MuxedStreamEOF:
        return b""


async def _credit(stream: INetStream, n: int) -> None:
    """Give the sender `n` bytes of yamux window back (shielded: it writes a frame)."""
    muxed = stream.muxed_stream  # type: ignore[attr-defined]  # NetStream's, not in INetStream
    if isinstance(muxed, yamux.YamuxStream):
        with trio.CancelScope(shield=True):
            await muxed._auto_tune_and_send_window_update(bytes_read=n)


def _connection_gone(stream: INetStream) -> bool:
    muxed: Any = stream.muxed_conn
    shutting = getattr(muxed, "event_shutting_down", None)
    return bool(getattr(muxed, "is_closed", False)) or (
        shutting is not None and shutting.is_set()
    )


async def _reset_stream(stream: INetStream) -> None:
    # No timeout: one landing inside the RST's write would break the connection (see _Splice).
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.reset()


async def _reset_socket(sock: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await sock.aclose()


class TunnelServer:
    """The worker side: serves `TUNNEL_PROTOCOL` streams.

    `allowed(peer_id)` is asked once per stream: it returns the worker's local RPC endpoint
    ("unix:PATH", or "127.0.0.1:port") for the peer holding the lease, or None to refuse, and a
    refused stream is reset without a byte. When a lease ends, `revoke(peer_id)` cuts that
    peer's open tunnels (the callback alone only stops new ones).

    With `guard`, every byte passes the RPC command filter of the peer's lease
    (swarm/workers/rpc_guard.py): `guard(peer_id)` is asked once per admitted stream, and a
    peer it has no `LeaseGuard` for is refused too. Without it (tests), bytes pass unchanged.
    """

    def __init__(self, allowed: Callable[[str], str | None],
                 guard: Callable[[str], LeaseGuard | None] | None = None) -> None:
        tune_yamux()
        self._allowed = allowed
        self._guard = guard
        self.stats = LinkStats()
        self._open: dict[str, set[trio.CancelScope]] = {}

    async def handle(self, stream: INetStream) -> None:
        """The stream handler to register (the node wraps it in its gatekeeper guard)."""
        peer = stream.muxed_conn.peer_id.to_base58()
        endpoint = self._allowed(peer)
        lease = self._guard(peer) if self._guard is not None else None
        if endpoint is None or (self._guard is not None and lease is None):
            self.stats.refused += 1
            log.info("refused an RPC tunnel from %s: it holds no lease here", peer)
            await _reset_stream(stream)
            return
        try:
            target = local_endpoint(endpoint)
            with trio.fail_after(CONNECT_TIMEOUT_S):
                sock = await open_local(target)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            self.stats.failed += 1
            log.warning("RPC tunnel from %s: cannot reach the worker at %s (%s)",
                        peer, endpoint, exc)
            await _reset_stream(stream)
            return
        self.stats.connections += 1
        self.stats.active += 1
        scopes = self._open.setdefault(peer, set())
        guard = lease.connection() if lease is not None else None
        with trio.CancelScope() as scope:
            scopes.add(scope)
            try:
                await _Splice(sock, stream, self.stats, client=False, guard=guard).run()
            finally:
                if guard is not None:
                    guard.close()
                self.stats.active -= 1
                scopes.discard(scope)
                if not scopes and self._open.get(peer) is scopes:
                    del self._open[peer]

    def revoke(self, peer_id: str) -> int:
        """Reset every open tunnel of `peer_id`; returns how many there were."""
        scopes = self._open.pop(peer_id, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)


class TunnelClient:
    """The client side of the tunnel to one worker node.

    `endpoint = await nursery.start(client.open)` listens on 127.0.0.1 and returns
    "127.0.0.1:port" for the engine's `rpc_endpoints`. Each connection accepted there that
    `gate` admits (the engine's, see swarm/workers/engine_only.py) becomes one stream to
    `peer_id`; any other is reset before a stream is opened. If the stream cannot be opened
    (or the worker refuses it), the connection is reset. `close()` or cancelling the task
    stops listening and resets every tunnelled connection.
    """

    def __init__(self, host: IHost, peer_id: str, gate: EngineOnly | None = None) -> None:
        tune_yamux()
        self.host = host
        self.peer_id = peer_id
        self.gate = gate or EngineOnly()
        self.endpoint: str | None = None
        self.stats = LinkStats()
        self._scope = trio.CancelScope()
        self._checks = trio.CapacityLimiter(2)  # a flood of local connections waits here

    async def open(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        peer = ID.from_base58(self.peer_id)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.endpoint = f"127.0.0.1:{port}"
        log.info("RPC tunnel to %s listening on %s", self.peer_id, self.endpoint)
        with self._scope:
            async with trio.open_nursery() as nursery:

                async def serve(sock: trio.SocketStream) -> None:
                    await self._serve(peer, sock)

                await nursery.start(trio.serve_listeners, serve, listeners)
                task_status.started(self.endpoint)

    def close(self) -> None:
        self._scope.cancel()

    async def _serve(self, peer: ID, sock: trio.SocketStream) -> None:
        _nodelay(sock)
        ends = connection_ends(sock.socket)
        if ends is None or not await trio_admits(self.gate, *ends, limiter=self._checks):
            self.stats.refused += 1
            self.gate.refused(f"RPC tunnel to {self.peer_id}", ends)
            await _reset_socket(sock)
            return
        self.stats.connections += 1
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await self.host.new_stream(peer, [TProtocol(TUNNEL_PROTOCOL)])
        except Exception as exc:  # noqa: BLE001 - unreachable peer, refused protocol, timeout
            self.stats.refused += 1
            log.warning("RPC tunnel to %s: cannot open a stream (%r)", self.peer_id, exc)
            await _reset_socket(sock)
            return
        self.stats.active += 1
        try:
            await _Splice(sock, stream, self.stats, client=True).run()
        except Exception:  # noqa: BLE001 - a bug here must not stop the listener
            log.exception("RPC tunnel to %s failed", self.peer_id)
        finally:
            self.stats.active -= 1
