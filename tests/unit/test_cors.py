"""Who may reach the API: browser origins (CORS) and Host names, as pure rules."""

from __future__ import annotations

import pytest

from swarm.api.cors import CorsPolicy, check_host_name, host_values, normalize_origin
from swarm.node.main import _cors_origins

POLICY = CorsPolicy.of(["http://localhost:3000", "HTTPS://Chat.Example:443/"])
PREFLIGHT = {"origin": "http://localhost:3000", "access-control-request-method": "POST"}


def test_origins_are_normalized_as_browsers_send_them() -> None:
    assert POLICY.origins == {"http://localhost:3000", "https://chat.example"}
    assert normalize_origin("http://example.com:80") == "http://example.com"
    for bad in ("localhost:3000", "ftp://x", "http://x/path", "http://u:p@x", "*", ""):
        with pytest.raises(ValueError):
            normalize_origin(bad)
    with pytest.raises(ValueError, match="--cors-origin"):
        _cors_origins(["*"])


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://chat.example",
                                    "https://chat.example:443"])
def test_allowed_origins(origin: str) -> None:
    assert POLICY.allows(origin)
    assert POLICY.response_headers(origin)["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", [None, "", "null", "http://localhost:3001",
                                    "http://localhost:3000.evil.example", "https://localhost:3000",
                                    "http://evil.example"])
def test_other_origins_get_no_cors_header(origin: str | None) -> None:
    assert not POLICY.allows(origin)
    assert not any(k.startswith("access-control-") for k in POLICY.response_headers(origin))
    assert POLICY.preflight_headers({**PREFLIGHT, "origin": origin or ""}) is None


def test_preflight_only_with_a_list() -> None:
    assert POLICY.is_preflight("OPTIONS", PREFLIGHT)
    assert not POLICY.is_preflight("GET", PREFLIGHT)
    assert not POLICY.is_preflight("OPTIONS", {"origin": "http://localhost:3000"})
    assert not CorsPolicy().is_preflight("OPTIONS", PREFLIGHT)  # no list: the gate answers
    assert CorsPolicy().response_headers("http://localhost:3000") == {}


def test_preflight_reflects_only_well_formed_header_names() -> None:
    got = POLICY.preflight_headers({**PREFLIGHT, "access-control-request-headers":
                                    "Authorization, Content-Type"})
    assert got is not None and got["access-control-allow-headers"] == \
        "authorization, content-type"
    assert POLICY.preflight_headers({**PREFLIGHT, "access-control-request-headers":
                                     "x-ok, bad header\r\nx: y"}) is None


def test_host_names() -> None:
    assert host_values(["host.docker.internal", "fe80::1", "Box"], 8080) == {
        "host.docker.internal:8080", "[fe80::1]:8080", "box:8080"}
    assert "example.lan" in host_values(["example.lan"], 80)
    assert check_host_name("Host.Docker.Internal") == "host.docker.internal"
    for bad in ("", "a b", "evil.example:80/x", "*"):
        with pytest.raises(ValueError, match="--api-host"):
            check_host_name(bad)


def test_covey_node_takes_the_reach_options() -> None:
    from app.cli.command import build_parser

    args = build_parser().parse_args(["node", "--cors-origin", "http://a:1", "--cors-origin",
                                      "http://b:2", "--api-host", "host.docker.internal"])
    assert args.cors_origin == ["http://a:1", "http://b:2"]
    assert args.api_host == ["host.docker.internal"]
