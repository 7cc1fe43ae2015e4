"""What the engine adds to llama.cpp's own sampler chain for a request: `logit_bias` (as a
logits processor) and each token's log probabilities with its most likely alternatives.

Pure functions on numpy arrays of logits; the engine process feeds them llama.cpp's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from backends.engine_protocol import TokenLogprob

Logits = npt.NDArray[np.float32]


def check_bias(logit_bias: Sequence[tuple[int, float]], n_vocab: int) -> None:
    """ValueError naming the first token id the model does not have."""
    for token, _ in logit_bias:
        if not 0 <= token < n_vocab:
            raise ValueError(f"logit_bias: token {token} is not in the model's vocabulary "
                             f"of {n_vocab} tokens")


def bias_vector(logit_bias: Sequence[tuple[int, float]], n_vocab: int) -> Logits | None:
    """The bias to add to every logit (OpenAI's -100 and 100 ban and force a token), or
    None when there is none."""
    if not logit_bias:
        return None
    check_bias(logit_bias, n_vocab)
    bias = np.zeros(n_vocab, dtype=np.float32)
    for token, value in logit_bias:
        # Like OpenAI: -100 bans, 100 makes the token all but certain.
        bias[token] = -np.inf if value <= -100 else value
    return bias


def bias_processor(bias: Logits) -> Callable[[object, Logits], Logits]:
    """A llama-cpp-python logits processor that adds `bias`."""
    return lambda _ids, logits: logits + bias


def log_softmax(logits: Logits) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def token_logprob(logits: Logits, chosen: int, top_n: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """The chosen token's log probability under `logits` and the `top_n` most likely tokens,
    most likely first; `piece` gives a token's bytes."""
    logprobs = log_softmax(logits)
    top: tuple[TokenLogprob, ...] = ()
    if top_n > 0:
        best = np.argpartition(-logprobs, min(top_n, len(logprobs) - 1))[:top_n]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple(_entry(int(t), float(logprobs[t]), piece) for t in best)
    return _entry(chosen, float(logprobs[chosen]), piece, top)


def _entry(token: int, logprob: float, piece: Callable[[int], bytes],
           top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    data = piece(token)
    # JSON has no -inf: a banned token is as unlikely as a float can say.
    value = max(logprob, -9999.0)
    return TokenLogprob(data.decode("utf-8", errors="replace"), value, tuple(data), top)
