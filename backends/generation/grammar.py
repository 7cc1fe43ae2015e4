"""llama.cpp grammars (GBNF) that constrain what a model may write: made from JSON schemas on
the node, checked and applied in the engine.

A grammar travels as text in `GenerateRequest.grammar`, so it works the same on every route
(it may come from another node: the engine checks it before llama.cpp uses it, since
llama.cpp's own parser answers a bad grammar with a null pointer, not an error).
The schema converter is llama-cpp-python's pure-Python `llama_grammar` module, loaded on its
own so the node process does not load the native library just to write a grammar.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

# Repetition counts are unrolled into the grammar: a schema asking for a billion items would
# build a billion-rule string before anything could refuse it.
MAX_REPEAT = 1000
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_SCHEMA_DEPTH = 32
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties",
                "maxProperties")

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A schema that cannot become a grammar, or grammar text llama.cpp cannot parse."""


@cache
def _converter() -> ModuleType:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GrammarError("llama-cpp-python is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("_covey_llama_grammar", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _check_bounds(schema: Any, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, dict):
        for key in _REPEAT_KEYS:
            count = schema.get(key)
            if isinstance(count, int) and count > MAX_REPEAT:
                raise GrammarError(f"{key} above {MAX_REPEAT} is not supported")
        for value in schema.values():
            _check_bounds(value, depth + 1)
    elif isinstance(schema, list):
        for value in schema:
            _check_bounds(value, depth + 1)


def schema_to_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar of the JSON text that `schema` accepts; GrammarError if it cannot be
    converted (remote `$ref`s, unknown formats, sizes over the limits)."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    _check_bounds(schema)
    try:
        grammar = str(_converter().json_schema_to_gbnf(json.dumps(schema)))
    except GrammarError:
        raise
    except Exception as exc:  # the converter raises whatever its code meets
        raise GrammarError(f"unsupported JSON schema: {exc or type(exc).__name__}") from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError("the schema makes a grammar over the size limit")
    return grammar


# -- in the engine process (llama.cpp loaded) -----------------------------------------------


def engine_grammar(vocab: Any, text: str) -> Any:
    """A `LlamaGrammar` for `text`, once llama.cpp has parsed it; GrammarError otherwise."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError("the grammar is over the size limit")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(text, verbose=False)


def check_prefix(vocab: Any, text: str, tokens: list[int]) -> None:
    """Raise GrammarError unless `tokens` (a reply's text so far, carried over from a machine
    that failed) are a prefix the grammar allows. A sampler chain accepting a token the
    grammar forbids throws through the C API and kills the engine, so check first."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar")
    try:
        for token in tokens:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            array = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, llama_cpp.ctypes.byref(array))
            if data[0].logit == float("-inf"):
                raise GrammarError("the reply so far does not match its grammar")
            llama_cpp.llama_sampler_accept(sampler, token)
    finally:
        llama_cpp.llama_sampler_free(sampler)
