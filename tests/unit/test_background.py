"""Background loops of the node survive an OSError (swarm.node.background)."""

from __future__ import annotations

import errno

import pytest
import trio

from swarm.node.background import keep_running


def test_an_os_error_restarts_the_loop_instead_of_ending_the_node(
        caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def heartbeat() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        if len(runs) == 2:
            async with trio.open_nursery() as nursery:  # the same, wrapped by a nursery
                nursery.start_soon(_fail_with, OSError(errno.EMFILE, "Too many open files"))

    trio.run(keep_running, "heartbeat", heartbeat, 0.0)
    assert runs == [0, 1, 2]
    assert caplog.text.count("heartbeat failed") == 2 and "Too many open files" in caplog.text


def test_any_other_error_still_propagates() -> None:
    async def broken() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fail_with, OSError(errno.EMFILE, "x"))
            nursery.start_soon(_fail_with, KeyError("bug"))

    with pytest.raises(BaseExceptionGroup):
        trio.run(keep_running, "sync", broken, 0.0)


async def _fail_with(exc: BaseException) -> None:
    raise exc
