"""The positional reader (regular files: headers first, members hashed in parallel) and the streaming
reader (pipes, volumes) must accept and refuse exactly the same bundles, with the same message."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import FileSink, Sink, read_head, read_payload
from airgap.errors import AirgapError, IntegrityError
from airgap.format.manifest import FileEntry
from airgap.streams import pipeline as hashing
from tests.support import make_test_bundle

NOW = datetime(2026, 1, 2, tzinfo=UTC)
CHUNK = 64 << 10
BIG = 5 * CHUNK + 4321  # above the pipeline threshold: read ahead and written behind in threads
FILES = {
    "wheels/a.whl": os.urandom(3000),
    "notes.txt": b"compressible text " * 4000,
    "empty": b"",
    "models/m.gguf": b"GGUF" + os.urandom(BIG - 4),
}


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same code paths with kilobytes instead of megabytes: the test process stays small."""
    monkeypatch.setattr(hashing, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(hashing, "PIPELINE_MIN_BYTES", CHUNK + 1)
    monkeypatch.setattr(hashing, "DIRECT_BUFFER_SIZE", 4 * 4096)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = make_test_bundle(tmp_path_factory.mktemp("parallel"), FILES, Ed25519PrivateKey.generate())
    return out.read_bytes()


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each member's data starts in the bundle, and its size (tarfile as an independent reader)."""
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


class PipeLike:
    """Only read(): forces the streaming reader, as for a pipe or joined volumes."""

    def __init__(self, path: Path) -> None:
        self.stream = path.open("rb")

    def read(self, size: int = -1, /) -> bytes:
        return self.stream.read(size)


@dataclass
class Recorder:
    """A sink factory remembering the order of events and each file's bytes."""

    skip: Callable[[FileEntry], bool] = lambda entry: False
    events: list[tuple[str, str]] = field(default_factory=list)
    data: dict[str, bytes] = field(default_factory=dict)

    def open_sink(self, entry: FileEntry) -> Sink | None:
        self.events.append(("open", entry.path))
        if self.skip(entry):
            return None
        recorder, chunks = self, []

        class Memory:
            def write(self, chunk: bytes, /) -> object:
                chunks.append(chunk)
                return len(chunk)

            def close(self, ok: bool) -> None:
                recorder.events.append(("ok" if ok else "failed", entry.path))
                if ok:
                    recorder.data[entry.path] = b"".join(chunks)

        return Memory()


def verdict(path: Path, positional: bool, recorder: Recorder | None = None) -> str:
    source = path.open("rb") if positional else PipeLike(path)
    try:
        head, tar = read_head(source)
        read_payload(tar, head.manifest, None if recorder is None else recorder.open_sink)
    except AirgapError as exc:
        return f"{type(exc).__name__}: {exc.message}"
    finally:
        (source if positional else source.stream).close()  # type: ignore[union-attr]
    return "ok"


def both(tmp_path: Path, data: bytes) -> tuple[str, str]:
    path = tmp_path / "b.airgap"
    path.write_bytes(data)
    return verdict(path, positional=True), verdict(path, positional=False)


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_intact_bundle_is_accepted_both_ways(tmp_path: Path, bundle: bytes) -> None:
    assert both(tmp_path, bundle) == ("ok", "ok")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_the_big_member_is_refused_alike(tmp_path: Path, bundle: bytes, where: str) -> None:
    start, size = offsets(bundle)["files/models/m.gguf"]
    at = {"first": start, "middle": start + size // 2, "last": start + size - 1}[where]
    positional, streaming = both(tmp_path, flipped(bundle, at))
    assert positional == streaming
    assert positional.startswith("IntegrityError: models/m.gguf: sha256 mismatch")


@pytest.mark.parametrize("member", ["files/notes.txt.zst", "files/wheels/a.whl", "SHA256SUMS"])
def test_flipped_byte_in_a_small_member_is_refused_alike(tmp_path: Path, bundle: bytes, member: str) -> None:
    start, size = offsets(bundle)[member]
    positional, streaming = both(tmp_path, flipped(bundle, start + size // 2))
    assert positional == streaming != "ok"


def test_two_damaged_members_report_the_earlier_one_both_ways(tmp_path: Path, bundle: bytes) -> None:
    table = offsets(bundle)
    data = flipped(bundle, table["files/wheels/a.whl"][0])
    data = flipped(data, table["files/models/m.gguf"][0] + 5)
    positional, streaming = both(tmp_path, data)
    assert positional == streaming
    assert "wheels/a.whl" in positional


@pytest.mark.parametrize("cut", ["in big member", "in a header", "in padding", "before the end blocks"])
def test_truncated_bundle_is_refused_alike(tmp_path: Path, bundle: bytes, cut: str) -> None:
    start, size = offsets(bundle)["files/models/m.gguf"]
    end = start + size + (-size % 512)
    length = {"in big member": start + size // 3, "in a header": start - 700, "in padding": start + size + 1,
              "before the end blocks": end}[cut]
    positional, streaming = both(tmp_path, bundle[:length])
    assert positional == streaming != "ok"


@pytest.mark.parametrize("damage", ["header name", "padding", "garbage after end"])
def test_structural_damage_is_refused_alike(tmp_path: Path, bundle: bytes, damage: str) -> None:
    start, size = offsets(bundle)["files/wheels/a.whl"]
    if damage == "header name":
        data = flipped(bundle, start - 512 + 10)
    elif damage == "padding":
        data = flipped(bundle, start + size)  # 3000 bytes leave padding to the next block
    else:
        data = bundle + b"x"
    positional, streaming = both(tmp_path, data)
    assert positional == streaming != "ok"


def test_sinks_get_the_same_bytes_and_events_in_bundle_order(tmp_path: Path, bundle: bytes) -> None:
    path = tmp_path / "b.airgap"
    path.write_bytes(bundle)
    positional, streaming = Recorder(), Recorder()
    assert verdict(path, True, positional) == verdict(path, False, streaming) == "ok"
    assert positional.events == streaming.events
    assert positional.data == streaming.data == FILES


def test_a_sink_learns_of_its_damaged_file_alike(tmp_path: Path, bundle: bytes) -> None:
    start, size = offsets(bundle)["files/models/m.gguf"]
    path = tmp_path / "b.airgap"
    path.write_bytes(flipped(bundle, start + size - 1))
    positional, streaming = Recorder(), Recorder()
    assert verdict(path, True, positional) == verdict(path, False, streaming) != "ok"
    assert positional.events == streaming.events
    assert positional.events[-1] == ("failed", "models/m.gguf")


def test_truncated_bundle_opens_no_sink_when_read_from_a_file(tmp_path: Path, bundle: bytes) -> None:
    start, size = offsets(bundle)["files/models/m.gguf"]
    path = tmp_path / "b.airgap"
    path.write_bytes(bundle[:start + size // 2])
    positional, streaming = Recorder(), Recorder()
    assert verdict(path, True, positional) == verdict(path, False, streaming) != "ok"
    assert positional.events == []  # every header is checked before any byte is handed out
    assert ("open", "models/m.gguf") in streaming.events


def test_members_without_a_sink_are_still_verified(tmp_path: Path, bundle: bytes) -> None:
    start, _ = offsets(bundle)["files/models/m.gguf"]
    path = tmp_path / "b.airgap"
    path.write_bytes(flipped(bundle, start + 1))
    only_small = Recorder(skip=lambda entry: entry.kind == "model")  # like the trust gate: most members unsunk
    result = verdict(path, True, only_small)
    assert result.startswith("IntegrityError: models/m.gguf: sha256 mismatch")
    assert ("open", "models/m.gguf") in only_small.events


def test_a_failing_sink_write_is_raised_and_the_sink_closed_not_ok(tmp_path: Path, bundle: bytes) -> None:
    path = tmp_path / "b.airgap"
    path.write_bytes(bundle)
    closed: list[bool] = []

    class Full:
        def write(self, chunk: bytes, /) -> object:
            raise OSError(28, "No space left on device")

        def close(self, ok: bool) -> None:
            closed.append(ok)

    def open_sink(entry: FileEntry) -> Sink | None:
        return Full() if entry.kind == "model" else None

    with path.open("rb") as stream:
        head, tar = read_head(stream)
        with pytest.raises(OSError, match="No space left"):
            read_payload(tar, head.manifest, open_sink)
    assert closed == [False]


@pytest.mark.parametrize("damaged", [False, True])
def test_file_sinks_keep_verified_files_and_remove_a_damaged_one(tmp_path: Path, bundle: bytes, damaged: bool) -> None:
    start, size = offsets(bundle)["files/models/m.gguf"]
    path = tmp_path / "b.airgap"
    path.write_bytes(flipped(bundle, start + size // 2) if damaged else bundle)
    out = tmp_path / "out"
    out.mkdir()

    def open_sink(entry: FileEntry) -> Sink | None:
        return FileSink(out / entry.path.replace("/", "_"))

    with path.open("rb") as stream:
        head, tar = read_head(stream)
        if damaged:
            with pytest.raises(IntegrityError, match="models/m.gguf: sha256 mismatch"):
                read_payload(tar, head.manifest, open_sink)
        else:
            read_payload(tar, head.manifest, open_sink)
            assert stream.tell() == len(bundle)  # left at the end, as if read through
    kept = {name.replace("/", "_"): data for name, data in FILES.items() if not (damaged and name == "models/m.gguf")}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
