"""The engine process: loads one model with llama.cpp (locally or over RPC workers) and
generates for its parent, speaking `engine_protocol` over stdin and stdout.

It is a process of its own because ggml's RPC client aborts the whole process when a worker
is lost and can hang in llama_free; the parent's supervisor (`engine.py`) survives both.
Run as `python -m backends.engine_process '<EngineConfig JSON>'`.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from backends import embedding, ggml
from backends import engine_protocol as proto
from backends.compute import physical_cores
from backends.generation import sampling
from backends.generation.grammar import GrammarError, check_prefix, engine_grammar
from backends.text.chat_template import ChatTemplateError, render_chat
from backends.text.stop_strings import StopMatcher
from backends.text.tool_prompt import decode_tools

_LAYER_LINE = re.compile(r"layer\s+(\d+) assigned to device (\S+),")
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 2, 3, 5


class _Channel:
    """The protocol's output side; C code's stray prints must never reach it."""

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # from now on fd 1 (printf in ggml) goes to stderr
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self._out.write(proto.encode(message))
            self._out.flush()


class _LlamaLog:
    """Receives llama.cpp's log: keeps the layer placement lines, passes warnings on."""

    def __init__(self) -> None:
        import llama_cpp

        self.layer_devices: dict[int, str] = {}
        self._last_level = 0
        self._callback = llama_cpp.llama_log_callback(self._on_log)  # keep a reference
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level != _LOG_CONT:
            self._last_level = level
        line = text.decode("utf-8", errors="replace")
        match = _LAYER_LINE.search(line)
        if match:
            self.layer_devices[int(match.group(1))] = match.group(2)
        elif self._last_level in (_LOG_WARN, _LOG_ERROR):
            sys.stderr.write(line)


def _device_layers(
    layer_devices: dict[int, str], n_layers: int
) -> tuple[proto.DeviceLayers, ...]:
    endpoints = {d.name: d.description for d in ggml.devices() if d.name.startswith("RPC")}
    counts = Counter(dev for il, dev in layer_devices.items() if il < n_layers)
    output_dev = layer_devices.get(n_layers)
    names = list(dict.fromkeys([*counts, *([output_dev] if output_dev else [])]))
    return tuple(
        proto.DeviceLayers(
            name=name,
            endpoint=endpoints.get(name),
            layers=counts.get(name, 0),
            holds_output=name == output_dev,
        )
        for name in names
    )


@contextlib.contextmanager
def _model_params(deterministic: bool, progress: Any) -> Iterator[None]:
    """Set model parameters llama-cpp-python's constructor does not expose, through the
    defaults it reads: `use_extra_bufts` (off in deterministic mode: without weight
    repacking, greedy output is identical however the layers are split) and a load progress
    callback."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def patched() -> Any:
        params = original()
        if deterministic:
            params.use_extra_bufts = False
        params.progress_callback = progress
        return params

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = original


def fit_max_tokens(prompt_tokens: int, max_tokens: int, n_ctx: int, fit: bool) -> int:
    """The max_tokens to generate with: as asked if it fits the context after the prompt,
    else (with `fit`) what is left; ValueError when nothing fits or lowering is not wanted."""
    if prompt_tokens + max_tokens <= n_ctx:
        return max_tokens
    if fit and n_ctx - prompt_tokens >= 1:
        return n_ctx - prompt_tokens
    raise ValueError(
        f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
        f"does not fit the context of {n_ctx} tokens"
    )


class ModelRunner:
    """The loaded model in this process, and the requests it is serving."""

    def __init__(self, config: proto.EngineConfig, channel: _Channel) -> None:
        self.config = config
        self.channel = channel
        # A stop counts only for a request queued or running: one arriving after its
        # request finished must not cancel a later request that reuses the id.
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._stopping: set[str] = set()

    def accept(self, request_id: str) -> None:
        with self._lock:
            self._pending.add(request_id)

    def request_stop(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._pending:
                self._stopping.add(request_id)

    def _stop_requested(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._stopping

    def finish(self, request_id: str) -> None:
        with self._lock:
            self._pending.discard(request_id)
            self._stopping.discard(request_id)

    def load(self) -> proto.Loaded:
        import llama_cpp

        log = _LlamaLog()
        started = time.perf_counter()
        for endpoint in self.config.rpc_endpoints:
            self.channel.send(proto.Connecting(endpoint=endpoint))
            ggml.rpc_add_server(endpoint)
            self.channel.send(proto.Connected(endpoint=endpoint))
        use_rpc = bool(self.config.rpc_endpoints)
        kwargs: dict[str, Any] = dict(
            model_path=self.config.model_path,
            n_ctx=self.config.n_ctx,
            n_batch=self.config.n_batch,
            n_gpu_layers=-1 if use_rpc else 0,
            verbose=True,  # False would send fds 1 and 2 to /dev/null during load
        )
        # llama-cpp-python defaults to half the logical CPUs: 1 thread on a 2-core machine.
        threads = self.config.n_threads or physical_cores()
        kwargs.update(n_threads=threads, n_threads_batch=threads)
        if use_rpc and self.config.tensor_split:
            kwargs["tensor_split"] = list(self.config.tensor_split)
        if self.config.embedding:
            # n_ubatch as large as the batch: llama.cpp pools a sequence within one ubatch.
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_ubatch=self.config.n_batch)
        sent = [0.0]

        def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            if fraction - sent[0] >= 0.02 or (fraction >= 1.0 > sent[0]):
                sent[0] = fraction
                self.channel.send(proto.LoadProgress(fraction=round(fraction, 3)))
            return True

        callback = llama_cpp.llama_progress_callback(on_progress)  # referenced while loading
        with _model_params(self.config.deterministic, callback):
            self.llm = llama_cpp.Llama(**kwargs)
        load_s = time.perf_counter() - started
        n_layers = int(self.llm.metadata.get(f"{self._arch()}.block_count", 0))
        return proto.Loaded(
            load_s=load_s,
            n_ctx=self.llm.n_ctx(),
            n_layers=n_layers,
            devices=_device_layers(log.layer_devices, n_layers),
        )

    def _arch(self) -> str:
        return self.llm.metadata.get("general.architecture", "llama")

    def _prompt(self, request: proto.GenerateRequest) -> tuple[list[int], int, tuple[str, ...]]:
        """The prompt's tokens (ending with the continuation), how many of them the request's
        own prompt makes (what usage counts: a continuation is the reply's text), and the stop
        strings its chat format implies."""
        llm = self.llm
        if request.messages is None:
            own = request.prompt or ""
            return (*self._tokens(own, request.continuation, add_bos=True), ())
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        try:
            tools = decode_tools(request.tools)
        except ValueError as exc:
            raise ChatTemplateError(f"bad tools: {exc}") from None
        chat = render_chat(
            request.messages,
            llm.metadata.get("tokenizer.chat_template"),
            bos_token=bos,
            eos_token=eos,
            tools=tools,
        )
        add_bos = not (bos and chat.text.startswith(bos))
        if request.grammar is not None and request.continuation:
            # The carried-over text must also advance the grammar: tokenize it on its own so
            # its tokens are known (`_grammar`).
            head = llm.tokenize(chat.text.encode(), add_bos=add_bos, special=True)
            return head + self._continuation_tokens(request), len(head), chat.stop
        return (*self._tokens(chat.text, request.continuation, add_bos), chat.stop)

    def _tokens(self, own: str, continuation: str, add_bos: bool) -> tuple[list[int], int]:
        """The tokens of `own` + `continuation`, and how many `own` alone makes (the same as
        the attempt before any failover counted)."""
        tokens = self.llm.tokenize((own + continuation).encode(), add_bos=add_bos, special=True)
        if not continuation:
            return tokens, len(tokens)
        return tokens, len(self.llm.tokenize(own.encode(), add_bos=add_bos, special=True))

    def _continuation_tokens(self, request: proto.GenerateRequest) -> list[int]:
        llm = self.llm
        tokens = llm.tokenize(request.continuation.encode(), add_bos=False, special=False)
        if llm.detokenize(tokens).decode(errors="replace") != request.continuation:
            raise GrammarError("this model cannot continue a reply under a grammar")
        return tokens

    def _grammar(self, request: proto.GenerateRequest) -> Any:
        """The request's grammar for `llm.generate`. A reply carried over from a failed
        machine must advance it too: the sampler llama-cpp-python builds next accepts the
        continuation's tokens first (once; the patch removes itself)."""
        llm = self.llm
        llm.__dict__.pop("_init_sampler", None)  # a patch left by a request that failed early
        if request.grammar is None:
            return None
        grammar = engine_grammar(llm._model.vocab, request.grammar)
        if not request.continuation:
            return grammar
        import llama_cpp

        carried = self._continuation_tokens(request)
        check_prefix(llm._model.vocab, request.grammar, carried)
        original = llm._init_sampler

        def init_sampler(*args: Any, **kwargs: Any) -> Any:
            del llm._init_sampler
            sampler = original(*args, **kwargs)
            for token in carried:
                llama_cpp.llama_sampler_accept(sampler.sampler, token)
            return sampler

        llm._init_sampler = init_sampler  # type: ignore[method-assign]
        return grammar

    def embed(self, request: proto.EmbedRequest) -> proto.Embeddings:
        def progress(done: int) -> None:
            self.channel.send(proto.EmbedProgress(id=request.id, inputs_done=done))

        vectors, tokens = embedding.embed(self.llm, request.inputs, request.max_total_tokens,
                                          progress, lambda: self._stop_requested(request.id))
        return proto.Embeddings(id=request.id, vectors=tuple(vectors), prompt_tokens=tokens)

    def serve(self, request: proto.GenerateRequest | proto.EmbedRequest) -> Any:
        if isinstance(request, proto.EmbedRequest):
            return self.embed(request)
        return self.generate(request)

    def generate(self, request: proto.GenerateRequest) -> proto.Done:
        import llama_cpp

        llm = self.llm
        prompt, own_prompt_tokens, template_stops = self._prompt(request)
        max_tokens = fit_max_tokens(len(prompt), request.max_tokens, llm.n_ctx(),
                                    request.fit_max_tokens)
        lowered = max_tokens if max_tokens < request.max_tokens else None
        bias = sampling.bias_vector(request.logit_bias, llm.n_vocab())
        llm.set_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4)))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher((*request.stop, *template_stops))
        produced: list[int] = []
        pieces: list[str] = []
        finish = "length"
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        started = time.perf_counter()
        first_at = last_at = started
        tokens = llm.generate(
            prompt,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            temp=request.temperature,
            repeat_penalty=request.repeat_penalty,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            logits_processor=(llama_cpp.LogitsProcessorList([sampling.bias_processor(bias)])
                              if bias is not None else None),
            reset=True,
            grammar=self._grammar(request),
        )
        for token in tokens if max_tokens > 0 else ():
            last_at = time.perf_counter()
            if not produced:
                first_at = last_at
            logprob = self._logprob(request, token, bias) if request.logprobs else None
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                finish = "stop"
                break
            produced.append(token)
            prev = produced[-2:-1] or prompt[-1:]
            text = stops.feed(decoder.decode(llm.detokenize([token], prev_tokens=prev)))
            if not any(pieces):  # the reply starts at its first visible character
                text = text.lstrip()
            pieces.append(text)
            self.channel.send(proto.Token(
                id=request.id, token=token, text=text, logprob=logprob,
                max_tokens_lowered_to=lowered if len(produced) == 1 else None))
            if stops.stopped:
                finish = "stop"
                break
            if self._stop_requested(request.id):
                finish = "cancelled"
                break
            if len(produced) >= max_tokens:
                break
        tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
        pieces.append(tail)
        prompt_s = first_at - started
        gen_s = last_at - first_at
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        prompt_eval_s = perf.t_p_eval_ms / 1000
        return proto.Done(
            id=request.id,
            finish_reason=finish,
            text="".join(pieces),
            prompt_tokens=own_prompt_tokens,
            tokens=tuple(produced),
            timings=proto.Timings(
                prompt_s=prompt_s,
                prompt_eval_tokens=perf.n_p_eval,
                prompt_tokens_per_s=perf.n_p_eval / prompt_eval_s if prompt_eval_s > 0 else 0.0,
                generation_s=gen_s,
                generation_tokens_per_s=(len(produced) - 1) / gen_s if gen_s > 0 else 0.0,
            ),
            max_tokens_lowered_to=lowered,
        )

    def _logprob(self, request: proto.GenerateRequest, token: int,
                 bias: Any) -> proto.TokenLogprob:
        """The sampled token's logprob from the logits it was sampled from (still the
        context's last output until the next token is evaluated)."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))
        if bias is not None:
            logits = logits + bias
        return sampling.token_logprob(logits, token, request.top_logprobs,
                                      lambda t: llm._model.detokenize([t], special=True))


def _read_commands(runner: ModelRunner, commands: queue.Queue[Any]) -> None:
    """Reads stdin in its own thread so a stop arrives while a generation runs."""
    for line in sys.stdin.buffer:  # bytes: undecodable garbage must not end the reader
        try:
            message = proto.decode(line)
        except proto.ProtocolError as exc:
            runner.channel.send(proto.Failed(kind="protocol", message=str(exc)))
            continue
        if isinstance(message, proto.Stop):
            runner.request_stop(message.id)
        elif isinstance(message, proto.Shutdown):
            break
        elif isinstance(message, proto.GenerateRequest | proto.EmbedRequest):
            runner.accept(message.id)
            commands.put(message)
    # The parent is gone or asked us to go. Exit without llama_free: it can hang when a
    # worker vanished, and the OS frees everything anyway.
    os._exit(0)


def main(argv: list[str]) -> None:
    channel = _Channel()
    try:
        config = proto.decode(argv[0])
        if not isinstance(config, proto.EngineConfig):
            raise proto.ProtocolError("the argument must be an EngineConfig")
    except (IndexError, proto.ProtocolError) as exc:
        channel.send(proto.Failed(kind="load", message=f"bad engine configuration: {exc}"))
        os._exit(2)
    runner = ModelRunner(config, channel)
    try:
        channel.send(runner.load())
    except Exception as exc:  # anything llama.cpp raises is a failed load for the parent
        channel.send(proto.Failed(kind="load", message=str(exc) or type(exc).__name__))
        os._exit(1)
    commands: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_read_commands, args=(runner, commands), daemon=True).start()
    while True:
        request = commands.get()
        try:
            channel.send(runner.serve(request))
        except (ChatTemplateError, ValueError, RuntimeError) as exc:  # GrammarError too
            channel.send(proto.Failed(kind="generate", message=str(exc), id=request.id))
        finally:
            runner.finish(request.id)


if __name__ == "__main__":
    main(sys.argv[1:])
