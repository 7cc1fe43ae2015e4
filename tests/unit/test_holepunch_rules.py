"""Hole punching, the pure parts: who initiates, which address each side predicts and dials,
the coordination messages, how long the initiator waits, the bounded retries, and the word a
hole-punched link shows (the peers table: tests/unit/test_reach_rules.py)."""

from __future__ import annotations

import pytest

from swarm.net.holepunch import (
    MAX_ATTEMPTS,
    RETRY_S,
    Attempts,
    Observed,
    PunchMessage,
    dial_targets,
    initiates,
    listen_source,
    predicted_addrs,
    sync_wait,
)
from swarm.net.reach import link_label
from swarm.trust.identity import Identity

A, B = (Identity(bytes([n]) * 32) for n in (1, 2))


def test_exactly_one_side_initiates() -> None:
    a, b = A.peer_id.to_base58(), B.peer_id.to_base58()
    assert initiates(a, b) != initiates(b, a)


def test_the_prediction_is_the_observed_ip_with_the_listen_port() -> None:
    # The relay saw us from an ephemeral port; the punch dials from (and to) the listen port.
    assert predicted_addrs(["198.51.100.11", "198.51.100.11"], 4003) == (
        "/ip4/198.51.100.11/tcp/4003",)
    assert predicted_addrs([], 4003) == ()
    listening = ["/ip4/127.0.0.1/tcp/9", f"/ip4/192.168.1.2/tcp/4003/p2p/{A.peer_id}"]
    assert listen_source(listening) == ("192.168.1.2", 4003)
    assert listen_source(["/ip4/127.0.0.1/tcp/9", "/ip6/::1/tcp/9"]) is None


def test_only_ipv4_tcp_non_loopback_offers_are_dialled() -> None:
    targets = dial_targets(["/ip4/198.51.100.12/tcp/4001", "/ip4/127.0.0.1/tcp/4001",
                            "/ip6/::1/tcp/1", "garbage", *["/ip4/10.0.0.1/tcp/1"] * 20])
    assert [str(t) for t in targets[:1]] == ["/ip4/198.51.100.12/tcp/4001"]
    assert len(targets) <= 8 and all("127.0.0.1" not in str(t) for t in targets)


def test_messages_round_trip_and_refuse_garbage() -> None:
    msg = PunchMessage("connect", ("/ip4/198.51.100.12/tcp/4001",))
    assert PunchMessage.from_value(msg.to_value(), "connect") == msg
    with pytest.raises(ValueError):
        PunchMessage.from_value(msg.to_value(), "sync")  # out of order
    with pytest.raises(ValueError):
        PunchMessage.from_value({**msg.to_value(), "version": 2}, "connect")
    with pytest.raises(ValueError):
        PunchMessage.from_value({"version": 1, "type": "connect", "addrs": [1]}, "connect")
    seen = Observed("/ip4/198.51.100.11/tcp/51234")
    assert Observed.from_value(seen.to_value()) == seen
    with pytest.raises(ValueError):
        Observed.from_value({"version": 1, "addr": "/dns4/example.com/tcp/1"})


def test_the_initiator_waits_half_the_round_trip() -> None:
    assert sync_wait(0.2) == pytest.approx(0.1)
    assert sync_wait(-1) == 0 and sync_wait(60) <= 5


def test_attempts_are_bounded_and_spaced() -> None:
    now = [0.0]
    attempts, peer = Attempts(clock=lambda: now[0]), A.peer_id
    assert attempts.due(peer)
    for _ in range(MAX_ATTEMPTS):
        assert attempts.due(peer)
        attempts.tried(peer)
        assert not attempts.due(peer)  # not again at once
        now[0] += RETRY_S
    assert not attempts.due(peer)  # given up: the connection stays relayed
    attempts.forget(keep=[])  # the peer went away; when it is back, punching starts anew
    assert attempts.due(peer)


def test_a_hole_punched_link_says_so() -> None:
    assert link_label(None, punched=True) == "hole-punched"
    assert link_label(None) == "direct" and link_label("office", True) == "relayed via office"


def test_the_answering_side_bounds_what_a_member_can_ask() -> None:
    # A member asking this node to punch over and over gets MAX_ATTEMPTS answers per
    # connection, each at least RETRY_S / 2 after the last: the node does not dial at will.
    now = [0.0]
    answered, peer = Attempts(clock=lambda: now[0], retry_s=RETRY_S / 2), A.peer_id
    answers = 0
    for _ in range(100):  # a request every 0.5 s for 50 s
        if answered.due(peer):
            answered.tried(peer)
            answers += 1
        now[0] += 0.5
    assert answers == MAX_ATTEMPTS
    # An honest initiator's retry, a little more than RETRY_S after its last, is answered.
    honest = Attempts(clock=lambda: now[0], retry_s=RETRY_S / 2)
    honest.tried(peer)
    now[0] += RETRY_S + 0.1
    assert honest.due(peer)
