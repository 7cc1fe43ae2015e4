"""Admission proofs: bound to the key, both peer ids, both nonces and the role."""

from __future__ import annotations

import pytest

from swarm.net.admission import (
    AdmissionFailed,
    check,
    hello,
    new_nonce,
    parse_hello,
    proof,
)

KEY = b"a" * 32
ALICE, BOB, EVE = b"alice-id", b"bob-id", b"eve-id"


def test_matching_proofs_pass() -> None:
    ni, nr = new_nonce(), new_nonce()
    check(proof(KEY, "responder", ALICE, BOB, ni, nr), proof(KEY, "responder", ALICE, BOB, ni, nr))


@pytest.mark.parametrize(
    "changed",
    [
        dict(key=b"b" * 32),
        dict(role="initiator"),
        dict(initiator=EVE),
        dict(responder=EVE),
        dict(nonce_i=b"\x00" * 32),
        dict(nonce_r=b"\x00" * 32),
    ],
)
def test_a_proof_for_anything_else_fails(changed: dict) -> None:
    args = dict(key=KEY, role="responder", initiator=ALICE, responder=BOB,
                nonce_i=b"\x01" * 32, nonce_r=b"\x02" * 32)
    good = proof(**args)
    with pytest.raises(AdmissionFailed):
        check(good, proof(**{**args, **changed}))


def test_hello_round_trip_and_garbage() -> None:
    nonce = new_nonce()
    assert parse_hello(hello(nonce)) == nonce
    for garbage in (b"", b"GET / HTTP/1.1\r\n\r\n" + b"x" * 18, b"CVA2" + nonce, hello(nonce)[:-1]):
        with pytest.raises(AdmissionFailed):
            parse_hello(garbage)
