"""The setup script behind ./start.sh and ./test.sh: quiet when there is nothing to do, and
a clear message instead of a failed build when Debian packages are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"


def test_second_run_does_nothing() -> None:
    # The suite runs after ./test.sh's own setup, so everything is in place already.
    out = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_missing_compiler_is_named_for_a_normal_user(tmp_path: Path) -> None:
    """A user without root and without a C compiler is told what to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    fake_id = bin_dir / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    out = subprocess.run(
        ["/bin/bash", str(SETUP)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert out.returncode == 1
    assert "build-essential" in out.stderr and "apt-get install build-essential" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_too_old_python_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")  # stands for an interpreter failing the version check
    old.chmod(0o755)
    out = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "COVEY_PYTHON": str(old)},
    )
    assert out.returncode == 1 and "Python 3.11 or newer" in out.stderr


def test_package_check_is_stable_under_cpu_load() -> None:
    """The Debian package check gives the same answer every time on a busy machine (it once
    reported installed libraries as missing when `ldconfig -p | grep -q` got a SIGPIPE)."""
    burn = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(3)]
    try:
        answers = {
            subprocess.run(["bash", str(SETUP), "--missing-packages"], capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
            for _ in range(40)
        }
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert answers == {""}, answers  # ./test.sh's own setup installed every one of them
