"""Only the worker's own node talks to its ggml RPC server: the node's worker listens on a Unix
socket of mode 0600 in a folder of mode 0700 (Covey's patch to ggml-rpc, applied by setup),
and no TCP port on a worker machine answers a ggml RPC HELLO."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from backends.endpoints import UNIX_PREFIX, connect_local, local_endpoint
from backends.ggml_rpc_wire import REPLY_HEADER, REPLY_SIZE, RPC_CONN_CAPS_SIZE, Cmd, frame
from swarm.trust.token import new_token
from swarm.workers.tunnel import open_local
from tests.conftest import Worker
from tests.support.netns import Netns, call_in, netns_skip_reason
from tests.support.node_harness import REPO, start_node, wait_until

pytestmark = pytest.mark.processes

sys.path.insert(0, str(REPO / "scripts"))
import llama_source  # noqa: E402

HELLO = frame(Cmd.HELLO, bytes(RPC_CONN_CAPS_SIZE))
HELLO_REPLY = REPLY_HEADER.pack(REPLY_SIZE[Cmd.HELLO]) + bytes([7, 0, 0])  # protocol 7.0.0


def answers_hello(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    """Whatever listens at `address` answers a ggml RPC HELLO as an RPC server does."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(address)
            s.sendall(HELLO)
            reply = b""
            while len(reply) < len(HELLO_REPLY):
                chunk = s.recv(len(HELLO_REPLY) - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply == HELLO_REPLY


def listening_tcp(net: str = "/proc/thread-self/net") -> set[tuple[socket.AddressFamily, str, int]]:
    """Every listening TCP socket in this thread's network namespace: (family, address, port),
    a wildcard address given as the loopback one."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(net, table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc writes the address as 32-bit words in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = socket.inet_ntop(family, raw)
            if addr in ("0.0.0.0", "::"):
                addr = "127.0.0.1" if family == socket.AF_INET else "::1"
            found.add((family, addr, int(hex_port, 16)))
    return found


def tcp_ports_answering_hello() -> list[str]:
    listening = listening_tcp()
    assert listening, "no listening socket at all: the scan itself is broken"
    return sorted(f"{addr}:{port}" for family, addr, port in listening
                  if answers_hello(family, (addr, port)))


def private_socket_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rpc"
    folder.mkdir(mode=0o700)
    return folder


def test_a_tcp_worker_answers_the_probe(rpc_workers: Callable[..., Worker]) -> None:
    """The probe the tests below rely on recognises a ggml RPC server."""
    host, port = rpc_workers().endpoint.rsplit(":", 1)
    assert answers_hello(socket.AF_INET, (host, int(port)))


def test_socket_worker_listens_on_a_0600_socket_and_no_tcp_port(
    rpc_workers: Callable[..., Worker], tmp_path: Path
) -> None:
    path = private_socket_dir(tmp_path) / "rpc.sock"
    worker = rpc_workers("--socket", str(path))
    assert worker.endpoint == UNIX_PREFIX + str(path)
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert answers_hello(socket.AF_UNIX, str(path))
    assert answers_hello(socket.AF_UNIX, str(path))  # and again: it serves one client at a time
    inodes = {link.readlink().name for link in Path(f"/proc/{worker.proc.pid}/fd").iterdir()
              if link.readlink().name.startswith("socket:")}
    tcp_inodes = {f"socket:[{line.split()[9]}]"
                  for table in ("/proc/net/tcp", "/proc/net/tcp6")
                  for line in Path(table).read_text().splitlines()[1:]}
    assert not inodes & tcp_inodes  # the worker holds no TCP socket at all


def test_socket_worker_removes_a_stale_socket_and_its_own(
    rpc_workers: Callable[..., Worker], tmp_path: Path
) -> None:
    path = private_socket_dir(tmp_path) / "rpc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left behind by a worker that was killed
    stale.close()
    worker = rpc_workers("--socket", str(path))
    assert answers_hello(socket.AF_UNIX, str(path))
    worker.proc.terminate()
    assert worker.proc.wait(timeout=10) == 0
    assert not path.exists()


def test_a_socket_in_a_folder_others_can_enter_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o755)
    out = subprocess.run(
        [sys.executable, "-m", "backends.rpc_worker", "--socket", str(folder / "rpc.sock")],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert "must be private" in out.stderr
    assert not (folder / "rpc.sock").exists()


@pytest.fixture
def worker_ns(tmp_path: Path) -> Iterator[tuple[Netns, str, Path]]:
    if netns_skip_reason() is not None:
        pytest.skip(str(netns_skip_reason()))
    with Netns() as netns:
        yield netns, netns.add("priv"), tmp_path


@pytest.mark.netns
def test_a_worker_node_answers_ggml_rpc_on_no_tcp_port(
    worker_ns: tuple[Netns, str, Path]
) -> None:
    """The issue's check: a real `covey node --worker` (with its direct TLS path on), every
    listening TCP port in its network namespace tried with a HELLO: none answers, while the
    node's private socket does."""
    netns, ns, workdir = worker_ns
    node = start_node(netns, ns, new_token().encode(), "w", workdir, "--lan-only",
                      "--listen", "/ip4/127.0.0.1/tcp/0", "--worker", "--share-mib", "30")
    wait_until(lambda: bool(node.api("/api/status").get("worker", {}).get("enabled")), 30,
               "worker mode on", [node])
    assert call_in(ns, tcp_ports_answering_hello) == []
    folder = node.data_dir / "rpc"
    sock = folder / "rpc.sock"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert call_in(ns, answers_hello, socket.AF_UNIX, str(sock))


def test_the_patch_applies_to_the_sdist(tmp_path: Path) -> None:
    """patches/*.patch apply cleanly to the llama-cpp-python sdist setup.sh builds from (the
    copy it downloaded into its cache)."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    version = setup.split('LLAMA_VERSION="', 1)[1].split('"', 1)[0]
    sdist = (llama_source.sdist_cache(llama_source.cache_home())
             / f"llama_cpp_python-{version}.tar.gz")
    if not sdist.exists():
        pytest.skip(f"{sdist} is not downloaded (scripts/setup.sh keeps it after a build)")
    with tarfile.open(sdist) as tar:
        wanted = [m for m in tar.getmembers() if "/ggml-rpc" in m.name and m.isfile()]
        tar.extractall(tmp_path, members=wanted, filter="data")
    (source,) = tmp_path.iterdir()
    assert llama_source.patches(), "no patch in patches/"
    llama_source.apply_patches(source, dry_run=True)
    llama_source.apply_patches(source)
    assert "create_unix_server" in (
        source / "vendor/llama.cpp/ggml/src/ggml-rpc/transport.cpp").read_text()
    with pytest.raises(subprocess.CalledProcessError):  # applied twice: refused, not doubled
        llama_source.apply_patches(source, dry_run=True)


def test_the_wheel_cache_key_follows_the_patches(tmp_path: Path) -> None:
    one = tmp_path / "a"
    one.mkdir()
    (one / "x.patch").write_text("--- a/f\n+++ b/f\n")
    before = llama_source.patch_hash(one)
    (one / "x.patch").write_text("--- a/f\n+++ b/f\n@@\n")
    assert llama_source.patch_hash(one) != before
    assert len(llama_source.patch_hash()) == 64


def test_the_relays_openers_reach_a_socket_worker_and_nothing_off_the_machine(
    rpc_workers: Callable[..., Worker], tmp_path: Path
) -> None:
    """DirectServer's threads (`connect_local`) and the tunnel (`open_local`) open "unix:PATH";
    an endpoint off this machine is refused before any connection."""
    worker = rpc_workers("--socket", str(private_socket_dir(tmp_path) / "rpc.sock"))
    target = local_endpoint(worker.endpoint)
    with connect_local(target, timeout=3) as s:
        s.sendall(HELLO)
        assert s.recv(len(HELLO_REPLY), socket.MSG_WAITALL) == HELLO_REPLY

    async def via_trio() -> bytes:
        stream = await open_local(target)
        async with stream:
            await stream.send_all(HELLO)
            reply = b""
            while len(reply) < len(HELLO_REPLY):
                reply += await stream.receive_some(len(HELLO_REPLY) - len(reply))
            return reply

    assert trio.run(via_trio) == HELLO_REPLY
    for bad in ("unix:relative/rpc.sock", "10.0.0.5:50052", "example.org:50052"):
        with pytest.raises(ValueError):
            local_endpoint(bad)
    assert str(target) == worker.endpoint
