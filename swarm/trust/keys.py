"""Every key and name the swarm uses, derived from the token with HKDF-SHA256.

Outsiders without the token cannot compute any of these, so they cannot find the swarm on the
LAN (mDNS service type), in the DHT (rendezvous keys that rotate every hour), read its ledger
(sealing key) or pass admission (admission key). `swarm_id` is the one public, displayable name.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm.trust.token import SwarmToken

RENDEZVOUS_PERIOD_S = 3600


def _hkdf(token: SwarmToken, label: str, length: int = 32) -> bytes:
    kdf = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=token.network_id,
        info=f"covey/v1/{label}".encode(),
    )
    return kdf.derive(token.secret)


@dataclass(frozen=True)
class SwarmKeys:
    swarm_id: str
    admission_key: bytes
    ledger_key: bytes
    mdns_key: bytes
    mdns_tag: bytes
    gossip_topic: str
    rendezvous_key: bytes

    @classmethod
    def derive(cls, token: SwarmToken) -> SwarmKeys:
        return cls(
            swarm_id=hashlib.sha256(b"covey/v1/swarm-id" + token.network_id).hexdigest()[:16],
            admission_key=_hkdf(token, "admission"),
            ledger_key=_hkdf(token, "ledger"),
            mdns_key=_hkdf(token, "mdns-seal"),
            mdns_tag=_hkdf(token, "mdns-tag", 8),
            gossip_topic="covey-ledger-" + _hkdf(token, "gossip-topic", 16).hex(),
            rendezvous_key=_hkdf(token, "rendezvous"),
        )

    def rendezvous(self, epoch: int) -> bytes:
        """The DHT key for one rotation period; outsiders cannot predict the next one."""
        return hmac.new(self.rendezvous_key, f"epoch:{epoch}".encode(), hashlib.sha256).digest()


def rendezvous_epochs(now: float, period_s: int = RENDEZVOUS_PERIOD_S) -> list[int]:
    """Current period first, then its neighbours: tolerates clocks a period apart at the edge."""
    epoch = int(now // period_s)
    return [epoch, epoch - 1, epoch + 1]
