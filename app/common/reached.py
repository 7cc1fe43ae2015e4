"""How the machines that served a reply were reached, in plain words: the node names those it
reaches only through a relay (`covey.relayed`, machine -> relay), and the chat footer and the
command line both say so in these words."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def reached_through(machines: Sequence[str], relayed: Mapping[str, str] | None) -> str:
    """What follows the machines' names: ", reached through office" for one machine,
    " (home2 reached through office)" for those of several (named without their layers);
    "" when all were direct."""
    through = [(m, relayed[m]) for m in machines if relayed and m in relayed]
    if not through:
        return ""
    if len(machines) == 1:
        return f", reached through {through[0][1]}"
    return " (" + "; ".join(f"{m.partition(' (')[0]} reached through {relay}"
                            for m, relay in through) + ")"
