"""The direct TLS path: ggml RPC bytes between a client machine and a worker, without libp2p.

Owns the worker's direct-path certificate (`load_or_create_certificate`), the admission
preamble, and both ends of the path. On the worker, a `DirectServer` listens on the network and
turns each admitted TLS connection into one connection to the worker's RPC server (its private
Unix socket). On the client, a `DirectClient` listens on a loopback port for llama.cpp's RPC
client (the engine's `rpc_endpoints` entry), and each connection accepted there becomes one TLS
connection to the worker. `DirectClient.probe` tells whether the path works at all, so the
caller can choose between it and the libp2p tunnel (swarm/workers/tunnel.py), whose semantics it
keeps. `SecretServer` (certificate, admission) and `connect` (the client's dial) also serve
other bulk transfers over the same path: model copies (swarm/node/copy_direct.py).

Wire: TLS 1.3 only. No CA is involved: the worker's certificate is self-signed, and the client
pins its SHA-256 (published in the signed ledger) and hangs up before sending a byte if it
differs. The client then sends `MAGIC` + the 32-byte lease secret the worker gave the lease
holder; the worker answers `ACCEPTED` (one byte) or closes without a byte, and from then on
the connection carries RPC bytes unchanged both ways. A peer that does not finish the
handshake and the preamble within `ADMIT_TIMEOUT_S` is dropped, and at most
`MAX_CONNECTIONS` connections live at once, so junk cannot hold threads for long. Of those, at
most `MAX_UNPROVEN` (and `UNPROVEN_PER_SOURCE` from one address) may not have shown a valid
secret yet (swarm/net/source_caps.py), so idle connections cannot keep lease holders out.

Threads, not trio: blocking sockets relayed by threads move several times the bytes that
trio's SSLStream does, because `ssl` releases the GIL while it works. The trio side calls only
the quick methods (`allow`, `revoke`, `close`, `start`) directly and runs `probe` in
`trio.to_thread.run_sync`.

Ends of streams, as in the tunnel: an EOF travels as a half-close. On the TLS side that is a
close_notify alert followed by a TCP FIN; TLS 1.3 lets the other direction go on after it
(RFC 8446 section 6.1) and OpenSSL keeps reading. A bare TCP EOF without close_notify, an
error or a reset on either side means the far end died or was cut (or someone forged a FIN):
both sockets of the connection are then closed with SO_LINGER 0, so the peers get a RST and
llama.cpp fails at once instead of hanging. (The cut first shuts the sockets down to wake the
threads blocked on them, so a peer may see an EOF just before the RST.)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import logging
import secrets
import selectors
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backends.endpoints import connect_local, local_endpoint
from swarm.net.source_caps import SourceCaps, Ticket
from swarm.trust.private_file import narrow_mode, write_private
from swarm.workers.engine_only import EngineOnly, connection_ends
from swarm.workers.rpc_filter import Violation
from swarm.workers.rpc_guard import GuardedConnection, LeaseGuard
from swarm.workers.tunnel import LinkStats

log = logging.getLogger(__name__)

V = TypeVar("V")  # what a `SecretServer` keeps with each secret

MAGIC = b"COVEYRPC"
SECRET_BYTES = 32
PREAMBLE_BYTES = len(MAGIC) + SECRET_BYTES
ACCEPTED = b"\x01"

ADMIT_TIMEOUT_S = 3.0  # the worker: TCP accept to the whole preamble (1.5 round trips)
CONNECT_TIMEOUT_S = 10.0  # the client: dial, handshake, pin check, preamble and answer
MAX_CONNECTIONS = 64  # per endpoint, admitted or not yet
MAX_UNPROVEN = 16  # the worker: connections without a valid secret yet, from everyone
UNPROVEN_PER_SOURCE = 8  # ... and from one address (an IPv6 /64)
JOIN_TIMEOUT_S = 5.0  # close(): how long to wait for the threads to end
READ_BYTES = 1024 * 1024  # one socket read; big pieces keep the per-call costs down
# Decrypting a full socket read yields at most READ_BYTES plus one record carried over.
PLAIN_BYTES = READ_BYTES + 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)

CERT_DIR = "direct-tls"
_CERT_NAME = "covey direct rpc"


class DirectUnavailable(OSError):
    """The direct path to a worker cannot be used: unreachable, wrong certificate, refused."""


# --- the worker's certificate ----------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """The worker's self-signed certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        """What clients pin: `fingerprint` of the DER certificate."""
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert_pem.decode("ascii")))


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def new_secret() -> bytes:
    """A fresh lease secret for `DirectServer.allow`."""
    return secrets.token_bytes(SECRET_BYTES)


def load_or_create_certificate(directory: Path) -> Certificate:
    """The certificate in `directory`/direct-tls (cert.pem, key.pem; 0600), made on first use.

    A new certificate changes the fingerprint clients pin, so a sound pair is always reused;
    one that cannot be read, or whose key does not match, is replaced with a warning, since
    nothing else could repair it (the caller publishes whatever this returns).
    """
    folder = directory / CERT_DIR
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.exists() or key_path.exists():
        try:
            cert = _load_certificate(cert_path, key_path)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            log.warning("the direct TLS certificate in %s is unusable (%s); making a new one",
                        folder, exc)
        else:
            narrow_mode(key_path)
            narrow_mode(cert_path)
            return cert
    cert = _new_certificate()
    # The key first: a crash between the two leaves a mismatched pair, replaced next time.
    write_private(key_path, cert.key_pem)
    write_private(cert_path, cert.cert_pem)
    log.info("made a direct TLS certificate, sha256 %s", cert.sha256)
    return cert


def _new_certificate() -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CERT_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        # Pinned, never validated: RFC 5280's "no expiry" date, so it never needs renewing.
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


def _load_certificate(cert_path: Path, key_path: Path) -> Certificate:
    cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the key does not match the certificate")
    return Certificate(cert_pem=cert_pem, key_pem=key_pem)


def _context(*, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _server_context(cert: Certificate) -> ssl.SSLContext:
    ctx = _context(server=True)
    ctx.num_tickets = 0  # no resumption: every connection shows its own secret anyway
    # load_cert_chain reads only files: a private temporary one (the directory is 0700).
    with tempfile.TemporaryDirectory(prefix="covey-direct-") as tmp:
        pair = Path(tmp) / "pair.pem"
        write_private(pair, cert.cert_pem + cert.key_pem)
        ctx.load_cert_chain(pair)
    return ctx


def _client_context() -> ssl.SSLContext:
    ctx = _context(server=False)
    # No CA and no name: the client checks the certificate's fingerprint itself (`_dial`).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- sockets ---------------------------------------------------------------------------------


def _nodelay(sock: socket.socket) -> None:
    # ggml RPC is small requests and replies: Nagle would add delayed-ACK waits to each.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tune_remote(sock: socket.socket) -> None:
    """TCP keepalive on a connection between machines: without it, a machine that vanishes
    while llama.cpp waits for a reply would leave it waiting for good."""
    _nodelay(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _reset(sock: socket.socket) -> None:
    """Wake every thread blocked on `sock` now, and make its close() send a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        # Closing a socket does not wake a thread blocked in recv or send on it; this does.
        sock.shutdown(socket.SHUT_RDWR)


def _where(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Tls:
    """One TLS connection over a blocking socket, for one reading and one writing thread.

    OpenSSL forbids using one SSL object from two threads at once, and an ssl.SSLSocket's
    recv and send both use it (cpython#151508, openssl#20446: corrupted records, crashes). So
    the SSL object works on memory BIOs behind `_lock`, and the socket I/O runs outside it;
    the crypto itself still runs without the GIL.

    Invariant: whoever feeds ciphertext in decrypts every whole record before letting go of
    `_lock`, so `close_write` never meets one: its SSL_shutdown looks for the peer's
    close_notify and fails (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) on a data record. The only
    exception is right after the handshake, while no second thread exists yet.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server: bool) -> None:
        self.sock = sock
        self.deadline: float | None = None  # while admitting: when every socket call gives up
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server)
        self._lock = threading.Lock()  # the SSL object and both BIOs
        self._send_lock = threading.Lock()  # the socket's sending side: records in order
        self._raw = memoryview(bytearray(READ_BYTES))
        self._plain = memoryview(bytearray(PLAIN_BYTES))
        self._leftover = b""  # plaintext read past the preamble or the answer
        self._ended = False  # the peer's close_notify came

    def handshake(self) -> None:
        while True:
            with self._lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            n = self._recv_raw()
            with self._lock:
                self._feed(n)

    def peer_der(self) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True)

    def admitted(self) -> None:
        """Admission is over: from now on, the socket waits as long as the peers do."""
        self.deadline = None
        self.sock.settimeout(None)

    def recv(self) -> bytes | memoryview:
        """The next plaintext; empty once the peer closed its side. A view is valid until the
        next call. Raises ConnectionResetError on a TCP EOF without close_notify."""
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        return self._plain[:self.recv_into(self._plain)]

    def recv_into(self, buffer: memoryview) -> int:
        """Like `recv`, into `buffer` (at least PLAIN_BYTES: all one socket read decrypts to);
        the byte count, 0 once the peer closed its side. Whoever holds several buffers can
        hand a filled one to another thread while the next is decrypted."""
        if len(buffer) < PLAIN_BYTES:
            raise ValueError(f"a buffer of {len(buffer)} bytes; at least {PLAIN_BYTES} needed")
        if self._leftover:
            n = len(self._leftover)
            buffer[:n], self._leftover = self._leftover, b""
            return n
        if self._ended:
            return 0
        n_raw: int | None = None  # the first round decrypts what the handshake left over
        while True:
            with self._lock:
                if n_raw is not None:
                    self._feed(n_raw)
                n = self._decrypt(buffer)
                owed = self._out.pending > 0
            if owed:
                self._flush()  # a record OpenSSL owes the peer (a KeyUpdate reply, an alert)
            if n or self._ended:
                return n
            n_raw = self._recv_raw()

    def read_exact(self, count: int) -> bytes:
        """Exactly `count` bytes of plaintext, keeping what came after them for `recv`."""
        got = bytearray()
        while len(got) < count:
            data = self.recv()
            if not data:
                raise ConnectionAbortedError("the peer closed the connection")
            got += data
        self._leftover = bytes(got[count:])
        return bytes(got[:count])

    def send(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            with self._lock:
                self._ssl.write(data)  # into the memory BIO: never blocks
                out = self._out.read()
            self._sendall(out)

    def close_write(self) -> None:
        """Half-close: close_notify, then a TCP FIN; the peer may go on sending."""
        with self._send_lock:
            with self._lock:
                # The first SSL_shutdown queues close_notify; Python then calls it again to
                # wait for the peer's, which is not there yet (or it returns at once if it
                # came already). `recv` goes on reading the peer's data until it comes.
                with contextlib.suppress(ssl.SSLWantReadError):
                    self._ssl.unwrap()
                out = self._out.read()
            self._sendall(out)
            self.sock.shutdown(socket.SHUT_WR)

    def _decrypt(self, into: memoryview) -> int:
        """Under `_lock`: every whole record fed so far into `into`; returns the bytes."""
        n = 0
        while n < PLAIN_BYTES:
            if not (self._in.pending or self._ssl.pending() or self._in.eof):
                # Nothing fed is left (OpenSSL reads one record at a time, read-ahead off):
                # asking would only raise SSLWantReadError, which costs more than a read.
                break
            try:
                # With a buffer, read() returns a count; typeshed only knows the bytes form.
                k = cast(int, self._ssl.read(PLAIN_BYTES - n, into[n:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                k = 0  # close_notify, after we sent ours
            except ssl.SSLEOFError as exc:
                raise ConnectionResetError(
                    "the TCP connection ended without a TLS close_notify") from exc
            if k == 0:  # close_notify
                self._ended = True
                break
            n += k
        return n

    def _feed(self, n: int) -> None:
        if n:
            self._in.write(self._raw[:n])
        else:
            self._in.write_eof()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._out.read()
            if out:
                self._sendall(out)

    def _recv_raw(self) -> int:
        self._timed()
        return self.sock.recv_into(self._raw)

    def _sendall(self, data: bytes) -> None:
        self._timed()
        self.sock.sendall(data)

    def _timed(self) -> None:
        # While admitting, every socket call gets only what is left of the whole allowance,
        # so a peer trickling a byte at a time cannot stretch it.
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)


# --- connections and endpoints ---------------------------------------------------------------


@dataclass
class DirectStats(LinkStats):
    """The path's counters, which the relay threads update at once."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def counters(self) -> dict[str, int]:
        with self._lock:  # one consistent reading, not a relay thread's half-done one
            return super().counters()


class _Conn:
    """One accepted connection and the sockets it grew; `cut` may come from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sockets = [sock]
        self.secret: bytes | None = None  # the server's, once admitted
        self.lease: LeaseGuard | None = None  # the server's: the filter of the admitting lease
        self.unproven: Ticket | None = None  # the server's, until the secret is accepted
        self.is_cut = False
        self._lock = threading.Lock()  # also keeps close() from racing a cut on the same fd

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.is_cut:
                _reset(sock)

    def cut(self) -> bool:
        """Reset every socket; True for the first cut."""
        with self._lock:
            first = not self.is_cut
            self.is_cut = True
            for sock in self.sockets:
                _reset(sock)
        return first

    def close(self) -> None:
        with self._lock:
            for sock in self.sockets:
                sock.close()


class _Endpoint:
    """What both ends share: a listening socket, its accept thread, and each accepted
    connection served by its own threads until it ends or is cut."""

    def __init__(self, max_connections: int) -> None:
        self.stats = DirectStats()
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._started = False
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the accept loop

    def close(self) -> None:
        """Stop listening, reset every connection, and wait for the threads to end.
        Idempotent."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for conn in conns:
            conn.cut()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        me = threading.current_thread()
        while time.monotonic() < deadline:
            with self._lock:  # threads may spawn threads until they notice: look again
                alive = [t for t in self._threads if t.is_alive() and t is not me]
            if not alive:
                break
            for thread in alive:
                thread.join(max(0.0, deadline - time.monotonic()))
        else:
            log.warning("direct TLS: %d threads still running after close", len(alive))
        if not self._started:
            self._wake_r.close()
        self._wake_w.close()

    def _serve(self, conn: _Conn) -> None:
        raise NotImplementedError

    def _listen(self, listener: socket.socket) -> int:
        with self._lock:
            if self._started or self._closed:
                listener.close()
                raise RuntimeError("already started or closed")
            self._started = True
        listener.setblocking(False)
        self._spawn("accept", self._accept_loop, listener)
        return int(listener.getsockname()[1])

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except Exception:  # noqa: BLE001 - a bug in one connection must not go unheard
                log.exception("direct TLS %s thread failed", name)

        thread = threading.Thread(target=run, name=f"covey-direct-{name}", daemon=True)
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
            thread.start()
        return thread

    def _accept_loop(self, listener: socket.socket) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(listener, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._closed:
                    selector.select()
                    if self._closed:
                        break
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # out of file descriptors, most likely
                        log.warning("direct TLS: accept failed: %s", exc)
                        time.sleep(0.1)
                        continue
                    self._take(sock)
        finally:
            listener.close()
            self._wake_r.close()

    def _take(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        conn = _Conn(sock)
        with self._lock:
            refusal = self._refusal(conn)
            if refusal is None:
                self._conns.add(conn)
        if refusal is not None:
            self.stats.add("refused")
            why, level = refusal
            log.log(level, "direct TLS: refusing a connection: %s", why)
            conn.cut()
            conn.close()
            return
        self._spawn("conn", self._serve_conn, conn)

    def _refusal(self, conn: _Conn) -> tuple[str, int] | None:
        """Under `_lock`: why `conn` is not served (and the log level), or None to serve it."""
        if self._closed:
            return "closing", logging.DEBUG
        if len(self._conns) >= self._max_connections:
            return f"{self._max_connections} connections open already", logging.INFO
        return None

    def _forget(self, conn: _Conn) -> None:
        """Under `_lock`: `conn` has ended."""
        self._conns.discard(conn)

    def _serve_conn(self, conn: _Conn) -> None:
        try:
            self._serve(conn)
        except Exception:
            conn.cut()
            raise
        finally:
            conn.close()
            with self._lock:
                self._forget(conn)

    def _relay(self, conn: _Conn, plain: socket.socket, tls: _Tls, *, client: bool,
               guard: GuardedConnection | None = None) -> None:
        """Pump both ways (the second direction in a thread of its own) until both end.
        With `guard` (the worker: `plain` is its RPC server), every chunk passes the filter."""
        from_plain, from_tls = ("bytes_up", "bytes_down") if client else ("bytes_down",
                                                                         "bytes_up")
        self.stats.add("active")
        try:
            other = self._spawn("pump", self._tls_to_plain, conn, tls, plain, from_tls, guard)
            self._plain_to_tls(conn, plain, tls, from_plain, guard)
            other.join()
        finally:
            if guard is not None:
                guard.close()
            self.stats.add("active", -1)

    def _plain_to_tls(self, conn: _Conn, plain: socket.socket, tls: _Tls, counter: str,
                      guard: GuardedConnection | None) -> None:
        buf = memoryview(bytearray(READ_BYTES))
        try:
            while n := plain.recv_into(buf):
                if guard is not None:
                    guard.check_reply(buf[:n])
                tls.send(buf[:n])
                self.stats.add(counter, n)
            if not conn.is_cut:  # (a cut wakes recv_into with an EOF too)
                tls.close_write()
        except (OSError, Violation) as exc:  # ssl.SSLError included
            self._broken(conn, exc)

    def _tls_to_plain(self, conn: _Conn, tls: _Tls, plain: socket.socket, counter: str,
                      guard: GuardedConnection | None) -> None:
        try:
            while data := tls.recv():
                if guard is not None:
                    plain.sendall(guard.feed(data))  # b"": the rest of a frame is to come
                else:
                    plain.sendall(data)
                self.stats.add(counter, len(data))
            if not conn.is_cut:
                plain.shutdown(socket.SHUT_WR)
        except (OSError, Violation) as exc:
            self._broken(conn, exc)

    def _broken(self, conn: _Conn, exc: BaseException) -> None:
        if conn.cut():
            self.stats.add("failed")
            log.debug("direct TLS connection broken: %r", exc)


class SecretServer(_Endpoint, Generic[V]):
    """Listens on (`bind`, `port`) and admits each TLS connection whose preamble carries a
    secret given to `allow` and not yet revoked; `_serve_admitted` then serves it with the
    value the secret was allowed with. With `one_use`, a secret admits one connection only.
    """

    def __init__(self, cert: Certificate, bind: str = "0.0.0.0", port: int = 0,
                 *, admit_timeout: float = ADMIT_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, max_unproven: int = MAX_UNPROVEN,
                 unproven_per_source: int = UNPROVEN_PER_SOURCE, one_use: bool = False) -> None:
        super().__init__(max_connections)
        self.bind = bind
        self.port = port
        self.admit_timeout = admit_timeout
        self.one_use = one_use
        self._context = _server_context(cert)
        self._secrets: dict[bytes, V] = {}
        self._unproven = SourceCaps(unproven_per_source, max_unproven)

    def start(self) -> int:
        """Bind, start accepting, and return the port."""
        if ":" in self.bind:
            listener = socket.create_server(
                (self.bind, self.port), family=socket.AF_INET6,
                dualstack_ipv6=self.bind == "::" and socket.has_dualstack_ipv6())
        else:
            listener = socket.create_server((self.bind, self.port))
        self.port = self._listen(listener)
        log.info("direct TLS: listening on %s for %s", _where((self.bind, self.port)),
                 self._serves())
        return self.port

    def _serves(self) -> str:
        """What the admitted connections reach, for the log."""
        raise NotImplementedError

    def _allow(self, secret: bytes, value: V) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a secret is {SECRET_BYTES} bytes")
        with self._lock:
            self._secrets[bytes(secret)] = value

    def withdraw(self, secret: bytes) -> None:
        """Admit `secret` no more; a connection it already let in goes on."""
        with self._lock:
            self._secrets.pop(secret, None)

    def revoke(self, secret: bytes) -> int:
        """Admit `secret` no more and cut the connections it let in; returns how many."""
        with self._lock:  # the same lock admission holds: no connection slips in between
            self._secrets.pop(secret, None)
            cut = [c for c in self._conns
                   if c.secret is not None and hmac.compare_digest(c.secret, secret)]
        for conn in cut:
            conn.cut()
        return len(cut)

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sockets[0]
        _tune_remote(sock)
        tls = _Tls(sock, self._context, server=True)
        tls.deadline = time.monotonic() + self.admit_timeout
        try:
            tls.handshake()
            preamble = tls.read_exact(PREAMBLE_BYTES)
        except OSError as exc:  # junk, plain TCP, silence, a client that hung up on our cert
            self._refuse(conn, f"no TLS handshake and preamble ({exc!r})", logging.DEBUG)
            return
        secret = preamble[len(MAGIC):]
        with self._lock:
            known = [s for s in self._secrets if hmac.compare_digest(secret, s)]
            admitted = hmac.compare_digest(preamble[:len(MAGIC)], MAGIC) and bool(known)
            if admitted:
                conn.secret = secret
                value = (self._secrets.pop(known[0]) if self.one_use
                         else self._secrets[known[0]])
                self._release_unproven(conn)
        if not admitted:
            self._refuse(conn, "its secret is not accepted here", logging.INFO)
            return
        self._serve_admitted(conn, tls, value)

    def _serve_admitted(self, conn: _Conn, tls: _Tls, value: V) -> None:
        """Serve `conn`, admitted by a secret allowed with `value`; the preamble is read and
        not yet answered."""
        raise NotImplementedError

    def _refusal(self, conn: _Conn) -> tuple[str, int] | None:
        refusal = super()._refusal(conn)
        if refusal is not None:
            return refusal
        try:
            source = conn.sockets[0].getpeername()[0]
        except OSError:
            return "it left at once", logging.DEBUG
        conn.unproven = self._unproven.enter(source)
        if conn.unproven is None:
            # Debug only: a flood would otherwise write a line per connection.
            return (f"{self._unproven.unproven} connections without a secret yet, "
                    f"{self._unproven.held_by(source)} of them from {source}"), logging.DEBUG
        return None

    def _release_unproven(self, conn: _Conn) -> None:
        """Under `_lock`: `conn` showed a valid secret or ended; it no longer counts."""
        if conn.unproven is not None:
            self._unproven.leave(conn.unproven)

    def _forget(self, conn: _Conn) -> None:
        super()._forget(conn)
        self._release_unproven(conn)

    def _refuse(self, conn: _Conn, why: str, level: int) -> None:
        self.stats.add("refused")
        try:
            peer = _where(conn.sockets[0].getpeername()[:2])
        except OSError:
            peer = "a peer"
        log.log(level, "direct TLS: refused %s: %s", peer, why)
        conn.cut()  # closes without a byte, with a RST


class DirectServer(SecretServer[LeaseGuard | None]):
    """The worker side: listens on (`bind`, `port`) and relays each admitted TLS connection
    to `target`, the worker's local RPC endpoint ("unix:PATH", or "127.0.0.1:50052").

    A client is admitted when its preamble carries a secret given to `allow` and not yet
    revoked; `revoke` also cuts the connections that secret let in. A secret allowed with a
    `LeaseGuard` has every byte of its connections pass that lease's RPC command filter.
    """

    def __init__(self, cert: Certificate, target: str, bind: str = "0.0.0.0", port: int = 0,
                 *, admit_timeout: float = ADMIT_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, max_unproven: int = MAX_UNPROVEN,
                 unproven_per_source: int = UNPROVEN_PER_SOURCE) -> None:
        super().__init__(cert, bind, port, admit_timeout=admit_timeout,
                         max_connections=max_connections, max_unproven=max_unproven,
                         unproven_per_source=unproven_per_source)
        self.target = local_endpoint(target)  # only ever relays to this machine

    def _serves(self) -> str:
        return str(self.target)

    def allow(self, secret: bytes, lease: LeaseGuard | None = None) -> None:
        self._allow(secret, lease)

    def _serve_admitted(self, conn: _Conn, tls: _Tls, value: LeaseGuard | None) -> None:
        conn.lease = value
        try:
            target = connect_local(self.target, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self._refuse(conn, f"the RPC endpoint {self.target} is down ({exc})",
                         logging.WARNING)
            return
        conn.add(target)
        target.settimeout(None)
        try:
            tls.send(ACCEPTED)
        except OSError as exc:
            self._refuse(conn, f"it left before the answer ({exc!r})", logging.DEBUG)
            return
        tls.admitted()
        self.stats.add("connections")
        guard = conn.lease.connection() if conn.lease is not None else None
        self._relay(conn, target, tls, client=False, guard=guard)


class DirectClient(_Endpoint):
    """The client side: listens on 127.0.0.1 for llama.cpp's RPC client, and turns each
    connection accepted there into one TLS connection to the worker at `address`, whose
    certificate must have the SHA-256 `pinned_sha256`, admitted by `secret`.

    Only connections that `gate` admits (the engine's, see swarm/workers/engine_only.py) are
    relayed; any other is reset before the worker is dialled. A connection the worker cannot
    take is reset. `close` (the lease is lost) resets every relayed connection, so llama.cpp
    sees it at once.
    """

    def __init__(self, address: tuple[str, int], pinned_sha256: str, secret: bytes,
                 *, gate: EngineOnly | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        _check_secret(secret)
        self.address = address
        self.pinned_sha256 = _pinned(pinned_sha256)
        self.connect_timeout = connect_timeout
        self.gate = gate or EngineOnly()
        self.endpoint: str | None = None
        self._secret = bytes(secret)
        self._context = _client_context()

    def probe(self, timeout: float = 3.0) -> None:
        """Connect, check the certificate, be admitted, and hang up; raises DirectUnavailable
        saying why the path cannot be used. Blocks: run it in a thread from trio."""
        tls = self._dial(timeout)
        # Hang up as llama.cpp would, and wait a moment for the worker to hang up too, so the
        # worker's relay ends cleanly rather than by a reset. Admitted is all a probe asks.
        tls.deadline = time.monotonic() + min(timeout, 1.0)
        try:
            tls.close_write()
            while tls.recv():
                pass
        except OSError:
            pass
        finally:
            tls.sock.close()

    def start(self) -> str:
        """Start listening; returns "127.0.0.1:port" for the engine's rpc_endpoints."""
        port = self._listen(socket.create_server(("127.0.0.1", 0)))
        self.endpoint = f"127.0.0.1:{port}"
        log.info("direct TLS: %s leads to the worker at %s", self.endpoint,
                 _where(self.address))
        return self.endpoint

    def _serve(self, conn: _Conn) -> None:
        plain = conn.sockets[0]
        _nodelay(plain)
        ends = connection_ends(plain)
        if ends is None or not self.gate.admits(*ends, stop=lambda: conn.is_cut):
            self.stats.add("refused")
            self.gate.refused(f"direct TLS to {_where(self.address)}", ends)
            conn.cut()
            return
        self.stats.add("connections")
        try:
            tls = self._dial(self.connect_timeout, conn)
        except DirectUnavailable as exc:
            self.stats.add("refused")
            log.warning("direct TLS: %s", exc)
            conn.cut()
            return
        self._relay(conn, plain, tls, client=True)

    def _dial(self, timeout: float, conn: _Conn | None = None) -> _Tls:
        """A TLS connection to the worker, certificate checked and admitted, or
        DirectUnavailable. With `conn`, the socket joins it, so a cut stops the dial too."""
        return _dial(self.address, self.pinned_sha256, self._secret, self._context, timeout,
                     conn)


TlsConnection = _Tls  # what `connect` returns: recv, read_exact, send, close_write, sock
Connection = _Conn  # what `SecretServer._serve_admitted` is given


def connect(address: tuple[str, int], pinned_sha256: str, secret: bytes,
            timeout: float = CONNECT_TIMEOUT_S) -> TlsConnection:
    """One admitted connection to a `SecretServer`, for a caller that speaks over it itself
    (swarm/node/copy_direct.py); DirectUnavailable saying why when it cannot be had.
    Blocks: run it in a thread from trio."""
    _check_secret(secret)
    return _dial(address, _pinned(pinned_sha256), bytes(secret), _client_context(), timeout)


def _check_secret(secret: bytes) -> None:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes")


def _pinned(sha256: str) -> str:
    pinned = sha256.lower().replace(":", "")
    if len(pinned) != 64 or not all(c in "0123456789abcdef" for c in pinned):
        raise ValueError(f"not a SHA-256 fingerprint: {sha256!r}")
    return pinned


def _dial(address: tuple[str, int], pinned_sha256: str, secret: bytes,
          context: ssl.SSLContext, timeout: float, conn: _Conn | None = None) -> _Tls:
    """A TLS connection to `address`, certificate checked and admitted, or
    DirectUnavailable. With `conn`, the socket joins it, so a cut stops the dial too."""
    where = _where(address)
    deadline = time.monotonic() + timeout
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            *address, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise DirectUnavailable(f"cannot resolve the worker address {where}: {exc}") from exc
    sock = socket.socket(family, kind, proto)
    if conn is not None:
        conn.add(sock)
    ok = False
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            raise DirectUnavailable(f"cannot reach the worker at {where}: {exc}") from exc
        _tune_remote(sock)
        tls = _Tls(sock, context, server=False)
        tls.deadline = deadline
        try:
            tls.handshake()
        except OSError as exc:
            raise DirectUnavailable(
                f"no TLS 1.3 handshake with the worker at {where}: {exc}") from exc
        der = tls.peer_der()
        got = fingerprint(der) if der else "(none)"
        if not hmac.compare_digest(got, pinned_sha256):
            raise DirectUnavailable(
                f"the worker at {where} presented the wrong certificate (sha256 {got}, "
                f"pinned {pinned_sha256}); not sending the secret")
        try:
            tls.send(MAGIC + secret)
            answer = tls.read_exact(len(ACCEPTED))
        except OSError as exc:
            raise DirectUnavailable(
                f"the worker at {where} refused the connection: the lease secret is not "
                f"accepted there, or its RPC server is down ({exc!r})") from exc
        if answer != ACCEPTED:
            raise DirectUnavailable(f"the worker at {where} answered {answer!r}")
        tls.admitted()
        ok = True
        return tls
    finally:
        if not ok and conn is None:
            _reset(sock)
            sock.close()
