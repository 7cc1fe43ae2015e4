"""How long ago something happened, as the GUI and the CLI write it.

One choice of unit (seconds under a minute, minutes under an hour, then hours) in two
spellings: words for the GUI's labels, and a compact one for the CLI's tables.
"""

from __future__ import annotations

NOW_S = 5  # the GUI's labels refresh every few seconds: anything younger is "now"


def ago(seconds: float, *, compact: bool = False) -> str:
    """ "30 s ago", "5 min ago", "2 h ago" ("now" under NOW_S); compact: "3s ago", "5m ago"."""
    s = max(0, int(seconds))
    if s < 60:
        count, unit = s, "s"
    elif s < 3600:
        count, unit = s // 60, "m" if compact else "min"
    else:
        count, unit = s // 3600, "h"
    if compact:
        return f"{count}{unit} ago"
    return "now" if s < NOW_S else f"{count} {unit} ago"
