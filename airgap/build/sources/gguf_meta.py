"""Read the metadata of a GGUF model file: header, key/values and tensor table, never the weights.

The gguf package's reader maps the file and parses only the header; tensor data stays on disk. Every way a
file can fail to be GGUF (wrong magic, unsupported version, a header cut short, tensors pointing past the
end) becomes a one-line FormatError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt

from airgap.errors import FormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MIN_HEADER_SIZE = 24  # magic, version, tensor count, key/value count
FILE_TYPE_PREFIXES = ("MOSTLY_", "ALL_")

GgufValue = int | float | str | bool | list[Any] | None


class _Truncated(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _StrictReader(gguf.GGUFReader):
    """The gguf reader, except that a read past the end of the file fails instead of returning fewer items.

    Without this, a truncated or forged header yields short arrays that surface later as unrelated errors, or
    as array loops that never advance. Reads go through a plain ndarray view of the same mapping: slicing
    np.memmap costs several times more, which adds up to seconds on a 256k-token vocabulary.
    """

    def __init__(self, path: Path) -> None:
        self._plain: npt.NDArray[np.uint8] | None = None
        super().__init__(path, "r")

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if end > len(self._plain):
            raise _Truncated(offset)
        items = self._plain[offset:end].view(dtype=dtype)[:count]
        return items.view(items.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _check_preamble(path: Path) -> None:
    try:
        with path.open("rb") as stream:
            head = stream.read(MIN_HEADER_SIZE)
    except OSError as error:
        raise FormatError(f"{path}: cannot be read as GGUF: {error.strerror or error}") from error
    if len(head) >= 4 and head[:4] != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file: magic is {head[:4]!r}, expected {GGUF_MAGIC!r}")
    if len(head) < MIN_HEADER_SIZE:
        raise FormatError(f"{path}: GGUF header truncated: file has {len(head)} bytes, need {MIN_HEADER_SIZE}")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written on a big-endian host
        version = int.from_bytes(head[4:8], "big")
    if version not in SUPPORTED_VERSIONS:
        expected = " or ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise FormatError(f"{path}: GGUF version {version} is not supported, expected {expected}")


def _open(path: Path) -> gguf.GGUFReader:
    _check_preamble(path)
    try:
        return _StrictReader(path)
    except _Truncated as error:
        size = path.stat().st_size
        message = f"{path}: GGUF file truncated: {size} bytes, data expected at offset {error.offset}"
        raise FormatError(message) from error
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as error:
        raise FormatError(f"{path}: malformed GGUF header: {error}") from error
    except OSError as error:
        raise FormatError(f"{path}: cannot be read as GGUF: {error.strerror or error}") from error


def is_gguf(path: Path) -> bool:
    """True when the file is a well-formed GGUF container whose tensors all lie inside the file."""
    try:
        _open(path)
    except FormatError:
        return False
    return True


def _value(reader: gguf.GGUFReader, key: str) -> GgufValue:
    field = reader.get_field(key)
    if field is None:
        return None
    value: GgufValue = field.contents()
    return value


def _int(path: Path, reader: gguf.GGUFReader, key: str) -> int | None:
    """An integer key; per-layer arrays (some architectures vary heads by layer) give their maximum."""
    value = _value(reader, key)
    if isinstance(value, list):
        value = max(value, default=None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{path}: GGUF key {key} should be an integer, found {value!r}")
    return int(value)


def _required_int(path: Path, reader: gguf.GGUFReader, key: str) -> int:
    value = _int(path, reader, key)
    if value is None:
        raise FormatError(f"{path}: GGUF metadata lacks {key}")
    return value


def _file_type_name(path: Path, reader: gguf.GGUFReader) -> str | None:
    code = _int(path, reader, gguf.Keys.General.FILE_TYPE)
    if code is None:
        return None
    try:
        name = gguf.LlamaFileType(code).name
    except ValueError:
        return f"UNKNOWN_{code}"
    for prefix in FILE_TYPE_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def _vocab_size(path: Path, reader: gguf.GGUFReader, arch: str) -> int:
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if tokens is not None:
        return len(tokens.data)
    return _int(path, reader, gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch)) or 0


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """What the serving planner needs to know about a GGUF model, as JSON-serialisable values.

    head_count is 0 for models without attention (recurrent architectures); head_count_kv defaults to
    head_count as in llama.cpp; file_type is the llama.cpp name without its MOSTLY_/ALL_ prefix ("Q4_K_M").
    """
    reader = _open(path)
    try:
        arch = _value(reader, gguf.Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise FormatError(f"{path}: GGUF metadata lacks {gguf.Keys.General.ARCHITECTURE}")
        keys = gguf.Keys.LLM
        attention = gguf.Keys.Attention
        head_count = _int(path, reader, attention.HEAD_COUNT.format(arch=arch)) or 0
        head_count_kv = _int(path, reader, attention.HEAD_COUNT_KV.format(arch=arch))
        chat_template = _value(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        version_field = reader.fields["GGUF.version"]
        return {
            "architecture": arch,
            "block_count": _required_int(path, reader, keys.BLOCK_COUNT.format(arch=arch)),
            "embedding_length": _required_int(path, reader, keys.EMBEDDING_LENGTH.format(arch=arch)),
            "head_count": head_count,
            "head_count_kv": head_count if head_count_kv is None else head_count_kv,
            "key_length": _int(path, reader, attention.KEY_LENGTH.format(arch=arch)),
            "value_length": _int(path, reader, attention.VALUE_LENGTH.format(arch=arch)),
            "context_length": _required_int(path, reader, keys.CONTEXT_LENGTH.format(arch=arch)),
            "file_type": _file_type_name(path, reader),
            "parameter_count": sum(int(tensor.n_elements) for tensor in reader.tensors),
            "tensor_bytes": sum(int(tensor.n_bytes) for tensor in reader.tensors),
            "vocab_size": _vocab_size(path, reader, arch),
            "has_chat_template": isinstance(chat_template, str) and bool(chat_template.strip()),
            "gguf_version": int(np.asarray(version_field.parts[0])[0]),
        }
    except (UnicodeDecodeError, ValueError) as error:
        raise FormatError(f"{path}: malformed GGUF metadata: {error}") from error


def read_gguf_metadata_head(head: bytes, size: int, name: str) -> dict[str, object] | None:
    """`read_gguf_metadata` from the first bytes of a GGUF file of `size` bytes, before downloading the rest.

    The bytes go into a sparse file of the full size, so the reader sees the real header and tensor table while
    the weights read as holes it never touches. None when the header runs past `head` (fetch more, try again).
    """
    import tempfile

    if len(head) >= 4 and head[:4] != GGUF_MAGIC:
        raise FormatError(f"{name}: not a GGUF file: magic is {head[:4]!r}, expected {GGUF_MAGIC!r}")
    with tempfile.TemporaryDirectory(prefix="airgap-gguf-head-") as work:
        path = Path(work) / name.replace("/", "-")
        with path.open("wb") as stream:
            stream.write(head)
            stream.truncate(max(size, len(head)))
        try:
            reader = _open(path)
        except FormatError:
            if len(head) < size:
                return None  # the missing bytes read as zeros: a header cut short looks malformed
            raise
        if int(reader.data_offset) > len(head) and len(head) < size:
            return None
        return read_gguf_metadata(path)
