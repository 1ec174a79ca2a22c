"""Update drops and co-signing, on bundles written by airgap.bundle.drops.pack (the path `airgap build` takes)."""

from __future__ import annotations

import io
import re
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import Head, prepare_entry, read_head, read_head_from_path, read_payload
from airgap.bundle.drops import (
    cosign_bundle,
    create_root,
    is_root_file,
    load_roots,
    missing_signatures,
    pack,
    read_base,
    root_payload,
    write_root_file,
)
from airgap.errors import AirgapError, IntegrityError, SpecError, TrustError
from airgap.format.manifest import BaseRef, DraftFile, FileKind, Manifest, ModelEntry
from airgap.streams.pipeline import digest_bytes
from airgap.trust.roots import Root, parse_root
from airgap.trust.signing import TrustPolicy, key_id, sign

T0 = datetime(2030, 1, 1, tzinfo=UTC)
WEIGHTS = b"GGUF" + bytes(range(256)) * 64
V1 = {"models/m/w.gguf": WEIGHTS, "notes.txt": b"first notes " * 100, "config.json": b'{"a": 1}'}
V2 = {"models/m/w.gguf": WEIGHTS, "notes.txt": b"second notes " * 100, "config.json": b'{"a": 1}',
      "extra/config-copy.json": b'{"a": 1}', "new.txt": b"new file"}


def build(folder: Path, version: str, files: dict[str, bytes], key: Ed25519PrivateKey, *, name: str = "x",
          base: Head | None = None, roots: tuple[Root, ...] = ()) -> Path:
    src, work = folder / f"src-{version}", folder / f"work-{version}"
    src.mkdir(parents=True)
    work.mkdir()
    payload = []
    for rel, data in files.items():
        local = src / rel.replace("/", "__")
        local.write_bytes(data)
        kind: FileKind = "model" if rel.startswith("models/") else "meta"
        payload.append(prepare_entry(local, DraftFile(path=rel, size=0, kind=kind), work))
    draft = Manifest(name=name, version=version, created=T0, expires=T0 + timedelta(days=30), tool_version="test",
                     files=(), models=(ModelEntry("m", ("models/m/w.gguf",)),))
    out = folder / f"{name}-{version}.airgap"
    pack(out, draft, [*root_payload(roots, work), *payload], lambda data: [sign(data, key)], base)
    return out


def members(bundle: Path) -> list[str]:
    with tarfile.open(bundle) as tar:
        return tar.getnames()


def verified(bundle: Path, key: Ed25519PrivateKey) -> Head:
    with bundle.open("rb") as stream:
        head, tar = read_head(stream)
        TrustPolicy((key.public_key(),)).check(head.manifest_bytes, head.signatures)
        read_payload(tar, head.manifest)
    return head


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# ---------------------------------------------------------------- drops

def test_drop_carries_only_what_the_base_lacks(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    full = build(tmp_path, "1.0", V1, key)
    base = read_head_from_path(full)
    drop = build(tmp_path, "1.1", V2, key, base=base)
    head = verified(drop, key)
    manifest = head.manifest
    assert manifest.base == BaseRef("x", "1.0", base.manifest_sha256)
    by_path = {e.path: e for e in manifest.files}
    assert sorted(by_path) == sorted(V2)  # the manifest describes the whole target state
    for path, data in V2.items():  # with every file's real size and hash, carried or not
        assert (by_path[path].size, by_path[path].sha256) == (len(data), digest_bytes(data).sha256), path
    absent = sorted(p for p, e in by_path.items() if e.storage == "absent")
    # by content: the copy under a new path is absent too, since the base has those bytes
    assert absent == ["config.json", "extra/config-copy.json", "models/m/w.gguf"]
    assert all(by_path[p].stored_size == 0 for p in absent)
    assert sorted(m for m in members(drop) if m.startswith("files/")) == ["files/new.txt", "files/notes.txt.zst"]
    assert drop.stat().st_size < full.stat().st_size - len(WEIGHTS)


def test_a_full_bundle_carries_everything(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    head = verified(build(tmp_path, "1.0", V1, key), key)
    assert head.manifest.base is None
    assert all(e.carried for e in head.manifest.files)


def test_root_files_are_carried_even_when_the_base_has_them(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root_key = Ed25519PrivateKey.generate()
    root = create_root(1, [root_key.public_key()], 1, [key.public_key()], 1, T0 + timedelta(days=365), [root_key])
    base = read_head_from_path(build(tmp_path, "1.0", V1, key, roots=(root,)))
    drop = build(tmp_path, "1.1", V2, key, base=base, roots=(root,))
    entry = next(e for e in read_head_from_path(drop).manifest.files if e.path == "trust/root.1.json")
    assert entry.carried and entry.storage == "raw"  # readable with tar and a JSON viewer
    payload = [m for m in members(drop) if m.startswith("files/")]
    assert payload[0] == "files/trust/root.1.json"  # roots first: trust before data


def test_drop_must_keep_the_name(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    base = read_head_from_path(build(tmp_path, "1.0", V1, key))
    with pytest.raises(SpecError, match=r"^a drop applies on top of the same bundle name: building y, base is x$"):
        build(tmp_path, "1.1", V2, key, name="y", base=base)


@pytest.mark.parametrize("version", ["1.0", "0.9"])
def test_drop_must_be_newer_than_its_base(tmp_path: Path, key: Ed25519PrivateKey, version: str) -> None:
    base = read_head_from_path(build(tmp_path / "base", "1.0", V1, key))
    with pytest.raises(SpecError, match=rf"^a drop must be newer than its base: building {re.escape(version)}, "
                                        rf"base is 1\.0$"):
        build(tmp_path, version, V2, key, base=base)
    assert not list(tmp_path.glob("x-*.airgap"))  # nothing written


def test_read_base_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"^base bundle not found: {re.escape(str(tmp_path / 'gone.airgap'))}$"):
        read_base(tmp_path / "gone.airgap")


def test_read_base_of_a_plain_tar(tmp_path: Path) -> None:
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(SpecError, match=rf"^base bundle {re.escape(str(path))}: not an airgap bundle: expected "
                                        rf"member 'manifest\.json', found 'readme\.txt'$"):
        read_base(path)


def test_read_base_of_a_short_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a bundle\n")
    with pytest.raises(SpecError, match=rf"^base bundle {re.escape(str(path))}: bundle truncated: expected 512 more "
                                        rf"bytes of a tar header at offset 0, found 13$"):
        read_base(path)


# ---------------------------------------------------------------- co-signing

def test_cosign_adds_a_signature_in_place(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    bundle = build(tmp_path, "1.0", V1, key)
    before = bundle.read_bytes()
    head = read_head_from_path(bundle)
    cosigner = Ed25519PrivateKey.generate()
    signed = cosign_bundle(bundle, [cosigner])
    after = bundle.read_bytes()
    assert len(after) == len(before)
    start, end = head.signatures_offset, head.signatures_offset + 8192
    assert after[:start] == before[:start] and after[end:] == before[end:]  # not one payload byte moved
    assert after[start:end] != before[start:end]
    ids = {s.keyid for s in read_head_from_path(bundle).signatures}
    assert ids == {key_id(key.public_key()), key_id(cosigner.public_key())} == {s.keyid for s in signed.signatures}
    policy = TrustPolicy((key.public_key(), cosigner.public_key()), threshold=2)
    assert len(policy.check(signed.manifest_bytes, read_head_from_path(bundle).signatures)) == 2


def test_cosign_checks_every_file_first(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """A co-signer vouches for the whole bundle: a damaged payload is refused and the file is left as it was."""
    bundle = build(tmp_path, "1.0", V1, key)
    data = bytearray(bundle.read_bytes())
    start = bytes(data).index(WEIGHTS)  # stored raw: weights are never compressed
    data[start + 1000] ^= 0xFF
    bundle.write_bytes(bytes(data))
    entry = next(e for e in read_head_from_path(bundle).manifest.files if e.path == "models/m/w.gguf")
    found = digest_bytes(bytes(data[start:start + len(WEIGHTS)])).sha256
    with pytest.raises(IntegrityError, match=rf"^models/m/w\.gguf: sha256 mismatch: expected {entry.sha256}, "
                                             rf"found {found}$"):
        cosign_bundle(bundle, [Ed25519PrivateKey.generate()])
    assert bundle.read_bytes() == bytes(data)


def test_is_root_file(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = create_root(1, [key.public_key()], 1, [key.public_key()], 1, T0, [key])
    write_root_file(tmp_path / "root.1.json", root)
    assert is_root_file(tmp_path / "root.1.json")
    assert not is_root_file(build(tmp_path, "1.0", V1, key))
    with pytest.raises(AirgapError, match=rf"^file to sign not found: {re.escape(str(tmp_path / 'nope'))}$"):
        is_root_file(tmp_path / "nope")


# ---------------------------------------------------------------- the roots a bundle carries

def test_load_roots_refuses_one_version_twice(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = create_root(1, [key.public_key()], 1, [key.public_key()], 1, T0, [key])
    for name in ("a.json", "b.json"):
        write_root_file(tmp_path / name, root)
    with pytest.raises(SpecError, match=r"^root files given twice for one version: versions \[1, 1\]$"):
        load_roots([tmp_path / "a.json", tmp_path / "b.json"])


def test_load_roots_refuses_an_unsigned_first_root(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    write_root_file(tmp_path / "root.1.json", create_root(1, [key.public_key()], 1, [key.public_key()], 1, T0))
    with pytest.raises(TrustError, match=r"^root version 1 \(signed by its own root keys\) is not signed: expected "
                                         r"1 signature\(s\) from trusted keys, found none$"):
        load_roots([tmp_path / "root.1.json"])
    assert missing_signatures(load_root_unchecked(tmp_path / "root.1.json")) == [
        "1 more root-key signature(s) of version 1"]


def test_load_roots_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"^cannot read root file {re.escape(str(tmp_path))}: Is a directory$"):
        load_roots([tmp_path])


def test_load_roots_sorts_the_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    second_key = Ed25519PrivateKey.generate()
    first = create_root(1, [key.public_key()], 1, [key.public_key()], 1, T0, [key])
    second = create_root(2, [second_key.public_key()], 1, [key.public_key()], 1, T0, [key, second_key])
    write_root_file(tmp_path / "b.json", first)
    write_root_file(tmp_path / "a.json", second)
    assert [r.version for r in load_roots([tmp_path / "a.json", tmp_path / "b.json"])] == [1, 2]
    assert missing_signatures(second) == []


def load_root_unchecked(path: Path) -> Root:
    return parse_root(path.read_bytes())
