"""How llama.cpp computes, the same in every process that does: the engine and the RPC worker.

One thread per physical core this process may run on (a second thread per core, a
hyperthread, slows llama.cpp down), and OpenMP threads that wait passively: by default
(libgomp) an idle thread spins 300,000 times before it sleeps, and on a machine busy with
anything else (another engine, a worker, the app) spinning threads take the cores from the
threads with work: the engine ran 3-5x slower on a loaded 2-core machine. Sleeping at once
(`OMP_WAIT_POLICY=passive` alone) costs a quarter of the speed of a small model on a quiet
machine, where a thread is woken between every two operations; a short spin first (1,000)
keeps that speed and most of the gain under load (bench/RESULTS.md, "OpenMP waiting").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# What a computing child process gets on top of its parent's environment.
COMPUTE_ENV = {"GGML_NO_BACKTRACE": "1", "OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"}


def compute_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine or worker process: this one's, passive OpenMP waiting,
    then `extra` (a benchmark comparing wait policies overrides it)."""
    return {**os.environ, **COMPUTE_ENV, **(extra or {})}


def physical_cores() -> int:
    """Cores, not hyperthreads, among the CPUs this process may run on."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((cpu / "physical_package_id").read_text(), (cpu / "core_id").read_text()))
        except OSError:
            continue
    usable = len(os.sched_getaffinity(0))  # what this process may run on
    return min(len(cores), usable) if cores else usable
