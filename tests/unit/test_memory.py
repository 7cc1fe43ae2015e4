"""This machine's RAM as the node publishes it and worker mode divides it."""

from __future__ import annotations

import os
import sys

import pytest

from backends.memory import memory_bytes


def test_total_is_at_least_what_is_available_and_both_are_real() -> None:
    total, available = memory_bytes()
    assert 0 < available <= total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_total_is_the_kernel_s_count_of_physical_pages() -> None:
    assert memory_bytes().total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
