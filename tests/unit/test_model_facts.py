"""The facts of a model as the models list shows them, from the tiny GGUF the tests write."""

from __future__ import annotations

from pathlib import Path

from backends.gguf_info import read_gguf_info
from backends.sizes import human_bytes
from backends.store.model_facts import (
    context_words,
    facts_words,
    model_facts,
    parameters_words,
)
from tests.support.tiny_gguf import write_tiny_gguf


def test_facts_of_a_tiny_gguf(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", context_length=8192)
    info = read_gguf_info(path)
    facts = model_facts(info)
    assert (facts.quantization, facts.context_length) == ("F32", 8192)
    assert facts.file_size == path.stat().st_size
    assert facts.parameters == info.parameters
    words = facts_words({"parameters": 190_144, "quantization": "F32",
                         "context_length": 8192, "file_size": facts.file_size})
    assert words == {"parameters": "190K", "quantization": "F32", "context": "8K tokens",
                     "size": human_bytes(facts.file_size)}


def test_numbers_in_the_words_model_names_use() -> None:
    assert [parameters_words(n) for n in (268_098_176, 494_032_768, 1_543_714_304,
                                          7_000_000_000, 999_700_000, 12_300_000, 950)] == [
        "268M", "494M", "1.5B", "7B", "1B", "12.3M", "950"]
    assert [context_words(n) for n in (32_768, 131_072, 2048, 1000, 0)] == [
        "32K tokens", "128K tokens", "2K tokens", "1,000 tokens", "unknown"]
    assert facts_words(None) == {"parameters": "—", "quantization": "—", "context": "—",
                                 "size": "—"}


def test_the_makers_size_label_wins(tmp_path: Path) -> None:
    """Qwen2.5 0.5B's tensors count 630M (a separate output layer); people know it as 0.5B."""
    facts = model_facts(read_gguf_info(write_tiny_gguf(tmp_path / "l.gguf", size_label="0.5B")))
    assert facts.size_label == "0.5B"
    words = facts_words({"parameters": 630_167_424, "quantization": "Q4_K_M",
                         "context_length": 32_768, "file_size": 491_400_064,
                         "size_label": facts.size_label})
    assert (words["parameters"], words["context"]) == ("0.5B", "32K tokens")
    assert model_facts(read_gguf_info(write_tiny_gguf(tmp_path / "n.gguf"))).size_label is None
