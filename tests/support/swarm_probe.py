"""A scriptable hostile (or merely odd) Covey peer for the swarm fault tests.

Run as a subprocess inside the test's network namespace:

    python -m tests.support.swarm_probe SCENARIO --target MULTIADDR [--token T] [...]

It builds a real libp2p host exactly as a node does (`swarm.net.host.build_host`: TCP, Noise,
Yamux), dials the target node, plays one scenario and prints exactly one JSON line of what it
observed on stdout. This module owns the probe's side of every scenario and nothing else: it
never listens, never runs mDNS, and passes no verdicts; `tests/integration/test_swarm_faults.py`
decides what the observations mean. Admission, sealing and signing reuse the swarm's own pure
modules so that "valid" here means what it means to a node.

Scenarios: wrong-token, plain, silent, snoop, flood, garbage, forge, midsync, cycles, join,
rpc-attack (see each function).
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import logging
import os
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.stream_muxer.yamux import yamux
from libp2p.utils.varint import encode_uvarint, encode_varint_prefixed

from swarm.ledger.entries import NodeInfo
from swarm.ledger.rules import (
    MAX_MESSAGE_BYTES,
    SEAL_CONTEXT,
    Entry,
    Rejected,
    SignedEntry,
    open_entry,
    seal_entry,
    sign_entry,
)
from swarm.ledger.sync import MAX_DIGEST_BYTES, PUSH_PROTOCOL, SYNC_PROTOCOL, SYNC_VERSION
from swarm.net import admission
from swarm.net.host import build_host, isolate, read_exactly, read_frame, reset_quietly
from swarm.node.copy_direct import PROTOCOL as COPY_DIRECT_PROTOCOL
from swarm.node.model_copy import PROTOCOL as COPY_PROTOCOL
from swarm.routes.federated import PROTOCOL as FEDERATED_PROTOCOL
from swarm.trust.identity import Identity
from swarm.trust.keys import SwarmKeys
from swarm.trust.seal import seal
from swarm.trust.token import new_token, parse_token
from swarm.workers.direct_tls import DirectClient
from swarm.workers.lease import PROTOCOL as LEASE_PROTOCOL
from swarm.workers.lease import LeaseRefused, hold
from swarm.workers.tunnel import TUNNEL_PROTOCOL, TunnelClient
from tests.support import rpc_attacks

log = logging.getLogger("swarm_probe")

IO_TIMEOUT_S = 5.0
# How long a scenario waits for the node to drop it; the gatekeeper's own timeout is 5 s.
DISCONNECT_WAIT_S = 15.0
ENTRY_TTL_S = 600.0  # long enough that nothing the probe writes expires during a test

Observations = dict[str, Any]


def new_identity() -> Identity:
    return Identity(Ed25519PrivateKey.new().to_bytes())


def keys_for(token: str | None) -> SwarmKeys:
    """The keys of `token`, or of a fresh swarm nobody else is in."""
    return SwarmKeys.derive(parse_token(token) if token else new_token())


@asynccontextmanager
async def running_host(identity: Identity) -> AsyncIterator[IHost]:
    """A node-like host that listens nowhere: everything it does goes out by dialling."""
    host = build_host(identity)
    async with host.run(listen_addrs=[]):
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await host.close()


def connected(host: IHost, peer: ID) -> bool:
    return bool(host.get_network().get_connections(peer))


async def dial(host: IHost, target: PeerInfo) -> str | None:
    """None when connected, else why not (the node may drop a banned peer mid-handshake)."""
    try:
        with trio.fail_after(IO_TIMEOUT_S * 2):
            await host.connect(target)
    except Exception as exc:  # noqa: BLE001 - a refused dial is an observation, not an error
        return type(exc).__name__
    return None


async def wait_disconnected(host: IHost, peer: ID, timeout: float) -> float | None:
    """Seconds until the last connection to `peer` is gone; None if it outlived `timeout`."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while connected(host, peer):
            await trio.sleep(0.01)
        return round(trio.current_time() - start, 3)
    return None


async def hang_up(host: IHost, peer: ID) -> None:
    """Disconnect, returning as soon as the connection is gone: the rest of py-libp2p's
    graceful close takes ~200 ms more, which would make 1,000 cycles mostly waiting."""

    async def disconnect() -> None:
        try:
            await host.disconnect(peer)
        except Exception as exc:  # noqa: BLE001 - the node may have dropped us first
            log.debug("disconnect: %r", exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disconnect)
        await wait_disconnected(host, peer, IO_TIMEOUT_S)
        nursery.cancel_scope.cancel()


def frame(data: bytes) -> bytes:
    return encode_varint_prefixed(data)


def describe(exc: BaseException) -> str:
    """How a stream ended, in a word. py-libp2p's Yamux forgets a stream as soon as a reset
    arrives, so a remote reset often reads as EOF here: the tests count bytes instead."""
    if isinstance(exc, StreamReset):
        return "reset"
    if isinstance(exc, StreamEOF | EOFError):
        return "eof"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return type(exc).__name__


def cause_chain(exc: BaseException) -> str:
    """The exception and its causes, short: libp2p wraps the telling one several levels deep."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 5:
        parts.append(f"{type(seen).__name__}: {str(seen)[:120]}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


# -- admission -------------------------------------------------------------------------------


async def initiate_admission(host: IHost, node: ID, key: bytes) -> Observations:
    """Play the initiator with `key`. Sends our proof even when the node's does not check out
    with our key, because the node's verdict on it is what the tests are about."""
    out: Observations = {"result": None, "node_proof_ok": None}
    try:
        stream = await host.new_stream(node, [TProtocol(admission.PROTOCOL_ID)])
    except Exception as exc:  # noqa: BLE001
        out["result"] = f"no stream: {type(exc).__name__}"
        return out
    try:
        with trio.fail_after(IO_TIMEOUT_S):
            nonce_i = admission.new_nonce()
            await stream.write(admission.hello(nonce_i))
            reply = await read_exactly(stream, admission.CHALLENGE_BYTES)
            nonce_r, theirs = reply[: admission.NONCE_BYTES], reply[admission.NONCE_BYTES :]
            me, them = host.get_id().to_bytes(), node.to_bytes()
            expected = admission.proof(key, "responder", me, them, nonce_i, nonce_r)
            out["node_proof_ok"] = hmac.compare_digest(expected, theirs)
            await stream.write(admission.proof(key, "initiator", me, them, nonce_i, nonce_r))
            verdict = await read_exactly(stream, 1)
        out["result"] = "admitted" if verdict == admission.ADMITTED else f"byte {verdict!r}"
    except Exception as exc:  # noqa: BLE001
        out["result"] = describe(exc)
    finally:
        await reset_quietly(stream)
    return out


class AdmissionResponder:
    """The probe's answer to the node's own admission attempt (every node starts one towards
    each new connection). `stall` reads the hello and then says nothing, which holds the node's
    attempt open until its timeout: the only way to stay connected yet unadmitted for a while.
    """

    def __init__(self, host: IHost, key: bytes, stall: bool = False) -> None:
        self.host = host
        self.key = key
        self.stall = stall
        self.outcomes: list[str] = []
        self.admitted = trio.Event()

    async def handle(self, stream: INetStream) -> None:
        node = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(DISCONNECT_WAIT_S * 2):
                nonce_i = admission.parse_hello(
                    await read_exactly(stream, admission.HELLO_BYTES))
                if self.stall:
                    await read_exactly(stream, 1)  # returns only when the node gives up
                    self.outcomes.append("node sent more while stalled")
                    return
                nonce_r = admission.new_nonce()
                them, me = node.to_bytes(), self.host.get_id().to_bytes()
                mine = admission.proof(self.key, "responder", them, me, nonce_i, nonce_r)
                await stream.write(nonce_r + mine)
                theirs = await read_exactly(stream, admission.MAC_BYTES)
                expected = admission.proof(self.key, "initiator", them, me, nonce_i, nonce_r)
                if not hmac.compare_digest(expected, theirs):
                    self.outcomes.append("node proof wrong")
                    await reset_quietly(stream)
                    return
                await stream.write(admission.ADMITTED)
        except Exception as exc:  # noqa: BLE001
            self.outcomes.append(f"{'stalled, then ' if self.stall else ''}{describe(exc)}")
            raise
        self.outcomes.append("admitted the node")
        self.admitted.set()


# -- plain streams ---------------------------------------------------------------------------


async def try_protocol(
    host: IHost, node: ID, protocol: str, payload: bytes, wait_s: float = 3.0
) -> Observations:
    """Open `protocol`, send `payload`, half-close, count what comes back until it ends."""
    out: Observations = {"protocol": protocol, "opened": False, "bytes_received": 0,
                         "ended": None}
    try:
        stream = await host.new_stream(node, [TProtocol(protocol)])
    except Exception as exc:  # noqa: BLE001
        out["ended"] = f"refused: {type(exc).__name__}"
        out["detail"] = cause_chain(exc)
        return out
    out["opened"] = True
    try:
        with trio.fail_after(wait_s):
            if payload:
                await stream.write(payload)
            await stream.close()  # half-close: we are done sending, the node may answer
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    out["ended"] = "eof"
                    break
                out["bytes_received"] += len(chunk)
    except Exception as exc:  # noqa: BLE001
        out["ended"] = describe(exc)
    finally:
        await reset_quietly(stream)
    return out


def digest_frame(have: dict[str, int] | None = None) -> bytes:
    return frame(json.dumps({"version": SYNC_VERSION, "have": have or {}}).encode())


async def pull_entries(host: IHost, node: ID, ledger_key: bytes) -> Observations:
    """A normal pull, as a node does: send an empty digest, open every entry that comes back."""
    out: Observations = {"entries": [], "rejected": 0, "ended": None}
    try:
        stream = await host.new_stream(node, [TProtocol(SYNC_PROTOCOL)])
    except Exception as exc:  # noqa: BLE001
        out["ended"] = f"refused: {type(exc).__name__}"
        return out
    try:
        with trio.fail_after(IO_TIMEOUT_S):
            await stream.write(digest_frame())
            await stream.close()
            while True:
                message = await read_frame(stream, MAX_MESSAGE_BYTES)
                try:
                    entry = open_entry(ledger_key, message).entry
                except Rejected:
                    out["rejected"] += 1
                    continue
                out["entries"].append({"owner": entry.owner, "key": entry.key, "seq": entry.seq,
                                       "name": entry.value.get("name")})
    except Exception as exc:  # noqa: BLE001 - EOF is how a complete sync ends
        out["ended"] = describe(exc)
    finally:
        await reset_quietly(stream)
    return out


# -- ledger messages -------------------------------------------------------------------------


@dataclasses.dataclass
class Writer:
    """Makes ledger entries as the probe (or, to forge, as the probe pretending to be others)."""

    identity: Identity
    ledger_key: bytes
    base_seq: int = dataclasses.field(default_factory=lambda: int(time.time() * 1000))

    @property
    def me(self) -> str:
        return self.identity.peer_id.to_base58()

    def signed(self, key: str, value: dict[str, Any], seq_offset: int = 0,
               owner: str | None = None) -> SignedEntry:
        entry = Entry(owner or self.me, key, self.base_seq + seq_offset, time.time(),
                      ENTRY_TTL_S, value)
        return sign_entry(entry, self.identity.sign)

    def sealed(self, signed: SignedEntry, ledger_key: bytes | None = None) -> bytes:
        return frame(seal_entry(ledger_key or self.ledger_key, signed))

    def hostile_mix(self, prefix: str, victim: str) -> list[tuple[str, bytes]]:
        """One valid entry and every kind of message a node must refuse, oversized last
        (a frame over the limit ends the stream, so nothing after it would be read)."""
        valid = self.signed(f"{prefix}-valid", {"v": "valid"}, 1)
        original = self.signed(f"{prefix}-tampered", {"v": "original"}, 2)
        # Same signature over a value one byte different: the signature no longer matches.
        tampered = SignedEntry(dataclasses.replace(original.entry, value={"v": "origina1"}),
                               original.signature)
        torn = bytearray(seal_entry(self.ledger_key, self.signed(f"{prefix}-torn", {"v": 1}, 3)))
        torn[len(torn) // 2] ^= 0x01  # one flipped bit inside the sealed ciphertext
        return [
            ("valid", self.sealed(valid)),
            # The victim's own slot, with a seq far above its heartbeats, and a slot it never
            # wrote: both signed with the probe's key.
            ("forged-node", self.sealed(self.signed("node", _forged_node_value(), 10**9,
                                                    owner=victim))),
            ("forged-new", self.sealed(self.signed(f"{prefix}-forged", {"v": "forged"}, 4,
                                                   owner=victim))),
            ("tampered", self.sealed(tampered)),
            ("torn-seal", frame(bytes(torn))),
            ("replay-new", self.sealed(self.signed(f"{prefix}-replay", {"v": "new"}, 6))),
            ("replay-old", self.sealed(self.signed(f"{prefix}-replay", {"v": "old"}, 5))),
            ("foreign-swarm", self.sealed(self.signed(f"{prefix}-foreign", {"v": 1}, 7),
                                          keys_for(None).ledger_key)),
            ("oversized", frame(self.oversized(self.signed(f"{prefix}-oversized", {"v": 1}, 8)))),
        ]

    def oversized(self, signed: SignedEntry) -> bytes:
        """A sealed message over MAX_MESSAGE_BYTES that is valid in every other way: the
        signed entry is small, the bulk is an unsigned extra field beside it (which the parser
        ignores), so only the size limit stands between it and the ledger."""
        body = json.loads(signed.to_bytes())
        body["padding"] = "x" * (MAX_MESSAGE_BYTES + 1024)
        return seal(self.ledger_key, json.dumps(body).encode(), SEAL_CONTEXT)


def _forged_node_value() -> dict[str, Any]:
    """A well-formed node entry for a machine too good to ignore: what a forger would claim."""
    return NodeInfo(name="forged-by-probe", os="Linux", covey_version="0.1.0",
                    rpc_protocol="7.0.0", cores=128, ram_total=1 << 40, ram_free=1 << 40,
                    roles=()).to_value()


class SyncServer:
    """Answers the node's pull (ledger-sync) with prepared frames, then `after()`."""

    def __init__(self, frames: list[bytes], after: Callable[[], Awaitable[None]] | None = None
                 ) -> None:
        self.frames = frames
        self.after = after
        self.pulls = 0
        self.frames_sent = 0
        self.pulled = trio.Event()
        self.errors: list[str] = []

    async def handle(self, stream: INetStream) -> None:
        self.pulls += 1
        try:
            with trio.fail_after(IO_TIMEOUT_S):
                json.loads(await read_frame(stream, MAX_DIGEST_BYTES))  # the node's digest
                for data in self.frames:
                    await stream.write(data)
                    self.frames_sent += 1
        except Exception as exc:  # noqa: BLE001 - e.g. the node resetting at the oversized frame
            self.errors.append(describe(exc))
        self.pulled.set()
        if self.after is not None:
            await self.after()


async def push(host: IHost, node: ID, frames: list[bytes]) -> Observations:
    """Send `frames` on one ledger-push stream; the node never answers a push."""
    out = await try_protocol(host, node, PUSH_PROTOCOL, b"".join(frames))
    return {"ended": out["ended"], "opened": out["opened"]}


async def admitted_probe(host: IHost, node: ID, key: bytes) -> Observations:
    """Our side's admission exchange with `key`; the node's side is answered meanwhile by an
    AdmissionResponder registered before dialling, as a real node would."""
    mine = await initiate_admission(host, node, key)
    return {"admission": mine["result"], "node_proof_ok": mine["node_proof_ok"],
            "admitted": mine["result"] == "admitted"}


async def join_as_member(host: IHost, target: PeerInfo, key: bytes, sync_server: SyncServer,
                         obs: Observations) -> None:
    """How every scenario played as a swarm member begins: answer the node's admission and
    its pull (with `sync_server`), dial, pass admission, wait for the pull. Fills `obs` as it
    goes (the pull's handler may report it before this returns); `obs["dial"]` is not None
    when the node could not be reached."""
    responder = AdmissionResponder(host, key)
    host.set_stream_handler(TProtocol(admission.PROTOCOL_ID),
                            isolate("admission", responder.handle))
    host.set_stream_handler(TProtocol(SYNC_PROTOCOL), isolate("sync", sync_server.handle))
    obs["dial"] = await dial(host, target)
    if obs["dial"] is not None:
        return
    obs.update(await admitted_probe(host, target.peer_id, key))
    with trio.move_on_after(IO_TIMEOUT_S):
        await sync_server.pulled.wait()


# -- scenarios -------------------------------------------------------------------------------


async def scenario_wrong_token(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """Another swarm's token. While the node's admission attempt towards us is held open (our
    responder stalls), try the ledger protocols as a connected but unadmitted peer; then fail
    admission ourselves; time the disconnect; redial at once (with `--redial-token` if given,
    e.g. the right token) and see whether the node lets us back in."""
    wrong = keys_for(args.token).admission_key
    identity = new_identity()
    obs: Observations = {"peer_id": identity.peer_id.to_base58()}
    async with running_host(identity) as host:
        responder = AdmissionResponder(host, wrong, stall=True)
        host.set_stream_handler(TProtocol(admission.PROTOCOL_ID),
                                isolate("admission", responder.handle))
        obs["dial"] = await dial(host, target)
        if obs["dial"] is not None:
            return obs
        node = target.peer_id
        obs["sync_unadmitted"] = await try_protocol(host, node, SYNC_PROTOCOL, digest_frame())
        obs["push_unadmitted"] = await try_protocol(host, node, PUSH_PROTOCOL,
                                                    frame(b"\x00" * 64))
        mine = await initiate_admission(host, node, wrong)
        obs["admission"], obs["node_proof_ok"] = mine["result"], mine["node_proof_ok"]
        obs["admitted"] = mine["result"] == "admitted"
        obs["disconnected_after_s"] = await wait_disconnected(host, node, DISCONNECT_WAIT_S)
        obs["responder"] = responder.outcomes

        # Redial at once as the same peer, this time answering the node's admission normally.
        redial_key = keys_for(args.redial_token or args.token).admission_key
        responder.key, responder.stall = redial_key, False
        started = trio.current_time()
        obs["redial_dial"] = await dial(host, target)
        if obs["redial_dial"] is None:
            again = await initiate_admission(host, node, redial_key)
            obs["redial_admission"] = again["result"]
            obs["redial_admitted"] = (again["result"] == "admitted"
                                      or responder.admitted.is_set())
            obs["redial_sync"] = await try_protocol(host, node, SYNC_PROTOCOL, digest_frame(),
                                                    wait_s=2.0)
            gone = await wait_disconnected(host, node, DISCONNECT_WAIT_S)
            obs["redial_disconnected_after_s"] = (
                None if gone is None else round(trio.current_time() - started, 3))
        else:
            obs["redial_admitted"] = False
    return obs


async def scenario_silent(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """The right token, but never a proof: the probe holds the node's admission attempt open
    (reads the hello, answers nothing) and never starts its own. Meanwhile it asks for a sync
    and pushes a valid, correctly sealed entry (`silent-push`); then it waits to be dropped
    when the node's admission timeout runs out."""
    keys = keys_for(args.token)
    identity = new_identity()
    writer = Writer(identity, keys.ledger_key)
    obs: Observations = {"peer_id": writer.me}
    async with running_host(identity) as host:
        responder = AdmissionResponder(host, keys.admission_key, stall=True)
        host.set_stream_handler(TProtocol(admission.PROTOCOL_ID),
                                isolate("admission", responder.handle))
        started = trio.current_time()
        obs["dial"] = await dial(host, target)
        if obs["dial"] is not None:
            return obs
        node = target.peer_id
        obs["sync"] = await try_protocol(host, node, SYNC_PROTOCOL, digest_frame())
        obs["push"] = await try_protocol(
            host, node, PUSH_PROTOCOL, writer.sealed(writer.signed("silent-push", {"v": 1})))
        gone = await wait_disconnected(host, node, DISCONNECT_WAIT_S)
        obs["disconnected_after_s"] = (
            None if gone is None else round(trio.current_time() - started, 3))
        obs["responder"] = responder.outcomes
    return obs


@asynccontextmanager
async def stalled_outsider(target: PeerInfo, token: str | None
                           ) -> AsyncIterator[tuple[IHost | None, Observations]]:
    """A fresh peer dialled to `target` that holds the node's admission attempt open (with
    `token`'s key, or a foreign swarm's): connected but unadmitted for the node's whole
    admission window. The host is None when the dial failed (`obs["dial"]` says why)."""
    identity = new_identity()
    obs: Observations = {"peer_id": identity.peer_id.to_base58()}
    async with running_host(identity) as host:
        responder = AdmissionResponder(host, keys_for(token).admission_key, stall=True)
        host.set_stream_handler(TProtocol(admission.PROTOCOL_ID),
                                isolate("admission", responder.handle))
        obs["dial"] = await dial(host, target)
        yield (host if obs["dial"] is None else None), obs


async def scenario_snoop(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """An outsider (another swarm's token) that holds the node's admission attempt open and
    meanwhile asks what py-libp2p answers by itself, outside the gatekeeper: identify (which
    protocols the node speaks) and the Kademlia DHT (FIND_NODE: which peers the node knows,
    with their addresses)."""
    async with stalled_outsider(target, args.token) as (host, obs):
        if host is None:
            return obs
        node = target.peer_id
        obs["dht_peers"], obs["dht_ended"] = await find_node(host, node)
        with trio.move_on_after(2):  # identify runs in the background after connecting
            while not host.get_peerstore().get_protocols(node):
                await trio.sleep(0.05)
        obs["identify_protocols"] = sorted(str(p) for p in host.get_peerstore()
                                           .get_protocols(node))
        obs["still_connected"] = connected(host, node)
    return obs


async def scenario_flood(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """An outsider that ignores yamux flow control. Holding the node's admission attempt open,
    it opens identify (which the node answers only after admission, so it reads nothing) and
    sends DATA frames of 1 MiB, each four times a new stream's window, until `--mib` MiB are
    out, 5 s have passed or the node hangs up."""
    async with stalled_outsider(target, args.token) as (host, obs):
        if host is None:
            return obs
        node = target.peer_id
        stream = await host.new_stream(node, [IDENTIFY_PROTOCOL])
        header = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0,
                             stream.muxed_stream.stream_id, FLOOD_FRAME_BYTES)  # type: ignore[attr-defined]
        flood = header + os.urandom(FLOOD_FRAME_BYTES)
        conn: Any = stream.muxed_conn
        sent = 0
        started = trio.current_time()
        with trio.move_on_after(IO_TIMEOUT_S):
            try:
                while sent < args.mib * FLOOD_FRAME_BYTES and connected(host, node):
                    await conn._write_frame(flood)  # the library's framing, minus its window
                    sent += FLOOD_FRAME_BYTES
            except Exception as exc:  # noqa: BLE001 - the node hanging up on us
                obs["ended"] = describe(exc)
        gone = await wait_disconnected(host, node, IO_TIMEOUT_S)
        obs["sent_mib"] = sent // FLOOD_FRAME_BYTES
        obs["cut_after_s"] = (None if gone is None
                              else round(trio.current_time() - started, 3))
    return obs


FLOOD_FRAME_BYTES = 1024 * 1024


async def find_node(host: IHost, node: ID) -> tuple[list[dict[str, Any]], str | None]:
    """One Kademlia FIND_NODE for a random key: the peers (and addresses) the node returns."""
    try:
        stream = await host.new_stream(node, [KAD_PROTOCOL_ID])
    except Exception as exc:  # noqa: BLE001
        return [], f"refused: {type(exc).__name__}"
    try:
        with trio.fail_after(IO_TIMEOUT_S):
            query = KadMessage(type=KadMessage.MessageType.FIND_NODE,
                               key=new_identity().peer_id.to_bytes())
            await stream.write(frame(query.SerializeToString()))
            reply = KadMessage.FromString(await read_frame(stream, 1 << 20))
    except Exception as exc:  # noqa: BLE001
        return [], describe(exc)
    finally:
        await reset_quietly(stream)
    peers = [{"id": ID(p.id).to_base58(), "addrs": [str(multiaddr.Multiaddr(a)) for a in p.addrs]}
             for p in reply.closerPeers]
    return peers, None


async def scenario_plain(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """A libp2p peer with no Covey at all: no admission handler, straight to the ledger."""
    identity = new_identity()
    obs: Observations = {"peer_id": identity.peer_id.to_base58()}
    async with running_host(identity) as host:
        started = trio.current_time()
        obs["dial"] = await dial(host, target)
        if obs["dial"] is not None:
            return obs
        node = target.peer_id
        async with trio.open_nursery() as nursery:
            async def attempt(name: str, protocol: str, payload: bytes) -> None:
                obs[name] = await try_protocol(host, node, protocol, payload)
            nursery.start_soon(attempt, "sync", SYNC_PROTOCOL, digest_frame())
            nursery.start_soon(attempt, "push", PUSH_PROTOCOL, frame(b"\x00" * 64))
        gone = await wait_disconnected(host, node, DISCONNECT_WAIT_S)
        obs["disconnected_after_s"] = (
            None if gone is None else round(trio.current_time() - started, 3))
    obs["bytes_received_on_sync"] = obs["sync"]["bytes_received"]
    return obs


def garbage_payloads(node: ID) -> dict[str, bytes]:
    """Byte strings no Covey protocol accepts, each aimed at a different parser path."""
    return {
        "random": os.urandom(4096),
        "varint-overflow": b"\xff" * 12,  # never terminates within 64 bits
        "varint-huge": encode_uvarint(2**62) + os.urandom(64),
        "frame-over-limit": encode_uvarint(MAX_DIGEST_BYTES + 1) + os.urandom(1024),
        "truncated-frame": encode_uvarint(1000) + os.urandom(10),
        "not-json": frame(b"\x00\x01 not json {"),
        "json-list": frame(b"[1, 2, 3]"),
        "wrong-version": frame(json.dumps({"version": 99, "have": {}}).encode()),
        "have-not-dict": frame(json.dumps({"version": SYNC_VERSION, "have": [1]}).encode()),
        "have-bad-values": frame(json.dumps(
            # A slot the node does hold, so the comparison with its seq really happens.
            {"version": SYNC_VERSION, "have": {f"{node.to_base58()} node": "x"}}).encode()),
        "empty": b"",
        # Model copy requests that must never send file bytes back.
        "copy-traversal": copy_request("../node-key.json", 0, 100),
        "copy-negative": copy_request("tiny", -100, 100),
        "copy-huge": copy_request("tiny", 0, 2**40),
        # A well-formed ask for a direct copy offer (a secret, a port and a certificate).
        "copy-direct-offer": frame(json.dumps({"version": 1, "model": "tiny",
                                               "sha256": "0" * 64, "offset": 0}).encode()),
        "lease-acquire": frame(json.dumps({"version": 1, "op": "acquire"}).encode()),
        # What llama.cpp's RPC client sends first (a HELLO command), without holding a lease.
        "rpc-hello": bytes([14]) + (0).to_bytes(8, "little"),
    }


def copy_request(model: str, offset: int, length: int) -> bytes:
    return frame(json.dumps({"version": 1, "model": model, "sha256": "0" * 64,
                             "offset": offset, "length": length}).encode())


async def scenario_garbage(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """Garbage on every Covey protocol: first from outsiders (a fresh peer per attempt, since
    each failure gets a peer banned), then from one admitted peer on sync and push, which then
    pushes one valid entry (`garbage-after`) to show the node still serves it; last, garbage
    on admission from that admitted peer."""
    keys = keys_for(args.token)
    payloads = garbage_payloads(target.peer_id)
    obs: Observations = {"as_outsider": {}, "as_member": {}}
    outsider_cases = [
        (admission.PROTOCOL_ID, "random"), (admission.PROTOCOL_ID, "varint-huge"),
        (admission.PROTOCOL_ID, "empty"), (SYNC_PROTOCOL, "random"),
        (SYNC_PROTOCOL, "varint-overflow"), (PUSH_PROTOCOL, "random"),
        (PUSH_PROTOCOL, "varint-huge"), (FEDERATED_PROTOCOL, "random"),
        (FEDERATED_PROTOCOL, "not-json"), (COPY_PROTOCOL, "random"),
        (COPY_PROTOCOL, "copy-traversal"), (COPY_DIRECT_PROTOCOL, "copy-direct-offer"),
        (LEASE_PROTOCOL, "lease-acquire"),
        (TUNNEL_PROTOCOL, "rpc-hello"),
    ]

    async def outsider(protocol: str, name: str) -> None:
        async with running_host(new_identity()) as host:
            failed = await dial(host, target)
            result = ({"ended": f"dial: {failed}"} if failed else
                      await try_protocol(host, target.peer_id, protocol, payloads[name], 2.0))
            obs["as_outsider"][f"{protocol.split('/')[2]}/{name}"] = result

    async with trio.open_nursery() as nursery:
        for protocol, name in outsider_cases:
            nursery.start_soon(outsider, protocol, name)

    identity = new_identity()
    obs["peer_id"] = identity.peer_id.to_base58()
    async with running_host(identity) as host:
        # The node pulls from every peer it admits: answer that pull with garbage too.
        sync_server = SyncServer([frame(os.urandom(200)), encode_uvarint(2**40)])
        await join_as_member(host, target, keys.admission_key, sync_server, obs)
        if obs["dial"] is not None:
            return obs
        node = target.peer_id
        obs["node_pulled_garbage"] = sync_server.pulls
        for name in ("copy-traversal", "copy-negative", "copy-huge"):
            obs["as_member"][f"model-copy/{name}"] = await try_protocol(
                host, node, COPY_PROTOCOL, payloads[name], 2.0)
        obs["as_member"]["rpc-tunnel/rpc-hello"] = await try_protocol(
            host, node, TUNNEL_PROTOCOL, payloads["rpc-hello"], 2.0)
        for name, payload in payloads.items():
            obs["as_member"][f"sync/{name}"] = await try_protocol(host, node, SYNC_PROTOCOL,
                                                                 payload, 2.0)
        for protocol in (PUSH_PROTOCOL, FEDERATED_PROTOCOL, COPY_PROTOCOL, LEASE_PROTOCOL,
                         TUNNEL_PROTOCOL):
            for name in ("random", "varint-overflow", "varint-huge", "truncated-frame",
                         "not-json"):
                obs["as_member"][f"{protocol.split('/')[2]}/{name}"] = await try_protocol(
                    host, node, protocol, payloads[name], 2.0)
        writer = Writer(identity, keys.ledger_key)
        junk = [frame(os.urandom(300)) for _ in range(20)]  # more than one push may carry
        obs["as_member"]["push/many-junk"] = await push(host, node, junk)
        obs["as_member"]["push/valid-after"] = await push(
            host, node, [writer.sealed(writer.signed("garbage-after", {"v": "ok"}))])
        obs["still_connected"] = connected(host, node)
        obs["as_member"]["admission/random"] = await try_protocol(
            host, node, admission.PROTOCOL_ID, payloads["random"], 2.0)
        obs["disconnected_after_admission_garbage_s"] = await wait_disconnected(host, node, 5.0)
    return obs


async def scenario_forge(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """The right token, then hostile ledger messages both ways the node takes them in: served
    to its pull (keys `sync-*`) and pushed (keys `push-*`). Only `*-valid` and the newer
    `*-replay` are legitimate; the rest forge `--victim`'s entries, tamper, replay, come from
    another swarm or are too big."""
    keys = keys_for(args.token)
    identity = new_identity()
    writer = Writer(identity, keys.ledger_key)
    obs: Observations = {"peer_id": writer.me}
    served = writer.hostile_mix("sync", args.victim)
    pushed = writer.hostile_mix("push", args.victim)
    async with running_host(identity) as host:
        # The node's pull comes after it has marked us admitted, so our push cannot race it.
        sync_server = SyncServer([data for _, data in served])
        await join_as_member(host, target, keys.admission_key, sync_server, obs)
        if obs["dial"] is not None:
            return obs
        node = target.peer_id
        obs["node_pulled"] = sync_server.pulls
        obs["frames_served"] = sync_server.frames_sent
        obs["serve_errors"] = sync_server.errors
        obs["push"] = await push(host, node, [data for _, data in pushed])
        obs["sent"] = [name for name, _ in pushed]
        obs["sizes"] = {name: len(data) for name, data in pushed}
        obs["base_seq"] = writer.base_seq
        obs["still_connected"] = connected(host, node)
    return obs


async def scenario_midsync(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """The right token; when the node pulls, serve `--entries` valid entries (`mid-N`) and then
    stop dead: `--variant exit` leaves the process with os._exit mid-stream, `hang` keeps the
    stream open and silent until the test kills us (the JSON line comes first in both), and
    `close` closes the host cleanly at once, mid-stream, and then reports."""
    keys = keys_for(args.token)
    identity = new_identity()
    writer = Writer(identity, keys.ledger_key)
    obs: Observations = {"peer_id": writer.me, "variant": args.variant}
    frames = [writer.sealed(writer.signed(f"mid-{i}", {"i": i}, i)) for i in range(args.entries)]

    closing = trio.Event()

    async def stop_dead() -> None:
        obs["frames_sent"] = sync_server.frames_sent
        obs["node_pulled"] = sync_server.pulls
        if args.variant == "close":
            closing.set()  # the scenario returns, and leaving running_host closes the host
            return
        print(json.dumps(obs), flush=True)
        if args.variant == "exit":
            await trio.sleep(args.exit_after)
            os._exit(0)
        await trio.sleep_forever()

    sync_server = SyncServer(frames, after=stop_dead)
    async with running_host(identity) as host:
        await join_as_member(host, target, keys.admission_key, sync_server, obs)
        if obs["dial"] is not None:
            return obs
        if not sync_server.pulled.is_set():
            obs["node_pulled"] = 0  # report it; the test fails on it
            return obs
        if args.variant == "close":
            await closing.wait()
            return obs
        # From here on `stop_dead` decides how this process ends; returning would close the
        # host cleanly, which is not the fault under test.
        await trio.sleep_forever()
    raise AssertionError("unreachable")


async def scenario_cycles(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """Connect and disconnect `--count` times, `--parallel` peers at a time, each a plain peer
    with its own identity (after its first cycle the node refuses it at once: banned). Every
    cycle is a new inbound connection for the node, which is what the 250-slot fault counts."""
    per_worker = [args.count // args.parallel + (i < args.count % args.parallel)
                  for i in range(args.parallel)]
    ok = 0
    failures: dict[str, int] = {}
    slowest = 0.0
    started = trio.current_time()

    async def worker(cycles: int) -> None:
        nonlocal ok, slowest
        async with running_host(new_identity()) as host:
            for _ in range(cycles):
                t0 = trio.current_time()
                failed = await dial(host, target)
                if failed is None:
                    ok += 1
                    await hang_up(host, target.peer_id)
                else:
                    failures[failed] = failures.get(failed, 0) + 1
                slowest = max(slowest, trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        for cycles in per_worker:
            nursery.start_soon(worker, cycles)
    return {"cycles": args.count, "parallel": args.parallel, "succeeded": ok,
            "failures": failures, "seconds": round(trio.current_time() - started, 2),
            "slowest_cycle_s": round(slowest, 3)}


async def scenario_join(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """A well-behaved newcomer with the right token: admitted, then pulls the whole ledger."""
    keys = keys_for(args.token)
    identity = new_identity()
    obs: Observations = {"peer_id": identity.peer_id.to_base58()}
    async with running_host(identity) as host:
        responder = AdmissionResponder(host, keys.admission_key)
        host.set_stream_handler(TProtocol(admission.PROTOCOL_ID),
                                isolate("admission", responder.handle))
        started = trio.current_time()
        obs["dial"] = await dial(host, target)
        if obs["dial"] is not None:
            obs["admitted"] = False
            return obs
        obs.update(await admitted_probe(host, target.peer_id, keys.admission_key))
        obs["admitted_after_s"] = round(trio.current_time() - started, 3)
        if obs["admitted"]:
            obs["pull"] = await pull_entries(host, target.peer_id, keys.ledger_key)
    return obs


async def scenario_rpc_attack(args: argparse.Namespace, target: PeerInfo) -> Observations:
    """A member that leases the target's worker, then plays RPC attack --attack
    (tests/support/rpc_attacks.py) over --path (tunnel or direct), with a second connection of
    the lease waiting on the other path. Reports what the attack got back, whether the other
    connection was cut, how soon the lease was lost, and what a new acquire gets."""
    keys = keys_for(args.token)
    identity = new_identity()
    obs: Observations = {"peer_id": identity.peer_id.to_base58()}
    worker = target.peer_id.to_base58()
    async with running_host(identity) as host, trio.open_nursery() as nursery:
        await join_as_member(host, target, keys.admission_key, SyncServer([]), obs)
        if not obs.get("admitted"):
            return obs
        lease = await nursery.start(hold, host, worker)
        tunnel = TunnelClient(host, worker)
        endpoints = {"tunnel": await nursery.start(tunnel.open)}
        direct = DirectClient(("127.0.0.1", args.direct_port), args.direct_sha256,
                              bytes.fromhex(lease.granted["direct_secret"]))
        endpoints["direct"] = await trio.to_thread.run_sync(direct.start)
        other = "direct" if args.path == "tunnel" else "tunnel"
        waiting: list[Any] = []
        started = trio.current_time()
        reply = await trio.to_thread.run_sync(
            rpc_attacks.attack, endpoints[args.path], args.attack, args.share_bytes,
            lambda: waiting.append(rpc_attacks.bystander(endpoints[other])))
        obs["reply_bytes"] = len(reply)
        with waiting[0] as sock:
            obs["other_path_cut"] = await trio.to_thread.run_sync(rpc_attacks.is_cut, sock)
        with trio.move_on_after(DISCONNECT_WAIT_S):
            await lease.lost.wait()
        obs["lease_lost_s"] = (round(trio.current_time() - started, 2) if lease.lost.is_set()
                               else None)
        try:
            again = await nursery.start(hold, host, worker)
            obs["reacquire"] = "granted"
            again.release()
        except LeaseRefused as exc:
            obs["reacquire"] = exc.code
        tunnel.close()
        await trio.to_thread.run_sync(direct.close)
        nursery.cancel_scope.cancel()
    return obs


SCENARIOS: dict[str, Callable[[argparse.Namespace, PeerInfo], Awaitable[Observations]]] = {
    "wrong-token": scenario_wrong_token,
    "plain": scenario_plain,
    "silent": scenario_silent,
    "snoop": scenario_snoop,
    "flood": scenario_flood,
    "garbage": scenario_garbage,
    "forge": scenario_forge,
    "midsync": scenario_midsync,
    "cycles": scenario_cycles,
    "join": scenario_join,
    "rpc-attack": scenario_rpc_attack,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.swarm_probe",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("count", nargs="?", type=int, default=1000,
                        help="cycles: how many connect/disconnect cycles")
    parser.add_argument("--target", required=True, help="the node's /ip4/.../tcp/.../p2p/ID")
    parser.add_argument("--token", help="swarm token to use (omitted: a fresh, foreign swarm)")
    parser.add_argument("--redial-token", help="wrong-token: token for the immediate redial")
    parser.add_argument("--victim", default="", help="forge: peer id whose entries to forge")
    parser.add_argument("--entries", type=int, default=3, help="midsync: entries before stop")
    parser.add_argument("--variant", choices=("exit", "hang", "close"), default="exit")
    parser.add_argument("--exit-after", type=float, default=0.0,
                        help="midsync exit: seconds between the last entry and os._exit")
    parser.add_argument("--parallel", type=int, default=10, help="cycles: concurrent peers")
    parser.add_argument("--attack", choices=sorted(rpc_attacks.ATTACKS), default="custom-op",
                        help="rpc-attack: what to send")
    parser.add_argument("--path", choices=("tunnel", "direct"), default="tunnel",
                        help="rpc-attack: the path the attack takes (the other waits)")
    parser.add_argument("--direct-port", type=int, default=0, help="rpc-attack: worker's")
    parser.add_argument("--direct-sha256", default="", help="rpc-attack: its certificate's")
    parser.add_argument("--share-bytes", type=int, default=0, help="rpc-attack: lease limit")
    parser.add_argument("--mib", type=int, default=256, help="flood: MiB to send at most")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> Observations:
    target = info_from_p2p_addr(multiaddr.Multiaddr(args.target))
    with trio.move_on_after(args.timeout) as scope:
        return await SCENARIOS[args.scenario](args, target)
    assert scope.cancelled_caught
    return {"error": f"scenario did not finish in {args.timeout} s"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("PROBE_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    # py-libp2p logs routine churn (and every reset we provoke) as warnings and errors.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    obs = trio.run(_main, args)
    print(json.dumps(obs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
