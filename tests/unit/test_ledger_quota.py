"""The ledger's limits, without any network: per-owner quotas at merge, the owner cap, a sync
digest that stays within its frame however many entries one member writes, forgetting old
sequence numbers, and how failed pulls are counted and warned of."""

from __future__ import annotations

import json

import pytest

from swarm.ledger import rules
from swarm.ledger.rules import (
    DROP_AFTER_S,
    FORGET_SEQ_AFTER_S,
    MAX_OWNER_BYTES,
    MAX_OWNER_CHARS,
    MAX_OWNER_ENTRIES,
    MAX_OWNERS,
    Entry,
    Ledger,
    Record,
    SignedEntry,
    Usage,
    sign_entry,
    within_quota,
)
from swarm.ledger.sync import (
    DIGEST_BOUND,
    MAX_DIGEST_BYTES,
    SYNC_VERSION,
    SYNC_VERSION_V2,
    WARN_AGAIN_S,
    SyncHealth,
    digest,
    lacking,
    owner_digest,
)
from swarm.trust.identity import Identity

NOW = 1_800_000_000.0
FLOOD = 8_200


def identity(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def signed(who: Identity, key: str, seq: int = 1, *, ttl: float = 30.0,
           issued_at: float = NOW, **value: object) -> SignedEntry:
    entry = Entry(who.peer_id.to_base58(), key, seq, issued_at, ttl, dict(value) or {"v": 1})
    return sign_entry(entry, who.sign)


def flood(ledger: Ledger, who: Identity, count: int, now: float = NOW) -> list[str]:
    # The signature is not checked by `apply` (open_entry does that), so one suffices.
    one = signed(who, "k")
    verdicts = []
    for i in range(count):
        entry = Entry(one.entry.owner, f"flood-{i:05d}", 1, NOW, 600.0, {"i": i})
        verdicts.append(ledger.apply(SignedEntry(entry, one.signature), now))
    return verdicts


def v2_request(ledger: Ledger) -> bytes:
    return json.dumps({"version": SYNC_VERSION_V2, "owners": owner_digest(ledger)}).encode()


def test_quota_arithmetic() -> None:
    full = Usage(MAX_OWNER_ENTRIES, 1000)
    assert within_quota(Usage(), True, 0, 100)
    assert not within_quota(full, True, 0, 100)  # no new slot past the entry quota
    assert within_quota(full, False, 500, 900)  # but a held slot may be replaced
    assert not within_quota(Usage(1, MAX_OWNER_BYTES - 100), False, 0, 101)
    assert within_quota(Usage(1, MAX_OWNER_BYTES - 100), False, 50, 150)


def test_one_member_flooding_is_capped_and_others_still_merge() -> None:
    flooder, honest = identity(1), identity(2)
    ledger = Ledger()
    verdicts = flood(ledger, flooder, FLOOD)
    assert verdicts.count("accepted") == MAX_OWNER_ENTRIES
    assert verdicts.count("quota") == FLOOD - MAX_OWNER_ENTRIES
    assert len(ledger.records) == MAX_OWNER_ENTRIES
    # The flood leaves room for everyone else, and the flooder can still update what it holds.
    assert ledger.apply(signed(honest, "node", name="honest"), NOW) == "accepted"
    again = Entry(flooder.peer_id.to_base58(), "flood-00000", 2, NOW, 600.0, {"i": -1})
    assert ledger.apply(SignedEntry(again, b""), NOW) == "accepted"
    assert ledger.usage[flooder.peer_id.to_base58()].slots == MAX_OWNER_ENTRIES


def test_the_byte_quota_counts_what_an_owner_holds() -> None:
    who = identity(3)
    ledger = Ledger()
    big = "x" * (15 * 1024)
    verdicts = [ledger.apply(signed(who, f"big-{i}", blob=big), NOW) for i in range(12)]
    held = sum(r.size for r in ledger.records.values())
    assert verdicts.count("accepted") == MAX_OWNER_BYTES // (15 * 1024 + 300)
    assert "quota" in verdicts and held <= MAX_OWNER_BYTES
    assert ledger.usage[who.peer_id.to_base58()].bytes == held
    # A smaller value in a held slot frees room for one more.
    assert ledger.apply(signed(who, "big-0", 2, blob="small"), NOW) == "accepted"
    assert ledger.apply(signed(who, "big-11", 2, blob=big), NOW) == "accepted"


def test_a_new_owner_is_refused_once_the_ledger_holds_the_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rules, "MAX_OWNERS", 3)
    ledger = Ledger()
    for n in (1, 2, 3):
        assert ledger.apply(signed(identity(n), "node"), NOW) == "accepted"
    assert ledger.apply(signed(identity(4), "node"), NOW) == "full"
    assert ledger.apply(signed(identity(1), "models"), NOW) == "accepted"
    # Once an owner's entries are dropped and forgotten, its place is free again.
    later = NOW + DROP_AFTER_S + FORGET_SEQ_AFTER_S + 60
    ledger.drop_old(later)
    assert ledger.apply(signed(identity(4), "node", issued_at=later), later) == "accepted"


def test_the_digest_stays_small_however_many_entries_one_member_writes() -> None:
    ledger = Ledger()
    flood(ledger, identity(1), FLOOD)
    for n in range(2, 12):
        ledger.apply(signed(identity(n), "node"), NOW)
    assert len(v2_request(ledger)) < 2048
    # What version 1 would have sent for the same 8,000 entries, had the ledger kept them.
    unbounded = {f"{'p' * 52} flood-{i:05d}": 1_800_000_000_000 + i for i in range(FLOOD)}
    assert len(json.dumps({"version": SYNC_VERSION, "have": unbounded})) > 512 * 1024
    assert len(digest(ledger)) == MAX_OWNER_ENTRIES + 10


def test_the_largest_possible_digest_fits_its_frame() -> None:
    ledger = Ledger()
    for n in range(MAX_OWNERS):
        owner = f"{n:0{MAX_OWNER_CHARS}d}"  # as long as an owner may be
        entry = Entry(owner, "node", 10**15, NOW, 30.0, {})
        ledger.records[(owner, "node")] = Record(SignedEntry(entry, b""), NOW, NOW + 30)
    size = len(v2_request(ledger))
    assert size <= DIGEST_BOUND <= MAX_DIGEST_BYTES
    assert size > DIGEST_BOUND * 0.8  # the bound is tight enough to mean something


def test_lacking_sends_whole_owners_that_differ_and_replicas_converge() -> None:
    a, b, c = identity(1), identity(2), identity(3)
    mine, theirs = Ledger(), Ledger()
    for ledger in (mine, theirs):
        ledger.apply(signed(a, "node"), NOW)
    theirs.apply(signed(b, "node"), NOW)
    theirs.apply(signed(b, "models"), NOW)
    theirs.apply(signed(a, "worker"), NOW)
    mine.apply(signed(c, "node"), NOW)
    sent = lacking(theirs, owner_digest(mine))
    assert {(s.entry.owner, s.entry.key) for s in sent} == {
        (a.peer_id.to_base58(), "node"), (a.peer_id.to_base58(), "worker"),
        (b.peer_id.to_base58(), "node"), (b.peer_id.to_base58(), "models")}
    verdicts = [mine.apply(s, NOW) for s in sent]
    assert sorted(verdicts) == ["accepted"] * 3 + ["duplicate"]
    assert lacking(theirs, owner_digest(mine)) == []  # nothing more to send
    assert set(owner_digest(mine)) == {a.peer_id.to_base58(), b.peer_id.to_base58(),
                                       c.peer_id.to_base58()}


def test_sequence_numbers_are_forgotten_only_once_no_replay_could_pass() -> None:
    who = identity(5)
    owner = who.peer_id.to_base58()
    ledger = Ledger()
    old = signed(who, "node", 7, ttl=30.0)
    ledger.apply(old, NOW)
    dropped_at = NOW + 30 + DROP_AFTER_S + 1
    assert ledger.drop_old(dropped_at) == [(owner, "node")]
    assert ledger.seen[(owner, "node")].seq == 7  # kept: a replay is still refused by seq
    assert ledger.apply(old, dropped_at) == "duplicate"
    assert ledger.usage[owner] == Usage(1, 0)
    forget_at = NOW + FORGET_SEQ_AFTER_S + 1
    ledger.drop_old(forget_at)
    assert ledger.seen == {} and ledger.usage == {}
    # Forgotten, and still not brought back: by now the old entry has expired.
    assert ledger.apply(old, forget_at) == "expired"


def test_churning_keys_cannot_grow_the_remembered_seqs() -> None:
    who = identity(6)
    ledger = Ledger()
    later = NOW + 30 + DROP_AFTER_S + 1
    for i in range(MAX_OWNER_ENTRIES):
        ledger.apply(signed(who, f"k{i}", ttl=30.0), NOW)
    ledger.drop_old(later)
    assert ledger.records == {}
    # Its dropped slots still count until forgotten: new keys are refused meanwhile.
    assert ledger.apply(signed(who, "fresh", issued_at=later), later) == "quota"
    assert ledger.apply(signed(who, "k0", 2, issued_at=later), later) == "accepted"
    assert len(ledger.seen) == MAX_OWNER_ENTRIES


def test_failed_pulls_warn_once_per_peer_and_show_in_status() -> None:
    health = SyncHealth()
    assert health.failed("peer-a", "the sync ended after 0 entries", NOW) is True
    assert health.failed("peer-a", "again", NOW + 10) is False
    assert health.failed("peer-b", "timeout", NOW + 11) is True
    assert health.failed("peer-a", "still", NOW + WARN_AGAIN_S + 1) is True
    status = health.to_status(Ledger())
    assert status["sync_failures"] == 4
    assert status["last_sync_error"] == "still" and status["last_sync_error_peer"] == "peer-a"
    assert status["last_sync_error_at"] == NOW + WARN_AGAIN_S + 1
    assert status["last_sync_ok_at"] is None
    assert health.succeeded("peer-a", NOW + 700) is True
    assert health.succeeded("peer-a", NOW + 710) is False
    assert health.to_status(Ledger())["last_sync_ok_at"] == NOW + 710
