"""Hostile ggml RPC conversations, spoken like llama.cpp's client up to one bad command.

Each attack opens a connection to a ggml RPC endpoint (a worker's own, a relay's, a filtering
proxy's), says HELLO, allocates a small buffer, then sends what the worker's command filter
must refuse, followed by a harmless GET_ALIGNMENT that a live, uncut server would answer.
`attack` returns what came back after the bad command: b"" when the far end hung up.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from functools import partial

from backends.ggml_rpc_wire import GGML_OP, Cmd, frame, pack_tensors

GGML_TENSOR_FLAG_COMPUTE = 16  # ggml.h: the CPU backend skips nodes without it
BUFFER_BYTES = 4096


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def recv_reply(sock: socket.socket) -> bytes:
    size = struct.unpack("<Q", recv_exact(sock, 8))[0]
    return recv_exact(sock, size)


def hello(sock: socket.socket) -> None:
    sock.sendall(frame(Cmd.HELLO, bytes(24)))
    recv_reply(sock)


def alloc(sock: socket.socket, size: int = BUFFER_BYTES) -> tuple[int, int]:
    """(remote buffer id, its base address) of a new buffer of `size` bytes."""
    sock.sendall(frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, size)))
    buffer = struct.unpack("<QQ", recv_reply(sock))[0]
    sock.sendall(frame(Cmd.BUFFER_GET_BASE, struct.pack("<Q", buffer)))
    base = struct.unpack("<Q", recv_reply(sock))[0]
    return buffer, base


def _tensor(buffer: int, data: int, **more: object) -> dict[str, object]:
    return {"buffer": buffer, "data": data, "ne": (16, 1, 1, 1), "nb": (4, 64, 64, 64), **more}


def custom_op(buffer: int, base: int, share_bytes: int) -> bytes:
    """A graph whose node calls address 0x41414141 (GGML_OP_CUSTOM)."""
    src = _tensor(buffer, base, id=1)
    evil = _tensor(buffer, base + 64, id=2, op=GGML_OP["CUSTOM"], src=[1] + [0] * 9,
                   op_params=[0x41414141, 0, 1, 0] + [0] * 12, flags=GGML_TENSOR_FLAG_COMPUTE)
    return frame(Cmd.GRAPH_COMPUTE, struct.pack("<IIQI", 0, 1, 2, 2) + pack_tensors([src, evil]))


def out_of_bounds_set_tensor(buffer: int, base: int, share_bytes: int) -> bytes:
    """16 bytes written 1 MiB past the start of a 4 KiB buffer."""
    header = pack_tensors([_tensor(buffer, base, id=1)]) + b"\0" + struct.pack("<Q", 1 << 20)
    return frame(Cmd.SET_TENSOR, header + b"\x41" * 16)


def alloc_beyond_share(buffer: int, base: int, share_bytes: int) -> bytes:
    """One byte more than the worker donates (it already holds the 4 KiB buffer too)."""
    return frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, share_bytes + 1))


ATTACKS: dict[str, Callable[[int, int, int], bytes]] = {
    "custom-op": custom_op,
    "oob-set-tensor": out_of_bounds_set_tensor,
    "alloc-beyond-share": alloc_beyond_share,
}


def connect(endpoint: str, timeout: float = 10) -> socket.socket:
    host, port = endpoint.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def attack(endpoint: str, name: str, share_bytes: int = 1 << 30,
           before: Callable[[], object] = lambda: None) -> bytes:
    """Play attack `name` on `endpoint`; what the far end sends after it (b"": it hung up).
    `before()` runs just before the bad command."""
    with connect(endpoint) as s:
        hello(s)
        buffer, base = alloc(s)
        before()
        try:
            s.sendall(ATTACKS[name](buffer, base, share_bytes))
            s.sendall(frame(Cmd.GET_ALIGNMENT, struct.pack("<I", 0)))  # answered if it lived
            return s.recv(64)
        except OSError:
            return b""


def hostile_custom_op(endpoint: str) -> bytes:
    """Speak RPC like llama.cpp up to a graph whose node calls address 0x41414141; returns
    whatever the far end sends after it (b"" once it hangs up)."""
    return attack(endpoint, "custom-op")


# What the worker's filter names as the reason (swarm/workers/rpc_filter.py), per attack.
REASONS = {
    "custom-op": "graph node op CUSTOM is not allowed",
    "oob-set-tensor": "16 bytes at offset 1048576 lie outside the tensor's buffer",
    "alloc-beyond-share": "ALLOC_BUFFER of ",
}


def bystander(endpoint: str) -> socket.socket:
    """A second connection of the same lease, its HELLO sent: the worker's server serves one
    connection at a time, so it waits behind the first, as llama.cpp's own ones do."""
    s = connect(endpoint)
    s.sendall(frame(Cmd.HELLO, bytes(24)))
    return s


def _add_bystander(others: list[socket.socket], endpoint: str) -> None:
    others.append(bystander(endpoint))


def is_cut(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once `sock` sees its far end go (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def check_each_attack_is_cut_off(
    new_lease: Callable[[], tuple[str, list[tuple[str, str]]]],
    worker_alive: Callable[[], bool], share_bytes: int,
) -> None:
    """For each attack, under a fresh lease (`new_lease()` sets one up and returns the
    endpoint that reaches the worker through it, and the list its violations are reported
    to): the attack gets nothing back, the lease's other connection is cut too, one violation
    is reported, and the worker lives on."""
    for name, reason in REASONS.items():
        endpoint, reported = new_lease()
        others: list[socket.socket] = []
        assert attack(endpoint, name, share_bytes,
                      partial(_add_bystander, others, endpoint)) == b"", name
        with others[0] as other:
            assert is_cut(other), f"{name}: the lease's other connection was not cut"
        assert len(reported) == 1 and reason in reported[0][1], (name, reported)
        assert worker_alive(), f"{name}: the worker died"
