"""The API's connection cap: who gives way when a listener is full (swarm.api.limits)."""

from __future__ import annotations

import pytest

from swarm.api.limits import ConnectionSlots, Slot


def opened(slots: ConnectionSlots, name: str, now: float, closed: list[str]) -> Slot | None:
    return slots.admit(lambda: closed.append(name), now)


def test_below_the_cap_nobody_is_closed() -> None:
    slots, closed = ConnectionSlots(3), []
    for i in range(3):
        assert opened(slots, f"c{i}", i, closed) is not None
    assert closed == [] and len(slots) == 3


def test_a_newcomer_evicts_the_longest_waiting_never_a_busy_one() -> None:
    slots, closed = ConnectionSlots(3), []
    first = opened(slots, "first", 0, closed)
    second = opened(slots, "second", 1, closed)
    third = opened(slots, "third", 2, closed)
    assert first and second and third
    first.busy()  # answering a request: not to be cut off
    third.waiting(0.5)  # back to idle before `second` started waiting
    assert opened(slots, "new", 3, closed) is not None
    assert closed == ["third"] and len(slots) == 3 and slots.evicted == 1
    assert opened(slots, "newer", 4, closed) is not None
    assert closed == ["third", "second"]


def test_when_all_are_busy_the_newcomer_is_refused() -> None:
    slots, closed = ConnectionSlots(2), []
    for i in range(2):
        slot = opened(slots, f"c{i}", i, closed)
        assert slot is not None
        slot.busy()
    assert opened(slots, "late", 5, closed) is None
    assert closed == [] and len(slots) == 2 and slots.refused == 1


def test_a_released_slot_frees_room_and_releasing_twice_is_harmless() -> None:
    slots, closed = ConnectionSlots(1), []
    slot = opened(slots, "a", 0, closed)
    assert slot is not None
    slot.busy()
    slots.release(slot)
    slots.release(slot)
    assert opened(slots, "b", 1, closed) is not None and closed == []


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        ConnectionSlots(0)
