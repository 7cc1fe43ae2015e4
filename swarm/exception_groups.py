"""The one error that explains a failure, found inside what trio raised.

trio's nurseries wrap what their tasks raise in exception groups, nested one per nursery;
callers that report or re-raise a single error open them here.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def first_leaf(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in `exc`, depth first through nested groups; else None.

    `exc` itself when it is no group and is a `kind`.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_leaf(inner, kind)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kind) else None


def only_of(exc: BaseException, kind: type[BaseException]) -> bool:
    """True when `exc` is a `kind`, or a group (however nested) holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_of(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)
