"""The node's open-file limit: raised at start from the soft limit towards the hard one.

Desktops often start processes with a soft limit of 1,024 open files while allowing far more;
a node holds sockets for its peers, API clients, engine and workers, so it asks for what it
may have (up to FD_LIMIT_CAP). Where the platform has no such limit (Windows) nothing happens.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

FD_LIMIT_CAP = 65536


def wanted_soft_limit(soft: int, hard: int, infinity: int, cap: int = FD_LIMIT_CAP) -> int | None:
    """The soft limit to set, or None to leave it: the hard limit, at most `cap`, never lower."""
    ceiling = cap if hard == infinity else min(hard, cap)
    if soft != infinity and soft < ceiling:
        return ceiling
    return None


def raise_open_file_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE as far as allowed; the new limit, or None."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = wanted_soft_limit(soft, hard, resource.RLIM_INFINITY)
    if wanted is None:
        log.info("open-file limit %s (hard %s) left as it is", _shown(soft), _shown(hard))
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS refuses more than OPEN_MAX
        log.warning("could not raise the open-file limit from %s to %s: %s", soft, wanted, exc)
        return None
    log.info("raised the open-file limit from %s to %s (hard %s)", soft, wanted, _shown(hard))
    return wanted


def _shown(limit: int) -> str:
    import resource

    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
