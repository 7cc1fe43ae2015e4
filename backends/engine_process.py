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
from pathlib import Path
from typing import IO, Any

from backends import embedding, ggml
from backends import engine_protocol as proto
from backends.text.chat_template import ChatTemplateError, render_chat
from backends.text.stop_strings import StopMatcher

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


def physical_cores() -> int:
    """Cores, not hyperthreads: a second thread per core slows llama.cpp down."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((cpu / "physical_package_id").read_text(), (cpu / "core_id").read_text()))
        except OSError:
            continue
    usable = len(os.sched_getaffinity(0))  # what this process may run on
    return min(len(cores), usable) if cores else usable


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

    def _prompt(self, request: proto.GenerateRequest) -> tuple[list[int], tuple[str, ...]]:
        """The prompt's tokens, and the stop strings its chat format implies."""
        llm = self.llm
        if request.messages is None:
            text = (request.prompt or "") + request.continuation
            return llm.tokenize(text.encode(), add_bos=True, special=True), ()
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        chat = render_chat(
            request.messages,
            llm.metadata.get("tokenizer.chat_template"),
            bos_token=bos,
            eos_token=eos,
        )
        add_bos = not (bos and chat.text.startswith(bos))
        text = chat.text + request.continuation
        return llm.tokenize(text.encode(), add_bos=add_bos, special=True), chat.stop

    def embed(self, request: proto.EmbedRequest) -> proto.Embeddings:
        def progress(done: int) -> None:
            self.channel.send(proto.EmbedProgress(id=request.id, inputs_done=done))

        vectors, tokens = embedding.embed(self.llm, request.inputs, request.max_total_tokens,
                                          progress)
        return proto.Embeddings(id=request.id, vectors=tuple(vectors), prompt_tokens=tokens)

    def serve(self, request: proto.GenerateRequest | proto.EmbedRequest) -> Any:
        if isinstance(request, proto.EmbedRequest):
            return self.embed(request)
        return self.generate(request)

    def generate(self, request: proto.GenerateRequest) -> proto.Done:
        import llama_cpp

        llm = self.llm
        prompt, template_stops = self._prompt(request)
        if len(prompt) + request.max_tokens > llm.n_ctx():
            raise ChatTemplateError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.max_tokens}) "
                f"does not fit the context of {llm.n_ctx()} tokens"
            )
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
            min_p=0.0,
            temp=request.temperature,
            repeat_penalty=request.repeat_penalty,
            reset=True,
        )
        for token in tokens if request.max_tokens > 0 else ():
            last_at = time.perf_counter()
            if not produced:
                first_at = last_at
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                finish = "stop"
                break
            produced.append(token)
            prev = produced[-2:-1] or prompt[-1:]
            text = stops.feed(decoder.decode(llm.detokenize([token], prev_tokens=prev)))
            if not any(pieces):  # the reply starts at its first visible character
                text = text.lstrip()
            pieces.append(text)
            self.channel.send(proto.Token(id=request.id, token=token, text=text))
            if stops.stopped:
                finish = "stop"
                break
            if self._stop_requested(request.id):
                finish = "cancelled"
                break
            if len(produced) >= request.max_tokens:
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
            prompt_tokens=len(prompt),
            tokens=tuple(produced),
            timings=proto.Timings(
                prompt_s=prompt_s,
                prompt_eval_tokens=perf.n_p_eval,
                prompt_tokens_per_s=perf.n_p_eval / prompt_eval_s if prompt_eval_s > 0 else 0.0,
                generation_s=gen_s,
                generation_tokens_per_s=(len(produced) - 1) / gen_s if gen_s > 0 else 0.0,
            ),
        )


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
        except (ChatTemplateError, ValueError, RuntimeError) as exc:
            channel.send(proto.Failed(kind="generate", message=str(exc), id=request.id))
        finally:
            runner.finish(request.id)


if __name__ == "__main__":
    main(sys.argv[1:])
