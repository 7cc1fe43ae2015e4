"""The `covey` command as a user runs it: chat one-shot and interactive, models, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.layer_split import layers_per_device
from tests.conftest import Worker

pytestmark = pytest.mark.processes

COVEY = str(Path(sys.executable).parent / "covey")


def covey(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COVEY, "--data-dir", str(data_dir), *args],
        input=stdin, capture_output=True, text=True, timeout=120,
        env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )


def test_one_shot_json_reply(tiny_model: Path, tmp_path: Path) -> None:
    out = covey(tmp_path, "chat", "hello", "--model", str(tiny_model), "--max-tokens", "8",
                "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["version"] == 1
    assert len(reply["tokens"]) == 8 and reply["finish_reason"] == "length"
    assert reply["timings"]["load_s"] > 0 and reply["timings"]["generation_tokens_per_s"] > 0
    assert reply["devices"] == [
        {"name": "CPU", "endpoint": None, "layers": 4, "holds_output": True}
    ]


def test_json_over_two_workers_names_them(
    tiny_model: Path, tmp_path: Path, rpc_workers: Callable[..., Worker]
) -> None:
    w1, w2 = rpc_workers(), rpc_workers()
    out = covey(tmp_path, "chat", "hello", "--model", str(tiny_model), "--max-tokens", "4",
                "--rpc", f"{w1.endpoint},{w2.endpoint}", "--tensor-split", "1,3", "--json",
                "--deterministic", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    layers = {d["endpoint"]: d["layers"] for d in json.loads(out.stdout)["devices"]}
    assert [layers[w1.endpoint], layers[w2.endpoint]] == layers_per_device(4, [1, 3])


def test_streamed_reply_matches_json_text(tiny_model: Path, tmp_path: Path) -> None:
    args = ("chat", "hello", "--model", str(tiny_model), "--max-tokens", "12", "--seed", "1")
    streamed = covey(tmp_path, *args)
    as_json = covey(tmp_path, *args, "--json")
    assert streamed.returncode == 0 and as_json.returncode == 0
    assert streamed.stdout.strip() == json.loads(as_json.stdout)["text"].strip()
    assert "generation" in streamed.stderr and "tok/s" in streamed.stderr


def test_interactive_chat_keeps_the_conversation(tiny_model: Path, tmp_path: Path) -> None:
    out = covey(tmp_path, "chat", "--model", str(tiny_model), "--max-tokens", "4",
                stdin="hello\nthe cat\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("covey> ") == 2


def test_unknown_model_names_the_available_ones(tiny_model: Path, tmp_path: Path) -> None:
    assert covey(tmp_path, "models", "import", str(tiny_model), "--name", "tiny").returncode == 0
    out = covey(tmp_path, "chat", "hi", "--model", "no-such-model")
    assert out.returncode == 1
    assert "no-such-model" in out.stderr and "tiny" in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_worker_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    out = covey(tmp_path, "chat", "hi", "--model", str(tiny_model), "--rpc", "127.0.0.1:1")
    assert out.returncode == 1
    assert "no RPC worker answers at 127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rpc", "127.0.0.1:5", "--tensor-split", "1,2"], "one value per --rpc endpoint"),
        (["--rpc", "nonsense"], "is not HOST:PORT"),
        (["--tensor-split", "a,b"], "not a list of numbers"),
        (["--max-tokens", "-3"], "--max-tokens must be"),
    ],
)
def test_bad_flags_are_explained(
    tiny_model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = covey(tmp_path, "chat", "hi", "--model", str(tiny_model), *args)
    assert out.returncode == 2 and message in out.stderr


def test_models_import_list_remove(tiny_model: Path, tmp_path: Path) -> None:
    assert covey(tmp_path, "models", "import", str(tiny_model), "--name", "tiny").returncode == 0
    listed = json.loads(covey(tmp_path, "models", "list", "--json").stdout)
    assert [(m["name"], m["info"]["n_layers"]) for m in listed] == [("tiny", 4)]
    table = covey(tmp_path, "models", "list").stdout
    assert "tiny" in table and "llama" in table
    assert covey(tmp_path, "models", "remove", "tiny").returncode == 0
    assert json.loads(covey(tmp_path, "models", "list", "--json").stdout) == []
    gone = covey(tmp_path, "models", "remove", "tiny")
    assert gone.returncode == 1 and "tiny" in gone.stderr


def test_models_rename_and_its_refusals(tiny_model: Path, tmp_path: Path) -> None:
    for name in ("tiny", "other", "kept"):
        assert covey(tmp_path, "models", "import", str(tiny_model), "--name", name).returncode == 0
    renamed = covey(tmp_path, "models", "rename", "tiny", "mine")
    assert renamed.returncode == 0 and renamed.stdout == "renamed tiny to mine\n"

    kept = tmp_path / "models" / "kept.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "source": "bundled"}))
    for old, new, why in (("mine", "other", "already a model named 'other'"),
                          ("tiny", "again", "No model named 'tiny'"),
                          ("mine", "Not OK!", "not a valid model name"),
                          ("kept", "fine", "comes with Covey")):
        refused = covey(tmp_path, "models", "rename", old, new)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
    names = [m["name"] for m in json.loads(covey(tmp_path, "models", "list", "--json").stdout)]
    assert names == ["kept", "mine", "other"]


def test_importing_a_non_model_changes_nothing(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    out = covey(tmp_path / "data", "models", "import", str(notes))
    assert out.returncode == 1 and "GGUF" in out.stderr
    assert json.loads(covey(tmp_path / "data", "models", "list", "--json").stdout) == []


@pytest.mark.gemma
def test_bundled_model_answers_the_readme_question(tmp_path: Path) -> None:
    out = covey(tmp_path, "chat", "What is the capital of France?", "--max-tokens", "32",
                "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert "Paris" in reply["text"]
    assert reply["devices"][0]["layers"] == 18


def test_models_download_shows_progress_and_lands_in_the_store(
    tiny_model: Path, tmp_path: Path
) -> None:
    from backends.store.download import sha256_file
    from tests.support.fault_server import FaultServer

    with FaultServer() as server:
        url = server.add("/files/tiny.gguf", tiny_model.read_bytes())
        out = covey(tmp_path, "models", "download", url, "--sha256", sha256_file(tiny_model))
        wrong = covey(tmp_path, "models", "download", url, "--name", "other",
                      "--sha256", "0" * 64)
    assert out.returncode == 0, out.stderr
    assert "100.0%" in out.stderr
    assert wrong.returncode == 1 and "sha256" in wrong.stderr
    listed = json.loads(covey(tmp_path, "models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny"]


def test_reader_closing_the_pipe_early_is_not_an_error(tiny_model: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [COVEY, "--data-dir", str(tmp_path), "chat", "hello", "--model", str(tiny_model),
         "--max-tokens", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)  # like `| head -c 1`
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert b"Traceback" not in proc.stderr.read()


def test_import_shows_progress(tiny_model: Path, tmp_path: Path) -> None:
    out = covey(tmp_path, "models", "import", str(tiny_model))
    assert out.returncode == 0 and "100.0%" in out.stderr


def test_system_message_reaches_the_prompt(tiny_model: Path, tmp_path: Path) -> None:
    def prompt_tokens(*extra: str) -> int:
        out = covey(tmp_path, "chat", "hello", "--model", str(tiny_model), "--max-tokens", "1",
                    "--json", *extra)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["prompt_tokens"]

    assert prompt_tokens("--system", "be brief") > prompt_tokens()
