"""The direct TLS path on loopback: bytes through it unchanged, half-close both ways, pinning,
secrets, junk and slow peers dropped, revocation, resets carried, no threads left behind, the
certificate kept, and real llama.cpp RPC through it."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backends.engine import (
    Engine,
    EngineConfig,
    EngineError,
    GenerateRequest,
    Token,
    Watchdog,
)
from swarm.workers.direct_tls import (
    MAX_CONNECTIONS,
    UNPROVEN_PER_SOURCE,
    Certificate,
    DirectClient,
    DirectServer,
    DirectUnavailable,
    fingerprint,
    load_or_create_certificate,
    new_secret,
)
from swarm.workers.rpc_guard import COMPUTE_HEADROOM_BYTES, LeaseGuard
from tests.conftest import Worker, greedy_on_worker
from tests.support.rpc_attacks import check_each_attack_is_cut_off, is_cut

pytestmark = pytest.mark.processes

MiB = 1024 * 1024


# --- a stand-in for the worker's RPC endpoint ------------------------------------------------


@dataclass
class Target:
    """A TCP server on loopback, one thread per connection; records what it saw."""

    handler: Callable[[socket.socket, Target], None]
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    saw_eof: threading.Event = field(default_factory=threading.Event)
    listener: socket.socket = field(init=False)
    threads: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self._spawn(self._accept)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            sock.settimeout(10)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                self.handler(sock, self)
            except OSError:
                self.saw_eof.set()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


def echo(sock: socket.socket, target: Target) -> None:
    """Echo until EOF, then close."""
    while data := sock.recv(MiB):
        target.received += data
        sock.sendall(data)
    target.saw_eof.set()


def count_then_answer(sock: socket.socket, target: Target) -> None:
    """Read until EOF, then say how much came: works only if the half-close got here."""
    while data := sock.recv(MiB):
        target.received += data
    target.saw_eof.set()
    sock.sendall(f"got {len(target.received)} bytes".encode())


def speak_then_listen(sock: socket.socket, target: Target) -> None:
    """Half-close first, then read until EOF."""
    sock.sendall(b"banner")
    sock.shutdown(socket.SHUT_WR)
    while data := sock.recv(MiB):
        target.received += data
    target.saw_eof.set()


def reset_after_100k(sock: socket.socket, target: Target) -> None:
    """Die mid-stream, the way a killed process with unread data goes: a RST."""
    while len(target.received) < 100_000:
        data = sock.recv(MiB)
        if not data:
            break
        target.received += data
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- the path under test ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return load_or_create_certificate(tmp_path_factory.mktemp("worker"))


@dataclass
class Path_:
    target: Target
    server: DirectServer
    client: DirectClient
    secret: bytes

    def connect(self) -> socket.socket:
        assert self.client.endpoint is not None
        host, port = self.client.endpoint.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
        return sock

    def other_client(self, **kwargs: object) -> DirectClient:
        args: dict[str, object] = {"address": ("127.0.0.1", self.server.port),
                                   "pinned_sha256": self.client.pinned_sha256,
                                   "secret": self.secret, **kwargs}
        return DirectClient(**args)  # type: ignore[arg-type]


def direct_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("covey-direct")]


@pytest.fixture
def make_path(cert: Certificate) -> Iterator[Callable[..., Path_]]:
    """Factory: target + DirectServer + DirectClient on loopback; all closed afterwards, and
    then no thread of theirs may be left."""
    made: list[Path_] = []

    def factory(handler: Callable[[socket.socket, Target], None] = echo,
                **server_kwargs: object) -> Path_:
        target = Target(handler)
        server = DirectServer(cert, target.endpoint, bind="127.0.0.1",
                              **server_kwargs)  # type: ignore[arg-type]
        port = server.start()
        secret = new_secret()
        server.allow(secret)
        client = DirectClient(("127.0.0.1", port), cert.sha256, secret)
        client.start()
        made.append(Path_(target, server, client, secret))
        return made[-1]

    yield factory
    for p in made:
        p.client.close()
        p.server.close()
        p.target.close()
    assert direct_threads() == []


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(MiB):
        out += data
    return bytes(out)


def ended_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until `sock` sees EOF or a reset (what it receives before is discarded)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(MiB):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - start


def is_reset_within(sock: socket.socket, seconds: float) -> bool:
    """True once writing to `sock` fails: a RST came, not merely a half-close."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send(b"x")
        except OSError:
            return True
        time.sleep(0.01)
    return False


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- tests -----------------------------------------------------------------------------------


def test_bytes_round_trip_unchanged_both_ways(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    p.client.probe()
    payload = os.urandom(8 * MiB + 12345)
    sock = p.connect()

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = read_all(sock)  # both directions busy at once, as full duplex
    sender.join()
    sock.close()
    assert got == payload
    assert bytes(p.target.received) == payload
    wait_for(lambda: p.client.stats.active == 0 and p.server.stats.active == 0)
    for stats in (p.client.stats, p.server.stats):
        assert stats.bytes_up == stats.bytes_down == len(payload)
        assert stats.failed == 0
    assert p.client.stats.connections == 1
    assert p.server.stats.connections == 2  # the probe, then this


def test_half_close_carries_toward_the_worker(make_path: Callable[..., Path_]) -> None:
    p = make_path(count_then_answer)
    sock = p.connect()
    sock.sendall(b"hello")
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b"got 5 bytes"  # the EOF reached the target; replies still came
    sock.close()


def test_half_close_carries_toward_the_client(make_path: Callable[..., Path_]) -> None:
    p = make_path(speak_then_listen)
    sock = p.connect()
    assert read_all(sock) == b"banner"  # then EOF, while our side stays open
    sock.sendall(b"after your EOF")
    sock.shutdown(socket.SHUT_WR)
    assert p.target.saw_eof.wait(5)
    assert bytes(p.target.received) == b"after your EOF"
    sock.close()
    wait_for(lambda: p.server.stats.active == 0)
    assert p.server.stats.failed == 0 and p.client.stats.failed == 0


def test_wrong_certificate_is_refused_before_any_byte(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    wrong = p.other_client(pinned_sha256="ab" * 32)
    with pytest.raises(DirectUnavailable, match="wrong certificate"):
        wrong.probe()
    wrong.start()
    assert wrong.endpoint is not None
    host, port = wrong.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        assert ended_within(sock, 5) < 5
    wrong.close()
    wait_for(lambda: p.server.stats.refused == 2)  # it never saw a preamble
    assert p.target.accepted == 0


def test_wrong_secret_is_refused_and_the_target_never_dialled(
        make_path: Callable[..., Path_]) -> None:
    p = make_path()
    with pytest.raises(DirectUnavailable, match="refused"):
        p.other_client(secret=new_secret()).probe()
    p.server.revoke(p.secret)
    with pytest.raises(DirectUnavailable, match="refused"):
        p.client.probe()
    assert p.server.stats.refused == 2 and p.server.stats.connections == 0
    assert p.target.accepted == 0


def test_unreachable_worker_is_reported_and_bad_pins_rejected() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    client = DirectClient(("127.0.0.1", port), "00" * 32, new_secret())
    with pytest.raises(DirectUnavailable, match="cannot reach"):
        client.probe()
    for pin in ("00" * 31, "zz" * 32, "\u00e9" * 64):
        with pytest.raises(ValueError):
            DirectClient(("127.0.0.1", port), pin, new_secret())
    with pytest.raises(ValueError):
        DirectClient(("127.0.0.1", port), "00" * 32, b"short")


def test_many_connections_at_once(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            message = f"hello {i} ".encode() * 20_000
            with p.connect() as sock:
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)
                assert read_all(sock) == message
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert p.target.accepted == 8
    wait_for(lambda: p.client.stats.active == 0 and p.server.stats.active == 0)
    assert p.client.stats.failed == 0 and p.server.stats.failed == 0


def test_junk_and_silent_peers_are_dropped_in_time(make_path: Callable[..., Path_]) -> None:
    p = make_path(admit_timeout=0.5)
    address = ("127.0.0.1", p.server.port)
    garbage = socket.create_connection(address)
    garbage.sendall(os.urandom(300))
    http = socket.create_connection(address)
    http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    silent = socket.create_connection(address)
    trickle = socket.create_connection(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    mute_tls = ctx.wrap_socket(socket.create_connection(address))  # handshakes, says nothing

    assert ended_within(garbage, 2) < 0.3
    assert ended_within(http, 2) < 0.3
    for sock in (silent, mute_tls):
        assert ended_within(sock, 3) < 1.5
    for _ in range(20):  # a byte every 50 ms does not stretch the allowance
        try:
            trickle.send(b"\x16")
        except OSError:
            break
        time.sleep(0.05)
    assert ended_within(trickle, 3) < 1.5

    p.client.probe()  # still serving
    assert p.server.stats.refused == 5 and p.target.accepted == 1
    for sock in (garbage, http, silent, trickle, mute_tls):
        sock.close()


def test_connections_beyond_the_cap_are_refused(make_path: Callable[..., Path_]) -> None:
    p = make_path(max_connections=2)
    address = ("127.0.0.1", p.server.port)
    held = [socket.create_connection(address) for _ in range(2)]
    wait_for(lambda: len(p.server._conns) == 2)
    with socket.create_connection(address) as extra:
        assert ended_within(extra, 2) < 0.5
    assert p.server.stats.refused == 1
    for sock in held:
        sock.close()
    wait_for(lambda: not p.server._conns)
    p.client.probe()


def test_idle_connections_from_one_address_do_not_keep_a_lease_holder_out(
        make_path: Callable[..., Path_]) -> None:
    p = make_path(admit_timeout=10.0)  # the flood's few places stay taken throughout
    flood = []
    for _ in range(MAX_CONNECTIONS + 40):  # without a per-address cap, every slot is taken
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))  # the lease holder dials from 127.0.0.1
        sock.connect(("127.0.0.1", p.server.port))
        flood.append(sock)
    wait_for(lambda: p.server.stats.refused == len(flood) - UNPROVEN_PER_SOURCE)
    assert len(p.server._conns) == UNPROVEN_PER_SOURCE
    # The flood's excess was closed at once; its few places end at the preamble deadline.
    assert sum(is_cut(sock, 0.01) for sock in flood) == len(flood) - UNPROVEN_PER_SOURCE
    # Meanwhile the lease holder gets in, and its bytes go through, more than once.
    p.client.probe()
    for _ in range(3):
        with p.connect() as sock:
            sock.sendall(b"ping")
            assert sock.recv(10) == b"ping"
    assert p.target.accepted == 4
    for sock in flood:
        sock.close()
    # A holder's connection does not count as unproven: once in, the cap is back to empty.
    wait_for(lambda: p.server._unproven.unproven == 0 and not p.server._conns)


def test_revoke_cuts_live_connections(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    sock = p.connect()
    sock.sendall(b"ping")
    assert sock.recv(10) == b"ping"
    assert p.server.revoke(p.secret) == 1
    assert ended_within(sock, 2) < 1
    assert is_reset_within(sock, 1)
    sock.close()
    with pytest.raises(DirectUnavailable):
        p.client.probe()
    assert p.server.revoke(p.secret) == 0


def test_target_dying_mid_stream_resets_the_client(make_path: Callable[..., Path_]) -> None:
    p = make_path(reset_after_100k)
    sock = p.connect()
    sock.sendall(os.urandom(300_000))
    assert ended_within(sock, 2) < 1
    assert is_reset_within(sock, 1)
    sock.close()
    wait_for(lambda: p.server.stats.failed == 1 and p.client.stats.failed == 1)


def test_client_hanging_up_closes_the_target_side(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    sock = p.connect()
    sock.sendall(b"ping")
    assert sock.recv(10) == b"ping"
    sock.close()
    assert p.target.saw_eof.wait(2)
    wait_for(lambda: p.server.stats.active == 0 and p.client.stats.active == 0)


def test_close_cuts_everything_and_leaves_no_threads(make_path: Callable[..., Path_]) -> None:
    p = make_path()
    socks = [p.connect() for _ in range(3)]
    for sock in socks:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
    idle = socket.create_connection(("127.0.0.1", p.server.port))  # still being admitted
    start = time.monotonic()
    p.client.close()
    for sock in socks:
        assert ended_within(sock, 2) < 1
        assert is_reset_within(sock, 1)
    p.server.close()
    p.server.close()  # idempotent
    assert time.monotonic() - start < 3
    assert ended_within(idle, 2) < 1
    assert direct_threads() == []
    for sock in [*socks, idle]:
        sock.close()


def test_ipv6(make_path: Callable[..., Path_], cert: Certificate) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    target = Target(echo)
    server = DirectServer(cert, target.endpoint, bind="::1")
    secret = new_secret()
    server.allow(secret)
    client = DirectClient(("::1", server.start()), cert.sha256, secret)
    try:
        client.probe()
        assert client.start().startswith("127.0.0.1:")
        assert client.endpoint is not None
        host, port = client.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"over v6")
            assert sock.recv(10) == b"over v6"
    finally:
        client.close()
        server.close()
        target.close()


def test_certificate_made_once_private_and_reused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_or_create_certificate(tmp_path)
    folder = tmp_path / "direct-tls"
    for name in ("cert.pem", "key.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(first.cert_pem)
    assert isinstance(parsed.public_key(), ec.EllipticCurvePublicKey)
    assert parsed.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert first.sha256 == fingerprint(parsed.public_bytes(serialization.Encoding.DER))
    assert len(first.sha256) == 64 and first.sha256 == first.sha256.lower()
    assert load_or_create_certificate(tmp_path) == first

    (folder / "key.pem").chmod(0o644)  # loosened by someone: narrowed again, still reused
    assert load_or_create_certificate(tmp_path) == first
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600

    (folder / "cert.pem").write_bytes(b"not a certificate")
    with caplog.at_level("WARNING"):
        second = load_or_create_certificate(tmp_path)
    assert "unusable" in caplog.text
    assert second.sha256 != first.sha256
    assert load_or_create_certificate(tmp_path) == second

    other = load_or_create_certificate(tmp_path / "elsewhere")
    (folder / "key.pem").write_bytes(other.key_pem)  # a key that does not match
    third = load_or_create_certificate(tmp_path)
    assert third.sha256 not in (first.sha256, second.sha256)


# --- real llama.cpp RPC ----------------------------------------------------------------------


@pytest.fixture
def worker_path(cert: Certificate, rpc_workers: Callable[..., Worker]
                ) -> Iterator[tuple[Worker, DirectServer, DirectClient]]:
    worker = rpc_workers()
    server = DirectServer(cert, worker.endpoint, bind="127.0.0.1")
    secret = new_secret()
    server.allow(secret)
    client = DirectClient(("127.0.0.1", server.start()), cert.sha256, secret)
    client.start()
    yield worker, server, client
    client.close()
    server.close()
    assert direct_threads() == []


def test_llama_cpp_rpc_through_the_direct_path_matches_loopback(
        tiny_model: Path, worker_path: tuple[Worker, DirectServer, DirectClient]) -> None:
    worker, server, client = worker_path

    direct = greedy_on_worker(tiny_model, worker.endpoint)
    assert client.endpoint is not None
    relayed = greedy_on_worker(tiny_model, client.endpoint, client.gate.expect_pid)
    assert relayed.tokens == direct.tokens
    assert len(relayed.tokens) == 24
    assert client.stats.connections >= 1
    assert client.stats.bytes_up > 0 and client.stats.bytes_down > 0
    wait_for(lambda: server.stats.active == 0)
    assert server.stats.failed == 0


def test_the_worker_side_filters_rpc_and_cuts_off_a_holder_that_breaks_the_rules(
        tiny_model: Path, cert: Certificate, rpc_workers: Callable[..., Worker]) -> None:
    """With the worker's filter on the direct path: llama.cpp's own RPC passes unchanged
    (its buffers back in the share once it is done); a custom op, an out-of-bounds write or an
    allocation beyond the share is stopped before the worker sees it, and reported."""
    worker = rpc_workers()
    share = 64 << 20
    direct = greedy_on_worker(tiny_model, worker.endpoint)
    server = DirectServer(cert, worker.endpoint, bind="127.0.0.1")
    port = server.start()
    clients: list[DirectClient] = []
    leases: list[LeaseGuard] = []

    def new_lease() -> tuple[str, list[tuple[str, str]]]:
        """A fresh secret and filter, and a client endpoint that uses them."""
        reported: list[tuple[str, str]] = []
        secret = new_secret()

        def cut_off(peer: str, reason: str) -> None:
            reported.append((peer, reason))
            server.revoke(secret)  # what the worker does on a violation

        leases.append(LeaseGuard("holder", share, cut_off))
        server.allow(secret, leases[-1])
        clients.append(DirectClient(("127.0.0.1", port), cert.sha256, secret))
        return clients[-1].start(), reported

    try:
        endpoint, reported = new_lease()
        assert greedy_on_worker(tiny_model, endpoint,
                                clients[-1].gate.expect_pid).tokens == direct.tokens
        wait_for(lambda: server.stats.active == 0)
        assert reported == [] and leases[-1].share.used_bytes == 0
        check_each_attack_is_cut_off(new_lease, lambda: worker.proc.poll() is None,
                                     share + COMPUTE_HEADROOM_BYTES)
    finally:
        for client in clients:
            client.close()
        server.close()
    assert direct_threads() == []


def test_worker_dying_mid_generation_fails_the_engine_promptly(
        tiny_model: Path, worker_path: tuple[Worker, DirectServer, DirectClient]) -> None:
    worker, server, client = worker_path
    request = GenerateRequest(id="k", prompt="Once upon a time", max_tokens=200, temperature=0)
    assert client.endpoint is not None
    config = EngineConfig(model_path=str(tiny_model), n_ctx=256,
                          rpc_endpoints=(client.endpoint,))
    outcome, after_s = "finished", 0.0
    with Engine(config, watchdog=Watchdog(token_s=60.0)) as engine:
        client.gate.expect_pid(engine.pid)
        engine.wait_loaded()
        killed_at = 0.0
        try:
            for event in engine.generate(request):
                if isinstance(event, Token) and worker.proc.poll() is None:
                    killed_at = time.monotonic()
                    worker.kill()
        except EngineError as exc:
            outcome, after_s = type(exc).__name__, time.monotonic() - killed_at
    assert outcome != "finished"
    assert after_s < 10, f"the engine took {after_s:.1f} s to notice ({outcome})"
    wait_for(lambda: client.stats.active == 0 and server.stats.active == 0)
