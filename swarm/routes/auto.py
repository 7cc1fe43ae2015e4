"""Which route serves a request, and why: a pure policy over facts the node gathers.

`auto`, in order: the route the user's settings prefer, when it can serve; this machine, when
the model is here, fits its free memory and its engine is not busy beyond its queue; a
federated node that serves the model; the fewest workers that can hold it (sharded); this
machine anyway. A federated offer is a member's word, so `auto` never trusts one for a model
that fits here: such a model leaves this machine only over leased workers, when the queue
here is full. With "send prompts to other machines" off, only this machine serves, and an
explicit federated or sharded request is refused naming the setting.

`decide` returns the route's name with a reason the client shows (`covey.route_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.sizes import human_bytes
from swarm.routes.route import ModelUnknown, RouteError

REMOTE_ROUTES = ("federated", "sharded")
PREFERABLE = ("auto", "local", "federated", "sharded")
REMOTE_SETTING = "remote_prompts"


class RouteForbidden(RouteError):
    """The user's settings forbid this route."""

    status = 403
    code = "route_forbidden"


@dataclass(frozen=True)
class RoutePrefs:
    """What the user chose: whether prompts may go to other machines, and a route `auto`
    tries first (`auto`: none)."""

    remote_prompts: bool = True
    prefer: str = "auto"


@dataclass(frozen=True)
class RouteFacts:
    """What the node knows about serving `model` now."""

    model: str
    here: bool  # this machine's store has it (or it is the bundled default)
    need_bytes: int | None  # its memory estimate; None: unknown yet (the bundled default)
    free_bytes: int  # this machine's available memory, counting what its engine would free
    queue_full: bool = False  # this machine's engine would answer "busy"
    federated: tuple[str, ...] = ()  # the federated nodes that serve it
    sharded: tuple[str, ...] = ()  # the fewest workers that can hold it now (empty: none)
    sharded_why_not: str | None = None  # why it cannot be sharded, when this node has it


@dataclass(frozen=True)
class RouteChoice:
    route: str
    reason: str


def fits(need_bytes: int | None, free_bytes: int) -> bool:
    """Whether a model needing `need_bytes` fits in `free_bytes` (unknown: the bundled default,
    a few hundred MB, which every machine Covey runs on holds)."""
    return need_bytes is None or need_bytes <= free_bytes


def memory_note(need_bytes: int | None, free_bytes: int) -> str:
    need = "an unknown amount" if need_bytes is None else human_bytes(need_bytes)
    return f"needs {need}, {human_bytes(free_bytes)} free here"


def decide(requested: str, facts: RouteFacts, prefs: RoutePrefs = RoutePrefs()) -> RouteChoice:
    """The route for a request asking for `requested`; raises RouteForbidden, ModelUnknown or
    RouteError with a message for the client."""
    if requested in REMOTE_ROUTES and not prefs.remote_prompts:
        raise RouteForbidden(
            f"the {requested} route sends prompts to other machines, which this node's "
            f"settings forbid ({REMOTE_SETTING} is off; `covey node --remote-prompts` "
            "turns it on)")
    if requested != "auto":
        if not _serves(requested, facts):
            if requested == "sharded" and facts.sharded_why_not:
                raise RouteError(facts.sharded_why_not)
            raise ModelUnknown(f"model {facts.model!r} is not served by the {requested} route")
        return RouteChoice(requested, f"asked for the {requested} route")
    return _auto(facts, prefs)


def _serves(route: str, facts: RouteFacts) -> bool:
    return {"local": facts.here, "federated": bool(facts.federated),
            "sharded": bool(facts.sharded)}[route]


def _allowed(route: str, prefs: RoutePrefs) -> bool:
    return prefs.remote_prompts or route not in REMOTE_ROUTES


def _auto(facts: RouteFacts, prefs: RoutePrefs) -> RouteChoice:
    if prefs.prefer != "auto" and _allowed(prefs.prefer, prefs) and _serves(prefs.prefer, facts):
        return RouteChoice(prefs.prefer,
                           f"the {prefs.prefer} route is preferred in this node's settings")
    memory = memory_note(facts.need_bytes, facts.free_bytes)
    fits_here = facts.here and fits(facts.need_bytes, facts.free_bytes)
    if fits_here and not facts.queue_full:
        return RouteChoice("local", f"fits this machine ({memory})")
    if fits_here:
        # Busy here: workers (leased, checked against their machines' RAM) may take the
        # overflow; a federated offer is not trusted for a model this machine can run.
        if prefs.remote_prompts and facts.sharded:
            return RouteChoice("sharded", "fits this machine but its queue is full; spread "
                               f"over {', '.join(facts.sharded)}")
        return RouteChoice("local", f"fits this machine ({memory}); its queue is full")
    why = memory if facts.here else "not on this machine"
    if not prefs.remote_prompts:
        if facts.here:
            return RouteChoice("local", f"{why}; runs here anyway: sending prompts to other "
                               f"machines is off ({REMOTE_SETTING})")
        if facts.federated or facts.sharded:
            raise RouteForbidden(
                f"model {facts.model!r} is only on other machines, and this node's settings "
                f"forbid sending prompts to them ({REMOTE_SETTING} is off)")
    elif facts.federated:
        return RouteChoice("federated", f"{why}; served by {', '.join(facts.federated)}")
    elif facts.sharded:
        return RouteChoice("sharded", f"{why}; spread over {', '.join(facts.sharded)}")
    if facts.here:
        return RouteChoice("local", f"{why}, and no other machine can take it; runs here "
                           "anyway")
    raise ModelUnknown(f"the model {facts.model!r} does not exist in this swarm")
