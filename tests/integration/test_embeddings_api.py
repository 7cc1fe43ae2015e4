"""POST /v1/embeddings on a real node: the official `openai` client with the bundled Gemma
(vectors in input order, base64 equal to floats, a paraphrase closer than an unrelated
sentence), and with the tiny model every refusal, including oversized batches and inputs that
must leave the node serving."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import openai
import pytest

from backends.store.model_store import DEFAULT_MODEL
from swarm.api.embeddings import MAX_INPUTS, MAX_TOTAL_TOKENS
from swarm.routes.embeddings import EMBED_CTX

# The same node as the completions tests: the tiny model imported as "tiny", in a namespace.
from tests.integration import test_openai_api
from tests.integration.test_openai_api import Api
from tests.support.netns import netns_skip_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

api = test_openai_api.api  # its module-scoped node, started again for this module
GEMMA_DIMENSIONS = 640
# (anchor, paraphrase, unrelated): with Gemma 3 270M the paraphrase scores about 0.9 and the
# unrelated sentence about 0.6-0.75.
TRIPLES = [
    ("The cat sat on the mat.", "A kitten was sitting on the rug.",
     "Stock markets fell sharply after the interest rate decision."),
    ("How do I bake bread at home?", "What is a simple recipe for homemade bread?",
     "The spacecraft entered orbit around Jupiter."),
]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def vectors(api: Api, model: str, inputs: Any, **kw: Any) -> list[list[float]]:
    def go() -> Any:
        return api.client().embeddings.create(model=model, input=inputs, **kw)

    reply = api.run(go)
    assert reply.object == "list" and reply.model == model
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0
    return [d.embedding for d in reply.data]


@pytest.mark.gemma
def test_gemma_batch_gives_equal_length_vectors_in_input_order(api: Api) -> None:
    sentences = [s for triple in TRIPLES for s in triple]
    batched = vectors(api, DEFAULT_MODEL, sentences, encoding_format="float")
    assert len(batched) == len(sentences)
    assert {len(v) for v in batched} == {GEMMA_DIMENSIONS}
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in batched)
    for i, sentence in enumerate(sentences):
        [alone] = vectors(api, DEFAULT_MODEL, sentence, encoding_format="float")
        # Each batched vector is its own sentence's, not a neighbour's.
        similarities = [cosine(alone, v) for v in batched]
        assert similarities[i] > 0.999, (sentence, similarities)
        assert max(s for j, s in enumerate(similarities) if j != i) < 0.99


@pytest.mark.gemma
def test_gemma_base64_decodes_to_the_same_floats(api: Api) -> None:
    inputs = ["Base64 carries the same numbers.", "So does this second input."]
    floats = vectors(api, DEFAULT_MODEL, inputs, encoding_format="float")
    # The official client asks for base64 unless told otherwise, and decodes it with numpy.
    decoded = vectors(api, DEFAULT_MODEL, inputs)
    assert decoded == floats
    status, _, body = api.post("/v1/embeddings", {"model": DEFAULT_MODEL, "input": inputs,
                                                  "encoding_format": "base64"})
    assert status == 200
    assert all(isinstance(d["embedding"], str) for d in body["data"])
    assert body["covey"] == {"route": "local", "machines": ["api-node"],
                             "route_reason": "embeddings run on this node's own engine"}


@pytest.mark.gemma
def test_gemma_ranks_a_paraphrase_above_an_unrelated_sentence(api: Api) -> None:
    for anchor, paraphrase, unrelated in TRIPLES:
        a, p, u = vectors(api, DEFAULT_MODEL, [anchor, paraphrase, unrelated])
        close, far = cosine(a, p), cosine(a, u)
        assert close > far + 0.1, (anchor, close, far)


@pytest.mark.gemma
def test_gemma_a_batch_whose_client_hangs_up_is_stopped(api: Api) -> None:
    vectors(api, DEFAULT_MODEL, "The engine is loaded first.")
    # About 4,000 tokens in 10 llama.cpp batches: seconds of work on two cores.
    body = json.dumps({"model": DEFAULT_MODEL, "input": ["word " * 400] * 10}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\n"
            f"Authorization: Bearer {api.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def hang_up() -> None:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
            s.sendall(head + body)
            time.sleep(0.3)

    api.run(hang_up)
    deadline = time.monotonic() + 60
    while "stopped: its client is gone" not in api.node.log():
        assert time.monotonic() < deadline, api.node.log()
        time.sleep(0.2)
    assert len(vectors(api, DEFAULT_MODEL, ["still", "here"])) == 2


def test_tiny_model_embeds_texts_and_token_arrays(api: Api) -> None:
    texts = vectors(api, "tiny", ["hello world", "the cat"], encoding_format="float")
    tokens = vectors(api, "tiny", [[1, 300, 301], [1, 302]], encoding_format="float")
    assert {len(v) for v in texts + tokens} == {64}
    assert texts[0] != texts[1] and tokens[0] != tokens[1]


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "tiny", "input": ["x"] * (MAX_INPUTS + 1)}, 400, "input", "at most"),
    ({"model": "tiny", "input": "the " * (EMBED_CTX + 10)}, 400, "input",
     f"at most {EMBED_CTX} tokens per input"),
    ({"model": "tiny", "input": [[300] * EMBED_CTX] * (MAX_TOTAL_TOKENS // EMBED_CTX + 1)},
     400, "input", f"at most {MAX_TOTAL_TOKENS} per request"),
    ({"model": "tiny", "input": [[300] * (EMBED_CTX + 1)]}, 400, "input", "per input"),
    ({"model": "tiny", "input": [[1, 10**9]]}, 400, "input", "outside this model's vocabulary"),
    ({"model": "tiny", "input": ""}, 400, "input", "empty"),
    ({"model": "tiny", "input": []}, 400, "input", "empty"),
    ({"model": "tiny", "input": "x", "dimensions": 32}, 400, "dimensions", "dimensions"),
    ({"model": "tiny", "input": "x", "encoding_format": "hex"}, 400, "encoding_format", "float"),
    ({"model": "tiny", "input": "x", "covey_route": "sharded"}, 400, "covey_route", "local"),
    ({"model": "nope", "input": "x"}, 404, "model", "own models only"),
])
def test_refusals_name_the_field_and_the_node_keeps_serving(
        api: Api, body: dict[str, Any], status: int, param: str, words: str) -> None:
    got, _, reply = api.post("/v1/embeddings", body)
    assert got == status, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply
    assert len(vectors(api, "tiny", "still here")[0]) == 64
    assert api.node.proc.poll() is None


def test_a_body_over_the_limit_is_413_and_the_node_keeps_serving(api: Api) -> None:
    huge = json.dumps({"model": "tiny", "input": ["word " * 1000] * 300}).encode()
    status, _, data = api.raw("POST", "/v1/embeddings", huge)
    assert status == 413, data
    assert len(vectors(api, "tiny", ["after", "the flood"])) == 2
    assert api.node.proc.poll() is None


def test_official_client_errors_are_typed(api: Api) -> None:
    def go() -> Any:
        with pytest.raises(openai.BadRequestError) as caught:
            api.client().embeddings.create(model="tiny", input=["x"] * (MAX_INPUTS + 1))
        return caught.value

    error = api.run(go)
    assert error.status_code == 400 and "smaller batches" in str(error)
