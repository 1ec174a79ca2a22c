from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from airgap.streams import pipeline as hashing
from airgap.streams.pipeline import (
    DIRECT_ALIGN,
    PIPELINE_DEPTH,
    DirectFile,
    Prefetch,
    WriteBehind,
    digest_file,
    digest_files,
    iter_chunks,
    start_writeback,
)
from tests.support import REPO

CHUNK = 64 << 10
BUFFER = 16 * DIRECT_ALIGN


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same code paths with kilobytes instead of megabytes: the test process stays small."""
    monkeypatch.setattr(hashing, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(hashing, "PIPELINE_MIN_BYTES", CHUNK + 1)
    monkeypatch.setattr(hashing, "DIRECT_BUFFER_SIZE", BUFFER)


def expected(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 5 * CHUNK + 12345])
def test_digest_file_matches_hashlib_small_and_pipelined(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    seen: list[int] = []
    digest = digest_file(path, progress=seen.append)
    assert (digest.size, digest.sha256) == expected(data)
    assert sum(seen) == size


def test_digest_files_keeps_input_order(tmp_path: Path) -> None:
    blobs = [os.urandom(n) for n in (10, 3 * CHUNK + 1, 0, 5000)]
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"{i}")
        paths[-1].write_bytes(blob)
    assert [(d.size, d.sha256) for d in digest_files(paths, workers=3)] == [expected(b) for b in blobs]


def test_digest_files_reports_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(FileNotFoundError):
        digest_files([tmp_path / "a", tmp_path / "missing"])


def test_chunks_respect_limit() -> None:
    data = os.urandom(3 * 1000 + 7)
    assert b"".join(iter_chunks(io.BytesIO(data), limit=2500, chunk_size=1000)) == data[:2500]


def counted(n: int, fail_at: int | None = None, log: list[str] | None = None) -> Iterator[bytes]:
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"broken at {i}")
            if log is not None:
                log.append(f"made {i}")
            yield bytes([i % 256]) * 3000
    finally:
        if log is not None:
            log.append("closed")


def test_prefetch_yields_the_same_chunks_in_order() -> None:
    with Prefetch(counted(50)) as ahead:
        assert list(ahead) == list(counted(50))


def test_prefetch_raises_the_producers_error_after_the_chunks_before_it() -> None:
    got = []
    with pytest.raises(ValueError, match="broken at 7"), Prefetch(counted(20, fail_at=7)) as ahead:
        got.extend(ahead)
    assert len(got) == 7


def test_prefetch_close_stops_the_producer_early_and_closes_its_source() -> None:
    log: list[str] = []
    with Prefetch(counted(10_000, log=log)) as ahead:
        first = next(iter(ahead))
    assert first == bytes(3000)
    made = [entry for entry in log if entry.startswith("made")]
    assert len(made) <= PIPELINE_DEPTH + 3  # it ran ahead a few chunks, not through the whole source
    assert log[-1] == "closed"


def test_write_behind_writes_everything_in_order_before_finish_returns() -> None:
    out = io.BytesIO()
    chunks = list(counted(100))
    with WriteBehind(out.write) as writer:
        for chunk in chunks:
            writer.write(chunk)
    assert out.getvalue() == b"".join(chunks)


def test_write_behind_reports_a_failed_write() -> None:
    written: list[bytes] = []

    def write(chunk: bytes) -> None:
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(chunk)

    writer = WriteBehind(write)
    with pytest.raises(OSError, match="No space left"):
        for chunk in counted(50):
            writer.write(chunk)
        writer.finish()
    assert len(written) == 3


def test_write_behind_abandon_drops_what_is_still_queued() -> None:
    gate = threading.Event()
    written: list[bytes] = []

    def blocked(chunk: bytes) -> None:
        gate.wait(5)
        written.append(chunk)

    writer = WriteBehind(blocked, depth=2)
    for chunk in counted(3):  # one being written, two queued
        writer.write(chunk)
    threading.Timer(0.2, gate.set).start()
    writer.abandon()
    assert written == [bytes(3000)]


@pytest.mark.parametrize("offset", [0, 512, DIRECT_ALIGN + 7])
@pytest.mark.parametrize("pieces", [[1], [DIRECT_ALIGN], [3, BUFFER + 5, 100_000], [BUFFER, BUFFER, 1]])
def test_direct_file_writes_exactly_the_bytes_at_the_offset(tmp_path: Path, offset: int, pieces: list[int]) -> None:
    path = tmp_path / "out"
    head = os.urandom(offset)
    path.write_bytes(head)
    chunks = [os.urandom(n) for n in pieces]
    with path.open("r+b") as out:
        writer = DirectFile(path, out.fileno(), offset)
        if accepts_o_direct(tmp_path):
            assert writer.direct is not None, "the file system takes O_DIRECT but DirectFile did not use it"
        with WriteBehind(writer.write) as behind:
            for chunk in chunks:
                behind.write(chunk)
        writer.finish()
        os.fsync(out.fileno())
    assert path.read_bytes() == head + b"".join(chunks)


def accepts_o_direct(folder: Path) -> bool:
    probe = folder / ".o-direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def run_in_private_mount(tmp_path: Path, fstype: str, options: str, script: str) -> str:
    """Run a Python snippet with a fresh file system mounted at argv[1] (private mount namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a file system")
    mount = tmp_path / fstype
    mount.mkdir()
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount -t {fstype} {options} {fstype} "$1" && exec "$2" -c "$3" "$1"', "sh",
         str(mount), sys.executable, script],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_direct_file_falls_back_where_o_direct_is_refused(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT at open: every byte then goes through plain writes."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from airgap.streams.pipeline import DirectFile\n"
        "path = Path(sys.argv[1]) / 'out'\n"
        "data = os.urandom(2 * (8 << 20) + 11)\n"
        "with path.open('wb') as out:\n"
        "    writer = DirectFile(path, out.fileno(), 5)\n"
        "    assert writer.direct is None, 'ramfs accepted O_DIRECT'\n"
        "    writer.write(data[:100]); writer.write(data[100:]); writer.finish()\n"
        "assert path.read_bytes()[5:] == data\n"
        "print('fell back')\n"
    )
    assert run_in_private_mount(tmp_path, "ramfs", "", script) == "fell back"


def test_file_sink_on_a_full_disk_raises_enospc_and_leaves_nothing(tmp_path: Path) -> None:
    script = (
        "import errno, os, sys\n"
        "from pathlib import Path\n"
        "from airgap.bundle.container import FileSink\n"
        "from airgap.streams.pipeline import WriteBehind\n"
        "path = Path(sys.argv[1]) / 'staged'\n"
        "sink = FileSink(path)\n"
        "try:\n"
        "    with WriteBehind(sink.write) as writer:\n"
        "        for _ in range(8):\n"
        "            writer.write(os.urandom(1 << 20))\n"
        "    sink.close(True)\n"
        "except OSError as exc:\n"
        "    sink.close(False)\n"
        "    print(errno.errorcode[exc.errno], path.exists())\n"
    )
    assert run_in_private_mount(tmp_path, "tmpfs", "-o size=2m", script) == "ENOSPC False"


def test_start_writeback_is_only_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    with path.open("rb") as stream:
        start_writeback(stream.fileno(), 0, 10000)  # a read-only descriptor: the kernel may refuse; no error here
    start_writeback(-1, 0, 1)
    assert path.read_bytes() == b"x" * 10000
