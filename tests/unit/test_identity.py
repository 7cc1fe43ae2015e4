"""The node key and remembered settings: kept across restarts, private, damage reported."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from swarm.node.settings import Settings, SettingsError, load_settings, save_settings
from swarm.trust.identity import KEY_FILE, IdentityError, load_or_create_identity, verify


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_peer_id_survives_a_restart_and_the_key_file_is_private(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert first.peer_id == again.peer_id
    assert mode(tmp_path / KEY_FILE) == 0o600
    signature = first.sign(b"hello")
    assert verify(first.peer_id.to_base58(), b"hello", signature)
    assert not verify(first.peer_id.to_base58(), b"hellO", signature)
    assert not verify("not-a-peer-id", b"hello", signature)


def test_a_key_file_readable_by_others_is_narrowed(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    load_or_create_identity(tmp_path)
    assert mode(tmp_path / KEY_FILE) == 0o600


def test_a_damaged_key_file_is_reported_not_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("{not json")
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_identity(tmp_path)
    assert (tmp_path / KEY_FILE).read_text() == "{not json"


def test_settings_round_trip_private(tmp_path: Path) -> None:
    assert load_settings(tmp_path) is None
    settings = Settings(token="covey1abc", name="desk", bootstrap=["/ip4/1.2.3.4/tcp/1/p2p/x"])
    save_settings(tmp_path, settings)
    assert load_settings(tmp_path) == settings
    assert mode(tmp_path / "swarm.json") == 0o600
    (tmp_path / "swarm.json").write_text("[]")
    with pytest.raises(SettingsError, match="damaged"):
        load_settings(tmp_path)


def test_where_prompts_may_go_is_remembered_until_changed(tmp_path: Path) -> None:
    """`covey node --no-remote-prompts` once keeps prompts here at every later start."""
    import json

    from app.cli.command import build_parser
    from swarm.node.main import resolve_settings
    from swarm.trust.token import new_token

    token = new_token().encode()

    def start(*options: str) -> Settings:
        args = build_parser().parse_args(["node", *options])
        settings = resolve_settings(args, tmp_path)
        save_settings(tmp_path, settings)
        return settings

    first = start("--token", token)
    assert first.remote_prompts and first.prefer_route == "auto"
    assert not start("--no-remote-prompts", "--prefer-route", "local").remote_prompts
    again = start()
    assert (again.remote_prompts, again.prefer_route) == (False, "local")
    assert start("--remote-prompts").remote_prompts
    # A file written before these settings existed reads with them on.
    (tmp_path / "swarm.json").write_text(json.dumps({"token": token, "version": 1}))
    assert load_settings(tmp_path) == Settings(token=token)
    (tmp_path / "swarm.json").write_text(json.dumps(
        {"token": token, "version": 1, "remote_prompts": "no"}))
    with pytest.raises(SettingsError, match="remote_prompts must be true or false"):
        load_settings(tmp_path)
