"""Byte sizes and elapsed times as the CLI, the GUI and error messages write them."""

from __future__ import annotations

from app.common.elapsed import ago
from backends.sizes import GiB, KiB, MiB, human_bytes


def test_sizes_use_the_largest_unit_that_keeps_the_number_at_one_or_more() -> None:
    assert human_bytes(3 * GiB + GiB // 5) == "3.2 GiB"
    assert human_bytes(250 * MiB) == "250.0 MiB"
    assert human_bytes(12) == "12 bytes"
    assert human_bytes(0) == "0 bytes"
    assert human_bytes(1023) == "1023 bytes"
    assert human_bytes(KiB) == "1.0 KiB"
    assert human_bytes(1536 * KiB) == "1.5 MiB"
    assert human_bytes(5000 * GiB) == "4.9 TiB"
    assert human_bytes(2**60) == "1048576.0 TiB"


def test_a_size_that_rounds_up_to_the_next_unit_is_written_in_it() -> None:
    assert human_bytes(GiB - 1) == "1.0 GiB"
    assert human_bytes(1023 * MiB) == "1023.0 MiB"


def test_a_shortfall_keeps_its_sign_and_a_rate_may_be_fractional() -> None:
    assert human_bytes(-300 * MiB) == "-300.0 MiB"
    assert human_bytes(12.6) == "13 bytes"


def test_ages_in_words_for_the_gui() -> None:
    assert ago(0) == "now" and ago(4.9) == "now"
    assert ago(5) == "5 s ago"
    assert ago(59.9) == "59 s ago"
    assert ago(60) == "1 min ago"
    assert ago(3599) == "59 min ago"
    assert ago(3600) == "1 h ago"
    assert ago(30 * 3600) == "30 h ago"


def test_compact_ages_for_terminal_tables_count_every_second() -> None:
    assert ago(3, compact=True) == "3s ago"
    assert ago(300, compact=True) == "5m ago"
    assert ago(7200, compact=True) == "2h ago"


def test_a_time_in_the_future_reads_as_just_now() -> None:
    # A peer's clock a little ahead of ours must not print a negative age.
    assert ago(-30) == "now"
    assert ago(-30, compact=True) == "0s ago"
