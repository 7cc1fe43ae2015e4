"""A tiny random-weight llama GGUF for fast tests.

Writes a 4-layer, 64-wide llama-architecture model with a SentencePiece-style byte-fallback
vocabulary that llama.cpp loads in milliseconds. The weights are random (seeded), so the text it
generates is nonsense, but every code path that loads, splits and samples a model runs for real.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"

# ChatML-like, using bos/eos so llama-cpp-python's Jinja formatter gets both tokens to fill in.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Output rows of normal tokens: with RMS-normed hidden states of norm sqrt(n_embd) this gives
# logits with a std of a few units, far above the zero logits of special and byte tokens.
OUTPUT_STD = 0.5

# A few dozen whole-word and letter pieces so the tokenizer has merges to prefer over bytes.
_WORDS = (
    "the", "a", "and", "of", "to", "in", "is", "it", "you", "that", "hello", "world",
    "swarm", "model", "token", "chat", "cat", "dog",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# llama.cpp asserts that token strings are unique: dict.fromkeys drops repeats ("▁a").
NORMAL_TOKENS: tuple[str, ...] = tuple(
    dict.fromkeys(["▁", *(f"▁{w}" for w in _WORDS), *_LETTERS, *(f"▁{c}" for c in _LETTERS)])
)


def vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types in id order."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    types: list[int] = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    # SentencePiece merges prefer higher scores: longer pieces score higher than single letters.
    for piece in NORMAL_TOKENS:
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-100.0 + 10.0 * len(piece))
    return tokens, scores, [int(t) for t in types]


def tensor_shapes(
    *, n_layers: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int
) -> dict[str, tuple[int, ...]]:
    """Numpy shapes (ggml ne reversed) of every tensor, keyed by GGUF tensor name."""
    head_dim = n_embd // n_head
    n_embd_kv = n_head_kv * head_dim

    def name(t: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
        base = gguf.TENSOR_NAMES[t]
        return (base.format(bid=bid) if bid is not None else base) + ".weight"

    T = gguf.MODEL_TENSOR
    shapes: dict[str, tuple[int, ...]] = {
        name(T.TOKEN_EMBD): (n_vocab, n_embd),
        name(T.OUTPUT_NORM): (n_embd,),
        name(T.OUTPUT): (n_vocab, n_embd),
    }
    for bid in range(n_layers):
        shapes[name(T.ATTN_NORM, bid)] = (n_embd,)
        shapes[name(T.ATTN_Q, bid)] = (n_embd, n_embd)
        shapes[name(T.ATTN_K, bid)] = (n_embd_kv, n_embd)
        shapes[name(T.ATTN_V, bid)] = (n_embd_kv, n_embd)
        shapes[name(T.ATTN_OUT, bid)] = (n_embd, n_embd)
        shapes[name(T.FFN_NORM, bid)] = (n_embd,)
        shapes[name(T.FFN_GATE, bid)] = (n_ff, n_embd)
        shapes[name(T.FFN_UP, bid)] = (n_ff, n_embd)
        shapes[name(T.FFN_DOWN, bid)] = (n_embd, n_ff)
    return shapes


def write_tiny_gguf(
    path: Path,
    *,
    n_layers: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 256,
    seed: int = 0,
    chat_template: str | None = DEFAULT_TEMPLATE,
    size_label: str | None = None,
) -> Path:
    """Write a deterministic random-weight llama GGUF to `path` and return `path`."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = Path(path)
    tokens, scores, types = vocab()
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(f"covey-tiny-llama-seed{seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    if size_label is not None:
        writer.add_size_label(size_label)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    shapes = tensor_shapes(
        n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
        n_vocab=len(tokens),
    )
    for tensor_name, shape in shapes.items():
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            # Scale by fan-in so activations stay O(1) through the residual stream.
            std = min(0.2, max(0.05, 1.0 / np.sqrt(shape[1])))
            data = rng.normal(0.0, std, size=shape).astype(np.float32)
        if tensor_name == "output.weight":
            # Logit 0 for <unk>/<s>/</s> and the byte tokens, wide logits for the normal pieces:
            # generation then rarely stops early and emits whole UTF-8 text. (Random bytes such
            # as 0xF4 open multi-byte sequences, and llama-cpp-python then runs past max_tokens
            # and miscounts usage.)
            n_fixed = len(SPECIAL_TOKENS) + 256
            data[:n_fixed] = 0.0
            data[n_fixed:] = rng.normal(0.0, OUTPUT_STD, size=(shape[0] - n_fixed, shape[1]))
        writer.add_tensor(tensor_name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
