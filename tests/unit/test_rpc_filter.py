"""The ggml RPC command filter, on crafted frames: honest traffic passes byte for byte however
it is split, and each way a peer could take over or crash a worker is refused."""

from __future__ import annotations

import ctypes
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.ggml_rpc_wire import (
    GGML_GLU_OP_NAMES,
    GGML_OP,
    GGML_OP_COUNT,
    GGML_OP_NAMES,
    GGML_TYPE_TRAITS,
    GGML_UNARY_OP_NAMES,
    RPC_TENSOR_DTYPE,
    Cmd,
    frame,
    pack_tensors,
    tensor_nbytes,
    unpack_tensor,
)
from swarm.workers.rpc_filter import (
    ALLOWED_CMDS,
    ALLOWED_OP_NAMES,
    HASH_THRESHOLD,
    POINTER_OP_NAMES,
    RpcFilter,
    ShareAccount,
    Violation,
)

SHARE = 64 * 2**20
BUF_ID, BUF_BASE, BUF_SIZE = 0x5555_0000_1000, 0x7F00_0000_0000, 16 * 2**20
F32, Q4_0 = 0, 2


def reply(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


def tensor(tid: int, ne: tuple[int, ...] = (64, 1, 1, 1), *, data: int = BUF_BASE,
           buffer: int = BUF_ID, type_: int = F32, op: str = "NONE",
           src: tuple[int, ...] = (), op_params: tuple[int, ...] = ()) -> dict[str, object]:
    blck, size = GGML_TYPE_TRAITS[type_]
    nb = [size]
    nb.append(size * ne[0] // max(blck, 1))
    nb += [nb[-1] * ne[1], nb[-1] * ne[1] * ne[2]]
    return {"id": tid, "type": type_, "buffer": buffer, "ne": ne,
            "nb": [n % 2**32 for n in nb], "op": GGML_OP[op],
            "data": data, "src": list(src) + [0] * (10 - len(src)),
            "op_params": list(op_params) + [0] * (16 - len(op_params))}


def hello() -> bytes:
    return frame(Cmd.HELLO, bytes(24))


def graph(tensors: list[dict[str, object]], nodes: list[int]) -> bytes:
    body = struct.pack("<II", 0, len(nodes)) + struct.pack(f"<{len(nodes)}Q", *nodes)
    return frame(Cmd.GRAPH_COMPUTE, body + struct.pack("<I", len(tensors)) + pack_tensors(tensors))


def set_tensor(t: dict[str, object], data: bytes, offset: int = 0, cache: int = 0) -> bytes:
    return frame(Cmd.SET_TENSOR, pack_tensors([t]) + struct.pack("<BQ", cache, offset) + data)


def get_tensor(t: dict[str, object], offset: int, size: int) -> bytes:
    return frame(Cmd.GET_TENSOR, pack_tensors([t]) + struct.pack("<QQ", offset, size))


def honest_graph() -> bytes:
    a, b = tensor(1), tensor(2, data=BUF_BASE + 256)
    mm = tensor(3, (1, 1, 1, 1), data=BUF_BASE + 512, op="MUL_MAT", src=(1, 2))
    act = tensor(4, (1, 1, 1, 1), data=BUF_BASE + 1024, op="UNARY", src=(3,),
                 op_params=(GGML_UNARY_OP_NAMES.index("SILU"),))
    return graph([a, b, mm, act], [3, 4])


def session() -> tuple[list[bytes], list[bytes]]:
    """What llama.cpp's client sends, and the server's replies, for a small model's load and
    one token: requests[i] is followed by replies[i] (b"" when the command has none)."""
    requests = [
        hello(),
        frame(Cmd.DEVICE_COUNT),
        frame(Cmd.GET_ALIGNMENT, struct.pack("<I", 0)),
        frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, BUF_SIZE)),
        frame(Cmd.BUFFER_GET_BASE, struct.pack("<Q", BUF_ID)),
        frame(Cmd.BUFFER_CLEAR, struct.pack("<QB", BUF_ID, 0)),
        set_tensor(tensor(1), bytes(range(256))),
        set_tensor(tensor(2, data=BUF_BASE + 256), b"\x01" * 256),
        honest_graph(),
        frame(Cmd.GRAPH_RECOMPUTE, struct.pack("<I", 0)),
        get_tensor(tensor(4, (1, 1, 1, 1), data=BUF_BASE + 1024), 0, 4),
        frame(Cmd.FREE_BUFFER, struct.pack("<Q", BUF_ID)),
    ]
    replies = [
        reply(bytes([7, 0, 0, 0]) + bytes(24)),
        reply(struct.pack("<I", 1)),
        reply(struct.pack("<Q", 32)),
        reply(struct.pack("<QQ", BUF_ID, BUF_SIZE)),
        reply(struct.pack("<Q", BUF_BASE)),
        b"", b"", b"", b"", b"",
        reply(b"\x00\x00\x80\x3f"),
        b"",
    ]
    return requests, replies


def ready_filter(share: int = SHARE) -> RpcFilter:
    """A filter that has seen HELLO and one buffer of BUF_SIZE allocated at BUF_BASE."""
    flt = RpcFilter(ShareAccount(share))
    requests, replies = session()
    for req, rep in zip(requests[:5], replies[:5], strict=True):
        assert flt.feed(req) == req
        assert flt.feed_reply(rep) == rep
    return flt


def test_an_honest_session_passes_byte_for_byte() -> None:
    flt = RpcFilter(ShareAccount(SHARE))
    for req, rep in zip(*session(), strict=True):
        assert flt.feed(req) == req
        assert flt.feed_reply(rep) == rep
    assert flt.allocated_bytes == 0  # the buffer was freed


@pytest.mark.parametrize("chunk", [1, 7, 300, 4096])
def test_an_honest_session_split_anywhere_passes_byte_for_byte(chunk: int) -> None:
    flt = RpcFilter(ShareAccount(SHARE))
    for req, rep in zip(*session(), strict=True):
        out = b"".join(flt.feed(req[i:i + chunk]) for i in range(0, len(req), chunk))
        assert out == req
        back = b"".join(flt.feed_reply(rep[i:i + chunk]) for i in range(0, len(rep), chunk))
        assert back == rep


def test_a_truncated_frame_is_held_not_forwarded() -> None:
    flt = ready_filter()
    g = honest_graph()
    assert flt.feed(g[:-1]) == b""
    assert flt.feed(g[-1:] + g[:5]) == g  # the next frame's first bytes wait in turn
    assert flt.feed(g[5:]) == g


def test_a_large_set_tensor_streams_after_its_header() -> None:
    flt = ready_filter()
    data = bytes(8 * 2**20)
    whole = set_tensor(tensor(1, (len(data) // 4, 1, 1, 1)), data)
    head = len(whole) - len(data)
    assert flt.feed(whole[:head - 1]) == b""
    assert flt.feed(whole[head - 1:head + 10]) == whole[:head + 10]  # approved on its header
    assert flt.feed(whole[head + 10:head + 1000]) == whole[head + 10:head + 1000]
    assert len(flt._buf) == 0  # nothing of the data is held
    assert flt.feed(whole[head + 1000:] + hello()[:3]) == whole[head + 1000:]


def refused(flt: RpcFilter, data: bytes, reason: str) -> None:
    with pytest.raises(Violation, match=reason):
        flt.feed(data)
    with pytest.raises(Violation):  # and stays refused
        flt.feed(frame(Cmd.DEVICE_COUNT))


@pytest.mark.parametrize("op", sorted(POINTER_OP_NAMES))
def test_a_graph_with_a_function_pointer_op_is_refused(op: str) -> None:
    evil = tensor(3, op=op, src=(1,), op_params=(0x4141_4141, 0x4141, 1, 0, 0))
    refused(ready_filter(), graph([tensor(1), evil], [3]), f"op {op} is not allowed")


@pytest.mark.parametrize("op", ["OPT_STEP_ADAMW", "CROSS_ENTROPY_LOSS_BACK", "WIN_PART"])
def test_ops_no_model_uses_are_refused(op: str) -> None:
    refused(ready_filter(), graph([tensor(3, op=op)], [3]), "not allowed")


def test_an_op_number_past_the_enum_is_refused() -> None:
    t = tensor(3)
    t["op"] = GGML_OP_COUNT
    refused(ready_filter(), graph([t], [3]), "not allowed")


def test_an_unknown_unary_op_is_refused() -> None:
    t = tensor(3, op="UNARY", op_params=(len(GGML_UNARY_OP_NAMES),))
    refused(ready_filter(), graph([t], [3]), "unknown unary")


@pytest.mark.parametrize(("t", "reason"), [
    (tensor(1, data=BUF_BASE + BUF_SIZE - 8), "outside its buffer"),  # 256 bytes from 8 left
    (tensor(1, data=BUF_BASE - 4096), "outside its buffer"),
    (tensor(1, buffer=0, data=0), "outside any buffer"),
    (tensor(1, buffer=BUF_ID + 8), "does not hold"),
    (tensor(1, type_=4), "removed type"),  # Q4_2: its block size is 0 (a division by zero)
    (tensor(1, (48, 1, 1, 1), type_=Q4_0), "whole number of blocks"),
    (tensor(1, (2**31, 1, 1, 1)), "dimension"),
    (tensor(1, (2**30, 2**30, 2**30, 1)), "too many elements"),
])
def test_a_tensor_the_server_would_abort_on_is_refused(t: dict[str, object], reason: str) -> None:
    refused(ready_filter(), graph([t], [1]), reason)


def test_a_name_without_its_nul_is_refused() -> None:
    t = tensor(1)
    t["name"] = [65] * 64
    refused(ready_filter(), graph([t], [1]), "NUL")


@pytest.mark.parametrize(("offset", "size"),
                         [(BUF_SIZE - 100, 200), (BUF_SIZE, 1), (2**64 - 8, 16)])
def test_an_out_of_bounds_set_tensor_is_refused(offset: int, size: int) -> None:
    refused(ready_filter(), set_tensor(tensor(1), bytes(size), offset=offset), "outside")


def test_an_out_of_bounds_get_tensor_is_refused() -> None:
    refused(ready_filter(), get_tensor(tensor(1), 0, BUF_SIZE + 1), "outside")


def test_a_copy_past_the_destination_is_refused() -> None:
    big = tensor(1, (1024, 1, 1, 1))
    dst = tensor(2, data=BUF_BASE + BUF_SIZE - 1024)  # 256 bytes of room, 4096 copied
    refused(ready_filter(), frame(Cmd.COPY_TENSOR, pack_tensors([big, dst])), "past")


def test_a_small_set_tensor_may_not_ask_to_be_cached() -> None:
    refused(ready_filter(), set_tensor(tensor(1), bytes(64), cache=1), "cache flag")


def test_a_peer_not_trusted_with_the_cache_cannot_write_it() -> None:
    data = bytes(HASH_THRESHOLD + 1)
    big = tensor(1, (len(data), 1, 1, 1), type_=24)  # i8
    asked = set_tensor(big, data, cache=1)
    flt = ready_filter()
    assert flt.feed(asked) == asked
    flt = ready_filter()
    flt.cache_writes = False
    assert flt.feed(asked) == set_tensor(big, data, cache=0)


def test_allocations_stay_within_the_share() -> None:
    flt = ready_filter()  # BUF_SIZE of SHARE taken
    left = SHARE - BUF_SIZE
    ask = frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, left))
    assert flt.feed(ask) == ask
    refused(flt, frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, 1)), "share")


def test_one_allocation_beyond_the_share_is_refused() -> None:
    flt = RpcFilter(ShareAccount(SHARE))
    refused(flt, hello() + frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, SHARE + 1)), "share")


def test_the_share_is_one_for_all_connections_of_a_lease() -> None:
    """llama.cpp opens several connections to a worker; together they stay within the share,
    and a closed connection's buffers (freed by the server) count no more."""
    first = ready_filter(share=SHARE)
    second = RpcFilter(first.share)
    second.feed(hello())
    ask = frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, SHARE - BUF_SIZE + 1))
    with pytest.raises(Violation, match="share"):
        second.feed(ask)
    first.close()
    third = RpcFilter(first.share)
    third.feed(hello())
    assert third.feed(ask) == ask
    assert first.share.used_bytes == SHARE - BUF_SIZE + 1


def test_freeing_a_buffer_gives_its_share_back() -> None:
    flt = ready_filter(share=BUF_SIZE)
    assert flt.feed(frame(Cmd.FREE_BUFFER, struct.pack("<Q", BUF_ID)))
    again = frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, BUF_SIZE))
    assert flt.feed(again) == again
    refused(ready_filter(share=BUF_SIZE), again, "share")


def test_a_freed_buffer_cannot_be_written() -> None:
    flt = ready_filter()
    flt.feed(frame(Cmd.FREE_BUFFER, struct.pack("<Q", BUF_ID)))
    refused(flt, set_tensor(tensor(1), bytes(16)), "does not hold")


@pytest.mark.parametrize(("data", "reason"), [
    (b"\xff" + bytes(8), "not one llama.cpp's client sends"),
    (frame(Cmd.NONE), "not one llama.cpp's client sends"),
    (struct.pack("<BQ", Cmd.SET_TENSOR, 2**63), "SET_TENSOR of"),
    (struct.pack("<BQ", Cmd.GRAPH_COMPUTE, 2**40), "GRAPH_COMPUTE of"),
    (struct.pack("<BQ", Cmd.ALLOC_BUFFER, 13), "not 12"),
    (hello(), "only once"),
])
def test_garbage_and_huge_lengths_are_refused(data: bytes, reason: str) -> None:
    refused(ready_filter(), data, reason)


def test_graph_counts_must_match_the_frame() -> None:
    refused(ready_filter(), frame(Cmd.GRAPH_COMPUTE, honest_graph()[9:-1]), "does not match")
    body = struct.pack("<II", 0, 10**6) + bytes(8)
    refused(ready_filter(), frame(Cmd.GRAPH_COMPUTE, body), "nodes")


def test_the_first_command_must_be_a_plain_hello() -> None:
    refused(RpcFilter(ShareAccount(SHARE)), frame(Cmd.DEVICE_COUNT), "HELLO must come first")
    refused(RpcFilter(ShareAccount(SHARE)), frame(Cmd.HELLO, b"\x01" + bytes(23)), "RDMA")


def test_a_buffer_is_usable_only_after_its_base_is_known() -> None:
    flt = RpcFilter(ShareAccount(SHARE))
    flt.feed(hello())
    flt.feed_reply(reply(bytes([7, 0, 0, 0]) + bytes(24)))
    flt.feed(frame(Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, BUF_SIZE)))
    flt.feed_reply(reply(struct.pack("<QQ", BUF_ID, BUF_SIZE)))
    refused(flt, set_tensor(tensor(1), bytes(16)), "no base")


def test_replies_nobody_asked_for_or_of_the_wrong_size_are_refused() -> None:
    flt = ready_filter()
    with pytest.raises(Violation, match="nobody asked"):
        flt.feed_reply(reply(b"x"))
    flt = ready_filter()
    flt.feed(frame(Cmd.GET_ALIGNMENT, struct.pack("<I", 0)))
    with pytest.raises(Violation, match="unexpected size"):
        flt.feed_reply(reply(b"1234"))


def test_a_server_of_another_protocol_is_refused() -> None:
    flt = RpcFilter(ShareAccount(SHARE))
    flt.feed(hello())
    with pytest.raises(Violation, match="speaks RPC"):
        flt.feed_reply(reply(bytes([8, 0, 0, 0]) + bytes(24)))


def test_tensor_nbytes_is_ggml_nbytes() -> None:
    t = np.frombuffer(pack_tensors([tensor(1, (256, 3, 2, 1), type_=Q4_0),
                                    tensor(2, (5, 0, 1, 1)), tensor(3, (7, 2, 1, 1))]),
                      dtype=RPC_TENSOR_DTYPE)
    assert tensor_nbytes(t).tolist() == [8 * 18 * 6, 0, 7 * 2 * 4]


def test_the_allow_lists_are_consistent() -> None:
    assert not ALLOWED_OP_NAMES & POINTER_OP_NAMES
    assert set(GGML_OP) >= ALLOWED_OP_NAMES
    assert Cmd.NONE not in ALLOWED_CMDS and Cmd.HELLO == 14


def test_the_wire_numbers_are_those_of_the_installed_ggml() -> None:
    """The filter's enums and type sizes must be the library's, or it checks the wrong ops."""
    try:
        from backends.ggml import _ggml
        lib = _ggml()
    except Exception as exc:  # noqa: BLE001 - no llama_cpp here: nothing to compare against
        pytest.skip(f"no libggml: {exc}")
    for fn, restype in (("ggml_op_name", ctypes.c_char_p), ("ggml_unary_op_name",
                        ctypes.c_char_p), ("ggml_glu_op_name", ctypes.c_char_p),
                        ("ggml_blck_size", ctypes.c_int64), ("ggml_type_size", ctypes.c_size_t)):
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = [ctypes.c_int]
    assert [lib.ggml_op_name(i).decode() for i in range(GGML_OP_COUNT)] == list(GGML_OP_NAMES)
    assert [lib.ggml_unary_op_name(i).decode()
            for i in range(len(GGML_UNARY_OP_NAMES))] == list(GGML_UNARY_OP_NAMES)
    assert [lib.ggml_glu_op_name(i).decode()
            for i in range(len(GGML_GLU_OP_NAMES))] == list(GGML_GLU_OP_NAMES)
    assert [(lib.ggml_blck_size(i), lib.ggml_type_size(i))
            for i in range(len(GGML_TYPE_TRAITS))] == list(GGML_TYPE_TRAITS)


def _throughput(flt: RpcFilter, stream: bytes, chunk: int) -> float:
    start = time.perf_counter()
    out = 0
    for i in range(0, len(stream), chunk):
        out += len(flt.feed(stream[i:i + chunk]))
    elapsed = time.perf_counter() - start
    assert out == len(stream)
    return len(stream) / elapsed / 1e6


def test_filter_throughput() -> None:
    """Prints MB/s through the filter for a weight upload and for a graph-heavy stream."""
    weights = b"".join(set_tensor(tensor(1, (2**20, 1, 1, 1)), bytes(4 * 2**20))
                       for _ in range(32))  # 128 MiB in 4 MiB SET_TENSORs
    bulk = _throughput(ready_filter(), weights, 1024 * 1024)
    # A graph the size of a small model's (1,000 nodes, 1,500 tensors), and per token the
    # small frames around it.
    tensors = [tensor(i + 1, data=BUF_BASE + 256 * i, op="ADD" if i % 3 else "NONE",
                      src=(i, i - 1) if i > 1 else ()) for i in range(1500)]
    g = graph(tensors, list(range(501, 1501)))
    per_token = (set_tensor(tensor(1), bytes(256)) + g
                 + get_tensor(tensor(2, data=BUF_BASE + 256), 0, 256))
    flt = ready_filter()
    tokens = 50
    start = time.perf_counter()
    for _ in range(tokens):
        assert flt.feed(per_token) == per_token
        flt.feed_reply(reply(bytes(256)))
    elapsed = time.perf_counter() - start
    print(f"\nRPC filter: bulk SET_TENSOR {bulk:.0f} MB/s; graph stream "
          f"{len(per_token) * tokens / elapsed / 1e6:.0f} MB/s, "
          f"{elapsed / tokens * 1e3:.2f} ms per {len(g) // 1000} kB graph token")


_FIELDS = st.fixed_dictionaries({
    "type": st.sampled_from([0, 1, 2, 4, 12, 30, 42, 43, 2**32 - 1]),
    "buffer": st.sampled_from([0, BUF_ID, BUF_ID + 1]),
    "ne": st.lists(st.sampled_from([0, 1, 3, 32, 256, 2**20, 2**31 - 1, 2**31, 2**32 - 1]),
                   min_size=4, max_size=4),
    "nb": st.lists(st.sampled_from([0, 1, 4, 18, 1024, 2**31, 2**32 - 1]), min_size=4, max_size=4),
    "data": st.sampled_from([0, BUF_BASE, BUF_BASE + 64, BUF_BASE + BUF_SIZE - 4,
                             BUF_BASE + BUF_SIZE, BUF_BASE - 1, 2**64 - 1]),
    "name": st.sampled_from([[0] * 64, [65] * 64, [65] * 63 + [0]]),
})


@settings(max_examples=400, deadline=None)
@given(fields=_FIELDS, need_buffer=st.booleans())
def test_the_one_tensor_check_agrees_with_the_graph_check(
        fields: dict[str, object], need_buffer: bool) -> None:
    raw = pack_tensors([fields])
    flt = ready_filter()
    outcomes = []
    for check in (lambda: flt.check_tensor(unpack_tensor(raw), need_buffer),
                  lambda: flt.check_tensors(np.frombuffer(raw, dtype=RPC_TENSOR_DTYPE),
                                            need_buffer)):
        try:
            check()
            outcomes.append("ok")
        except Violation as exc:
            outcomes.append(exc.reason)
    assert outcomes[0] == outcomes[1]
    if outcomes[0] == "ok" and fields["type"] in (0, 1, 2, 12, 30, 42):
        assert unpack_tensor(raw).nbytes == int(tensor_nbytes(np.frombuffer(
            raw, dtype=RPC_TENSOR_DTYPE))[0])
