"""Admission: both peers prove they hold the swarm token before any Covey protocol answers.

A three-message challenge-response keyed with the token's admission key and bound to both
peer ids (which Noise has already authenticated), so a proof cannot be replayed to another
peer, reflected back, or relayed by a man in the middle. This module is the pure part: message
layout and MACs. `swarm.host` runs it over a libp2p stream.

    initiator -> responder   HELLO = magic | nonce_i
    responder -> initiator   nonce_r | mac(responder)
    initiator -> responder   mac(initiator)
    responder -> initiator   one byte: 1 admitted
"""

from __future__ import annotations

import hashlib
import hmac
import os

PROTOCOL_ID = "/covey/admission/1.0.0"
MAGIC = b"CVA1"
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
CHALLENGE_BYTES = NONCE_BYTES + MAC_BYTES
ADMITTED = b"\x01"


class AdmissionFailed(Exception):
    """The other side did not prove it holds the token (or spoke garbage)."""


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(
    key: bytes, role: str, initiator: bytes, responder: bytes, nonce_i: bytes, nonce_r: bytes
) -> bytes:
    """The MAC one side sends; `role` is "initiator" or "responder" so proofs never mirror."""
    if role not in ("initiator", "responder"):
        raise ValueError(role)
    msg = b"|".join([b"covey-admission-v1", role.encode(), initiator, responder, nonce_i, nonce_r])
    return hmac.new(key, msg, hashlib.sha256).digest()


def hello(nonce_i: bytes) -> bytes:
    return MAGIC + nonce_i


def parse_hello(data: bytes) -> bytes:
    if len(data) != HELLO_BYTES or not data.startswith(MAGIC):
        raise AdmissionFailed("not a Covey admission hello")
    return data[len(MAGIC) :]


def check(expected: bytes, received: bytes) -> None:
    if not hmac.compare_digest(expected, received):
        raise AdmissionFailed("wrong proof: the peer does not hold this swarm's token")
