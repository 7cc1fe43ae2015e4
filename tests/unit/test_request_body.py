"""parse_body: a JSON body becomes a typed value, or a 400 that names the field at fault."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from swarm.api.body import null_ok, parse_body
from swarm.api.server import HttpError


@dataclass(frozen=True)
class Shape:
    enabled: bool
    count: int | None = None
    share: float | None = null_ok()
    label: str = "default"
    tags: list[str] | None = None


def refusal(body: Any, *, extra: bool = False) -> HttpError:
    with pytest.raises(HttpError) as caught:
        parse_body(body, Shape, extra=extra)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def test_a_full_body_becomes_the_typed_value() -> None:
    body = {"enabled": True, "count": 3, "share": 12, "label": "x", "tags": ["a", "b"]}
    value = parse_body(body, Shape)
    assert value == Shape(True, 3, 12.0, "x", ["a", "b"])
    assert isinstance(value.share, float)


def test_optional_fields_left_out_take_their_defaults() -> None:
    assert parse_body({"enabled": False}, Shape) == Shape(False, None, None, "default", None)


def test_null_is_absent_only_where_the_field_says_so() -> None:
    assert parse_body({"enabled": True, "share": None}, Shape).share is None
    for name in ("count", "label", "tags", "enabled"):
        error = refusal({"enabled": True, name: None})
        assert error.param == name and f'"{name}"' in error.message


def test_a_missing_required_field_is_named() -> None:
    error = refusal({"count": 1})
    assert error.param == "enabled"
    assert error.message == '"enabled" is required'


@pytest.mark.parametrize(("name", "value", "wanted"), [
    ("enabled", "yes", "a boolean"),
    ("enabled", 1, "a boolean"),
    ("count", True, "an integer"),  # JSON true is no number, though Python's bool is an int
    ("count", 1.5, "an integer"),
    ("count", "3", "an integer"),
    ("share", False, "a number"),
    ("share", "50", "a number"),
    ("label", 7, "a string"),
    ("tags", "a", "a list of strings"),
    ("tags", [{}], "a list of strings"),
    ("tags", ["a", 1], "a list of strings"),
])
def test_a_value_of_the_wrong_type_is_named(name: str, value: Any, wanted: str) -> None:
    error = refusal({"enabled": True, name: value})
    assert error.param == name
    assert error.message == f'"{name}" must be {wanted}'


def test_unknown_fields_are_refused_unless_extra_is_allowed() -> None:
    error = refusal({"enabled": True, "colour": "red"})
    assert error.param == "colour"
    assert error.message.startswith('unknown field "colour"')
    assert '"enabled" (required)' in error.message  # says what the endpoint takes
    assert parse_body({"enabled": True, "colour": "red"}, Shape, extra=True).enabled is True


@pytest.mark.parametrize("body", [None, [], "enabled", 3, [{"enabled": True}]])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    error = refusal(body)
    assert error.message.startswith("send a JSON object with")
    assert error.param is None


def test_every_field_is_checked_before_any_value_is_returned() -> None:
    # The first field is fine and the last is not: the caller gets no value to act on.
    error = refusal({"enabled": True, "label": "ok", "tags": [{}]})
    assert error.param == "tags"


def test_an_unsupported_annotation_is_a_programming_error() -> None:
    @dataclass
    class Odd:
        when: dict[str, str]

    with pytest.raises(TypeError):
        parse_body({"when": {}}, Odd)
