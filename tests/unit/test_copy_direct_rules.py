"""The direct copy path's pure rules: requests and offers checked, stale offers withdrawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.node.copy_direct import (
    DirectOffer,
    DirectRefused,
    Grant,
    parse_offer,
    parse_request,
    prune,
)

SHA = "a" * 64
SECRET = "ab" * 32


def test_direct_copy_requests_are_checked() -> None:
    ok = {"version": 1, "model": "m", "sha256": SHA, "offset": 5}
    assert parse_request(json.dumps(ok).encode()) == ("m", SHA, 5)
    for bad in ({"offset": -1}, {"offset": 1.5}, {"offset": True}, {"version": 2},
                {"model": None}, {"sha256": 7}):
        with pytest.raises(ValueError):
            parse_request(json.dumps(ok | bad).encode())


def test_an_offer_is_taken_only_when_whole_and_for_the_bytes_asked() -> None:
    reply = {"ok": True, "port": 4321, "cert_sha256": SHA, "secret": SECRET, "length": 10}
    assert parse_offer(reply, "10.0.0.2", 10) == DirectOffer(
        ("10.0.0.2", 4321), SHA, bytes.fromhex(SECRET), 10)
    with pytest.raises(DirectRefused, match="this node offers no direct path"):
        parse_offer({"ok": False, "code": "no_direct_path",
                     "message": "this node offers no direct path"}, "10.0.0.2", 10)
    for bad in ({"port": 0}, {"port": "4321"}, {"secret": "zz" * 32}, {"secret": "ab"},
                {"cert_sha256": "a"}, {"length": 11}, {"ok": "yes"}):
        with pytest.raises(DirectRefused):
            parse_offer(reply | bad, "10.0.0.2", 10)
    with pytest.raises(DirectRefused):
        parse_offer(["not", "a", "dict"], "10.0.0.2", 10)


def test_expired_offers_go_then_the_oldest_past_the_cap() -> None:
    def grant(expires: float) -> Grant:
        return Grant(Path("m.gguf"), 0, 1, expires)

    grants = {b"old": grant(5.0), b"a": grant(20.0), b"b": grant(30.0), b"c": grant(40.0)}
    assert prune(grants, now=10.0, keep=5) == [b"old"]
    assert prune(grants, now=10.0, keep=2) == [b"old", b"a"]
    assert prune(grants, now=50.0, keep=2) == [b"old", b"a", b"b", b"c"]
