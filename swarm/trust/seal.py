"""Sealing: authenticated encryption of swarm messages with a key derived from the token.

ChaCha20-Poly1305 with a random 96-bit nonce. The context string is bound as associated data,
so a sealed ledger entry cannot be passed off as an mDNS record or anything else.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

NONCE_BYTES = 12
OVERHEAD = NONCE_BYTES + 16


class SealError(ValueError):
    """Not sealed with this swarm's key (another swarm, tampered with, or garbage)."""


def seal(key: bytes, plaintext: bytes, context: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context.encode())


def unseal(key: bytes, sealed: bytes, context: str) -> bytes:
    if len(sealed) < OVERHEAD:
        raise SealError("sealed message too short")
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, context.encode())
    except InvalidTag:
        raise SealError("not sealed with this swarm's key, or altered") from None
