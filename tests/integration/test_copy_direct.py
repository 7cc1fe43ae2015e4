"""The sending end of model copies over the direct TLS path, on loopback: a grant's bytes and
no more, one connection per secret (a replay is refused), wrong secrets, stale offers and plain
TCP get nothing, and the sender goes on serving after each."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.node.copy_direct import MAX_GRANTS, CopySender, Grant, receive
from swarm.workers.direct_tls import (
    Certificate,
    DirectUnavailable,
    connect,
    load_or_create_certificate,
    new_secret,
)

pytestmark = pytest.mark.processes


@pytest.fixture
def cert(tmp_path: Path) -> Certificate:
    return load_or_create_certificate(tmp_path)


@pytest.fixture
def sender(cert: Certificate) -> Iterator[CopySender]:
    server = CopySender(cert, "127.0.0.1", None)
    server.start()
    yield server
    server.close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(os.urandom(3 << 20))
    return path


def fetch(sender: CopySender, cert: Certificate, secret: bytes, length: int) -> bytes:
    got = bytearray()
    tls = connect(("127.0.0.1", sender.port), cert.sha256, secret, timeout=5)
    try:
        receive(tls, length, got.extend)
    finally:
        tls.sock.close()
    return bytes(got)


def test_a_grant_gives_its_bytes_once(sender: CopySender, cert: Certificate,
                                      model: Path) -> None:
    offset = 1000
    length = model.stat().st_size - offset
    secret = sender.offer(Grant(model, offset, length, time.monotonic() + 30))
    assert fetch(sender, cert, secret, length) == model.read_bytes()[offset:]
    with pytest.raises(DirectUnavailable, match="refused the connection"):
        fetch(sender, cert, secret, length)  # replayed: one connection per secret
    counters = sender.stats.counters()
    assert counters["bytes_down"] == length and counters["refused"] == 1, counters


def test_wrong_or_stale_secrets_and_plain_tcp_get_nothing(sender: CopySender,
                                                        cert: Certificate,
                                                        model: Path) -> None:
    size = model.stat().st_size
    with pytest.raises(DirectUnavailable, match="refused the connection"):
        fetch(sender, cert, new_secret(), size)
    stale = sender.offer(Grant(model, 0, size, time.monotonic() - 1))
    with pytest.raises(DirectUnavailable):
        fetch(sender, cert, stale, size)
    with socket.create_connection(("127.0.0.1", sender.port), timeout=5) as plain:
        plain.sendall(b"\x16\x03\x01" + os.urandom(300))
        try:
            got = plain.recv(65536)
        except ConnectionResetError:
            got = b""
    assert got == b""
    assert sender.stats.counters()["bytes_down"] == 0
    # The sender is still up: a fresh offer is served.
    secret = sender.offer(Grant(model, 0, size, time.monotonic() + 30))
    assert fetch(sender, cert, secret, size) == model.read_bytes()


def test_offers_not_taken_up_are_withdrawn(sender: CopySender, cert: Certificate,
                                           model: Path) -> None:
    old = sender.offer(Grant(model, 0, 10, time.monotonic() - 1))
    sender.offer(Grant(model, 0, 10, time.monotonic() + 30))  # prunes the expired one
    assert old not in sender.grants
    with pytest.raises(DirectUnavailable, match="refused the connection"):
        fetch(sender, cert, old, 10)


def test_surplus_offers_are_withdrawn_oldest_first(sender: CopySender, cert: Certificate,
                                                   model: Path) -> None:
    live = time.monotonic() + 30
    first = sender.offer(Grant(model, 0, 10, live))
    for i in range(1, MAX_GRANTS + 2):  # later offers expire later
        sender.offer(Grant(model, 0, 10, live + i))
    assert first not in sender.grants and len(sender.grants) == MAX_GRANTS + 1
    with pytest.raises(DirectUnavailable, match="refused the connection"):
        fetch(sender, cert, first, 10)


def test_a_copy_under_way_outlives_its_offer(cert: Certificate, model: Path) -> None:
    # Paced to 1 MiB/s, the 3 MiB copy takes about 3 s; its offer expires after 1 s and is
    # pruned by later offers while the bytes still flow: the copy must not be cut.
    server = CopySender(cert, "127.0.0.1", 1 << 20)
    server.start()
    try:
        size = model.stat().st_size
        secret = server.offer(Grant(model, 0, size, time.monotonic() + 1.0))
        got: list[bytes | BaseException] = []

        def copy() -> None:
            try:
                got.append(fetch(server, cert, secret, size))
            except BaseException as exc:  # noqa: BLE001 - reported below
                got.append(exc)

        thread = threading.Thread(target=copy)
        thread.start()
        time.sleep(1.5)  # taken up, and now expired
        assert thread.is_alive(), got
        for _ in range(3):
            server.offer(Grant(model, 0, 10, time.monotonic() + 30))  # each prunes
        assert secret not in server.grants
        thread.join(30)
        assert got == [model.read_bytes()], [type(g) for g in got]
    finally:
        server.close()
