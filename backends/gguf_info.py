"""GGUF inspection: what a model file holds and how much memory it needs.

Owns reading a GGUF file's header, metadata and tensor table (never the weights), turning every
way a file can be broken into one `InvalidModelFile` with a message for end users, and the
memory arithmetic the swarm uses to place layers.

We parse the header ourselves instead of with `gguf.GGUFReader`: the reader builds a numpy view
per vocabulary entry and takes about 18 s on Gemma 3's 262k-token vocabulary (this parser takes
a fraction of a second), and on a truncated file it fails with bare IndexError/ValueError or not
at all. The `gguf` package still supplies the constants (types, block sizes, file types).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import gguf

from backends.errors import ModelStoreError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # llama.cpp rejects version 1
GGML_MAX_DIMS = 4
# Numeric arrays longer than this are vocabulary-sized data we skip rather than keep.
_MAX_KEPT_ARRAY = 1024

_SCALAR_FORMATS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class InvalidModelFile(ModelStoreError, ValueError):
    """The file is not a GGUF model llama.cpp could load (wrong format, truncated, damaged)."""


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF model file holds, read from its header without loading weights."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    parameters: int
    quantisation: str
    n_layers: int
    context_length: int
    embedding_length: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    layer_bytes: tuple[int, ...]
    other_bytes: int
    chat_template: str | None
    size_label: str | None = None  # the parameter count as its makers name it ("0.5B")

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (paths as strings, tuples as lists)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["layer_bytes"] = list(self.layer_bytes)
        out["weights_bytes"] = self.weights_bytes
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs at a given context length: weights plus the KV cache."""

    weights_bytes: int
    kv_bytes: int
    total_bytes: int
    per_layer_bytes: tuple[int, ...]


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    n_elements: int
    n_bytes: int
    offset: int  # relative to the start of the data section


class _Truncated(Exception):
    """Internal: the file ended before a read the header says must succeed."""


class _Cursor:
    """Sequential little-endian reads through a 1 MiB window; knows where the file ends."""

    _WINDOW = 1 << 20

    def __init__(self, f: IO[bytes], size: int, pos: int = 0) -> None:
        self._f = f
        self.size = size
        self.pos = pos
        self._buf = b""
        self._buf_start = 0

    def _window(self, n: int) -> tuple[bytes, int]:
        """The buffer and the index of `pos` in it, holding at least n bytes from pos."""
        if n > self.size - self.pos:
            raise _Truncated
        rel = self.pos - self._buf_start
        if rel < 0 or rel + n > len(self._buf):
            self._f.seek(self.pos)
            self._buf = self._f.read(max(n, self._WINDOW))
            self._buf_start = self.pos
            rel = 0
            if len(self._buf) < n:  # the file shrank while we read it
                raise _Truncated
        return self._buf, rel

    def take(self, n: int) -> bytes:
        buf, rel = self._window(n)
        self.pos += n
        return buf[rel : rel + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise _Truncated
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings (vocabularies run to hundreds of thousands)."""
        unpack_from = struct.unpack_from
        while count:
            buf, rel = self._window(8)
            end = len(buf)
            # Walk the window without method calls: this loop is the hot path for big vocabs.
            while count and rel + 8 <= end:
                (n,) = unpack_from("<Q", buf, rel)
                if rel + 8 + n > end:
                    break
                rel += 8 + n
                count -= 1
            self.pos = self._buf_start + rel
            if count:
                self.skip(self.u64())
                count -= 1


def _value_type(raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise InvalidModelFile(
            f"metadata unreadable: key {key!r} has unknown value type {raw}"
        ) from None


def _read_value(cur: _Cursor, vtype: gguf.GGUFValueType, key: str) -> Any:
    """Read one metadata value; long arrays and string arrays are skipped (returned as None)."""
    if vtype == gguf.GGUFValueType.STRING:
        return cur.string().decode("utf-8", errors="replace")
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        return cur.unpack(fmt)
    # Only ARRAY is left: element type, count, elements.
    etype = _value_type(cur.u32(), key)
    count = cur.u64()
    if etype == gguf.GGUFValueType.ARRAY:
        raise InvalidModelFile(f"metadata unreadable: key {key!r} is a nested array")
    if etype == gguf.GGUFValueType.STRING:
        if count * 8 > cur.size - cur.pos:  # every string has an 8-byte length
            raise _Truncated
        cur.skip_strings(count)
        return None
    width = struct.calcsize(_SCALAR_FORMATS[etype])
    if count > _MAX_KEPT_ARRAY:
        cur.skip(count * width)
        return None
    raw = cur.take(count * width)
    return struct.unpack(f"<{count}{_SCALAR_FORMATS[etype][1:]}", raw)


def _read_tensor_entry(cur: _Cursor) -> _TensorEntry:
    name = cur.string().decode("utf-8", errors="replace")
    n_dims = cur.u32()
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise InvalidModelFile(f"metadata unreadable: tensor {name!r} has {n_dims} dimensions")
    dims = [cur.u64() for _ in range(n_dims)]
    raw_type = cur.u32()
    offset = cur.u64()
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise InvalidModelFile(
            f"tensor {name!r} uses tensor type {raw_type}, which this version of Covey does not "
            "know; the file may need a newer llama.cpp"
        ) from None
    n_elements = 1
    for d in dims:
        n_elements *= d
    if dims[0] % block_size:
        raise InvalidModelFile(
            f"metadata unreadable: tensor {name!r} has rows of {dims[0]} values, not a multiple "
            f"of its block size {block_size}"
        )
    n_bytes = n_elements // block_size * type_size
    return _TensorEntry(name, ggml_type, n_elements, n_bytes, offset)


def _check_magic_and_version(f: IO[bytes], size: int) -> int:
    head = f.read(8)
    if size == 0:
        raise InvalidModelFile("not a GGUF file: the file is empty (0 bytes)")
    if not GGUF_MAGIC.startswith(head[:4]):
        raise InvalidModelFile(
            f"not a GGUF file (bad magic): it starts with {head[:4]!r}, a GGUF model starts "
            f"with {GGUF_MAGIC!r}"
        )
    if len(head) < 8:
        raise InvalidModelFile(
            f"truncated: the file ends at byte {size} inside the GGUF header; it is incomplete, "
            "copy or download it again"
        )
    version = struct.unpack("<I", head[4:8])[0]
    if version & 0xFFFF == 0 and version:
        raise InvalidModelFile(
            "unsupported GGUF version: the file is big-endian, which llama.cpp cannot load here"
        )
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModelFile(
            f"unsupported GGUF version {version} (Covey reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    return int(version)


def _parse(f: IO[bytes], size: int) -> tuple[int, dict[str, Any], list[_TensorEntry], int]:
    """Version, metadata, tensor table and the data section's start offset."""
    version = _check_magic_and_version(f, size)
    cur = _Cursor(f, size, pos=8)
    section = "GGUF header"
    try:
        tensor_count = cur.u64()
        kv_count = cur.u64()
        section = "metadata"
        # Every key/value needs at least 12 bytes and every tensor entry 28: reject absurd
        # counts before looping over them.
        if kv_count * 12 + tensor_count * 28 > size - cur.pos:
            raise _Truncated
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string().decode("utf-8", errors="replace")
            vtype = _value_type(cur.u32(), key)
            if key in metadata:
                raise InvalidModelFile(f"metadata unreadable: key {key!r} appears twice")
            metadata[key] = _read_value(cur, vtype, key)
        section = "tensor table"
        tensors = [_read_tensor_entry(cur) for _ in range(tensor_count)]
    except _Truncated:
        raise InvalidModelFile(
            f"truncated: the file ends at byte {size} inside the {section}; it is incomplete, "
            "copy or download it again"
        ) from None
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InvalidModelFile(f"metadata unreadable: bad general.alignment {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    return version, metadata, tensors, data_start


def _check_tensor_data(
    tensors: list[_TensorEntry], data_start: int, alignment: int, size: int
) -> None:
    names: set[str] = set()
    data_end = data_start
    for t in tensors:
        if t.name in names:
            raise InvalidModelFile(f"metadata unreadable: tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % alignment:
            raise InvalidModelFile(
                f"metadata unreadable: tensor {t.name!r} starts at an unaligned offset"
            )
        data_end = max(data_end, data_start + t.offset + t.n_bytes)
    if data_end > size:
        raise InvalidModelFile(
            f"truncated: tensor data ends at {data_end} bytes but the file has {size}; it is "
            "incomplete, copy or download it again"
        )


def _int(metadata: dict[str, Any], key: str, default: int | None = None) -> int:
    """An integer metadata value; per-layer arrays count as their largest entry."""
    value = metadata.get(key)
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        # Per-layer values (some architectures vary heads by layer): the largest is the
        # conservative choice for memory estimates.
        value = max(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if default is not None:
        return default
    raise InvalidModelFile(
        f"metadata unreadable: missing {key!r}; this GGUF is not a complete language model"
    )


def _quantisation(metadata: dict[str, Any], tensors: list[_TensorEntry]) -> str:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and file_type != gguf.LlamaFileType.GUESSED:
        try:
            name = gguf.LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass  # a file type newer than our gguf package: fall back to the tensors
    by_bytes: Counter[str] = Counter()
    for t in tensors:
        by_bytes[t.ggml_type.name] += t.n_bytes
    return by_bytes.most_common(1)[0][0] if by_bytes else "unknown"


def _split_bytes(tensors: list[_TensorEntry], n_layers: int) -> tuple[tuple[int, ...], int]:
    """Weight bytes per block (tensors named blk.N.*) and the bytes of everything else."""
    per_block: dict[int, int] = {}
    other = 0
    for t in tensors:
        parts = t.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            block = int(parts[1])
            per_block[block] = per_block.get(block, 0) + t.n_bytes
        else:
            other += t.n_bytes
    count = max([n_layers, *(b + 1 for b in per_block)])
    return tuple(per_block.get(i, 0) for i in range(count)), other


def read_gguf_info(path: Path | str, size: int | None = None) -> GGUFInfo:
    """Inspect a GGUF file; raises InvalidModelFile for anything llama.cpp could not load.
    `size`: the size the file is to have, for a copy whose tail is still arriving (the header
    comes first); None: its size now."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size if size is None else size
            version, metadata, tensors, data_start = _parse(f, size)
    except OSError as e:
        raise InvalidModelFile(f"cannot read {path}: {e.strerror or e}") from e
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    _check_tensor_data(tensors, data_start, alignment, size)

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(
            "metadata unreadable: missing 'general.architecture'; this GGUF is not a model"
        )
    n_layers = _int(metadata, f"{arch}.block_count")
    n_embd = _int(metadata, f"{arch}.embedding_length", 0)
    n_head = _int(metadata, f"{arch}.attention.head_count", 0)
    n_head_kv = _int(metadata, f"{arch}.attention.head_count_kv", n_head)
    default_head_dim = n_embd // n_head if n_head else 0
    name = metadata.get("general.name")
    template = metadata.get("tokenizer.chat_template")
    size_label = metadata.get("general.size_label")
    layer_bytes, other_bytes = _split_bytes(tensors, n_layers)
    return GGUFInfo(
        path=path,
        file_size=size,
        gguf_version=version,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        parameters=sum(t.n_elements for t in tensors),
        quantisation=_quantisation(metadata, tensors),
        n_layers=n_layers,
        context_length=_int(metadata, f"{arch}.context_length", 0),
        embedding_length=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=_int(metadata, f"{arch}.attention.key_length", default_head_dim),
        head_dim_v=_int(metadata, f"{arch}.attention.value_length", default_head_dim),
        layer_bytes=layer_bytes,
        other_bytes=other_bytes,
        chat_template=template if isinstance(template, str) else None,
        size_label=size_label if isinstance(size_label, str) and size_label else None,
    )


def estimate_memory(
    info: GGUFInfo, context_length: int, kv_bytes_per_element: int = 2
) -> MemoryEstimate:
    """Weights plus a KV cache of `context_length` tokens (f16 by default, as llama.cpp's)."""
    k_per_layer = context_length * info.n_head_kv * info.head_dim_k * kv_bytes_per_element
    v_per_layer = context_length * info.n_head_kv * info.head_dim_v * kv_bytes_per_element
    kv_per_layer = k_per_layer + v_per_layer
    per_layer = tuple(
        weights + (kv_per_layer if i < info.n_layers else 0)
        for i, weights in enumerate(info.layer_bytes)
    )
    weights_bytes = info.weights_bytes
    kv_bytes = kv_per_layer * info.n_layers
    return MemoryEstimate(
        weights_bytes=weights_bytes,
        kv_bytes=kv_bytes,
        total_bytes=weights_bytes + kv_bytes,
        per_layer_bytes=per_layer,
    )
