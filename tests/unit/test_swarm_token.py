"""The swarm token and the keys derived from it: round trips and every parse error."""

from __future__ import annotations

import pytest

from swarm.trust.keys import SwarmKeys, rendezvous_epochs
from swarm.trust.token import SwarmToken, TokenError, new_token, parse_token

PEER = "12D3KooWQmFrL4fjJkVp1YyYKCzZXXkG5HNW2bqtJb2SqCoEAbpg"
BOOT = f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER}"


def test_round_trip_with_and_without_bootstrap() -> None:
    for token in (new_token(), new_token([BOOT, f"/dns4/office.example/tcp/9/p2p/{PEER}"])):
        text = token.encode()
        assert text.startswith("covey1")
        assert text == text.strip() and " " not in text
        assert parse_token(text) == token


def test_pasted_with_line_breaks_and_spaces() -> None:
    token = new_token([BOOT])
    text = token.encode()
    wrapped = "  " + text[:30] + "\n" + text[30:60] + " \r\n" + text[60:] + "\n"
    assert parse_token(wrapped) == token


def test_two_new_tokens_differ() -> None:
    a, b = new_token(), new_token()
    assert a.network_id != b.network_id and a.secret != b.secret


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda t: "", "empty"),
        (lambda t: "hello world", "not a Covey swarm token"),
        (lambda t: "covey2" + t[6:], "format version 2"),
        (lambda t: "covey" + t[6:], "format version"),
        (lambda t: t[:6], "truncated"),
        (lambda t: t[:-8], "truncated"),
        (lambda t: t[:40], "truncated"),
        (lambda t: t + "q", "length is wrong"),
        (lambda t: t[:20] + "!" + t[21:], "position 21"),
        (lambda t: t[:20] + "1" + t[21:], "cannot be in a token"),
        (lambda t: t[:30] + ("a" if t[30] != "a" else "b") + t[31:], "damaged"),
    ],
)
def test_each_parse_error_names_the_problem(mangle, words) -> None:
    text = new_token([BOOT]).encode()
    with pytest.raises(TokenError, match=words):
        parse_token(mangle(text))


def test_wrong_lengths_inside_a_well_framed_token() -> None:
    short_id = SwarmToken(b"x" * 8, b"s" * 32).encode()
    with pytest.raises(TokenError, match="network id is 8 bytes"):
        parse_token(short_id)
    short_secret = SwarmToken(b"x" * 16, b"s" * 31).encode()
    with pytest.raises(TokenError, match="secret is 31 bytes"):
        parse_token(short_secret)


@pytest.mark.parametrize(
    ("addr", "words"),
    [
        ("not an address", "not a multiaddr"),
        (f"/udp/5/p2p/{PEER}", "must start with"),
        (f"/ip4/10.0.0.1/udp/5/p2p/{PEER}", "/tcp/PORT"),
        ("/ip4/10.0.0.1/tcp/4001", "must end with /p2p/"),
        (f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}", "0.0.0.0"),
    ],
)
def test_bad_bootstrap_addresses(addr: str, words: str) -> None:
    with pytest.raises(TokenError, match=words):
        new_token([addr])
    # Also inside a token made by something other than `new_token`.
    forged = SwarmToken(b"n" * 16, b"s" * 32, (addr,)).encode()
    with pytest.raises(TokenError, match="Bootstrap address 1"):
        parse_token(forged)


def test_derived_keys_are_distinct_and_depend_on_the_token() -> None:
    token = new_token()
    keys = SwarmKeys.derive(token)
    again = SwarmKeys.derive(parse_token(token.encode()))
    other = SwarmKeys.derive(new_token())
    assert keys == again
    secrets = [keys.admission_key, keys.ledger_key, keys.mdns_key, keys.rendezvous_key]
    assert len(set(secrets)) == 4
    assert keys.swarm_id != other.swarm_id and keys.gossip_topic != other.gossip_topic
    assert keys.mdns_tag != other.mdns_tag and keys.admission_key != other.admission_key
    # The public swarm id reveals nothing usable: it is not any of the secrets.
    assert all(keys.swarm_id.encode() not in s.hex().encode() for s in secrets)


def test_rendezvous_keys_rotate() -> None:
    keys = SwarmKeys.derive(new_token())
    now = 1_800_000_000.0
    current, previous, following = rendezvous_epochs(now)
    assert previous == current - 1 and following == current + 1
    assert rendezvous_epochs(now + 3600)[0] == current + 1
    assert keys.rendezvous(current) != keys.rendezvous(current + 1)
    assert keys.rendezvous(current) == keys.rendezvous(current)
