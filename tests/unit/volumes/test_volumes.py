"""Volumes: split and join round trips, every fault named in one line, verified copies that resume."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import read_head, read_payload
from airgap.errors import FormatError, VolumeError
from airgap.format.manifest import ModelEntry
from airgap.trust.signing import key_id, public_pem
from airgap.volumes import (
    FAT_VOLUME_SIZE,
    auto_volume_size,
    copy_bundle,
    filesystem_type,
    fsutil,
    open_bundle,
    parse_index,
    parse_size,
    read_index,
    split_bundle,
)
from airgap.volumes.index import check_bundle_file
from tests.support import REPO, make_test_bundle

NOW = datetime(2026, 1, 2, tzinfo=UTC)
SEGMENT = 4096


@dataclass(frozen=True)
class Bundle:
    path: Path
    key: Ed25519PrivateKey

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def make_bundle(folder: Path, seed: int = 1, model_size: int = 300_000, key: Ed25519PrivateKey | None = None,
                name: str = "demo") -> Bundle:
    """A real signed bundle: random (incompressible) weights, a compressible text file, an empty file."""
    key = key or Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = {"models/tiny.gguf": b"GGUF" + rng.randbytes(model_size), "notes.txt": b"read me %d " % seed * 3000,
               "empty": b""}
    out = make_test_bundle(folder, sources, key, name=name, expires_days=30,
                           models=(ModelEntry("tiny", ("models/tiny.gguf",)),))
    return Bundle(out, key)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def read_all(path: Path, read_size: int = 1 << 20) -> bytes:
    with open_bundle(path) as stream:
        parts = []
        while chunk := stream.read(read_size):
            assert len(chunk) == read_size or not stream.read(1)  # full reads until the very end
            parts.append(chunk)
    return b"".join(parts)


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def volumes_dir(bundle: Bundle, tmp_path: Path, volume_size: int | None, parity: int = 0) -> Path:
    out = tmp_path / "volumes"
    split_bundle(bundle.path, out, volume_size, parity, segment_size=SEGMENT)
    return out


# ---------------------------------------------------------------- sizes and file systems

@pytest.mark.parametrize(("text", "expected"), [
    ("4000", 4000), ("3.9G", int(3.9 * (1 << 30))), ("2K", 2048), ("2KiB", 2048), ("1.5MB", 1_500_000),
    ("4GB", 4 * 10**9), ("1t", 1 << 40),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "3.9X", "1e9", "G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(VolumeError, match="invalid size"):
        parse_size(text)


MOUNTS = textwrap.dedent("""\
    /dev/vda / ext4 rw 0 0
    /dev/sdb1 /media/usb vfat rw,relatime 0 0
    /dev/sdc1 /media/my\\040stick exfat rw 0 0
    /dev/sdd1 /media/usb/deeper ext4 rw 0 0
""")


def test_filesystem_type_and_auto_volume_size() -> None:
    assert filesystem_type(Path("/media/usb/x"), MOUNTS) == "vfat"
    assert filesystem_type(Path("/media/usb"), MOUNTS) == "vfat"
    assert filesystem_type(Path("/media/usbother"), MOUNTS) == "ext4"  # a prefix of the name is not a mount
    assert filesystem_type(Path("/media/my stick/a"), MOUNTS) == "exfat"  # octal escapes in /proc/mounts
    assert filesystem_type(Path("/media/usb/deeper/x"), MOUNTS) == "ext4"  # the longest mount point wins
    assert auto_volume_size(Path("/media/usb"), MOUNTS) == FAT_VOLUME_SIZE < 4 << 30
    assert auto_volume_size(Path("/media/my stick"), MOUNTS) is None
    assert filesystem_type(Path("/")) != ""  # this machine's real table


# ---------------------------------------------------------------- split and join

@pytest.mark.parametrize("volume_size", [700, 4096, 50_000, 299_999, 10**9])
def test_split_join_round_trip(bundle: Bundle, tmp_path: Path, volume_size: int) -> None:
    """700 bytes is smaller than one tar member; 10**9 is larger than the whole bundle (one volume)."""
    out = volumes_dir(bundle, tmp_path, volume_size)
    index = read_index(out / "demo-1.0.airgap.volumes.json")
    data = bundle.data
    assert len(index.volumes) == -(-len(data) // volume_size)
    assert all(v.size == volume_size for v in index.volumes[:-1]) and sum(v.size for v in index.volumes) == len(data)
    names = sorted(p.name for p in out.iterdir() if p.name != index.index_name)
    assert names == [v.name for v in index.volumes]
    assert b"".join((out / n).read_bytes() for n in names) == data  # plain `cat` joins them
    with bundle.path.open("rb") as f:
        assert index.manifest_sha256 == read_head(f)[0].manifest_sha256
    for entry in (out, out / index.volumes[-1].name, out / index.index_name):
        assert read_all(entry) == data
    assert read_all(out, 513) == data
    assert read_all(out, 1) [:2000] == data[:2000]


def test_stream_feeds_the_bundle_reader(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 10_000)
    with open_bundle(out / "demo-1.0.airgap.002") as stream:
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)
        assert stream.index is not None and stream.repaired == []
    assert head.manifest.name == "demo"


def test_single_file_and_folder_with_one_bundle(bundle: Bundle, tmp_path: Path) -> None:
    assert read_all(bundle.path) == bundle.data
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(bundle.path, folder / bundle.path.name)
    assert read_all(folder) == bundle.data


def test_locating_refuses_ambiguity(bundle: Bundle, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="holds no bundle"):
        read_all(empty)
    out = volumes_dir(bundle, tmp_path, 100_000)
    other = make_bundle(tmp_path / "other", seed=2, name="other")
    split_bundle(other.path, out, 100_000, segment_size=SEGMENT)
    with pytest.raises(VolumeError, match="holds 2 bundles"):
        read_all(out)
    assert read_all(out / "other-1.0.airgap.001") == other.data
    (out / "demo-1.0.airgap.volumes.json").unlink()
    with pytest.raises(VolumeError, match=r"demo-1.0.airgap.volumes.json not found"):
        read_all(out / "demo-1.0.airgap.002")


# ---------------------------------------------------------------- faults, each named in one line

def expect_open_error(path: Path, pattern: str) -> str:
    """The error comes from opening, before a single byte is handed out."""
    with pytest.raises(VolumeError, match=pattern) as caught, open_bundle(path):
        pytest.fail("opened a damaged volume set")
    assert "\n" not in str(caught.value)
    return str(caught.value)


def expect_read_error(path: Path, pattern: str, damaged_from: int) -> str:
    """The error comes while reading, and no byte at or after `damaged_from` was handed out."""
    handed_out = 0
    with pytest.raises(VolumeError, match=pattern) as caught, open_bundle(path) as stream:
        while chunk := stream.read(1000):
            handed_out += len(chunk)
    assert handed_out <= damaged_from
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_volume(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    (out / "demo-1.0.airgap.003").unlink()
    expect_open_error(out, r"^volume 3 of 7 \(demo-1.0.airgap.003\): missing from ")
    (out / "demo-1.0.airgap.005").unlink()
    expect_open_error(out, r"^2 volumes damaged: volume 3 of 7 .* missing .*; volume 5 of 7 .* missing")


def test_truncated_and_overlong_volumes(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    os.truncate(out / "demo-1.0.airgap.007", 100)
    expect_open_error(out, r"^volume 7 of 7 \(demo-1.0.airgap.007\): truncated: expected \d+ bytes, found 100$")
    split_bundle(bundle.path, out, 50_000, segment_size=SEGMENT)
    with (out / "demo-1.0.airgap.002").open("ab") as f:
        f.write(b"more")
    expect_open_error(out, r"volume 2 of 7 .*: expected 50000 bytes, found 50004 \(from another bundle or build\?\)")


def test_flipped_byte_in_volume_k(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    flip(out / "demo-1.0.airgap.004", 20_000)
    segment_start = 3 * 50_000 + (20_000 // SEGMENT) * SEGMENT
    message = expect_read_error(out, r"^volume 4 of 7 \(demo-1.0.airgap.004\): sha256 mismatch in bytes "
                                r"16384-20479: expected [0-9a-f]{16}\.\.\., found", segment_start)
    assert "another bundle" in message


def test_volume_swapped_with_another_bundles(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    other = make_bundle(tmp_path / "other", seed=2, key=bundle.key)
    split_bundle(other.path, tmp_path / "other-volumes", 50_000, segment_size=SEGMENT)
    shutil.copy(tmp_path / "other-volumes" / "demo-1.0.airgap.002", out / "demo-1.0.airgap.002")
    expect_read_error(out, r"^volume 2 of 7 \(demo-1.0.airgap.002\): sha256 mismatch in bytes 0-4095", 50_000)


def test_index_from_another_build(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    other = make_bundle(tmp_path / "other", seed=3, key=bundle.key)
    split_bundle(other.path, tmp_path / "other-volumes", 50_000, segment_size=SEGMENT)
    shutil.copy(tmp_path / "other-volumes" / "demo-1.0.airgap.volumes.json", out / "demo-1.0.airgap.volumes.json")
    expect_open_error(out, r"^demo-1.0.airgap.volumes.json was made for manifest [0-9a-f]{16}\.\.\. \(demo 1.0\), "
                           r"volume 1 carries manifest [0-9a-f]{16}\.\.\. .*different builds$")


def test_damaged_index(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    index = out / "demo-1.0.airgap.volumes.json"
    text = index.read_text()
    first_hash = json.loads(text)["volumes"][0]["sha256"]
    index.write_text(text.replace(first_hash, first_hash[::-1]))
    with pytest.raises(FormatError, match="volume index is damaged: its checksum does not match"):
        read_all(out)


# ---------------------------------------------------------------- the index as hostile input

def index_doc(bundle: Bundle, tmp_path: Path) -> dict[str, object]:
    out = volumes_dir(bundle, tmp_path, 50_000, parity=1)
    doc: dict[str, object] = json.loads((out / "demo-1.0.airgap.volumes.json").read_bytes())
    return doc


def resealed(doc: dict[str, object]) -> bytes:
    """The document with a checksum that matches, so the parser's deeper checks are reached."""
    from airgap.volumes.index import _checksum

    body = {k: v for k, v in doc.items() if k != "checksum"}
    return json.dumps({**body, "checksum": _checksum(body)}).encode()


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(_type="airgap/manifest"), "not an airgap volume index"),
    (lambda d: d.update(format=2), "unsupported volume index format"),
    (lambda d: d["bundle"].update(file="../../etc/x"), "invalid bundle file name"),
    (lambda d: d["bundle"].update(size=-5), "must not be negative"),
    (lambda d: d["bundle"].update(size=1 << 60), "bundle size must be"),
    (lambda d: d["bundle"].update(manifest_sha256="zz"), "invalid manifest_sha256"),
    (lambda d: d.update(volume_size=1), "does not cut a"),
    (lambda d: d.update(volume_size=True), "must be an integer"),
    (lambda d: d.update(segment_size=5000), "segment_size must be a power of two"),
    (lambda d: d["volumes"][2].update(name="../../evil"), "expected volume name 'demo-1.0.airgap.003'"),
    (lambda d: d["volumes"][2].update(size=1), "must be 50000 bytes"),
    (lambda d: d["volumes"].pop(), "makes 7 volumes, the index lists 6"),
    (lambda d: d["volumes"][0]["segments"].pop(), "has 13 segments, the index lists 12"),
    (lambda d: d["volumes"][0]["segments"].extend(["0" * 64] * 20), "has 33 items, limit 13"),
    (lambda d: d["recovery"].update(scheme="par3"), "unknown recovery scheme"),
    (lambda d: d["recovery"].update(stripe_size=3), "stripe_size must be a power of two"),
    (lambda d: d["recovery"]["volumes"][0].update(name="demo-1.0.airgap.r02"), "expected volume name"),
])
def test_hostile_index_fields(bundle: Bundle, tmp_path: Path, change: object, message: str) -> None:
    doc = index_doc(bundle, tmp_path)
    change(doc)  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        parse_index(resealed(doc))


def test_hostile_index_documents() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_index(b"\xff\xfe")
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_index(b"[" * 100_000)
    with pytest.raises(FormatError, match="volume index too large"):
        parse_index(b" " * ((64 << 20) + 1))
    with pytest.raises(FormatError, match="expected a JSON object"):
        parse_index(b"[]")
    with pytest.raises(FormatError, match="must be a string"):
        parse_index(b'{"_type": "airgap/volumes", "format": 1}')


# ---------------------------------------------------------------- copy

def test_copy_writes_verifies_and_skips_what_is_there(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    report = copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    names = [v.name for v in report.index.volumes]
    assert list(report.written) == names and report.unchanged == ()
    assert report.bytes_written == len(bundle.data)
    assert read_all(stick) == bundle.data
    assert report.readme == stick / "README.txt" and report.readme.exists()
    again = copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    assert again.written == () and list(again.unchanged) == names and again.bytes_written == 0


def test_copy_resumes_after_an_interruption(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    # as a pulled stick leaves it: volume 3 half written, later volumes and the index never written
    os.truncate(stick / "demo-1.0.airgap.003", 25_000)
    for name in ("demo-1.0.airgap.004", "demo-1.0.airgap.005", "demo-1.0.airgap.006", "demo-1.0.airgap.volumes.json"):
        (stick / name).unlink()
    with pytest.raises(VolumeError, match="no .volumes.json index: the copy is incomplete"):
        read_all(stick)
    report = copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    assert report.unchanged == ("demo-1.0.airgap.001", "demo-1.0.airgap.002")
    assert report.written[0] == "demo-1.0.airgap.003"
    assert report.bytes_written < len(bundle.data) - 2 * 60_000 - 20_000  # volume 3 resumed, not rewritten
    assert read_all(stick) == bundle.data


def test_read_back_catches_corruption_between_write_and_read(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"

    def damage(path: Path) -> None:
        if path.name == "demo-1.0.airgap.002":
            flip(path, 1234)

    with pytest.raises(VolumeError, match=r"^read-back of demo-1.0.airgap.002 from .* differs from what was "
                                          r"written: .*run the same command again"):
        copy_bundle(bundle.path, stick, 60_000, progress=False, after_write=damage, segment_size=SEGMENT)
    report = copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    assert report.unchanged == ("demo-1.0.airgap.001",) and report.written[0] == "demo-1.0.airgap.002"
    assert read_all(stick) == bundle.data


def test_copy_removes_leftovers_of_an_earlier_cut(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    copy_bundle(bundle.path, stick, 30_000, parity=1, progress=False, segment_size=SEGMENT)
    (stick / "unrelated.txt").write_text("keep me")
    report = copy_bundle(bundle.path, stick, 200_000, progress=False, segment_size=SEGMENT)
    assert sorted(p.name for p in stick.iterdir()) == sorted(
        ["README.txt", "probe.py", "unrelated.txt", "demo-1.0.airgap.volumes.json",
         *(v.name for v in report.index.volumes)])
    assert read_all(stick) == bundle.data


def test_copy_from_volumes_and_refusals(bundle: Bundle, tmp_path: Path) -> None:
    out = volumes_dir(bundle, tmp_path, 50_000)
    report = copy_bundle(out / "demo-1.0.airgap.001", tmp_path / "stick", None, progress=False,
                         segment_size=SEGMENT)
    assert len(report.index.volumes) == 1 and read_all(tmp_path / "stick") == bundle.data
    with pytest.raises(VolumeError, match="source and destination are the same folder"):
        copy_bundle(out, out, 50_000, progress=False)
    flip(out / "demo-1.0.airgap.006", 10)
    with pytest.raises(VolumeError, match=r"^volume 6 of 7 .*sha256 mismatch"):  # a damaged source is not copied
        copy_bundle(out, tmp_path / "stick2", 50_000, progress=False, segment_size=SEGMENT)


def test_copy_refuses_volumes_too_large_for_fat(bundle: Bundle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\n/dev/sdb1 {stick} vfat rw 0 0\n")
    monkeypatch.setattr(fsutil, "PROC_MOUNTS", mounts)  # this kernel has no vfat driver; stand in its mount table
    assert auto_volume_size(stick) == FAT_VOLUME_SIZE
    huge = tmp_path / "huge.airgap"  # a real head, then a sparse tail: refused before the payload is read
    shutil.copy(bundle.path, huge)
    os.truncate(huge, 9 << 30)
    with pytest.raises(VolumeError, match=r"is on FAT, whose files must be under 4 GiB: volumes of 4.5 GiB do not"):
        copy_bundle(huge, stick, parse_size("4.5G"), progress=False)
    assert list(stick.iterdir()) == []


# ---------------------------------------------------------------- a small destination (a real full file system)

FULL_DISK_SCRIPT = """
import os, sys
from pathlib import Path
from airgap.errors import AirgapError
from airgap.volumes import copy_bundle, open_bundle

bundle, stick = Path(sys.argv[1]), Path(sys.argv[2])
try:
    copy_bundle(bundle, stick, 3 << 20, progress=False)
except AirgapError as exc:
    print("BIG:", exc)

small = Path(sys.argv[3])
filler = stick / "filler"
def fill(path):
    if path.name.endswith(".001"):
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20)); f.flush()
            except OSError:
                pass
try:
    copy_bundle(small, stick, 1 << 20, progress=False, after_write=fill)
except AirgapError as exc:
    print("FULL:", exc)
filler.unlink()
report = copy_bundle(small, stick, 1 << 20, progress=False)
print("RESUMED:", ",".join(report.unchanged), "|", ",".join(report.written))
with open_bundle(stick) as stream:
    print("SAME:", stream.read() == small.read_bytes())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_destination_full(tmp_path: Path) -> None:
    big = make_bundle(tmp_path / "big", model_size=12 << 20)
    small = make_bundle(tmp_path / "small", seed=5, model_size=3 << 20, name="small")
    stick = tmp_path / "stick"
    stick.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$1" && exec "$2" "$3" "$4" "$1" "$5"', "sh",
         str(stick), sys.executable, str(script), str(big.path), str(small.path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert done.returncode == 0, done.stderr
    assert lines["BIG"].startswith("not enough space in ") and "MiB more" in lines["BIG"]
    assert lines["FULL"].startswith("writing small-1.0.airgap.002 in ")
    assert "No space left on device (the destination is full); run the same command again to finish" in lines["FULL"]
    assert lines["RESUMED"].startswith("small-1.0.airgap.001 | small-1.0.airgap.002")
    assert lines["SAME"] == "True"


# ---------------------------------------------------------------- the operator's sheet

def recipe(readme: str) -> str:
    """Section 2 of README.txt: the indented command lines, as an operator would paste them."""
    section = readme.split("2. VERIFY BY HAND", 1)[1].split("Where a disk has room", 1)[0]
    return "\n".join(line[4:] for line in section.splitlines() if line.startswith("    "))


def test_readme_names_bundle_models_keys_and_commands(bundle: Bundle, tmp_path: Path) -> None:
    report = copy_bundle(bundle.path, tmp_path / "stick", 60_000, parity=1, progress=False, segment_size=SEGMENT)
    assert report.readme is not None
    text = report.readme.read_text()
    assert text.startswith("demo 1.0: an airgap bundle")
    assert "tiny  293.0 KiB  (models/tiny.gguf)" in text
    assert key_id(bundle.key.public_key()) in text
    assert 'airgap install "$STICK/demo-1.0.airgap.001" --trust release.pub --prefix' in text
    assert "(demo-1.0.airgap.r01); airgap says which volume it rebuilt" in text
    assert report.index.bundle_sha256 in text and report.index.manifest_sha256 in text
    listed = [line.split("  ") for line in text.splitlines() if line[:1].isalnum() and len(line.split("  ")[0]) == 64]
    probe_sha256 = hashlib.sha256((tmp_path / "stick" / "probe.py").read_bytes()).hexdigest()
    volumes = [(v.sha256, v.name) for v in report.index.files]
    assert [(h, n) for h, n in listed] == [*volumes, (probe_sha256, "probe.py")]
    assert 'python3 -I "$STICK/probe.py" --prefix /opt/airgap -o probe.json' in text
    assert (tmp_path / "stick" / "probe.py").read_bytes() == (REPO / "airgap" / "hardware" / "probe.py").read_bytes()


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "openssl", "zstd", "tar", "sha256sum")),
                    reason="needs the standard tools the sheet names")
def test_readme_recipe_verifies_by_hand_and_catches_tampering(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    report = copy_bundle(bundle.path, stick, 60_000, progress=False, segment_size=SEGMENT)
    assert report.readme is not None
    work = tmp_path / "check"
    work.mkdir()
    (work / "release.pub").write_bytes(public_pem(bundle.key.public_key()))
    script = recipe(report.readme.read_text()).replace("STICK=/media/usb", f"STICK={stick}")
    os.chmod(stick, 0o555)  # the stick is read-only: the recipe must not write there
    try:
        done = subprocess.run(["bash", "-e", "-c", script], cwd=work, capture_output=True, text=True, timeout=120,
                              check=False)
    finally:
        os.chmod(stick, 0o755)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count(": OK") == len(report.index.volumes) + 3  # each volume, probe.py, SHA256SUMS, all files
    assert "probe.py: OK" in out
    assert report.index.bundle_sha256 in out and key_id(bundle.key.public_key()) in out
    assert "Signature Verified Successfully" in out
    assert (work / "computed.sums").read_text().count("\n") == 3
    # the variant for a host with a big disk: extract, decompress, sha256sum -c inside files/
    extract = report.readme.read_text().split("Where a disk has room", 1)[1].split("3. VOLUMES", 1)[0]
    lines = [line[4:] for line in extract.splitlines() if line.startswith("    ")]
    script_big = f"STICK={stick}\n" + "\n".join(lines).replace("/data/", f"{tmp_path}/data/")
    done = subprocess.run(["bash", "-e", "-c", script_big], cwd=work, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout.count(": OK") == 3, done.stdout + done.stderr
    # the same recipe fails on a flipped byte in the model (volume 3 holds part of it)
    flip(stick / "demo-1.0.airgap.003", 500)
    done = subprocess.run(["bash", "-e", "-c", script], cwd=work, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0 and "demo-1.0.airgap.003: FAILED" in done.stdout


def test_stopping_early_ends_the_read_ahead(bundle: Bundle, tmp_path: Path) -> None:
    import threading

    out = volumes_dir(bundle, tmp_path, 20_000)
    with open_bundle(out) as stream:
        head, _ = read_head(stream)  # `verify` of the head only, then leave
    assert head.manifest.name == "demo"
    assert not [t for t in threading.enumerate() if t.name == "airgap-volumes"]


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_read_back_comes_from_the_device_not_the_page_cache(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs pages are the storage itself")
    path = tmp_path / "volume"
    with path.open("wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())

    def resident() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip())

    assert resident() > 0
    fd = os.open(path, os.O_RDONLY)
    fsutil.drop_cache(fd)
    os.close(fd)
    assert resident() == 0


def test_the_index_is_read_by_the_strict_json_loader(bundle: Bundle, tmp_path: Path) -> None:
    data = (volumes_dir(bundle, tmp_path, 4096) / "demo-1.0.airgap.volumes.json").read_bytes()
    parse_index(data)
    duplicate = data.replace(b'"format": 1,', b'"format": 1,\n "format": 1,', 1)
    assert duplicate != data
    with pytest.raises(FormatError, match="volume index is not valid JSON for airgap: key 'format' appears twice"):
        parse_index(duplicate)
    with pytest.raises(FormatError, match="volume index is not valid JSON for airgap: nested 100000 levels deep"):
        parse_index(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError, match="an integer of 5000 digits"):
        parse_index(data.replace(b'"format": 1,', b'"format": 1' + b"0" * 4999 + b",", 1))
    with pytest.raises(FormatError, match="invalid bundle file name"):
        check_bundle_file("demo-1.0.airgap\n")
