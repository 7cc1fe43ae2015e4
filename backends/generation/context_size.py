"""The context length an engine runs a model with when the user did not choose one: the
context the model was trained for, halved until the model and its KV cache take at most a
share of the memory available. Pure."""

from __future__ import annotations

from backends.gguf_info import GGUFInfo, estimate_memory

FALLBACK_CTX = 4096  # a model whose file does not say its trained context
MIN_CTX = 512
MEMORY_SHARE = 0.5  # of the available memory, for weights and KV cache together


def auto_context(info: GGUFInfo, available_bytes: int, share: float = MEMORY_SHARE) -> int:
    """The trained context (FALLBACK_CTX when unknown), halved while it does not fit
    `share` of `available_bytes`, but never below MIN_CTX (or the trained context if less)."""
    trained = info.context_length if info.context_length > 0 else FALLBACK_CTX
    floor = min(MIN_CTX, trained)
    ctx = trained
    while ctx > floor and estimate_memory(info, ctx).total_bytes > available_bytes * share:
        ctx = max(ctx // 2, floor)
    return ctx


def context_for(info: GGUFInfo, chosen: int | None, available_bytes: int) -> int:
    """The user's choice (`covey node --ctx N`) when given, else `auto_context`."""
    return chosen if chosen else auto_context(info, available_bytes)


def needs_room(info: GGUFInfo, chosen: int | None, available_bytes: int,
               reclaimable_bytes: int) -> bool:
    """Whether an engine for `info` would get less without `reclaimable_bytes` (memory held by
    something that can give it back) than with it: a shorter context, or a chosen context
    that does not fit what is available."""
    if reclaimable_bytes <= 0:
        return False
    with_room = context_for(info, chosen, available_bytes + reclaimable_bytes)
    if context_for(info, chosen, available_bytes) < with_room:
        return True
    return estimate_memory(info, with_room).total_bytes > available_bytes
