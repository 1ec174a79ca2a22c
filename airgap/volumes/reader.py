"""Read a bundle from one file, or from its volumes as one stream, without joining them anywhere.

The stream hands out a volume's bytes one segment at a time, and only after that segment's SHA-256
matched the index: a damaged or foreign volume is named before any of its bytes reach the installer.
With recovery volumes, a damaged segment is rebuilt in memory from the same segment of the other
volumes (stripe by stripe) and the stream goes on: nothing is restarted, nothing is written to the
host's disk, the stick is read once when nothing is damaged. Missing and truncated volumes are found
before the first byte is handed out (sizes are checked up front), and rebuilt segment by segment.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from airgap.bundle.container import read_head
from airgap.errors import AirgapError, VolumeError
from airgap.streams.pipeline import CHUNK_SIZE, iter_chunks
from airgap.volumes.fsutil import describe_os_error
from airgap.volumes.index import (
    DEFAULT_INDEX_LIMITS,
    INDEX_SUFFIX,
    VOLUME_NAME_RE,
    IndexLimits,
    VolumeIndex,
    index_name,
    read_index,
)
from airgap.volumes.parity import ParityCode


@dataclass(frozen=True)
class Repair:
    """A volume whose damaged bytes were rebuilt from the recovery volumes while reading."""

    volume: str
    reason: str
    rebuilt_bytes: int

    def __str__(self) -> str:
        return f"{self.volume}: {self.reason}; rebuilt {self.rebuilt_bytes} bytes from the recovery volumes"


class BundleStream:
    """A bundle's bytes in order, from a single file or verified volumes; `.read(n)` fills n bytes until the end."""

    def __init__(self, chunks: Generator[bytes, None, None], size: int, index: VolumeIndex | None,
                 repairs: dict[int, Repair] | None = None) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._pos = 0
        self.size = size
        self.index = index
        self._repairs = repairs if repairs is not None else {}

    @property
    def repaired(self) -> list[Repair]:
        """Volumes rebuilt so far, in volume order; complete once the stream has been read to its end."""
        repairs = dict(self._repairs)  # filled by the read-ahead thread
        return [repairs[k] for k in sorted(repairs)]

    def close(self) -> None:
        """Stop reading (and the read-ahead); later reads return nothing."""
        self._chunks.close()

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        parts: list[bytes] = []
        want = size
        while want > 0:
            if self._pos >= len(self._buffer):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._buffer, self._pos = chunk, 0
            if self._pos == 0 and want >= len(self._buffer):
                piece = self._buffer  # whole chunk: no copy
            else:
                piece = self._buffer[self._pos:self._pos + want]
            self._pos += len(piece)
            want -= len(piece)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def locate_bundle(path: Path) -> Path:
    """The single bundle file or the volume index that `path` (bundle, any volume, index or folder) names."""
    if path.is_dir():
        return _locate_in_folder(path)
    if path.name.endswith(INDEX_SUFFIX):
        return path
    match = VOLUME_NAME_RE.fullmatch(path.name)
    if match:  # a volume: only its index says what the others are, and reading it alone would be wrong
        return path.with_name(index_name(match.group("bundle")))
    if path.is_file():
        return path
    beside = path.with_name(index_name(path.name))
    if beside.exists():
        return beside
    raise VolumeError(f"{path} not found: expected a bundle file, one of its volumes, its index or their folder")


def _locate_in_folder(folder: Path) -> Path:
    indexes = sorted(p for p in folder.glob(f"*{INDEX_SUFFIX}") if p.is_file())
    if len(indexes) == 1:
        return indexes[0]
    bundles = sorted(p for p in folder.glob("*.airgap") if p.is_file())
    if not indexes and len(bundles) == 1:
        return bundles[0]
    found = indexes or bundles
    if not found:
        volumes = [p.name for p in folder.iterdir() if VOLUME_NAME_RE.fullmatch(p.name)]
        if volumes:
            raise VolumeError(f"{folder} holds volumes ({sorted(volumes)[0]}...) but no {INDEX_SUFFIX} index: "
                              "the copy is incomplete, re-run airgap copy")
        raise VolumeError(f"{folder} holds no bundle: expected NAME.airgap or NAME.airgap{INDEX_SUFFIX}")
    names = ", ".join(p.name for p in found[:5])
    raise VolumeError(f"{folder} holds {len(found)} bundles ({names}): name the one to use")


@contextmanager
def open_bundle(path: Path, limits: IndexLimits = DEFAULT_INDEX_LIMITS) -> Iterator[BundleStream]:
    """Open a bundle given as one file, any of its volumes, its index or their folder.

    Missing or truncated volumes that cannot be rebuilt raise VolumeError here, before any byte is read.
    """
    target = locate_bundle(path)
    if not target.name.endswith(INDEX_SUFFIX):
        try:
            handle = target.open("rb")
        except OSError as exc:
            raise VolumeError(f"cannot open {target}: {describe_os_error(exc)}") from exc
        with handle:
            yield BundleStream(_file_chunks(handle), os.fstat(handle.fileno()).st_size, None)
        return
    index = read_index(target, limits)
    reader = _VolumeReader(target.parent, index)
    try:
        reader.check_head()
        stream = BundleStream(reader.chunks(), index.bundle_size, index, reader.repairs)
        try:
            yield stream
        finally:
            stream.close()
    finally:
        reader.close()


@dataclass(frozen=True)
class VolumeScan:
    """Every file of a volume set, recovery volumes included, checked against the index."""

    index: VolumeIndex
    damaged: tuple[tuple[str, str], ...]  # (which volume, what is wrong), in volume order

    @property
    def readable(self) -> bool:
        """Whole, or damaged in no more volumes than the recovery volumes can rebuild."""
        return len(self.damaged) <= len(self.index.recovery)


def scan_volumes(path: Path, progress: Callable[[int], object] | None = None,
                 limits: IndexLimits = DEFAULT_INDEX_LIMITS) -> VolumeScan:
    """Read every volume and recovery volume once and report each damaged one (streaming never reads
    the recovery volumes unless it must, so this is how to know they are still good)."""
    target = locate_bundle(path)
    if not target.name.endswith(INDEX_SUFFIX):
        raise VolumeError(f"{target} is a single bundle file, not a volume set")
    index = read_index(target, limits)
    reader = _VolumeReader(target.parent, index, refuse_unrepairable=False)
    damaged: list[tuple[str, str]] = []
    try:
        for share, entry in enumerate(index.files):
            if share in reader.problems:
                damaged.append((index.describe(share), reader.problems[share]))
                continue
            reasons = []
            for segment in range(len(entry.segments)):
                chunks, reason = reader._read_checked(share, segment)
                if chunks is None:
                    reasons.append(reason)
                if progress is not None:
                    progress(sum(len(c) for c in chunks or ()))
            if reasons:
                more = f" (and {len(reasons) - 1} more damaged segment(s))" if len(reasons) > 1 else ""
                damaged.append((index.describe(share), reasons[0] + more))
    finally:
        reader.close()
    return VolumeScan(index, tuple(damaged))


def _file_chunks(handle: BinaryIO) -> Generator[bytes, None, None]:
    yield from iter_chunks(handle)


class _Unreadable(Exception):
    def __init__(self, share: int) -> None:
        self.share = share


class _VolumeReader:
    """Verified segments of the data volumes, in order, rebuilding damaged ones from recovery volumes."""

    def __init__(self, folder: Path, index: VolumeIndex, refuse_unrepairable: bool = True) -> None:
        self.folder = folder
        self.index = index
        self.code = ParityCode(len(index.volumes), len(index.recovery)) if index.recovery else None
        self.repairs: dict[int, Repair] = {}
        self.bad: set[tuple[int, int]] = set()  # (share, segment) known to be damaged
        self._fds: dict[int, int] = {}
        self.problems = self._survey()
        if refuse_unrepairable:
            self._refuse_unrepairable()

    # ---------------------------------------------------------------- up front

    def _survey(self) -> dict[int, str]:
        """Shares that are missing or of the wrong size, with the reason, from one stat each."""
        problems: dict[int, str] = {}
        for share, entry in enumerate(self.index.files):
            try:
                size = (self.folder / entry.name).stat().st_size
            except FileNotFoundError:
                problems[share] = f"missing from {self.folder}"
                continue
            except OSError as exc:
                problems[share] = f"cannot be read: {describe_os_error(exc)}"
                continue
            if size < entry.size:
                problems[share] = f"truncated: expected {entry.size} bytes, found {size}"
            elif size > entry.size:
                problems[share] = (f"expected {entry.size} bytes, found {size} "
                                   "(from another bundle or build?)")
        return problems

    def _refuse_unrepairable(self) -> None:
        data_problems = {s: r for s, r in self.problems.items() if s < len(self.index.volumes)}
        if not data_problems:
            return
        recovery = len(self.index.recovery)
        if len(self.problems) <= recovery:
            return
        details = "; ".join(f"{self.index.describe(s)}: {r}" for s, r in sorted(self.problems.items()))
        if not recovery:
            count = len(self.problems)
            raise VolumeError(details if count == 1 else f"{count} volumes damaged: {details}")
        raise VolumeError(f"{len(self.problems)} volumes damaged, the {recovery} recovery volume(s) can rebuild at "
                          f"most {recovery}: {details}")

    def check_head(self) -> None:
        """Refuse an index and volumes from different builds with a message that says so."""
        try:
            head, _ = read_head(BundleStream(self._raw_chunks(), self.index.bundle_size, None))
        except (AirgapError, OSError):
            return  # unreadable head: the segment hashes will name the damaged volume
        if head.manifest_sha256 == self.index.manifest_sha256:
            return
        if self.index.recovery and any(self._read_checked(share, 0)[0] is not None
                                       for share in range(len(self.index.files)) if share not in self.problems):
            return  # other volumes of this build are here: volume 1 is damaged, and may be rebuilt
        raise VolumeError(
            f"{self.index.index_name} was made for manifest {self.index.manifest_sha256[:16]}... "
            f"({self.index.bundle_name} {self.index.bundle_version}), volume 1 carries manifest "
            f"{head.manifest_sha256[:16]}... ({head.manifest.name} {head.manifest.version}): "
            "the index and the volumes come from different builds")

    def _raw_chunks(self) -> Generator[bytes, None, None]:
        for share, entry in enumerate(self.index.volumes):
            fd = self._fd(share)
            for offset in range(0, entry.size, CHUNK_SIZE):
                yield os.pread(fd, min(CHUNK_SIZE, entry.size - offset), offset)

    # ---------------------------------------------------------------- streaming

    def chunks(self) -> Generator[bytes, None, None]:
        """Verified segments in order, read and hashed one segment ahead in a thread.

        hashlib and pread release the GIL, so checking segment n+1 overlaps with the consumer hashing
        and writing segment n: on two cores the volumes' own check costs almost no time.
        """
        ahead: queue.Queue[tuple[list[bytes] | None, BaseException | None]] = queue.Queue(maxsize=1)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(ahead, stop), name="airgap-volumes", daemon=True)
        worker.start()
        try:
            while True:
                chunks, error = ahead.get()
                if error is not None:
                    raise error
                if chunks is None:
                    return
                yield from chunks
        finally:
            stop.set()
            while worker.is_alive():
                with contextlib.suppress(queue.Empty):
                    ahead.get(timeout=0.05)
            worker.join()

    def _produce(self, ahead: queue.Queue[tuple[list[bytes] | None, BaseException | None]],
                 stop: threading.Event) -> None:
        def put(item: tuple[list[bytes] | None, BaseException | None]) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for share, entry in enumerate(self.index.volumes):
                for segment in range(len(entry.segments)):
                    if not put((self._segment(share, segment), None)):
                        return
            put((None, None))
        except BaseException as exc:  # handed to the consumer, raised where the damaged bytes would have been
            put((None, exc))

    def _segment(self, share: int, segment: int) -> list[bytes]:
        reason = self.problems.get(share)
        if reason is None:
            chunks, reason = self._read_checked(share, segment)
            if chunks is not None:
                return chunks
        self.bad.add((share, segment))
        if self.code is None:
            raise VolumeError(f"{self.index.describe(share)}: {reason}")
        return self._rebuild(share, segment, reason)

    def _span(self, share: int, segment: int) -> tuple[int, int]:
        size = self.index.files[share].size
        start = segment * self.index.segment_size
        return start, min(start + self.index.segment_size, size)

    def _read_checked(self, share: int, segment: int) -> tuple[list[bytes] | None, str]:
        start, end = self._span(share, segment)
        chunks: list[bytes] = []
        hasher = hashlib.sha256()
        try:
            fd = self._fd(share)
            for offset in range(start, end, CHUNK_SIZE):
                chunk = os.pread(fd, min(CHUNK_SIZE, end - offset), offset)
                if not chunk:
                    return None, f"truncated while reading: no data at byte {offset}"
                hasher.update(chunk)
                chunks.append(chunk)
                if len(chunk) < min(CHUNK_SIZE, end - offset):
                    return None, f"truncated while reading: short read at byte {offset}"
        except OSError as exc:
            return None, f"read error in bytes {start}-{end - 1}: {describe_os_error(exc)}"
        expected = self.index.files[share].segments[segment]
        found = hasher.hexdigest()
        if found != expected:
            return None, (f"sha256 mismatch in bytes {start}-{end - 1}: expected {expected[:16]}..., found "
                          f"{found[:16]}... (damaged, or from another bundle or build)")
        return chunks, ""

    def _fd(self, share: int) -> int:
        fd = self._fds.get(share)
        if fd is None:
            fd = os.open(self.folder / self.index.files[share].name, os.O_RDONLY)
            self._fds[share] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # ---------------------------------------------------------------- repair

    def _rebuild(self, share: int, segment: int, reason: str) -> list[bytes]:
        assert self.code is not None
        expected = self.index.files[share].segments[segment]
        sources_checked = False
        while True:
            sources = self._sources(share, segment)
            if len(sources) < self.code.data_volumes:
                damaged = len(self.index.files) - len(sources)
                raise VolumeError(
                    f"{self.index.describe(share)}: {reason}; the recovery volumes cannot rebuild it: {damaged} of "
                    f"{len(self.index.files)} volumes are damaged at that place, at most "
                    f"{len(self.index.recovery)} can be rebuilt")
            try:
                stripes = self._decode(share, segment, sources[: self.code.data_volumes])
            except _Unreadable as exc:
                self.bad.add((exc.share, segment))
                continue
            digest = hashlib.sha256()
            for stripe in stripes:
                digest.update(stripe)
            if digest.hexdigest() == expected:
                self._record(share, reason, sum(len(s) for s in stripes))
                return stripes
            if sources_checked:
                raise VolumeError(f"{self.index.describe(share)}: {reason}; the rebuilt bytes do not match the index "
                                  "either (is the device failing?)")
            for source in sources:
                if not self._segment_intact(source, segment):
                    self.bad.add((source, segment))
            sources_checked = True

    def _sources(self, share: int, segment: int) -> list[int]:
        return [s for s in range(len(self.index.files))
                if s != share and s not in self.problems and (s, segment) not in self.bad]

    def _segment_intact(self, share: int, segment: int) -> bool:
        if segment >= len(self.index.files[share].segments):
            return True  # beyond a short last volume: its share is zero padding, which cannot be damaged
        return self._read_checked(share, segment)[0] is not None

    def _decode(self, share: int, segment: int, sources: list[int]) -> list[bytes]:
        assert self.code is not None
        stripe = self.index.stripe_size
        codeword_size = self.index.volumes[0].size  # every recovery volume is as long as the first data volume
        start, end = self._span(share, segment)
        out = []
        for offset in range(start, end, stripe):
            length = min(stripe, codeword_size - offset)
            blocks = {s: self._block(s, offset, length) for s in sources}
            data = self.code.decode(blocks)[share]
            out.append(data[: end - offset])
        return out

    def _block(self, share: int, offset: int, length: int) -> bytes:
        size = self.index.files[share].size
        want = max(0, min(length, size - offset))
        try:
            data = os.pread(self._fd(share), want, offset) if want else b""
        except OSError as exc:
            raise _Unreadable(share) from exc
        if len(data) != want:
            raise _Unreadable(share)
        return data + bytes(length - want)

    def _record(self, share: int, reason: str, rebuilt: int) -> None:
        known = self.repairs.get(share)
        first_reason = reason.split(" (")[0] if known is None else known.reason
        self.repairs[share] = Repair(self.index.describe(share), first_reason,
                                     rebuilt + (0 if known is None else known.rebuilt_bytes))
