"""The facts a person compares models by: parameters, quantization, trained context, file size.

Owns turning a GGUF header (`gguf_info.GGUFInfo`) into those facts, the record that carries
them from the node to the app, and the short words they are shown in ("270M", "Q4_K_M",
"32K tokens"). Pure functions only; reading the file is gguf_info's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.gguf_info import GGUFInfo
from backends.sizes import human_bytes

FACTS_VERSION = 1


@dataclass(frozen=True)
class ModelFacts:
    """What one model file is, in the numbers its GGUF header gives."""

    parameters: int
    quantization: str
    context_length: int  # tokens the model was trained for; 0 if the file does not say
    file_size: int
    size_label: str | None = None  # how its makers name its size ("0.5B"), if the file says
    version: int = FACTS_VERSION


def model_facts(info: GGUFInfo) -> ModelFacts:
    """The facts of a model from its GGUF header."""
    return ModelFacts(parameters=info.parameters, quantization=info.quantisation,
                      context_length=info.context_length, file_size=info.file_size,
                      size_label=info.size_label)


def parameters_words(n: int) -> str:
    """A parameter count as model names write it: 270M, 1.5B, 7B, 950K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale * 0.9995:  # 999.6M reads "1B", not "1000M"
            value = n / scale
            if value >= 100:  # "270M" rather than "270.4M"
                return f"{value:.0f}{unit}"
            return f"{value:.1f}".removesuffix(".0") + unit
    return str(n)


def context_words(tokens: int) -> str:
    """A trained context as people say it: 32K tokens for 32,768; unknown when 0."""
    if tokens <= 0:
        return "unknown"
    if tokens >= 1024 and tokens % 1024 == 0:
        return f"{tokens // 1024}K tokens"
    return f"{tokens:,} tokens"


def facts_words(facts: dict[str, Any] | None) -> dict[str, str]:
    """The facts (as the node sends them) in the words of the models list; dashes where a
    model's facts are not known here (one only peers have)."""
    if not facts:
        return {"parameters": "—", "quantization": "—", "context": "—", "size": "—"}
    # The makers' label, as in the model's name: the tensors also count a separate output
    # layer, which makes Qwen2.5 0.5B "630M".
    label = facts.get("size_label")
    return {"parameters": label or parameters_words(int(facts["parameters"])),
            "quantization": str(facts["quantization"]),
            "context": context_words(int(facts["context_length"])),
            "size": human_bytes(int(facts["file_size"]))}
