"""Model copy over the direct TLS path: the offer over libp2p, the bytes over TLS.

A copier asks a peer over `/covey/model-copy-direct/1.0.0` (members only, like every Covey
protocol) for the rest of one model file from an offset. A peer that shares that very file and
reaches the copier over a direct link answers with a one-use secret, the port of its
`CopySender` and its certificate's sha256. The copier dials the address its own libp2p
connection reaches the peer at, pins the certificate, shows the secret (direct_tls.py's
admission, not a second TLS stack) and reads the bytes. A secret admits one connection, only
within `GRANT_TTL_S`. Over a relayed link no offer is asked for or made: the address would be
the relay's. Whatever goes wrong, the copier goes on over the libp2p stream (model_copy.py).

Wire (libp2p): request {"version", "model", "sha256", "offset"}; reply {"ok": true, "port",
"cert_sha256", "secret" (hex), "length"} or {"ok": false, "code", "message"}. TLS: after the
admission answer, exactly `length` bytes of the file from `offset`, then close_notify.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from backends.store.model_store import ModelStore
from swarm.net.host import parse_versioned, read_frame, read_json_frame, write_json_frame
from swarm.net.relay import is_relayed
from swarm.node.write_behind import Stage, WriteBehind
from swarm.workers.direct_tls import (
    ACCEPTED,
    PLAIN_BYTES,
    READ_BYTES,
    SECRET_BYTES,
    Certificate,
    Connection,
    SecretServer,
    TlsConnection,
    connect,
    load_or_create_certificate,
    new_secret,
)

log = logging.getLogger(__name__)

PROTOCOL = "/covey/model-copy-direct/1.0.0"
WIRE_VERSION = 1
MAX_FRAME_BYTES = 4096
GRANT_TTL_S = 30.0  # an offer not taken up by then is void
MAX_GRANTS = 64  # offers outstanding at once; the oldest go first
ASK_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 20.0  # no byte for this long: the peer is treated as gone
DIRECT, LIBP2P = "direct", "libp2p"  # CopyJob.path


class DirectRefused(Exception):
    """The peer made no direct offer; the message says why."""


@dataclass(frozen=True)
class Grant:
    """What one secret lets its holder read: `length` bytes of `path` from `offset`."""

    path: Path
    offset: int
    length: int
    expires: float  # time.monotonic()


@dataclass(frozen=True)
class DirectOffer:
    address: tuple[str, int]
    cert_sha256: str
    secret: bytes
    length: int
    version: int = WIRE_VERSION


# -- pure ---------------------------------------------------------------------------------------

def parse_request(data: bytes) -> tuple[str, str, int]:
    body = parse_versioned(data, WIRE_VERSION, "direct copy request")
    model, sha256, offset = (body.get(k) for k in ("model", "sha256", "offset"))
    if not (isinstance(model, str) and isinstance(sha256, str) and type(offset) is int
            and offset >= 0):
        raise ValueError("bad direct copy request")
    return model, sha256, offset


def parse_offer(reply: Any, ip: str, want_length: int) -> DirectOffer:
    """The offer in `reply` for the peer at `ip`, or DirectRefused saying what was wrong."""
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        message = reply.get("message") if isinstance(reply, dict) else None
        raise DirectRefused(str(message or "refused"))
    port, sha256, secret, length = (reply.get(k) for k in
                                    ("port", "cert_sha256", "secret", "length"))
    try:
        key = bytes.fromhex(secret) if isinstance(secret, str) else b""
    except ValueError:
        key = b""
    if not (type(port) is int and 0 < port < 65536 and isinstance(sha256, str)
            and len(sha256) == 64 and len(key) == SECRET_BYTES and length == want_length):
        shown = {k: v for k, v in reply.items() if k != "secret"}  # never log a live secret
        raise DirectRefused(f"a malformed offer {shown!r}")
    return DirectOffer((ip, port), sha256, key, length)


def prune(grants: dict[bytes, Grant], now: float, keep: int = MAX_GRANTS) -> list[bytes]:
    """The secrets to revoke: the expired ones, then the oldest past `keep`."""
    expired = [s for s, g in grants.items() if g.expires <= now]
    live = sorted((g.expires, s) for s, g in grants.items() if g.expires > now)
    return expired + [s for _, s in live[:max(0, len(live) - keep)]]


# -- the serving side ---------------------------------------------------------------------------

class CopySender(SecretServer[Grant]):
    """Sends what each one-use secret grants, paced to `limit_bytes_s` if set."""

    def __init__(self, cert: Certificate, bind: str, limit_bytes_s: float | None) -> None:
        super().__init__(cert, bind, one_use=True)
        self.limit_bytes_s = limit_bytes_s
        self.grants: dict[bytes, Grant] = {}  # the trio side's record, for pruning

    def _serves(self) -> str:
        return "model copies"

    def offer(self, grant: Grant) -> bytes:
        """A fresh secret for `grant`; expired and surplus offers are withdrawn (a copy one of
        them already let in goes on: the offer's time limit is for taking it up)."""
        for old in prune(self.grants, time.monotonic()):
            self.grants.pop(old, None)
            self.withdraw(old)
        secret = new_secret()
        self.grants[secret] = grant
        self._allow(secret, grant)
        return secret

    def _serve_admitted(self, conn: Connection, tls: TlsConnection, value: Grant) -> None:
        if value.expires <= time.monotonic():
            self._refuse(conn, "its offer expired", logging.INFO)
            return
        try:
            f = value.path.open("rb")
        except OSError as exc:
            self._refuse(conn, f"the model cannot be read ({exc})", logging.WARNING)
            return
        with f:
            try:
                tls.send(ACCEPTED)
                tls.admitted()
                self.stats.add("connections")
                self._send_file(conn, tls, f, value)
            except OSError as exc:  # ssl.SSLError included: the copier left or was cut
                self._broken(conn, exc)

    def _send_file(self, conn: Connection, tls: TlsConnection, f: Any, grant: Grant) -> None:
        f.seek(grant.offset)
        buf = memoryview(bytearray(READ_BYTES))
        started, sent = time.monotonic(), 0
        self.stats.add("active")
        try:
            while sent < grant.length:
                n = f.readinto(buf[:min(READ_BYTES, grant.length - sent)])
                if not n:
                    raise OSError(f"{grant.path.name} shrank while being copied")
                tls.send(buf[:n])
                sent += n
                self.stats.add("bytes_down", n)  # toward the copier
                if self.limit_bytes_s:
                    time.sleep(max(0.0, started + sent / self.limit_bytes_s - time.monotonic()))
            tls.close_write()
            # Wait for the copier's close_notify, so the last bytes are not lost to a reset.
            tls.sock.settimeout(STALL_TIMEOUT_S)
            while tls.recv():
                pass
        finally:
            self.stats.add("active", -1)


class DirectCopyService:
    """Answers direct copy requests for the models `store` shares. The sender (and its port)
    starts on the first request, with the certificate in `data_dir`."""

    def __init__(self, store: ModelStore, data_dir: Path, bind: str | None,
                 limit_bytes_s: float | None, host: IHost) -> None:
        self.store = store
        self.data_dir = data_dir
        self.bind = bind  # None: no direct path (turned off, or nowhere to listen)
        self.limit_bytes_s = limit_bytes_s
        self.host = host
        self.sender: CopySender | None = None
        self._cert_sha256 = ""
        self._starting = trio.Lock()

    async def handle(self, stream: INetStream) -> None:
        with trio.fail_after(ASK_TIMEOUT_S):
            model, sha256, offset = parse_request(await read_frame(stream, MAX_FRAME_BYTES))
        manifest = next((m for m in self.store.shareable() if m.name == model), None)
        if manifest is None or manifest.sha256 != sha256:
            await _refuse(stream, "model_not_found", f"this node does not share {model!r} "
                          f"({sha256})")
            return
        if offset >= manifest.size:
            await _refuse(stream, "bad_range", f"the file has {manifest.size} bytes")
            return
        if is_relayed(self.host, stream.muxed_conn.peer_id):
            await _refuse(stream, "relayed", "the link is relayed: no direct path")
            return
        sender = await self._sender()
        if sender is None:
            await _refuse(stream, "no_direct_path", "this node offers no direct path")
            return
        grant = Grant(self.store.model_path(model), offset, manifest.size - offset,
                      time.monotonic() + GRANT_TTL_S)
        secret = sender.offer(grant)
        await write_json_frame(stream, {
            "ok": True, "port": sender.port, "cert_sha256": self._cert_sha256,
            "secret": secret.hex(), "length": grant.length})

    async def _sender(self) -> CopySender | None:
        async with self._starting:
            if self.sender is None and self.bind is not None:
                try:
                    cert = await trio.to_thread.run_sync(load_or_create_certificate,
                                                         self.data_dir)
                    sender = CopySender(cert, self.bind, self.limit_bytes_s)
                    await trio.to_thread.run_sync(sender.start)
                except OSError as exc:
                    log.warning("no direct path for model copies (%s); peers use libp2p", exc)
                    self.bind = None
                    return None
                self.sender, self._cert_sha256 = sender, cert.sha256
            return self.sender

    def status(self) -> dict[str, Any] | None:
        sender = self.sender
        if sender is None:
            return None
        return {"port": sender.port, "traffic": sender.stats.counters()}

    async def close(self) -> None:
        sender, self.sender = self.sender, None
        if sender is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sender.close)


async def _refuse(stream: INetStream, code: str, message: str) -> None:
    await write_json_frame(stream, {"ok": False, "code": code, "message": message})


# -- the copying side ---------------------------------------------------------------------------

async def ask(host: IHost, peer_id: str, model: str, sha256: str, offset: int,
              size: int) -> DirectOffer:
    """The peer's direct offer for `model` from `offset`; DirectRefused if there is none."""
    peer = ID.from_base58(peer_id)
    if is_relayed(host, peer):
        raise DirectRefused("the link is relayed")
    with trio.fail_after(ASK_TIMEOUT_S):
        stream = await host.new_stream(peer, [TProtocol(PROTOCOL)])
        try:
            address = stream.get_remote_address()
            await write_json_frame(stream, {"version": WIRE_VERSION, "model": model,
                                            "sha256": sha256, "offset": offset})
            reply = await read_json_frame(stream, MAX_FRAME_BYTES)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
    if address is None:
        raise DirectRefused("the peer's address is unknown")
    return parse_offer(reply, address[0], size - offset)


async def fetch(offer: DirectOffer, *stages: Stage) -> None:
    """Read the offer's bytes through `stages` (the file write, the hash), no more than
    offered; raises when the connection cannot be had or breaks (what was written stays
    written). Cancelling cuts it."""
    tls = await trio.to_thread.run_sync(connect, offer.address, offer.cert_sha256,
                                        offer.secret)
    try:
        await trio.to_thread.run_sync(partial(receive, tls, offer.length, *stages),
                                      abandon_on_cancel=True)  # type: ignore[call-arg]
    finally:
        # Wakes the receiving thread, if a cancellation left it behind, before it writes more.
        with contextlib.suppress(OSError):
            tls.sock.shutdown(socket.SHUT_RDWR)
        tls.sock.close()


def receive(tls: TlsConnection, length: int, *stages: Stage) -> None:
    """Blocking: exactly `length` bytes from `tls` through `stages`, then a clean close. Each
    stage runs in a thread of its own, overlapping the next pieces' decryption."""
    tls.sock.settimeout(STALL_TIMEOUT_S)
    left = length
    with WriteBehind(stages, PLAIN_BYTES) as pieces:
        while left:
            buf = pieces.buffer()
            n = tls.recv_into(buf)
            if not n:
                raise EOFError("the peer closed the connection mid-copy")
            # Never more than offered: what a peer sends past it is not written.
            piece = min(n, left)
            pieces.put(buf, piece)
            left -= piece
    with contextlib.suppress(OSError):
        tls.close_write()
