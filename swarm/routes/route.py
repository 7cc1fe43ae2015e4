"""Routes: the ways a node can serve a generation, and the one place that picks among them.

A route streams `Token` events then one `Done` for a `GenerateRequest`, with `Served` notes
naming the machine that serves. The routes are `local` (this machine's engine,
`swarm/routes/local.py`), `sharded` (`swarm/routes/sharded.py`) and `federated`
(`swarm/routes/federated.py`); their errors are `RouteError`s, which the API answers with
their HTTP status. Which one serves a request is decided in `swarm/routes/auto.py` (the pure
policy) through `swarm/routes/router.py`, never by the routes themselves.

Back-pressure lives in each route: one generation at a time per engine, a bounded number
waiting, and `Busy` (an HTTP 429 with Retry-After) beyond that. A consumer that stops reading
(a client that disconnects) stops the generation and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from backends.engine_protocol import Done, GenerateRequest, Token

ROUTE_NAMES = ("auto", "local", "sharded", "federated")


class RouteError(Exception):
    """The request cannot be routed; `status` is the HTTP status to answer with, `code` the
    OpenAI-style error code."""

    status = 400
    code = "route_unavailable"


class ModelUnknown(RouteError):
    """No machine this route reaches has the model."""

    status = 404
    code = "model_not_found"


class RequestRefused(RouteError):
    """The engine refused this request (it stays loaded): too long for the context, say."""

    code = "context_length_exceeded"


class Busy(RouteError):
    """Too many requests wait already; the client may retry after `retry_after_s`."""

    status = 429
    code = "busy"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Served:
    """A route's note that `machine` serves what follows (again after a failover, with a
    `notice` saying so)."""

    machine: str
    notice: str | None = None


class Route(Protocol):
    name: str

    def model_ids(self) -> list[str]: ...

    def machines(self, model: str) -> list[str]: ...

    def generate(
        self, request: GenerateRequest, model: str
    ) -> AsyncGenerator[Token | Done | Served, None]: ...
