"""`covey node` given its token by file or standard input, as a user meets it: clear refusals,
and a warning when the token is put on the command line. No network is used: each run stops
at a bad option before the node starts (the running node is in test_api_limits.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

COVEY = str(Path(sys.executable).parent / "covey")


def covey(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([COVEY, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_a_missing_token_file_is_named_and_nothing_is_saved(tmp_path: Path) -> None:
    out = covey("node", "--data-dir", str(tmp_path / "d"), "--token-file", str(tmp_path / "no"))
    assert out.returncode == 2, out.stderr
    assert f"--token-file {tmp_path / 'no'}" in out.stderr and "No such file" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "d" / "swarm.json").exists()


def test_a_token_file_with_a_damaged_token_is_refused(tmp_path: Path) -> None:
    good = covey("token", "new").stdout.strip()
    (tmp_path / "token").write_text(good[:-5] + "\n")
    out = covey("node", "--data-dir", str(tmp_path / "d"), "--token-file", str(tmp_path / "token"))
    assert out.returncode == 2 and "truncated" in out.stderr, out.stderr
    assert "warning" not in out.stderr


def test_empty_standard_input_is_refused(tmp_path: Path) -> None:
    out = covey("node", "--data-dir", str(tmp_path), "--token", "-", stdin="")
    assert out.returncode == 2 and "standard input" in out.stderr, out.stderr
    assert "warning" not in out.stderr


def test_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    out = covey("node", "--data-dir", str(tmp_path), "--token", "-", "--token-file", "x")
    assert out.returncode == 2 and "not allowed with" in out.stderr


def test_a_token_on_the_command_line_warns_and_points_to_the_safe_ways(tmp_path: Path) -> None:
    token = covey("token", "new").stdout.strip()
    out = covey("node", "--data-dir", str(tmp_path), "--token", token, "--listen", "garbage")
    assert out.returncode == 2
    assert "warning" in out.stderr and "every user of this machine" in out.stderr
    assert "--token-file FILE" in out.stderr and "--token -" in out.stderr
