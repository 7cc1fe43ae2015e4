"""The bundled default models: registered as the node starts, and waited for by requests.

A fresh node assembles its bundled model(s) from their packages (hundreds of MB, seconds) in
the background as it starts; `/api/status` shows how far it got. A request for one that
arrives meanwhile, on any route (local, sharded, or served for a federated peer), waits for it
for at most `WAIT_S` instead of failing because the store does not list it yet; past that, or
when registering failed, it gets a 503 saying why. A failed registration is tried again by the
next request that needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import trio

from swarm.routes.route import RouteError

log = logging.getLogger(__name__)

WAIT_S = 120.0
REGISTRATION_VERSION = 1

State = Literal["registering", "ready", "failed"]
# Registers a bundled model by name in the store, telling progress(done, total) as it goes;
# runs in a thread.
Register = Callable[[str, Callable[[int, int | None], None]], object]


class ModelNotReady(RouteError):
    """A bundled model is still being registered (or could not be); the client may retry."""

    status = 503
    code = "model_not_ready"


@dataclass
class Registration:
    """How far registering one bundled model got (what `/api/status` shows)."""

    state: State = "registering"
    done_bytes: int = 0
    total_bytes: int | None = None
    error: str | None = None
    version: int = REGISTRATION_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def not_ready_reason(model: str, registration: Registration, waited_s: float) -> str:
    """What a request that gave up waiting for `model` is told."""
    if registration.state == "failed":
        return f"the bundled model {model!r} could not be registered: {registration.error}"
    done = ""
    if registration.total_bytes:
        done = f", {100 * registration.done_bytes // registration.total_bytes}% done"
    return (f"the bundled model {model!r} is still being registered on this node{done} after "
            f"{waited_s:.0f} s; try again in a moment")


class BundledModels:
    """Registers the bundled defaults in the background and lets requests wait for them."""

    def __init__(self, register: Register, models: Sequence[str], wait_s: float = WAIT_S
                 ) -> None:
        self._register = register
        self._wait_s = wait_s
        self._registrations = {m: Registration() for m in models}
        self._finished = {m: trio.Event() for m in models}
        self._nursery: trio.Nursery | None = None

    def status(self) -> dict[str, dict[str, Any]]:
        return {m: r.to_dict() for m, r in self._registrations.items()}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Register every bundled default, one after the other, then stay for retries."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for model in self._registrations:
                await self._register_one(model)
            await trio.sleep_forever()

    async def _register_one(self, model: str) -> None:
        registration = self._registrations[model]

        def progress(done: int, total: int | None) -> None:  # from the registering thread
            registration.done_bytes, registration.total_bytes = done, total

        try:
            await trio.to_thread.run_sync(self._register, model, progress)
            registration.state = "ready"
            registration.done_bytes = registration.total_bytes or registration.done_bytes
            log.info("the bundled model %s is registered", model)
        except Exception as exc:  # noqa: BLE001 - shown in the status, tried again later
            registration.state, registration.error = "failed", str(exc)
            log.warning("could not register the bundled model %s: %s", model, exc)
        finally:
            self._finished[model].set()

    async def ready(self, model: str) -> None:
        """Return once `model` is registered (at once if it is no bundled default); raise
        ModelNotReady after waiting `wait_s`, or when registering it failed."""
        if model not in self._registrations:
            return
        if self._registrations[model].state == "failed" and self._nursery is not None:
            # Try again (the disk may have room now); the requests meanwhile wait for this try.
            self._registrations[model] = Registration()
            self._finished[model] = trio.Event()
            self._nursery.start_soon(self._register_one, model)
        started = trio.current_time()
        with trio.move_on_after(self._wait_s):
            await self._finished[model].wait()
        registration = self._registrations[model]
        if registration.state != "ready":
            raise ModelNotReady(not_ready_reason(model, registration,
                                                 trio.current_time() - started))
