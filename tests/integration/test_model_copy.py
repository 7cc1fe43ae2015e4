"""Copying a model between real nodes over the swarm: verified against the owner's sha256,
resumed after a cut, continued from another peer when one leaves, and a damaged source
rejected with the store unchanged. The pure parts (ledger value, choosing a file) first."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.store.model_store import DiskFull, Manifest, ModelStore
from swarm.ledger.entries import SharedModel, parse_shared
from swarm.node.main import DIRECT_COPY_ENV
from swarm.node.model_copy import (
    DISK_MARGIN_BYTES,
    AmbiguousModel,
    CopyError,
    Offer,
    check_room,
    choose_file,
    parse_request,
    shared_value,
)
from swarm.trust.token import new_token
from swarm.workers.direct_tls import SECRET_BYTES, DirectUnavailable, connect
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import REPO, RunningNode, start_node, wait_until
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.netns

SHA_A, SHA_B = "a" * 64, "b" * 64


def test_ledger_value_round_trips_and_drops_malformed_models() -> None:
    manifest = Manifest.new("tiny", 1234, SHA_A, "import")
    unhashed = Manifest.new("handmade", 99, None, "import")
    value = shared_value([manifest, unhashed])
    assert parse_shared(value) == [SharedModel("tiny", 1234, SHA_A)]
    bad = [{"name": "../x", "size": 1, "sha256": SHA_A}, {"name": "x", "size": True,
           "sha256": SHA_A}, {"name": "x", "size": -1, "sha256": SHA_A},
           {"name": "x", "size": 1, "sha256": "A" * 64}, "x", None]
    assert parse_shared({"version": 1, "models": bad}) == []
    assert parse_shared({"version": 2, "models": value["models"]}) == []


def test_choose_file_prefers_the_file_most_peers_have_or_the_hash_asked_for() -> None:
    a, b = SharedModel("m", 10, SHA_A), SharedModel("m", 11, SHA_B)
    found = [Offer(a, "p1", "one"), Offer(b, "p2", "two"), Offer(b, "p3", "three")]
    assert choose_file(found, "m", None) == b
    assert choose_file(found, "m", SHA_A.upper()) == a
    with pytest.raises(CopyError, match=r"No peer online offers 'n' \(peers offer: m\)"):
        choose_file(found, "n", None)


def test_a_name_clash_without_a_majority_asks_for_the_hash() -> None:
    a, b, c = (SharedModel("m", 10, SHA_A), SharedModel("m", 11, SHA_B),
               SharedModel("m", 12, "c" * 64))
    tie = [Offer(a, "p1", "one"), Offer(b, "p2", "two")]
    with pytest.raises(AmbiguousModel) as asked:
        choose_file(tie, "m", None)
    message = str(asked.value)
    assert f"sha256 {SHA_A} (10 bytes, on one)" in message, message
    assert f"sha256 {SHA_B} (11 bytes, on two)" in message, message
    assert "covey models copy m --sha256 SHA256" in message, message
    assert choose_file(tie, "m", SHA_B) == b  # the user chose
    # Most of the offers, but not most of the peers: still asked.
    plurality = [*tie, Offer(c, "p3", "three"), Offer(c, "p4", "four")]
    with pytest.raises(AmbiguousModel):
        choose_file(plurality, "m", None)
    # One peer offering the same file twice counts once.
    with pytest.raises(AmbiguousModel):
        choose_file([*tie, Offer(b, "p2", "two")], "m", None)
    assert choose_file([*plurality, Offer(c, "p5", "five")], "m", None) == c


def test_a_copy_must_leave_the_margin_free() -> None:
    check_room("m", 100, DISK_MARGIN_BYTES + 100)
    with pytest.raises(DiskFull, match=r"Not enough disk space to copy 'm'"):
        check_room("m", 101, DISK_MARGIN_BYTES + 100)
    with pytest.raises(DiskFull):
        check_room("m", 1, 0)


def test_copy_requests_are_checked() -> None:
    ok = {"version": 1, "model": "m", "sha256": SHA_A, "offset": 0, "length": 5}
    assert parse_request(json.dumps(ok).encode()) == ("m", SHA_A, 0, 5)
    for bad in ({"offset": -1}, {"length": 0}, {"length": 1 << 40}, {"offset": 1.5},
                {"version": 2}, {"model": None}):
        with pytest.raises(ValueError):
            parse_request(json.dumps(ok | bad).encode())


# -- real nodes -------------------------------------------------------------------------------

MODEL = "big"
LIMIT_MIB_S = "6"  # slow enough that a test can act while a copy runs (~5 s for 33 MB)


@dataclass
class CopySwarm:
    netns: Netns
    ns: str
    token: str
    workdir: Path
    model: Path
    sha256: str
    nodes: dict[str, RunningNode]

    def start(self, name: str, *, with_model: bool, limit: bool = True,
              direct: bool = True) -> RunningNode:
        data_dir = self.workdir / name
        if with_model and not (data_dir / "models" / f"{MODEL}.gguf").exists():
            ModelStore(data_dir / "models").import_file(self.model, MODEL)
        extra = ["--upload-limit-mib", LIMIT_MIB_S] if limit else []
        env = {**os.environ, DIRECT_COPY_ENV: "1" if direct else "0"}
        node = start_node(self.netns, self.ns, self.token, name, self.workdir, "--lan-only",
                          "--listen", "/ip4/127.0.0.1/tcp/0", *extra, data_dir=data_dir,
                          env=env)
        self.nodes[name] = node
        return node

    def wait_offered(self, client: RunningNode, count: int) -> None:
        def offered() -> bool:
            rows = client.api("/api/models")["swarm"]
            return sum(len(r["machines"]) for r in rows if r["name"] == MODEL) == count
        wait_until(offered, 30, f"{count} peers offering the model", list(self.nodes.values()))

    def copy(self, client: RunningNode) -> dict[str, Any]:
        return client.api("/api/models/copy", "POST", {"model": MODEL})

    def job(self, client: RunningNode) -> dict[str, Any]:
        jobs = [j for j in client.api("/api/models")["copies"] if j["model"] == MODEL]
        return jobs[0]

    def wait_job(self, client: RunningNode, until: Any, what: str, timeout: float = 60) -> Any:
        wait_until(lambda: until(self.job(client)), timeout, what, list(self.nodes.values()))
        return self.job(client)

    def wait_ended(self, client: RunningNode) -> Any:
        return self.wait_job(client, lambda j: j["state"] in ("done", "failed"),
                             "the copy to end")

    def stored_sha256(self, node: RunningNode) -> str:
        return hashlib.sha256((node.data_dir / "models" / f"{MODEL}.gguf").read_bytes()
                              ).hexdigest()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 33 MB GGUF: big enough that a copy takes a few seconds when limited."""
    return write_tiny_gguf(tmp_path_factory.mktemp("big") / "big.gguf", n_layers=2,
                           n_embd=512, n_ff=2048)


@pytest.fixture
def copy_swarm(big_model: Path, tmp_path: Path) -> Iterator[CopySwarm]:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    sha256 = hashlib.sha256(big_model.read_bytes()).hexdigest()
    with Netns() as netns:
        yield CopySwarm(netns, netns.add("copy"), new_token().encode(), tmp_path, big_model,
                        sha256, {})  # closing the namespaces kills the nodes


def test_copy_from_a_peer_with_the_cli_matches_the_source(copy_swarm: CopySwarm) -> None:
    source = copy_swarm.start("source", with_model=True, limit=False)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    assert client.api("/api/models")["local"] == []
    result = copy_swarm.netns.run(
        copy_swarm.ns, [sys.executable, "-m", "app.cli", "models", "copy", MODEL,
                        "--data-dir", str(client.data_dir)], cwd=REPO, timeout=120,
        check=False)
    assert result.returncode == 0, result.stderr
    assert f"copied {MODEL} from source (sha256 {copy_swarm.sha256} verified)" in result.stdout
    assert "100.0%" in result.stderr  # the progress bar reached the end
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256
    local = client.api("/api/models")["local"]
    assert [(m["name"], m["sha256"], m["source"]) for m in local] == [
        (MODEL, copy_swarm.sha256, "copy")]
    assert MODEL in {m["id"] for m in client.api("/v1/models")["data"]}
    # The ledger now shows the client as a second machine that can share the model.
    wait_until(lambda: source.api("/api/models")["swarm"] == [
        {"name": MODEL, "size": copy_swarm.model.stat().st_size, "sha256": copy_swarm.sha256,
         "machines": ["client"]}], 30, "the client offering its copy", [source, client])
    shares = {p["name"]: p["shares_models"] for p in source.peers()}
    assert shares == {"source": [MODEL], "client": [MODEL]}, shares
    # Copying a model the store has already, or one nobody offers, says so.
    again = copy_swarm.netns.run(
        copy_swarm.ns, [sys.executable, "-m", "app.cli", "models", "copy", MODEL,
                        "--data-dir", str(client.data_dir)], cwd=REPO, timeout=60, check=False)
    assert again.returncode == 1 and "already in this node's store" in again.stderr
    nobody = copy_swarm.netns.run(
        copy_swarm.ns, [sys.executable, "-m", "app.cli", "models", "copy", "ghost",
                        "--data-dir", str(client.data_dir)], cwd=REPO, timeout=60, check=False)
    assert nobody.returncode == 1 and "No peer online offers 'ghost'" in nobody.stderr


def test_copy_cut_off_midway_resumes_where_it_stopped(copy_swarm: CopySwarm) -> None:
    source = copy_swarm.start("source", with_model=True)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    size = copy_swarm.model.stat().st_size
    assert copy_swarm.copy(client)["state"] == "running"
    copy_swarm.wait_job(client, lambda j: j["done"] > size // 4, "a quarter copied")
    source.proc.send_signal(signal.SIGKILL)
    source.proc.wait()
    failed = copy_swarm.wait_job(client, lambda j: j["state"] == "failed", "the copy to fail")
    assert "no other peer online has it" in failed["error"], failed
    assert "copy again to resume" in failed["error"], failed
    assert client.api("/api/models")["local"] == []  # the store is unchanged
    kept = failed["done"]
    assert size // 4 < kept < size

    copy_swarm.start("source", with_model=True)
    copy_swarm.wait_offered(client, 1)
    resumed = copy_swarm.copy(client)
    assert resumed["resumed_from"] >= kept - (1 << 20), resumed  # at most the unflushed tail
    done = copy_swarm.wait_job(client, lambda j: j["state"] != "running" and
                               j["state"] != "verifying", "the resumed copy")
    assert done["state"] == "done", done
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256


def test_copy_goes_on_from_another_peer_when_one_leaves(copy_swarm: CopySwarm) -> None:
    copy_swarm.start("one", with_model=True)
    copy_swarm.start("two", with_model=True)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 2)
    copy_swarm.copy(client)
    job = copy_swarm.wait_job(client, lambda j: j["done"] > j["size"] // 5, "a fifth copied")
    first = job["source"]
    copy_swarm.nodes[first].proc.send_signal(signal.SIGKILL)
    done = copy_swarm.wait_ended(client)
    assert done["state"] == "done", done
    assert done["sources"] == [first, ({"one", "two"} - {first}).pop()], done
    assert done["notice"].startswith(f"{first} stopped sending"), done
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256


def test_a_damaged_source_is_rejected_and_the_store_is_unchanged(
        copy_swarm: CopySwarm) -> None:
    store = ModelStore(copy_swarm.workdir / "damaged" / "models")
    store.import_file(copy_swarm.model, MODEL)
    with store.model_path(MODEL).open("r+b") as f:  # bit rot in the middle: size unchanged
        f.seek(copy_swarm.model.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    copy_swarm.start("damaged", with_model=True, limit=False)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    copy_swarm.copy(client)
    failed = copy_swarm.wait_ended(client)
    assert failed["state"] == "failed", failed
    assert "from damaged is damaged" in failed["error"], failed
    assert "the store is unchanged" in failed["error"], failed
    assert client.api("/api/models")["local"] == []
    models_dir = client.data_dir / "models"
    assert not (models_dir / f"{MODEL}.gguf").exists()
    assert list((models_dir / ".partial").iterdir()) == []  # nothing left to resume from
    assert MODEL not in {m["id"] for m in client.api("/v1/models")["data"]}


def test_a_name_clash_without_a_majority_is_left_to_the_user(copy_swarm: CopySwarm) -> None:
    other = write_tiny_gguf(copy_swarm.workdir / "other.gguf", seed=7)  # same name, other file
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    ModelStore(copy_swarm.workdir / "impostor" / "models").import_file(other, MODEL)
    copy_swarm.start("source", with_model=True, limit=False)
    copy_swarm.start("impostor", with_model=True, limit=False)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 2)

    def cli(*extra: str) -> Any:
        return copy_swarm.netns.run(
            copy_swarm.ns, [sys.executable, "-m", "app.cli", "models", "copy", MODEL, *extra,
                            "--data-dir", str(client.data_dir)], cwd=REPO, timeout=120,
            check=False)

    asked = cli()
    assert asked.returncode == 1, asked.stderr
    assert f"sha256 {copy_swarm.sha256} (" in asked.stderr, asked.stderr
    assert f"sha256 {other_sha} (" in asked.stderr, asked.stderr
    assert "--sha256" in asked.stderr, asked.stderr
    assert client.api("/api/models")["copies"] == []  # nothing started, nothing written
    assert not list((client.data_dir / "models").rglob("*.copy*"))
    chosen = cli("--sha256", copy_swarm.sha256)
    assert chosen.returncode == 0, chosen.stderr
    assert f"copied {MODEL} from source (sha256 {copy_swarm.sha256} verified)" in chosen.stdout
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256


# -- the direct TLS path ------------------------------------------------------------------------

def attack_direct_port(port: int, cert_sha256: str) -> dict[str, Any]:
    """What a local process gets from a node's direct copy port: with plain TCP, and with
    TLS and a made-up secret (the right certificate pinned)."""
    got: dict[str, Any] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
        try:
            got["plain_tcp"] = len(plain.recv(65536))  # a TLS alert at most, never file bytes
        except OSError as exc:
            got["plain_tcp"] = type(exc).__name__
    try:
        connect(("127.0.0.1", port), cert_sha256, bytes(SECRET_BYTES), timeout=5)
        got["wrong_secret"] = "admitted"
    except DirectUnavailable as exc:
        got["wrong_secret"] = str(exc)
    return got


def test_a_copy_over_a_direct_link_takes_the_direct_tls_path(copy_swarm: CopySwarm) -> None:
    source = copy_swarm.start("source", with_model=True, limit=False)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    copy_swarm.copy(client)
    done = copy_swarm.wait_ended(client)
    assert done["state"] == "done", done
    assert done["path"] == "direct" and done["notice"] is None, done
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256
    assert [j["path"] for j in client.api("/api/status")["copies"]] == ["direct"]
    served = source.api("/api/status")["copy_direct"]
    size = copy_swarm.model.stat().st_size
    assert served["traffic"]["bytes_down"] == size, served  # every byte went that way
    assert served["traffic"]["connections"] == 1, served

    # A local process on the port, without the secret, gets no byte of the file; the node
    # stays up and goes on serving.
    cert = (source.data_dir / "direct-tls" / "cert.pem").read_text()
    cert_sha256 = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert)).hexdigest()
    got = call_in(copy_swarm.ns, attack_direct_port, served["port"], cert_sha256)
    assert got["plain_tcp"] in (0, "ConnectionResetError"), got
    assert "refused the connection" in got["wrong_secret"], got
    after = source.api("/api/status")["copy_direct"]["traffic"]
    assert after["refused"] >= 2 and after["bytes_down"] == size, after
    assert source.proc.poll() is None


def test_a_refused_direct_offer_falls_back_to_libp2p(copy_swarm: CopySwarm) -> None:
    copy_swarm.start("source", with_model=True, limit=False, direct=False)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    copy_swarm.copy(client)
    done = copy_swarm.wait_ended(client)
    assert done["state"] == "done", done
    assert done["path"] == "libp2p", done
    assert "no direct path from source (this node offers no direct path)" in done["notice"]
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256


def test_a_direct_copy_cut_midway_goes_on_over_libp2p(copy_swarm: CopySwarm) -> None:
    source = copy_swarm.start("source", with_model=True)
    client = copy_swarm.start("client", with_model=False)
    copy_swarm.wait_offered(client, 1)
    size = copy_swarm.model.stat().st_size
    copy_swarm.copy(client)
    job = copy_swarm.wait_job(client, lambda j: j["done"] > size // 4, "a quarter copied")
    assert job["path"] == "direct", job
    port = source.api("/api/status")["copy_direct"]["port"]
    # Cut the TLS connection under both nodes, as a broken link would.
    copy_swarm.netns.run(copy_swarm.ns, ["ss", "-K", "sport", "=", f":{port}"])
    done = copy_swarm.wait_ended(client)
    assert done["state"] == "done", done
    assert done["path"] == "libp2p", done
    assert "no direct path from source" in done["notice"], done
    assert done["sources"] == ["source"], done
    assert copy_swarm.stored_sha256(client) == copy_swarm.sha256
    served = source.api("/api/status")["copy_direct"]["traffic"]
    assert size // 4 < served["bytes_down"] < size, served  # the rest came over libp2p
