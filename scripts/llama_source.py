"""llama-cpp-python's source with Covey's patches applied: what scripts/setup.sh and
installers/build.py build the llama-cpp-python wheel from.

    python3 scripts/llama_source.py patch-hash           # part of the wheel cache key
    python3 scripts/llama_source.py prepare VERSION DEST # prints the patched source folder

The patches are patches/*.patch, applied in name order with `patch -p1` (`git apply` where
there is no `patch`, as on a Windows runner); a changed patch changes `patch_hash`, so the
wheel is built again. The sdist is downloaded once into ~/.cache/covey/sdist. Standard
library only: setup.sh runs it before anything else is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "patches"
SDIST_NAME = "llama_cpp_python"


def patches(patch_dir: Path = PATCH_DIR) -> list[Path]:
    return sorted(patch_dir.glob("*.patch"))


def patch_hash(patch_dir: Path = PATCH_DIR) -> str:
    """SHA-256 over every patch's name and text, in the order they are applied."""
    digest = hashlib.sha256()
    for path in patches(patch_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def patch_command(patch: Path, *, dry_run: bool = False) -> list[str]:
    """The command applying `patch` inside an unpacked sdist."""
    if shutil.which("patch"):
        return ["patch", "-p1", "--forward", "--batch", "-i", str(patch),
                *(["--dry-run"] if dry_run else [])]
    return ["git", "apply", "-p1", *(["--check"] if dry_run else []), str(patch)]


def apply_patches(source: Path, patch_dir: Path = PATCH_DIR, *, dry_run: bool = False) -> None:
    for patch in patches(patch_dir):
        # stdout carries only the source folder (setup.sh reads it), so the tools' talk goes
        # to stderr
        subprocess.run(patch_command(patch, dry_run=dry_run), cwd=source, check=True,
                       stdout=sys.stderr)


def sdist_cache(cache_home: Path) -> Path:
    return cache_home / "covey" / "sdist"


def download_sdist(python: str, version: str, cache_dir: Path) -> Path:
    """The sdist of llama-cpp-python `version`, from the cache or else from PyPI."""
    sdist = cache_dir / f"{SDIST_NAME}-{version}.tar.gz"
    if not sdist.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", "-d", str(cache_dir), f"llama-cpp-python=={version}"],
                       check=True, stdout=sys.stderr)
    return sdist


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack `sdist` into `dest` (emptied first) and return its top folder."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


def prepare(version: str, dest: Path, cache_home: Path, python: str = sys.executable) -> Path:
    """Download, unpack and patch llama-cpp-python `version` under `dest`."""
    source = unpack(download_sdist(python, version, sdist_cache(cache_home)), dest)
    apply_patches(source)
    return source


def cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


def main(argv: list[str]) -> int:
    if argv == ["patch-hash"]:
        print(patch_hash())
        return 0
    if len(argv) == 3 and argv[0] == "prepare":
        print(prepare(argv[1], Path(argv[2]), cache_home()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
