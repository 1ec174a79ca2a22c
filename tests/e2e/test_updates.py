"""Signed update drops, end to end: each attack refused with nothing changed, the happy paths, crash safety.

Every attack test asserts the refusal *and* that the active version and all persisted state (state.json,
trusted roots, installed versions) are exactly as before. Bundles hold model and meta files only (no
wheels, so no virtualenv); the real CLI with real wheels runs in the slow test at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import zstandard

from airgap.bundle.drops import cosign_bundle
from airgap.errors import AirgapError, FormatError, IntegrityError, PolicyError, SignatureError, TrustError
from airgap.format.manifest import BaseRef
from airgap.prefix.install import rollback, trust_init
from airgap.trust.acceptance import Overrides
from airgap.trust.roots import Root
from airgap.trust.signing import SIGNATURES_BLOCK_SIZE, encode_signatures, key_id, public_pem, sign
from tests.e2e.update_support import (
    REPO,
    T0,
    active_version,
    airgap,
    day,
    head,
    install,
    make_bundle,
    make_root,
    member_data,
    new_key,
    replace_member,
    snapshot,
    write_key_files,
)
from tests.e2e.update_support import (
    members as tar_members,
)

WEIGHTS = os.urandom(512 << 10)
NEW_WEIGHTS = os.urandom(512 << 10)
NOTES = os.urandom(8 << 10).hex().encode()  # compresses by half: stored as zstd
MODEL = "models/m/weights.gguf"


def files(version: str, weights: bytes = WEIGHTS) -> dict[str, bytes]:
    return {MODEL: weights, "notes.txt": f"release notes of {version}\n".encode() + NOTES}


@dataclass
class World:
    """A publisher (one root key, release keys a and b, threshold 1) and a host that pinned its root."""

    folder: Path
    host: Path
    root_key: object
    a: object
    b: object
    root: Root


@pytest.fixture
def world(tmp_path: Path) -> World:
    root_key, a, b = new_key(), new_key(), new_key()
    root = make_root(1, [root_key], [a, b])
    host = tmp_path / "host"
    trust_init(host, root.to_bytes(), clock=T0)
    return World(tmp_path, host, root_key, a, b, root)


def bundle(w: World, version: str, *, signers: list[object] | None = None, weights: bytes = WEIGHTS,
           **kwargs: object) -> Path:
    kwargs.setdefault("roots", [w.root])
    return make_bundle(w.folder, version, files(version, weights), signers or [w.a], **kwargs)  # type: ignore[arg-type]


def refused(w: World, bundle_path: Path, error: type[AirgapError], match: str, **kwargs: object) -> AirgapError:
    """Install must fail with `error` and leave the host exactly as it was."""
    before = snapshot(w.host)
    with pytest.raises(error, match=match) as caught:
        install(bundle_path, w.host, **kwargs)  # type: ignore[arg-type]
    assert snapshot(w.host) == before
    assert not (w.host / "staging").exists()
    return caught.value


# ---------------------------------------------------------------- attacks, one test each

def test_replayed_older_bundle_refused(world: World) -> None:
    old = bundle(world, "1.0.0")
    older_never_installed = bundle(world, "0.9.0")
    install(old, world.host)
    install(bundle(world, "1.1.0", created=day(1)), world.host, clock=day(1))
    refused(world, old, PolicyError, r"downgrade refused: x 1\.1\.0 was accepted, this bundle is 1\.0\.0",
            clock=day(2))
    refused(world, older_never_installed, PolicyError, "downgrade refused", clock=day(2))
    assert active_version(world.host) == "1.1.0"


def test_equal_version_with_other_content_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    other = make_bundle(world.folder / "other", "1.0.0", files("1.0.0", NEW_WEIGHTS), [world.a], roots=[world.root])
    refused(world, other, PolicyError, r"x 1\.0\.0 is installed with other content")


def test_expired_bundle_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    stale = bundle(world, "1.1.0", expires_days=30)
    refused(world, stale, PolicyError, r"expired at 2030-01-31T00:00:00Z.*--allow-expired", clock=day(31))


def test_clock_set_back_does_not_revive_an_expired_bundle(world: World) -> None:
    frozen = bundle(world, "2.0.0", expires_days=30)  # an attacker kept this one back
    install(bundle(world, "1.0.0", created=day(100)), world.host, clock=day(100))
    # the host's clock is set back to a time when `frozen` was still fresh: the host does not believe it
    refused(world, frozen, PolicyError, r"expired at 2030-01-31.*trusted time is 2030-04-11", clock=day(10))


def test_mix_and_match_file_from_another_version_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    v11 = bundle(world, "1.1.0", weights=NEW_WEIGHTS)
    v10 = world.folder / "x-1.0.0.airgap"
    member = f"files/{MODEL}"
    mixed = world.folder / "mixed.airgap"
    mixed.write_bytes(replace_member(v11.read_bytes(), member, member_data(v10.read_bytes(), member)))
    refused(world, mixed, IntegrityError, r"models/m/weights.gguf: sha256 mismatch")


def test_mix_and_match_head_of_one_version_payload_of_another_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    v11 = bundle(world, "1.1.0", weights=NEW_WEIGHTS).read_bytes()
    v12 = bundle(world, "1.2.0", weights=WEIGHTS).read_bytes()
    payload_at = next(h for name, h, _, _ in tar_members(v12) if name == "SHA256SUMS")
    head_end = next(h for name, h, _, _ in tar_members(v11) if name == "SHA256SUMS")
    mixed = world.folder / "mixed.airgap"
    mixed.write_bytes(v11[:head_end] + v12[payload_at:])
    refused(world, mixed, IntegrityError, "SHA256SUMS in the bundle does not match the signed manifest")


def test_drop_on_the_wrong_base_refused(world: World) -> None:
    full10 = bundle(world, "1.0.0")
    other10 = make_bundle(world.folder / "other", "1.0.0", files("1.0.0", NEW_WEIGHTS), [world.a],
                          roots=[world.root])
    drop11 = bundle(world, "1.1.0", base=full10)
    # nothing installed yet: the message names the base the drop needs
    refused(world, drop11, PolicyError, r"applies on top of x 1\.0\.0 \(manifest [0-9a-f]{16}\), which is not "
                                        r"installed here; install x 1\.0\.0 first")
    install(other10, world.host)  # 1.0.0, but another build of it
    refused(world, drop11, PolicyError, r"installed 1\.0\.0 from another build")
    assert full10.exists()


def test_revoked_release_key_refused_in_the_bundle_that_revokes_it(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    revoking = make_root(2, [world.root_key], [world.b], signers=[world.root_key])  # a leaves the release role
    refused(world, bundle(world, "1.1.0", signers=[world.a], roots=[world.root, revoking]), SignatureError,
            r"bundle manifest: expected valid signatures from 1 trusted key\(s\)")
    install(bundle(world, "1.1.0", signers=[world.b], roots=[world.root, revoking]), world.host)
    assert json.loads((world.host / "state.json").read_text())["trusted_root"] == 2
    # and from then on, even a bundle that carries no roots at all
    refused(world, bundle(world, "1.2.0", signers=[world.a], roots=[]), SignatureError, "found 0 valid")


def test_untrusted_release_key_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    stranger = new_key()
    refused(world, bundle(world, "1.1.0", signers=[stranger]), SignatureError, "found 0 valid")
    # a root key is not a release key either
    refused(world, bundle(world, "1.1.0", signers=[world.root_key]), SignatureError, "found 0 valid")


def two_person_world(tmp_path: Path) -> World:
    """A host whose pinned root wants release signatures from both of two keys."""
    root_key, a, b = new_key(), new_key(), new_key()
    root = make_root(1, [root_key], [a, b], release_threshold=2)
    host = tmp_path / "host"
    trust_init(host, root.to_bytes(), clock=T0)
    return World(tmp_path, host, root_key, a, b, root)


def test_fewer_signatures_than_the_threshold_refused_then_cosigned(tmp_path: Path) -> None:
    w = two_person_world(tmp_path)
    a, b, host = w.a, w.b, w.host
    one = bundle(w, "1.0.0", signers=[a])
    refused(w, one, SignatureError, r"expected valid signatures from 2 trusted key\(s\).*found 1 valid")
    cosign_bundle(one, [b])  # the second person signs in place, no rebuild
    assert install(one, host).generation.version == "1.0.0"


def test_the_same_key_counted_twice_refused(tmp_path: Path) -> None:
    w = two_person_world(tmp_path)
    signed = bundle(w, "1.0.0", signers=[w.a])
    data = signed.read_bytes()
    one = head(signed).signatures[0]
    line = f"ed25519 {one.keyid} ".encode() + member_data(data, "signatures").split(one.keyid.encode() + b" ")[1][:88]
    twice = b"airgap-signatures v1\n" + line + b"\n" + line + b"\n"
    forged = w.folder / "twice.airgap"
    forged.write_bytes(replace_member(data, "signatures", twice + b"\n" * (SIGNATURES_BLOCK_SIZE - len(twice))))
    # airgap never writes a key twice, so the reader refuses such a block outright; below it, thresholds
    # count distinct verified keys (tests/unit/test_trust.py::test_the_same_key_is_counted_once_...)
    refused(w, forged, FormatError, r"signatures block is not in the form airgap writes: one line per key")
    assert encode_signatures([one, one]).count(one.keyid.encode()) == 1


def test_an_old_root_replayed_changes_nothing(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    v2 = make_root(2, [world.root_key], [world.b], signers=[world.root_key])
    install(bundle(world, "1.1.0", signers=[world.b], roots=[world.root, v2]), world.host)
    # a bundle that carries only root 1 (where `a` was a release key), signed by `a`
    refused(world, bundle(world, "1.2.0", signers=[world.a], roots=[world.root]), SignatureError, "found 0 valid")
    before = snapshot(world.host)
    with pytest.raises(TrustError, match="root version 2 is already pinned"):
        trust_init(world.host, world.root.to_bytes(), clock=T0)
    assert snapshot(world.host) == before


def test_rotation_signed_by_too_few_old_keys_refused(tmp_path: Path) -> None:
    r1, r2, new1, a = new_key(), new_key(), new_key(), new_key()
    root1 = make_root(1, [r1, r2], [a], root_threshold=2)
    host = tmp_path / "host"
    trust_init(host, root1.to_bytes(), clock=T0)
    w = World(tmp_path, host, r1, a, a, root1)
    install(bundle(w, "1.0.0"), host)
    takeover = make_root(2, [new1], [a], signers=[r1, new1])  # one stolen old key is not enough
    refused(w, bundle(w, "1.1.0", roots=[root1, takeover]), TrustError,
            r"root version 2 \(signed by the root keys of version 1\): expected valid signatures from 2")


def test_rotation_signed_by_too_few_new_keys_refused(tmp_path: Path) -> None:
    r1, new1, new2, a = new_key(), new_key(), new_key(), new_key()
    root1 = make_root(1, [r1], [a])
    host = tmp_path / "host"
    trust_init(host, root1.to_bytes(), clock=T0)
    w = World(tmp_path, host, r1, a, a, root1)
    install(bundle(w, "1.0.0"), host)
    half = make_root(2, [new1, new2], [a], root_threshold=2, signers=[r1, new1])
    refused(w, bundle(w, "1.1.0", roots=[root1, half]), TrustError,
            r"root version 2 \(signed by its own root keys\): expected valid signatures from 2")


def test_endless_data_in_a_raw_member_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    data = bundle(world, "1.1.0", weights=NEW_WEIGHTS).read_bytes()
    member = f"files/{MODEL}"
    longer = world.folder / "longer.airgap"
    longer.write_bytes(replace_member(data, member, member_data(data, member) + b"\0" * (1 << 20)))
    refused(world, longer, IntegrityError, r"manifest says 524288 stored bytes, bundle member has 1572864")


def test_endless_data_from_a_decompression_bomb_refused(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    path = bundle(world, "1.1.0")
    data = path.read_bytes()
    member = "files/notes.txt.zst"
    stored = len(member_data(data, member))
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(4 << 20))  # 4 MiB: far past the declared size
    assert len(bomb) + 8 <= stored
    skippable = (0x184D2A50).to_bytes(4, "little") + (stored - len(bomb) - 8).to_bytes(4, "little")
    padded = bomb + skippable + bytes(stored - len(bomb) - 8)
    bombed = world.folder / "bomb.airgap"
    bombed.write_bytes(replace_member(data, member, padded))  # same stored size as the manifest says
    # the compressed bytes are signed (stored_sha256): refused before zstd sees a byte of them; a bomb
    # signed with a leaked key stops one chunk past the declared size
    # (tests/unit/test_bundle.py::test_decompression_bomb_stops_at_declared_size)
    refused(world, bombed, IntegrityError, r"notes.txt: compressed member differs from the signed manifest")


def test_expired_root_refused_unless_allowed(world: World) -> None:
    short = make_root(2, [world.root_key], [world.a], expires=day(20))
    install(bundle(world, "1.0.0", roots=[world.root, short]), world.host)
    late = bundle(world, "1.1.0", roots=[world.root, short], created=day(30))
    refused(world, late, TrustError, r"trusted root version 2 expired at 2030-01-21", clock=day(30))
    report = install(late, world.host, clock=day(30), overrides=Overrides(allow_expired=True))
    assert report.generation.overrides == ("allow-expired-root",)


def test_root_files_after_payload_data_refused(world: World) -> None:
    """Roots must be read before anything else is unpacked: a bundle that reorders them is refused."""
    install(bundle(world, "1.0.0"), world.host)
    v2 = make_root(2, [world.root_key], [world.b], signers=[world.root_key])
    data = bundle(world, "1.1.0", signers=[world.b], roots=[world.root, v2]).read_bytes()
    found = {name: (h, d, s) for name, h, d, s in tar_members(data)}
    first_root, last = found["files/trust/root.1.json"], found["files/trust/root.2.json"]
    roots_end = last[1] + last[2] + (-last[2] % 512)
    notes = found["files/notes.txt.zst"]
    notes_end = notes[1] + notes[2] + (-notes[2] % 512)
    assert roots_end == notes[0]
    reordered = world.folder / "reordered.airgap"
    reordered.write_bytes(data[:first_root[0]] + data[notes[0]:notes_end] + data[first_root[0]:roots_end]
                          + data[notes_end:])
    refused(world, reordered, FormatError, "trust/root.1.json comes after other payload files")


# ---------------------------------------------------------------- overrides are explicit and recorded

def test_allow_downgrade_is_recorded_and_the_highest_version_stays(world: World) -> None:
    install(bundle(world, "1.0.0"), world.host)
    install(bundle(world, "1.2.0"), world.host)
    report = install(bundle(world, "1.1.0"), world.host, overrides=Overrides(allow_downgrade=True))
    assert report.generation.overrides == ("allow-downgrade",)
    state = json.loads((world.host / "state.json").read_text())
    assert state["accepted"]["x"]["highest_version"] == "1.2.0"
    refused(world, bundle(world, "1.1.5"), PolicyError, "downgrade refused")


def test_allow_expired_is_recorded_and_still_runs_the_rollback_checks(world: World) -> None:
    install(bundle(world, "1.1.0"), world.host)
    old_and_stale = bundle(world, "1.0.0", expires_days=1)
    refused(world, old_and_stale, PolicyError, "downgrade refused", clock=day(5),
            overrides=Overrides(allow_expired=True))
    report = install(bundle(world, "1.2.0", expires_days=1), world.host, clock=day(5),
                     overrides=Overrides(allow_expired=True))
    assert report.generation.overrides == ("allow-expired",)


# ---------------------------------------------------------------- happy paths

def _store_inode(prefix: Path, version_dir: str = "current") -> int:
    return (prefix / version_dir / MODEL).resolve().stat().st_ino


def test_full_then_two_drops_then_rollback_then_a_fresh_host(world: World) -> None:
    full10 = bundle(world, "1.0.0")
    drop11 = bundle(world, "1.1.0", base=full10, created=day(10))  # notes change, weights do not
    drop12 = bundle(world, "1.2.0", base=drop11, weights=NEW_WEIGHTS, created=day(20))
    full12 = make_bundle(world.folder / "full", "1.2.0", files("1.2.0", NEW_WEIGHTS), [world.a], roots=[world.root],
                         created=day(20))

    # the drop names its base and lists the whole target state, but carries only what changed
    manifest11 = head(drop11).manifest
    assert manifest11.base == BaseRef("x", "1.0.0", head(full10).manifest_sha256)
    assert manifest11.file(MODEL).storage == "absent" and manifest11.file(MODEL).size == len(WEIGHTS)
    assert drop11.stat().st_size < len(WEIGHTS) // 8 < full10.stat().st_size
    assert head(drop12).manifest.file(MODEL).storage == "raw"

    install(full10, world.host)
    inode = _store_inode(world.host)
    report = install(drop11, world.host, clock=day(11))
    assert report.reused_bytes >= len(WEIGHTS) and report.written_bytes < 64 << 10
    assert _store_inode(world.host) == inode  # the weights were not copied again
    assert (world.host / "current" / "notes.txt").read_bytes() == files("1.1.0")["notes.txt"]

    install(drop12, world.host, clock=day(21))
    assert active_version(world.host) == "1.2.0"
    assert (world.host / "current" / MODEL).read_bytes() == NEW_WEIGHTS

    old, new = rollback(world.host)
    assert (old.version, new.version) == ("1.2.0", "1.1.0")
    assert active_version(world.host) == "1.1.0"
    assert _store_inode(world.host) == inode
    assert (world.host / "current" / "notes.txt").read_bytes() == files("1.1.0")["notes.txt"]

    fresh = world.folder / "fresh"
    trust_init(fresh, world.root.to_bytes(), clock=T0)
    install(full12, fresh, clock=day(21))
    dropped = world.host / "versions" / _gen(world.host, "1.2.0")
    for rel in files("1.2.0"):
        assert _sha(fresh / "current" / rel) == _sha(dropped / rel)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gen(prefix: Path, version: str) -> str:
    state = json.loads((prefix / "state.json").read_text())
    return next(g["id"] for g in state["generations"] if g["version"] == version)


def test_a_chain_of_two_rotations_is_walked_one_step_at_a_time(world: World) -> None:
    new_root_key, c = new_key(), new_key()
    v2 = make_root(2, [world.root_key, new_root_key], [world.b], root_threshold=2)
    v3 = make_root(3, [new_root_key], [c], signers=[world.root_key, new_root_key])
    install(bundle(world, "1.0.0", signers=[c], roots=[world.root, v2, v3]), world.host)
    state = json.loads((world.host / "state.json").read_text())
    assert state["trusted_root"] == 3
    assert sorted(p.name for p in (world.host / "trust").iterdir()) == ["root.1.json", "root.2.json", "root.3.json"]
    refused(world, bundle(world, "1.1.0", signers=[world.b], roots=[world.root, v2, v3]), SignatureError,
            "found 0 valid")


def test_single_key_trust_still_works(tmp_path: Path) -> None:
    key = new_key()
    path = make_bundle(tmp_path, "1.0.0", files("1.0.0"), [key])
    assert install(path, tmp_path / "host", trust=[key]).generation.version == "1.0.0"
    with pytest.raises(SignatureError):
        install(make_bundle(tmp_path / "b", "1.1.0", files("1.1.0"), [new_key()]), tmp_path / "host", trust=[key])


def test_no_trust_configured_is_refused_with_a_way_out(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "1.0.0", files("1.0.0"), [new_key()])
    with pytest.raises(TrustError, match=r"no trusted key given and no root pinned under .*: pass --trust "
                                         r".*airgap trust init ROOT.json"):
        install(path, tmp_path / "host")
    assert not (tmp_path / "host" / "state.json").exists()


def test_a_bundle_without_a_base_may_not_leave_files_out(world: World) -> None:
    from dataclasses import replace

    from airgap.bundle.container import read_head_from_path, write_bundle

    full = bundle(world, "1.0.0")
    manifest = read_head_from_path(full).manifest
    entry = manifest.file(MODEL)
    cheat = world.folder / "cheat.airgap"
    write_bundle(cheat, replace(manifest, files=()), [], lambda data: [sign(data, world.a)],
                 absent=[replace(entry, storage="absent", stored_size=0)])
    refused(world, cheat, FormatError, "names no base version")


# ---------------------------------------------------------------- by hand, with standard tools

@pytest.mark.skipif(not all(map(shutil.which, ("jq", "openssl", "zstd"))), reason="needs jq, openssl and zstd")
def test_root_and_drop_verified_by_hand_with_the_documented_recipes(world: World, tmp_path: Path) -> None:
    from tests.unit.trust.test_roots import root_recipe

    drop = bundle(world, "1.1.0", base=bundle(world, "1.0.0"))
    pub = tmp_path / "root.pub"
    pub.write_bytes(public_pem(world.root_key.public_key()))  # type: ignore[attr-defined]
    root_file = tmp_path / "root.1.json"
    root_file.write_bytes(world.root.to_bytes())
    env = {"PATH": "/usr/bin:/bin", "ROOT": str(root_file), "KEYS": str(pub), "WORK": str(tmp_path / "root")}
    checked = subprocess.run(["bash", "-c", root_recipe()], env=env, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    release_pub = tmp_path / "root" / f"release-{key_id(world.a.public_key())}.pub"  # type: ignore[attr-defined]
    assert release_pub.exists()

    security = (REPO / "SECURITY.md").read_text()
    recipe = re.search(r"<!-- recipe:verify -->\n```sh\n(.*?)```", security, re.S)
    assert recipe is not None
    env = {"PATH": "/usr/bin:/bin", "BUNDLE": str(drop), "PUB": str(release_pub), "WORK": str(tmp_path / "b")}
    done = subprocess.run(["bash", "-c", recipe.group(1)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("bundle verified by hand")


# ---------------------------------------------------------------- crash safety

STEPS = ["staged", "stored", "built", "ready", "switched", "committed"]
_KILLER = """
import os, signal, sys
from datetime import datetime
from pathlib import Path
import airgap.prefix.install as installer
step = sys.argv[3]
def reached(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
installer.install_bundle(Path(sys.argv[1]), Path(sys.argv[2]), None, clock=datetime.fromisoformat(sys.argv[4]),
                         progress=False, reached=reached)
"""


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_each_step_leaves_old_or_new_active_and_a_rerun_completes(world: World, step: str) -> None:
    install(bundle(world, "1.0.0"), world.host)
    old = os.readlink(world.host / "current")
    v2 = make_root(2, [world.root_key], [world.a, world.b])
    drop = bundle(world, "1.1.0", base=world.folder / "x-1.0.0.airgap", roots=[world.root, v2])
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(drop), str(world.host), step, T0.isoformat()],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr

    current = os.readlink(world.host / "current")
    assert current == old or current.startswith("versions/x-1.1.0-")
    assert (world.host / current / MODEL).read_bytes() == WEIGHTS  # whichever is active is whole

    report = install(drop, world.host)  # the re-run finishes or cleans up, then completes
    assert report.generation.version == "1.1.0"
    state = json.loads((world.host / "state.json").read_text())
    assert state["pending"] is None and state["trusted_root"] == 2
    assert active_version(world.host) == "1.1.0"
    assert os.readlink(world.host / "current") == f"versions/{state['active']}"
    assert sorted(p.name for p in (world.host / "versions").iterdir()) == sorted(g["id"] for g in
                                                                                state["generations"])
    assert len(state["generations"]) == 2
    assert not (world.host / "staging").exists()
    assert (world.host / "current" / "notes.txt").read_bytes() == files("1.1.0")["notes.txt"]


@pytest.mark.parametrize("step", ["built", "ready"])
def test_killed_first_install_leaves_nothing_or_the_new_version(tmp_path: Path, step: str) -> None:
    root_key, a = new_key(), new_key()
    root = make_root(1, [root_key], [a])
    host = tmp_path / "host"
    trust_init(host, root.to_bytes(), clock=T0)
    path = make_bundle(tmp_path, "1.0.0", files("1.0.0"), [a], roots=[root])
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(path), str(host), step, T0.isoformat()],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr
    assert not (host / "current").exists() or (host / "current" / MODEL).read_bytes() == WEIGHTS
    install(path, host)
    assert active_version(host) == "1.0.0"


# ---------------------------------------------------------------- the real CLI, as in the issue

@pytest.mark.slow
def test_cli_trust_init_build_drop_cosign_install_rollback(tmp_path: Path, wheelhouse: Path) -> None:
    keys = {stem: write_key_files(tmp_path, stem) for stem in ("root1", "root2", "first", "second")}
    model = tmp_path / "weights.bin"  # not .gguf: no GGUF header to read
    model.write_bytes(WEIGHTS)

    def spec(version: str) -> Path:
        path = tmp_path / f"x-{version}.toml"
        path.write_text(f'[bundle]\nname = "x"\nversion = "{version}"\n[[models]]\nid = "m"\npath = "{model}"\n'
                        f'[python]\nfind_links = ["{wheelhouse}"]\n')
        return path

    def ok(*args: str | Path) -> str:
        result = airgap(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    root = tmp_path / "root.json"
    ok("trust", "create", root, "--root-key", keys["root1"][1], "--root-key", keys["root2"][1],
       "--root-threshold", "2", "--release-key", keys["first"][1], "--release-key", keys["second"][1],
       "--release-threshold", "2", "--key", keys["root1"][0])
    assert "signed root version 1: 2 signature(s)" in ok("sign", root, "--key", keys["root2"][0])
    prefix = tmp_path / "opt-airgap"
    assert "release needs 2 of 2" in ok("trust", "init", root, "--prefix", prefix)

    dist = tmp_path / "dist"
    full = Path(ok("build", spec("1.0.0"), "--key", keys["first"][0], "--key", keys["second"][0], "--root", root,
                   "-o", dist, "-q").split()[-1])
    drop = Path(ok("build", spec("1.1.0"), "--key", keys["first"][0], "--root", root, "--base", full,
                   "--expires-days", "30", "-o", dist, "-q").split()[-1])
    assert drop.stat().st_size < 256 << 10 < full.stat().st_size
    assert head(drop).manifest.expires == head(drop).manifest.created + timedelta(days=30)

    installed = airgap("install", full, "--prefix", prefix, "-q", no_network=True)
    assert installed.returncode == 0, installed.stderr

    refused_once = airgap("install", drop, "--prefix", prefix, "-q")
    assert refused_once.returncode == 1 and "found 1 valid" in refused_once.stderr
    assert "2 signature(s)" in ok("sign", drop, "--key", keys["second"][0])
    assert "an update drop on top of x 1.0.0" in ok("verify", drop, "--prefix", prefix, "-q")
    assert "installed x 1.1.0" in ok("install", drop, "--prefix", prefix, "-q")
    assert "to x 1.0.0" in ok("rollback", "--prefix", prefix)
    status = json.loads(ok("status", "--prefix", prefix, "--json"))
    assert [g["version"] for g in status["generations"]] == ["1.0.0", "1.1.0"]
    assert status["trusted_root"] == 1
