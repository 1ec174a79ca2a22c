"""Cut a bundle into volumes (split), or put it on a stick verified (copy), resuming where a copy stopped.

Both read the source once as a stream (a bundle file, or volumes checked and, if need be, repaired on the
way), write each data volume, and compute the recovery volumes from the data volumes just written, so a
damaged source is never copied into a set whose index would call it good. `copy` also checks free space
first, syncs every volume, reads it back from the device (the page cache is dropped first) and compares
hashes, and writes the operator's sheet. A volume already correct on the destination is compared, not
rewritten; a partly written one is rewritten from the first byte that differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from airgap.bundle.container import Head, read_head
from airgap.errors import VolumeError
from airgap.format.manifest import format_time
from airgap.progress import byte_progress
from airgap.streams.atomic import fsync_dir, write_atomic
from airgap.streams.pipeline import CHUNK_SIZE, iter_chunks
from airgap.templates import render
from airgap.volumes.fsutil import (
    FAT_MAX_FILE,
    auto_volume_size,
    describe_os_error,
    drop_cache,
    free_bytes,
    max_file_size,
)
from airgap.volumes.index import (
    DEFAULT_INDEX_LIMITS,
    SEGMENT_SIZE,
    VolumeFile,
    VolumeIndex,
    check_bundle_file,
    format_size,
    index_name,
    plan_volume_sizes,
    recovery_name,
    volume_name,
)
from airgap.volumes.parity import ParityCode, check_share_count, stripe_size_for
from airgap.volumes.reader import BundleStream, locate_bundle, open_bundle

README_NAME = "README.txt"
PROBE_NAME = "probe.py"  # airgap.hardware.probe, runnable on the isolated host before airgap is installed there
AfterWrite = Callable[[Path], object]
VolumeSize = int | None | Literal["auto"]
_INDEX_SLACK = 1 << 20  # index and README, on top of the volumes, in the free-space check


@dataclass(frozen=True)
class CopyReport:
    index: VolumeIndex
    dest_dir: Path
    written: tuple[str, ...]  # files written (in full or from where a previous copy stopped) and verified
    unchanged: tuple[str, ...]  # files found correct on the destination and left as they were
    readme: Path | None
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class _Source:
    path: Path
    bundle_file: str
    size: int
    head: Head


def split_bundle(
    bundle: Path, out_dir: Path, volume_size: int | None, parity: int = 0, *,
    segment_size: int = SEGMENT_SIZE, progress: bool = False,
) -> VolumeIndex:
    """Cut a bundle (a file, or an existing volume set) into volumes of at most `volume_size` bytes."""
    return _VolumeSetWriter(_source(bundle), out_dir, volume_size, parity, segment_size,
                            verify=False, progress=progress, after_write=None).run().index


def copy_bundle(
    source: Path, dest_dir: Path, volume_size: VolumeSize = "auto", parity: int = 0, progress: bool = True, *,
    after_write: AfterWrite | None = None, segment_size: int = SEGMENT_SIZE,
) -> CopyReport:
    """Write a bundle's volumes, index and README.txt into `dest_dir`, each volume synced and read back.

    `after_write(path)` runs between a volume's sync and its read-back; tests use it to damage the copy.
    """
    if locate_bundle(source).parent.resolve() == dest_dir.resolve():
        raise VolumeError(f"source and destination are the same folder: {dest_dir}")
    src = _source(source)
    dest_dir.mkdir(parents=True, exist_ok=True)
    size = auto_volume_size(dest_dir) if volume_size == "auto" else volume_size
    return _VolumeSetWriter(src, dest_dir, size, parity, segment_size, verify=True, progress=progress,
                            after_write=after_write).run()


def _source(path: Path) -> _Source:
    target = locate_bundle(path)
    with open_bundle(path) as stream:
        head, _ = read_head(stream)
        index = stream.index
    name = index.bundle_file if index is not None else check_bundle_file(target.name)
    return _Source(path, name, stream.size, head)


class _VolumeSetWriter:
    def __init__(self, source: _Source, dest: Path, volume_size: int | None, parity: int, segment_size: int, *,
                 verify: bool, progress: bool, after_write: AfterWrite | None) -> None:
        self.source = source
        self.dest = dest
        self.sizes = plan_volume_sizes(source.size, volume_size)
        self.volume_size = self.sizes[0]
        if len(self.sizes) > DEFAULT_INDEX_LIMITS.max_volumes:
            raise VolumeError(f"{len(self.sizes)} volumes of {volume_size} bytes: at most "
                              f"{DEFAULT_INDEX_LIMITS.max_volumes} volumes; use larger volumes")
        if parity:
            check_share_count(len(self.sizes), parity)
        self.parity = parity
        if segment_size & (segment_size - 1) or segment_size < 4096:
            raise VolumeError(f"segment size must be a power of two of at least 4096, found {segment_size}")
        self.segment_size = segment_size
        self.verify = verify
        self.progress = progress
        self.after_write = after_write
        count = len(self.sizes)
        self.data_names = [volume_name(source.bundle_file, i + 1, count) for i in range(count)]
        self.recovery_names = [recovery_name(source.bundle_file, r + 1) for r in range(parity)]
        self.written: list[str] = []
        self.unchanged: list[str] = []
        self.bytes_written = 0
        self.current = ""

    def run(self) -> CopyReport:
        started = time.monotonic()
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self._check_room()
            self._remove_stale()
            total = (sum(self.sizes) + self.parity * self.volume_size) * (2 if self.verify else 1)
            total += sum(self.sizes) if self.parity else 0
            with byte_progress(total, f"{'copying' if self.verify else 'splitting'} {self.source.bundle_file}",
                               self.progress) as advance:
                volumes, bundle_sha256 = self._write_data(advance)
                recovery = self._write_recovery(advance)
            index = VolumeIndex(
                bundle_file=self.source.bundle_file, bundle_size=self.source.size, bundle_sha256=bundle_sha256,
                manifest_sha256=self.source.head.manifest_sha256, bundle_name=self.source.head.manifest.name,
                bundle_version=self.source.head.manifest.version, volume_size=self.volume_size,
                segment_size=self.segment_size, volumes=tuple(volumes), recovery=tuple(recovery),
                stripe_size=stripe_size_for(len(volumes), self.segment_size) if recovery else 0)
            self.current = index.index_name
            write_atomic(self.dest / index.index_name, index.to_bytes())
            readme = None
            if self.verify:
                self.current = PROBE_NAME
                probe_text = probe_source()
                write_atomic(self.dest / PROBE_NAME, probe_text)
                readme = self.dest / README_NAME
                self.current = README_NAME
                write_atomic(readme, render_readme(index, self.source.head, hashlib.sha256(probe_text).hexdigest())
                             .encode())
            fsync_dir(self.dest)
        except OSError as exc:
            raise VolumeError(f"writing {self.current or self.dest} in {self.dest} failed: "
                              f"{describe_os_error(exc)}; run the same command again to finish") from exc
        return CopyReport(index, self.dest, tuple(self.written), tuple(self.unchanged), readme, self.bytes_written,
                          time.monotonic() - started)

    # ---------------------------------------------------------------- before writing

    def _planned(self) -> dict[str, int]:
        planned = dict(zip(self.data_names, self.sizes, strict=True))
        planned.update((name, self.volume_size) for name in self.recovery_names)
        return planned

    def _check_room(self) -> None:
        limit = max_file_size(self.dest)
        if limit is not None and self.volume_size > limit:
            raise VolumeError(f"{self.dest} is on FAT, whose files must be under 4 GiB: volumes of "
                              f"{format_size(self.volume_size)} do not fit; use --volume-size auto or at most "
                              f"{format_size(FAT_MAX_FILE)}")
        planned = self._planned()
        needed = _INDEX_SLACK
        for name, size in planned.items():
            needed += max(0, size - _existing_size(self.dest / name))
        needed -= sum(_existing_size(p) for p in self._stale())
        free = free_bytes(self.dest)
        if needed > free:
            raise VolumeError(f"not enough space in {self.dest}: the volumes need {format_size(needed)} more, "
                              f"{format_size(free)} free")

    def _stale(self) -> list[Path]:
        """Leftovers of an earlier split of this bundle, which `cat NAME.[0-9]*` would otherwise pick up."""
        planned = self._planned()
        pattern = re.compile(re.escape(self.source.bundle_file) + r"\.(?:[0-9]{3,}|r[0-9]{2})")
        stale = [p for p in self.dest.iterdir() if pattern.fullmatch(p.name) and p.name not in planned]
        index = self.dest / index_name(self.source.bundle_file)
        return [*stale, index] if index.exists() else stale

    def _remove_stale(self) -> None:
        # the old index goes first: an interrupted copy must not look complete
        for path in sorted(self._stale(), key=lambda p: not p.name.endswith(".json")):
            self.current = path.name
            path.unlink()
        fsync_dir(self.dest)

    # ---------------------------------------------------------------- data volumes

    def _write_data(self, advance: Callable[[int], object]) -> tuple[list[VolumeFile], str]:
        bundle_hash = hashlib.sha256()
        volumes = []
        with open_bundle(self.source.path) as stream:
            for name, size in zip(self.data_names, self.sizes, strict=True):
                self.current = name
                writer = _VolumeWriter(self.dest / name, size, self.segment_size)
                try:
                    for chunk in _exactly(stream, size, name):
                        bundle_hash.update(chunk)
                        writer.feed(chunk)
                        advance(len(chunk))
                    volumes.append(self._finish(writer, advance))
                finally:
                    writer.close()
        return volumes, bundle_hash.hexdigest()

    def _finish(self, writer: _VolumeWriter, advance: Callable[[int], object]) -> VolumeFile:
        entry = writer.finish()
        if writer.changed:
            self.written.append(entry.name)
            self.bytes_written += writer.written
            if self.verify:
                if self.after_write is not None:
                    self.after_write(writer.path)
                _read_back(writer.path, entry, advance)
        else:
            self.unchanged.append(entry.name)
            advance(entry.size)  # compared against the device while feeding: already verified
        return entry

    # ---------------------------------------------------------------- recovery volumes

    def _write_recovery(self, advance: Callable[[int], object]) -> list[VolumeFile]:
        if not self.parity:
            return []
        k = len(self.sizes)
        code = ParityCode(k, self.parity)
        stripe = stripe_size_for(k, self.segment_size)
        self.current = ", ".join(self.recovery_names)
        writers = [_VolumeWriter(self.dest / name, self.volume_size, self.segment_size)
                   for name in self.recovery_names]
        fds = [os.open(self.dest / name, os.O_RDONLY) for name in self.data_names]
        try:
            for offset in range(0, self.volume_size, stripe):
                length = min(stripe, self.volume_size - offset)
                blocks = [_read_block(fd, size, offset, length) for fd, size in zip(fds, self.sizes, strict=True)]
                advance(sum(min(length, max(0, size - offset)) for size in self.sizes))
                for writer, block in zip(writers, code.encode(blocks), strict=True):
                    writer.feed(block)
                    advance(len(block))
            return [self._finish(writer, advance) for writer in writers]
        finally:
            for fd in fds:
                os.close(fd)
            for writer in writers:
                writer.close()


def _exactly(stream: BundleStream, size: int, name: str) -> Iterator[bytes]:
    got = 0
    for chunk in iter_chunks(stream, size):
        got += len(chunk)
        yield chunk
    if got != size:
        raise VolumeError(f"the source ended early: {name} expected {size} bytes, found {got}")


def _read_block(fd: int, size: int, offset: int, length: int) -> bytes:
    want = max(0, min(length, size - offset))
    data = os.pread(fd, want, offset) if want else b""
    if len(data) != want:
        raise VolumeError(f"a data volume shrank while its recovery data was computed (at byte {offset})")
    return data + bytes(length - want)


def _existing_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _VolumeWriter:
    """Writes one volume in place: bytes already equal on the device are compared and left, the rest written."""

    def __init__(self, path: Path, size: int, segment_size: int) -> None:
        self.path = path
        self.size = size
        self.segment_size = segment_size
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.existing = os.fstat(self.fd).st_size
        drop_cache(self.fd)  # compare with what the device holds, not with what the cache remembers
        self.offset = 0
        self.same = self.existing > 0
        self.written = 0
        self.truncated = False
        self.hasher = hashlib.sha256()
        self.segment_hasher = hashlib.sha256()
        self.segment_fill = 0
        self.segments: list[str] = []

    def feed(self, chunk: bytes) -> None:
        assert self.fd is not None
        self._hash(chunk)
        view = memoryview(chunk)
        if self.same:
            overlap = max(0, min(len(chunk), self.existing - self.offset))
            if overlap and os.pread(self.fd, overlap, self.offset) == view[:overlap]:
                self.offset += overlap
                view = view[overlap:]
            self.same = not view
        while view:
            done = os.pwrite(self.fd, view, self.offset)
            view = view[done:]
            self.offset += done
            self.written += done

    def _hash(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.segment_size - self.segment_fill)
            self.segment_hasher.update(view[:take])
            self.segment_fill += take
            view = view[take:]
            if self.segment_fill == self.segment_size:
                self.segments.append(self.segment_hasher.hexdigest())
                self.segment_hasher = hashlib.sha256()
                self.segment_fill = 0

    @property
    def changed(self) -> bool:
        return self.written > 0 or self.truncated

    def finish(self) -> VolumeFile:
        assert self.fd is not None
        if self.offset != self.size:
            raise VolumeError(f"{self.path.name}: expected {self.size} bytes, {self.offset} were produced")
        if self.segment_fill or not self.segments:
            self.segments.append(self.segment_hasher.hexdigest())
        if self.existing > self.size:
            os.ftruncate(self.fd, self.size)
            self.truncated = True
        if self.changed:
            os.fsync(self.fd)
        self.close()
        return VolumeFile(self.path.name, self.size, self.hasher.hexdigest(), tuple(self.segments))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_back(path: Path, entry: VolumeFile, advance: Callable[[int], object]) -> None:
    """Read the volume again from the device and compare it with what was written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cache(fd)
        hasher = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, CHUNK_SIZE):
            hasher.update(chunk)
            size += len(chunk)
            advance(len(chunk))
    finally:
        os.close(fd)
    if size != entry.size or hasher.hexdigest() != entry.sha256:
        raise VolumeError(
            f"read-back of {path.name} from {path.parent} differs from what was written: expected {entry.size} "
            f"bytes with sha256 {entry.sha256[:16]}..., found {size} bytes with sha256 {hasher.hexdigest()[:16]}... "
            "(failing device?); run the same command again to rewrite it")


# ---------------------------------------------------------------- the operator's sheet

def probe_source() -> bytes:
    """The bytes of airgap/hardware/probe.py, the stdlib-only host probe an operator runs with `python3 probe.py`."""
    from airgap.hardware import probe

    return Path(probe.__file__).read_bytes()


def render_readme(index: VolumeIndex, head: Head, probe_sha256: str | None = None) -> str:
    manifest = head.manifest
    sizes = {e.path: e.size for e in manifest.files}
    models = [{"id": m.id, "size": format_size(sum(sizes.get(f, 0) for f in m.files)), "files": list(m.files)}
              for m in manifest.models]
    return render(
        "README.txt.j2", index=index, name=manifest.name, version=manifest.version,
        created=format_time(manifest.created), expires=format_time(manifest.expires), models=models,
        keyids=sorted(s.keyid for s in head.signatures), total_size=format_size(index.bundle_size),
        volume_glob=f"{index.bundle_file}.[0-9]*", first_volume=index.volumes[0].name,
        files=[{"name": v.name, "size": v.size, "sha256": v.sha256} for v in index.files]
        + ([{"name": PROBE_NAME, "size": 0, "sha256": probe_sha256}] if probe_sha256 else []),
        probe_name=PROBE_NAME if probe_sha256 else None,
    )
