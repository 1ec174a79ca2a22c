from __future__ import annotations

import io
import tarfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle import (
    SIGNATURES_MEMBER,
    add_signatures,
    member_bytes,
    read_head,
    read_payload,
)
from airgap.errors import AirgapError, FormatError, IntegrityError
from airgap.manifest import Manifest
from airgap.trust import TrustPolicy, key_id, sign
from tests.support import make_test_bundle

NOW = datetime(2026, 1, 2, tzinfo=UTC)


def make_bundle(tmp_path: Path, files: dict[str, bytes], key: Ed25519PrivateKey | None = None) -> Path:
    return make_test_bundle(tmp_path, files, key or Ed25519PrivateKey.generate())


FILES = {"models/m.gguf": b"GGUF" + bytes(range(256)) * 40, "notes.txt": b"compress me " * 1000, "empty": b""}


def verify(path: Path) -> Manifest:
    with path.open("rb") as stream:
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)
    return head.manifest


def test_round_trip_and_standard_tar(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, FILES)
    manifest = verify(bundle)
    by_path = {e.path: e for e in manifest.files}
    assert by_path["notes.txt"].storage == "zstd"  # text compresses
    assert by_path["models/m.gguf"].storage == "raw"  # weights never spend CPU on compression
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        assert names[:3] == ["manifest.json", "signatures", "SHA256SUMS"]
        data = tar.extractfile("files/notes.txt.zst").read()  # type: ignore[union-attr]
    assert zstandard.ZstdDecompressor().decompress(data) == FILES["notes.txt"]


def test_deterministic(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    assert make_bundle(tmp_path / "1", FILES, key).read_bytes() == make_bundle(tmp_path / "2", FILES, key).read_bytes()


def full_check(data: bytes, policy: TrustPolicy) -> None:
    """What verify does: signatures over the raw manifest bytes first, then parse, then every member."""
    head, tar = read_head(io.BytesIO(data), authenticate=policy.check)
    read_payload(tar, head.manifest)


def test_every_flipped_byte_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    policy = TrustPolicy((key.public_key(),))
    data = make_bundle(tmp_path, {"models/m.gguf": b"GGUF" + b"x" * 3000, "a.txt": b"hello " * 300}, key).read_bytes()
    full_check(data, policy)
    accepted = []
    for offset in range(len(data)):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x01
        try:
            full_check(bytes(corrupt), policy)
        except AirgapError:
            continue
        accepted.append(offset)
    assert accepted == []


def test_truncated_refused(tmp_path: Path) -> None:
    data = make_bundle(tmp_path, FILES).read_bytes()
    for cut in (100, 600, len(data) // 2, len(data) - 1100):
        with pytest.raises((FormatError, IntegrityError), match="truncated|not an airgap|bad tar|expected"):
            head, tar = read_head(io.BytesIO(data[:cut]))
            read_payload(tar, head.manifest)


def append_member(data: bytes, member: bytes) -> bytes:
    end = len(data) - 1024
    return data[:end] + member + bytes(1024)


def tar_member(name: str, kind: bytes, payload: bytes = b"", link: str = "") -> bytes:
    if kind == tarfile.REGTYPE:  # as the real writer writes members, dated like the others
        return member_bytes(name, payload, int(NOW.timestamp()))
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(payload) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    pad = -len(payload) % 512 if kind == tarfile.REGTYPE else 0
    return info.tobuf(tarfile.PAX_FORMAT) + (payload + bytes(pad) if kind == tarfile.REGTYPE else b"")


@pytest.mark.parametrize(("member", "message"), [
    (tar_member("files/extra", tarfile.REGTYPE, b"boo"), "does not list"),
    (tar_member("files/link", tarfile.SYMTYPE, link="/etc/passwd"), "symlink"),
    (tar_member("files/hard", tarfile.LNKTYPE, link="manifest.json"), "hard link"),
    (tar_member("files/dev", tarfile.CHRTYPE), "character device"),
    (tar_member("../../etc/cron.d/x", tarfile.REGTYPE, b"boo"), "does not list"),
    (tar_member("/etc/passwd", tarfile.REGTYPE, b"boo"), "does not list"),
])
def test_members_not_in_manifest_refused(tmp_path: Path, member: bytes, message: str) -> None:
    data = append_member(make_bundle(tmp_path, FILES).read_bytes(), member)
    with pytest.raises((FormatError, IntegrityError), match=message):
        head, tar = read_head(io.BytesIO(data))
        read_payload(tar, head.manifest)


def test_missing_member_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, FILES)
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    extra = replace(head.manifest.files[0], path="zz-missing", sha256="c" * 64)
    manifest = replace(head.manifest, files=(*head.manifest.files, extra)).with_sha256sums()
    with bundle.open("rb") as stream, pytest.raises(IntegrityError):
        _, tar = read_head(stream)
        read_payload(tar, manifest)


def test_decompression_bomb_stops_at_declared_size(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, {"notes.txt": b"a" * 10_000})
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    entry = head.manifest.files[0]
    small = replace(entry, size=100)  # the data decompresses to far more than declared
    manifest = replace(head.manifest, files=(small,)).with_sha256sums()
    with bundle.open("rb") as stream:
        _, tar = read_head(stream)
        with pytest.raises(IntegrityError, match="more data than the 100 bytes"):
            read_payload(tar, manifest)


def test_add_signature_in_place(tmp_path: Path) -> None:
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp_path, FILES, first)
    size = bundle.stat().st_size
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    add_signatures(bundle, [sign(head.manifest_bytes, second)])
    assert bundle.stat().st_size == size
    with bundle.open("rb") as stream:
        again, tar = read_head(stream)
        read_payload(tar, again.manifest)
    assert {s.keyid for s in again.signatures} == {key_id(first.public_key()), key_id(second.public_key())}


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not an airgap bundle|bad tar header"):
        read_head(io.BytesIO(b"hello world" * 100))
    with pytest.raises(FormatError, match="expected member 'manifest.json'"):
        read_head(io.BytesIO(member_bytes(SIGNATURES_MEMBER, b"x", 0) + bytes(1024)))


def test_data_after_end_refused(tmp_path: Path) -> None:
    data = make_bundle(tmp_path, FILES).read_bytes() + b"trailing garbage"
    with pytest.raises(FormatError, match="after the end"):
        head, tar = read_head(io.BytesIO(data))
        read_payload(tar, head.manifest)
