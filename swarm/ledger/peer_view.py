"""What the API and `covey peers` show about each peer, computed from the ledger (pure)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from swarm.ledger.entries import (
    MODELS_KEY,
    NODE_KEY,
    WORKER_KEY,
    NodeInfo,
    SharedModel,
    WorkerEntry,
    parse_shared,
    read,
)
from swarm.ledger.rules import Ledger, is_live

log = logging.getLogger(__name__)


def peers_view(
    ledger: Ledger, self_id: str, connected: Collection[str], now: float,
    links: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per peer with a valid "node" entry, this node included and flagged "self".

    "link" says how a connected peer is reached ("direct", "hole-punched", "UPnP", "relayed
    via NAME"; from `links`), None for this node and for peers not connected."""
    rows = []
    for record in ledger.by_key(NODE_KEY):
        entry = record.entry
        try:
            info = NodeInfo.from_value(entry.value)
        except ValueError as exc:
            log.debug("ignoring node entry of %s: %s", entry.owner, exc)
            continue
        rows.append(
            {
                "peer_id": entry.owner,
                **info.to_value(),
                "self": entry.owner == self_id,
                "online": entry.owner == self_id or is_live(record, now),
                "connected": entry.owner in connected,
                "link": (links or {}).get(entry.owner) if entry.owner in connected else None,
                "last_seen": round(record.received_at, 3),
                "worker": _worker(ledger, entry.owner, now),
                "shares_models": [m.name for m in _shared(ledger, entry.owner, now)],
            }
        )
    rows.sort(key=lambda r: (not r["self"], r["name"], r["peer_id"]))
    return rows


def _worker(ledger: Ledger, owner: str, now: float) -> dict[str, Any] | None:
    """What the peer donates as a worker, while worker mode is on there."""
    record = ledger.get(owner, WORKER_KEY)
    if record is None or not is_live(record, now):
        return None
    offer = read(WorkerEntry.from_value, record.entry.value)
    if offer is None:
        return None
    view: dict[str, Any] = {"donated_bytes": offer.donated_bytes, "state": offer.state,
                            "leased_by": offer.leased_by}
    if offer.waiting and offer.free_within_s is not None:  # only while members wait
        # Counted from when the worker published it.
        age = max(0.0, now - record.entry.issued_at)
        view["waiting"] = offer.waiting
        view["free_within_s"] = max(0, round(offer.free_within_s - age))
    return view


def _shared(ledger: Ledger, owner: str, now: float) -> list[SharedModel]:
    record = ledger.get(owner, MODELS_KEY)
    if record is None or not is_live(record, now):
        return []
    return parse_shared(record.entry.value)
