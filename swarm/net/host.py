"""The libp2p host, built the one safe way, with py-libp2p 0.8.1's faults worked around.

TCP only, Noise as the only security (the library also offers plaintext, TLS and secio when
not told otherwise), Yamux as the only muxer, no QUIC. Also owns the framing Covey protocols
use on streams (length-prefixed frames, most of them JSON objects with a version field) and
the wrapper that keeps a failing stream handler from stopping the host.

Faults handled here (see README, "Facts learned here"):
- Inbound connection slots (250 = max_connections - min_connections) were released only when
  the whole swarm stopped, so a host refused every connection after its 250th. We wait for the
  connection itself to close instead.
- Every dial waited a fixed 250 ms "happy eyeballs" delay after succeeding; one connection per
  peer ends the wait at once.
- An exception escaping a stream handler stops the host: `isolate` catches and resets.
- Idle connections from outsiders could take every inbound slot: each one now asks the
  swarm's `UnadmittedLimits` (swarm/net/unadmitted.py) first, and the handshake has
  `HANDSHAKE_TIMEOUT_S` instead of 10 s.
- A peer that ignores yamux flow control grows our memory without bound: `WindowedYamux`
  (`swarm.net.yamux_limits`) cuts it off.
- Multistream-select's `ls` lists every protocol to anyone: `UnlistedMultiselect` answers it
  like an unknown protocol (nothing of ours uses it; see `swarm.net.members_only` for the rest
  of what an unadmitted peer is not told).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMultiselectCommunicator, IMuxedConn, INetStream
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import StreamHandlerFn, TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.io.abc import ReadWriteCloser
from libp2p.metrics.swarm import SwarmEvent
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.protocol_muxer.multiselect import DEFAULT_NEGOTIATE_TIMEOUT, Multiselect
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from swarm.net import yamux_limits
from swarm.net.unadmitted import HANDSHAKE_TIMEOUT_S, UnadmittedLimits, limits_of
from swarm.trust.identity import Identity

log = logging.getLogger(__name__)

StreamHandler = Callable[[INetStream], Awaitable[None]]


def build_host(
    identity: Identity, addrs_factory: Callable[[list], list] | None = None
) -> IHost:
    fix_inbound_slot_leak()
    key_pair = identity.key_pair
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): yamux_limits.WindowedYamux},
        transports=[TCP()],
        enable_quic=False,
        connection_config=ConnectionConfig(max_connections_per_peer=1,
                                           inbound_upgrade_timeout=HANDSHAKE_TIMEOUT_S),
        addrs_factory=addrs_factory,
        disable_identify_address_discovery=True,
    )
    UnadmittedLimits().attach(host.get_network())
    yamux_limits.install(host)  # the library would build plain Yamux whatever the option says
    basic = cast(BasicHost, host)
    basic.multiselect = UnlistedMultiselect(basic.multiselect.handlers)
    return host


class UnlistedMultiselect(Multiselect):
    """Multistream-select that does not list our protocols to whoever sends `ls`."""

    async def negotiate(
        self, communicator: IMultiselectCommunicator,
        negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> tuple[TProtocol | None, StreamHandlerFn | None]:
        return await super().negotiate(_NoListing(communicator), negotiate_timeout)


class _NoListing(IMultiselectCommunicator):
    def __init__(self, inner: IMultiselectCommunicator) -> None:
        self._inner = inner

    async def read(self) -> str:
        command = await self._inner.read()
        # An empty command matches no protocol, so `ls` is answered "na" like a wrong guess.
        return "" if command == "ls" else command

    async def write(self, msg_str: str) -> None:
        await self._inner.write(msg_str)


def parse_multiaddrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(a) for a in addrs]


async def write_frame(stream: INetStream, data: bytes) -> None:
    await stream.write(encode_varint_prefixed(data))


async def read_frame(stream: INetStream, max_bytes: int) -> bytes:
    """One length-prefixed frame; raises on EOF, garbage or a frame over `max_bytes`."""
    return await read_varint_prefixed_bytes_limited(stream, max_bytes)


async def write_json_frame(stream: INetStream, message: Mapping[str, Any]) -> None:
    await write_frame(stream, json.dumps(message).encode())


async def read_json_frame(stream: INetStream, max_bytes: int) -> Any:
    """One frame as JSON; raises like `read_frame`, and ValueError when it is not JSON."""
    return json.loads(await read_frame(stream, max_bytes))


def parse_versioned(data: bytes, version: int, what: str) -> dict[str, Any]:
    """The JSON object in `data` if it says it is `version`; ValueError naming `what` if not."""
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("version") != version:
        raise ValueError(f"not a version {version} {what}")
    return body


async def read_exactly(stream: INetStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError("stream closed early")
        buf += chunk
    return buf


def isolate(name: str, handler: StreamHandler) -> StreamHandler:
    """Run `handler` so that nothing it raises reaches the host; the stream always ends."""

    async def isolated(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # noqa: BLE001 - any escape would stop the whole host
            log.debug("%s stream from %s failed: %r", name, stream.muxed_conn.peer_id, exc)
            await reset_quietly(stream)
        else:
            # A handler that returns without closing leaves the remote's read hanging.
            with trio.CancelScope(shield=True), _quiet():
                await stream.close()

    return isolated


async def reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), _quiet():
        await stream.reset()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, Exception)


_original_inbound = Swarm._do_handle_inbound_connection


async def _inbound_released_on_close(
    self: Swarm, read_write_closer: ReadWriteCloser | IMuxedConn, maddr: multiaddr.Multiaddr,
    failure_event: SwarmEvent,
) -> None:
    """Swarm._do_handle_inbound_connection, but holding its slot only while the connection
    lives (the original waits for the whole swarm to finish), and closing at once one that
    the swarm's caps on unadmitted connections refuse."""
    if isinstance(read_write_closer, IMuxedConn):  # QUIC and the like: not used by Covey
        await _original_inbound(self, read_write_closer, maddr, failure_event)  # type: ignore[arg-type]
        return
    remote = self._build_remote_multiaddr(read_write_closer)
    if remote is not None and not await self.connection_gate.is_allowed(remote):
        await _close_quietly(read_write_closer)
        return
    limits = limits_of(self)
    ticket = limits.enter(read_write_closer.get_remote_address()) if limits is not None else None
    if limits is not None and ticket is None:
        await _close_quietly(read_write_closer)  # before any handshake work: cheap
        return
    try:
        raw = RawConnection(read_write_closer, False)
        try:
            muxed = await self.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as exc:  # noqa: BLE001 - a failed handshake must not reach the swarm
            log.debug("inbound connection from %s failed its handshake: %r", remote, exc)
            await _close_quietly(raw)
            return
        # The TCP server closes the socket when this returns, so stay until the connection
        # ends (or the swarm stops).
        async with trio.open_nursery() as nursery:

            async def swarm_stopped() -> None:
                await self.manager.wait_finished()
                nursery.cancel_scope.cancel()

            nursery.start_soon(swarm_stopped)
            if limits is not None and ticket is not None:
                peer = muxed.peer_id
                nursery.start_soon(limits.hold, ticket, peer, lambda: self.close_peer(peer))
            await muxed.event_closed.wait()  # type: ignore[attr-defined]  # Yamux has it
            nursery.cancel_scope.cancel()
    finally:
        if limits is not None and ticket is not None:
            limits.leave(ticket)


async def _close_quietly(closer: ReadWriteCloser) -> None:
    with _quiet():
        await closer.close()


def fix_inbound_slot_leak() -> None:
    Swarm._do_handle_inbound_connection = _inbound_released_on_close  # type: ignore[method-assign]
