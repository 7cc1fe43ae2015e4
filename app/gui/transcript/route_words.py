"""Where a reply runs and why, in plain words: the line under each reply, the model picker's
labels and the side panel's route explanations are all written here, from the same phrases, so
they agree.

The node says which route it chose and why (`covey.route_reason`, written by
swarm/routes/auto.py); these functions turn that into sentences for someone who has never heard
of "sharded" or "federated", naming the route once so the word gets explained.
"""

from __future__ import annotations

import re
from typing import Any

from app.common.chat_request import node_route
from app.common.reached import reached_through

# What each route does, in the present tense (the side panel) and the past (every footer).
_DOES = {
    "local": ("the whole model {} here", ("runs", "ran")),
    "sharded": ("each machine holds some of the model's layers", ("", "")),
    "federated": ("another machine in the swarm {} all of it", ("runs", "ran")),
}


def route_does(route: str, past: bool = False) -> str:
    text, tenses = _DOES[route]
    return text.format(tenses[past])


ROUTE_MEANING = {route: f"{route} route: {route_does(route, past=True)}" for route in _DOES}

# The side panel's label and one line on each route preference (app/common/chat_request.py).
PREFERENCE_LABELS = {"auto": "Auto", "here": "This machine", "swarm": "Swarm"}
PREFERENCE_MEANING = {
    "auto": "Covey picks this machine when the model fits in its free memory, otherwise "
            "the swarm.",
    "here": f"{route_does('local').capitalize()} (the local route); your messages never "
            "leave this machine.",
    "swarm": f"Other machines run it. Federated: {route_does('federated')}. Sharded: "
             f"{route_does('sharded')}.",
}
NOT_HERE = "cannot run: this machine does not have the model"
NOT_IN_SWARM = "cannot run: no other machine in the swarm can take it now"

# The reasons auto.py gives, first match wins (the more specific ones come first); each
# phrase follows "because".
_WHY = (
    ("asked for the local route", "this chat asks for this machine"),
    ("asked for the sharded route", "this chat asks for the swarm, split across machines"),
    ("asked for the federated route", "this chat asks for another machine in the swarm"),
    ("preferred in this node's settings", "Covey's settings prefer this route"),
    ("queue is full; spread over", "this machine was busy with other replies"),
    ("its queue is full", "it fits here, but this machine was busy, so it waited its turn"),
    ("sending prompts to other machines is off",
     "it is too big for the free memory here, and sending prompts to other machines is off"),
    ("no other machine can take it",
     "it is too big for the free memory here, and no other machine could take it"),
    ("not on this machine", "this machine does not have the model"),
    ("fits this machine", "it fits in this machine's free memory"),
    ("served by", "it is too big for the free memory here"),
    ("spread over", "it is too big for this machine's free memory alone"),
)
_MEMORY = re.compile(r"needs ([^,;()]+), ([^;()]+) free here")
_CHOSEN = re.compile(r"(?:spread over|served by) ([^;]+)$")  # the machines auto picked


def why_words(reason: str) -> str:
    """The node's `route_reason` as a plain phrase that follows "because", with its memory
    figures; an unknown reason (a newer node's) is given as the node wrote it."""
    plain = next((words for key, words in _WHY if key in reason), None)
    if plain is None:
        return reason
    memory = _MEMORY.search(reason)
    if memory and "free memory" in plain:
        plain += f" (needs {memory.group(1)}; {memory.group(2)} free)"
    return plain


def place_words(route: str, machines: list[str]) -> str:
    """Where a route runs, after "ran" or "runs": 'on this machine (desk)', 'split across w1,
    w2', 'on fed1'."""
    names = ", ".join(machines)
    if route == "local":
        return "on this machine" + (f" ({names})" if names else "")
    if route == "sharded":
        return "split across " + (names or "machines in the swarm")
    return "on " + (names or "another machine in the swarm")


def _where_and_why(route: str, machines: list[str], reason: str | None,
                   relayed: dict[str, str] | None = None) -> str:
    where = place_words(route, machines) + reached_through(machines, relayed)
    return f"{where}, because {why_words(reason)}" if reason else where


def served_line(meta: dict[str, Any]) -> str:
    """The line under a reply: 'Ran on this machine (desk), because it fits in this machine's
    free memory (needs …) · local route · 19.8 tokens/s'; a machine reached through a relay is
    named with it ('Ran on fed1, reached through office, because …')."""
    parts = []
    route = meta.get("route")
    if route:
        machines = list(meta.get("machines") or [])
        parts.append("Ran " + _where_and_why(route, machines, meta.get("route_reason"),
                                             meta.get("relayed")))
        parts.append(ROUTE_MEANING.get(route, f"{route} route"))
    elif meta.get("machines"):
        parts.append(", ".join(meta["machines"]))
    if meta.get("tokens_per_s"):
        parts.append(f"{meta['tokens_per_s']:.1f} tokens/s")
    if meta.get("stopped"):
        parts.append("stopped")
    return " · ".join(parts)


def model_choices(runnable: list[dict[str, Any]],
                  preference: str = "auto") -> list[tuple[str, str]]:
    """(model id, label) for the picker: where each model the swarm can run would run and why,
    for the conversation's route preference; under "auto" as the node's own `auto` policy says
    (in the footer's words), or guessed from its routes for an older node."""
    choices = []
    for model in runnable:
        where = model.get("covey", {})
        routes = where.get("routes", [])
        machines = where.get("machines", [])[:3]
        if preference != "auto":
            how = _preferred(node_route(preference, routes), routes)
        elif where.get("auto"):
            route, reason = where["auto"]["route"], where["auto"]["reason"]
            chosen = _CHOSEN.search(reason)
            names = chosen.group(1).split(", ") if chosen else machines
            how = "runs " + _where_and_why(route, [] if route == "local" else names, reason)
        elif "local" in routes:
            how = "runs " + place_words("local", [])
        else:
            how = "runs " + place_words("sharded" if "sharded" in routes else "federated",
                                        machines)
        choices.append((model["id"], f"{model['id']} — {how}"))
    return choices


def _preferred(route: str, routes: list[str]) -> str:
    """The picker's words for a model under the `covey_route` a preference maps to (the node
    names the machines only once it has chosen them: the footer says which)."""
    if route not in routes:
        return NOT_HERE if route == "local" else NOT_IN_SWARM
    return f"runs {place_words(route, [])}, as this chat asks"
