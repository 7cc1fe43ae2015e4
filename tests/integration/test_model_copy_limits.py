"""Copying a model from peers that announce more than they should, with two real libp2p hosts
on loopback: a copy that does not fit the disk (free space injected) is refused before any byte
is written; a peer that sends past the range it was asked for is cut at the announced size."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from backends.store.model_store import DiskFull, ModelStore
from swarm.ledger.entries import SharedModel
from swarm.net.bulk_path import Relayed
from swarm.net.host import isolate, read_frame, write_json_frame
from swarm.node.model_copy import (
    DISK_MARGIN_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL,
    Copier,
    CopyJob,
    CopyServer,
    Offer,
)
from tests.integration.test_tunnel import run, running_host
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.processes

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def overfilling(source: Path) -> Callable[[INetStream], Any]:
    """A copy server that sends each range it is asked for, then a megabyte more."""
    data = source.read_bytes()

    async def handle(stream: INetStream) -> None:
        request = json.loads(await read_frame(stream, MAX_REQUEST_BYTES))
        await write_json_frame(stream, {"ok": True})
        start = request["offset"]
        await stream.write(data[start:start + request["length"]] + b"\xee" * (1 << 20))
        await trio.sleep(5)  # the client must not wait for the end of the stream

    return handle


def copy(announced: SharedModel, handler: Callable[[INetStream], Any], client_dir: Path,
         free_bytes: int, relayed: Callable[[str], Relayed | None] = lambda peer: None,
         poll: Callable[[CopyJob], None] = lambda job: None) -> CopyJob | BaseException:
    """Copy `announced` from a host served by `handler` (reached through a relay while
    `relayed` says so; `poll` sees the job every 50 ms); the job when it ended, or what
    `Copier.start` raised."""
    result: list[CopyJob | BaseException] = []

    async def main() -> None:
        async with running_host() as source, running_host() as client, \
                trio.open_nursery() as nursery:
            source.set_stream_handler(TProtocol(PROTOCOL), isolate("copy", handler))
            await client.connect(PeerInfo(source.get_id(), source.get_addrs()))
            offer = Offer(announced, source.get_id().to_base58(), "source")
            # The source here serves the libp2p stream only, the path these limits are on.
            copier = Copier(client, ModelStore(client_dir / "models"), lambda: [offer],
                            lambda: None, free_bytes=lambda: free_bytes, relayed=relayed,
                            direct=False)
            try:
                job = copier.start(nursery, announced.name)
            except DiskFull as exc:
                result.append(exc)
                return
            while job.active:
                poll(job)
                await trio.sleep(0.05)
            result.append(job)

    run(main)
    return result[0]


def announced_as(path: Path, size: int | None = None) -> SharedModel:
    return SharedModel(MODEL, size or path.stat().st_size,
                       hashlib.sha256(path.read_bytes()).hexdigest())


def test_a_copy_larger_than_the_free_disk_is_refused_before_any_byte(
        model_file: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "src" / "models")
    store.import_file(model_file, MODEL)
    server = CopyServer(store)
    huge = announced_as(model_file, 1 << 40)  # a peer announcing 1 TiB
    refused = copy(huge, server.handle, tmp_path / "client", free_bytes=200 << 30)
    assert isinstance(refused, DiskFull), refused
    assert "Not enough disk space to copy 'tiny'" in str(refused)
    assert not (tmp_path / "client").exists()  # not even the store's folders
    # A real file that would eat into the margin is refused the same way...
    size = model_file.stat().st_size
    tight = copy(announced_as(model_file), server.handle, tmp_path / "client",
                 free_bytes=DISK_MARGIN_BYTES + size - 1)
    assert isinstance(tight, DiskFull), tight
    assert not (tmp_path / "client").exists()
    # ...and copied when it fits.
    fits = copy(announced_as(model_file), server.handle, tmp_path / "client",
                free_bytes=DISK_MARGIN_BYTES + size)
    assert isinstance(fits, CopyJob) and fits.state == "done", fits
    assert ModelStore(tmp_path / "client" / "models").names() == [MODEL]


def test_a_peer_sending_past_the_announced_size_is_cut(model_file: Path,
                                                       tmp_path: Path) -> None:
    job = copy(announced_as(model_file), overfilling(model_file), tmp_path / "client",
               free_bytes=200 << 30)
    assert isinstance(job, CopyJob) and job.state == "done", job
    assert job.done == model_file.stat().st_size
    stored = ModelStore(tmp_path / "client" / "models").model_path(MODEL)
    assert stored.read_bytes() == model_file.read_bytes()


def test_a_copy_the_relay_would_cut_waits_for_a_direct_path_then_runs(
        model_file: Path, tmp_path: Path) -> None:
    link: dict[str, Relayed | None] = {"now": Relayed("relay-node", 512 * 1024)}
    seen: list[tuple[str, int, str | None]] = []

    def poll(job: CopyJob) -> None:
        seen.append((job.state, job.done, job.notice))
        if len(seen) == 40:  # two seconds in, hole punching finds a direct path
            link["now"] = None

    store = ModelStore(tmp_path / "src" / "models")
    store.import_file(model_file, MODEL)
    job = copy(announced_as(model_file), CopyServer(store).handle, tmp_path / "client",
               free_bytes=200 << 30, relayed=lambda peer: link["now"], poll=poll)
    assert isinstance(job, CopyJob) and job.state == "done", job
    waiting = seen[:40]
    assert all(state == "waiting" and done == 0 for state, done, _ in waiting), waiting
    assert waiting[0][2] == (
        "source is reachable only through a relay (relay-node), which ends a connection after "
        "512.0 KiB: the copy (753.0 KiB) would be cut short there. Waiting for a direct path "
        "to source; it starts as soon as there is one.")
    assert job.notice is None and job.done == model_file.stat().st_size
