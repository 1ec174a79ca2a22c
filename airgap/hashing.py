"""Streaming SHA-256: hash while reading or copying, never holding a whole file in memory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK_SIZE = 1 << 20  # large enough that hashlib releases the GIL and syscalls are amortised


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Digest:
    """Size and SHA-256 of a byte stream."""

    size: int
    sha256: str


def iter_chunks(stream: Readable, limit: int | None = None, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield chunks from a stream, at most `limit` bytes in all when a limit is given."""
    remaining = limit
    while remaining is None or remaining > 0:
        want = chunk_size if remaining is None else min(chunk_size, remaining)
        chunk = stream.read(want)
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def digest_chunks(chunks: Iterable[bytes], sink: Callable[[bytes], object] | None = None) -> Digest:
    """Hash chunks, passing each one to `sink` (a writer, a progress bar) as it goes."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink(chunk)
    return Digest(size=size, sha256=hasher.hexdigest())


def digest_bytes(data: bytes) -> Digest:
    return Digest(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def digest_file(path: Path, progress: Callable[[int], object] | None = None) -> Digest:
    """Hash one file in a single streaming pass."""
    with path.open("rb", buffering=0) as stream:
        sink = (lambda chunk: progress(len(chunk))) if progress is not None else None
        return digest_chunks(iter_chunks(stream), sink)


def digest_files(paths: list[Path], workers: int | None = None) -> list[Digest]:
    """Hash several files in parallel (hashlib releases the GIL), results in input order."""
    if len(paths) <= 1:
        return [digest_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(digest_file, paths))


def copy_and_digest(source: Readable, target: BinaryIO, limit: int | None = None) -> Digest:
    """Copy a stream into an open file while hashing it: one read of the data."""
    return digest_chunks(iter_chunks(source, limit), target.write)
