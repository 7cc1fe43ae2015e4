"""Discovery's and the API's pure parts: sealed mDNS records, whom to dial, what to advertise,
what `/api/peers` shows."""

from __future__ import annotations

import multiaddr
from libp2p.peer.peerinfo import PeerInfo

from swarm.ledger.entries import NODE_KEY
from swarm.ledger.peer_view import peers_view
from swarm.ledger.rules import Entry, Ledger, sign_entry
from swarm.net.discovery import dial_candidates, mdns_record, read_mdns_record
from swarm.node.daemon import expand_wildcards
from swarm.node.local_facts import collect_node_info
from swarm.trust.identity import Identity
from swarm.trust.keys import SwarmKeys
from swarm.trust.token import new_token

KEYS = SwarmKeys.derive(new_token())
OTHER = SwarmKeys.derive(new_token())
A, B, C = (Identity(bytes([n]) * 32) for n in (1, 2, 3))


def test_mdns_record_round_trip_and_other_swarms_learn_nothing() -> None:
    addrs = [f"/ip4/10.0.0.5/tcp/4001/p2p/{A.peer_id}"]
    record = mdns_record(KEYS, A.peer_id.to_base58(), addrs)
    info = read_mdns_record(KEYS, record)
    assert info is not None and info.peer_id == A.peer_id
    assert [str(a) for a in info.addrs] == ["/ip4/10.0.0.5/tcp/4001"]
    assert A.peer_id.to_base58().encode() not in record and b"10.0.0.5" not in record
    assert read_mdns_record(OTHER, record) is None
    # An address naming another peer is not dialled as this one's.
    mixed = mdns_record(KEYS, A.peer_id.to_base58(),
                        [f"/ip4/10.0.0.9/tcp/1/p2p/{B.peer_id}", "/ip4/10.0.0.5/tcp/2"])
    assert [str(a) for a in read_mdns_record(KEYS, mixed).addrs] == ["/ip4/10.0.0.5/tcp/2"]
    for garbage in (b"", b"x" * 100, record[:-1], record[:20] + b"\x00" + record[21:]):
        assert read_mdns_record(KEYS, garbage) is None


def test_dial_candidates_skip_self_connected_banned_and_duplicates() -> None:
    def info(who: Identity) -> PeerInfo:
        return PeerInfo(who.peer_id, [multiaddr.Multiaddr("/ip4/10.0.0.1/tcp/1")])

    found = [info(A), info(B), info(B), info(C)]
    chosen = dial_candidates(found, me=A.peer_id, connected=lambda p: p == C.peer_id,
                             banned=lambda p: False)
    assert [i.peer_id for i in chosen] == [B.peer_id]
    assert dial_candidates(found, A.peer_id, lambda p: False, lambda p: p == B.peer_id) == [
        found[3]
    ]


def test_wildcard_listen_addresses_are_advertised_as_concrete_ones() -> None:
    out = expand_wildcards([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4001"),
                            multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/5")])
    texts = [str(a) for a in out]
    assert "/ip4/127.0.0.1/tcp/5" in texts
    assert texts and not any("0.0.0.0" in t for t in texts)
    assert all(t.endswith("/tcp/4001") for t in texts if t != "/ip4/127.0.0.1/tcp/5")


def test_peers_view_marks_self_online_offline_and_connected() -> None:
    ledger = Ledger()
    now = 1_800_000_000.0
    for who, name, issued in ((A, "me", now), (B, "desk", now), (C, "attic", now - 100)):
        value = {**collect_node_info(name, ()).to_value()}
        entry = Entry(who.peer_id.to_base58(), NODE_KEY, 1, issued, 30.0, value)
        ledger.apply(sign_entry(entry, who.sign), now if who is not C else now - 100)
    bogus = Entry(B.peer_id.to_base58(), "other", 1, now, 30.0, {"name": 5})
    ledger.apply(sign_entry(bogus, B.sign), now)
    rows = peers_view(ledger, A.peer_id.to_base58(), {B.peer_id.to_base58()}, now)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows][0] == "me" and by_name["me"]["self"]
    assert by_name["desk"]["online"] and by_name["desk"]["connected"]
    assert not by_name["attic"]["online"] and not by_name["attic"]["connected"]
    assert set(by_name) == {"me", "desk", "attic"}
