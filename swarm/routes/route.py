"""Routes: the ways a node can serve a generation, and the one place that picks among them.

A route streams `Token` events then one `Done` for a `GenerateRequest`, with `Served` notes
naming the machine that serves. The routes are `local` (this machine's engine,
`swarm/routes/local.py`), `sharded` (`swarm/routes/sharded.py`) and `federated`
(`swarm/routes/federated.py`); their errors are `RouteError`s, which the API answers with
their HTTP status. `choose_route` is pure: the API asks it, never the routes themselves.

Back-pressure lives in each route: one generation at a time per engine, a bounded number
waiting, and `Busy` (an HTTP 429 with Retry-After) beyond that. A consumer that stops reading
(a client that disconnects) stops the generation and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from backends.engine_protocol import Done, GenerateRequest, Token

ROUTE_NAMES = ("auto", "local", "sharded", "federated")
# A federated node with the model first (it holds the whole model and is meant to serve),
# then workers, then this machine alone.
AUTO_ORDER = ("federated", "sharded", "local")


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


def choose_route(requested: str, routes: Sequence[Route], model: str) -> Route:
    """The route for `model`: the one asked for, or with "auto" the first that has it in
    AUTO_ORDER. Raises RouteError / ModelUnknown with a message for the client."""
    if requested not in ROUTE_NAMES:
        raise RouteError(f"covey_route must be one of {', '.join(ROUTE_NAMES)}")
    by_name = {r.name: r for r in routes}
    if requested != "auto":
        route = by_name.get(requested)
        if route is None:
            raise RouteError(f"the {requested} route is not available on this node")
        if model not in route.model_ids():
            why = getattr(route, "why_not", lambda _: None)(model)
            if why:  # the route knows the model but cannot serve it now (no free workers)
                raise RouteError(why)
            raise ModelUnknown(f"model {model!r} is not served by the {requested} route")
        return route
    for name in AUTO_ORDER:
        route = by_name.get(name)
        if route is not None and model in route.model_ids():
            return route
    raise ModelUnknown(f"the model {model!r} does not exist in this swarm")
