"""Placement: which workers hold a model's layers, checked without any network or model file."""

from __future__ import annotations

import random
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.gguf_info import GGUFInfo, MemoryEstimate, estimate_memory
from backends.layer_split import layer_devices
from backends.sizes import human_bytes
from swarm.ledger.entries import WorkerOffer
from swarm.routes.placement import (
    Excluded,
    NotEnoughMemory,
    Placement,
    PlacementError,
    plan_placement,
    slot_bytes,
    usable_workers,
)

MiB = 1 << 20
GiB = 1 << 30
ME = "peer-me"


def estimate(layers: list[int], output: int) -> MemoryEstimate:
    total = sum(layers) + output
    return MemoryEstimate(
        weights_bytes=total, kv_bytes=0, total_bytes=total, per_layer_bytes=tuple(layers)
    )


def uniform(n_layers: int, layer: int, output: int | None = None) -> MemoryEstimate:
    return estimate([layer] * n_layers, layer if output is None else output)


def offer(
    name: str,
    donated: int,
    cores: int = 4,
    protocol: str = "7.0.0",
    state: str = "idle",
    leased_by: str | None = None,
    ops: int | None = None,
) -> WorkerOffer:
    return WorkerOffer(donated, donated, cores, protocol, state, leased_by,
                       ggml_op_count=ops, peer_id=f"peer-{name}", name=name)


def names(p: Placement) -> list[str]:
    return [w.name for w in p.workers]


def check_fits(p: Placement, est: MemoryEstimate, n_layers: int) -> None:
    """Recompute what llama.cpp will put on each worker from the split alone."""
    slots = slot_bytes(est, n_layers)
    held = [0] * len(p.workers)
    devices = layer_devices(n_layers, p.tensor_split)
    for slot, device in enumerate(devices):
        held[device] += slots[slot]
    assert tuple(held) == p.bytes_per_worker
    assert all(h <= w.donated_bytes for h, w in zip(held, p.workers, strict=True))
    assert set(devices) == set(range(len(p.workers)))  # no idle worker in the RPC chain
    assert sum(held) == p.need_bytes == est.total_bytes
    assert sum(p.layers) == n_layers
    assert len({w.peer_id for w in p.workers}) == len(p.workers)
    assert len(p.tensor_split) == len(p.layers) == len(p.workers)


# --- planning ---------------------------------------------------------------------------------


def test_three_to_one_donation_gives_about_three_to_one_layers() -> None:
    est = uniform(24, 100 * MiB)  # 2.4 GiB of layers + a 100 MiB output layer
    p = plan_placement(est, 24, [offer("beta", 700 * MiB), offer("alpha", 2100 * MiB)])
    assert names(p) == ["alpha", "beta"]
    assert p.tensor_split[0] / p.tensor_split[1] == pytest.approx(3.0)
    assert abs(p.layers[0] - 18) <= 1 and sum(p.layers) == 24
    assert p.describe() == f"alpha {p.layers[0]} layers, beta {p.layers[1]} layers"
    check_fits(p, est, 24)


def test_one_big_worker_that_fits_is_chosen_alone() -> None:
    est = uniform(24, 100 * MiB)
    p = plan_placement(est, 24, [offer("small1", 2 * GiB), offer("big", 4 * GiB),
                                 offer("small2", 2 * GiB)])
    assert names(p) == ["big"]
    assert p.layers == (24,) and p.tensor_split == (1.0,)
    assert p.describe() == "big 24 layers"
    check_fits(p, est, 24)


def test_the_smallest_set_of_workers_is_chosen() -> None:
    est = uniform(24, 100 * MiB)  # 2.5 GiB in all
    offers = [offer(f"w{i}", 1 * GiB) for i in range(5)]
    p = plan_placement(est, 24, offers)
    assert len(p.workers) == 3
    check_fits(p, est, 24)
    # A 2 GiB worker and a 1 GiB one beat three 1 GiB workers.
    p = plan_placement(est, 24, [*offers, offer("big", 2 * GiB)])
    assert names(p)[0] == "big" and len(p.workers) == 2


def test_more_cores_break_ties_then_peer_id_and_offer_order_does_not_matter() -> None:
    est = uniform(8, 100 * MiB)
    offers = [offer("slow", 1 * GiB, cores=2), offer("fast", 1 * GiB, cores=16),
              offer("b", 1 * GiB, cores=8), offer("a", 1 * GiB, cores=8)]
    p = plan_placement(est, 8, offers)
    assert names(p) == ["fast"]
    est = uniform(24, 100 * MiB)
    plans = set()
    for seed in range(10):
        shuffled = offers[:]
        random.Random(seed).shuffle(shuffled)
        plans.add(plan_placement(est, 24, shuffled))
    assert len(plans) == 1
    assert names(plans.pop()) == ["fast", "a", "b"]


def test_a_worker_never_gets_more_than_it_donated_when_layers_differ_in_size() -> None:
    # Heavy layers first: a 2:1 split by memory would put 12 heavy layers on alpha (1.8 GiB).
    est = estimate([150 * MiB] * 12 + [10 * MiB] * 12, 10 * MiB)
    p = plan_placement(est, 24, [offer("alpha", 1536 * MiB), offer("beta", 768 * MiB)])
    assert names(p) == ["alpha", "beta"]
    assert p.tensor_split[0] / p.tensor_split[1] != pytest.approx(2.0)
    assert p.bytes_per_worker[0] <= 1536 * MiB and p.bytes_per_worker[1] <= 768 * MiB
    check_fits(p, est, 24)


def test_a_large_output_layer_goes_to_the_worker_that_can_hold_it() -> None:
    # Tied embeddings: the output layer is a copy of a 1.5 GiB vocabulary matrix.
    est = uniform(24, 50 * MiB, output=1536 * MiB)
    p = plan_placement(est, 24, [offer("alpha", 2 * GiB), offer("beta", 1 * GiB)])
    assert names(p) == ["beta", "alpha"]
    assert p.workers[-1].name == "alpha"  # the last device holds the output layer
    check_fits(p, est, 24)


def test_a_tight_fit_is_found_by_reordering_workers() -> None:
    # 11.4 GiB in 3 workers: only the order big, small, middle lands every boundary in place.
    est = uniform(25, 452 * MiB, output=416 * MiB)
    offers = [offer("big", 7105 * MiB), offer("middle", 4498 * MiB), offer("small", 851 * MiB)]
    p = plan_placement(est, 25, offers)
    assert names(p) == ["big", "small", "middle"]
    check_fits(p, est, 25)


def test_the_next_worker_is_added_when_the_smallest_set_cannot_divide_the_layers() -> None:
    # 3 layers of 600 MiB: two 1 GiB workers hold 2 GiB but only one layer each.
    est = estimate([600 * MiB] * 3, 0)
    offers = [offer("a", 1 * GiB), offer("b", 1 * GiB), offer("c", 1 * GiB)]
    p = plan_placement(est, 3, offers)
    assert len(p.workers) == 3 and p.layers == (1, 1, 1)
    check_fits(p, est, 3)


# --- stability: what is loaded stays loaded -----------------------------------------------------


def test_an_equal_newcomer_leaves_a_loaded_plan_unchanged() -> None:
    est = uniform(24, 100 * MiB)  # 2.5 GiB: two 2 GiB workers
    loaded = plan_placement(est, 24, [offer("b", 2 * GiB), offer("c", 2 * GiB)])
    holding = [w.peer_id for w in loaded.workers]
    # "a" sorts before both by peer id, and with more cores it outranks them too.
    for newcomer in (offer("a", 2 * GiB), offer("a", 2 * GiB, cores=16)):
        offers = [newcomer, offer("b", 2 * GiB), offer("c", 2 * GiB)]
        assert names(plan_placement(est, 24, offers)) != names(loaded)  # ranked afresh
        again = plan_placement(est, 24, offers, holding=holding)
        assert again == loaded  # the same workers, order and split: nothing to reload


def test_a_bigger_newcomer_that_alone_could_hold_the_model_changes_nothing() -> None:
    est = uniform(24, 100 * MiB)
    loaded = plan_placement(est, 24, [offer("b", 2 * GiB), offer("c", 2 * GiB)])
    offers = [offer("big", 4 * GiB), offer("b", 2 * GiB), offer("c", 2 * GiB)]
    assert names(plan_placement(est, 24, offers)) == ["big"]
    assert plan_placement(est, 24, offers,
                          holding=[w.peer_id for w in loaded.workers]) == loaded


def test_the_holders_device_order_is_kept_even_when_ranking_would_reorder_them() -> None:
    # Tied embeddings put the big worker last; ranked order alone would list it first.
    est = uniform(24, 50 * MiB, output=1536 * MiB)
    loaded = plan_placement(est, 24, [offer("alpha", 2 * GiB), offer("beta", 1 * GiB)])
    assert names(loaded) == ["beta", "alpha"]
    offers = [offer("alpha", 2 * GiB), offer("beta", 1 * GiB), offer("gamma", 1 * GiB)]
    again = plan_placement(est, 24, offers, holding=["peer-beta", "peer-alpha"])
    assert again == loaded


def test_a_lost_holder_is_replaced_and_the_survivor_stays() -> None:
    est = uniform(24, 100 * MiB)
    # "b" held half the layers with "c"; "b" is gone, and the bigger "a" joined meanwhile.
    offers = [offer("a", 4 * GiB), offer("c", 2 * GiB), offer("d", 2 * GiB)]
    p = plan_placement(est, 24, offers, holding=["peer-b", "peer-c"])
    assert names(p)[0] == "c" and len(p.workers) == 2
    assert names(p)[1] == "a"  # the strongest newcomer fills what "b" held
    check_fits(p, est, 24)


def test_a_newcomer_is_used_when_the_holders_no_longer_hold_the_model() -> None:
    est = uniform(24, 100 * MiB)  # 2.5 GiB
    # "b" held it all with 3 GiB; it now donates 2 GiB, so "a" must add the rest.
    offers = [offer("a", 1 * GiB), offer("b", 2 * GiB)]
    p = plan_placement(est, 24, offers, holding=["peer-b"])
    assert names(p) == ["b", "a"]
    check_fits(p, est, 24)


def test_a_worker_with_the_model_in_its_tensor_cache_wins_a_tie() -> None:
    est = uniform(8, 100 * MiB)
    offers = [offer("a", 1 * GiB), offer("b", 1 * GiB)]
    assert names(plan_placement(est, 8, offers)) == ["a"]
    assert names(plan_placement(est, 8, offers, cached={"peer-b"})) == ["b"]
    # ... but only a tie: a cache does not beat more memory or more cores.
    offers = [offer("a", 1 * GiB, cores=8), offer("b", 1 * GiB)]
    assert names(plan_placement(est, 8, offers, cached={"peer-b"})) == ["a"]


def test_need_counts_kv_cache_and_everything_outside_the_blocks() -> None:
    info = GGUFInfo(
        path=Path("x.gguf"), file_size=0, gguf_version=3, architecture="test", name=None,
        parameters=0, quantisation="F16", n_layers=4, context_length=4096, embedding_length=64,
        n_head=4, n_head_kv=2, head_dim_k=16, head_dim_v=16, layer_bytes=(1000,) * 4,
        other_bytes=5000, chat_template=None,
    )
    est = estimate_memory(info, context_length=4096)
    slots = slot_bytes(est, 4)
    assert slots[:4] == list(est.per_layer_bytes) and slots[4] == info.other_bytes
    p = plan_placement(est, 4, [offer("a", est.total_bytes)])
    assert p.need_bytes == est.total_bytes == sum(slots)
    with pytest.raises(NotEnoughMemory):
        plan_placement(est, 4, [offer("a", est.total_bytes - 1)])


def test_blocks_past_n_layers_are_charged_to_the_output_layer() -> None:
    est = estimate([10, 20, 30], 5)
    assert slot_bytes(est, 2) == [10, 20, 35]
    with pytest.raises(ValueError):
        slot_bytes(est, 4)
    with pytest.raises(ValueError):
        slot_bytes(MemoryEstimate(0, 0, 10, (20,)), 1)  # per-layer bytes exceed the total


def test_workers_donating_nothing_are_never_placed() -> None:
    p = plan_placement(uniform(4, MiB), 4, [offer("zero", 0), offer("a", 1 * GiB)])
    assert names(p) == ["a"]


# --- not enough memory ------------------------------------------------------------------------


def test_not_enough_memory_says_how_much_is_missing() -> None:
    est = estimate([int(0.1 * GiB)] * 32, 0)  # 3.2 GiB
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(est, 32, [offer("a", 1 * GiB), offer("b", 1 * GiB)])
    assert isinstance(err.value, PlacementError)
    assert err.value.need_bytes == est.total_bytes and err.value.have_bytes == 2 * GiB
    assert str(err.value) == (
        "the model needs 3.2 GiB across workers, the swarm's usable workers donate 2.0 GiB: "
        "1.2 GiB missing"
    )


def test_not_enough_memory_lists_excluded_workers_with_reasons() -> None:
    offers = [offer("a", 1 * GiB), offer("old", 8 * GiB, protocol="6.0.0"),
              offer("busy", 8 * GiB, state="leased", leased_by="peer-carol")]
    usable, excluded = usable_workers(offers, "7.0.0", ME, ())
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(uniform(24, 100 * MiB), 24, usable, excluded=excluded)
    message = str(err.value)
    assert "1.4 GiB missing" in message
    assert "old (RPC protocol 6.0.0, this node speaks 7.0.0)" in message
    assert "busy (leased by peer-carol)" in message
    assert err.value.excluded == tuple(excluded)


def test_no_workers_at_all_says_to_turn_on_worker_mode() -> None:
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(uniform(4, MiB), 4, [])
    assert "no worker in the swarm donates memory" in str(err.value)
    assert "turn on worker mode on another machine" in str(err.value)
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(uniform(4, MiB), 4, [],
                       excluded=[Excluded("desk", "peer-desk", "failed recently")])
    assert "no usable worker" in str(err.value) and "desk (failed recently)" in str(err.value)


def test_a_layer_larger_than_any_worker_is_reported_even_with_enough_memory_in_total() -> None:
    est = estimate([3 * GiB, 100 * MiB], 0)
    with pytest.raises(NotEnoughMemory) as err:
        plan_placement(est, 2, [offer("a", 2 * GiB), offer("b", 2 * GiB)])
    assert "cannot be divided" in str(err.value) and "missing" not in str(err.value)


# --- usable workers ---------------------------------------------------------------------------


def test_incompatible_rpc_protocol_is_excluded_with_reason() -> None:
    offers = [offer("old", GiB, protocol="6.0.0"), offer("patch", GiB, protocol="7.0.3"),
              offer("minor", GiB, protocol="7.1.0"), offer("junk", GiB, protocol="seven")]
    usable, excluded = usable_workers(offers, "7.0.0", ME, ())
    assert [w.name for w in usable] == ["patch"]
    assert excluded[0] == Excluded("old", "peer-old", "RPC protocol 6.0.0, this node speaks 7.0.0")
    assert [e.name for e in excluded] == ["old", "minor", "junk"]


def test_a_different_ggml_op_count_is_excluded_with_reason() -> None:
    offers = [offer("same", GiB, ops=101), offer("newer", GiB, ops=102),
              offer("unknown", GiB), offer("older", GiB, ops=95)]
    usable, excluded = usable_workers(offers, "7.0.0", ME, (), ggml_op_count=101)
    assert [w.name for w in usable] == ["same", "unknown"]  # an older worker does not say
    assert excluded == [
        Excluded("newer", "peer-newer",
                 "its ggml has 102 ops, this node's has 101: graphs would mean other ops there"),
        Excluded("older", "peer-older",
                 "its ggml has 95 ops, this node's has 101: graphs would mean other ops there")]
    # Placement says so when memory runs short because of it.
    with pytest.raises(NotEnoughMemory, match=r"newer \(its ggml has 102 ops"):
        plan_placement(uniform(4, GiB), 4, usable, excluded=excluded)


def test_leased_by_someone_else_is_excluded_and_leased_by_me_is_usable() -> None:
    offers = [offer("theirs", GiB, state="leased", leased_by="peer-carol"),
              offer("mine", GiB, state="leased", leased_by=ME), offer("free", GiB)]
    usable, excluded = usable_workers(offers, "7.0.0", ME, ())
    assert [w.name for w in usable] == ["mine", "free"]
    assert excluded == [Excluded("theirs", "peer-theirs", "leased by peer-carol")]


def test_recently_failed_and_zero_donation_workers_are_excluded() -> None:
    offers = [offer("flaky", GiB), offer("stingy", 0), offer("ok", GiB)]
    usable, excluded = usable_workers(offers, "7.0.0", ME, {"peer-flaky"})
    assert [w.name for w in usable] == ["ok"]
    assert [(e.name, e.reason) for e in excluded] == [
        ("flaky", "failed recently"), ("stingy", "donates no memory")]


def test_a_worker_donating_more_than_its_machine_reports_is_not_believed() -> None:
    """A member advertising a 1 TiB worker on an 8 GiB machine gets no layers."""
    offers = [offer("liar", 1024 * GiB), offer("honest", 4 * GiB), offer("silent", GiB)]
    ram = {"peer-liar": 8 * GiB, "peer-honest": 8 * GiB}
    usable, excluded = usable_workers(offers, "7.0.0", ME, (), ram_of=ram)
    assert [w.name for w in usable] == ["honest"]
    assert [(e.name, e.reason) for e in excluded] == [
        ("liar", "donates 1.0 TiB, more than the 8.0 GiB of RAM its machine reports"),
        ("silent", "its machine reports no RAM")]
    assert names(plan_placement(uniform(4, 512 * MiB), 4, usable)) == ["honest"]


# --- properties -------------------------------------------------------------------------------

layer_sizes = st.integers(min_value=0, max_value=500 * MiB)


@st.composite
def swarms(draw: st.DrawFn) -> tuple[MemoryEstimate, int, list[WorkerOffer]]:
    n_layers = draw(st.integers(min_value=0, max_value=80))
    if draw(st.booleans()):
        layers = [draw(layer_sizes)] * n_layers  # most models: identical layers
    else:
        layers = draw(st.lists(layer_sizes, min_size=n_layers, max_size=n_layers))
    est = estimate(layers, draw(st.integers(min_value=0, max_value=2 * GiB)))
    donations = draw(st.lists(st.integers(min_value=0, max_value=16 * GiB), min_size=0,
                              max_size=7))
    cores = draw(st.lists(st.integers(1, 32), min_size=len(donations), max_size=len(donations)))
    offers = [offer(f"w{i}", d, c) for i, (d, c) in enumerate(zip(donations, cores, strict=True))]
    return est, n_layers, offers


@settings(max_examples=400, deadline=None)
@given(swarms())
def test_no_worker_ever_exceeds_its_donation(swarm: tuple) -> None:
    est, n_layers, offers = swarm
    need = est.total_bytes
    have = sum(o.donated_bytes for o in offers)
    biggest = max((o.donated_bytes for o in offers), default=0)
    try:
        p = plan_placement(est, n_layers, offers)
    except NotEnoughMemory as e:
        assert e.need_bytes == need and e.have_bytes == have
        assert biggest < need or biggest == 0  # a worker that holds it all is always enough
        if 0 < have < need:
            assert f"{human_bytes(need - have)} missing" in str(e)
        return
    check_fits(p, est, n_layers)
    ranked = sorted(offers, key=lambda o: (-o.donated_bytes, -o.cores, o.peer_id))
    smallest = next(k for k, s in enumerate(accumulate(o.donated_bytes for o in ranked), 1)
                    if s >= need)
    assert len(p.workers) >= smallest
    # Whenever the plain memory-proportional split over the smallest set fits, it is the plan.
    top = ranked[:smallest]
    split = [o.donated_bytes for o in top]
    held = [0] * len(top)
    for slot, device in enumerate(layer_devices(n_layers, split)):
        held[device] += slot_bytes(est, n_layers)[slot]
    if all(0 < h <= o.donated_bytes for h, o in zip(held, top, strict=True)):
        assert list(p.workers) == top
        total = sum(split)
        assert p.tensor_split == pytest.approx([s / total for s in split])
