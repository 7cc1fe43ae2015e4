"""Raising the node's open-file limit at start (swarm.node.fd_limit)."""

from __future__ import annotations

import resource

from swarm.node.fd_limit import FD_LIMIT_CAP, wanted_soft_limit

INF = resource.RLIM_INFINITY


def test_a_desktop_default_is_raised_to_the_hard_limit() -> None:
    assert wanted_soft_limit(1024, 4096, INF) == 4096


def test_a_huge_or_unlimited_hard_limit_is_capped() -> None:
    assert wanted_soft_limit(1024, 1 << 20, INF) == FD_LIMIT_CAP
    assert wanted_soft_limit(1024, INF, INF) == FD_LIMIT_CAP


def test_a_limit_already_high_enough_is_left_alone() -> None:
    assert wanted_soft_limit(1024, 1024, INF) is None
    assert wanted_soft_limit(FD_LIMIT_CAP, 1 << 20, INF) is None
    assert wanted_soft_limit(100_000, 1 << 20, INF) is None  # never lowered
    assert wanted_soft_limit(INF, INF, INF) is None
