"""The install flow at unit level, on real bundles written in-process (models and meta files, no wheels, no venv).

Covers the payload, store, switch and rollback parts; the virtualenv part is tested end to end.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import read_head_from_path
from airgap.errors import InstallError, IntegrityError, PolicyError, SignatureError
from airgap.prefix.install import InstallReport, generation_id, install_bundle, rollback, store_path
from airgap.prefix.state import load_state
from airgap.streams.pipeline import digest_bytes
from airgap.trust.signing import TrustPolicy, key_id
from tests.support import make_test_bundle

CLOCK = datetime(2026, 1, 2, 12, tzinfo=UTC)  # make_test_bundle's bundles are valid on 2026-01-02
WEIGHTS = b"GGUF" + bytes(range(256)) * 64
V1 = {"models/m.gguf": WEIGHTS, "notes.txt": b"first " * 300}
V2 = {"models/m.gguf": WEIGHTS, "notes.txt": b"second " * 300}


@dataclass(frozen=True)
class Snapshot:
    """What a refused install must not change."""

    current: str | None
    state: bytes
    tree: tuple[str, ...]


def snapshot(prefix: Path) -> Snapshot:
    link, state = prefix / "current", prefix / "state.json"
    tree = tuple(sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.name != ".lock"))
    return Snapshot(os.readlink(link) if link.is_symlink() else None,
                    state.read_bytes() if state.exists() else b"", tree)


def install(bundle: Path, prefix: Path, key: Ed25519PrivateKey, clock: datetime = CLOCK) -> InstallReport:
    return install_bundle(bundle, prefix, TrustPolicy((key.public_key(),)), clock=clock, progress=False)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_install_stores_links_and_switches(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    bundle = make_test_bundle(tmp_path / "b1", V1, key, version="1.0")
    head = read_head_from_path(bundle)
    prefix = tmp_path / "prefix"
    report = install_bundle(bundle, prefix, TrustPolicy((key.public_key(),)), clock=CLOCK, progress=False)
    gen_id = generation_id(head.manifest, head.manifest_sha256)
    assert report.generation.id == gen_id and report.previous is None
    assert (report.written_bytes, report.reused_bytes) == (sum(map(len, V1.values())), 0)
    assert os.readlink(prefix / "current") == f"versions/{gen_id}"
    for path, data in V1.items():
        blob = store_path(prefix, digest_bytes(data).sha256)
        assert blob.read_bytes() == data and blob.stat().st_mode & 0o777 == 0o444  # verified blobs are read-only
        assert (prefix / "current" / path).resolve() == blob.resolve()
    assert (prefix / "current" / "manifest.json").read_bytes() == head.manifest_bytes
    state = load_state(prefix)
    assert state.active == gen_id and state.pending is None and state.history == (gen_id,)
    assert not (prefix / "staging").exists()


def test_second_version_reuses_the_store_and_rolls_back(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    first = install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    second = install(make_test_bundle(tmp_path / "b2", V2, key, version="1.1"), prefix, key)
    assert second.reused_bytes == len(WEIGHTS)
    assert second.written_bytes == len(V2["notes.txt"])
    gen1, gen2 = first.generation.id, second.generation.id
    assert os.readlink(prefix / "current") == f"versions/{gen2}"
    assert (prefix / "current" / "notes.txt").read_bytes() == V2["notes.txt"]

    came_from, went_to = rollback(prefix)
    assert (came_from.id, went_to.id) == (gen2, gen1)
    assert os.readlink(prefix / "current") == f"versions/{gen1}"
    assert (prefix / "current" / "notes.txt").read_bytes() == V1["notes.txt"]
    assert load_state(prefix).active == gen1
    # the newer version stays installed: roll forward by name
    assert rollback(prefix, "1.1")[1].id == gen2
    assert os.readlink(prefix / "current") == f"versions/{gen2}"


def test_reinstall_reads_it_all_and_writes_nothing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    b1 = make_test_bundle(tmp_path / "b1", V1, key, version="1.0")
    first = install(b1, prefix, key)
    before = snapshot(prefix)
    again = install(b1, prefix, key)
    assert again.already_installed and again.written_bytes == 0
    assert again.generation == first.generation
    assert snapshot(prefix) == before


def test_wrong_key_leaves_the_prefix_unchanged(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    before = snapshot(prefix)
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 1 trusted key\(s\) "
                                             rf"\[{key_id(key.public_key())[:16]}\], found 0 valid among signatures "
                                             rf"by \[{key_id(stranger.public_key())[:16]}\]$"):
        install(make_test_bundle(tmp_path / "b2", V2, stranger, version="1.1"), prefix, key)
    assert snapshot(prefix) == before
    assert not store_path(prefix, digest_bytes(V2["notes.txt"]).sha256).exists()


def test_damaged_payload_leaves_the_prefix_unchanged(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    before = snapshot(prefix)
    files = {"models/m.gguf": WEIGHTS + b"new weights" * 100, "notes.txt": V2["notes.txt"]}
    bundle = make_test_bundle(tmp_path / "b2", files, key, version="1.1")
    data = bytearray(bundle.read_bytes())
    start = bytes(data).index(files["models/m.gguf"])
    data[start + 5000] ^= 0xFF
    bundle.write_bytes(bytes(data))
    expected = digest_bytes(files["models/m.gguf"]).sha256
    found = digest_bytes(bytes(data[start:start + len(files["models/m.gguf"])])).sha256
    with pytest.raises(IntegrityError, match=rf"^models/m\.gguf: sha256 mismatch: expected {expected}, "
                                             rf"found {found}$"):
        install(bundle, prefix, key)
    assert snapshot(prefix) == before
    assert not store_path(prefix, expected).exists() and not store_path(prefix, found).exists()


def test_expired_bundle_refused_before_anything_is_written(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    before = snapshot(prefix)
    with pytest.raises(PolicyError, match=r"^bundle b 1\.1 expired at 2026-01-03T00:00:00Z; trusted time is "
                                        r"2026-01-04T00:00:00Z \(use --allow-expired to accept it anyway\)$"):
        install(make_test_bundle(tmp_path / "b2", V2, key, version="1.1"), prefix, key,
                clock=datetime(2026, 1, 4, tzinfo=UTC))
    assert snapshot(prefix) == before


def test_downgrade_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    install(make_test_bundle(tmp_path / "b2", V2, key, version="1.1"), prefix, key)
    before = snapshot(prefix)
    with pytest.raises(PolicyError, match=r"^downgrade refused: b 1\.1 was accepted, this bundle is 1\.0 \(use "
                                        r"--allow-downgrade, or `airgap rollback` to an installed version\)$"):
        install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    assert snapshot(prefix) == before


def test_leftovers_of_a_crashed_install_are_cleaned(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    first = install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    (prefix / "staging" / "b-1.1-0123456789ab").mkdir(parents=True)  # what a crash before `ready` leaves
    (prefix / "staging" / "b-1.1-0123456789ab" / "half").write_bytes(b"half a file")
    (prefix / "versions" / "b-1.1-0123456789ab").mkdir()
    second = install(make_test_bundle(tmp_path / "b2", V2, key, version="1.1"), prefix, key)
    assert sorted(p.name for p in (prefix / "versions").iterdir()) == sorted(
        [first.generation.id, second.generation.id])
    assert not (prefix / "staging").exists()


def test_rollback_refusals(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    prefix = tmp_path / "prefix"
    with pytest.raises(InstallError, match=rf"^nothing is installed under {re.escape(str(prefix))}$"):
        rollback(prefix)
    install(make_test_bundle(tmp_path / "b1", V1, key, version="1.0"), prefix, key)
    before = snapshot(prefix)
    with pytest.raises(InstallError, match=r"^no earlier version to roll back to: only b 1\.0 is installed$"):
        rollback(prefix)
    with pytest.raises(InstallError, match=r"^version 9\.9 is not installed; installed: 1\.0$"):
        rollback(prefix, "9.9")
    assert snapshot(prefix) == before
    assert json.loads((prefix / "state.json").read_text())["active"] == load_state(prefix).active
