"""A command filter for one ggml RPC connection, between a swarm member and a worker's server.

ggml RPC has no authentication and trusts its client completely: a graph node can name a
function pointer (GGML_OP_CUSTOM), a tensor outside its buffer aborts the worker, an
allocation may take all its memory. `RpcFilter` sits in the relay that carries a lease
holder's bytes to the worker's loopback server and lets through only what llama.cpp's own
client sends: the commands of protocol 7.0.0, graphs made of the ops llama.cpp's models use,
tensors inside buffers the filter saw allocated, allocations within the donated share.

Sans-IO and streaming: the relay hands it every chunk it reads, split anywhere, and forwards
what comes back. It holds an incomplete frame, passes a large SET_TENSOR's data through as
it arrives once its header is approved, and raises `Violation` on the first frame it refuses;
the relay then closes both sides. Not thread-safe: call it from one task or thread.

    share = ShareAccount(share_bytes)            # one per lease: llama.cpp opens several
    flt = RpcFilter(share)                       # one per connection
    client -> server:  server.send(flt.feed(chunk))
    server -> client:  client.send(flt.feed_reply(chunk))   # before the client sees it
    both pumps done:   flt.close()               # the server freed the connection's buffers

The reply direction is watched for what the requests depend on: the ids, sizes and base
addresses of buffers (ALLOC_BUFFER, BUFFER_GET_BASE) and the sizes of every reply.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from dataclasses import dataclass
from typing import overload

import numpy as np

from backends.ggml_rpc_wire import (
    BLOCK_SIZE,
    FRAME_HEADER,
    GGML_GLU_OP_NAMES,
    GGML_MAX_SRC,
    GGML_OP,
    GGML_OP_COUNT,
    GGML_OP_NAMES,
    GGML_TYPE_COUNT,
    GGML_TYPE_TRAITS,
    GGML_UNARY_OP_NAMES,
    REPLY_HEADER,
    REPLY_SIZE,
    REQUEST_SIZE,
    RPC_CONN_CAPS_SIZE,
    RPC_PROTOCOL,
    RPC_TENSOR_DTYPE,
    RPC_TENSOR_SIZE,
    SET_TENSOR_HEADER_SIZE,
    Cmd,
    WireTensor,
    tensor_nbytes,
    unpack_tensor,
)

# The ops llama.cpp's model graphs (src/llama-graph.cpp, src/models/*.cpp, the KV caches and
# the backend samplers) build in 0c1e57098. Refused among others: CUSTOM and MAP_CUSTOM1/2/3,
# whose op_params hold a function pointer and its argument, and the backward and optimiser
# ops, which inference never runs.
ALLOWED_OP_NAMES = frozenset({
    "NONE", "ADD", "ADD_ID", "SUB", "MUL", "DIV", "SQR", "SQRT", "LOG", "SUM", "SUM_ROWS",
    "CUMSUM", "MEAN", "ARGMAX", "REPEAT", "CONCAT", "NORM", "RMS_NORM", "GROUP_NORM", "L2_NORM",
    "MUL_MAT", "MUL_MAT_ID", "SCALE", "SET", "CPY", "CONT", "RESHAPE", "VIEW", "PERMUTE",
    "TRANSPOSE", "GET_ROWS", "SET_ROWS", "SOFT_MAX", "ROPE", "ROPE_BACK", "CLAMP", "IM2COL",
    "POOL_2D", "PAD", "ARANGE", "ARGSORT", "TOP_K", "TRI", "FILL", "FLASH_ATTN_EXT", "SSM_CONV",
    "SSM_SCAN", "RWKV_WKV6", "GATED_LINEAR_ATTN", "RWKV_WKV7", "SOLVE_TRI", "GATED_DELTA_NET",
    "LIGHTNING_INDEXER", "DSV4_HC_COMB", "DSV4_HC_PRE", "DSV4_HC_POST", "UNARY", "GLU",
})
POINTER_OP_NAMES = frozenset({"CUSTOM", "MAP_CUSTOM1", "MAP_CUSTOM2", "MAP_CUSTOM3"})

# Every command llama.cpp's 7.0.0 client sends (RPC_CMD_NONE never goes on the wire).
ALLOWED_CMDS = frozenset(REQUEST_SIZE)

# The client asks the worker to cache a tensor only when it is over this (HASH_THRESHOLD).
HASH_THRESHOLD = 10 * 1024 * 1024

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ALLOC_REQ = struct.Struct("<IQ")
_PAIR_U64 = struct.Struct("<QQ")
_GRAPH_HEAD = struct.Struct("<II")
_MAX_BYTES = 2**56  # bigger than any real tensor or buffer; keeps uint64 sums exact

_BAD_TYPE = "tensor of an unknown or removed type"
_BAD_DIM = "tensor dimension beyond the limit"
_BAD_BLOCKS = "tensor row not a whole number of blocks"
_TOO_MANY = "tensor with too many elements"
_NO_NUL = "tensor name without its terminating NUL"
_TOO_BIG = "tensor bigger than any buffer"
_NO_BUFFER = "tensor outside any buffer"
_UNKNOWN_BUFFER = "tensor in a buffer this connection does not hold (or no base)"
_OUTSIDE = "tensor data outside its buffer"


class Violation(Exception):  # noqa: N818 - the name says what it is to a relay
    """The peer sent something llama.cpp's client never sends; close the connection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ShareAccount:
    """The memory a worker donates to one lease, drawn on by every connection of the lease.

    The server frees a connection's buffers when it ends, so each RpcFilter gives back what
    its connection holds on `close`.
    """

    def __init__(self, share_bytes: int) -> None:
        self.share_bytes = share_bytes
        self.used_bytes = 0  # allocated, or asked for and not yet answered

    def take(self, size: int) -> None:
        free = self.share_bytes - self.used_bytes
        if size > free:
            raise Violation(f"ALLOC_BUFFER of {size} bytes; {max(free, 0)} of the share left")
        self.used_bytes += size


@dataclass(frozen=True)
class FilterLimits:
    """The sizes of graphs and tensors one connection may send."""

    max_graph_nodes: int = 65536
    max_graph_tensors: int = 65536
    max_dim: int = 2**31 - 1  # any ne[i]
    max_elements: int = 2**60  # ggml asserts the element count fits in an int64


@dataclass
class _Buffer:
    size: int
    base: int | None = None  # known once the server answered BUFFER_GET_BASE


def _table(names: frozenset[str]) -> np.ndarray:
    table = np.zeros(GGML_OP_COUNT + 1, dtype=bool)  # the last slot: any op number too big
    table[[GGML_OP[n] for n in names]] = True
    return table


_UNARY, _GLU = GGML_OP["UNARY"], GGML_OP["GLU"]


class RpcFilter:
    """Approves the client->server bytes of one ggml RPC connection; see the module doc."""

    def __init__(self, share: ShareAccount, limits: FilterLimits | None = None,
                 allowed_ops: frozenset[str] = ALLOWED_OP_NAMES,
                 cache_writes: bool = True) -> None:
        """cache_writes=False clears SET_TENSOR's cache flag on the way (the one byte the filter
        ever changes): the worker's tensor cache names files by a 64-bit FNV-1a hash, which
        anyone can collide, so a peer that may write it can swap the weights others load."""
        self.share = share
        self.cache_writes = cache_writes
        self.limits = limits or FilterLimits()
        self._ops = _table(allowed_ops)
        self._failed: str | None = None
        # client -> server
        self._buf = bytearray()
        self._head: tuple[Cmd, int] | None = None
        self._stream_left = 0
        self._said_hello = False
        # server -> client
        self._rbuf = bytearray()
        self._rhead: tuple[Cmd, int, int] | None = None  # cmd, size, context
        self._rstream_left = 0
        self._expected: deque[tuple[Cmd, int, int]] = deque()
        # what the server holds for this connection
        self._buffers: dict[int, _Buffer] = {}
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.allocated_bytes = 0  # this connection's live buffers
        self.reserved_bytes = 0  # asked for, not yet answered
        self.commands: Counter[Cmd] = Counter()  # approved requests, for logs and tests

    # ---- client -> server ------------------------------------------------------------

    @overload
    def feed(self, data: bytes | bytearray) -> bytes: ...
    @overload
    def feed(self, data: memoryview) -> bytes | memoryview: ...

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """The bytes of `data` (and of earlier chunks held back) the server may now receive.

        A chunk inside a SET_TENSOR's data comes back as it is, not copied: a memoryview
        stays a view of the caller's buffer, to be sent before that buffer is reused.
        """
        try:
            return self._feed(data, memoryview(data))
        except Violation as exc:
            self._failed = self._failed or exc.reason
            raise

    def _feed(self, data: bytes | bytearray | memoryview, view: memoryview
              ) -> bytes | memoryview:
        if self._failed:
            raise Violation(self._failed)
        out: list[bytes | memoryview] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._stream_left:
                n = min(self._stream_left, end - pos)
                if n == end and not isinstance(data, bytearray):
                    self._stream_left -= n
                    return data  # a chunk inside a SET_TENSOR's data: no copy
                out.append(view[pos:pos + n])
                pos += n
                self._stream_left -= n
                continue
            need = self._need()
            take = min(need - len(self._buf), end - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) < need:
                break
            if self._head is None:
                self._head = self._check_header(*FRAME_HEADER.unpack(self._buf))
                if len(self._buf) < self._need():
                    continue
            out.append(self._approve())
        return b"".join(out)

    def _need(self) -> int:
        if self._head is None:
            return FRAME_HEADER.size
        cmd, size = self._head
        return FRAME_HEADER.size + (SET_TENSOR_HEADER_SIZE if cmd == Cmd.SET_TENSOR else size)

    def _check_header(self, cmd_byte: int, size: int) -> tuple[Cmd, int]:
        if cmd_byte not in ALLOWED_CMDS:
            raise Violation(f"command {cmd_byte} is not one llama.cpp's client sends")
        cmd = Cmd(cmd_byte)
        if (cmd == Cmd.HELLO) == self._said_hello:
            raise Violation("HELLO must come first, and only once")
        fixed = REQUEST_SIZE[cmd]
        if fixed is not None and size != fixed:
            raise Violation(f"{cmd.name} of {size} bytes, not {fixed}")
        if cmd == Cmd.SET_TENSOR and not (
                SET_TENSOR_HEADER_SIZE <= size <= SET_TENSOR_HEADER_SIZE + self.share.share_bytes):
            raise Violation(f"SET_TENSOR of {size} bytes")
        if cmd == Cmd.GRAPH_COMPUTE and size > self._max_graph_bytes():
            raise Violation(f"GRAPH_COMPUTE of {size} bytes")
        return cmd, size

    def _max_graph_bytes(self) -> int:
        lim = self.limits
        return 12 + 8 * lim.max_graph_nodes + RPC_TENSOR_SIZE * lim.max_graph_tensors

    def _approve(self) -> bytes:
        """Check the frame (or SET_TENSOR header) now whole in the buffer; return its bytes."""
        assert self._head is not None
        cmd, size = self._head
        approved = bytes(self._buf)  # immutable: numpy views of it outlive the buffer's reuse
        self._buf.clear()
        self._head = None
        payload = memoryview(approved)[FRAME_HEADER.size:]
        reply = REPLY_SIZE.get(cmd)
        context = 0
        if cmd == Cmd.HELLO:
            if any(payload):
                raise Violation("HELLO offers a transport upgrade (RDMA) the relay cannot carry")
            self._said_hello = True
        elif cmd == Cmd.ALLOC_BUFFER:
            context = self._check_alloc(payload)
        elif cmd in (Cmd.BUFFER_GET_BASE, Cmd.FREE_BUFFER, Cmd.BUFFER_CLEAR):
            context = _U64.unpack_from(payload)[0]  # remote_ptr
            if context not in self._buffers:
                raise Violation(f"{cmd.name} of a buffer this connection does not hold")
        elif cmd == Cmd.SET_TENSOR:
            if self._check_set_tensor(payload, size - SET_TENSOR_HEADER_SIZE):
                flag_at = FRAME_HEADER.size + RPC_TENSOR_SIZE
                approved = approved[:flag_at] + b"\0" + approved[flag_at + 1:]
            self._stream_left = size - SET_TENSOR_HEADER_SIZE
        elif cmd in (Cmd.SET_TENSOR_HASH, Cmd.GET_TENSOR, Cmd.MEMSET_TENSOR):
            reply = self._check_tensor_range(cmd, payload)
        elif cmd == Cmd.COPY_TENSOR:
            self._check_copy(payload)
        elif cmd == Cmd.INIT_TENSOR:
            self.check_tensor(unpack_tensor(payload), need_buffer=False)
        elif cmd == Cmd.GET_ALLOC_SIZE:
            for i in range(1 + GGML_MAX_SRC):  # the tensor, then its srcs (id 0: none)
                t = unpack_tensor(payload, 4 + i * RPC_TENSOR_SIZE)
                if i == 0 or t.id:
                    self.check_tensor(t, need_buffer=False)
        elif cmd == Cmd.GRAPH_COMPUTE:
            self._check_graph(payload)
        if cmd == Cmd.FREE_BUFFER:
            self._release(context)
        if reply is not None:
            self._expected.append((cmd, reply, context))
        self.commands[cmd] += 1
        return approved

    def _check_alloc(self, payload: memoryview) -> int:
        _device, size = _ALLOC_REQ.unpack_from(payload)
        self.share.take(size)
        self.reserved_bytes += size
        return size

    def _release(self, remote_ptr: int) -> None:
        size = self._buffers.pop(remote_ptr).size
        self.allocated_bytes -= size
        self.share.used_bytes -= size
        self._index = None

    def close(self) -> None:
        """The connection ended: the server freed its buffers, its share is free again."""
        self.share.used_bytes -= self.allocated_bytes + self.reserved_bytes
        self.allocated_bytes = self.reserved_bytes = 0
        self._buffers.clear()
        self._index = None

    def _check_set_tensor(self, payload: memoryview, size: int) -> bool:
        """Checks a SET_TENSOR's header; True: clear its cache flag."""
        t = unpack_tensor(payload)
        cache_flag = payload[RPC_TENSOR_SIZE]
        offset = _U64.unpack_from(payload, RPC_TENSOR_SIZE + 1)[0]
        if cache_flag > 1 or (cache_flag and size <= HASH_THRESHOLD):
            raise Violation(f"SET_TENSOR cache flag {cache_flag} for {size} bytes")
        self.check_tensor(t, need_buffer=True)
        self._check_region(t, offset, size)
        return bool(cache_flag) and not self.cache_writes

    def _check_tensor_range(self, cmd: Cmd, payload: memoryview) -> int | None:
        """SET_TENSOR_HASH, GET_TENSOR, MEMSET_TENSOR; returns the reply's size."""
        t = unpack_tensor(payload)
        offset, second = _PAIR_U64.unpack_from(payload, RPC_TENSOR_SIZE)
        nbytes = self.check_tensor(t, need_buffer=True)
        if cmd == Cmd.SET_TENSOR_HASH:  # second: the hash; the size is the cached file's
            self._check_region(t, offset, 0)
            return REPLY_SIZE[cmd]
        if cmd == Cmd.MEMSET_TENSOR and offset + second > nbytes:
            raise Violation("MEMSET_TENSOR beyond its tensor")
        self._check_region(t, offset, second)
        return second if cmd == Cmd.GET_TENSOR else None

    def _check_region(self, t: WireTensor, offset: int, size: int) -> None:
        """data + offset .. + size inside the tensor's buffer, as the server will check."""
        buf = self._buffers[t.buffer]
        assert buf.base is not None  # check_tensor refuses a buffer with no known base
        start = t.data + offset
        if not (buf.base <= start < buf.base + buf.size and size <= buf.base + buf.size - start):
            raise Violation(f"{size} bytes at offset {offset} lie outside the tensor's buffer")

    def _check_copy(self, payload: memoryview) -> None:
        src, dst = unpack_tensor(payload), unpack_tensor(payload, RPC_TENSOR_SIZE)
        nbytes = self.check_tensor(src, need_buffer=True)
        self.check_tensor(dst, need_buffer=True)
        buf = self._buffers[dst.buffer]
        assert buf.base is not None
        if dst.data + nbytes > buf.base + buf.size:
            raise Violation("COPY_TENSOR writes past the destination buffer")

    def _check_graph(self, payload: memoryview) -> None:
        if len(payload) < 12:
            raise Violation("GRAPH_COMPUTE too short")
        _device, n_nodes = _GRAPH_HEAD.unpack_from(payload)
        if n_nodes > self.limits.max_graph_nodes:
            raise Violation(f"graph of {n_nodes} nodes")
        at = 8 + 8 * n_nodes
        if len(payload) < at + 4:
            raise Violation("GRAPH_COMPUTE too short for its nodes")
        n_tensors = _U32.unpack_from(payload, at)[0]
        if n_tensors > self.limits.max_graph_tensors:
            raise Violation(f"graph of {n_tensors} tensors")
        if len(payload) != at + 4 + n_tensors * RPC_TENSOR_SIZE:
            raise Violation("GRAPH_COMPUTE size does not match its counts")
        t = np.frombuffer(payload, dtype=RPC_TENSOR_DTYPE, count=n_tensors, offset=at + 4)
        op = np.minimum(t["op"], GGML_OP_COUNT)
        refused = ~self._ops[op]
        if refused.any():
            bad = int(t["op"][refused][0])
            name = GGML_OP_NAMES[bad] if bad < GGML_OP_COUNT else str(bad)
            raise Violation(f"graph node op {name} is not allowed")
        sub = t["op_params"][:, 0]
        if ((op == _UNARY) & ((sub < 0) | (sub >= len(GGML_UNARY_OP_NAMES)))).any() or (
                (op == _GLU) & ((sub < 0) | (sub >= len(GGML_GLU_OP_NAMES)))).any():
            raise Violation("graph node with an unknown unary or GLU op")
        self.check_tensors(t, need_buffer=True)

    def check_tensor(self, t: WireTensor, need_buffer: bool) -> int:
        """What the server's deserialize_tensor would abort on, or trust; returns the nbytes.

        `check_tensors` is the same check on a whole graph's tensors at once; the two must
        agree (a unit test compares them), this one is ten times cheaper for one tensor.
        """
        lim = self.limits
        blck = GGML_TYPE_TRAITS[t.type][0] if t.type < GGML_TYPE_COUNT else 0
        if blck == 0:
            raise Violation(_BAD_TYPE)
        if max(t.ne) > lim.max_dim:
            raise Violation(_BAD_DIM)
        if t.ne[0] % blck:
            raise Violation(_BAD_BLOCKS)
        if float(t.ne[0]) * t.ne[1] * t.ne[2] * t.ne[3] > lim.max_elements:
            raise Violation(_TOO_MANY)
        if 0 not in t.name:
            raise Violation(_NO_NUL)
        if max(t.ne[0] * t.nb[0], *((n - 1) * s for n, s in zip(t.ne, t.nb, strict=True))) \
                > _MAX_BYTES:
            raise Violation(_TOO_BIG)
        nbytes = t.nbytes
        if not t.buffer:
            if need_buffer:
                raise Violation(_NO_BUFFER)
            return nbytes
        buf = self._buffers.get(t.buffer)
        if buf is None or buf.base is None:
            raise Violation(_UNKNOWN_BUFFER)
        if not (buf.base <= t.data and t.data - buf.base + nbytes <= buf.size):
            raise Violation(_OUTSIDE)
        return nbytes

    def check_tensors(self, t: np.ndarray, need_buffer: bool) -> None:
        """`check_tensor` on an array of rpc_tensors (RPC_TENSOR_DTYPE), vectorised."""
        lim = self.limits
        blck = BLOCK_SIZE[np.minimum(t["type"], GGML_TYPE_COUNT)]
        if (blck == 0).any():
            raise Violation(_BAD_TYPE)
        ne, nb = t["ne"].astype(np.uint64), t["nb"].astype(np.uint64)
        if (ne > lim.max_dim).any():
            raise Violation(_BAD_DIM)
        if (ne[:, 0] % blck).any():
            raise Violation(_BAD_BLOCKS)
        if (ne.astype(np.float64).prod(axis=1) > lim.max_elements).any():
            raise Violation(_TOO_MANY)
        if not (t["name"] == 0).any(axis=1).all():
            raise Violation(_NO_NUL)
        # ne < 2**31 and nb < 2**32: these products cannot wrap, so nbytes is exact below.
        if (ne[:, 0] * nb[:, 0] > _MAX_BYTES).any() or \
                (np.where(ne > 0, ne - 1, 0) * nb > _MAX_BYTES).any():
            raise Violation(_TOO_BIG)
        self._check_in_buffers(t, tensor_nbytes(t), need_buffer)

    def _check_in_buffers(self, t: np.ndarray, nbytes: np.ndarray, need_buffer: bool) -> None:
        buffer = t["buffer"]
        inside = buffer != 0
        if need_buffer and not inside.all():
            raise Violation(_NO_BUFFER)
        if not inside.any():
            return
        ids, bases, sizes, has_base = self._buffer_index()
        if not len(ids):
            raise Violation(_UNKNOWN_BUFFER)
        at = np.minimum(np.searchsorted(ids, buffer), len(ids) - 1)
        if (inside & ~((ids[at] == buffer) & has_base[at])).any():
            raise Violation(_UNKNOWN_BUFFER)
        data, base, size = t["data"], bases[at], sizes[at]
        off = data - np.minimum(data, base)  # no wrap-around below the base
        ok = (data >= base) & (off <= size) & (nbytes <= size - np.minimum(off, size))
        if (inside & ~ok).any():
            raise Violation(_OUTSIDE)

    def _buffer_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._index is None:
            ids = sorted(self._buffers)
            bufs = [self._buffers[i] for i in ids]
            self._index = (
                np.array(ids, dtype=np.uint64),
                np.array([b.base or 0 for b in bufs], dtype=np.uint64),
                np.array([b.size for b in bufs], dtype=np.uint64),
                np.array([b.base is not None for b in bufs], dtype=bool),
            )
        return self._index

    # ---- server -> client ------------------------------------------------------------

    def feed_reply(self, data: bytes | bytearray | memoryview) -> bytes:
        """Record what a reply tells about the server's buffers; returns `data` to forward.

        Call it with each chunk the server sends, before the client may see it.
        """
        self.check_reply(data)
        return data if isinstance(data, bytes) else bytes(data)

    def check_reply(self, data: bytes | bytearray | memoryview) -> None:
        """`feed_reply` for a relay that forwards `data` itself afterwards (no copy)."""
        try:
            self._feed_reply(memoryview(data))
        except Violation as exc:
            self._failed = self._failed or exc.reason
            raise

    def _feed_reply(self, view: memoryview) -> None:
        if self._failed:
            raise Violation(self._failed)
        pos, end = 0, len(view)
        while pos < end:
            if self._rstream_left:
                n = min(self._rstream_left, end - pos)
                pos += n
                self._rstream_left -= n
                continue
            if self._rhead is None:
                if not self._expected:
                    raise Violation("the server sent a reply nobody asked for")
                self._rhead = self._expected[0]
            cmd, size, _context = self._rhead
            parsed = cmd in (Cmd.ALLOC_BUFFER, Cmd.BUFFER_GET_BASE, Cmd.HELLO)
            need = REPLY_HEADER.size + (size if parsed else 0)
            take = min(need - len(self._rbuf), end - pos)
            self._rbuf += view[pos:pos + take]
            pos += take
            if len(self._rbuf) < need:
                break
            if REPLY_HEADER.unpack_from(self._rbuf)[0] != size:
                raise Violation(f"{cmd.name} reply of an unexpected size")
            self._on_reply(memoryview(bytes(self._rbuf))[REPLY_HEADER.size:])
            self._rstream_left = 0 if parsed else size
            self._rbuf.clear()
            self._rhead = None
            self._expected.popleft()

    def _on_reply(self, body: memoryview) -> None:
        assert self._rhead is not None
        cmd, _size, context = self._rhead
        if cmd == Cmd.HELLO and tuple(body[:2]) != RPC_PROTOCOL[:2]:
            raise Violation(f"server speaks RPC {tuple(body[:3])}, not {RPC_PROTOCOL}")
        if cmd == Cmd.HELLO and any(body[4:4 + RPC_CONN_CAPS_SIZE]):
            raise Violation("server offers a transport upgrade (RDMA) the relay cannot carry")
        if cmd == Cmd.ALLOC_BUFFER:
            remote_ptr, remote_size = _PAIR_U64.unpack_from(body)
            self.reserved_bytes -= context
            self.share.used_bytes -= context
            if remote_ptr:
                if remote_ptr in self._buffers:
                    self._release(remote_ptr)
                self._buffers[remote_ptr] = _Buffer(remote_size)
                self.allocated_bytes += remote_size
                self.share.used_bytes += remote_size  # what the server really took
                self._index = None
        elif cmd == Cmd.BUFFER_GET_BASE:
            # The request named a held buffer; FREE_BUFFER may have dropped it since.
            (base,) = _U64.unpack_from(body)
            buf = self._buffers.get(context)
            if buf is not None and base + buf.size < 2**64:
                buf.base = base
                self._index = None
