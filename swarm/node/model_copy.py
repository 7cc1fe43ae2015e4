"""Model copy: a node that lacks a model fetches it from peers that have it, over the swarm.

- Every node publishes a "models" ledger entry: the models in its store that others may copy
  (name, size, sha256). Only admitted members see it and only they reach the copy protocol.
- `CopyServer` answers `/covey/model-copy/1.0.0`: one byte range of one model per stream.
- `Copier` runs copy jobs: byte ranges appended to a partial file in the store, resuming what
  an earlier try left, moving to another peer with the same file when one leaves, and checked
  against the published sha256 before the store takes the model. Over a direct link it first
  asks the peer for the direct TLS path (swarm/node/copy_direct.py), several times faster;
  this protocol carries on from the bytes already written when that path is refused or fails.
- A peer reached only through a relay is a source only while the relay's cap on a circuit
  allows the rest of the copy (`swarm/net/bulk_path.py`); otherwise the job waits ("waiting",
  its notice saying why) until a direct path opens, and takes a direct source over a relayed one.
- What a peer announces is not trusted: a copy that would leave less than `DISK_MARGIN_BYTES`
  free is refused before any byte is written, no more than the announced size is read, and
  when peers disagree on what a name means with no majority, the user picks by sha256.

Wire: a request frame {"version", "model", "sha256", "offset", "length"}; the reply is a frame
{"ok": true} followed by exactly `length` raw bytes, or a frame {"ok": false, "code", "message"}.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from backends.errors import ModelStoreError
from backends.gguf_info import GGUFInfo
from backends.sizes import human_bytes
from backends.store.model_store import DiskFull, Manifest, ModelExists, ModelStore
from swarm.ledger.entries import MAX_SHARED, MODELS_KEY, ModelsEntry, SharedModel, parse_shared
from swarm.ledger.rules import Ledger, is_live
from swarm.net.bulk_path import Relayed, bulk_path
from swarm.net.host import (
    parse_versioned,
    read_frame,
    read_json_frame,
    reset_quietly,
    write_json_frame,
)
from swarm.node import copy_direct

log = logging.getLogger(__name__)

PROTOCOL = "/covey/model-copy/1.0.0"
WIRE_VERSION = 1
RANGE_BYTES = 16 << 20  # one request per range: what a peer that leaves leaves half-sent
BLOCK_BYTES = 256 << 10
MAX_REQUEST_BYTES = 4096
CONNECT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 20.0  # no byte for this long: the peer is treated as gone
DISK_MARGIN_BYTES = 1 << 30  # a copy must leave this much free on the store's disk
WAIT_DIRECT_S = 2.0  # how often a copy waiting for a direct path looks again
# The GGUF check starts once this much has arrived (a header is a few MB, most of it the
# vocabulary), so that it runs while the rest arrives instead of after it.
HEADER_CHECK_BYTES = 32 << 20


class CopyError(ModelStoreError):
    """A copy that cannot start or cannot finish; the message says why and what to do."""


class AmbiguousModel(CopyError):
    """Peers offer different files under one name and most of them do not agree on one."""


@dataclass(frozen=True)
class Offer:
    model: SharedModel
    peer_id: str
    machine: str


# -- ledger entry (pure) -------------------------------------------------------------------------

def shared_value(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """This node's "models" ledger value: the hashed models in its store, as many as fit."""
    models = tuple(SharedModel(m.name, m.size, m.sha256) for m in manifests if m.sha256)
    return ModelsEntry(models[:MAX_SHARED]).to_value()


def offers(ledger: Ledger, admitted: set[str], self_id: str, now: float,
           names: dict[str, str]) -> list[Offer]:
    """Every model that an admitted, online peer offers (this node's own left out)."""
    found = []
    for record in ledger.by_key(MODELS_KEY):
        owner = record.entry.owner
        if owner == self_id or owner not in admitted or not is_live(record, now):
            continue
        for model in parse_shared(record.entry.value):
            found.append(Offer(model, owner, names.get(owner, owner[-8:])))
    return found


def choose_file(found: Sequence[Offer], name: str, sha256: str | None) -> SharedModel:
    """The file to copy for `name`: the one with `sha256` if given, else the one most of the
    peers offering `name` have. Peers could disagree on what a name means, and a hostile one
    could offer its own file: with no majority, AmbiguousModel names the candidates."""
    matching = [o for o in found if o.model.name == name
                and (sha256 is None or o.model.sha256 == sha256.lower())]
    if not matching:
        have = sorted({o.model.name for o in found})
        offered = ", ".join(have) if have else "none"
        what = f"{name!r} with sha256 {sha256}" if sha256 else repr(name)
        raise CopyError(f"No peer online offers {what} (peers offer: {offered}).")
    machines: dict[SharedModel, set[str]] = {}
    for o in matching:
        machines.setdefault(o.model, set()).add(o.machine)
    peers = len({o.peer_id for o in matching})
    ranked = sorted(machines, key=lambda f: (-len(machines[f]), f.sha256))
    if len(ranked) == 1 or 2 * len(machines[ranked[0]]) > peers:
        return ranked[0]
    files = "; ".join(f"sha256 {f.sha256} ({f.size} bytes, on {', '.join(sorted(machines[f]))})"
                      for f in ranked)
    raise AmbiguousModel(
        f"Peers offer different files named {name!r} and no file is offered by most of them: "
        f"{files}. Choose one by its hash: covey models copy {name} --sha256 SHA256.")


def check_room(name: str, need: int, free: int, margin: int = DISK_MARGIN_BYTES) -> None:
    """DiskFull unless `need` more bytes leave at least `margin` free."""
    if need > free - margin:
        raise DiskFull(
            f"Not enough disk space to copy {name!r}: it needs {human_bytes(need)} more, "
            f"{human_bytes(free)} is free and Covey keeps {human_bytes(margin)} free. Free "
            "some space and copy again.")


def usable_sources(found: Sequence[Offer], relayed: Callable[[str], Relayed | None],
                   need: int) -> tuple[list[Offer], str | None]:
    """The sources a copy needing `need` more bytes may use now: the direct ones if any, else
    the relayed ones whose circuit carries the rest; with a notice for the user when it goes
    through a relay, or, when none may be used, why it waits."""
    paths = [(o, bulk_path(o.machine, relayed(o.peer_id), need, "the copy")) for o in found]
    direct = [o for o, path in paths if path.notice is None]
    if direct:
        return direct, None
    slow = [o for o, path in paths if path.go]
    return slow, next((path.notice for _, path in paths if path.go == bool(slow)), None)


def next_range(done: int, size: int, range_bytes: int = RANGE_BYTES) -> tuple[int, int]:
    return done, min(range_bytes, size - done)


def parse_request(data: bytes) -> tuple[str, str, int, int]:
    body = parse_versioned(data, WIRE_VERSION, "copy request")
    model, sha256, offset, length = (body.get(k) for k in ("model", "sha256", "offset", "length"))
    if not (isinstance(model, str) and isinstance(sha256, str) and type(offset) is int
            and type(length) is int and offset >= 0 and 0 < length <= RANGE_BYTES):
        raise ValueError("bad copy request")
    return model, sha256, offset, length


# -- serving ------------------------------------------------------------------------------------

class CopyServer:
    """Sends byte ranges of this node's shareable models to admitted peers."""

    def __init__(self, store: ModelStore, limit_bytes_s: float | None = None) -> None:
        self.store = store
        self.limit_bytes_s = limit_bytes_s  # None: as fast as the link allows

    async def handle(self, stream: INetStream) -> None:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            model, sha256, offset, length = parse_request(
                await read_frame(stream, MAX_REQUEST_BYTES))
        manifest = next((m for m in self.store.shareable() if m.name == model), None)
        if manifest is None or manifest.sha256 != sha256:
            await write_json_frame(stream, {
                "ok": False, "code": "model_not_found",
                "message": f"this node does not share {model!r} ({sha256})"})
            return
        if offset + length > manifest.size:
            await write_json_frame(stream, {"ok": False, "code": "bad_range",
                                            "message": f"the file has {manifest.size} bytes"})
            return
        await write_json_frame(stream, {"ok": True})
        started = trio.current_time()
        sent = 0
        with self.store.model_path(model).open("rb") as f:
            f.seek(offset)
            while sent < length:
                block = f.read(min(BLOCK_BYTES, length - sent))
                if not block:
                    raise OSError(f"{model} shrank while being copied")
                await stream.write(block)
                sent += len(block)
                if self.limit_bytes_s:
                    await trio.sleep_until(started + sent / self.limit_bytes_s)


# -- copying ------------------------------------------------------------------------------------

@dataclass
class CopyJob:
    """A copy's progress, as the API shows it."""

    model: str
    sha256: str
    size: int
    state: str = "running"  # waiting (for a direct path), running, verifying, done, failed,
    # cancelled
    done: int = 0
    resumed_from: int = 0
    source: str | None = None  # the machine sending now (or last)
    path: str | None = None  # how the bytes come now (or came last): "direct" or "libp2p"
    sources: list[str] = field(default_factory=list)
    notice: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    version: int = WIRE_VERSION

    def to_dict(self) -> dict[str, Any]:
        elapsed = (self.finished_at or time.time()) - self.started_at
        rate = (self.done - self.resumed_from) / elapsed if elapsed > 0 else 0.0
        return asdict(self) | {"bytes_per_s": round(rate)}

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


ACTIVE_STATES = ("waiting", "running", "verifying")


class _PeerFailed(Exception):
    pass


class Copier:
    """This node's copy jobs, one per model name."""

    def __init__(self, host: IHost, store: ModelStore, found: Callable[[], list[Offer]],
                 on_added: Callable[[], None], rng: random.Random | None = None,
                 free_bytes: Callable[[], int] | None = None, direct: bool = True,
                 relayed: Callable[[str], Relayed | None] = lambda peer_id: None) -> None:
        self.host = host
        self.direct = direct  # ask peers for the direct TLS path
        self._relayed = relayed  # peer id -> its relay, when reached only through one
        self.store = store
        self._free_bytes = free_bytes or store.free_bytes
        self._found = found
        self._on_added = on_added
        self._rng = rng or random.Random()
        self.jobs: dict[str, CopyJob] = {}
        self._scopes: dict[str, trio.CancelScope] = {}

    def start(self, nursery: trio.Nursery, name: str, sha256: str | None = None) -> CopyJob:
        """Start copying `name` (or return the copy already running); CopyError if nobody
        offers it (AmbiguousModel if peers disagree on it), ModelExists if the store has it,
        DiskFull if it does not fit, before anything is written."""
        running = self.jobs.get(name)
        if running is not None and running.active:
            return running
        if name in self.store.names():
            raise ModelExists(f"{name!r} is already in this node's store.")
        chosen = choose_file(self._found(), name, sha256)
        check_room(chosen.name, chosen.size - self.store.copy_resumable(
            chosen.name, chosen.sha256, chosen.size), self._free_bytes())
        job = CopyJob(chosen.name, chosen.sha256, chosen.size)
        self.store.claim(job.model)  # released when the job ends
        try:
            partial = self.store.copy_partial(job.model, job.sha256, job.size)
            job.resumed_from = job.done = partial.stat().st_size if partial.exists() else 0
        except BaseException:
            self.store.release(job.model)
            raise
        self._sources(job)  # says at once when the copy must wait for a direct path
        self.jobs[name] = job
        header = _HeaderCheck()
        nursery.start_soon(self._check_header, job, partial, header)
        nursery.start_soon(self._run, job, partial, header)
        return job

    def cancel(self, name: str) -> CopyJob | None:
        job = self.jobs.get(name)
        scope = self._scopes.get(name)
        if job is not None and job.active and scope is not None:
            scope.cancel()
        return job

    async def _check_header(self, job: CopyJob, partial: Path, header: _HeaderCheck) -> None:
        """Check the GGUF header once it has arrived, while the rest still comes."""
        try:
            while job.done < min(job.size, HEADER_CHECK_BYTES):
                if not job.active:
                    return
                await trio.sleep(0.05)
            header.info = await trio.to_thread.run_sync(
                self.store.check_copy_header, partial, job.size,
                abandon_on_cancel=True)  # type: ignore[call-arg]
        finally:
            header.done.set()

    async def _run(self, job: CopyJob, partial: Path, header: _HeaderCheck) -> None:
        with trio.CancelScope() as scope:
            self._scopes[job.model] = scope
            try:
                with partial.open("ab") as f:
                    sink = _Sink(f, job, await trio.to_thread.run_sync(_hash_of, partial))
                    await self._fetch_all(job, sink)
                job.state = "verifying"
                await header.done.wait()
                await trio.to_thread.run_sync(
                    self.store.finish_copy, job.model, partial, job.sha256,
                    " and ".join(job.sources), sink.hash.hexdigest(), header.info)
                job.state = "done"
                self._on_added()
            except ModelStoreError as exc:
                job.state, job.error = "failed", str(exc)
            except OSError as exc:  # the data directory itself (permissions, a vanished disk)
                job.state, job.error = "failed", f"cannot write the copy: {exc}"
            finally:
                job.finished_at = time.time()
                self._scopes.pop(job.model, None)
                self.store.release(job.model)
        if scope.cancelled_caught:
            job.state = "cancelled"
            job.error = "cancelled; the part copied so far is kept and the next copy resumes it"
        log.info("copy of %s %s (%s of %s bytes)%s", job.model, job.state, job.done, job.size,
                 f": {job.error}" if job.error else "")

    async def _fetch_all(self, job: CopyJob, f: _Sink) -> None:
        """Fetch the rest of the file, moving to another peer with it when one fails."""
        failed: set[str] = set()
        no_direct: set[str] = set()  # peers whose direct path was refused or broke
        while job.done < job.size:
            sources = [o for o in self._found()
                       if o.model.sha256 == job.sha256 and o.peer_id not in failed]
            if not sources:
                percent = 100 * job.done // job.size
                why = f" ({job.notice})" if job.notice else ""
                raise CopyError(
                    f"The copy of {job.model!r} stopped at {percent}%: no other peer online has "
                    f"it{why}. What was copied is kept; copy again to resume.")
            sources = self._sources(job, sources)
            if not sources:
                await trio.sleep(WAIT_DIRECT_S)
                continue
            source = self._rng.choice(sources)
            job.source = source.machine
            if source.machine not in job.sources:
                job.sources.append(source.machine)
            try:
                if self.direct and source.peer_id not in no_direct:
                    no_direct.add(source.peer_id)  # one try per peer and job
                    await self._fetch_direct(source, job, f)
                if job.done < job.size:
                    await self._fetch_from(source, job, f)
            except ModelStoreError:
                raise  # this machine's own trouble (a full disk): another peer will not help
            except Exception as exc:  # noqa: BLE001 - a vanished peer fails in many ways
                failed.add(source.peer_id)
                job.notice = f"{source.machine} stopped sending ({_why(exc)})"
                log.warning("copy of %s from %s failed: %r", job.model, source.machine, exc)

    async def _fetch_direct(self, source: Offer, job: CopyJob, f: _Sink) -> None:
        """The rest of the file over the direct TLS path, or as much as it gives before it
        fails; a peer that offers no direct path is not held against it."""
        try:
            offer = await copy_direct.ask(self.host, source.peer_id, job.model, job.sha256,
                                          job.done, job.size)
            job.path = copy_direct.DIRECT
            await copy_direct.fetch(offer, f.write, f.hashed)
        except ModelStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, cut: libp2p goes on
            job.notice = (f"no direct path from {source.machine} ({_why(exc)}); going on over "
                          "libp2p")
            log.info("copy of %s: %s", job.model, job.notice)
        finally:
            f.flush()

    def _sources(self, job: CopyJob, found: Sequence[Offer] | None = None) -> list[Offer]:
        """The sources `job` may use now; none: the job waits for a direct path, saying why."""
        if found is None:
            found = [o for o in self._found() if o.model.sha256 == job.sha256]
        usable, notice = usable_sources(found, self._relayed, job.size - job.done)
        if notice is not None or job.state == "waiting":
            job.notice = notice
        job.state = "running" if usable else "waiting"
        return usable

    async def _fetch_from(self, source: Offer, job: CopyJob, f: _Sink) -> None:
        job.path = copy_direct.LIBP2P
        while job.done < job.size:
            offset, length = next_range(job.done, job.size)
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await self.host.new_stream(ID.from_base58(source.peer_id),
                                                    [TProtocol(PROTOCOL)])
            try:
                await write_json_frame(stream, {
                    "version": WIRE_VERSION, "model": job.model, "sha256": job.sha256,
                    "offset": offset, "length": length})
                with trio.fail_after(STALL_TIMEOUT_S):
                    reply = await read_json_frame(stream, MAX_REQUEST_BYTES)
                if not isinstance(reply, dict) or reply.get("ok") is not True:
                    message = reply.get("message") if isinstance(reply, dict) else None
                    raise _PeerFailed(str(message or "refused"))
                left = length
                while left:
                    with trio.fail_after(STALL_TIMEOUT_S):
                        # Never more than the range: what a peer sends past it is not read.
                        data = await stream.read(min(BLOCK_BYTES, left))
                    if not data:
                        raise EOFError("the peer closed the stream mid-range")
                    f.append(data)
                    left -= len(data)
                f.flush()
            finally:
                f.flush()  # bytes received before a failure count for the next try
                await reset_quietly(stream)


class _HeaderCheck:
    """What the GGUF check found while the copy arrived: None if it found nothing usable."""

    def __init__(self) -> None:
        self.info: GGUFInfo | None = None
        self.done = trio.Event()


class _Sink:
    """The partial file a job appends to, with the sha256 of all it holds so far: the check
    at the end then need not read the whole file again. `write` and `hashed` are each called
    from one thread at a time (the trio thread, or one of the direct path's), in order."""

    def __init__(self, f: BinaryIO, job: CopyJob, digest: Any) -> None:
        self.f = f
        self.job = job
        self.hash = digest  # hashlib's sha256 object

    def append(self, data: bytes | memoryview) -> None:
        self.write(data)
        self.hashed(data)

    def write(self, data: bytes | memoryview) -> None:
        """The file half of `append`: the direct path runs the halves in two threads."""
        job = self.job
        try:
            self.f.write(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"The disk is full: {job.model!r} needs {job.size - job.done} more bytes. "
                    "Free some space and copy again; what was copied is kept.") from exc
            raise CopyError(f"Cannot write the copy of {job.model!r}: {exc.strerror}") from exc

    def hashed(self, data: bytes | memoryview) -> None:
        """The other half, for bytes `write` wrote: they count once hashed."""
        self.hash.update(data)
        self.job.done += len(data)

    def flush(self) -> None:
        self.f.flush()


def _hash_of(path: Path) -> Any:
    """A sha256 object fed with what `path` holds (what an earlier try left)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256")


def _why(exc: Exception) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "it went silent"
    return str(exc) or type(exc).__name__
