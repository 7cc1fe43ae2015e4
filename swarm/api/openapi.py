"""The OpenAPI 3.1 document of the node's local HTTP API, as plain Python data.

`openapi_document()` describes what `swarm.api.server`, `swarm.api.openai_api` and
`swarm.node.api_handlers` actually do: the OpenAI-compatible /v1 endpoints, Covey's own /api
endpoints, the bearer gate and the one error shape. Its request schemas
(components/schemas/ChatCompletionRequest, ...) are JSON Schema 2020-12 and may be reused to
validate bodies; they allow unknown fields, as OpenAI clients send them, except where the
handler itself refuses them (NodeUpdateRequest, WorkerRequest, ModelCopyRequest).
"""

from __future__ import annotations

from typing import Any

from swarm.ledger.rules import MAX_OWNER_BYTES, MAX_OWNER_ENTRIES, MAX_OWNERS
from swarm.node.local_facts import covey_version

# The limits the handlers enforce; tests/unit/test_openapi_doc.py checks them against the code.
# They are repeated here, not imported, so that the handlers may import this module.
ROUTE_NAMES = ("auto", "local", "sharded", "federated")
MAX_TOKENS_LIMIT = 32768
DEFAULT_MAX_TOKENS = 512
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
MAX_TEXT_LOGPROBS = 5
MAX_LOGIT_BIAS = 1024
STRICT_MAX_TOKENS_HEADER = "x-covey-strict-max-tokens"
LOWERED_HEADER = "x-covey-max-tokens-lowered"
LOWERED_USAGE_KEY = "covey_max_tokens_lowered_to"
MAX_MESSAGES = 1024
ROLES = ("client", "worker", "federated")
MAX_NAME_CHARS = 64
MAX_TOOLS = 128
TOOL_NAME_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
STATUS_VERSION = 1
NODE_INFO_VERSION = 1
REGISTRATION_VERSION = 1
BUNDLED_WAIT_S = 120.0
EMBEDDING_MAX_INPUTS = 128
EMBEDDING_MAX_TOTAL_TOKENS = 4096
EMBEDDING_MAX_INPUT_TOKENS = 512
EMBEDDING_IDLE_UNLOAD_S = 300.0

Schema = dict[str, Any]

ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    # status: (component name, description)
    400: ("BadRequest", "The request is malformed, a parameter is invalid (type "
                        "`invalid_request_error`; `param` names the parameter), or the route "
                        "asked for is not available (code `route_unavailable`)."),
    401: ("Unauthorized", "Missing or wrong API secret (type `authentication_error`)."),
    403: ("Forbidden", "The Host header does not name this API's address and port (type "
                       "`permission_error`); a guard against DNS rebinding. Or (code "
                       "`route_forbidden`, param `covey_route`) this node's settings forbid "
                       "sending prompts to other machines (`remote_prompts` off)."),
    404: ("NotFound", "No such endpoint, or (code `model_not_found`, param `model`) no route "
                      "serves the model (type `not_found_error` / `invalid_request_error`)."),
    405: ("MethodNotAllowed", "The path exists but not with this method; the Allow header lists "
                             "the methods it takes."),
    408: ("RequestTimeout", "The request head or body did not arrive in time (type "
                           "`timeout_error`)."),
    413: ("PayloadTooLarge", "The request body is over the limit, 1 MiB by default (type "
                            "`request_too_large`)."),
    429: ("TooManyRequests", "The engine is busy with too many requests waiting (type "
                             "`rate_limit_error`, code `busy`); retry after Retry-After seconds."),
    409: ("Conflict", "The model is already in this node's store (code `model_exists`)."),
    431: ("HeadersTooLarge", "The request head is over 16 KiB (type `request_too_large`)."),
    500: ("InternalError", "An unexpected failure in the node (type `server_error`); see its "
                           "log."),
    503: ("ServiceUnavailable", "The inference engine failed (type `server_error`)."),
}
# What any request can earn at the gate, the transport or an unexpected failure. 404 (no such
# endpoint) and 405 are for paths and methods this document does not list.
COMMON_ERRORS = (400, 401, 403, 408, 413, 431, 500)
GENERATION_ERRORS = (*COMMON_ERRORS, 404, 429, 503)


def ref(kind: str, name: str) -> Schema:
    """A $ref to components/<kind>/<name>."""
    return {"$ref": f"#/components/{kind}/{name}"}


def schema_ref(name: str) -> Schema:
    return ref("schemas", name)


def or_null(schema: Schema) -> Schema:
    """`schema` that also accepts null: the handlers treat a null parameter as absent."""
    out = dict(schema)
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], required: list[str] | None = None,
            description: str | None = None, *, extra: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if not extra:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _string_list(description: str | None = None) -> Schema:
    schema: Schema = {"type": "array", "items": {"type": "string"}}
    if description:
        schema["description"] = description
    return schema


def _generation_parameters() -> dict[str, Schema]:
    """The parameters /v1/chat/completions and /v1/completions share, besides the input."""
    max_tokens = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT,
                  "default": DEFAULT_MAX_TOKENS}
    return {
        "model": {"type": "string", "minLength": 1,
                  "description": "A model id from GET /v1/models."},
        "max_tokens": or_null({**max_tokens, "description":
                               "The most tokens to generate. More than the context leaves "
                               "after the prompt is lowered to fit (the reply says so in the "
                               f"`{LOWERED_HEADER}` header when not streamed, in "
                               f"`usage.{LOWERED_USAGE_KEY}` and in `covey."
                               "max_tokens_lowered_to`), unless the request has the header "
                               f"`{STRICT_MAX_TOKENS_HEADER}: 1` or `covey_strict_max_tokens: "
                               "true`: then it is a 400 (code `context_length_exceeded`)."}),
        "max_completion_tokens": or_null({**max_tokens, "description":
                                          "Same as max_tokens, used when max_tokens is absent."}),
        "temperature": or_null({"type": "number", "minimum": 0, "maximum": 2, "default": 1}),
        "top_p": or_null({"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                          "default": 1}),
        "repeat_penalty": or_null({
            "type": "number", "minimum": 0.5, "maximum": 2, "default": 1, "description":
            "As in llama.cpp's server: above 1 discourages repeating recent tokens."}),
        "seed": or_null({"type": "integer", "description": "Makes sampling repeatable."}),
        "stop": or_null(schema_ref("StopSequences")),
        "stream": or_null({"type": "boolean", "default": False, "description":
                           "Answer with server-sent events instead of one JSON object."}),
        "stream_options": or_null(schema_ref("StreamOptions")),
        "n": or_null({"type": "integer", "enum": [1], "default": 1,
                      "description": "How many choices to generate; only 1 is supported."}),
        "user": or_null({"type": "string",
                         "description": "Accepted for compatibility and ignored."}),
        **_sampling_parameters(),
        "covey_route": or_null(schema_ref("CoveyRoute")),
        "covey_deterministic": or_null({
            "type": "boolean", "default": False,
            "description": "Covey's extension: an engine without CPU weight repacking, so greedy "
                           "output is the same on every route and split (a little slower)."}),
    }


def _sampling_parameters() -> dict[str, Schema]:
    """The sampling fields both endpoints honour (`logprobs` differs; see the requests)."""
    penalty = {"type": "number", "minimum": -2, "maximum": 2, "default": 0}
    return {
        "top_k": or_null({"type": "integer", "minimum": 0, "default": 40, "description":
                          "Sample from the k most likely tokens only; 0 turns it off."}),
        "min_p": or_null({"type": "number", "minimum": 0, "maximum": 1, "default": 0,
                          "description": "Drop tokens less likely than min_p times the most "
                                         "likely one."}),
        "presence_penalty": or_null({**penalty, "description":
                                     "Positive values discourage tokens already in the text."}),
        "frequency_penalty": or_null({**penalty, "description":
                                      "Positive values discourage tokens by how often they "
                                      "appeared."}),
        "logit_bias": or_null({
            "type": "object", "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "Token id (of the model's vocabulary) -> bias added to its logit; "
                           "-100 bans the token, 100 all but forces it. An id the model does "
                           "not have is a 400."}),
        "covey_strict_max_tokens": or_null({
            "type": "boolean", "default": False,
            "description": "Covey's extension: a max_tokens over what the context leaves is "
                           "a 400 instead of being lowered (as the header "
                           f"`{STRICT_MAX_TOKENS_HEADER}: 1`)."}),
    }


def _output_parameters() -> dict[str, Schema]:
    return {"response_format": or_null(schema_ref("ResponseFormat"))}


def _tool_parameters() -> dict[str, Schema]:
    """Tool calling, /v1/chat/completions only (`swarm.api.tools`)."""
    return {
        "tools": or_null({"type": "array", "items": schema_ref("Tool"), "maxItems": MAX_TOOLS,
                          "description": "Functions the model may call; names must be unique. "
                          "A model whose chat template knows tools gets them there, others in "
                          "the system prompt (README: Tools and structured output)."}),
        "tool_choice": or_null(schema_ref("ToolChoice")),
        "parallel_tool_calls": or_null({
            "type": "boolean", "default": True,
            "description": "Whether a reply may call several tools at once."}),
    }


def _tool_schemas() -> dict[str, Schema]:
    function = _object({
        "name": {"type": "string", "pattern": TOOL_NAME_PATTERN},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "A JSON schema of the arguments object "
                       "(default: no arguments)."},
        "strict": {"type": "boolean", "description": "Accepted; arguments always follow the "
                   "schema when a call is forced."},
    }, ["name"])
    call = _object({
        "id": {"type": "string"}, "type": {"const": "function"},
        "function": _object({"name": {"type": "string"}, "arguments": {
            "type": "string", "description": "The arguments object as JSON text."}},
            ["name", "arguments"]),
    }, ["id", "type", "function"])
    content = {"oneOf": [
        {"type": "string"},
        {"type": "array", "items": schema_ref("TextContentPart")},
    ], "description": "Text, or text parts (joined); other kinds of parts are refused."}
    return {
        "Tool": _object({"type": {"const": "function"}, "function": function},
                        ["type", "function"]),
        "ToolChoice": {"oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            _object({"type": {"const": "function"},
                     "function": _object({"name": {"type": "string"}}, ["name"])},
                    ["type", "function"]),
        ], "description": "`auto` (the default with tools): the model answers or calls a tool. "
           "`required` or a named function: a grammar forces a call with valid arguments "
           "(needs that tool in `tools`). `none`: the tools are not shown to the model."},
        "ToolCall": call,
        "ToolCallDelta": _object({"index": {"type": "integer"}, **call["properties"]},
                                 ["index", "id", "type", "function"],
                                 "A streamed call comes whole, in one chunk."),
        "ResponseFormat": {"oneOf": [
            _object({"type": {"const": "text"}}, ["type"]),
            _object({"type": {"const": "json_object"}}, ["type"]),
            _object({"type": {"const": "json_schema"}, "json_schema": _object({
                "name": {"type": "string"}, "description": {"type": "string"},
                "schema": {"type": "object"}, "strict": {"type": "boolean"}}, ["name"])},
                ["type", "json_schema"]),
        ], "description": "`json_object` and `json_schema` hold the reply to JSON (to the "
           "schema, strict or not) with a llama.cpp grammar, on every route. Schemas with "
           "remote $refs or repetition counts above 1000 are refused."},
        "ChatMessage": {"oneOf": [
            _object({
                "role": {"type": "string", "enum": ["system", "user", "assistant", "developer"],
                         "description": "`developer` is taken as `system`."},
                "content": content,
                "name": {"type": "string", "description": "Accepted and ignored."},
            }, ["role", "content"]),
            _object({
                "role": {"const": "assistant"},
                "content": {"type": ["string", "null"]},
                "tool_calls": {"type": "array", "items": call, "minItems": 1},
            }, ["role", "tool_calls"], "An assistant turn that called tools."),
            _object({
                "role": {"const": "tool"}, "content": content,
                "tool_call_id": {"type": "string"},
                "name": {"type": "string", "description": "The tool's name."},
            }, ["role", "content", "tool_call_id"], "A tool's result."),
        ]},
    }


def _error_schemas() -> dict[str, Schema]:
    detail = _object({
        "message": {"type": "string"},
        "type": {"type": "string", "description": "e.g. invalid_request_error, "
                 "authentication_error, rate_limit_error, server_error."},
        "param": {"type": ["string", "null"], "description": "The offending parameter."},
        "code": {"type": ["string", "null"], "description": "e.g. model_not_found, busy."},
    }, ["message", "type", "param", "code"])
    return {"Error": _object({"error": detail}, ["error"],
                             "Every error the API answers with, OpenAI's shape.")}


def _request_schemas() -> dict[str, Schema]:
    chat = {
        **_generation_parameters(),
        **_output_parameters(),
        **_tool_parameters(),
        "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                     "items": schema_ref("ChatMessage")},
        "logprobs": or_null({"type": "boolean", "default": False, "description":
                             "Return each generated token's log probability."}),
        "top_logprobs": or_null({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                                 "description": "The most likely tokens at each place, this "
                                                "many; above 0 it turns logprobs on."}),
        **{name: {"type": "null", "description": "Not supported: any other value is a 400."}
           for name in ("audio", "prediction", "web_search_options")},
    }
    text = {
        **_generation_parameters(),
        **_output_parameters(),
        "prompt": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
        ], "description": "The prompt: a string, or an array of exactly one string."},
        "logprobs": or_null({"type": "integer", "minimum": 0, "maximum": MAX_TEXT_LOGPROBS,
                             "description": "Return each token's log probability and this "
                                            "many most likely alternatives (legacy shape)."}),
        "echo": or_null({"type": "boolean", "default": False, "description":
                         "Start the reply's text with the prompt; not with logprobs (400)."}),
        "suffix": or_null({"type": "string", "enum": [""], "description":
                           "Fill-in-the-middle is not supported: a non-empty suffix is a 400."}),
        "best_of": or_null({"type": "integer", "enum": [1], "description":
                            "Only 1 is supported."}),
    }
    return {
        "CoveyRoute": {
            "type": "string", "enum": list(ROUTE_NAMES), "default": "auto",
            "description": "Covey's extension: which route serves the request. `auto` takes "
                           "this machine when the model fits its free memory, else a federated "
                           "node that serves it, else the fewest workers that hold it; the "
                           "reply's `covey.route_reason` says why.",
        },
        "StopSequences": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1},
             "maxItems": MAX_STOPS},
        ], "description": f"Up to {MAX_STOPS} sequences that end the generation."},
        "StreamOptions": _object({"include_usage": or_null({
            "type": "boolean", "default": False,
            "description": "Send a last chunk with `usage` (and no choices) before [DONE]."})}),
        "TextContentPart": _object({"type": {"const": "text"}, "text": {"type": "string"}},
                                   ["type", "text"]),
        **_tool_schemas(),
        "ChatCompletionRequest": _object(chat, ["model", "messages"]),
        "CompletionRequest": _object(text, ["model", "prompt"]),
        "NodeUpdateRequest": _object({
            "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS,
                     "pattern": r"\S", "description": "Trimmed of surrounding whitespace."},
            "roles": {"type": "array", "items": {"type": "string", "enum": list(ROLES)},
                      "description": "Replaces the node's roles; duplicates are dropped."},
        }, description="Either field or both; other fields are refused.", extra=False),
        "FederatedRequest": _object({
            "enabled": {"type": "boolean", "description": "Serve whole requests for the swarm."},
            "model": {"type": "string", "minLength": 1,
                      "description": "A model in this node's store; default the bundled one."},
        }, ["enabled"]),
        "WorkerRequest": _object({
            "enabled": {"type": "boolean", "description": "Donate memory to the swarm."},
            "share_mib": {"type": "integer", "minimum": 1,
                          "description": "Memory donated, MiB (default: half of RAM)."},
            "share_percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                              "description": "Memory donated, percent of RAM."},
        }, ["enabled"], "Turning it off lets the lease holder finish its reply first.",
            extra=False),
        "ModelCopyRequest": _object({
            "model": {"type": "string", "minLength": 1,
                      "description": "The name a peer offers the model under."},
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-fA-F]{64}$",
                       "description": "The exact file, when peers offer different ones."},
            "cancel": {"type": "boolean",
                       "description": "Cancel the copy running; its part is kept to resume."},
        }, ["model"], extra=False),
    }


def _completion_schemas() -> dict[str, Schema]:
    integer, string = {"type": "integer"}, {"type": "string"}
    finish = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
    streamed_finish = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", None],
                       "description": "null until the last chunk with choices."}
    chat_logprobs = or_null(schema_ref("ChatLogprobs"))
    text_logprobs = or_null(schema_ref("CompletionLogprobs"))
    token_logprob = _object({"token": string, "logprob": {"type": "number"},
                             "bytes": {"type": "array", "items": integer}},
                            ["token", "logprob", "bytes"])

    def completion(obj: str, choice: str, description: str, *, chunk: bool = False) -> Schema:
        usage = or_null(schema_ref("Usage")) if chunk else schema_ref("Usage")
        properties: dict[str, Schema] = {"id": string, "object": {"const": obj}, "created": integer,
                      "model": string, "choices": {"type": "array", "items": schema_ref(choice)},
                      "usage": usage, "covey": schema_ref("CoveyRouting")}
        required = ["id", "object", "created", "model", "choices", "covey"]
        return _object(properties, required if chunk else [*required, "usage"], description)

    return {
        "Usage": _object({"prompt_tokens": integer, "completion_tokens": integer,
                          "total_tokens": integer,
                          LOWERED_USAGE_KEY: {"type": "integer", "description":
                                              "Only when max_tokens was lowered to fit the "
                                              "context: the max_tokens used."}},
                         ["prompt_tokens", "completion_tokens", "total_tokens"]),
        "ChatLogprobs": _object({
            "content": {"type": "array", "items": {"allOf": [token_logprob, _object(
                {"top_logprobs": {"type": "array", "items": token_logprob}},
                ["top_logprobs"])]}},
            "refusal": {"type": "null"},
        }, ["content"], "Per generated token (in a chunk: its tokens) when `logprobs` was "
           "true; null otherwise."),
        "CompletionLogprobs": _object({
            "tokens": _string_list(), "token_logprobs": {"type": "array",
                                                         "items": {"type": "number"}},
            "top_logprobs": {"type": "array", "items": {
                "type": "object", "additionalProperties": {"type": "number"}}},
            "text_offset": {"type": "array", "items": integer},
        }, ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
           "The legacy shape, when `logprobs` was given; null otherwise."),
        "CoveyRouting": _object({
            "route": {"type": "string", "description": "The route that served the request."},
            "route_reason": {"type": "string", "description": "Why this route was chosen."},
            "relayed": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "The machines serving the reply that this node reaches "
                                       "only through a relay: machine name -> the relay's "
                                       "name. Absent when all are reached directly."},
            "machines": _string_list("The machines that took part."),
            "max_tokens_lowered_to": {"type": "integer", "description":
                                      "Only when max_tokens was lowered to fit the context."},
        }, ["route", "route_reason", "machines"]),
        "ChatCompletionChoice": _object({
            "index": integer,
            "message": _object({"role": {"const": "assistant"},
                                "content": {"type": ["string", "null"],
                                            "description": "null when the reply calls tools."},
                                "tool_calls": {"type": "array",
                                               "items": schema_ref("ToolCall")}},
                               ["role", "content"]),
            "logprobs": chat_logprobs, "finish_reason": finish,
        }, ["index", "message", "finish_reason"]),
        "ChatCompletion": completion("chat.completion", "ChatCompletionChoice",
                                     "The answer of a non-streamed chat completion."),
        "ChatCompletionChunkChoice": _object({
            "index": integer,
            "delta": _object({"role": {"const": "assistant"}, "content": string,
                              "tool_calls": {"type": "array",
                                             "items": schema_ref("ToolCallDelta")}},
                             description="The first chunk carries the role, later ones text "
                             "or tool calls (a reply that may be a call is held back until "
                             "it is known)."),
            "logprobs": chat_logprobs, "finish_reason": streamed_finish,
        }, ["index", "delta", "finish_reason"]),
        "ChatCompletionChunk": completion(
            "chat.completion.chunk", "ChatCompletionChunkChoice",
            "One server-sent event of a streamed chat completion. With include_usage every "
            "chunk has `usage: null` and a last one has `choices: []` and the usage.",
            chunk=True),
        "CompletionChoice": _object({"index": integer, "text": string,
                                     "logprobs": text_logprobs,
                                     "finish_reason": finish},
                                    ["index", "text", "finish_reason"]),
        "Completion": completion("text_completion", "CompletionChoice",
                                 "The answer of a non-streamed completion."),
        "CompletionChunkChoice": _object({"index": integer, "text": string,
                                          "logprobs": text_logprobs,
                                          "finish_reason": streamed_finish},
                                         ["index", "text", "finish_reason"]),
        "CompletionChunk": completion(
            "text_completion", "CompletionChunkChoice",
            "One server-sent event of a streamed completion; usage as in ChatCompletionChunk.",
            chunk=True),
        "Model": _object({
            "id": string, "object": {"const": "model"}, "created": integer,
            "owned_by": {"const": "covey"},
            "covey": _object({"routes": _string_list("The routes that serve the model."),
                              "machines": _string_list("The machines that hold it."),
                              "embeddings": {
                                  "type": "boolean",
                                  "description": "Whether POST /v1/embeddings takes it: "
                                                 "embeddings run on this machine's own "
                                                 "models and those a federated node "
                                                 "serves."},
                              "auto": _object({"route": string, "reason": string},
                                              ["route", "reason"],
                                              "What `auto` would do with it now.")},
                             ["routes", "machines", "embeddings"]),
        }, ["id", "object", "created", "owned_by", "covey"]),
        "ModelList": _object({"object": {"const": "list"},
                              "data": {"type": "array", "items": schema_ref("Model")}},
                             ["object", "data"]),
    }


def _node_schemas() -> dict[str, Schema]:
    integer, string = {"type": "integer"}, {"type": "string"}
    version = {"const": STATUS_VERSION}
    return {
        "NodeStatus": _object({
            "version": version, "peer_id": string, "name": string,
            "addresses": _string_list("The libp2p multiaddrs this node listens on."),
            "swarm_id": string,
            "roles": _string_list(f"Drawn from {', '.join(ROLES)}."),
            "lan_only": {"type": "boolean"},
            "connected_peers": _string_list("Peer ids of the admitted peers."),
            "federated": _object({
                "enabled": {"type": "boolean"},
                "version": version,
                "models": _string_list("The models this node serves for the swarm."),
                "in_flight": {"type": "integer", "minimum": 0},
                "max_queue": {"type": "integer", "minimum": 0},
            }, ["enabled", "models", "in_flight"]),
            "worker": _object({
                "enabled": {"type": "boolean"},
                "share_bytes": {"type": "integer", "minimum": 0},
                "state": {"type": "string", "enum": ["idle", "leased"]},
                "leased_by": or_null({"type": "string",
                                      "description": "Peer id of the lease holder."}),
                "waiting": {"type": "integer", "minimum": 0, "description":
                            "Other members that asked for the worker while it was leased; "
                            "the holder keeps it at most 5 minutes (lease.HANDOVER_S) after "
                            "the first asked."},
                "free_within_s": or_null({"type": "integer", "minimum": 0, "description":
                                          "Seconds until the holder must have handed the "
                                          "worker over; null while nobody waits."}),
                "direct_port": or_null({"type": "integer", "description":
                                        "The direct TLS path's port; null without it."}),
                "rpc_traffic": _object({
                    "tunnel": schema_ref("LinkCounters"),
                    "direct": or_null(schema_ref("LinkCounters")),
                }, ["tunnel", "direct"], "The RPC connections this node served as a worker: "
                   "over the libp2p tunnel since the node started, over the direct TLS path "
                   "since worker mode was turned on (null while there is none). Bytes growing "
                   "on the tunnel, or direct connections refused, mean a slower path."),
                "rpc_violations": {"type": "integer", "minimum": 0, "description":
                                   "Lease holders cut off (lease revoked, barred for an hour) "
                                   "for sending RPC commands the worker's filter refuses, "
                                   "since the node started."},
                "rpc_server": _object({
                    "pid": or_null({"type": "integer", "description":
                                    "The RPC server process; null while none runs."}),
                    "restarts": {"type": "integer", "minimum": 0, "description":
                                 "Times it was started again after dying unexpectedly, since "
                                 "worker mode was turned on."},
                    "last_exit": or_null({"type": "string", "description":
                                          "How it last died unexpectedly, e.g. signal SIGKILL."}),
                    "error": or_null({"type": "string", "description":
                                      "Why worker mode stopped by itself (the RPC server "
                                      "keeps crashing); null otherwise."}),
                }, ["pid", "restarts", "last_exit", "error"],
                   "The ggml RPC server this node runs for worker mode, and how it fared."),
            }, ["enabled", "share_bytes", "state", "leased_by", "waiting", "free_within_s",
                "direct_port", "rpc_traffic", "rpc_violations", "rpc_server"]),
            "sharded_links": {
                "type": "object", "additionalProperties": {
                    "type": "string", "enum": ["direct TLS", "libp2p tunnel"]},
                "description": "Worker name -> how this node reaches it, for the sharded "
                               "session loaded now; empty without one."},
            "default_models": {
                "type": "object", "additionalProperties": _object({
                    "version": {"const": REGISTRATION_VERSION},
                    "state": {"type": "string", "enum": ["registering", "ready", "failed"]},
                    "done_bytes": {"type": "integer", "minimum": 0},
                    "total_bytes": or_null({"type": "integer", "minimum": 0, "description":
                                            "Null until registering has begun."}),
                    "error": or_null({"type": "string", "description":
                                      "Why registering failed; a request for the model tries "
                                      "again."}),
                }, ["version", "state", "done_bytes", "total_bytes", "error"]),
                "description": "Model name -> registering the bundled default models in this "
                               "node's store as it starts; a request for one waits for it "
                               f"(up to {BUNDLED_WAIT_S:.0f} s, then a 503 "
                               "model_not_ready)."},
            "copies": {"type": "array", "items": schema_ref("CopyJob"),
                       "description": "Model copies under way or finished (as in /api/models)."},
            "copy_direct": or_null(_object({
                "port": {"type": "integer"}, "traffic": schema_ref("LinkCounters"),
            }, ["port", "traffic"], "The direct TLS path this node sends model copies on; "
                "null until a peer first asked for it, or when it is off.")),
            "ledger": _object({
                "entries": {"type": "integer", "minimum": 0,
                            "description": "Entries this node's replica holds."},
                "owners": {"type": "integer", "minimum": 0,
                           "description": "Machines with entries (or recent ones) in it."},
                "refused_over_quota": {"type": "integer", "minimum": 0, "description":
                                       "Entries refused since the node started because their "
                                       f"owner was over its quota ({MAX_OWNER_ENTRIES} entries, "
                                       f"{MAX_OWNER_BYTES >> 10} KiB) or the ledger already "
                                       f"held {MAX_OWNERS:,} owners."},
                "sync_failures": {"type": "integer", "minimum": 0,
                                  "description": "Pulls from peers that failed since start."},
                "last_sync_error": or_null({"type": "string", "description":
                                            "Why the last failed pull failed; null if none."}),
                "last_sync_error_peer": or_null({"type": "string",
                                                 "description": "Whom it was pulled from."}),
                "last_sync_error_at": or_null({"type": "number",
                                               "description": "When (Unix seconds)."}),
                "last_sync_ok_at": or_null({"type": "number", "description":
                                            "When a pull last completed (Unix seconds)."}),
            }, ["entries", "owners", "refused_over_quota", "sync_failures", "last_sync_error",
                "last_sync_error_peer", "last_sync_error_at", "last_sync_ok_at"],
               "The replicated ledger: its size, entries refused, and how pulls fare. A "
               "failing pull means this node may not see other machines' changes."),
            "ctx": _object({
                "setting": or_null({"type": "integer", "minimum": 1, "description":
                                    "`covey node --ctx N` (remembered); null: automatic, the "
                                    "model's trained context capped by memory."}),
                "loaded": or_null({"type": "integer", "minimum": 1, "description":
                                   "The context of the model loaded on this machine's engine "
                                   "now; null while none is loaded."}),
            }, ["setting", "loaded"], "The context length, in tokens, of local chats."),
        }, ["version", "peer_id", "name", "addresses", "swarm_id", "roles", "lan_only",
            "connected_peers", "federated", "worker", "sharded_links", "default_models",
            "copies", "copy_direct", "ledger", "ctx"]),
        "LinkCounters": _object({
            "connections": {"type": "integer", "minimum": 0,
                            "description": "Connections admitted and relayed."},
            "active": {"type": "integer", "minimum": 0, "description": "Relayed now."},
            "refused": {"type": "integer", "minimum": 0,
                        "description": "Connections not admitted (no lease, wrong secret)."},
            "failed": {"type": "integer", "minimum": 0, "description":
                       "Connections that ended by a reset or an error, not by closing."},
            "bytes_up": {"type": "integer", "minimum": 0,
                         "description": "Bytes from the client toward this worker."},
            "bytes_down": {"type": "integer", "minimum": 0,
                           "description": "Bytes from this worker toward the client."},
        }, ["connections", "active", "refused", "failed", "bytes_up", "bytes_down"]),
        "Peer": _object({
            "peer_id": string, "name": string, "os": string, "covey_version": string,
            "rpc_protocol": string,
            "cores": {"type": "integer", "minimum": 0},
            "ram_total": {"type": "integer", "minimum": 0, "description": "Bytes."},
            "ram_free": {"type": "integer", "minimum": 0, "description": "Bytes."},
            "roles": _string_list(),
            "version": {"const": NODE_INFO_VERSION,
                        "description": "The version of the node's published info."},
            "self": {"type": "boolean", "description": "This node."},
            "online": {"type": "boolean"},
            "connected": {"type": "boolean"},
            "link": or_null({"type": "string", "description":
                             "How a connected peer is reached: \"direct\", \"hole-punched\" "
                             "(direct after a hole punch through both NATs), \"UPnP\" (at "
                             "the address its router maps) or \"relayed via NAME\" (through "
                             "that member's relay). Null for this node and peers not "
                             "connected."}),
            "last_seen": {"type": "number", "description": "Unix time of the latest entry."},
            "worker": or_null(_object({
                "donated_bytes": {"type": "integer", "minimum": 0},
                "state": {"type": "string", "enum": ["idle", "leased"]},
                "leased_by": or_null(string),
                "waiting": {"type": "integer", "minimum": 1, "description":
                            "Other members waiting for its lease; absent while none waits."},
                "free_within_s": {"type": "integer", "minimum": 0, "description":
                                  "Seconds until its holder must hand it over; absent while "
                                  "nobody waits."},
            }, ["donated_bytes", "state", "leased_by"], "Null unless worker mode is on.")),
            "shares_models": _string_list("Models it offers for copying."),
        }, ["peer_id", "name", "os", "covey_version", "rpc_protocol", "cores", "ram_total",
            "ram_free", "roles", "version", "self", "online", "connected", "last_seen"]),
        "ModelFile": _object({
            "name": string, "size": {"type": "integer", "minimum": 1, "description": "Bytes."},
            "sha256": string,
        }, ["name", "size", "sha256"]),
        "ModelFacts": _object({
            "version": {"const": 1}, "parameters": integer, "quantization": string,
            "context_length": {"type": "integer", "minimum": 0,
                               "description": "Tokens it was trained for; 0: not stated."},
            "file_size": integer,
            "size_label": or_null({"type": "string", "description":
                                   "The size its makers name it by, e.g. \"0.5B\"."}),
        }, ["version", "parameters", "quantization", "context_length", "file_size"],
            "What the model's GGUF header says about it."),
        "CopyJob": _object({
            "version": {"const": 1}, "model": string, "sha256": string,
            "size": {"type": "integer", "minimum": 1},
            "state": {"type": "string",
                      "enum": ["waiting", "running", "verifying", "done", "failed",
                               "cancelled"],
                      "description": "waiting: the only peers with the model are reachable "
                                     "through a relay whose cap would cut the copy; `notice` "
                                     "says so, and the copy starts once a direct path opens."},
            "done": {"type": "integer", "minimum": 0, "description": "Bytes copied so far."},
            "resumed_from": {"type": "integer", "minimum": 0,
                             "description": "Bytes an earlier try had copied."},
            "source": or_null(string), "sources": _string_list("Machines that sent bytes."),
            "path": or_null({"type": "string", "enum": ["direct", "libp2p"], "description":
                             "How the bytes come now (or came last): over the direct TLS "
                             "path, or over a libp2p stream."}),
            "notice": or_null(string), "error": or_null(string),
            "started_at": {"type": "number"}, "finished_at": or_null({"type": "number"}),
            "bytes_per_s": {"type": "integer", "minimum": 0},
        }, ["version", "model", "sha256", "size", "state", "done", "resumed_from", "source",
            "sources", "error"]),
        "Models": _object({
            "version": version,
            "local": {"type": "array", "description": "Models this node can share (hash known).",
                      "items": _object({"name": string, "size": integer,
                                        "sha256": string, "source": string,
                                        "facts": or_null(schema_ref("ModelFacts"))},
                                       ["name", "size", "sha256", "source"])},
            "swarm": {"type": "array", "description": "Models online peers offer for copying.",
                      "items": {"allOf": [schema_ref("ModelFile"), _object(
                          {"machines": _string_list()}, ["machines"])]}},
            "copies": {"type": "array", "items": schema_ref("CopyJob")},
        }, ["version", "local", "swarm", "copies"]),
        "PeerList": _object({"version": version,
                             "peers": {"type": "array", "items": schema_ref("Peer")}},
                            ["version", "peers"], "This node first, then by name."),
        "LedgerEntry": _object({"owner": string, "key": string, "seq": integer,
                                "live": {"type": "boolean"}},
                               ["owner", "key", "seq", "live"]),
        "Ledger": _object({"version": version,
                           "entries": {"type": "array", "items": schema_ref("LedgerEntry")}},
                          ["version", "entries"]),
    }


def _error_response(status: int) -> dict[str, Any]:
    _, description = ERROR_RESPONSES[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema_ref("Error")}},
    }
    header = {401: "WWW-Authenticate", 405: "Allow", 429: "Retry-After"}.get(status)
    if header:
        response["headers"] = {header: ref("headers", header)}
    return response


def _json_ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema_ref(schema)}}}


def _responses(ok: dict[str, Any], errors: tuple[int, ...]) -> dict[str, Any]:
    out = {"200": ok}
    for status in sorted(errors):
        out[str(status)] = ref("responses", ERROR_RESPONSES[status][0])
    return out


def _streamed_ok(json_schema: str, chunk_schema: str) -> dict[str, Any]:
    sse = (f"With `stream: true`, server-sent events: `data: <{chunk_schema} JSON>` each "
           "followed by a blank line, `finish_reason` null until the last chunk with choices, "
           "then `data: [DONE]`. Should the engine fail mid-stream, an event "
           "`data: {\"error\": {...}}` (the Error shape) ends the stream without [DONE].")
    return {
        "description": f"Without `stream`, one {json_schema} object. {sse}",
        "headers": {LOWERED_HEADER: {
            "description": "Only on a reply whose max_tokens was lowered to fit the context, "
                           "streamed or not: the max_tokens used.",
            "schema": {"type": "integer", "minimum": 1}}},
        "content": {
            "application/json": {"schema": schema_ref(json_schema)},
            "text/event-stream": {"schema": {"type": "string", "description": sse}},
        },
    }


def _operation(operation_id: str, tag: str, summary: str, responses: dict[str, Any],
               body: str | None = None, example: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if body is not None:
        media: dict[str, Any] = {"schema": schema_ref(body)}
        if example is not None:
            media["example"] = example
        op["requestBody"] = {"required": True, "content": {"application/json": media}}
    op["responses"] = responses
    return op


def _paths() -> dict[str, Any]:
    model = "gemma-3-270m-q4_k_m"  # the bundled default
    chat_example = {"model": model, "messages": [{"role": "user", "content": "Hi!"}],
                    "max_tokens": 64}
    text_example = {"model": model, "prompt": "Once upon a time", "max_tokens": 64,
                    "covey_route": "local"}
    return {
        "/v1/models": {"get": _operation(
            "listModels", "openai", "The models this node's routes can serve.",
            _responses(_json_ok("The models, sorted by id.", "ModelList"), COMMON_ERRORS))},
        "/v1/models/{model}": {"get": {
            **_operation("retrieveModel", "openai", "One model of GET /v1/models.",
                         _responses(_json_ok("The model.", "Model"), (*COMMON_ERRORS, 404))),
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string", "minLength": 1},
                            "description": "A model id (URL-encoded; it may contain `/`)."}]}},
        "/v1/chat/completions": {"post": _operation(
            "createChatCompletion", "openai", "Generate the assistant's next message.",
            _responses(_streamed_ok("ChatCompletion", "ChatCompletionChunk"),
                       GENERATION_ERRORS),
            "ChatCompletionRequest", chat_example)},
        "/v1/completions": {"post": _operation(
            "createCompletion", "openai", "Continue a prompt.",
            _responses(_streamed_ok("Completion", "CompletionChunk"), GENERATION_ERRORS),
            "CompletionRequest", text_example)},
        **_embedding_paths(model),
        "/openapi.json": {"get": _operation(
            "getOpenApiDocument", "covey", "This document.",
            _responses({"description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                       COMMON_ERRORS))},
        "/api/status": {"get": _operation(
            "getNodeStatus", "covey", "This node's identity, roles and connections.",
            _responses(_json_ok("The node's status.", "NodeStatus"), COMMON_ERRORS))},
        "/api/peers": {"get": _operation(
            "listPeers", "covey", "Every node the ledger knows, this one included.",
            _responses(_json_ok("The peers.", "PeerList"), COMMON_ERRORS))},
        "/api/ledger": {"get": _operation(
            "getLedger", "covey", "The ledger's entries (keys only, no values).",
            _responses(_json_ok("The entries, sorted by owner and key.", "Ledger"),
                       COMMON_ERRORS))},
        "/api/node": {"post": _operation(
            "updateNode", "covey", "Rename this node or change its roles.",
            _responses(_json_ok("The node's status after the change.", "NodeStatus"),
                       COMMON_ERRORS),
            "NodeUpdateRequest", {"name": "study-mac", "roles": ["client", "worker"]})},
        "/api/federated": {"post": _operation(
            "setFederated", "covey",
            "Start or stop serving a model's whole requests for the swarm (federated mode).",
            _responses(_json_ok("The node's status after the change.", "NodeStatus"),
                       (*COMMON_ERRORS, 404)),
            "FederatedRequest", {"enabled": True, "model": "gemma-3-270m-q4_k_m"})},
        "/api/worker": {"post": _operation(
            "setWorker", "covey",
            "Turn worker mode on (donating a share of this machine's memory) or off.",
            _responses(_json_ok("The node's status after the change.", "NodeStatus"),
                       COMMON_ERRORS),
            "WorkerRequest", {"enabled": True, "share_mib": 4096})},
        "/api/models": {"get": _operation(
            "listModelFiles", "covey",
            "This node's shareable models, the models peers offer, and copies from peers.",
            _responses(_json_ok("Models and copies.", "Models"), COMMON_ERRORS))},
        "/api/models/copy": {"post": _operation(
            "copyModel", "covey",
            "Start copying a model from the peers that offer it (resuming an earlier try), or "
            "cancel it; poll /api/models for progress.",
            _responses(_json_ok("The copy job.", "CopyJob"), (*COMMON_ERRORS, 404, 409)),
            "ModelCopyRequest", {"model": "gemma-3-270m-q4_k_m"})},
    }


def _embedding_schemas() -> dict[str, Schema]:
    integer = {"type": "integer"}
    tokens = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
              "maxItems": EMBEDDING_MAX_INPUT_TOKENS}
    text = {"type": "string", "minLength": 1}
    return {
        "EmbeddingRequest": _object({
            "model": {"type": "string", "minLength": 1,
                      "description": "A model in this node's store, or one a federated node "
                                     "serves (GET /v1/models lists it with "
                                     "`covey.embeddings` true)."},
            "input": {"oneOf": [
                text,
                {"type": "array", "items": text, "minItems": 1,
                 "maxItems": EMBEDDING_MAX_INPUTS},
                tokens,
                {"type": "array", "items": tokens, "minItems": 1,
                 "maxItems": EMBEDDING_MAX_INPUTS},
            ], "description": (
                f"A text, up to {EMBEDDING_MAX_INPUTS} texts, or token ids of the model's own "
                f"vocabulary. Each input is at most {EMBEDDING_MAX_INPUT_TOKENS} tokens and all "
                f"together at most {EMBEDDING_MAX_TOTAL_TOKENS}; more is a 400, not a "
                "truncation.")},
            "encoding_format": or_null({
                "type": "string", "enum": ["float", "base64"], "default": "float",
                "description": "`base64`: the vector's little-endian float32 bytes."}),
            "dimensions": {"type": "null", "description": "Not supported: any value is a 400 "
                           "with param `dimensions`."},
            "user": or_null({"type": "string", "description": "Accepted and ignored."}),
            "covey_route": or_null({
                "type": "string", "enum": ["auto", "local", "federated"], "default": "auto",
                "description": "`auto`: this node's own engine if it has the model, else a "
                               "federated node that serves it (`covey.route` says which, "
                               "`covey.machines` where); `local` or `federated` insist."}),
        }, ["model", "input"]),
        "Embedding": _object({
            "object": {"const": "embedding"}, "index": integer,
            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                    {"type": "string", "contentEncoding": "base64"}],
                          "description": "Unit length: a dot product is the cosine "
                                         "similarity."},
        }, ["object", "index", "embedding"]),
        "EmbeddingList": _object({
            "object": {"const": "list"},
            "data": {"type": "array", "items": schema_ref("Embedding"),
                     "description": "One per input, in the inputs' order."},
            "model": {"type": "string"},
            "usage": _object({"prompt_tokens": integer, "total_tokens": integer},
                             ["prompt_tokens", "total_tokens"]),
            "covey": schema_ref("CoveyRouting"),
        }, ["object", "data", "model", "usage", "covey"]),
    }


def _embedding_paths(model: str) -> dict[str, Any]:
    return {"/v1/embeddings": {"post": _operation(
        "createEmbedding", "openai",
        "One vector per input, from a model on this node (the first request loads it in "
        "embedding mode, which takes a second engine process, unloaded after "
        f"{EMBEDDING_IDLE_UNLOAD_S / 60:.0f} minutes unused) or, when it is not here, on a "
        "federated node that serves it, under the same limits. A client that closes its "
        "connection stops its request between batches.",
        _responses(_json_ok("The vectors.", "EmbeddingList"), GENERATION_ERRORS),
        "EmbeddingRequest",
        {"model": model, "input": ["The cat sat on the mat.", "A kitten sat on the rug."]})}}


def openapi_document(server_url: str | None = None, *, node_api: bool = True
                     ) -> dict[str, Any]:
    """The OpenAPI 3.1 document, a fresh JSON-ready dict on each call.

    Without `server_url` the server is "/", i.e. the node that served the document. With
    `node_api=False` it leaves out the /api paths, for the API served on a network address.
    """
    paths = _paths()
    if not node_api:
        paths = {path: item for path, item in paths.items() if not path.startswith("/api/")}
    headers = {
        "Retry-After": {"description": "Seconds to wait before retrying.",
                        "schema": {"type": "integer", "minimum": 1}},
        "WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}},
        "Allow": {"description": "The methods the path takes, comma-separated.",
                  "schema": {"type": "string"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Covey node API",
            "version": covey_version(),
            "summary": "A Covey node's local API: OpenAI-compatible /v1 and the node's own /api.",
            "description": (
                "Served on 127.0.0.1 and, with `covey node --api-listen ADDR:PORT`, the /v1 "
                "endpoints and this document also on a network address; the /api endpoints "
                "are on loopback only. Every request needs `Authorization: Bearer <secret>` "
                "(on loopback the secret in the node's data directory, file `api-secret`; on "
                "the network address the API key the node was started with) and a Host header "
                "naming the address and port it was sent to (or a name added with "
                "`--api-host`, e.g. host.docker.internal; on a wildcard address any of the "
                "machine's addresses). Browser pages may call it only from the origins given "
                "with `--cors-origin` (none by default): their preflight OPTIONS is answered "
                "without the secret, and every reply to them carries Access-Control-Allow-"
                "Origin; any other origin gets no CORS header. Every error is "
                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`; a path not "
                "listed here answers 404 and a method not listed 405 with an Allow header. "
                "Request bodies may carry fields not listed here (they are ignored), except "
                "those of POST /api/node, /api/worker and /api/models/copy."),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": server_url or "/"}],
        "tags": [{"name": "openai", "description": "OpenAI-compatible endpoints."},
                 {"name": "covey", "description": "Covey's own endpoints."}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": {**_error_schemas(), **_request_schemas(), **_completion_schemas(),
                        **_node_schemas(), **_embedding_schemas()},
            "responses": {name: _error_response(status)
                          for status, (name, _) in ERROR_RESPONSES.items()},
            "headers": headers,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "On loopback the secret in the node's data directory, file "
                               "`api-secret`; on a network address the node's API key.",
            }},
        },
    }
