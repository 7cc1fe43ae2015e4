"""The context an engine runs with: `--ctx N` as given, else the trained context capped by
memory; and the setting that remembers it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from backends.generation.context_size import FALLBACK_CTX, MIN_CTX, auto_context, context_for
from backends.gguf_info import GGUFInfo, estimate_memory, read_gguf_info
from swarm.node.main import _ctx_setting
from swarm.node.settings import Settings, SettingsError, load_settings, save_settings
from swarm.trust.token import new_token
from tests.support.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> GGUFInfo:
    big = read_gguf_info(write_tiny_gguf(tmp_path_factory.mktemp("ctx") / "tiny.gguf"))
    return dataclasses.replace(big, context_length=32768)


def test_the_trained_context_when_memory_allows(info: GGUFInfo) -> None:
    assert auto_context(info, 1 << 40) == 32768


def test_halved_until_it_fits_the_memory_share(info: GGUFInfo) -> None:
    room = estimate_memory(info, 4096).total_bytes * 2  # half of it is the share
    got = auto_context(info, room)
    assert got == 4096
    assert estimate_memory(info, got * 2).total_bytes > room / 2


def test_never_below_the_floor_and_unknown_means_fallback(info: GGUFInfo) -> None:
    assert auto_context(info, 0) == MIN_CTX
    assert auto_context(dataclasses.replace(info, context_length=256), 0) == 256
    assert auto_context(dataclasses.replace(info, context_length=0), 1 << 40) == FALLBACK_CTX


def test_the_users_choice_wins(info: GGUFInfo) -> None:
    assert context_for(info, 1000, 0) == 1000
    assert context_for(info, None, 1 << 40) == 32768


def test_ctx_is_remembered_and_zero_means_automatic(tmp_path: Path) -> None:
    saved = Settings(token=new_token().encode(), ctx=8192)
    save_settings(tmp_path, saved)
    loaded = load_settings(tmp_path)
    assert loaded is not None and loaded.ctx == 8192
    assert _ctx_setting(None, loaded) == 8192
    assert _ctx_setting(2048, loaded) == 2048
    assert _ctx_setting(0, loaded) is None
    assert _ctx_setting(None, None) is None
    (tmp_path / "swarm.json").write_text((tmp_path / "swarm.json").read_text()
                                         .replace("8192", "-5"))
    with pytest.raises(SettingsError, match="ctx"):
        load_settings(tmp_path)


def test_covey_node_takes_ctx() -> None:
    from app.cli.command import build_parser

    args = build_parser().parse_args(["node", "--ctx", "8192"])
    assert args.ctx == 8192
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--ctx", "-1"])
    assert isinstance(build_parser().parse_args(["node"]), argparse.Namespace)
