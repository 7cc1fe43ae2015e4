"""The node's background loops (heartbeat, sync, admission, discovery) kept running.

An OSError in one of them, such as running out of file descriptors under a flood of
connections, is logged and the loop started again after a pause: it must never end the node.
Any other error is a bug and still propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from swarm.exception_groups import first_leaf, only_of

log = logging.getLogger(__name__)

RESTART_AFTER_S = 1.0


async def keep_running(name: str, loop: Callable[[], Awaitable[None]],
                       pause_s: float = RESTART_AFTER_S) -> None:
    """Await `loop()` until it returns, restarting it after `pause_s` whenever an OSError
    (alone or in an exception group) ends it."""
    while True:
        try:
            await loop()
            return
        except Exception as exc:
            if not only_of(exc, OSError):
                raise
            log.warning("%s failed (%s); starting it again in %.0f s", name,
                        first_leaf(exc, OSError), pause_s)
        await trio.sleep(pause_s)
