"""Waiting for the bundled defaults: a request that arrives while the node registers one waits
for it, gives up after the wait with a 503 saying how far it got, and tries a failed
registration again; `/api/status` follows the progress."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import trio

from backends.errors import ModelStoreError
from swarm.routes.preparing import BundledModels, ModelNotReady

MODEL = "bundled-1"


class SlowStore:
    """Registers in a thread: half the bytes at once, the rest when `finish` is set; the
    first `failures` tries fail."""

    def __init__(self, failures: int = 0) -> None:
        self.finish = threading.Event()
        self.halfway = threading.Event()
        self.calls: list[str] = []
        self.failures = failures

    def register(self, name: str, progress: Callable[[int, int | None], None]) -> None:
        self.calls.append(name)
        if len(self.calls) <= self.failures:
            raise ModelStoreError("Not enough disk space")
        progress(50, 100)
        self.halfway.set()
        assert self.finish.wait(10)
        progress(100, 100)


async def until(check: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)


def test_a_request_waits_for_the_registration_and_status_follows_it() -> None:
    store = SlowStore()
    bundled = BundledModels(store.register, [MODEL], wait_s=30)
    served: list[str] = []

    async def request() -> None:
        await bundled.ready(MODEL)
        served.append(MODEL)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert bundled.status()[MODEL]["state"] == "registering"  # before it has begun
            await nursery.start(bundled.run)
            nursery.start_soon(request)
            await until(store.halfway.is_set)
            await trio.sleep(0.1)
            assert served == []  # still waiting
            status = bundled.status()[MODEL]
            assert (status["state"], status["done_bytes"], status["total_bytes"]) == (
                "registering", 50, 100)
            store.finish.set()
            await until(lambda: served == [MODEL])
            assert bundled.status()[MODEL] == {"state": "ready", "done_bytes": 100,
                                               "total_bytes": 100, "error": None, "version": 1}
            await bundled.ready(MODEL)  # once ready, at once
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.calls == [MODEL]


def test_a_request_gives_up_after_the_wait_with_a_503_saying_how_far_it_got() -> None:
    store = SlowStore()
    bundled = BundledModels(store.register, [MODEL], wait_s=0.3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(bundled.run)
            await until(store.halfway.is_set)
            with pytest.raises(ModelNotReady) as refused:
                await bundled.ready(MODEL)
            assert refused.value.status == 503 and refused.value.code == "model_not_ready"
            assert f"{MODEL!r} is still being registered on this node, 50% done" in str(
                refused.value)
            await bundled.ready("another-model")  # not a bundled default: no wait at all
            store.finish.set()
            await bundled.ready(MODEL)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_failed_registration_is_tried_again_by_the_next_request() -> None:
    store = SlowStore(failures=1)
    store.finish.set()
    bundled = BundledModels(store.register, [MODEL], wait_s=30)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(bundled.run)
            await until(lambda: bundled.status()[MODEL]["state"] == "failed")
            assert bundled.status()[MODEL]["error"] == "Not enough disk space"
            await bundled.ready(MODEL)  # the second try succeeds
            assert bundled.status()[MODEL]["state"] == "ready"
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.calls == [MODEL, MODEL]


def test_a_registration_that_keeps_failing_is_a_503_with_the_reason() -> None:
    store = SlowStore(failures=5)
    bundled = BundledModels(store.register, [MODEL], wait_s=30)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(bundled.run)
            await until(lambda: bundled.status()[MODEL]["state"] == "failed")
            with pytest.raises(ModelNotReady) as refused:
                await bundled.ready(MODEL)
            assert str(refused.value) == (
                f"the bundled model {MODEL!r} could not be registered: Not enough disk space")
            nursery.cancel_scope.cancel()

    trio.run(main)
