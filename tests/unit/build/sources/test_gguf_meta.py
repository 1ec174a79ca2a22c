from __future__ import annotations

import json
import struct
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest

from airgap.build.sources.gguf_meta import is_gguf, read_gguf_metadata
from airgap.errors import FormatError

EXPECTED_KEYS = [
    "architecture",
    "block_count",
    "embedding_length",
    "head_count",
    "head_count_kv",
    "key_length",
    "value_length",
    "context_length",
    "file_type",
    "parameter_count",
    "tensor_bytes",
    "vocab_size",
    "has_chat_template",
    "gguf_version",
]


def test_tiny_model_metadata(tiny_gguf: Path) -> None:
    meta = read_gguf_metadata(tiny_gguf)

    assert list(meta) == EXPECTED_KEYS
    assert meta["architecture"] == "llama"
    assert meta["block_count"] == 2
    assert meta["embedding_length"] == 64
    assert meta["head_count"] == 4
    assert meta["head_count_kv"] == 2
    assert meta["key_length"] is None and meta["value_length"] is None
    assert meta["context_length"] == 256
    assert meta["file_type"] == "F16"
    assert meta["vocab_size"] == 3 + 256
    assert meta["has_chat_template"] is True
    assert meta["gguf_version"] == 3
    json.dumps(meta)  # the planner stores it as JSON


def test_counts_match_the_tensor_table(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    meta = read_gguf_metadata(tiny_gguf)

    assert meta["parameter_count"] == sum(int(t.n_elements) for t in reader.tensors)
    assert meta["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    # the tiny model: two 259x64 matrices plus two layers of attention and feed-forward weights
    assert meta["parameter_count"] == 2 * 259 * 64 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64) + 64


def test_context_length_and_padding_are_reflected(tmp_path: Path, make_tiny_gguf: ModuleType) -> None:
    path = make_tiny_gguf.make_tiny_gguf(tmp_path / "p.gguf", seed=3, context_length=1024, pad_mb=2)

    meta = read_gguf_metadata(path)

    assert meta["context_length"] == 1024
    assert isinstance(meta["tensor_bytes"], int) and meta["tensor_bytes"] > 2 * 1024 * 1024


def write_gguf(path: Path, arch: str = "llama", **keys: object) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in keys.items():
        name = key.replace("__", ".").format(arch=arch)
        if isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, list):
            writer.add_array(name, value)
    writer.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_optional_keys_and_per_layer_heads(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        arch="openelm",
        openelm__block_count=3,
        openelm__embedding_length=16,
        openelm__context_length=64,
        openelm__attention__head_count=[2, 4, 3],
        openelm__attention__key_length=8,
        openelm__attention__value_length=8,
        general__file_type=int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
    )

    meta = read_gguf_metadata(path)

    assert meta["head_count"] == 4
    assert meta["head_count_kv"] == 4  # absent: llama.cpp uses head_count
    assert (meta["key_length"], meta["value_length"]) == (8, 8)
    assert meta["file_type"] == "Q4_K_M"
    assert meta["vocab_size"] == 0
    assert meta["has_chat_template"] is False
    assert meta["parameter_count"] == 32
    assert meta["tensor_bytes"] == 128


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", llama__embedding_length=16, llama__context_length=64)

    with pytest.raises(FormatError, match=r"llama\.block_count"):
        read_gguf_metadata(path)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))

    with pytest.raises(FormatError, match="not a GGUF file") as raised:
        read_gguf_metadata(path)
    assert "\n" not in str(raised.value)
    assert is_gguf(path) is False


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")

    with pytest.raises(FormatError, match="truncated"):
        read_gguf_metadata(path)
    assert is_gguf(path) is False


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))

    with pytest.raises(FormatError, match="version 9"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("keep", [10, 30, 1000, 5000, -100])
def test_truncated_file(tmp_path: Path, tiny_gguf: Path, keep: int) -> None:
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])

    with pytest.raises(FormatError, match="truncated") as raised:
        read_gguf_metadata(path)
    assert str(path) in str(raised.value)
    assert is_gguf(path) is False


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot be read"):
        read_gguf_metadata(tmp_path / "absent.gguf")


def test_is_gguf_accepts_the_tiny_model(tiny_gguf: Path) -> None:
    assert is_gguf(tiny_gguf) is True
