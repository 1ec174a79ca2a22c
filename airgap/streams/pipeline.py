"""Streaming SHA-256: hash while reading or copying, never holding a whole file in memory.

SHA-256 of one stream cannot be split across cores, so one core's hashing speed bounds a big file.
What can be taken off that core is everything else: reading runs in a background thread a few
chunks ahead (`Prefetch`), writing runs in another a few chunks behind (`WriteBehind`), big outputs
go straight to disk rather than through the page cache (`DirectFile`), and separate files are
hashed in parallel (`digest_files`). hashlib, file reads and writes all release the GIL for buffers
this large, so the threads really run side by side. Memory stays flat: a few chunks in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, cast

CHUNK_SIZE = 4 << 20  # amortises syscalls and queue hand-offs; a few of them in flight stay far below 100 MB
PIPELINE_DEPTH = 2  # chunks a background reader or writer may run ahead of or behind the hasher
PIPELINE_MIN_BYTES = CHUNK_SIZE + 1  # from two chunks on, a thread saves more than it costs (~0.1 ms)
WRITEBACK_BYTES = 64 << 20  # ask the kernel to start writing dirty pages to disk every this many bytes
DIRECT_ALIGN = 4096  # offsets and sizes of O_DIRECT writes: a multiple of any disk's logical block size
DIRECT_BUFFER_SIZE = 8 << 20  # one direct write: large enough to keep the disk busy, small enough to not matter


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Digest:
    """Size and SHA-256 of a byte stream."""

    size: int
    sha256: str


def iter_chunks(stream: Readable, limit: int | None = None, chunk_size: int | None = None) -> Iterator[bytes]:
    """Yield chunks (CHUNK_SIZE unless told) from a stream, at most `limit` bytes in all when a limit is given."""
    size = chunk_size or CHUNK_SIZE
    remaining = limit
    while remaining is None or remaining > 0:
        want = size if remaining is None else min(size, remaining)
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
    """Hash one file in a single streaming pass, reading ahead in a background thread if it is big."""
    with path.open("rb", buffering=0) as stream:
        sink = (lambda chunk: progress(len(chunk))) if progress is not None else None
        chunks: Iterator[bytes] = iter_chunks(stream)
        if os.fstat(stream.fileno()).st_size < PIPELINE_MIN_BYTES:
            return digest_chunks(chunks, sink)
        with Prefetch(chunks) as ahead:
            return digest_chunks(ahead, sink)


def digest_files(paths: list[Path], workers: int | None = None) -> list[Digest]:
    """Hash several files in parallel, biggest first so that no core idles at the end; input order kept."""
    if len(paths) <= 1:
        return [digest_file(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: -_size_or_zero(paths[i]))
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {i: pool.submit(digest_file, paths[i]) for i in order}
        return [futures[i].result() for i in range(len(paths))]


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # digest_file reports the real error


# ---------------------------------------------------------------- pipelining

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch:
    """Runs a chunk iterator in a background thread, up to `depth` chunks ahead of the consumer.

    The consumer sees the same chunks in the same order, and the producer's exception at the same
    point. Until iteration ends or `close()` returns, the producer owns whatever the iterator reads
    from: use it as a context manager so that an early exit stops and joins the thread.
    """

    def __init__(self, chunks: Iterator[bytes], depth: int = PIPELINE_DEPTH) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="airgap-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                self._thread.join()
                return
            if isinstance(item, _Failed):
                self._thread.join()
                raise item.error
            yield cast(bytes, item)

    def close(self) -> None:
        """Stop the producer (if it still runs) and wait until it no longer touches the source."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class WriteBehind:
    """Calls `write` in a background thread, in order, up to `depth` chunks behind the caller.

    Chunks must not change after they are handed over (bytes do not). A failed write is raised by
    the next `write()` or by `finish()`, which also waits until every chunk has been written: call it
    before trusting the output. `abandon()` stops without waiting for the rest.
    """

    def __init__(self, write: Callable[[bytes], object], depth: int = PIPELINE_DEPTH) -> None:
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._consume, name="airgap-write", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self._error is not None:
                continue  # drain: the caller learns of the failure and stops
            try:
                self._write(cast(bytes, item))
            except BaseException as exc:  # raised in the caller's thread
                self._error = exc

    def write(self, chunk: bytes, /) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or InterruptedError("write abandoned")
            self._queue.put(_END)
            self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.finish()
        else:
            self.abandon()


class DirectFile:
    """Writes a file sequentially from `offset` on, bypassing the page cache (O_DIRECT) where it can.

    Writing gigabytes through the page cache costs more CPU than hashing them (every page is
    allocated, filled, and later written back, often after evicting another), and the final fsync
    then waits for all of it. Here the bytes are gathered in a page-aligned buffer that goes straight
    to disk. The unaligned first and last few bytes go through the ordinary descriptor `fd`, and so
    does everything if the file system refuses O_DIRECT (tmpfs, for one); those plain writes ask for
    early writeback instead. Call `finish()` to write the rest, then fsync `fd` as usual. One thread
    at a time (a WriteBehind thread, say).
    """

    def __init__(self, path: Path, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.base = offset  # file offset of buffer[0]; with no buffer, of the next byte
        self.filled = 0
        self.unflushed = 0  # plain bytes written since the last writeback request
        self.direct = _open_direct(path)
        self.size = DIRECT_BUFFER_SIZE
        self.buffer = mmap.mmap(-1, self.size) if self.direct is not None else None

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        if self.buffer is not None and self.filled == 0 and self.base % DIRECT_ALIGN:
            lead = min(len(view), -self.base % DIRECT_ALIGN)  # plain bytes up to the first aligned offset
            self._plain(view[:lead])
            view = view[lead:]
        while view:
            if self.buffer is None:
                self._plain(view)
                break
            take = min(len(view), self.size - self.filled)
            self.buffer[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == self.size:
                self._flush()
        return len(data)

    def finish(self) -> None:
        """Write what is still buffered (the unaligned tail plainly) and let go of the buffer."""
        if self.buffer is not None:
            self._flush()
        self.close()

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        if self.buffer is not None:
            with contextlib.suppress(BufferError):  # a view held by an exception in flight: GC unmaps it later
                self.buffer.close()
            self.buffer = None

    def _flush(self) -> None:
        """Write the buffer's aligned part directly, the rest plainly, and empty it."""
        assert self.buffer is not None
        with memoryview(self.buffer) as whole:
            view = whole[:self.filled]
            aligned = self.filled - self.filled % DIRECT_ALIGN
            done = self._direct(view[:aligned])
            self.filled = 0
            self._plain(view[done:])
            view.release()
        if self.direct is None:  # O_DIRECT failed: plain writes from now on
            self.close()

    def _direct(self, view: memoryview) -> int:
        """Write as much of an aligned view directly as the file system allows; return how much."""
        done = 0
        while done < len(view) and self.direct is not None:
            try:
                written = os.pwrite(self.direct, view[done:], self.base)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                written = 0  # the file system takes O_DIRECT at open but not at write
            done += written
            self.base += written
            if written <= 0 or written % DIRECT_ALIGN:
                os.close(self.direct)  # refused, or a short write left us unaligned: go on plainly
                self.direct = None
        return done

    def _plain(self, view: memoryview) -> None:
        while view:
            written = os.pwrite(self.fd, view, self.base)
            if written <= 0:
                raise OSError(errno.EIO, f"write made no progress at offset {self.base}")
            self.base += written
            self.unflushed += written
            view = view[written:]
        if self.unflushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.base - self.unflushed, self.unflushed)
            self.unflushed = 0


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a dirty range to disk now, so that a later fsync waits less.

    Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) starts the writeback and returns; the pages stay
    cached. Elsewhere, or if it fails, this does nothing: it is a hint, fsync still decides.
    """
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)
