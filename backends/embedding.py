"""Embeddings in the engine process: inputs to token ids, checked against the engine's limits,
packed into as few llama.cpp batches as fit, and read back as unit-length mean-pooled vectors.

A generative model embeds this way too (llama.cpp pools its last hidden states); the engine
must have been loaded with `EngineConfig.embedding`, as a generation context cannot pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class Cancelled(RuntimeError):
    """The request was stopped (its client is gone) before its last batch."""


def token_ids(llm: Any, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Each input as the model's token ids: texts tokenized (with BOS where the model wants
    one, special-token text taken literally), token arrays checked against the vocabulary."""
    vocab = llm.n_vocab()
    out: list[list[int]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            out.append(llm.tokenize(item.encode("utf-8", errors="replace"), add_bos=True,
                                    special=False))
            continue
        bad = next((t for t in item if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input[{i}] has token id {bad}, outside this model's vocabulary "
                             f"(0 to {vocab - 1})")
        out.append(list(item))
    return out


def check_sizes(sizes: Sequence[int], per_input: int, total: int) -> None:
    """ValueError naming the first input over `per_input` tokens, or the sum over `total`."""
    for i, size in enumerate(sizes):
        if size > per_input:
            raise ValueError(f"input[{i}] is {size} tokens; this model embeds at most "
                             f"{per_input} tokens per input")
    if sum(sizes) > total:
        raise ValueError(f"the inputs are {sum(sizes)} tokens together; at most {total} per "
                         "request: send them in smaller batches")


def pack(sizes: Sequence[int], n_batch: int, n_seq_max: int) -> list[range]:
    """Consecutive runs of inputs that share one llama.cpp batch: at most `n_batch` tokens and
    `n_seq_max` sequences each (every size must fit `n_batch` on its own)."""
    runs: list[range] = []
    start, tokens = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (tokens + size > n_batch or i - start >= n_seq_max):
            runs.append(range(start, i))
            start, tokens = i, 0
        tokens += size
    if sizes:
        runs.append(range(start, len(sizes)))
    return runs


def unit(vector: Sequence[float]) -> tuple[float, ...]:
    """`vector` scaled to length 1 (so a dot product is the cosine similarity), as clients of
    OpenAI's embeddings expect; a zero vector stays zero. The values are float32 ones, so the
    float and the base64 (float32) encodings carry exactly the same numbers."""
    values = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(values))
    if norm > 0:
        values = values / norm
    return tuple(values.astype(np.float32).tolist())


def embed(llm: Any, inputs: Sequence[str | Sequence[int]], max_total_tokens: int,
          progress: Callable[[int], None] = lambda done: None,
          stopped: Callable[[], bool] = lambda: False,
          ) -> tuple[list[tuple[float, ...]], int]:
    """The unit vectors of `inputs`, in order, and the tokens they took; `progress` hears how
    many inputs are done after each batch, and Cancelled ends the work before a batch once
    `stopped()` says so."""
    import llama_cpp

    if not llm.context_params.embeddings:
        raise ValueError("this engine was loaded for generation, not for embeddings")
    tokens = token_ids(llm, inputs)
    sizes = [len(t) for t in tokens]
    check_sizes(sizes, llm.n_batch, max_total_tokens)
    n_embd = llm.n_embd()
    vectors: list[tuple[float, ...]] = []
    batch, ctx = llm._batch, llm._ctx
    for run in pack(sizes, llm.n_batch, llm.context_params.n_seq_max):
        if stopped():
            raise Cancelled(f"stopped after {len(vectors)} of {len(inputs)} inputs")
        batch.reset()
        for seq, i in enumerate(run):
            # Every token an output: llama.cpp pools over the outputs of a sequence.
            batch.add_sequence(tokens[i], seq, True)
        ctx.kv_cache_clear()
        ctx.decode(batch)
        for seq in range(len(run)):
            pooled = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
            if not pooled:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            vectors.append(unit(pooled[:n_embd]))
        progress(len(vectors))
    batch.reset()
    return vectors, sum(sizes)
