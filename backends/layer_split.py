"""How llama.cpp assigns layers to devices for a given `tensor_split`, as a pure function.

Mirrors `llama_model::load_tensors` (vendored llama.cpp 0c1e57098): with all layers
offloaded, the n repeating layers plus the output layer are spread over the devices by the
cumulative share of the split. Placement uses it to predict what a split will do; the tests
check it against what llama.cpp reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def layer_devices(n_layers: int, split: Sequence[float]) -> list[int]:
    """Device index for each of the n_layers repeating layers and, last, the output layer."""
    if not split or any(s < 0 for s in split) or sum(split) <= 0:
        raise ValueError("a split needs at least one device and non-negative shares")
    # float32 as in llama.cpp, so layers on a boundary land where llama.cpp puts them
    bounds = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    bounds = bounds / bounds[-1]
    slots = n_layers + 1
    points = np.arange(slots, dtype=np.float32) / np.float32(slots)
    return [min(int(i), len(split) - 1) for i in np.searchsorted(bounds, points, side="right")]

def layers_per_device(n_layers: int, split: Sequence[float]) -> list[int]:
    """How many repeating layers each device gets (the output layer not counted)."""
    counts = [0] * len(split)
    for dev in layer_devices(n_layers, split)[:n_layers]:
        counts[dev] += 1
    return counts
