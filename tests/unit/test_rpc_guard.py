"""One lease's filters: a shared share, one report per lease, and every connection ended."""

from __future__ import annotations

import struct

import pytest

from backends.ggml_rpc_wire import Cmd, frame
from swarm.workers.rpc_filter import Violation
from swarm.workers.rpc_guard import COMPUTE_HEADROOM_BYTES, LeaseGuard

SHARE = 1 << 20
LIMIT = SHARE + COMPUTE_HEADROOM_BYTES  # what a lease may allocate in all
HELLO = frame(Cmd.HELLO, bytes(24))


def alloc(size: int) -> bytes:
    return frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, size))


def test_connections_of_a_lease_draw_on_one_share_and_give_it_back() -> None:
    reported: list[tuple[str, str]] = []
    lease = LeaseGuard("peer", SHARE, lambda *r: reported.append(r))
    first, second = lease.connection(), lease.connection()
    for conn in (first, second):
        assert conn.feed(HELLO) == HELLO
    assert first.feed(alloc(LIMIT // 2)) == alloc(LIMIT // 2)
    assert lease.share.used_bytes == LIMIT // 2
    with pytest.raises(Violation):
        LeaseGuard("x", SHARE, lambda *r: None).connection().feed(HELLO + alloc(LIMIT + 1))
    first.close()  # the server frees a closed connection's buffers
    assert lease.share.used_bytes == 0
    assert second.feed(alloc(LIMIT)) == alloc(LIMIT) and reported == []


def test_the_first_violation_is_reported_once_and_ends_every_connection() -> None:
    reported: list[tuple[str, str]] = []
    lease = LeaseGuard("peer", SHARE, lambda *r: reported.append(r))
    bad, other = lease.connection(), lease.connection()
    bad.feed(HELLO)
    other.feed(HELLO)
    with pytest.raises(Violation):
        bad.feed(alloc(LIMIT + 1))
    assert reported == [("peer", f"ALLOC_BUFFER of {LIMIT + 1} bytes; {LIMIT} of the share left")]
    for step in (other.feed, other.check_reply, bad.feed):
        with pytest.raises(Violation, match="cut off"):
            step(b"\0" * 8)
    with pytest.raises(Violation):
        lease.connection().feed(HELLO)  # a connection opened late is no way round it
    assert len(reported) == 1
