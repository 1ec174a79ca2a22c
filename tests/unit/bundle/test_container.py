from __future__ import annotations

import base64
import io
import random
import tarfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import (
    CHECK_BEFORE_DECOMPRESS,
    SIGNATURES_MEMBER,
    add_signatures,
    member_bytes,
    member_header,
    prepare_entry,
    read_head,
    read_payload,
    write_bundle,
)
from airgap.errors import AirgapError, FormatError, IntegrityError
from airgap.format.manifest import DraftFile, Manifest
from airgap.streams.pipeline import digest_bytes
from airgap.trust.signing import TrustPolicy, decode_signatures, encode_signatures, key_id, sign
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
    for cut in (100, 600, 5000, len(data) // 2, len(data) - 1100):  # a header, manifest, signatures, payload
        with pytest.raises(IntegrityError, match=r"^bundle truncated: (member '[^']+' )?expected \d+ "):
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


@pytest.mark.parametrize(("member", "error", "message"), [
    (tar_member("files/extra", tarfile.REGTYPE, b"boo"), IntegrityError,
     "bundle carries 'files/extra', which the signed manifest does not list"),
    (tar_member("files/link", tarfile.SYMTYPE, link="/etc/passwd"), FormatError,
     "member 'files/link' is a symlink: only regular files are accepted"),
    (tar_member("files/hard", tarfile.LNKTYPE, link="manifest.json"), FormatError,
     "member 'files/hard' is a hard link: only regular files are accepted"),
    (tar_member("files/dev", tarfile.CHRTYPE), FormatError,
     "member 'files/dev' is a character device: only regular files are accepted"),
    (tar_member("../../etc/cron.d/x", tarfile.REGTYPE, b"boo"), IntegrityError,
     "bundle carries '../../etc/cron.d/x', which the signed manifest does not list"),
    (tar_member("/etc/passwd", tarfile.REGTYPE, b"boo"), IntegrityError,
     "bundle carries '/etc/passwd', which the signed manifest does not list"),
])
def test_members_not_in_manifest_refused(tmp_path: Path, member: bytes, error: type[Exception], message: str) -> None:
    data = append_member(make_bundle(tmp_path, FILES).read_bytes(), member)
    with pytest.raises(error) as refused:
        head, tar = read_head(io.BytesIO(data))
        read_payload(tar, head.manifest)
    assert str(refused.value) == message


def test_missing_member_refused(tmp_path: Path) -> None:
    """A stick that drops the last member: manifest, signatures and SHA256SUMS are intact, one file is gone."""
    bundle = make_bundle(tmp_path, FILES)
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    bundle.write_bytes(data[:last.offset] + data[end:])
    with bundle.open("rb") as stream, pytest.raises(IntegrityError, match=r"^bundle lacks 1 file\(s\) the signed "
                                                                          r"manifest lists, first 'models/m.gguf'$"):
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)


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


# ---------------------------------------------------------------- the reader accepts exactly the writer's bytes

def signed_bundle(tmp_path: Path, files: dict[str, bytes] | None = None) -> tuple[bytes, TrustPolicy]:
    key = Ed25519PrivateKey.generate()
    data = make_bundle(tmp_path, files or {"models/m.gguf": b"GGUF" + b"x" * 3000, "a.txt": b"hello " * 300},
                       key).read_bytes()
    policy = TrustPolicy((key.public_key(),))
    full_check(data, policy)
    return data, policy


def head_end(data: bytes) -> int:
    """Offset of the first payload member: manifest, signatures and SHA256SUMS come before it."""
    head, tar = read_head(io.BytesIO(data))
    tar.next_member()
    return tar.offset + len(head.manifest.sha256sums_text()) + (-len(head.manifest.sha256sums_text()) % 512)


def refused(data: bytes, policy: TrustPolicy) -> bool:
    try:
        full_check(data, policy)
    except AirgapError:
        return True
    return False


@pytest.mark.parametrize("replacement", [b" ", b"\t", b"+"])
def test_a_checksum_field_in_another_form_is_refused(tmp_path: Path, replacement: bytes) -> None:
    data, policy = signed_bundle(tmp_path)
    for header in (0, head_end(data)):  # the manifest's header, the first payload member's
        assert data[header + 148:header + 149] == b"0"
        changed = data[:header + 148] + replacement + data[header + 149:]
        with pytest.raises(FormatError, match="non-canonical tar header"):
            full_check(changed, policy)


def test_a_numeric_field_in_another_form_is_refused(tmp_path: Path) -> None:
    data, policy = signed_bundle(tmp_path)
    header = bytearray(data[:512])
    header[124:136] = b"%011o " % len(read_head(io.BytesIO(data))[0].manifest_bytes)  # size ended by a space
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(FormatError, match="non-canonical tar header for member 'manifest.json' at offset 0"):
        full_check(bytes(header) + data[512:], policy)


def test_the_unused_bits_of_a_signatures_last_base64_character_are_refused(tmp_path: Path) -> None:
    data, policy = signed_bundle(tmp_path)
    head, _ = read_head(io.BytesIO(data))
    text = base64.b64encode(head.signatures[0].value)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(text[-3]) ^ 0x01]  # the lowest of the four bits nobody reads
    other = text[:-3] + bytes([last]) + b"=="  # the same 64 bytes decode from both
    assert base64.b64decode(other) == head.signatures[0].value and other != text
    changed = data.replace(text, other, 1)
    with pytest.raises(FormatError, match="non-canonical base64"):
        full_check(changed, policy)


def test_a_signatures_member_of_another_size_is_refused_and_sign_never_writes_over_it(tmp_path: Path) -> None:
    data, policy = signed_bundle(tmp_path)
    head, _ = read_head(io.BytesIO(data))
    start = head.signatures_offset - 512
    short = encode_signatures(head.signatures, block_size=1024)
    mtime = int(head.manifest.created.timestamp())
    shrunk = data[:start] + member_bytes(SIGNATURES_MEMBER, short, mtime) + data[start + 512 + 8192:]
    path = tmp_path / "short.airgap"
    path.write_bytes(shrunk)
    with pytest.raises(FormatError, match="signatures member must be exactly 8192 bytes, found 1024"):
        full_check(shrunk, policy)
    with pytest.raises(FormatError, match="must be exactly 8192 bytes"):
        add_signatures(path, [sign(head.manifest_bytes, Ed25519PrivateKey.generate())])
    assert path.read_bytes() == shrunk  # nothing written


def test_signature_lines_out_of_order_or_padding_changed_are_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    data, _ = signed_bundle(tmp_path)
    head, _ = read_head(io.BytesIO(data))
    both = sorted([*head.signatures, sign(head.manifest_bytes, key)], key=lambda s: s.keyid)
    block = encode_signatures(both)
    lines = block.rstrip(b"\n").split(b"\n")
    swapped = b"\n".join([lines[0], lines[2], lines[1]]) + b"\n"
    for bad in (swapped + b"\n" * (8192 - len(swapped)), block[:-2] + b" \n", block[:-1] + b"\0"):
        with pytest.raises(FormatError, match="signatures block"):
            decode_signatures(bad)
    assert decode_signatures(block) == tuple(both)


def long_name_bundle(tmp_path: Path) -> tuple[bytes, TrustPolicy]:
    """A path of more than 100 characters: the writer puts it in a pax header."""
    return signed_bundle(tmp_path, {"d/" * 60 + "x.txt": b"long " * 200, "models/m.gguf": b"GGUF" * 100})


def test_pax_padding_records_and_extra_pax_headers_are_refused(tmp_path: Path) -> None:
    data, policy = long_name_bundle(tmp_path)
    at = data.index(b"././@PaxHeader")
    records_end = at + 512 + int(data[at + 124:at + 135], 8)
    assert data[records_end - 1:records_end] == b"\n"
    changes = {
        "padding": data[:records_end] + b"\n" + data[records_end + 1:],
        "a newline record": data[:records_end + 1] + data[records_end + 2:],
        "an extra pax header": data[:at] + data[at:at + 1024] + data[at:],
        "another record": data.replace(b" path=", b" PATH=", 1),
    }
    for what, changed in changes.items():
        assert refused(changed, policy), what


def test_a_pax_size_that_is_not_a_plain_number_is_refused(tmp_path: Path) -> None:
    data, policy = long_name_bundle(tmp_path)
    at = data.index(b"././@PaxHeader")
    size = int(data[at + 124:at + 135], 8)
    for value in ("\u00b2", "9" * 5000, "-1", "010"):
        record = f" size={value}\n".encode()
        record = str(len(record) + len(str(len(record) + 3))).encode() + record
        records = data[at + 512:at + 512 + size] + record
        pax = member_bytes("././@PaxHeader", records, 0)
        changed = data[:at] + pax[:156] + b"x" + pax[157:] + data[at + 1024:]
        with pytest.raises(FormatError, match="pax|tar header"):
            full_check(changed, policy)


def skippable_frame(size: int) -> bytes:
    return (0x184D2A50).to_bytes(4, "little") + (size - 8).to_bytes(4, "little") + bytes(size - 8)


def test_recompressed_member_with_the_same_content_is_refused(tmp_path: Path) -> None:
    """Re-encoded with other settings, padded to its length with a skippable frame: same decompressed bytes."""
    words = random.Random(7).choices(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"], k=3000)
    text = " ".join(words).encode()
    data, policy = signed_bundle(tmp_path, {"notes.txt": text, "models/m.gguf": b"GGUF" * 100})
    head, _ = read_head(io.BytesIO(data))
    entry = head.manifest.file("notes.txt")
    original = data[data.index(b"\x28\xb5\x2f\xfd"):][:entry.stored_size]
    other = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(text)
    assert len(other) <= entry.stored_size - 8, (len(other), entry.stored_size)
    forged = other + skippable_frame(entry.stored_size - len(other))
    assert zstandard.ZstdDecompressor().stream_reader(forged, read_across_frames=True).read() == text
    with pytest.raises(IntegrityError, match="notes.txt: compressed member differs from the signed manifest"):
        full_check(data.replace(original, forged, 1), policy)


def test_a_big_compressed_member_is_hashed_in_the_same_read_and_refused_before_it_is_kept(tmp_path: Path) -> None:
    """Above CHECK_BEFORE_DECOMPRESS the stored bytes are hashed while they are decompressed."""
    rng = random.Random(3)
    text = b"".join(rng.randbytes(3600) + bytes(496) for _ in range(CHECK_BEFORE_DECOMPRESS // 3600 + 200))
    bundle = make_bundle(tmp_path, {"big.bin": text})
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    entry = head.manifest.file("big.bin")
    assert entry.storage == "zstd" and entry.stored_size > CHECK_BEFORE_DECOMPRESS
    forged = replace(head.manifest, files=(replace(entry, stored_sha256="e" * 64),)).with_sha256sums()
    closed: list[bool] = []

    class Keep:
        def write(self, chunk: bytes, /) -> int:
            return len(chunk)

        def close(self, ok: bool) -> None:
            closed.append(ok)

    with bundle.open("rb") as stream:
        _, tar = read_head(stream)
        with pytest.raises(IntegrityError, match="stored sha256 expected e{64}, found"):
            read_payload(tar, forged, lambda e: Keep())
    assert closed == [False]
    with bundle.open("rb") as stream:
        _, tar = read_head(stream)
        read_payload(tar, head.manifest, lambda e: Keep())
    assert closed == [False, True]


def test_a_format_1_bundle_with_compressed_members_is_refused_with_a_way_out(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, FILES)
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    old = replace(head.manifest, format_version=1,
                  files=tuple(replace(e, stored_sha256=None) for e in head.manifest.files)).with_sha256sums()
    with bundle.open("rb") as stream:
        _, tar = read_head(stream)
        with pytest.raises(FormatError, match="without a signed stored_sha256: rebuild it with this airgap"):
            read_payload(tar, old)


def test_the_end_of_the_archive_is_exactly_two_zero_blocks(tmp_path: Path) -> None:
    data, policy = signed_bundle(tmp_path)
    for changed in (data[:-512], data + bytes(512)):
        assert refused(changed, policy)


def test_headers_do_not_depend_on_pythons_tarfile_but_match_it_here() -> None:
    """Bundles written before the writer had its own encoder used tarfile's bytes: they stay readable."""
    for name, size in (("manifest.json", 1234), ("files/" + "d/" * 60 + "x", 5), ("files/m.gguf", 9 << 30),
                       ("files/" + "y" * 94, 0), ("files/" + "y" * 95, 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 1767312000, 0o644, \
            0, 0, "", ""
        assert member_header(name, size, 1767312000) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"), name


PATTERNS = (lambda b: b ^ 0x01, lambda b: b ^ 0x80, lambda b: b ^ 0xFF, lambda b: 0x00)
HEAD_PATTERNS = (*PATTERNS, lambda b: 0x20, lambda b: 0x09, lambda b: 0x2B, lambda b: 0x30, lambda b: 0x0A,
                 lambda b: 0x3D)  # space, tab, '+', '0', newline, '=': the forms a lenient parser accepts


@pytest.mark.slow
def test_every_byte_with_several_bit_patterns_is_refused(tmp_path: Path) -> None:
    data, policy = signed_bundle(tmp_path)
    accepted = []
    for offset in range(len(data)):
        for pattern in PATTERNS[1:]:  # XOR 0x01 is test_every_flipped_byte_is_refused's
            value = pattern(data[offset])
            if value != data[offset] and not refused(data[:offset] + bytes([value]) + data[offset + 1:], policy):
                accepted.append((offset, value))
    assert accepted == []


@pytest.mark.slow
def test_every_byte_of_the_head_in_every_form_is_refused(tmp_path: Path) -> None:
    """Manifest, signatures and SHA256SUMS members, headers and padding, and the first payload member's header
    (a pax header and its records for a long name): each byte set to each pattern."""
    short, long = signed_bundle(tmp_path / "short"), long_name_bundle(tmp_path / "long")
    for (data, policy), span in ((short, range(head_end(short[0]) + 512)),
                                 (long, range(head_end(long[0]), head_end(long[0]) + 1536))):
        accepted = []
        for offset in span:
            for pattern in HEAD_PATTERNS:
                value = pattern(data[offset])
                if value != data[offset] and not refused(data[:offset] + bytes([value]) + data[offset + 1:], policy):
                    accepted.append((offset, value))
        assert accepted == []


def test_a_pax_header_with_a_negative_base_256_size_is_refused_without_reading_on(tmp_path: Path) -> None:
    data, policy = long_name_bundle(tmp_path)
    at = data.index(b"././@PaxHeader")
    header = bytearray(data[at:at + 512])
    header[124:136] = b"\xff" * 12  # base-256: -1
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(FormatError, match="pax header too large: limit 512 bytes, found -1"):
        full_check(data[:at] + bytes(header) + data[at + 512:], policy)


def test_a_file_whose_known_hash_no_longer_matches_is_refused_while_packing(tmp_path: Path) -> None:
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    wheel.write_bytes(b"resolved bytes")
    known = digest_bytes(wheel.read_bytes()).sha256
    item = prepare_entry(wheel, DraftFile("wheels/x-1.0-py3-none-any.whl", 0, "wheel", sha256=known), tmp_path,
                         compress=False)
    wheel.write_bytes(b"swapped bytes!")  # same size, other content, after the resolver hashed it
    draft = Manifest("b", "1.0", NOW, NOW, "0.1.0", ())
    out = tmp_path / "b.airgap"
    with pytest.raises(IntegrityError, match=f"^wheels/x-1.0-py3-none-any.whl changed since it was hashed: "
                                             f"expected sha256 {known}, found "):
        write_bundle(out, draft, [item], lambda data: [sign(data, Ed25519PrivateKey.generate())])
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
