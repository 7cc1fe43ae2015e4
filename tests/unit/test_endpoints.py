"""HOST:PORT as `covey chat --rpc`, `covey node --api-listen` and the worker tunnels read it."""

from __future__ import annotations

import pytest

from backends.endpoints import is_loopback, split_host_port


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:50052", ("127.0.0.1", 50052)),
    ("worker.local:1", ("worker.local", 1)),
    ("[::1]:8080", ("::1", 8080)),
    ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ("  10.0.0.2:9000 ", ("10.0.0.2", 9000)),
])
def test_host_and_port_are_split(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", [
    "127.0.0.1",  # no port
    "127.0.0.1:",  # empty port
    ":8080",  # no host
    "[]:8080",  # empty brackets
    "127.0.0.1:0",  # port out of range
    "127.0.0.1:65536",
    "127.0.0.1:-1",
    "127.0.0.1:http",
    "127.0.0.1:8O80",
    "127.0.0.1:²",  # a digit to str.isdigit, not to int()
    "::1:8080",  # IPv6 without brackets is ambiguous
    "::1",
    "[::1:8080",  # unbalanced bracket
    "::1]:8080",
    "",
])
def test_anything_else_is_refused_with_the_text_in_the_message(text: str) -> None:
    with pytest.raises(ValueError) as err:
        split_host_port(text)
    assert repr(text) in str(err.value)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.10", "::1"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "0.0.0.0", "::", "example.org", ""))
