"""/v1/embeddings without a model: parsing the body, encoding the vectors, the engine's packing
and limits, and the engine protocol's embedding messages."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import numpy as np
import pytest

from backends import embedding
from backends import engine_protocol as proto
from swarm.api import embeddings as api
from swarm.api import openapi
from swarm.api.embeddings import EmbeddingCall, encode_vector, parse_embeddings
from swarm.api.openai_api import BadRequest
from swarm.routes import embeddings as route


def refused(body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_embeddings(body)
    return caught.value


@pytest.mark.parametrize(("given", "inputs"), [
    ("hello", ("hello",)),
    (["a", "b c"], ("a", "b c")),
    ([5, 6, 7], ((5, 6, 7),)),
    ([[5, 6], [7]], ((5, 6), (7,))),
    (["text", [1, 2]], ("text", (1, 2))),
])
def test_input_shapes_become_one_input_each(given: Any, inputs: tuple[Any, ...]) -> None:
    call = parse_embeddings({"model": "m", "input": given})
    assert call == EmbeddingCall("m", inputs, "float", "auto")


def test_options_are_read() -> None:
    call = parse_embeddings({"model": "m", "input": "x", "encoding_format": "base64",
                             "covey_route": "local", "user": "me", "dimensions": None})
    assert (call.encoding_format, call.route) == ("base64", "local")


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": "x"}, "model", "model"),
    ({"model": "", "input": "x"}, "model", "empty"),
    ({"model": "m"}, "input", "missing"),
    ({"model": "m", "input": ""}, "input", "input[0] must not be an empty string"),
    ({"model": "m", "input": []}, "input", "must not be empty"),
    ({"model": "m", "input": [[]]}, "input", "input[0] must not be an empty array"),
    ({"model": "m", "input": ["a", ""]}, "input", "input[1]"),
    ({"model": "m", "input": [1, "a"]}, "input", "input[0] must be a string or an array"),
    ({"model": "m", "input": [[1, True]]}, "input", "input[0]"),
    ({"model": "m", "input": [[1, 2.5]]}, "input", "input[0]"),
    ({"model": "m", "input": [[-1]]}, "input", "negative"),
    ({"model": "m", "input": {"text": "x"}}, "input", "input must be"),
    ({"model": "m", "input": 3}, "input", "input must be"),
    ({"model": "m", "input": ["x"] * (api.MAX_INPUTS + 1)}, "input", "smaller batches"),
    ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format", "base64"),
    ({"model": "m", "input": "x", "encoding_format": 1}, "encoding_format", "str"),
    ({"model": "m", "input": "x", "dimensions": 256}, "dimensions", "not supported"),
    ({"model": "m", "input": "x", "covey_route": "sharded"}, "covey_route", "own engine"),
    ({"model": "m", "input": "x", "user": 5}, "user", "user"),
])
def test_bad_bodies_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    error = refused(body)
    assert error.status == 400 and error.param == param
    assert words in error.message


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert refused(["model", "input"]).status == 400


def test_the_batch_limit_itself_is_accepted() -> None:
    call = parse_embeddings({"model": "m", "input": ["x"] * api.MAX_INPUTS})
    assert len(call.inputs) == api.MAX_INPUTS


def test_base64_is_little_endian_float32_that_decodes_to_the_floats() -> None:
    vector = [0.1, -0.25, 1e-7, 0.0, -1.0, 1 / 3]
    encoded = encode_vector(vector, "base64")
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 * len(vector)
    # What the official client does with it (numpy, float32 in native little-endian order).
    decoded = np.frombuffer(raw, dtype="<f4").tolist()
    assert decoded == [float(np.float32(x)) for x in vector]
    assert list(struct.unpack("<6f", raw)) == decoded
    # Floats that came from a float32 engine survive both formats exactly.
    engine_floats = decoded
    assert np.frombuffer(base64.b64decode(encode_vector(engine_floats, "base64")),
                         dtype="<f4").tolist() == encode_vector(engine_floats, "float")


def test_response_has_openai_shape_in_input_order() -> None:
    call = EmbeddingCall("m", ("a", "b"), "float")
    result = proto.Embeddings(id="e", vectors=((1.0, 0.0), (0.0, 1.0)), prompt_tokens=5)
    body = api.embeddings_response(call, result, {"route": "local"})
    assert body == {
        "object": "list", "model": "m",
        "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
                 {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]}],
        "usage": {"prompt_tokens": 5, "total_tokens": 5}, "covey": {"route": "local"}}
    call64 = EmbeddingCall("m", ("a", "b"), "base64")
    data = api.embeddings_response(call64, result, {})["data"]
    assert [np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist() for d in data] == [
        [1.0, 0.0], [0.0, 1.0]]


def test_pack_fills_batches_in_order_within_both_limits() -> None:
    assert embedding.pack([], 8, 4) == []
    assert embedding.pack([3, 3, 3], 8, 4) == [range(0, 2), range(2, 3)]
    assert embedding.pack([8, 1, 7], 8, 4) == [range(0, 1), range(1, 3)]
    assert embedding.pack([1] * 5, 8, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    runs = embedding.pack([5, 2, 6, 1, 1, 8], 8, 3)
    assert [i for run in runs for i in run] == list(range(6))
    sizes = [5, 2, 6, 1, 1, 8]
    assert all(sum(sizes[i] for i in run) <= 8 and len(run) <= 3 for run in runs)


def test_sizes_over_the_limits_are_named() -> None:
    embedding.check_sizes([512, 10], per_input=512, total=600)
    with pytest.raises(ValueError, match=r"input\[1\] is 513 tokens; .* at most 512"):
        embedding.check_sizes([4, 513], per_input=512, total=10_000)
    with pytest.raises(ValueError, match="601 tokens together; at most 600"):
        embedding.check_sizes([300, 301], per_input=512, total=600)


def test_unit_vectors_have_length_one() -> None:
    v = embedding.unit([3.0, 4.0])
    assert v == pytest.approx((0.6, 0.8)) and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6)
    # float32 values: the base64 encoding carries them exactly.
    assert [float(np.float32(x)) for x in v] == list(v)
    b64 = np.frombuffer(base64.b64decode(encode_vector(v, "base64")), "<f4").tolist()
    assert b64 == encode_vector(v, "float")
    assert embedding.unit([0.0, 0.0]) == (0.0, 0.0)


def test_protocol_round_trips_the_embedding_messages() -> None:
    request = proto.EmbedRequest(id="e1", inputs=("text", (1, 2, 3)), max_total_tokens=99)
    assert proto.decode(proto.encode(request)) == request
    reply = proto.Embeddings(id="e1", vectors=((0.5, -0.25), (1e-30, 0.0)), prompt_tokens=7)
    assert proto.decode(proto.encode(reply)) == reply
    config = proto.EngineConfig(model_path="m.gguf", embedding=True)
    assert proto.decode(proto.encode(config)) == config


def test_openapi_limits_and_example_are_the_handlers() -> None:
    assert openapi.EMBEDDING_MAX_INPUTS == api.MAX_INPUTS
    assert openapi.EMBEDDING_MAX_TOTAL_TOKENS == api.MAX_TOTAL_TOKENS
    assert openapi.EMBEDDING_MAX_INPUT_TOKENS == route.EMBED_CTX
    assert openapi.EMBEDDING_IDLE_UNLOAD_S == route.IDLE_UNLOAD_S
    doc = openapi.openapi_document()
    post = doc["paths"]["/v1/embeddings"]["post"]
    parse_embeddings(post["requestBody"]["content"]["application/json"]["example"])
    assert {"400", "404", "429", "503"} <= set(post["responses"])
    assert doc["components"]["schemas"]["EmbeddingRequest"]["required"] == ["model", "input"]
