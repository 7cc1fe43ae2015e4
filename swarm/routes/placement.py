"""Which swarm workers hold a model's layers, and how llama.cpp's `tensor_split` divides them.

A pure planner over typed worker offers (`WorkerOffer`, read from the ledger by the caller
through swarm/ledger/entries.py): filtering out workers this node cannot use, and planning a
placement: the smallest, strongest set of workers whose donated memory holds the model, with
a split that never gives a worker more bytes than it donated. The plan is stable: workers that
already hold the model's layers are kept while they can hold it, so a worker that joins is
used only when it adds needed capacity or replaces a lost one. No network, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, permutations

from backends.gguf_info import MemoryEstimate
from backends.layer_split import layer_devices, layers_per_device
from backends.sizes import human_bytes
from swarm.ledger.entries import WorkerOffer

_PERMUTED_WORKERS = 5  # 120 orders, each a few hundred microseconds at most


@dataclass(frozen=True)
class Excluded:
    """A worker left out of placement, and why (shown to the user when memory runs short)."""

    name: str
    peer_id: str
    reason: str


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def usable_workers(
    offers: Sequence[WorkerOffer], rpc_protocol: str, me: str, unusable: Collection[str],
    names: Mapping[str, str] | None = None, ggml_op_count: int | None = None,
    ram_of: Mapping[str, int] | None = None,
) -> tuple[list[WorkerOffer], list[Excluded]]:
    """Split offers into those this node (peer id `me`) can use now and those it cannot.

    `unusable` holds peer ids that failed recently; `names` (peer id -> machine name) makes
    a lease holder readable in the reason. RPC compatibility follows ggml-rpc, where
    the patch number does not change the wire format; but a libggml built with other ops
    numbers them differently under the same protocol, so a worker whose op count differs from
    `ggml_op_count` (ours) is left out too. A count either side does not know passes.
    With `ram_of` (peer id -> the RAM its node entry reports), a worker that donates more than
    its machine has is not believed, nor one whose machine reports nothing.
    """
    ours = _major_minor(rpc_protocol)
    usable: list[WorkerOffer] = []
    excluded: list[Excluded] = []
    for offer in offers:
        theirs = _major_minor(offer.rpc_protocol)
        if theirs is None or theirs != ours:
            reason = f"RPC protocol {offer.rpc_protocol}, this node speaks {rpc_protocol}"
        elif _ops_differ(offer.ggml_op_count, ggml_op_count):
            reason = (f"its ggml has {offer.ggml_op_count} ops, this node's has "
                      f"{ggml_op_count}: graphs would mean other ops there")
        elif offer.state == "leased" and offer.leased_by != me:
            holder = offer.leased_by or "?"
            reason = f"leased by {(names or {}).get(holder, holder)}"
        elif offer.peer_id in unusable:
            reason = "failed recently"
        elif offer.donated_bytes <= 0:
            reason = "donates no memory"
        elif ram_of is not None and (why := _implausible(offer, ram_of.get(offer.peer_id))):
            reason = why
        else:
            usable.append(offer)
            continue
        excluded.append(Excluded(offer.name, offer.peer_id, reason))
    return usable, excluded


def _implausible(offer: WorkerOffer, ram: int | None) -> str | None:
    """Why a worker's donation cannot be true of its machine; None when it can."""
    if ram is None:
        return "its machine reports no RAM"
    if offer.donated_bytes > ram:
        return (f"donates {human_bytes(offer.donated_bytes)}, more than the "
                f"{human_bytes(ram)} of RAM its machine reports")
    return None


def _ops_differ(theirs: int | None, ours: int | None) -> bool:
    return theirs is not None and ours is not None and theirs != ours


class PlacementError(Exception):
    """The model cannot be placed on the swarm's workers."""


class NotEnoughMemory(PlacementError):
    """The usable workers cannot hold the model; the message says how much is missing."""

    def __init__(
        self, need_bytes: int, have_bytes: int, excluded: Sequence[Excluded] = ()
    ) -> None:
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes
        self.excluded = tuple(excluded)
        need, have = human_bytes(need_bytes), human_bytes(have_bytes)
        if have_bytes == 0 and not self.excluded:
            message = (
                "no worker in the swarm donates memory; turn on worker mode on another machine "
                f"(the model needs {need})"
            )
        elif have_bytes == 0:
            message = f"no usable worker in the swarm (the model needs {need})"
        elif have_bytes < need_bytes:
            message = (
                f"the model needs {need} across workers, the swarm's usable workers "
                f"donate {have}: {human_bytes(need_bytes - have_bytes)} missing"
            )
        else:
            # Enough in total, but layers are indivisible and one does not fit where it must go.
            message = (
                f"the model needs {need} across workers and the swarm's usable "
                f"workers donate {have}, but its layers cannot be divided so that "
                "each worker's share fits in what it donated"
            )
        if self.excluded:
            message += "; not used: " + ", ".join(f"{e.name} ({e.reason})" for e in self.excluded)
        super().__init__(message)


@dataclass(frozen=True)
class Placement:
    """Workers in llama.cpp device order; the last one also holds the output layer."""

    workers: tuple[WorkerOffer, ...]
    tensor_split: tuple[float, ...]  # relative shares, as llama.cpp takes them
    layers: tuple[int, ...]  # repeating layers per worker
    bytes_per_worker: tuple[int, ...]
    need_bytes: int

    def describe(self) -> str:
        return ", ".join(
            f"{w.name} {n} layer{'' if n == 1 else 's'}"
            for w, n in zip(self.workers, self.layers, strict=True)
        )


def slot_bytes(estimate: MemoryEstimate, n_layers: int) -> list[int]:
    """Bytes for each of llama.cpp's n_layers + 1 slots: the repeating layers, then the output.

    `per_layer_bytes` covers the `blk.N` tensors (weights plus their KV cache); everything else
    in the estimate (GGUFInfo.other_bytes: token embedding, output norm and output head, and any
    blocks past n_layers) is charged to the output slot. That over-counts by the token
    embedding, which stays in the client, whenever the model has its own output head; but with
    tied embeddings (Gemma and others) llama.cpp copies the embedding matrix to the output
    device, and the estimate cannot tell the two apart, so the safe upper bound wins.
    """
    if n_layers < 0 or len(estimate.per_layer_bytes) < n_layers:
        raise ValueError(f"the estimate has no bytes for each of {n_layers} layers")
    layers = list(estimate.per_layer_bytes[:n_layers])
    output = estimate.total_bytes - sum(layers)
    if output < 0 or any(b < 0 for b in layers):
        raise ValueError("inconsistent memory estimate: negative bytes")
    return [*layers, output]


def _bytes_per_device(slots: Sequence[int], n_layers: int, split: Sequence[float]) -> list[int]:
    out = [0] * len(split)
    for slot, device in enumerate(layer_devices(n_layers, split)):
        out[device] += slots[slot]
    return out


def _capped_ends(
    slots: Sequence[int], caps: Sequence[int], targets: Sequence[int]
) -> list[int] | None:
    """End slot of each device's contiguous range: near `targets`, within every cap.

    None when no contiguous division in this device order fits.
    """
    n, k = len(slots), len(caps)
    # earliest[d]: the first slot from which the rest fits on devices d.. (greedy from the end)
    earliest = [n] * (k + 1)
    for d in reversed(range(k)):
        start, used = earliest[d + 1], 0
        while start > 0 and used + slots[start - 1] <= caps[d]:
            start -= 1
            used += slots[start]
        earliest[d] = start
    if earliest[0] > 0:
        return None
    ends, start = [], 0
    for d in range(k):
        reach, used = start, 0
        while reach < n and used + slots[reach] <= caps[d]:
            used += slots[reach]
            reach += 1
        # Ending at or past earliest[d + 1] keeps the rest placeable; the reach is never below
        # it because the rest from `start` was placeable.
        start = min(max(targets[d], earliest[d + 1], start), reach)
        ends.append(start)
    return ends


def _place(
    slots: Sequence[int], n_layers: int, order: Sequence[WorkerOffer], need: int
) -> Placement | None:
    caps = [w.donated_bytes for w in order]
    total = sum(caps)
    workers, split = list(order), [c / total for c in caps]
    devices = layer_devices(n_layers, split)
    held = _bytes_per_device(slots, n_layers, split)
    if len(set(devices)) < len(order) or any(h > c for h, c in zip(held, caps, strict=True)):
        # The proportional split overfills a worker (or leaves one idle): keep each worker's
        # range as close to proportional as its donation allows, as whole slots.
        targets = [sum(1 for d in devices if d <= i) for i in range(len(order))]
        ends = _capped_ends(slots, caps, targets)
        if ends is None:
            return None
        counts = [b - a for a, b in zip([0, *ends], ends, strict=False)]
        # Whole slot counts as the split give exactly these ranges in layer_devices' float32
        # arithmetic; an idle worker is dropped rather than kept in the RPC chain.
        workers = [w for w, c in zip(order, counts, strict=True) if c]
        split = [float(c) for c in counts if c]
        held = _bytes_per_device(slots, n_layers, split)
        if any(h > w.donated_bytes for h, w in zip(held, workers, strict=True)):
            return None
    return Placement(
        workers=tuple(workers),
        tensor_split=tuple(split),
        layers=tuple(layers_per_device(n_layers, split)),
        bytes_per_worker=tuple(held),
        need_bytes=need,
    )


def plan_placement(
    estimate: MemoryEstimate,
    n_layers: int,
    offers: Sequence[WorkerOffer],
    *,
    excluded: Sequence[Excluded] = (),
    holding: Sequence[str] = (),
    cached: Collection[str] = (),
) -> Placement:
    """The smallest, strongest set of `offers` that holds the model, and its tensor_split.

    Workers in `holding` (peer ids holding the model's layers now, in device order) come first,
    in that order: reloading costs the whole model's bytes and tens of seconds, so while they
    hold it a plan over the same workers gives the same layout, and a newcomer only fills what
    a lost or shrunk one leaves missing. The others rank by donated memory, then cores (a weak
    node slows the whole ring), then whether `cached` (peer ids whose tensor cache holds the
    model) names them, then peer id so every node plans alike. `excluded` (from
    usable_workers) only feeds the error message. Raises NotEnoughMemory when no set fits.
    """
    slots = slot_bytes(estimate, n_layers)
    need = sum(slots)
    position = {peer: i for i, peer in enumerate(holding)}
    ranked = sorted(
        (o for o in offers if o.donated_bytes > 0),
        key=lambda o: (
            (0, position[o.peer_id], 0, False, "") if o.peer_id in position
            else (1, -o.donated_bytes, -o.cores, o.peer_id not in cached, o.peer_id)),
    )
    have = sum(o.donated_bytes for o in ranked)
    if ranked and have >= need:
        smallest = next(k for k, s in enumerate(accumulate(o.donated_bytes for o in ranked), 1)
                        if s >= need)
        # Indivisible layers can leave the smallest set short: then try one worker more.
        for k in range(smallest, len(ranked) + 1):
            chosen = ranked[:k]
            # Device order decides which worker's range ends on a layer boundary and who holds
            # the output slot, which can dwarf a layer (tied embeddings copy the vocabulary
            # matrix). Small sets try every order, ranked order first; big ones fall back to
            # ranked order and then the strongest worker holding the output.
            orders = (
                permutations(chosen)
                if k <= _PERMUTED_WORKERS
                else (chosen, chosen[1:] + chosen[:1])
            )
            for order in orders:
                placement = _place(slots, n_layers, order, need)
                if placement is not None:
                    return placement
    raise NotEnoughMemory(need, have, excluded)
