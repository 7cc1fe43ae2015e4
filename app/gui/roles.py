"""This machine's roles in the swarm (worker, federated) as the user chose them, and the words
that tell the user when they change.

The node forgets its roles when it stops; the app remembers the user's choice in its settings
and asks the node for it again after every start. These pure functions compare what the node
reports with what the user chose, so the controller and both switches (tray, Swarm page) agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from backends.sizes import human_bytes

Role = Literal["worker", "federated"]  # also the field of Roles and the node's POST /api/<role>


@dataclass(frozen=True)
class Roles:
    """Which roles are on: what a node reports, or what the user chose."""

    worker: bool = False
    federated: bool = False


def roles_of(status: dict[str, Any]) -> Roles:
    """The roles on in GET /api/status."""
    return Roles(worker=bool((status.get("worker") or {}).get("enabled")),
                 federated=bool((status.get("federated") or {}).get("enabled")))


def missing(chosen: Roles, running: Roles) -> Roles:
    """The roles the user chose that the node does not have on (after a restart, say).

    Only switching on is restored: a role a node was started with by hand (`covey node
    --worker` in a terminal) is the user's choice too, and is left alone.
    """
    return Roles(worker=chosen.worker and not running.worker,
                 federated=chosen.federated and not running.federated)


def worker_words(on: bool, share_mib: int | None) -> str:
    if not on:
        return "Worker mode is off: this machine lends no memory."
    share = human_bytes(share_mib << 20) if share_mib else "half its memory"
    return f"Worker mode is on: this machine lends {share} to the swarm."


def federated_words(on: bool, model: str) -> str:
    if not on:
        return "Federated mode is off: this machine answers only its own chats."
    return f"Federated mode is on: this machine answers other machines' requests for {model}."


def change_message(before: Roles, after: Roles, asked: Roles | None) -> str:
    """One line for a change in what the node reports; `asked` is what the user last asked
    for (None: nothing pending), so a change nobody asked for says so."""
    changed = [(name, now) for name, was, now in
               (("Worker mode", before.worker, after.worker),
                ("Federated mode", before.federated, after.federated)) if was != now]
    if not changed:
        return ""
    words = " and ".join(f"{name} {'on' if now else 'off'}" for name, now in changed)
    if asked == after:
        return f"{words}."
    return f"{words}: the node changed it (it restarted, or a role stopped by itself)."
