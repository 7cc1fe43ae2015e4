"""Supervises an engine process from the parent: starts it, streams its tokens, and turns
every way it can die into a typed error within a bounded time.

ggml aborts the engine when an RPC worker is unreachable or dies, and the engine can hang
when a worker vanishes without closing its connection. Neither may take the parent with
it: the supervisor watches for silence, kills rather than waits, and names the lost worker
where it can.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from backends import engine_protocol as proto
from backends.compute import compute_env
from backends.endpoints import split_host_port
from backends.engine_protocol import (
    Done,
    Embeddings,
    EmbedRequest,
    EngineConfig,
    GenerateRequest,
    Loaded,
    Token,
)

__all__ = [
    "Done", "Engine", "EngineConfig", "EngineCrashed", "EngineError", "EngineHung",
    "EngineLoadFailed", "GenerateRequest", "GenerationFailed", "Loaded", "Token", "Watchdog",
    "WorkerLost", "WorkerUnreachable",
]

_CONNECT_FAILED = re.compile(r"Failed to connect to (\S+)")
_EOF = object()


class EngineError(RuntimeError):
    """The engine could not serve the request. The parent is fine and may start a new one."""


class EngineLoadFailed(EngineError):
    """The model could not be loaded (bad file, too little memory, ...)."""


class GenerationFailed(EngineError):
    """The engine refused this request (e.g. the prompt does not fit); it is still usable."""


class EngineCrashed(EngineError):
    def __init__(self, message: str, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class EngineHung(EngineError):
    """The engine went silent past its deadline and was killed."""


class WorkerLost(EngineError):
    """An RPC worker stopped answering: the engine was lost with it."""

    def __init__(self, message: str, endpoints: tuple[str, ...]) -> None:
        super().__init__(message)
        self.endpoints = endpoints


class WorkerUnreachable(WorkerLost):
    """Nobody answered at an RPC endpoint when the engine tried to connect."""


@dataclass(frozen=True)
class Watchdog:
    """How long the engine may stay silent before the supervisor kills it."""

    connect_s: float = 30.0
    load_s: float = 300.0  # between two load progress steps, not for the whole load
    first_token_s: float = 300.0
    token_s: float = 60.0
    close_s: float = 5.0


def _endpoint_answers(endpoint: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(split_host_port(endpoint), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def diagnose(
    returncode: int | None,
    stderr_tail: str,
    endpoints: tuple[str, ...],
    connecting: str | None,
    answering: dict[str, bool],
) -> EngineError:
    """The typed error for an engine that died. Pure: `answering` says which endpoints still
    accept connections now."""
    unreachable = _CONNECT_FAILED.search(stderr_tail)
    if unreachable or (connecting and not answering.get(connecting, True)):
        endpoint = unreachable.group(1) if unreachable else connecting
        assert endpoint is not None
        return WorkerUnreachable(
            f"no RPC worker answers at {endpoint}; check that it runs and is reachable",
            (endpoint,),
        )
    lost = tuple(e for e in endpoints if not answering.get(e, True))
    if lost:
        return WorkerLost(f"lost the RPC worker at {', '.join(lost)}", lost)
    how = (
        f"signal {signal.Signals(-returncode).name}"
        if returncode is not None and returncode < 0
        else f"exit code {returncode}"
    )
    if endpoints and "RPC server crashed" in stderr_tail:
        return WorkerLost(f"an RPC worker failed mid-request ({how})", ())
    last = stderr_tail.strip().splitlines()[-1:] or [""]
    return EngineCrashed(f"the engine process died ({how}): {last[0]}", returncode, stderr_tail)


class Engine:
    """One engine process. Use as a context manager, or call `close()`.

    `generate()` is not reentrant: one request at a time, as the engine serves them.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        config: EngineConfig,
        watchdog: Watchdog | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.watchdog = watchdog or Watchdog()
        self.loaded: Loaded | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._connecting: str | None = None
        self._dead: EngineError | None = None
        self._send_lock = threading.Lock()
        self._closed = False
        child_env = compute_env(env)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "backends.engine_process", proto.encode(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
            start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
        )
        threading.Thread(target=self._read_events, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def stderr_tail(self) -> str:
        return "".join(self._stderr)

    def _read_events(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self._events.put(proto.decode(line))
            except proto.ProtocolError:
                self._stderr.append(f"[covey] unexpected engine output: {line[:200]!r}\n")
        self._events.put(_EOF)

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            self._stderr.append(raw.decode("utf-8", errors="replace"))

    def _next_event(self, deadline_s: float, doing: str) -> Any:
        if self._dead is not None:
            raise self._dead
        while True:
            wait = self.watchdog.connect_s if self._connecting else deadline_s
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                self._fail(self._silence(wait, doing), hung=True)
            if event is _EOF:
                self._fail(None)
            if isinstance(event, proto.Connecting):
                self._connecting = event.endpoint
            elif isinstance(event, proto.Connected):
                self._connecting = None
            elif isinstance(event, proto.Failed) and event.kind == "protocol":
                self._stderr.append(f"[covey] the engine could not read: {event.message}\n")
            else:
                return event

    def _silence(self, waited: float, doing: str) -> EngineError:
        if self._connecting:
            return WorkerUnreachable(
                f"the RPC worker at {self._connecting} accepted the connection but did not "
                f"answer within {waited:.0f} s",
                (self._connecting,),
            )
        return EngineHung(f"the engine was silent for {waited:.0f} s while {doing}; "
                          "it was stopped")

    def _fail(self, error: EngineError | None, hung: bool = False) -> None:
        """Make sure the process is gone, record why, and raise it."""
        if hung or self._proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0 if hung else self.watchdog.close_s)
            self._kill()
        self._stderr_reader.join(timeout=2)  # its last lines often say what went wrong
        endpoints = self.config.rpc_endpoints
        answering = {e: _endpoint_answers(e) for e in endpoints}
        if error is None or (isinstance(error, EngineHung) and not all(answering.values())):
            error = diagnose(
                self._proc.returncode, self.stderr_tail, endpoints, self._connecting, answering
            )
        if self.loaded is None and isinstance(error, (EngineCrashed, EngineHung)):
            error = EngineLoadFailed(f"could not load {self.config.model_path}: {error}")
        self._dead = error
        raise error

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def wait_loaded(self, progress: Callable[[float], None] | None = None) -> Loaded:
        """Block until the model is loaded, telling `progress` the fraction done; raises a
        typed EngineError otherwise."""
        if self.loaded is not None:
            return self.loaded
        event = self._next_event(self.watchdog.load_s, "loading the model")
        while isinstance(event, proto.LoadProgress):
            if progress:
                progress(event.fraction)
            event = self._next_event(self.watchdog.load_s, "loading the model")
        if isinstance(event, proto.Failed):
            self._fail(EngineLoadFailed(f"could not load {self.config.model_path}: "
                                        f"{event.message}"))
        if not isinstance(event, Loaded):
            self._fail(EngineCrashed(f"unexpected engine event {event!r}", None, ""))
        self._connecting = None
        self.loaded = event
        return event

    def _send(self, message: Any) -> None:
        """Write one command; `stop()` may come from another thread than `generate()`."""
        try:
            assert self._proc.stdin is not None
            with self._send_lock:
                self._proc.stdin.write(proto.encode(message).encode())
                self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._fail(None)

    def generate(self, request: GenerateRequest) -> Iterator[Token | Done]:
        """Stream a reply: Token events, then one Done. Raises a typed EngineError."""
        self.wait_loaded()
        if not request.id:
            request = replace(request, id=f"r{next(self._ids)}")
        self._send(request)
        deadline, doing = self.watchdog.first_token_s, "reading the prompt"
        finished = False
        try:
            while True:
                event = self._next_event(deadline, doing)
                deadline, doing = self.watchdog.token_s, "generating"
                if isinstance(event, proto.Failed):
                    finished = True
                    raise GenerationFailed(event.message)
                finished = isinstance(event, Done)
                yield event
                if finished:
                    return
        finally:
            if not finished and self._dead is None and not self._closed:
                # Best effort: if the engine died meanwhile, the next call reports it.
                with contextlib.suppress(EngineError):
                    self._abandon(request.id)

    def embed(self, request: EmbedRequest) -> Embeddings:
        """The vectors of `request`'s inputs (the engine must be an embedding one); raises
        GenerationFailed when the engine refuses the inputs, another EngineError otherwise."""
        self.wait_loaded()
        self._send(request)
        # The first batch waits like a first token, each later one like a next token.
        event = self._next_event(self.watchdog.first_token_s, "embedding")
        while isinstance(event, proto.EmbedProgress):
            event = self._next_event(self.watchdog.token_s, "embedding")
        if isinstance(event, proto.Failed):
            raise GenerationFailed(event.message)
        if not isinstance(event, Embeddings) or event.id != request.id:
            self._fail(EngineCrashed(f"unexpected engine event {type(event).__name__}", None,
                                     ""))
        return event

    def _abandon(self, request_id: str) -> None:
        """The caller stopped reading mid-reply: end that generation so its leftover
        tokens cannot leak into the next request."""
        self.stop(request_id)
        while not isinstance(self._next_event(self.watchdog.token_s, "stopping"),
                             (Done, proto.Failed)):
            pass

    def stop(self, request_id: str) -> None:
        """Ask the engine to end a generation early (its Done says "cancelled"), or an embedding
        between batches (`embed` raises GenerationFailed)."""
        if self._proc.poll() is None:
            self._send(proto.Stop(id=request_id))

    def close(self) -> None:
        """Stop the engine. Never hangs: past the close deadline, it is killed."""
        self._closed = True
        if self._proc.poll() is None:
            with contextlib.suppress(EngineError):
                self._send(proto.Shutdown())
            try:
                self._proc.wait(timeout=self.watchdog.close_s)
            except subprocess.TimeoutExpired:
                self._kill()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
