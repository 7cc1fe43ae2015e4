"""The ggml RPC wire format, as the vendored llama.cpp (0c1e57098, RPC protocol 7.0.0) speaks it.

Pure data, no ctypes: command numbers and each command's fixed request and reply sizes,
the packed `rpc_tensor` layout, ggml's op, unary-op, GLU-op and type numbering, and the type
sizes `ggml_nbytes` uses. Every number is read from the vendored ggml-rpc.cpp and ggml.h
of llama-cpp-python 0.3.36; tests/unit/test_rpc_filter.py checks them against the installed
libggml, and GGML_OP_COUNT lets a node refuse a worker whose op numbering differs.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

RPC_PROTOCOL = (7, 0, 0)  # RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION in ggml-rpc.h

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64  # bytes
GGML_MAX_NAME = 64
RPC_CONN_CAPS_SIZE = 24  # transport.h: the RDMA upgrade offer carried by HELLO

# | cmd (1 byte) | payload size (8 bytes, little-endian) | payload |
FRAME_HEADER = struct.Struct("<BQ")
# A reply has no command byte: | size (8 bytes) | data |, in the order of the requests.
REPLY_HEADER = struct.Struct("<Q")


class Cmd(IntEnum):
    """enum rpc_cmd. NONE is the client's internal no-op, never on the wire."""

    ALLOC_BUFFER = 0
    GET_ALIGNMENT = 1
    GET_MAX_SIZE = 2
    BUFFER_GET_BASE = 3
    FREE_BUFFER = 4
    BUFFER_CLEAR = 5
    SET_TENSOR = 6
    SET_TENSOR_HASH = 7
    GET_TENSOR = 8
    COPY_TENSOR = 9
    GRAPH_COMPUTE = 10
    GET_DEVICE_MEMORY = 11
    INIT_TENSOR = 12
    GET_ALLOC_SIZE = 13
    HELLO = 14
    DEVICE_COUNT = 15
    GRAPH_RECOMPUTE = 16
    MEMSET_TENSOR = 17
    NONE = 18


RPC_CMD_COUNT = 19

# struct rpc_tensor, #pragma pack(1): 296 bytes.
RPC_TENSOR_DTYPE = np.dtype([
    ("id", "<u8"),
    ("type", "<u4"),
    ("buffer", "<u8"),
    ("ne", "<u4", (GGML_MAX_DIMS,)),
    ("nb", "<u4", (GGML_MAX_DIMS,)),
    ("op", "<u4"),
    ("op_params", "<i4", (GGML_MAX_OP_PARAMS // 4,)),
    ("flags", "<i4"),
    ("src", "<u8", (GGML_MAX_SRC,)),
    ("view_src", "<u8"),
    ("view_offs", "<u8"),
    ("data", "<u8"),
    ("name", "u1", (GGML_MAX_NAME,)),
    ("use_count", "<i4"),
])
RPC_TENSOR_SIZE = RPC_TENSOR_DTYPE.itemsize
assert RPC_TENSOR_SIZE == 296

# Fixed payload sizes of each request; None: variable (SET_TENSOR, GRAPH_COMPUTE).
REQUEST_SIZE: dict[Cmd, int | None] = {
    Cmd.ALLOC_BUFFER: 4 + 8,  # device, size
    Cmd.GET_ALIGNMENT: 4,
    Cmd.GET_MAX_SIZE: 4,
    Cmd.BUFFER_GET_BASE: 8,  # remote_ptr
    Cmd.FREE_BUFFER: 8,
    Cmd.BUFFER_CLEAR: 8 + 1,  # remote_ptr, value
    Cmd.SET_TENSOR: None,  # rpc_tensor, cache_flag (1), offset (8), data
    Cmd.SET_TENSOR_HASH: RPC_TENSOR_SIZE + 8 + 8,  # tensor, offset, hash
    Cmd.GET_TENSOR: RPC_TENSOR_SIZE + 8 + 8,  # tensor, offset, size
    Cmd.COPY_TENSOR: 2 * RPC_TENSOR_SIZE,  # src, dst
    Cmd.GRAPH_COMPUTE: None,
    Cmd.GET_DEVICE_MEMORY: 4,
    Cmd.INIT_TENSOR: RPC_TENSOR_SIZE,
    Cmd.GET_ALLOC_SIZE: 4 + (1 + GGML_MAX_SRC) * RPC_TENSOR_SIZE,  # device, tensor, srcs
    Cmd.HELLO: RPC_CONN_CAPS_SIZE,
    Cmd.DEVICE_COUNT: 0,
    Cmd.GRAPH_RECOMPUTE: 4,
    Cmd.MEMSET_TENSOR: RPC_TENSOR_SIZE + 8 + 8 + 1,  # tensor, offset, size, value
}
SET_TENSOR_HEADER_SIZE = RPC_TENSOR_SIZE + 1 + 8

# Fixed reply sizes; absent: the server sends no reply; GET_TENSOR's is the size it asked for.
REPLY_SIZE: dict[Cmd, int] = {
    Cmd.ALLOC_BUFFER: 16,  # remote_ptr, remote_size
    Cmd.GET_ALIGNMENT: 8,
    Cmd.GET_MAX_SIZE: 8,
    Cmd.BUFFER_GET_BASE: 8,
    Cmd.SET_TENSOR_HASH: 1,
    Cmd.COPY_TENSOR: 1,
    Cmd.GET_DEVICE_MEMORY: 16,
    Cmd.GET_ALLOC_SIZE: 8,
    Cmd.HELLO: 4 + RPC_CONN_CAPS_SIZE,  # major, minor, patch, padding, conn_caps
    Cmd.DEVICE_COUNT: 4,
}

# enum ggml_op, in order.
GGML_OP_NAMES = (
    "NONE", "DUP", "ADD", "ADD_ID", "ADD1", "ACC", "SUB", "MUL", "DIV", "SQR", "SQRT", "LOG",
    "SIN", "COS", "SUM", "SUM_ROWS", "CUMSUM", "MEAN", "ARGMAX", "COUNT_EQUAL", "REPEAT",
    "REPEAT_BACK", "CONCAT", "SILU_BACK", "NORM", "RMS_NORM", "RMS_NORM_BACK", "GROUP_NORM",
    "L2_NORM", "MUL_MAT", "MUL_MAT_ID", "OUT_PROD", "SCALE", "SET", "CPY", "CONT", "RESHAPE",
    "VIEW", "PERMUTE", "TRANSPOSE", "GET_ROWS", "GET_ROWS_BACK", "SET_ROWS", "DIAG",
    "DIAG_MASK_INF", "DIAG_MASK_ZERO", "SOFT_MAX", "SOFT_MAX_BACK", "ROPE", "ROPE_BACK",
    "CLAMP", "CONV_TRANSPOSE_1D", "IM2COL", "IM2COL_BACK", "IM2COL_3D", "COL2IM_1D", "CONV_2D",
    "CONV_3D", "CONV_2D_DW", "CONV_TRANSPOSE_2D", "POOL_1D", "POOL_2D", "POOL_2D_BACK",
    "UPSCALE", "PAD", "PAD_REFLECT_1D", "ROLL", "ARANGE", "TIMESTEP_EMBEDDING", "ARGSORT",
    "TOP_K", "LEAKY_RELU", "TRI", "FILL", "FLASH_ATTN_EXT", "FLASH_ATTN_BACK", "SSM_CONV",
    "SSM_SCAN", "WIN_PART", "WIN_UNPART", "GET_REL_POS", "ADD_REL_POS", "RWKV_WKV6",
    "GATED_LINEAR_ATTN", "RWKV_WKV7", "SOLVE_TRI", "GATED_DELTA_NET", "LIGHTNING_INDEXER",
    "DSV4_HC_COMB", "DSV4_HC_PRE", "DSV4_HC_POST", "UNARY", "MAP_CUSTOM1", "MAP_CUSTOM2",
    "MAP_CUSTOM3", "CUSTOM", "CROSS_ENTROPY_LOSS", "CROSS_ENTROPY_LOSS_BACK", "OPT_STEP_ADAMW",
    "OPT_STEP_SGD", "GLU",
)
GGML_OP_COUNT = 101  # ggml-rpc.h static_asserts this very number for protocol 7.0.0
GGML_OP = {name: i for i, name in enumerate(GGML_OP_NAMES)}
assert len(GGML_OP_NAMES) == GGML_OP_COUNT

# enum ggml_unary_op and enum ggml_glu_op: op_params[0] of UNARY and GLU nodes.
GGML_UNARY_OP_NAMES = (
    "ABS", "SGN", "NEG", "STEP", "TANH", "ELU", "RELU", "SIGMOID", "GELU", "GELU_QUICK", "SILU",
    "HARDSWISH", "HARDSIGMOID", "EXP", "EXPM1", "SOFTPLUS", "GELU_ERF", "XIELU", "FLOOR",
    "CEIL", "ROUND", "TRUNC",
)
GGML_GLU_OP_NAMES = (
    "REGLU", "GEGLU", "SWIGLU", "SWIGLU_OAI", "GEGLU_ERF", "GEGLU_QUICK", "SWIGLU_CLAMP",
)

# (block size, bytes per block) of each ggml_type, by number; (0, 0): a removed type, which
# the server refuses.
GGML_TYPE_TRAITS: tuple[tuple[int, int], ...] = (
    (1, 4), (1, 2), (32, 18), (32, 20), (0, 0), (0, 0), (32, 22), (32, 24),  # f32 .. q5_1
    (32, 34), (32, 36), (256, 84), (256, 110), (256, 144), (256, 176), (256, 210),  # .. q6_K
    (256, 292), (256, 66), (256, 74), (256, 98), (256, 50), (32, 18), (256, 110), (256, 82),
    (256, 136), (1, 1), (1, 2), (1, 4), (1, 8), (1, 8), (256, 56), (1, 2),  # .. iq1_m, bf16
    (0, 0), (0, 0), (0, 0), (256, 54), (256, 66), (0, 0), (0, 0), (0, 0),  # .. tq2_0
    (32, 17), (64, 36), (128, 18), (64, 18),  # mxfp4, nvfp4, q1_0, q2_0
)
GGML_TYPE_COUNT = len(GGML_TYPE_TRAITS)
assert GGML_TYPE_COUNT == 43


def frame(cmd: int, payload: bytes = b"") -> bytes:
    """One request as llama.cpp's client sends it."""
    return FRAME_HEADER.pack(cmd, len(payload)) + payload


class WireTensor(NamedTuple):
    """The fields of one rpc_tensor a filter needs, as Python ints (cheaper than numpy for one)."""

    id: int
    type: int
    buffer: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    data: int
    name: bytes

    @property
    def nbytes(self) -> int:
        """ggml_nbytes (the type must be a live one)."""
        if min(self.ne) <= 0:
            return 0
        blck, size = GGML_TYPE_TRAITS[self.type]
        rest = sum((n - 1) * s for n, s in zip(self.ne[1:], self.nb[1:], strict=True))
        if blck == 1:
            return size + (self.ne[0] - 1) * self.nb[0] + rest
        return self.ne[0] * self.nb[0] // blck + rest


_TENSOR = struct.Struct("<QIQ4I4II64xi80x8x8xQ64s4x")
assert _TENSOR.size == RPC_TENSOR_SIZE


def unpack_tensor(buffer: bytes | memoryview, offset: int = 0) -> WireTensor:
    f = _TENSOR.unpack_from(buffer, offset)
    return WireTensor(f[0], f[1], f[2], f[3:7], f[7:11], f[13], f[14])


# Indexed by type number; the extra last slot stands for any number past the table.
BLOCK_SIZE = np.array([b for b, _ in GGML_TYPE_TRAITS] + [0], dtype=np.uint64)
_TYPE_SIZE = np.array([s for _, s in GGML_TYPE_TRAITS] + [0], dtype=np.uint64)


def tensor_nbytes(t: np.ndarray) -> np.ndarray:
    """ggml_nbytes of each rpc_tensor in `t`; exact (uint64) for tensors under 2**56 bytes."""
    ne, nb = t["ne"].astype(np.uint64), t["nb"].astype(np.uint64)
    type_ = np.minimum(t["type"], GGML_TYPE_COUNT)
    blck, tsize = BLOCK_SIZE[type_], _TYPE_SIZE[type_]
    rest = ((ne[:, 1:] - 1) * nb[:, 1:]).sum(axis=1, dtype=np.uint64)
    first = np.where(blck == 1, tsize + (ne[:, 0] - 1) * nb[:, 0],
                     ne[:, 0] * nb[:, 0] // np.maximum(blck, 1))
    return np.where((ne == 0).any(axis=1), np.uint64(0), first + rest)


def pack_tensors(tensors: list[dict[str, Any]]) -> bytes:
    """rpc_tensor structs from field values (the rest zero), e.g. to craft requests in tests."""
    packed = np.zeros(len(tensors), dtype=RPC_TENSOR_DTYPE)
    for row, fields in zip(packed, tensors, strict=True):
        for name, value in fields.items():
            row[name] = value
    return packed.tobytes()
