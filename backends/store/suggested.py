"""The models Covey suggests downloading: a short list, as data, in this one place.

Each is an instruction-tuned GGUF from its public hosting, small enough for an ordinary machine,
with a license that allows running it at home. Sizes are estimates for a Q4_K_M file of that
many parameters (shown as "about"), not checked against the hosting, and no sha256 is pinned:
the server's own Content-Length drives the progress bar and the store checks the GGUF header.
Tests never download these URLs; they point a SuggestedModel of their own at a loopback server.
"""

from __future__ import annotations

from dataclasses import dataclass

SUGGESTED_VERSION = 1
_HF = "https://huggingface.co"


@dataclass(frozen=True)
class SuggestedModel:
    """One model a user can download with one click."""

    name: str  # its name in the store
    description: str  # one line: what it is good for
    url: str
    size: int  # download size in bytes, about
    license: str
    sha256: str | None = None  # checked after the download when known
    version: int = SUGGESTED_VERSION


SUGGESTED: tuple[SuggestedModel, ...] = (
    SuggestedModel(
        "qwen2.5-0.5b-instruct",
        "Quick on any machine; short answers and simple questions.",
        f"{_HF}/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        491_000_000, "Apache-2.0"),
    SuggestedModel(
        "llama-3.2-1b-instruct",
        "Meta's small chat model; good everyday English.",
        f"{_HF}/bartowski/Llama-3.2-1B-Instruct-GGUF/resolve/main/"
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        808_000_000, "Llama 3.2 Community License"),
    SuggestedModel(
        "qwen2.5-1.5b-instruct",
        "Noticeably better answers and code, still fast on a laptop.",
        f"{_HF}/Qwen/Qwen2.5-1.5B-Instruct-GGUF/resolve/main/qwen2.5-1.5b-instruct-q4_k_m.gguf",
        1_120_000_000, "Apache-2.0"),
    SuggestedModel(
        "phi-3.5-mini-instruct",
        "Strong reasoning for its size; wants 4 GB of free memory.",
        f"{_HF}/bartowski/Phi-3.5-mini-instruct-GGUF/resolve/main/"
        "Phi-3.5-mini-instruct-Q4_K_M.gguf",
        2_390_000_000, "MIT"),
)
