"""The one error inside what trio raised: what `covey node` prints and what a route re-raises."""

from __future__ import annotations

import errno

import pytest
import trio

from swarm.exception_groups import first_leaf


def test_the_first_error_of_a_kind_is_found_inside_nested_groups() -> None:
    busy = OSError(errno.EADDRINUSE, "address in use")
    group = BaseExceptionGroup("outer", [
        ValueError("first"),
        BaseExceptionGroup("inner", [KeyError("k"), busy, OSError("later")]),
    ])
    assert first_leaf(group, OSError) is busy
    assert isinstance(first_leaf(group, BaseException), ValueError)
    assert first_leaf(group, TimeoutError) is None


def test_an_error_that_is_no_group_is_its_own_leaf() -> None:
    error = ConnectionRefusedError("refused")
    assert first_leaf(error, OSError) is error
    assert first_leaf(error, ValueError) is None


def test_what_a_trio_nursery_raises_is_opened() -> None:
    async def fails() -> None:
        raise PermissionError("port 80")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main, strict_exception_groups=True)
    leaf = first_leaf(caught.value, OSError)
    assert isinstance(leaf, PermissionError) and str(leaf) == "port 80"
