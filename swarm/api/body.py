"""JSON request bodies read into typed values: the one check between a body and a handler.

`parse_body(body, Shape)` turns a decoded JSON body into an instance of `Shape`, a dataclass
whose fields are the body's fields: a field without a default is required, one with a default
optional. Each value must match its annotation (bool, int, float for any JSON number, str, or
a list of one of these; `X | None` for an optional field left out). JSON null is refused
unless the field is declared with `null_ok()`, which reads null as absent. Every refusal is
the API's 400, naming the field in the message and in `param`.
"""

from __future__ import annotations

import types
from dataclasses import MISSING, Field, field, fields
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin, get_type_hints

from swarm.api.server import HttpError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Shape = TypeVar("Shape", bound="DataclassInstance")

_NULL_OK = "null_ok"
# Scalar annotation: (a value of it, several of them); bool is not an int here, as in JSON.
_KINDS: dict[type, tuple[str, str]] = {
    bool: ("a boolean", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def null_ok() -> Any:
    """An optional field (default None) that also takes JSON null, read as absent."""
    return field(default=None, metadata={_NULL_OK: True})


def parse_body(body: Any, shape: type[Shape], *, extra: bool = False) -> Shape:
    """`body` (from `Request.json()`) as a `shape`, or HttpError(400) saying what is wrong.

    With `extra`, fields `shape` does not name are ignored; without, they are refused."""
    spec = fields(shape)
    hints = get_type_hints(shape)
    if not isinstance(body, dict):
        raise HttpError(400, f"send a JSON object with {_listing(spec)}")
    if not extra:
        unknown = sorted(set(body) - {f.name for f in spec})
        if unknown:
            raise HttpError(400, f'unknown field "{unknown[0]}": send {_listing(spec)}',
                            param=unknown[0])
    values: dict[str, Any] = {}
    for f in spec:
        if f.name not in body:
            if _required(f):
                raise HttpError(400, f'"{f.name}" is required', param=f.name)
            continue
        value = body[f.name]
        if value is None and f.metadata.get(_NULL_OK):
            continue
        values[f.name] = _checked(f.name, value, hints[f.name])
    return shape(**values)


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _listing(spec: tuple[Field[Any], ...]) -> str:
    return ", ".join(f'"{f.name}"' + (" (required)" if _required(f) else "") for f in spec)


def _checked(name: str, value: Any, annotation: Any) -> Any:
    """`value` as the annotation's type, or HttpError(400) naming the field."""
    kind = _without_none(annotation)
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if isinstance(value, list) and all(_matches(v, item) for v in value):
            return [_converted(v, item) for v in value]
        raise HttpError(400, f'"{name}" must be a list of {_KINDS[item][1]}', param=name)
    if _matches(value, kind):
        return _converted(value, kind)
    raise HttpError(400, f'"{name}" must be {_KINDS[kind][0]}', param=name)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported field type {annotation!r}")
        return rest[0]
    return annotation


def _matches(value: Any, kind: Any) -> bool:
    if kind not in _KINDS:
        raise TypeError(f"unsupported field type {kind!r}")
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def _converted(value: Any, kind: Any) -> Any:
    return float(value) if kind is float else value
