"""What a node lends as a relay: `covey node --relay-max-circuits/--relay-rate-mib/
--relay-circuit-mib`, checked as given, remembered in the settings, and turned into the
relay's limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli.command import build_parser
from swarm.net.relay_limits import MiB, RelayLimits
from swarm.node.main import resolve_settings
from swarm.node.settings import Settings, SettingsError, load_settings, save_settings
from swarm.trust.token import new_token

TOKEN = new_token().encode()


def _resolve(tmp_path: Path, *options: str) -> Settings:
    args = build_parser().parse_args(["node", "--token", TOKEN, *options])
    settings = resolve_settings(args, tmp_path)
    save_settings(tmp_path, settings)
    return settings


def test_relay_limits_are_remembered_and_zero_goes_back_to_the_default(tmp_path: Path) -> None:
    chosen = _resolve(tmp_path, "--relay-max-circuits", "2", "--relay-rate-mib", "1.5",
                      "--relay-circuit-mib", "1024")
    limits = chosen.relay_limits()
    assert (limits.max_circuits, limits.max_circuits_per_peer) == (2, 2)
    assert limits.rate_bytes_s == 1.5 * MiB and limits.circuit_bytes == 1024 * MiB
    assert _resolve(tmp_path).relay_limits() == limits  # remembered across starts
    back = _resolve(tmp_path, "--relay-max-circuits", "0", "--relay-circuit-mib", "0")
    assert back.relay_limits() == RelayLimits(rate_bytes_s=1.5 * MiB)
    assert load_settings(tmp_path) == back


def test_unset_relay_limits_are_the_defaults() -> None:
    assert Settings(token=TOKEN).relay_limits() == RelayLimits()


@pytest.mark.parametrize("option, value", [
    ("--relay-max-circuits", "-1"), ("--relay-max-circuits", "2.5"),
    ("--relay-max-circuits", "100000"), ("--relay-rate-mib", "fast"),
    ("--relay-rate-mib", "-3"), ("--relay-circuit-mib", "lots"),
])
def test_covey_node_refuses_a_bad_relay_limit_and_says_what_it_takes(
        option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", option, value])
    error = capsys.readouterr().err
    assert option in error and f"{value!r} is not a" in error and "from 0 to" in error


@pytest.mark.parametrize("key, value", [
    ("relay_max_circuits", 0), ("relay_max_circuits", 2.5), ("relay_max_circuits", True),
    ("relay_rate_mib", -1), ("relay_rate_mib", "8"), ("relay_circuit_mib", 1 << 30),
])
def test_a_damaged_relay_setting_is_named(tmp_path: Path, key: str, value: object) -> None:
    save_settings(tmp_path, Settings(token=TOKEN))
    path = tmp_path / "swarm.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(SettingsError, match=key):
        load_settings(tmp_path)
