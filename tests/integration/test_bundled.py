"""Bundled models assembled from their part packages: registered once, checked against the
pinned sha256 while being written, and named clearly when a part is damaged or missing."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from backends.store import bundled, model_store
from backends.store.bundled import BundledModel, BundledModelDamaged, BundledModelMissing
from backends.store.model_store import ModelStore


def split_into_packages(model: Path, where: Path, parts: int) -> tuple[tuple[str, str], ...]:
    """`model` cut into `parts` packages laid out as the registry's are (pkgN/data/partNN)."""
    data = model.read_bytes()
    step = -(-len(data) // parts)
    names = []
    for i in range(parts):
        package = where / f"fake_model_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (package / "data" / f"part{i + 1:02d}.bin").write_bytes(data[i * step:(i + 1) * step])
        names.append((package.name, f"data/part{i + 1:02d}.bin"))
    return tuple(names)


@pytest.fixture
def fake(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BundledModel:
    site = tmp_path / "site"
    parts = split_into_packages(tiny_model, site, 3)
    monkeypatch.syspath_prepend(str(site))
    data = tiny_model.read_bytes()
    model = BundledModel(name="fake-instruct", title="Fake Instruct", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), parts=parts,
                         requirement="fake-model-part1 … fake-model-part3")
    monkeypatch.setitem(model_store.BUNDLED, model.name, model)
    return model


def test_a_bundled_model_is_assembled_once_with_progress_and_no_second_copy(
        fake: BundledModel, tmp_path: Path) -> None:
    root = tmp_path / "models"
    seen: list[tuple[int, int | None]] = []
    entry = ModelStore(root).ensure(fake.name, lambda done, total: seen.append((done, total)))
    assert entry.path.read_bytes() == b"".join(p.read_bytes() for p in bundled.part_paths(fake))
    assert (entry.manifest.source, entry.manifest.sha256) == ("bundled", fake.sha256)
    assert seen[-1] == (fake.size, fake.size) and len(seen) >= 1
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["fake-instruct.gguf", "fake-instruct.json"]  # nothing staged is left
    assert "fake_model_part1" not in sys.modules  # found, never imported
    mtime = entry.path.stat().st_mtime_ns
    assert ModelStore(root).ensure(fake.name).path.stat().st_mtime_ns == mtime


def test_a_damaged_part_is_refused_naming_both_hashes(fake: BundledModel,
                                                      tmp_path: Path) -> None:
    last = bundled.part_paths(fake)[-1]
    damaged = bytearray(last.read_bytes())
    damaged[-1] ^= 0xFF
    last.write_bytes(bytes(damaged))
    root = tmp_path / "models"
    with pytest.raises(BundledModelDamaged, match=f"not {fake.size:,} bytes with sha256 "
                                                  f"{fake.sha256}. Reinstall fake-model"):
        ModelStore(root).ensure(fake.name)
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_a_missing_part_names_what_to_install(fake: BundledModel, tmp_path: Path) -> None:
    os.remove(bundled.part_paths(fake)[1])
    with pytest.raises(BundledModelMissing, match="install fake-model-part1 … fake-model-part3"):
        ModelStore(tmp_path / "models").ensure(fake.name)


def test_the_chat_default_is_the_instruction_tuned_model_unless_overridden(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundled.DEFAULT_MODEL_ENV, "tiny")
    assert bundled.chat_model() == "tiny" and bundled.prepare_at_start() is None
    monkeypatch.setenv(bundled.DEFAULT_MODEL_ENV, bundled.GEMMA.name)
    assert bundled.prepare_at_start() is None
    assert bundled.prepare_at_start(asked=True) == bundled.GEMMA.name  # the first-run test
    monkeypatch.delenv(bundled.DEFAULT_MODEL_ENV)
    monkeypatch.setattr(bundled, "installed", lambda model: True)
    assert bundled.chat_model() == bundled.QWEN.name == bundled.prepare_at_start()
    assert bundled.offered() == sorted([bundled.GEMMA.name, bundled.QWEN.name])
    monkeypatch.setattr(bundled, "installed", lambda model: False)
    assert bundled.chat_model() == bundled.GEMMA.name  # a checkout without the parts


def test_the_pinned_qwen_parts_make_the_pinned_file() -> None:
    if not bundled.installed(bundled.QWEN):
        pytest.skip("the Qwen part packages are not installed")
    digest = hashlib.sha256()
    for path in bundled.part_paths(bundled.QWEN):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    assert digest.hexdigest() == bundled.QWEN.sha256


def test_covey_node_prepare_at_start_is_a_hidden_test_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli.command import build_parser

    assert build_parser().parse_args(["node", "--prepare-at-start"]).prepare_at_start is True
    assert build_parser().parse_args(["node"]).prepare_at_start is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--help"])
    shown = capsys.readouterr().out
    assert "--ctx" in shown and "--prepare-at-start" not in shown
