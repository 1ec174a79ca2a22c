"""The trust gate on real bundles: signatures, thresholds of distinct keys, root chains, expired roots.

Every bundle here is written by the real writer (tests.support.make_test_bundle) and signed with real
Ed25519 keys. The gate wraps a recording sink factory, so each test also sees what the gate handed on:
nothing at all when it refused, the root files only after the manifest was authentic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import read_head, read_head_from_path, read_payload
from airgap.bundle.drops import cosign_bundle, create_root
from airgap.bundle.gate import Anchor, TrustGate, VerifiedManifest
from airgap.errors import FormatError, SignatureError, TrustError
from airgap.format.manifest import DEFAULT_LIMITS, FileEntry, Limits
from airgap.trust.acceptance import NO_OVERRIDES, Overrides
from airgap.trust.roots import Root
from airgap.trust.signing import TrustPolicy, encode_signatures, key_id
from tests.support import make_test_bundle

NOW = datetime(2026, 1, 2, 12, tzinfo=UTC)  # make_test_bundle's bundles: created 2026-01-02, valid one day
FILES = {"notes.txt": b"release notes " * 200, "models/m.gguf": b"GGUF" + bytes(range(256)) * 16}


def new_keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def short(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())[:16]


def policy(*keys: Ed25519PrivateKey, threshold: int = 1) -> TrustPolicy:
    return TrustPolicy(tuple(k.public_key() for k in keys), threshold)


def make_root(version: int, root_keys: list[Ed25519PrivateKey], release: list[Ed25519PrivateKey], *,
              signers: list[Ed25519PrivateKey], expires: datetime = NOW + timedelta(days=365)) -> Root:
    return create_root(version, [k.public_key() for k in root_keys], 1, [k.public_key() for k in release], 1,
                       expires, signers)


@dataclass
class Recorder:
    """The installer's side of the gate: which files reached it, in order, with their bytes."""

    received: list[tuple[str, bytes]] = field(default_factory=list)

    def __call__(self, entry: FileEntry) -> _Kept:
        return _Kept(self, entry.path)


@dataclass
class _Kept:
    recorder: Recorder
    path: str
    chunks: list[bytes] = field(default_factory=list)

    def write(self, chunk: bytes, /) -> object:
        self.chunks.append(chunk)
        return len(chunk)

    def close(self, ok: bool) -> None:
        if ok:
            self.recorder.received.append((self.path, b"".join(self.chunks)))


def through_gate(bundle: Path, anchor: Anchor, recorder: Recorder, *, now: datetime = NOW,
                 overrides: Overrides = NO_OVERRIDES, limits: Limits = DEFAULT_LIMITS) -> VerifiedManifest:
    with bundle.open("rb") as stream:
        head, tar = read_head(stream)
        gate = TrustGate(head, anchor, now, overrides, recorder, limits)
        read_payload(tar, head.manifest, gate.open_sink)
        return gate.finish()


# ---------------------------------------------------------------- plain keys (--trust PUB)

def test_accepted_with_the_right_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    bundle = make_test_bundle(tmp_path, FILES, key)
    recorder = Recorder()
    auth = through_gate(bundle, policy(key), recorder)
    assert (auth.signers, auth.new_roots, auth.overrides) == ((key_id(key.public_key()),), (), ())
    with bundle.open("rb") as stream:
        head, _ = read_head(stream)
    assert auth.manifest_bytes == head.manifest_bytes and auth.manifest == head.manifest  # what was verified
    assert auth.root_version is None
    assert dict(recorder.received) == FILES  # every file handed on, byte for byte


def test_refused_with_a_wrong_key(tmp_path: Path) -> None:
    signer, trusted = new_keys(2)
    bundle = make_test_bundle(tmp_path, FILES, signer)
    recorder = Recorder()
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 1 trusted key\(s\) "
                                             rf"\[{short(trusted)}\], found 0 valid among signatures by "
                                             rf"\[{short(signer)}\]$"):
        through_gate(bundle, policy(trusted), recorder)
    assert recorder.received == []


def test_refused_without_a_signature(tmp_path: Path) -> None:
    """A signed bundle whose signatures block was blanked in place (same size, so the tar stays valid)."""
    key = Ed25519PrivateKey.generate()
    bundle = make_test_bundle(tmp_path, FILES, key)
    head = read_head_from_path(bundle)
    with bundle.open("r+b") as stream:
        stream.seek(head.signatures_offset)
        stream.write(encode_signatures([]))
    assert read_head_from_path(bundle).signatures == ()
    recorder = Recorder()
    with pytest.raises(SignatureError, match=r"^bundle manifest is not signed: expected 1 signature\(s\) from "
                                             r"trusted keys, found none$"):
        through_gate(bundle, policy(key), recorder)
    assert recorder.received == []


def test_refused_when_no_key_is_trusted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    bundle = make_test_bundle(tmp_path, FILES, key)
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 1 trusted key\(s\) "
                                             rf"\[none\], found 0 valid among signatures by \[{short(key)}\]$"):
        through_gate(bundle, TrustPolicy(keys=()), Recorder())


def test_threshold_counts_distinct_keys(tmp_path: Path) -> None:
    a, b = new_keys(2)
    bundle = make_test_bundle(tmp_path, FILES, a)
    ids = f"{short(a)}, {short(b)}"
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 2 trusted key\(s\) "
                                             rf"\[{re.escape(ids)}\], found 1 valid among signatures by "
                                             rf"\[{short(a)}\]$"):
        through_gate(bundle, policy(a, b, threshold=2), Recorder())
    # one key trusted twice is still one key: listing it again does not reach a threshold of 2
    twice = f"{short(a)}, {short(a)}"
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 2 trusted key\(s\) "
                                             rf"\[{re.escape(twice)}\], found 1 valid among signatures by "
                                             rf"\[{short(a)}\]$"):
        through_gate(bundle, policy(a, a, threshold=2), Recorder())
    cosign_bundle(bundle, [b])
    auth = through_gate(bundle, policy(a, b, threshold=2), Recorder())
    assert auth.signers == tuple(sorted([key_id(a.public_key()), key_id(b.public_key())]))


def test_an_untrusted_cosigner_does_not_count(tmp_path: Path) -> None:
    a, b, stranger = new_keys(3)
    bundle = make_test_bundle(tmp_path, FILES, a)
    cosign_bundle(bundle, [stranger])
    with pytest.raises(SignatureError, match=r"^bundle manifest: expected valid signatures from 2 trusted key\(s\) "
                                             r".*found 1 valid among signatures by \[[0-9a-f]{16}, [0-9a-f]{16}\]$"):
        through_gate(bundle, policy(a, b, threshold=2), Recorder())
    auth = through_gate(bundle, policy(a, b), Recorder())
    assert auth.signers == (key_id(a.public_key()),)  # only the trusted key's signature counted


# ---------------------------------------------------------------- a pinned root and the chain a bundle carries

@dataclass(frozen=True)
class Chain:
    root_keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey]
    release: tuple[Ed25519PrivateKey, Ed25519PrivateKey]
    first: Root  # pinned on the host: root keys [0], release key [0]
    second: Root  # the rotation: root keys [1], release key [1], signed by both root keys


@pytest.fixture
def chain() -> Chain:
    r1, r2 = new_keys(2)
    k1, k2 = new_keys(2)
    first = make_root(1, [r1], [k1], signers=[r1])
    second = make_root(2, [r2], [k2], signers=[r1, r2])
    return Chain((r1, r2), (k1, k2), first, second)


def test_pinned_root_accepts_its_release_key(tmp_path: Path, chain: Chain) -> None:
    bundle = make_test_bundle(tmp_path, FILES, chain.release[0])
    auth = through_gate(bundle, chain.first, Recorder())
    assert auth.signers == (key_id(chain.release[0].public_key()),)
    assert auth.new_roots == () and auth.root_version is None
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 1 trusted key\(s\) "
                                             rf"\[{short(chain.release[0])}\], found 0 valid among signatures by "
                                             rf"\[{short(chain.root_keys[0])}\]$"):
        # a root key is not a release key
        through_gate(make_test_bundle(tmp_path / "r", FILES, chain.root_keys[0]), chain.first, Recorder())


def test_root_chain_rotates_to_the_new_release_key(tmp_path: Path, chain: Chain) -> None:
    files = {"trust/root.2.json": chain.second.to_bytes(), **FILES}
    bundle = make_test_bundle(tmp_path, files, chain.release[1])
    recorder = Recorder()
    auth = through_gate(bundle, chain.first, recorder)
    assert auth.signers == (key_id(chain.release[1].public_key()),)
    assert [r.version for r in auth.new_roots] == [2] and auth.root_version == 2
    assert auth.new_roots[0].to_bytes() == chain.second.to_bytes()
    # the root file was held back, then handed on intact and first
    assert recorder.received[0] == ("trust/root.2.json", chain.second.to_bytes())
    assert dict(recorder.received) == files


def test_old_release_key_refused_after_rotation(tmp_path: Path, chain: Chain) -> None:
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": chain.second.to_bytes(), **FILES}, chain.release[0])
    recorder = Recorder()
    with pytest.raises(SignatureError, match=rf"^bundle manifest: expected valid signatures from 1 trusted key\(s\) "
                                             rf"\[{short(chain.release[1])}\], found 0 valid among signatures by "
                                             rf"\[{short(chain.release[0])}\]$"):
        through_gate(bundle, chain.first, recorder)
    assert recorder.received == []  # the root file was not handed on either


def test_rotation_without_the_old_root_keys_refused(tmp_path: Path, chain: Chain) -> None:
    r2 = chain.root_keys[1]
    usurper = make_root(2, [r2], [chain.release[1]], signers=[r2])  # signed only by its own new root key
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": usurper.to_bytes(), **FILES}, chain.release[1])
    recorder = Recorder()
    with pytest.raises(TrustError, match=rf"^root version 2 \(signed by the root keys of version 1\): expected "
                                         rf"valid signatures from 1 trusted key\(s\) \[{short(chain.root_keys[0])}\], "
                                         rf"found 0 valid among signatures by \[{short(r2)}\]$"):
        through_gate(bundle, chain.first, recorder)
    assert recorder.received == []


def test_broken_chain_refused(tmp_path: Path, chain: Chain) -> None:
    third = make_root(3, [chain.root_keys[1]], [chain.release[1]], signers=[chain.root_keys[1]])
    bundle = make_test_bundle(tmp_path, {"trust/root.3.json": third.to_bytes(), **FILES}, chain.release[1])
    with pytest.raises(TrustError, match=r"^root chain broken: the bundle carries root version 3 but not version 2, "
                                         r"which this host \(trusting version 1\) needs first$"):
        through_gate(bundle, chain.first, Recorder())


def test_replayed_old_root_changes_nothing(tmp_path: Path, chain: Chain) -> None:
    bundle = make_test_bundle(tmp_path, {"trust/root.1.json": chain.first.to_bytes(), **FILES}, chain.release[1])
    auth = through_gate(bundle, chain.second, Recorder())
    assert auth.new_roots == () and auth.signers == (key_id(chain.release[1].public_key()),)


def test_root_file_after_other_payload_refused(tmp_path: Path, chain: Chain) -> None:
    """Signed by root 1's release key, so the manifest is authentic at notes.txt; a root after that is refused
    (late roots must not change which keys were trusted)."""
    files = {"notes.txt": FILES["notes.txt"], "trust/root.2.json": chain.second.to_bytes()}
    bundle = make_test_bundle(tmp_path, files, chain.release[0])
    recorder = Recorder()
    with pytest.raises(FormatError, match=r"^trust/root\.2\.json comes after other payload files: root files must "
                                          r"come first$"):
        through_gate(bundle, chain.first, recorder)
    assert [path for path, _ in recorder.received] == ["notes.txt"]


def test_root_file_over_the_metadata_limit_refused(tmp_path: Path, chain: Chain) -> None:
    data = chain.second.to_bytes()
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": data, **FILES}, chain.release[1])
    size = next(e.size for e in read_head_from_path(bundle).manifest.files if e.path == "trust/root.2.json")
    with pytest.raises(FormatError, match=rf"^trust/root\.2\.json: root file too large: limit 100 bytes, manifest "
                                          rf"declares {size}$"):
        through_gate(bundle, chain.first, Recorder(), limits=Limits(max_metadata_bytes=100))


def test_too_many_root_files_refused(tmp_path: Path, chain: Chain) -> None:
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": chain.second.to_bytes(), **FILES}, chain.release[1])
    with pytest.raises(TrustError, match=r"^bundle carries 1 root files, limit 0$"):
        through_gate(bundle, chain.first, Recorder(), limits=Limits(max_root_chain=0))


# ---------------------------------------------------------------- freshness of the newest root

def test_expired_pinned_root_refused_unless_allowed(tmp_path: Path, chain: Chain) -> None:
    r1, k1 = chain.root_keys[0], chain.release[0]
    stale = make_root(1, [r1], [k1], signers=[r1], expires=NOW - timedelta(days=1))
    bundle = make_test_bundle(tmp_path, FILES, k1)
    recorder = Recorder()
    with pytest.raises(TrustError, match=r"^trusted root version 1 expired at 2026-01-01T12:00:00Z; trusted time is "
                                         r"2026-01-02T12:00:00Z \(install a bundle carrying a newer root, or use "
                                         r"--allow-expired\)$"):
        through_gate(bundle, stale, recorder)
    assert recorder.received == []
    auth = through_gate(bundle, stale, Recorder(), overrides=Overrides(allow_expired=True))
    assert auth.overrides == ("allow-expired-root",)


def test_a_fresh_rotation_rescues_an_expired_pinned_root(tmp_path: Path, chain: Chain) -> None:
    r1, k1 = chain.root_keys[0], chain.release[0]
    stale = make_root(1, [r1], [k1], signers=[r1], expires=NOW - timedelta(days=1))
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": chain.second.to_bytes(), **FILES}, chain.release[1])
    auth = through_gate(bundle, stale, Recorder())
    assert auth.root_version == 2 and auth.overrides == ()


def test_an_expired_rotation_is_refused(tmp_path: Path, chain: Chain) -> None:
    r1, r2 = chain.root_keys
    stale_second = make_root(2, [r2], [chain.release[1]], signers=[r1, r2], expires=NOW - timedelta(hours=1))
    bundle = make_test_bundle(tmp_path, {"trust/root.2.json": stale_second.to_bytes(), **FILES}, chain.release[1])
    with pytest.raises(TrustError, match=r"^trusted root version 2 expired at 2026-01-02T11:00:00Z; trusted time is "
                                         r"2026-01-02T12:00:00Z \(install a bundle carrying a newer root, or use "
                                         r"--allow-expired\)$"):
        through_gate(bundle, chain.first, Recorder())


def test_plain_keys_do_not_judge_expiry(tmp_path: Path) -> None:
    """With --trust PUB there is no root to expire; the bundle's own expiry is check_acceptance's decision."""
    key = Ed25519PrivateKey.generate()
    bundle = make_test_bundle(tmp_path, FILES, key)
    auth = through_gate(bundle, policy(key), Recorder(), now=NOW + timedelta(days=3650))
    assert auth.overrides == ()
