"""The `auto` routing policy, one test a rule: pure facts in, a route and its reason out."""

from __future__ import annotations

import pytest

from backends.sizes import GiB, MiB
from swarm.routes.auto import RouteFacts, RouteForbidden, RoutePrefs, decide
from swarm.routes.route import ModelUnknown, RouteError

SMALL = RouteFacts("m", here=True, need_bytes=300 * MiB, free_bytes=4 * GiB)
BIG = RouteFacts("m", here=True, need_bytes=8 * GiB, free_bytes=4 * GiB)
ELSEWHERE = RouteFacts("m", here=False, need_bytes=None, free_bytes=4 * GiB)
OFF = RoutePrefs(remote_prompts=False)


def with_(facts: RouteFacts, **changes: object) -> RouteFacts:
    from dataclasses import replace

    return replace(facts, **changes)  # type: ignore[arg-type]


def test_a_model_that_fits_runs_here_even_with_a_free_worker() -> None:
    choice = decide("auto", with_(SMALL, sharded=("w1",)))
    assert choice.route == "local"
    assert choice.reason == "fits this machine (needs 300.0 MiB, 4.0 GiB free here)"


def test_a_federated_offer_is_not_trusted_for_a_model_that_fits_here() -> None:
    assert decide("auto", with_(SMALL, federated=("liar",))).route == "local"
    # ... not even when the queue here is full: then the reply waits its turn (or is busy).
    full = decide("auto", with_(SMALL, federated=("liar",), queue_full=True))
    assert full.route == "local" and "its queue is full" in full.reason


def test_a_full_queue_here_overflows_to_workers() -> None:
    choice = decide("auto", with_(SMALL, queue_full=True, sharded=("w1",)))
    assert choice.route == "sharded"
    assert choice.reason == "fits this machine but its queue is full; spread over w1"


def test_a_model_too_big_for_free_memory_goes_to_a_federated_node_first() -> None:
    choice = decide("auto", with_(BIG, federated=("f1", "f2"), sharded=("w1", "w2")))
    assert choice.route == "federated"
    assert choice.reason == "needs 8.0 GiB, 4.0 GiB free here; served by f1, f2"


def test_a_model_not_here_goes_to_a_federated_node() -> None:
    choice = decide("auto", with_(ELSEWHERE, federated=("f1",)))
    assert (choice.route, choice.reason) == ("federated", "not on this machine; served by f1")


def test_without_a_federated_node_a_big_model_is_sharded_over_the_planned_workers() -> None:
    choice = decide("auto", with_(BIG, sharded=("w1", "w2")))
    assert choice.route == "sharded"
    assert choice.reason == "needs 8.0 GiB, 4.0 GiB free here; spread over w1, w2"


def test_with_nowhere_else_a_big_model_still_runs_here_and_says_so() -> None:
    choice = decide("auto", BIG)
    assert choice.route == "local"
    assert choice.reason.endswith("and no other machine can take it; runs here anyway")


def test_the_bundled_default_before_registration_counts_as_fitting() -> None:
    unknown = with_(SMALL, need_bytes=None, sharded=("w1",))
    assert decide("auto", unknown).route == "local"


def test_a_model_nobody_has_is_unknown() -> None:
    with pytest.raises(ModelUnknown, match="does not exist in this swarm"):
        decide("auto", ELSEWHERE)


def test_with_remote_prompts_off_a_big_model_stays_here() -> None:
    choice = decide("auto", with_(BIG, federated=("f1",), sharded=("w1",)), OFF)
    assert choice.route == "local" and "sending prompts to other machines is off" in choice.reason


def test_with_remote_prompts_off_a_model_only_elsewhere_is_refused_naming_the_setting() -> None:
    with pytest.raises(RouteForbidden, match="remote_prompts is off") as refused:
        decide("auto", with_(ELSEWHERE, federated=("f1",)), OFF)
    assert refused.value.status == 403


@pytest.mark.parametrize("route", ["federated", "sharded"])
def test_with_remote_prompts_off_remote_routes_are_refused(route: str) -> None:
    facts = with_(SMALL, federated=("f1",), sharded=("w1",))
    with pytest.raises(RouteForbidden, match=f"the {route} route sends prompts to other "
                       "machines.*remote_prompts is off.*covey node --remote-prompts"):
        decide(route, facts, OFF)
    assert decide("local", facts, OFF).route == "local"


def test_a_preferred_route_goes_first_when_it_can_serve() -> None:
    facts = with_(SMALL, federated=("f1",))
    choice = decide("auto", facts, RoutePrefs(prefer="federated"))
    assert choice.route == "federated" and "preferred" in choice.reason
    # ... and not when it cannot, or the setting forbids it.
    assert decide("auto", SMALL, RoutePrefs(prefer="sharded")).route == "local"
    assert decide("auto", facts, RoutePrefs(False, "federated")).route == "local"


def test_an_explicit_route_is_taken_or_says_why_not() -> None:
    choice = decide("sharded", with_(SMALL, sharded=("w1",)))
    assert (choice.route, choice.reason) == ("sharded", "asked for the sharded route")
    with pytest.raises(RouteError, match="no worker in the swarm"):
        decide("sharded", with_(SMALL, sharded_why_not="cannot shard: no worker in the swarm"))
    with pytest.raises(ModelUnknown, match="not served by the federated route"):
        decide("federated", SMALL)
