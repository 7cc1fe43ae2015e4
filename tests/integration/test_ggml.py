"""The ctypes bindings to ggml inside llama-cpp-python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends import ggml

pytestmark = pytest.mark.processes


def meminfo_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_cpu_device_reports_the_machine_memory() -> None:
    cpus = [d for d in ggml.devices() if d.type == "cpu"]
    assert len(cpus) == 1
    assert abs(cpus[0].total_bytes - meminfo_total_bytes()) < 64 * 2**20
    assert 0 < cpus[0].free_bytes <= cpus[0].total_bytes


def test_rpc_library_is_the_soname_copy() -> None:
    lib = ggml.check_rpc_support()
    assert lib.name == "libggml-rpc.so.0" and lib.exists()


@pytest.mark.parametrize(
    "command, code",
    [(["worker-rpc"], 2), (["chat", "hi", "--rpc", "127.0.0.1:5"], 1)],
)
def test_llama_cpp_without_rpc_gets_a_clear_error(
    tmp_path: Path, command: list[str], code: int
) -> None:
    """A llama_cpp built without -DGGML_RPC=on: Covey refuses to use RPC and says why."""
    fake = tmp_path / "llama_cpp"
    (fake / "lib").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "--data-dir", str(tmp_path / "data"), *command],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path.cwd()}"},
    )
    assert out.returncode == code
    assert "no RPC backend" in out.stderr and "GGML_RPC=on" in out.stderr
    assert out.stdout == ""
