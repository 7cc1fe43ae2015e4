"""The ledger's rules, without any network: signatures, sealing, ownership, replay, expiry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from swarm.ledger.entries import NodeInfo
from swarm.ledger.rules import (
    DROP_AFTER_S,
    MAX_MESSAGE_BYTES,
    Entry,
    Ledger,
    Rejected,
    SignedEntry,
    is_live,
    open_entry,
    seal_entry,
    sign_entry,
)
from swarm.node.local_facts import collect_node_info
from swarm.trust.identity import Identity
from swarm.trust.seal import seal

KEY = b"k" * 32
OTHER_SWARM = b"o" * 32
NOW = 1_800_000_000.0


def identity(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def entry(who: Identity, seq: int = 1, issued_at: float = NOW, ttl: float = 30.0, **value):
    e = Entry(who.peer_id.to_base58(), "node", seq, issued_at, ttl, value or {"name": "a"})
    return sign_entry(e, who.sign)


def test_sealed_signed_entry_round_trip() -> None:
    signed = entry(identity(1))
    assert open_entry(KEY, seal_entry(KEY, signed)) == signed


def test_whole_number_times_survive_the_wire() -> None:
    who = identity(1)
    signed = sign_entry(Entry(who.peer_id.to_base58(), "node", 1, int(NOW), 0, {}), who.sign)
    assert open_entry(KEY, seal_entry(KEY, signed)) == signed


def test_other_swarm_tampering_and_garbage_are_rejected() -> None:
    message = seal_entry(KEY, entry(identity(1)))
    with pytest.raises(Rejected):
        open_entry(OTHER_SWARM, message)
    flipped = bytearray(message)
    flipped[40] ^= 1
    with pytest.raises(Rejected):
        open_entry(KEY, bytes(flipped))
    for garbage in (b"", b"\x00" * 5, b"x" * 500):
        with pytest.raises(Rejected):
            open_entry(KEY, garbage)
    # Sealed with the right key but not JSON, or JSON of the wrong shape.
    for body in (b"\xff\xfe", b"[]", b'{"entry": {}, "sig": ""}'):
        with pytest.raises(Rejected, match="malformed"):
            open_entry(KEY, seal(KEY, body, "covey-ledger-v1"))


def test_oversized_message_is_rejected_before_unsealing() -> None:
    with pytest.raises(Rejected, match="over"):
        open_entry(KEY, b"x" * (MAX_MESSAGE_BYTES + 1))


def test_forged_owner_is_rejected() -> None:
    alice, mallory = identity(1), identity(2)
    # Mallory signs an entry that claims to be Alice's.
    forged = Entry(alice.peer_id.to_base58(), "node", 99, NOW, 30.0, {"name": "evil"})
    with pytest.raises(Rejected, match="signature"):
        open_entry(KEY, seal_entry(KEY, sign_entry(forged, mallory.sign)))


def test_edited_value_breaks_the_signature() -> None:
    signed = entry(identity(1))
    edited = dataclasses.replace(signed.entry, value={"name": "changed"})
    with pytest.raises(Rejected, match="signature"):
        open_entry(KEY, seal_entry(KEY, SignedEntry(edited, signed.signature)))


def test_unknown_fields_and_bad_types_are_rejected() -> None:
    signed = entry(identity(1))
    body = json.loads(signed.to_bytes())
    body["entry"]["extra"] = 1
    with pytest.raises(Rejected, match="unknown"):
        SignedEntry.from_bytes(json.dumps(body).encode())
    body = json.loads(signed.to_bytes())
    body["padding"] = "x" * 1000  # unsigned bytes must not ride along
    with pytest.raises(Rejected, match="unknown"):
        SignedEntry.from_bytes(json.dumps(body).encode())
    body = json.loads(signed.to_bytes())
    body["entry"]["seq"] = "7"
    with pytest.raises(Rejected, match="malformed"):
        SignedEntry.from_bytes(json.dumps(body).encode())


def test_newer_seq_replaces_older_and_replays_are_refused() -> None:
    who = identity(1)
    ledger = Ledger()
    assert ledger.apply(entry(who, seq=5, name="v5"), NOW) == "accepted"
    assert ledger.apply(entry(who, seq=5, name="v5"), NOW) == "duplicate"
    assert ledger.apply(entry(who, seq=4, name="old"), NOW) == "replay"
    assert ledger.apply(entry(who, seq=6, name="v6"), NOW + 1) == "accepted"
    assert ledger.get(who.peer_id.to_base58(), "node").entry.value == {"name": "v6"}


def test_owners_cannot_touch_each_others_keys() -> None:
    a, b = identity(1), identity(2)
    ledger = Ledger()
    ledger.apply(entry(a, seq=1, name="a"), NOW)
    ledger.apply(entry(b, seq=100, name="b"), NOW)
    assert ledger.get(a.peer_id.to_base58(), "node").entry.value == {"name": "a"}
    assert len(ledger.by_key("node")) == 2


def test_stale_and_future_entries_are_refused() -> None:
    who = identity(1)
    ledger = Ledger()
    assert ledger.apply(entry(who, seq=1, issued_at=NOW - 3600), NOW) == "expired"
    assert ledger.apply(entry(who, seq=2, issued_at=NOW + 3600), NOW) == "future"
    assert ledger.records == {}


def test_heartbeat_expiry_then_drop_and_no_resurrection() -> None:
    who = identity(1)
    ledger = Ledger()
    old = entry(who, seq=1)
    ledger.apply(old, NOW)
    record = ledger.get(who.peer_id.to_base58(), "node")
    assert is_live(record, NOW + 29)
    assert not is_live(record, NOW + 30)
    assert ledger.drop_old(NOW + 30 + DROP_AFTER_S - 1) == []
    assert ledger.drop_old(NOW + 31 + DROP_AFTER_S) == [(who.peer_id.to_base58(), "node")]
    # A replay of the dropped entry does not bring the peer back.
    assert ledger.apply(old, NOW + 40) != "accepted"
    assert ledger.records == {}


def test_an_entry_that_arrives_late_is_not_made_fresher() -> None:
    who = identity(1)
    ledger = Ledger()
    ledger.apply(entry(who, seq=1, issued_at=NOW - 10), NOW)
    assert ledger.get(who.peer_id.to_base58(), "node").expires_at == NOW + 20


def test_node_info_round_trip_and_validation() -> None:
    info = collect_node_info("desk", ("worker",))
    assert info.cores >= 1 and info.ram_total > info.ram_free > 0
    assert NodeInfo.from_value(json.loads(json.dumps(info.to_value()))) == info
    for bad in ({**info.to_value(), "cores": "8"}, {**info.to_value(), "name": "x" * 500},
                {**info.to_value(), "roles": "worker"}, {**info.to_value(), "version": 9}, {}):
        with pytest.raises(ValueError):
            NodeInfo.from_value(bad)
