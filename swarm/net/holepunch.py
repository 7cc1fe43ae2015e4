"""Hole punching: turning a relayed connection between two members into a direct one.

DCUtR style, on Covey's own protocol (`PROTOCOL_ID`, behind the gatekeeper: members only),
run over the relayed connection. The lower peer id initiates: it sends the addresses it
predicts it is reachable at, the other side answers with its own, the initiator times that
round trip, sends SYNC and waits half of it; the other side dials on SYNC. So both SYNs leave
at about the same moment, each FROM its node's listen port (the library's listener and
`dial_with_source` set SO_REUSEADDR and SO_REUSEPORT), and they cross: a TCP simultaneous
open, which a NAT's connection tracking lets through as the reply to its own outgoing SYN.

The predicted address is the WAN IP a directly connected member sees us from
(`OBSERVED_PROTOCOL`) with our listen port: a NAT that keeps the source port (endpoint-
independent mapping, as Linux MASQUERADE and most home routers do) maps the listen port to
it for every destination. A symmetric NAT picks a new port per destination, so the SYNs miss
and the connection stays relayed. Both sides of one TCP connection dialled out, so the roles
are fixed as in DCUtR: the initiator is the Noise responder. Attempts are bounded
(`MAX_ATTEMPTS` per connected peer). The relayed connection stays until the direct one is up
(its Noise handshake proves it is the same, already admitted member) and has no stream left.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import multiaddr
import trio
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

from swarm.net import relay as circuit
from swarm.net.host import read_json_frame, reset_quietly, write_json_frame

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/covey/holepunch/1.0.0")
OBSERVED_PROTOCOL = TProtocol("/covey/observed/1.0.0")
VERSION = 1
HOLE_PUNCHED = "hole-punched"
MISSED = "no SYN got through"  # in the log when an attempt fails (bench/reach.py counts them)
MAX_ATTEMPTS = 3
RETRY_S = 10.0
MESSAGE_TIMEOUT_S = 5.0
DIAL_WINDOW_S = 6.0  # a SYN lost to the other NAT is resent after 1 s, then after 3 s
DRAIN_S = 60.0  # longest the relayed connection is kept for streams still running on it
MAX_ADDRS = 8
MAX_MESSAGE_BYTES = 4096
OBSERVERS = 2
OBSERVED_FRESH_S = 60.0  # observed IPs are asked again once this old
_PROTECT_TAG = "covey-holepunch"


# -- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PunchMessage:
    """One message of the coordination: "connect" with the sender's predicted addresses, or
    "sync" (dial now)."""

    type: str
    addrs: tuple[str, ...] = ()
    version: int = VERSION

    def to_value(self) -> dict[str, Any]:
        return {"version": self.version, "type": self.type, "addrs": list(self.addrs)}

    @classmethod
    def from_value(cls, value: Any, expected: str) -> PunchMessage:
        if not isinstance(value, dict) or value.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} hole punch message")
        if value.get("type") != expected:
            raise ValueError(f"expected a {expected!r} message, got {value.get('type')!r}")
        addrs = value.get("addrs", [])
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise ValueError("addrs must be a list of strings")
        return cls(expected, tuple(addrs[:MAX_ADDRS]))


@dataclass(frozen=True)
class Observed:
    """What a member sees a connection come from: the answer of `OBSERVED_PROTOCOL`."""

    addr: str
    version: int = VERSION

    def to_value(self) -> dict[str, Any]:
        return {"version": self.version, "addr": self.addr}

    @classmethod
    def from_value(cls, value: Any) -> Observed:
        if not isinstance(value, dict) or value.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} observed address")
        addr = value.get("addr")
        if not isinstance(addr, str) or ip_port(addr) is None:
            raise ValueError("addr must be an /ip4/…/tcp/… address")
        return cls(addr)


# -- rules ----------------------------------------------------------------------------------------

def initiates(me: str, peer: str) -> bool:
    """Whether this node starts the punch: the lower peer id, so two never cross."""
    return me < peer


def ip_port(addr: str) -> tuple[str, int] | None:
    """(IPv4 address, TCP port) of `/ip4/A/tcp/P…`; None for anything else."""
    try:
        parsed = multiaddr.Multiaddr(addr)
        ip, port = parsed.value_for_protocol("ip4"), int(parsed.value_for_protocol("tcp"))
        ipaddress.IPv4Address(ip)
    except Exception:  # noqa: BLE001 - multiaddr raises assorted types on garbage
        return None
    return ip, port


def listen_source(addrs: Iterable[str]) -> tuple[str, int] | None:
    """The (ip, port) hole punching dials from: the first non-loopback TCP listen address."""
    for addr in addrs:
        found = ip_port(addr)
        if found is not None and not ipaddress.IPv4Address(found[0]).is_loopback:
            return found
    return None


def predicted_addrs(observed_ips: Iterable[str], listen_port: int) -> tuple[str, ...]:
    """Where a peer can reach our listen port if our NAT keeps source ports: each IP others
    see us from, with the listen port (not the port they saw: that one maps another socket)."""
    ips = dict.fromkeys(observed_ips)
    return tuple(f"/ip4/{ip}/tcp/{listen_port}" for ip in ips)[:MAX_ADDRS]


def dial_targets(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """The offered addresses worth a SYN: IPv4 TCP, not loopback, a few at most."""
    out = []
    for addr in addrs[:MAX_ADDRS]:
        found = ip_port(addr)
        if found is not None and not ipaddress.IPv4Address(found[0]).is_loopback:
            out.append(multiaddr.Multiaddr(f"/ip4/{found[0]}/tcp/{found[1]}"))
    return out


def sync_wait(rtt: float) -> float:
    """How long the initiator waits after SYNC: half the round trip, when SYNC arrives."""
    return min(max(rtt / 2, 0.0), MESSAGE_TIMEOUT_S)


@dataclass
class Attempts:
    """How many punches each peer has had; the next one is due `RETRY_S` after a failure,
    and none after `MAX_ATTEMPTS` until the peer has been disconnected (`forget`)."""

    clock: Callable[[], float] = time.monotonic
    retry_s: float = RETRY_S
    _tries: dict[ID, tuple[int, float]] = field(default_factory=dict)

    def due(self, peer: ID) -> bool:
        n, last = self._tries.get(peer, (0, 0.0))
        return n == 0 or (n < MAX_ATTEMPTS and self.clock() - last >= self.retry_s)

    def tried(self, peer: ID) -> None:
        n, _ = self._tries.get(peer, (0, 0.0))
        self._tries[peer] = (n + 1, self.clock())

    def forget(self, keep: Iterable[ID]) -> None:
        kept = set(keep)
        for peer in [p for p in self._tries if p not in kept]:
            del self._tries[peer]


# -- the adapter on the host ------------------------------------------------------------------

class HolePunch:
    """Runs punches for `Reach` and answers them. Mount `handle` and `handle_observed` behind
    the gatekeeper's guard."""

    def __init__(self, host: IHost, is_admitted: Callable[[ID], bool]) -> None:
        self.host = host
        self._is_admitted = is_admitted
        self.attempts = Attempts()
        # The answering side's own bound, so a member cannot make this node dial at will; half
        # the retry time, as the initiator's next try comes a little more than RETRY_S later.
        self.answered = Attempts(retry_s=RETRY_S / 2)
        self._busy: set[ID] = set()
        self._observed: tuple[float, list[str]] | None = None  # when asked, what was seen
        self._punched: weakref.WeakSet[IMuxedConn] = weakref.WeakSet()

    def is_punched(self, conn: INetConn) -> bool:
        return conn.muxed_conn in self._punched

    def candidates(self) -> list[ID]:
        """Admitted peers reached through a relay only, that this node should punch to now."""
        me = self.host.get_id().to_base58()
        conns = self.host.get_network().get_connections_map()
        self.attempts.forget(conns)
        self.answered.forget(conns)
        return [peer for peer, cs in conns.items()
                if cs and all(circuit.relay_of_connection(c) is not None for c in cs)
                and initiates(me, peer.to_base58()) and peer not in self._busy
                and self._is_admitted(peer) and self.attempts.due(peer)]

    # -- observed addresses ---------------------------------------------------------------------

    async def handle_observed(self, stream: INetStream) -> None:
        remote = stream.get_remote_address()
        if remote is None or circuit.relay_of_connection(_conn_of(self.host, stream)) is not None:
            return  # through a relay we see the relay, not the peer
        await write_json_frame(stream, Observed(f"/ip4/{remote[0]}/tcp/{remote[1]}").to_value())

    async def observed_ips(self) -> list[str]:
        """The IPs up to `OBSERVERS` directly connected members see this node from, asked again
        once `OBSERVED_FRESH_S` old (an empty answer is not kept)."""
        now = trio.current_time()
        if self._observed is not None and now - self._observed[0] < OBSERVED_FRESH_S:
            return self._observed[1]
        ips = await self._ask_observers()
        self._observed = (now, ips) if ips else None
        return ips

    async def warm(self) -> None:
        """Learn the observed IPs ahead of a punch a peer reached through a relay may start, so
        that answering it does not stretch the round trip the initiator times."""
        conns = self.host.get_network().get_connections_map()
        if any(cs and all(circuit.relay_of_connection(c) is not None for c in cs)
               for cs in conns.values()):
            await self.observed_ips()

    async def _ask_observers(self) -> list[str]:
        ips: list[str] = []
        for peer, conns in self.host.get_network().get_connections_map().items():
            if len(ips) >= OBSERVERS:
                break
            if not self._is_admitted(peer) or any(
                    circuit.relay_of_connection(c) is not None for c in conns):
                continue
            try:
                with trio.fail_after(MESSAGE_TIMEOUT_S):
                    stream = await self.host.new_stream(peer, [OBSERVED_PROTOCOL])
                    try:
                        seen = Observed.from_value(
                            await read_json_frame(stream, MAX_MESSAGE_BYTES))
                    finally:
                        await reset_quietly(stream)
            except Exception as exc:  # noqa: BLE001 - an older member, or it went away
                log.debug("%s told us no observed address: %r", peer, exc)
                continue
            found = ip_port(seen.addr)
            if found is not None:
                ips.append(found[0])
        return ips

    async def _offer(self) -> tuple[tuple[str, int], tuple[str, ...]] | None:
        source = listen_source(str(a) for a in self.host.get_addrs())
        if source is None:
            return None
        return source, predicted_addrs(await self.observed_ips(), source[1])

    # -- the punch ----------------------------------------------------------------------------

    async def punch(self, peer: ID) -> bool:
        """Initiate one punch to `peer` over the relayed connection; True once direct."""
        self._busy.add(peer)
        self.attempts.tried(peer)
        try:
            offer = await self._offer()
            if offer is None or not offer[1]:
                log.info("no address to punch from; %s stays relayed", peer)
                return False
            source, mine = offer
            stream = await self.host.new_stream(peer, [PROTOCOL_ID])
            try:
                with trio.fail_after(MESSAGE_TIMEOUT_S * 2):
                    started = trio.current_time()
                    await write_json_frame(stream, PunchMessage("connect", mine).to_value())
                    theirs = PunchMessage.from_value(
                        await read_json_frame(stream, MAX_MESSAGE_BYTES), "connect")
                    rtt = trio.current_time() - started
                    await write_json_frame(stream, PunchMessage("sync").to_value())
            finally:
                await reset_quietly(stream)
            await trio.sleep(sync_wait(rtt))
            return await self._dial(peer, theirs.addrs, source, as_responder=True)
        except Exception as exc:  # noqa: BLE001 - the peer refused, went away, or garbage
            log.info("hole punch to %s failed: %r", peer, exc)
            return False
        finally:
            self._busy.discard(peer)

    async def handle(self, stream: INetStream) -> None:
        """The other side of `punch`: answer with our addresses, dial on SYNC."""
        peer = stream.muxed_conn.peer_id
        if (peer in self._busy or initiates(self.host.get_id().to_base58(), peer.to_base58())
                or not self.answered.due(peer)):
            return  # one punch at a time, only from the side whose turn it is, and bounded
        self._busy.add(peer)
        self.answered.tried(peer)
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S * 2):
                # Ours first: the initiator's round trip clock is already running.
                offer = await self._offer()
                source, mine = offer if offer is not None else (None, ())
                theirs = PunchMessage.from_value(
                    await read_json_frame(stream, MAX_MESSAGE_BYTES), "connect")
                await write_json_frame(stream, PunchMessage("connect", mine).to_value())
                PunchMessage.from_value(await read_json_frame(stream, MAX_MESSAGE_BYTES), "sync")
            if source is not None:
                await self._dial(peer, theirs.addrs, source, as_responder=False)
        finally:
            self._busy.discard(peer)

    async def _dial(self, peer: ID, addrs: Sequence[str], source: tuple[str, int], *,
                    as_responder: bool) -> bool:
        """Dial every offered address from our listen port at once; the first connection up
        wins. The initiator upgrades as the Noise responder, the other side as the initiator."""
        network = cast(Swarm, self.host.get_network())
        dial = network.dial_addr_as_responder if as_responder else network.dial_addr
        won: list[INetConn] = []
        missed: list[str] = []
        network.protect(peer, _PROTECT_TAG)  # the library would trim one of two connections
        try:
            async with trio.open_nursery() as nursery:

                async def one(addr: multiaddr.Multiaddr) -> None:
                    try:
                        conn = await dial(addr, peer, source)
                    except Exception as exc:  # noqa: BLE001 - this address missed
                        missed.append(f"{addr}: {exc!r} ({exc.__cause__!r})")
                        return
                    won.append(conn)
                    nursery.cancel_scope.cancel()

                nursery.cancel_scope.deadline = trio.current_time() + DIAL_WINDOW_S
                for addr in dial_targets(addrs):
                    nursery.start_soon(one, addr)
            # The other side's SYN may have reached our listener before our own SYN left: then
            # the direct connection came in there, and our dial found the port pair taken.
            won = won or [c for c in self.host.get_network().get_connections(peer)
                          if circuit.relay_of_connection(c) is None]
            if not won:
                log.info("hole punch to %s: %s; staying relayed", peer,
                         f"{MISSED} ({'; '.join(missed) or 'timed out'})")
                return False
            self._punched.add(won[0].muxed_conn)
            log.info("hole-punched a direct connection to %s", peer)
            await self._retire_relayed(peer)
            return True
        finally:
            network.unprotect(peer, _PROTECT_TAG)

    async def _retire_relayed(self, peer: ID) -> None:
        """Close the peer's relayed connections once no stream runs on them (new streams pick
        the direct one), or after `DRAIN_S` at the latest."""
        relayed = [c for c in self.host.get_network().get_connections(peer)
                   if circuit.relay_of_connection(c) is not None]
        with trio.move_on_after(DRAIN_S):
            while any(c.get_streams() for c in relayed):
                await trio.sleep(0.5)
        for conn in relayed:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await conn.close()


def _conn_of(host: IHost, stream: INetStream) -> INetConn:
    peer = stream.muxed_conn.peer_id
    for conn in host.get_network().get_connections(peer):
        if conn.muxed_conn is stream.muxed_conn:
            return conn
    raise LookupError("the stream's connection is gone")
