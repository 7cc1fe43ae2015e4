"""Circuit Relay v2 inside the swarm: the hop a reachable member offers, and the client side.

Wire format is libp2p's Circuit Relay v2 (the library's protobuf HopMessage / StopMessage,
varint-delimited), but the hop and stop handlers are Covey's own, mounted behind the
gatekeeper: only admitted members may reserve a slot or open a circuit, a circuit only reaches
an admitted member that holds a reservation, and a stop stream is accepted only from a relay
this node reserved with. Each circuit has limits (bytes, time) and the relay caps the
reservations, the circuits (in all and per peer), how often each member may open one, and its
relayed bytes per second, so relaying never starves the relaying node's own user.

Why not the library's `CircuitV2Protocol` (py-libp2p 0.8.1, libp2p/relay/circuit_v2/
protocol.py): `_handle_reserve` books the slot for whatever peer the message's `peer` field
names (any member could reserve in another's name); `_active_relays` is keyed by peer id, so
a second circuit to the same peer overwrites the first's entry and `_relay_data`'s cleanup
then closes the other circuit's streams; its caps on circuits are per reservation only; and
it has no hook for admission. Its transport (`CircuitV2Transport`) dials by its own relay
discovery; Covey picks relays from the ledger instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import (
    HopMessage,
    Limit,
    Reservation,
    Status,
    StopMessage,
)
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from swarm.net.host import reset_quietly
from swarm.net.relay_limits import RelayLimits

log = logging.getLogger(__name__)

HOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/hop")
STOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/stop")
MESSAGE_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
MAX_RELAY_ADDRS = 4


class RelayRefused(ConnectionError):
    """A relay answered a reservation or a circuit with something other than OK."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the relay refused: {Status.Name(status)}")  # type: ignore[arg-type]
        self.status = status


# -- accounting (pure) ----------------------------------------------------------------------------

@dataclass
class Slots:
    """Reservations and open circuits on this relay, with their caps. Pure: callers pass `now`."""

    limits: RelayLimits
    reservations: dict[ID, float] = field(default_factory=dict)  # peer -> expiry
    circuits: dict[ID, int] = field(default_factory=dict)  # peer -> circuits it is an end of
    open_circuits: int = 0

    def reserve(self, peer: ID, now: float) -> float | None:
        """The new expiry of `peer`'s reservation, or None when the relay is full."""
        self._expire(now)
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            return None
        self.reservations[peer] = now + self.limits.reservation_s
        return self.reservations[peer]

    def has_reservation(self, peer: ID, now: float) -> bool:
        self._expire(now)
        return peer in self.reservations

    def open(self, src: ID, dst: ID) -> bool:
        """Take a circuit slot for src -> dst; False when a cap says no."""
        per_peer = self.limits.max_circuits_per_peer
        if (self.open_circuits >= self.limits.max_circuits
                or self.circuits.get(src, 0) >= per_peer or self.circuits.get(dst, 0) >= per_peer):
            return False
        self.open_circuits += 1
        for end in (src, dst):
            self.circuits[end] = self.circuits.get(end, 0) + 1
        return True

    def close(self, src: ID, dst: ID) -> None:
        self.open_circuits -= 1
        for end in (src, dst):
            left = self.circuits.get(end, 0) - 1
            if left > 0:
                self.circuits[end] = left
            else:
                self.circuits.pop(end, None)

    def _expire(self, now: float) -> None:
        for peer in [p for p, until in self.reservations.items() if until <= now]:
            del self.reservations[peer]


@dataclass
class OpenRate:
    """How often each member may open a circuit: a token bucket per member, refilled at
    `per_min` a minute up to `burst`. The caps on open circuits cannot see a member that opens,
    sends a little and closes, over and over; each such circuit still costs the relay a stop
    stream and the destination a handshake. Pure: callers pass `now`."""

    per_min: float
    burst: int
    buckets: dict[ID, tuple[float, float]] = field(default_factory=dict)  # peer -> (tokens, at)

    PRUNE_AT = 256

    def allow(self, peer: ID, now: float) -> bool:
        """Take one open for `peer`; False when its bucket is empty."""
        tokens = self._tokens(peer, now)
        if len(self.buckets) >= self.PRUNE_AT:
            self._prune(now)
        allowed = tokens >= 1
        self.buckets[peer] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def _tokens(self, peer: ID, now: float) -> float:
        tokens, at = self.buckets.get(peer, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - at) * self.per_min / 60)

    def _prune(self, now: float) -> None:
        """Forget the members whose bucket has filled up again (as good as a new one)."""
        for peer in [p for p in self.buckets if self._tokens(p, now) >= self.burst]:
            del self.buckets[peer]


class ByteBudget:
    """A circuit's bytes, both directions together."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int) -> bool:
        if n > self.left:
            self.left = 0
            return False
        self.left -= n
        return True


class Pacer:
    """Spreads bytes over time at `rate` bytes/s (shared by every circuit of a relay)."""

    BURST_S = 0.25

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._busy_until = clock()

    def delay(self, n: int) -> float:
        """Book `n` bytes; how long to wait before sending them."""
        now = self._clock()
        self._busy_until = max(self._busy_until, now - self.BURST_S) + n / self.rate
        return max(0.0, self._busy_until - now - self.BURST_S)

    async def spend(self, n: int) -> None:
        wait = self.delay(n)
        if wait > 0:
            await trio.sleep(wait)


# -- addresses ------------------------------------------------------------------------------------

def circuit_addr(relay_addr: str, relay: ID) -> str:
    """`relay_addr`/p2p/RELAY/p2p-circuit: what a member behind NAT advertises."""
    transport = relay_addr.partition("/p2p/")[0]
    return f"{transport}/p2p/{relay.to_base58()}/p2p-circuit"


def relay_of(circuit: str) -> tuple[ID, str] | None:
    """(relay, its transport address) in a circuit address; None if it is not one."""
    head, sep, _ = circuit.partition("/p2p-circuit")
    transport, sep2, relay = head.partition("/p2p/")
    if not sep or not sep2 or not relay or "/" in relay:
        return None
    try:
        multiaddr.Multiaddr(circuit)  # checks the relay's peer id is one
        return ID.from_base58(relay), transport
    except Exception:  # noqa: BLE001 - multiaddr and base58 raise assorted types on garbage
        return None


def _relayed_addr(relay: ID, peer: ID) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{peer.to_base58()}")


def relay_of_connection(conn: INetConn) -> ID | None:
    """The relay a connection runs through, or None for a direct one."""
    if conn.get_connection_type() != ConnectionType.RELAYED:
        return None
    for addr in conn.get_transport_addresses():
        found = relay_of(str(addr))
        if found is not None:
            return found[0]
    return None


def _tag(host: IHost, peer: ID, muxed: object, relay: ID) -> None:
    """Mark the swarm's connection as relayed: the library cannot tell from the upgrade."""
    for conn in host.get_network().get_connections(peer):
        if conn.muxed_conn is muxed and isinstance(conn, SwarmConn):
            conn.set_transport_info([_relayed_addr(relay, peer)], ConnectionType.RELAYED)


# -- the hop (on the relaying node) ---------------------------------------------------------------

class RelayHop:
    """Serves reservations and circuits to admitted members. Mount `handle` behind the
    gatekeeper's guard: a stream reaching it comes from an admitted peer."""

    def __init__(self, host: IHost, is_admitted: Callable[[ID], bool],
                 limits: RelayLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._is_admitted = is_admitted
        self.limits = limits = limits or RelayLimits()
        self.slots = Slots(limits)
        self.open_rate = OpenRate(limits.opens_per_min, limits.opens_burst)
        self._clock = clock
        self.pacer = Pacer(limits.rate_bytes_s)
        self.bytes_relayed = 0
        self.refused = 0

    def _limit(self) -> Limit:
        return Limit(duration=int(self.limits.circuit_s), data=self.limits.circuit_bytes)

    async def handle(self, stream: INetStream) -> None:
        src = stream.muxed_conn.peer_id
        with trio.fail_after(MESSAGE_TIMEOUT_S):
            msg = await read_delimited_msg(stream, HopMessage)
        if is_relayed(self.host, src):
            # As the spec says: no reservations or circuits over a relayed connection.
            await self._status(stream, Status.PERMISSION_DENIED)
        elif msg.type == HopMessage.RESERVE:
            await self._reserve(stream, src)
        elif msg.type == HopMessage.CONNECT:
            await self._connect(stream, src, msg)
        else:
            await self._status(stream, Status.UNEXPECTED_MESSAGE)

    async def _status(self, stream: INetStream, status: int, **extra: object) -> None:
        if status != Status.OK:
            self.refused += 1
        reply = HopMessage(type=HopMessage.STATUS, status=status, **extra)  # type: ignore[arg-type]
        with trio.fail_after(MESSAGE_TIMEOUT_S):
            await write_delimited_msg(stream, reply)

    async def _reserve(self, stream: INetStream, src: ID) -> None:
        # The slot is always the connection's peer's (the message's `peer` field is ignored).
        expiry = self.slots.reserve(src, self._clock())
        if expiry is None:
            await self._status(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        addrs = [multiaddr.Multiaddr(circuit_addr(str(a), self.host.get_id())).to_bytes()
                 for a in self.host.get_addrs()]
        await self._status(stream, Status.OK, reservation=Reservation(expire=int(expiry),
                                                                      addrs=addrs),
                           limit=self._limit())

    async def _connect(self, stream: INetStream, src: ID, msg: HopMessage) -> None:
        try:
            dst = ID(msg.peer.id)
        except Exception:  # noqa: BLE001 - garbage bytes
            await self._status(stream, Status.MALFORMED_MESSAGE)
            return
        if not self.open_rate.allow(src, self._clock()):
            await self._status(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        if not self._is_admitted(dst) or not self.slots.has_reservation(dst, self._clock()):
            await self._status(stream, Status.NO_RESERVATION)
            return
        if dst == src or not self.slots.open(src, dst):
            await self._status(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        try:
            await self._bridge(stream, src, dst)
        finally:
            self.slots.close(src, dst)

    async def _bridge(self, stream: INetStream, src: ID, dst: ID) -> None:
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S):
                stop = await self.host.new_stream(dst, [STOP_PROTOCOL])
                await write_delimited_msg(stop, StopMessage(
                    type=StopMessage.CONNECT, peer=PbPeerId(id=src.to_bytes()),
                    limit=self._limit()))
                answer = await read_delimited_msg(stop, StopMessage)
        except Exception as exc:  # noqa: BLE001 - the destination left or misbehaved
            log.debug("circuit %s -> %s: no stop stream: %r", src, dst, exc)
            await self._status(stream, Status.CONNECTION_FAILED)
            return
        try:
            if answer.type != StopMessage.STATUS or answer.status != Status.OK:
                await self._status(stream, Status.CONNECTION_FAILED)
                return
            await self._status(stream, Status.OK, limit=self._limit())
            log.info("relaying %s <-> %s", src, dst)
            budget = ByteBudget(self.limits.circuit_bytes)
            with trio.move_on_after(self.limits.circuit_s):
                async with trio.open_nursery() as nursery:
                    for a, b in ((stream, stop), (stop, stream)):
                        nursery.start_soon(self._pipe, a, b, budget, nursery.cancel_scope)
        finally:
            await reset_quietly(stop)
            await reset_quietly(stream)

    async def _pipe(self, a: INetStream, b: INetStream, budget: ByteBudget,
                    done: trio.CancelScope) -> None:
        """Copy a -> b until either end stops or the circuit's budget is spent; then the whole
        circuit ends (both directions), as a relay reset does."""
        try:
            while True:
                data = await a.read(CHUNK_BYTES)
                if not data or not budget.take(len(data)):
                    return
                await self.pacer.spend(len(data))
                await b.write(data)
                self.bytes_relayed += len(data)
        except Exception as exc:  # noqa: BLE001 - a reset end is how circuits end
            log.debug("circuit pipe ended: %r", exc)
        finally:
            done.cancel()


def is_relayed(host: IHost, peer: ID) -> bool:
    """Whether this node's connection to `peer` runs through a relay."""
    return any(relay_of_connection(c) is not None for c in host.get_network().get_connections(peer))


# -- the client side (on a member behind NAT, and on whoever dials it) ----------------------------

async def _hop_request(host: IHost, relay: ID, msg: HopMessage) -> tuple[INetStream, HopMessage]:
    stream = await host.new_stream(relay, [HOP_PROTOCOL])
    try:
        with trio.fail_after(MESSAGE_TIMEOUT_S):
            await write_delimited_msg(stream, msg)
            answer = await read_delimited_msg(stream, HopMessage)
        if answer.type != HopMessage.STATUS or answer.status != Status.OK:
            raise RelayRefused(answer.status)
    except BaseException:
        await reset_quietly(stream)
        raise
    return stream, answer


async def reserve(host: IHost, relay: ID) -> tuple[float, list[str]]:
    """Reserve a slot on `relay` (connected): the reservation's expiry (Unix seconds) and the
    circuit addresses the relay says it is reached at."""
    stream, answer = await _hop_request(host, relay, HopMessage(type=HopMessage.RESERVE))
    await reset_quietly(stream)
    addrs = []
    for raw in answer.reservation.addrs[:MAX_RELAY_ADDRS]:
        try:
            addrs.append(str(multiaddr.Multiaddr(raw)))
        except Exception:  # noqa: BLE001 - multiaddr raises assorted types on garbage
            continue
    return float(answer.reservation.expire), addrs


def _circuit_bytes(limit: Limit) -> int | None:
    """The bytes a circuit carries, from the limit the relay sent (none or 0: no cap)."""
    return limit.data or None


async def dial(host: IHost, relay: ID, target: ID,
               caps: dict[ID, int | None] | None = None) -> INetConn:
    """A connection to `target` through `relay` (connected), secured and muxed like any other;
    admission then runs on it as on a direct one. The circuit's byte cap goes into `caps`."""
    stream, answer = await _hop_request(
        host, relay, HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=target.to_bytes())))
    if caps is not None:
        caps[target] = _circuit_bytes(answer.limit)
    addr = _relayed_addr(relay, target)
    raw = RawConnection(stream, True, ConnectionType.RELAYED, [addr])
    conn = await host.upgrade_outbound_connection(raw, target)
    if isinstance(conn, SwarmConn):
        conn.set_transport_info([addr], ConnectionType.RELAYED)
    return conn


class StopSide:
    """Accepts circuits from the relays this node holds a reservation on, nobody else's.
    Mount `handle` behind the gatekeeper's guard (the relay must be an admitted member)."""

    def __init__(self, host: IHost, reserved_with: Callable[[ID], bool]) -> None:
        self.host = host
        self._reserved_with = reserved_with
        self.caps: dict[ID, int | None] = {}  # source -> the byte cap of its circuit

    async def handle(self, stream: INetStream) -> None:
        relay = stream.muxed_conn.peer_id
        with trio.fail_after(MESSAGE_TIMEOUT_S):
            msg = await read_delimited_msg(stream, StopMessage)
        ok = msg.type == StopMessage.CONNECT and self._reserved_with(relay)
        with trio.fail_after(MESSAGE_TIMEOUT_S):
            await write_delimited_msg(stream, StopMessage(
                type=StopMessage.STATUS,
                status=Status.OK if ok else Status.PERMISSION_DENIED))
        if not ok:
            return
        source = ID(msg.peer.id)
        addr = _relayed_addr(relay, source)
        raw = RawConnection(stream, False, ConnectionType.RELAYED, [addr])
        muxed = await self.host.upgrade_inbound_connection(raw, addr)
        if muxed.peer_id != source:  # Noise says who it really is; the relay only claimed
            await muxed.close()
            return
        _tag(self.host, source, muxed, relay)
        self.caps[source] = _circuit_bytes(msg.limit)
        # The stream is the connection: hold it until the connection ends.
        await muxed.event_closed.wait()  # type: ignore[attr-defined]  # Yamux has it
