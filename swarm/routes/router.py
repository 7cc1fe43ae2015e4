"""The node's routes and the one place that picks among them for a request.

`Router` gathers what the policy (`swarm/routes/auto.py`) needs to know about a model from
the local, federated and sharded routes, asks it, and hands the API the chosen route with
the reason the reply carries. The same facts answer `/v1/models`, so what the app's picker
says of a model is what `auto` does with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from swarm.routes.auto import RouteChoice, RouteFacts, RoutePrefs, decide
from swarm.routes.local import LocalRoute
from swarm.routes.preparing import BundledModels
from swarm.routes.route import ROUTE_NAMES, Route, RouteError
from swarm.routes.sharded import ShardedRoute


class Router:
    def __init__(self, local: LocalRoute, federated: Route, sharded: ShardedRoute,
                 prefs: Callable[[], RoutePrefs] = RoutePrefs,
                 bundled: BundledModels | None = None) -> None:
        self.local = local
        self.federated = federated
        self.sharded = sharded
        self._prefs = prefs
        self._bundled = bundled

    def routes(self) -> Sequence[Route]:
        return [self.local, self.federated, self.sharded]

    def facts(self, model: str) -> RouteFacts:
        here = model in self.local.model_ids()
        workers, why_not = self.sharded.planned(model)
        return RouteFacts(
            model=model, here=here,
            need_bytes=self.local.need_bytes(model) if here else None,
            free_bytes=self.local.free_bytes(),
            queue_full=self.local.gate.full,
            federated=tuple(self.federated.machines(model)),
            sharded=workers, sharded_why_not=why_not)

    def preview(self, model: str) -> RouteChoice | None:
        """What `auto` would do with `model` now; None when it would refuse."""
        try:
            return decide("auto", self.facts(model), self._prefs())
        except RouteError:
            return None

    async def ready(self, model: str) -> None:
        """Wait for `model` if it is a bundled default still being registered: the routes can
        only be weighed once the store has it (ModelNotReady past the wait)."""
        if self._bundled is not None:
            await self._bundled.ready(model)

    def choose(self, requested: str, model: str) -> tuple[Route, str]:
        """The route for a request and the reason; raises RouteError for the client."""
        if requested not in ROUTE_NAMES:
            raise RouteError(f"covey_route must be one of {', '.join(ROUTE_NAMES)}")
        choice = decide(requested, self.facts(model), self._prefs())
        route = {r.name: r for r in self.routes()}[choice.route]
        return route, choice.reason
