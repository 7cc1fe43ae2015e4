"""This node's identity: an Ed25519 key kept in the data directory, so its peer id survives
restarts. The file is created with mode 0600; a wider mode is narrowed and logged.

Also the signing helpers the ledger uses: the peer id of an Ed25519 key embeds the public key,
so a signature can be checked against the owner's peer id alone.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from swarm.trust.private_file import narrow_mode, write_private

KEY_FILE = "node-key.json"
KEY_FILE_VERSION = 1


class IdentityError(Exception):
    """The key file exists but cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Identity:
    seed: bytes

    @property
    def key_pair(self) -> KeyPair:
        private = Ed25519PrivateKey.from_bytes(self.seed)
        return KeyPair(private, private.get_public_key())

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    def sign(self, data: bytes) -> bytes:
        return Ed25519PrivateKey.from_bytes(self.seed).sign(data)


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` over `data` was made by the Ed25519 key inside `peer_id`."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # noqa: BLE001 - malformed ids raise assorted errors
        return False
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        return bool(key.verify(data, signature))
    except Exception:  # noqa: BLE001
        return False


def load_or_create_identity(data_dir: Path) -> Identity:
    path = data_dir / KEY_FILE
    if not path.exists():
        identity = Identity(Ed25519PrivateKey.new().to_bytes())
        body = {"version": KEY_FILE_VERSION, "type": "ed25519",
                "seed": base64.b64encode(identity.seed).decode()}
        write_private(path, json.dumps(body).encode())
        return identity
    narrow_mode(path)
    try:
        body = json.loads(path.read_text())
        if body.get("version") != KEY_FILE_VERSION or body.get("type") != "ed25519":
            raise ValueError("unknown version or key type")
        seed = base64.b64decode(body["seed"], validate=True)
        if len(seed) != 32:
            raise ValueError("seed is not 32 bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IdentityError(
            f"{path} is damaged ({exc}). Move it away to start with a new identity; "
            "other nodes will then see this machine as a new peer."
        ) from None
    return Identity(seed)
