"""The bundle container: one POSIX tar stream, head first, payload after.

Layout (docs/FORMAT.md): `manifest.json`, `signatures` (fixed-size block), `SHA256SUMS`, then one
member per carried file under `files/`, stored raw or as `<path>.zst`. The reader accepts nothing
else: only regular members, only names the signed manifest lists, sizes capped by the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import zstandard

from airgap.errors import FormatError, IntegrityError
from airgap.format.manifest import (
    DEFAULT_LIMITS,
    DraftFile,
    FileEntry,
    Limits,
    Manifest,
    manifest_size,
    parse_manifest,
    sha256sums_size,
)
from airgap.streams import pipeline as hashing
from airgap.streams.pipeline import (
    Digest,
    DirectFile,
    Prefetch,
    Readable,
    WriteBehind,
    digest_bytes,
    digest_chunks,
    iter_chunks,
)
from airgap.trust.signing import SIGNATURES_BLOCK_SIZE, Signature, decode_signatures, encode_signatures

Authenticate = Callable[[bytes, Sequence[Signature]], object]  # raises unless the manifest bytes are signed

BLOCK = 512
MANIFEST_MEMBER = "manifest.json"
SIGNATURES_MEMBER = "signatures"
SUMS_MEMBER = "SHA256SUMS"
ZSTD_LEVEL = 9
ZSTD_MAX_WINDOW = 1 << 27  # caps the decoder's memory whatever a member's frame header asks for
COMPRESS_MAX_RATIO = 0.95  # keep the zstd copy only if it saves at least 5 %
_MAX_PAX_BYTES = BLOCK  # the writer's pax records (a path of up to 250 bytes, a size) fit in one block
CHECK_BEFORE_DECOMPRESS = 16 << 20  # compressed members up to this size are hashed before zstd sees a byte
_MAX_MTIME = 8**11 - 1
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,3}) (path|size)=")
_PAX_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")


class Sink(Protocol):
    """Receives one file's verified-as-it-goes bytes; `close(ok)` keeps or discards them."""

    def write(self, chunk: bytes, /) -> object: ...

    def close(self, ok: bool) -> None: ...


@dataclass(frozen=True)
class Head:
    """The start of a bundle: manifest bytes as signed, the parsed manifest and the signatures."""

    manifest_bytes: bytes
    manifest: Manifest
    signatures: tuple[Signature, ...]
    signatures_offset: int

    @property
    def manifest_sha256(self) -> str:
        return digest_bytes(self.manifest_bytes).sha256


# ---------------------------------------------------------------- reading

def _padding(size: int) -> int:
    return -size % BLOCK


class _TarStream:
    """A strict, forward-only tar reader over any readable stream (a file, joined volumes, a pipe)."""

    def __init__(self, stream: Readable) -> None:
        self.stream = stream
        self.offset = 0
        self.mtime: int | None = None  # every member's, set by the first header

    def read_exact(self, size: int, what: str) -> bytes:
        data = self.stream.read(size)
        if len(data) < size:
            more = [data]
            got = len(data)
            while got < size:
                chunk = self.stream.read(size - got)
                if not chunk:
                    raise IntegrityError(
                        f"bundle truncated: expected {size} more bytes of {what} at offset {self.offset}, "
                        f"found {got}")
                more.append(chunk)
                got += len(chunk)
            data = b"".join(more)
        self.offset += size
        return data

    def next_member(self) -> tuple[str, int] | None:
        """Name and size of the next regular member, or None at the end of the archive.

        Only the exact header bytes the writer emits are accepted: the header (and pax header, if any)
        is parsed, then written again with `member_header` and compared byte for byte. So every
        numeric field is in its one canonical form, there is at most one pax header of exactly the
        writer's records, and every member has the first member's mtime.
        """
        start = self.offset
        block = self.read_exact(BLOCK, "a tar header")
        if block == bytes(BLOCK):
            self._expect_end()
            return None
        consumed = [block]
        info = self._parse_block(block, start)
        pax: dict[str, str] = {}
        if info.type == tarfile.XHDTYPE:
            pax = self._read_pax(info.size, consumed)
            block = self.read_exact(BLOCK, "a tar header")
            consumed.append(block)
            info = self._parse_block(block, self.offset - BLOCK)
            if info.type == tarfile.XHDTYPE:
                raise FormatError(f"bad tar header at offset {self.offset - BLOCK}: a second pax header in a row")
        name = pax.get("path", info.name)
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise FormatError(
                f"member {name!r} is a {_type_name(info.type)}: only regular files are accepted")
        size = int(pax["size"]) if "size" in pax else info.size
        if self.mtime is None:
            if not isinstance(info.mtime, int) or not 0 <= info.mtime <= _MAX_MTIME:
                raise FormatError(f"bad tar header at offset {start}: mtime {info.mtime} out of range")
            self.mtime = info.mtime
        found = b"".join(consumed)
        expected = member_header(name, size, self.mtime) if _plain_name(name) and size >= 0 else b""
        if found != expected:
            differs = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
                           min(len(found), len(expected)))
            raise FormatError(f"non-canonical tar header for member {name[:300]!r} at offset {start}: byte "
                              f"{differs} differs from the one form airgap writes (docs/FORMAT.md)")
        return name, size

    @staticmethod
    def _parse_block(block: bytes, offset: int) -> tarfile.TarInfo:
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"bad tar header at offset {offset}: {exc}") from exc
        if block[154:156] != b"\0 ":  # tar ignores this byte; we accept only the canonical form
            raise FormatError(f"bad tar header at offset {offset}: non-canonical checksum field")
        return info

    def _read_pax(self, size: int, consumed: list[bytes]) -> dict[str, str]:
        """The writer's pax records: `path` (a long name) and/or `size` (8 GiB and more), in that order."""
        if not 0 <= size <= _MAX_PAX_BYTES:  # tar's base-256 numbers can be negative
            raise FormatError(f"pax header too large: limit {_MAX_PAX_BYTES} bytes, found {size}")
        block = self.read_exact(size + _padding(size), "a pax header")
        consumed.append(block)
        data = block[:size]
        records: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            match = _PAX_RECORD.match(data, pos)
            length = int(match.group(1)) if match else 0
            if match is None or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
                raise FormatError(f"malformed pax header at offset {self.offset}")
            key = match.group(2).decode()
            try:
                value = data[match.end():pos + length - 1].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FormatError(f"malformed pax header at offset {self.offset}") from exc
            if key in records:
                raise FormatError(f"malformed pax header at offset {self.offset}: {key!r} given twice")
            records[key] = value
            pos += length
        if "size" in records and not _PAX_SIZE.fullmatch(records["size"]):
            raise FormatError(f"pax size is not a number: {records['size'][:40]!r}")
        return records

    def _expect_end(self) -> None:
        """The writer ends the archive with exactly two zero blocks, then the file ends."""
        if self.read_exact(BLOCK, "the end of the archive").strip(b"\0") or self.stream.read(1):
            raise FormatError(f"unexpected data after the end of the archive at offset {self.offset}")

    def member_chunks(self, size: int, name: str) -> Iterator[bytes]:
        got = 0
        for chunk in iter_chunks(self.stream, size):
            got += len(chunk)
            yield chunk
        if got < size:
            raise _truncated(name, size, got)
        self._end_member(size, name)

    def _end_member(self, size: int, name: str) -> None:
        self.offset += size
        if self.read_exact(_padding(size), f"padding of {name}").strip(b"\0"):
            raise FormatError(f"non-zero padding after member {name!r} at offset {self.offset}")

    def read_member(self, name: str, size: int) -> bytes:
        return b"".join(self.member_chunks(size, name))


def _truncated(name: str, size: int, got: int) -> IntegrityError:
    return IntegrityError(f"bundle truncated: member {name!r} expected {size} bytes, found {got}")


class _PositionalReader:
    """Reads a regular file at explicit positions (os.pread), never moving the file's own offset."""

    def __init__(self, fd: int, position: int) -> None:
        self.fd = fd
        self.position = position
        self.end = os.fstat(fd).st_size

    def read(self, size: int = -1, /) -> bytes:
        data = os.pread(self.fd, max(0, self.end - self.position) if size < 0 else size, self.position)
        self.position += len(data)
        return data


class _PositionalTar(_TarStream):
    """The strict tar reader over a regular file, able to step over a member's data without reading it."""

    def __init__(self, reader: _PositionalReader, offset: int, mtime: int | None) -> None:
        super().__init__(reader)
        self.reader = reader
        self.offset = offset
        self.mtime = mtime

    def skip_member(self, size: int, name: str) -> int:
        """Step over a member's data (checking that it is all there); return where the data starts."""
        start = self.reader.position
        available = max(0, self.reader.end - start)
        if available < size:
            raise _truncated(name, size, available)
        self.reader.position += size
        self._end_member(size, name)
        return start


def _type_name(kind: bytes) -> str:
    names = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
             tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.DIRTYPE: "directory"}
    return names.get(kind, f"tar member of type {kind!r}")


def read_head(stream: Readable, limits: Limits = DEFAULT_LIMITS,
              authenticate: Authenticate | None = None) -> tuple[Head, _TarStream]:
    """Read manifest and signatures from the start of a bundle; the stream is left at the payload.

    With `authenticate`, the signatures over the raw manifest bytes are checked before the JSON is
    parsed, so an unsigned manifest costs one hash and a few signature checks, never a parse.
    """
    tar = _TarStream(stream)
    manifest_bytes = _read_named(tar, MANIFEST_MEMBER, limits.max_manifest_bytes)
    signatures_offset = tar.offset + BLOCK
    block = _read_named(tar, SIGNATURES_MEMBER, SIGNATURES_BLOCK_SIZE)
    if len(block) != SIGNATURES_BLOCK_SIZE:
        raise FormatError(f"signatures member must be exactly {SIGNATURES_BLOCK_SIZE} bytes, found {len(block)}")
    signatures = decode_signatures(block, limits.max_signatures)
    if authenticate is not None:
        authenticate(manifest_bytes, signatures)
    manifest = parse_manifest(manifest_bytes, limits)
    if tar.mtime != int(manifest.created.timestamp()):
        raise FormatError(f"bundle members are dated {tar.mtime}, expected the manifest's creation time "
                          f"{int(manifest.created.timestamp())}")
    return Head(manifest_bytes, manifest, signatures, signatures_offset), tar


def _read_named(tar: _TarStream, expected: str, limit: int) -> bytes:
    member = tar.next_member()
    if member is None or member[0] != expected:
        found = "end of archive" if member is None else repr(member[0])
        raise FormatError(f"not an airgap bundle: expected member {expected!r}, found {found}")
    if member[1] > limit:
        raise FormatError(f"{expected} too large: limit {limit} bytes, found {member[1]}")
    return tar.read_member(expected, member[1])


def read_head_from_path(path: Path, limits: Limits = DEFAULT_LIMITS) -> Head:
    with path.open("rb") as stream:
        return read_head(stream, limits)[0]


SinkFactory = Callable[[FileEntry], Sink | None]


def read_payload(
    tar: _TarStream,
    manifest: Manifest,
    open_sink: SinkFactory | None = None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Read every payload member once, checking name, size and SHA-256 against the signed manifest.

    `open_sink(entry)` is called in bundle order; a sink gets its file's bytes, then `close(ok)`,
    before the next sink is opened. From a regular file, the tar headers are all checked first (the
    reader steps over the data), then the members that have no sink are hashed in parallel, one per
    core, while those with a sink are streamed in bundle order. From anything else (a pipe, joined
    volumes) every member is streamed in order. Both ways accept and refuse the same bundles.
    """
    position = _file_position(tar.stream)
    if position is not None:
        fd, start = position
        walker = _PositionalTar(_PositionalReader(fd, start), tar.offset, tar.mtime)
        _read_payload_positional(walker, manifest, open_sink, progress)
        tar.stream.seek(walker.reader.position)  # type: ignore[attr-defined]  # as if read to the end
        tar.offset = walker.offset
        return
    for entry, size in _payload_members(tar, manifest):
        sink = None if open_sink is None else open_sink(entry)
        _verify_stream(entry, tar.member_chunks(size, entry.member_name), sink, progress)


def _payload_members(tar: _TarStream, manifest: Manifest) -> Iterator[tuple[FileEntry, int]]:
    """Each payload member's entry and stored size, once its header passed every check.

    The caller reads or steps over exactly that many bytes before asking for the next member.
    SHA256SUMS is checked here; the end of the archive is checked last.
    """
    unsigned = next((e for e in manifest.carried_files if e.storage == "zstd" and e.stored_sha256 is None), None)
    if unsigned is not None:
        raise FormatError(f"bundle of manifest format {manifest.format_version} carries the compressed member "
                          f"{unsigned.path!r} without a signed stored_sha256: rebuild it with this airgap "
                          f"(format 2)")
    expected = {e.member_name: e for e in manifest.carried_files}
    sums_text = manifest.sha256sums_text()
    seen: set[str] = set()
    while (member := tar.next_member()) is not None:
        name, size = member
        if name in seen:
            raise IntegrityError(f"bundle carries {name!r} twice")
        seen.add(name)
        if name == SUMS_MEMBER:
            if tar.read_member(name, min(size, len(sums_text) + 1)) != sums_text or size != len(sums_text):
                raise IntegrityError("SHA256SUMS in the bundle does not match the signed manifest")
            continue
        entry = expected.get(name)
        if entry is None:
            raise IntegrityError(f"bundle carries {name!r}, which the signed manifest does not list")
        if size != entry.stored_size:
            raise IntegrityError(
                f"{entry.path}: manifest says {entry.stored_size} stored bytes, bundle member has {size}")
        yield entry, size
    missing = [e.path for e in manifest.carried_files if e.member_name not in seen]
    if missing:
        raise IntegrityError(f"bundle lacks {len(missing)} file(s) the signed manifest lists, first {missing[0]!r}")
    if SUMS_MEMBER not in seen:
        raise IntegrityError("bundle lacks SHA256SUMS")


def _file_position(stream: Readable) -> tuple[int, int] | None:
    """The descriptor and current offset of a stream that is a regular file, else None."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        if not isinstance(fd, int) or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        position = stream.tell()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the latter
        return None
    return (fd, position) if isinstance(position, int) else None


def _read_payload_positional(
    tar: _PositionalTar, manifest: Manifest, open_sink: SinkFactory | None, progress: Callable[[int], object] | None,
) -> None:
    members = [(entry, tar.skip_member(size, entry.member_name)) for entry, size in _payload_members(tar, manifest)]
    if open_sink is None:  # nothing depends on the order: the biggest first, so that no core idles at the end
        members.sort(key=lambda m: -m[0].stored_size)
    shared = _SharedProgress(progress)
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="airgap-verify")
    jobs: list[tuple[int, Future[None]]] = []
    try:
        for entry, offset in members:
            sink = None if open_sink is None else open_sink(entry)
            chunks = _pread_chunks(tar.reader.fd, offset, entry.stored_size, entry.member_name, cancel)
            if sink is None:
                jobs.append((offset, pool.submit(_verify_stream, entry, chunks, None, shared.advance)))
            else:
                _verify_stream(entry, chunks, sink, shared.advance)
        _first_failure(jobs, cancel)
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _first_failure(jobs: list[tuple[int, Future[None]]], cancel: threading.Event) -> None:
    """Wait for every job; on a failure stop the others, then raise the failure earliest in the bundle."""
    failures: list[tuple[int, BaseException]] = []
    for offset, job in sorted(jobs, key=lambda j: j[0]):
        try:
            job.result()
        except _Cancelled:
            continue
        except CancelledError:
            continue
        except BaseException as exc:
            failures.append((offset, exc))
            cancel.set()
    if failures:
        raise min(failures, key=lambda f: f[0])[1]


class _Cancelled(Exception):
    """Another member already failed: this one stops reading."""


def _pread_chunks(fd: int, offset: int, size: int, name: str, cancel: threading.Event) -> Iterator[bytes]:
    got = 0
    while got < size:
        if cancel.is_set():
            raise _Cancelled
        chunk = os.pread(fd, min(hashing.CHUNK_SIZE, size - got), offset + got)
        if not chunk:
            raise _truncated(name, size, got)  # the file shrank after its headers were read
        got += len(chunk)
        yield chunk


class _SharedProgress:
    """A progress callback that several threads may call."""

    def __init__(self, progress: Callable[[int], object] | None) -> None:
        self.progress = progress
        self.lock = threading.Lock()

    def advance(self, size: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(size)


def _verify_stream(
    entry: FileEntry, chunks: Iterator[bytes], sink: Sink | None, progress: Callable[[int], object] | None,
) -> None:
    """Verify one member's stored bytes; a big one is read ahead and written behind in other threads."""
    big = entry.stored_size >= hashing.PIPELINE_MIN_BYTES
    with Prefetch(chunks) if big else contextlib.nullcontext(chunks) as stored:
        counted: Iterable[bytes] = stored if progress is None else _counting(stored, progress)
        _verify_member(entry, counted, sink, write_behind=big)


def _counting(chunks: Iterable[bytes], progress: Callable[[int], object]) -> Iterator[bytes]:
    for chunk in chunks:
        progress(len(chunk))
        yield chunk


def _verify_member(entry: FileEntry, stored: Iterable[bytes], sink: Sink | None, write_behind: bool = False) -> None:
    chunks = iter(stored)
    stored_hash = None
    if entry.storage == "zstd":
        if entry.stored_sha256 is None:
            raise IntegrityError(f"{entry.path}: compressed member without a signed stored_sha256")
        stored_hash = hashlib.sha256()
        chunks = _hashing(chunks, stored_hash)
        if entry.stored_size <= CHECK_BEFORE_DECOMPRESS:  # all of it, checked, before zstd parses a byte
            held = list(chunks)
            _check_stored(entry, stored_hash)
            chunks = iter(held)
        raw = _decompressed(chunks, entry)
    else:
        raw = _capped(chunks, entry)
    writer = WriteBehind(sink.write) if sink is not None and write_behind else None
    ok = False
    try:
        digest = digest_chunks(raw, None if sink is None else sink.write if writer is None else writer.write)
        if writer is not None:
            writer.finish()
        if stored_hash is not None:  # a big member: hashed in the same read, checked before the sink keeps it
            _check_stored(entry, stored_hash)
        check_digest(entry, digest)
        ok = True
    finally:
        if writer is not None and not ok:
            writer.abandon()
        if sink is not None:
            sink.close(ok)


def _hashing(chunks: Iterator[bytes], hasher: Any) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def _check_stored(entry: FileEntry, hasher: Any) -> None:
    found = hasher.hexdigest()
    if found != entry.stored_sha256:
        raise IntegrityError(f"{entry.path}: compressed member differs from the signed manifest: stored sha256 "
                             f"expected {entry.stored_sha256}, found {found}")


class FileSink:
    """A Sink writing one file: straight to disk where possible, fsynced and kept only if verified."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("wb")
        self.writer = DirectFile(path, self.handle.fileno())

    def write(self, chunk: bytes, /) -> object:
        return self.writer.write(chunk)

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self.writer.finish()
                os.fsync(self.handle.fileno())
        except BaseException:
            ok = False
            raise
        finally:
            self.writer.close()
            self.handle.close()
            if not ok:
                self.path.unlink(missing_ok=True)


def check_digest(entry: FileEntry, digest: Digest) -> None:
    if digest.size != entry.size:
        raise IntegrityError(f"{entry.path}: expected {entry.size} bytes, found {digest.size}")
    if digest.sha256 != entry.sha256:
        raise IntegrityError(f"{entry.path}: sha256 mismatch: expected {entry.sha256}, found {digest.sha256}")


def _capped(chunks: Iterator[bytes], entry: FileEntry) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > entry.size:
            raise IntegrityError(f"{entry.path}: more data than the {entry.size} bytes the manifest declares")
        yield chunk


class _ChunkReader:
    """Adapts an iterator of chunks to the `read(n)` that zstandard's stream reader wants."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def read(self, size: int = -1) -> bytes:
        while not self.buffer:
            chunk = next(self.chunks, None)
            if chunk is None:
                return b""
            self.buffer = chunk
        if size < 0 or size >= len(self.buffer):
            out, self.buffer = self.buffer, b""
        else:
            out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out


def _decompressed(chunks: Iterator[bytes], entry: FileEntry) -> Iterator[bytes]:
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    source = _ChunkReader(chunks)
    try:
        reader_cm = decompressor.stream_reader(cast(BinaryIO, source), read_size=hashing.CHUNK_SIZE,
                                               read_across_frames=True)
        with reader_cm as reader:
            # the manifest's size caps the output: a bomb stops one chunk past the declared size
            yield from _capped(iter_chunks(reader), entry)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{entry.path}: corrupt zstd data: {exc}") from exc
    if source.read(1):
        raise IntegrityError(f"{entry.path}: trailing bytes after the zstd frame")


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class PayloadFile:
    """A file to pack: where it comes from and its draft entry (its hash may not be known yet)."""

    source_path: Path
    entry: DraftFile


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_block(name: bytes, mode: int, size: int, mtime: int, kind: bytes) -> bytes:
    """One ustar header block exactly as the writer emits it (the bytes of Python 3.11's tarfile)."""
    block = b"".join([
        name[:100].ljust(100, b"\0"), _octal(mode, 8), _octal(0, 8), _octal(0, 8), _octal(size, 12),
        _octal(mtime, 12), b" " * 8, kind, bytes(100), b"ustar\x0000", bytes(32 + 32 + 8 + 8 + 155),
    ]).ljust(BLOCK, b"\0")
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _plain_name(name: str) -> bool:
    return name.isascii() and 0 < len(name) <= 300 and "\0" not in name


def member_header(name: str, size: int, mtime: int) -> bytes:
    """The header bytes of one member: a ustar block, after a pax header for a long name or a size of
    8 GiB and more. Written here, not by tarfile, so that the bytes do not change with Python's version;
    the reader compares every header with this function's output."""
    if not _plain_name(name) or not 0 <= mtime <= _MAX_MTIME or size < 0:
        raise ValueError(f"cannot write a tar member {name!r} of {size} bytes at mtime {mtime}")
    encoded = name.encode("ascii")
    records = b""
    if len(encoded) > 100:
        records += _pax_record("path", name)
    if size >= 8**11:
        records += _pax_record("size", str(size))
    header = _ustar_block(encoded, 0o644, 0 if size >= 8**11 else size, mtime, tarfile.REGTYPE)
    if not records:
        return header
    pax = _ustar_block(b"././@PaxHeader", 0, len(records), 0, tarfile.XHDTYPE)
    return pax + records + bytes(_padding(len(records))) + header


def member_bytes(name: str, data: bytes, mtime: int) -> bytes:
    return member_header(name, len(data), mtime) + data + bytes(_padding(len(data)))


class _HashingWriter:
    """Passes writes on to `target`, hashing them: the SHA-256 of a compressed member, as written."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.hasher = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self.hasher.update(data)
        return self.target.write(data)


def prepare_entry(path: Path, entry: DraftFile, workdir: Path, compress: bool = True) -> PayloadFile:
    """Compress a compressible file into `workdir` if that saves enough; hash only if it was read anyway."""
    size = path.stat().st_size
    if entry.kind == "model" or size == 0 or not compress:
        return PayloadFile(path, replace(entry, size=size, storage="raw", stored_size=size))
    packed = workdir / f"{len(list(workdir.iterdir()))}.zst"
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    with path.open("rb") as source, packed.open("wb") as target:
        hashed = _HashingWriter(target)
        with compressor.stream_writer(cast(BinaryIO, hashed), size=size, closefd=False) as writer:
            digest = digest_chunks(iter_chunks(source), writer.write)
    stored_size = packed.stat().st_size
    entry = replace(entry, size=digest.size, sha256=digest.sha256)
    if stored_size > COMPRESS_MAX_RATIO * digest.size:
        packed.unlink()
        return PayloadFile(path, replace(entry, storage="raw", stored_size=digest.size))
    return PayloadFile(packed, replace(entry, storage="zstd", stored_size=stored_size,
                                       stored_sha256=hashed.hasher.hexdigest()))


@dataclass(frozen=True)
class LateFile:
    """A raw payload file written last, made from the final entries (with hashes) of every other file.

    `entry` gives its path and size; `make` must return exactly that many bytes whatever the hashes are
    (fixed-width hex), because the head that lists it is reserved before the payload is hashed.
    """

    entry: DraftFile
    make: Callable[[Sequence[FileEntry]], bytes]


def write_bundle(
    out_path: Path,
    draft: Manifest,
    payload: Sequence[PayloadFile],
    sign_manifest: Callable[[bytes], Sequence[Signature]],
    progress: Callable[[int], object] | None = None,
    absent: Sequence[FileEntry] = (),
    late: LateFile | None = None,
) -> Head:
    """Write the bundle in one pass over each payload file, then fill in the head reserved for it.

    Raw files are hashed while they are copied; the manifest's length does not depend on the hashes
    (fixed-width hex), so the space it needs at the start is known before the payload is written.
    `absent` entries (files an update drop leaves to its base) are listed after the carried ones.
    The draft's own `files` are not used: the payload, `late` and `absent` are the files.
    """
    mtime = int(draft.created.timestamp())
    lates = () if late is None else (late.entry,)
    head_size = _head_size([*(p.entry for p in payload), *lates, *absent], draft)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        with tmp.open("wb") as out:
            final_entries = write_payload(tmp, out.fileno(), head_size, payload, mtime, progress, late, absent)
            manifest = replace(draft, files=(*final_entries, *absent)).with_sha256sums()
            head = _write_head(out, manifest, sign_manifest, mtime, head_size)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return head


def write_payload(
    path: Path, fd: int, offset: int, payload: Sequence[PayloadFile], mtime: int,
    progress: Callable[[int], object] | None = None, late: LateFile | None = None,
    absent: Sequence[FileEntry] = (),
) -> list[FileEntry]:
    """Write the payload members and the end of the archive into `path` (open as `fd`) from `offset` on.

    Reading, hashing and writing overlap: a reader thread per big file, the hashing in this thread,
    one writer thread sending the bytes straight to disk. Returns the entries with raw files' hashes.
    """
    direct = DirectFile(path, fd, offset)
    try:
        with WriteBehind(direct.write) as writer:
            entries = [_pack_member(writer.write, item, mtime, progress) for item in payload]
            if late is not None:
                entries.append(_pack_late(writer.write, late, [*entries, *absent], mtime))
            writer.write(bytes(2 * BLOCK))
        direct.finish()
    finally:
        direct.close()
    return entries


def _head_size(files: Sequence[FileEntry | DraftFile], draft: Manifest) -> int:
    return (_member_size(MANIFEST_MEMBER, manifest_size(draft, files))
            + _member_size(SIGNATURES_MEMBER, SIGNATURES_BLOCK_SIZE)
            + _member_size(SUMS_MEMBER, sha256sums_size(files)))


def _member_size(name: str, size: int) -> int:
    return len(member_header(name, size, 0)) + size + _padding(size)


def _write_head(
    out: BinaryIO, manifest: Manifest, sign_manifest: Callable[[bytes], Sequence[Signature]], mtime: int,
    head_size: int,
) -> Head:
    manifest_bytes = manifest.to_bytes()
    signatures = tuple(sign_manifest(manifest_bytes))
    manifest_member = member_bytes(MANIFEST_MEMBER, manifest_bytes, mtime)
    head = (manifest_member + member_bytes(SIGNATURES_MEMBER, encode_signatures(signatures), mtime)
            + member_bytes(SUMS_MEMBER, manifest.sha256sums_text(), mtime))
    if len(head) != head_size:
        raise AssertionError(f"bundle head is {len(head)} bytes, {head_size} were reserved")
    out.seek(0)
    out.write(head)
    return Head(manifest_bytes, manifest, signatures, len(manifest_member) + BLOCK)


def _pack_member(write: Callable[[bytes], object], item: PayloadFile, mtime: int,
                 progress: Callable[[int], object] | None) -> FileEntry:
    entry = item.entry
    write(member_header(entry.member_name, entry.stored_size, mtime))

    def sink(chunk: bytes) -> None:
        write(chunk)
        if progress is not None:
            progress(len(chunk))

    with item.source_path.open("rb", buffering=0) as source:
        chunks = iter_chunks(source)
        if entry.stored_size < hashing.PIPELINE_MIN_BYTES:
            stored = digest_chunks(chunks, sink)
        else:
            with Prefetch(chunks) as ahead:
                stored = digest_chunks(ahead, sink)
    if stored.size != entry.stored_size or (entry.storage == "zstd" and stored.sha256 != entry.stored_sha256):
        raise IntegrityError(f"{item.source_path} changed while packing: expected {entry.stored_size} bytes "
                             f"(sha256 {entry.stored_sha256}), found {stored.size} (sha256 {stored.sha256})")
    write(bytes(_padding(stored.size)))
    return entry.hashed(stored.sha256 if entry.storage == "raw" else None)


def _pack_late(write: Callable[[bytes], object], late: LateFile, before: Sequence[FileEntry], mtime: int) -> FileEntry:
    data = late.make(before)
    if len(data) != late.entry.size:
        raise AssertionError(f"{late.entry.path} is {len(data)} bytes, {late.entry.size} were reserved")
    write(member_header(late.entry.member_name, len(data), mtime))
    write(data)
    write(bytes(_padding(len(data))))
    return replace(late.entry, storage="raw", stored_size=len(data)).hashed(digest_bytes(data).sha256)


def add_signatures(path: Path, new: Sequence[Signature], limits: Limits = DEFAULT_LIMITS) -> Head:
    """Add co-signatures in place: the signatures block has a fixed size, so no byte moves.

    read_head accepts only a signatures member of exactly that size in its canonical form, so the
    block written here replaces exactly the bytes of the old one and nothing else.
    """
    with path.open("r+b") as stream:
        head, _ = read_head(stream, limits)
        merged = {s.keyid: s for s in head.signatures} | {s.keyid: s for s in new}
        block = encode_signatures(merged.values())
        if len(block) != SIGNATURES_BLOCK_SIZE:  # encode_signatures pads to it; never write past the member
            raise AssertionError(f"signatures block is {len(block)} bytes, the member holds {SIGNATURES_BLOCK_SIZE}")
        stream.seek(head.signatures_offset)
        stream.write(block)
        stream.flush()
        os.fsync(stream.fileno())
    return replace(head, signatures=tuple(sorted(merged.values(), key=lambda s: s.keyid)))


def scratch_dir(near: Path) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder on the same file system as `near`, so renames out of it are atomic."""
    near.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".airgap-", dir=near)
