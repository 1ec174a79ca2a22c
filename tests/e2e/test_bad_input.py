"""Every bad input gets one line, a non-zero exit, and leaves the active installation working."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airgap.bundle.container import read_head_from_path
from airgap.trust.signing import encode_signatures
from tests.conftest import Built, KeyPair, make_keys
from tests.support import REPO, Result, airgap, assert_refused, assert_still_works, offline, snapshot, write_spec


@pytest.fixture
def installed(built: Built, tmp_path: Path) -> Path:
    prefix = tmp_path / "prefix"
    result = airgap("install", built.bundle, "--trust", built.keys.public, "--prefix", prefix, "-q")
    assert result.code == 0, result.stderr
    return prefix


def model_offset(bundle: Path) -> int:
    """Offset of the model's bytes in the bundle (the last member, before the end-of-archive blocks)."""
    head = read_head_from_path(bundle)
    model = next(e for e in head.manifest.files if e.kind == "model")
    return bundle.stat().st_size - 1024 - (-model.size % 512) - model.size + 100


def other_version(built: Built, tmp_path: Path, tiny_model: Path, wheelhouse: Path, version: str = "2.0.0") -> Path:
    spec = write_spec(tmp_path, version=version, model=tiny_model, wheelhouse=wheelhouse)
    result = airgap("build", spec, "--key", built.keys.private, "-o", tmp_path / "dist2", "-q")
    assert result.code == 0, result.stderr
    return Path(result.stdout.split()[-1])


def test_flipped_bit_in_payload(built: Built, installed: Path, bundle_copy: Path) -> None:
    before = snapshot(installed)
    data = bytearray(bundle_copy.read_bytes())
    data[model_offset(bundle_copy)] ^= 0x10
    bundle_copy.write_bytes(bytes(data))
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public), "sha256 mismatch", "models/tiny/")
    result = airgap("install", bundle_copy, "--trust", built.keys.public, "--prefix", installed, no_network=True)
    assert_refused(result, "sha256 mismatch")
    assert_still_works(installed, before)


def test_truncated_bundle(built: Built, installed: Path, bundle_copy: Path) -> None:
    before = snapshot(installed)
    data = bundle_copy.read_bytes()
    bundle_copy.write_bytes(data[: len(data) - 5000])
    assert_refused(airgap("install", bundle_copy, "--trust", built.keys.public, "--prefix", installed),
                   "truncated")
    assert_still_works(installed, before)


def test_untrusted_key(built: Built, installed: Path, tmp_path: Path) -> None:
    before = snapshot(installed)
    stranger = make_keys(tmp_path, "stranger")
    result = airgap("install", built.bundle, "--trust", stranger.public, "--prefix", installed)
    assert_refused(result, "expected valid signatures from 1 trusted key", "found 0 valid")
    assert_still_works(installed, before)


def test_unsigned_bundle(built: Built, installed: Path, bundle_copy: Path) -> None:
    before = snapshot(installed)
    head = read_head_from_path(bundle_copy)
    with bundle_copy.open("r+b") as out:
        out.seek(head.signatures_offset)
        out.write(encode_signatures([]))
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public), "is not signed")
    assert_refused(airgap("install", bundle_copy, "--trust", built.keys.public, "--prefix", installed),
                   "is not signed")
    assert_still_works(installed, before)


def test_signature_from_other_key_in_trusted_slot(built: Built, bundle_copy: Path, tmp_path: Path) -> None:
    """A valid signature over the exact manifest bytes, by a stranger's key, filed under the trusted key's id."""
    from airgap.trust.keyfiles import read_private_key
    from airgap.trust.signing import Signature, sign

    stranger = make_keys(tmp_path, "stranger")
    head = read_head_from_path(bundle_copy)
    (trusted_id,) = {s.keyid for s in head.signatures}
    forged = sign(head.manifest_bytes, read_private_key(stranger.private, None))
    with bundle_copy.open("r+b") as out:
        out.seek(head.signatures_offset)
        out.write(encode_signatures([Signature(trusted_id, forged.value)]))
    assert read_head_from_path(bundle_copy).signatures[0].keyid == trusted_id
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public), "found 0 valid")


def test_manifest_changed_after_signing(built: Built, bundle_copy: Path) -> None:
    data = bytearray(bundle_copy.read_bytes())
    at = data.index(b'"name": "tiny-chat"')
    data[at + 9] = ord("T")
    bundle_copy.write_bytes(bytes(data))
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public), "found 0 valid")


def test_no_trusted_key_given(built: Built) -> None:
    assert_refused(airgap("verify", built.bundle), "no trusted key given")


def test_not_a_bundle(built: Built, tmp_path: Path) -> None:
    junk = tmp_path / "junk.airgap"
    junk.write_bytes(b"PK\x03\x04 not a tar" * 100)
    assert_refused(airgap("verify", junk, "--trust", built.keys.public), "bad tar header")
    assert_refused(airgap("verify", tmp_path / "missing.airgap", "--trust", built.keys.public), "not found")


def test_spec_names_missing_file(tmp_path: Path, keys: KeyPair, wheelhouse: Path) -> None:
    spec = write_spec(tmp_path, model=tmp_path / "nope.gguf", wheelhouse=wheelhouse)
    assert_refused(airgap("build", spec, "--key", keys.private, "-o", tmp_path), "file not found", "nope.gguf")


def test_unsatisfiable_requirement(tmp_path: Path, keys: KeyPair, wheelhouse: Path, tiny_model: Path) -> None:
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse,
                      requirements=("click==0.0.1-does-not-exist",))
    result = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "d", "-q")
    assert_refused(result, "click")
    assert not list((tmp_path / "d").glob("*.airgap"))


def test_downgrade_refused_then_allowed(built: Built, installed: Path, tmp_path: Path, tiny_model: Path,
                                        wheelhouse: Path) -> None:
    newer = other_version(built, tmp_path, tiny_model, wheelhouse, "2.0.0")
    assert airgap("install", newer, "--trust", built.keys.public, "--prefix", installed, "-q").code == 0
    before = snapshot(installed)
    older = other_version(built, tmp_path / "o", tiny_model, wheelhouse, "0.9.0") if (tmp_path / "o").mkdir() \
        is None else None
    assert older is not None
    assert_refused(airgap("install", older, "--trust", built.keys.public, "--prefix", installed), "downgrade refused")
    assert_still_works(installed, before)
    result = airgap("install", older, "--trust", built.keys.public, "--prefix", installed, "--allow-downgrade", "-q")
    assert result.code == 0, result.stderr
    state = json.loads((installed / "state.json").read_text())
    assert state["generations"][-1]["overrides"] == ["allow-downgrade"]
    assert "accepted with --allow-downgrade" in airgap("status", "--prefix", installed).stdout


def test_disk_full_during_install(built: Built, tmp_path: Path) -> None:
    """A tiny file system mounted over the staging area fills up mid-install (private mount namespace)."""
    prefix = tmp_path / "prefix"
    script = (f'mkdir -p "{prefix}/staging" && mount -t tmpfs -o size=2m,mode=0755 tmpfs "{prefix}/staging" && '
              f'exec "$@"')
    command = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "airgap", "install",
               str(built.bundle), "--trust", str(built.keys.public), "--prefix", str(prefix), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert_refused(Result(done.returncode, done.stdout, done.stderr), "disk full")
    assert not (prefix / "current").exists()
    assert not any((prefix / "versions").glob("*")) if (prefix / "versions").exists() else True
    assert not (prefix / "store").exists() or not any((prefix / "store").rglob("*.*"))


def test_not_enough_space_refused_before_writing(built: Built, tmp_path: Path) -> None:
    prefix = tmp_path / "small"
    script = f'mkdir -p "{prefix}" && mount -t tmpfs -o size=4m,mode=0755 tmpfs "{prefix}" && exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "airgap", "install",
               str(built.bundle), "--trust", str(built.keys.public), "--prefix", str(prefix), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert_refused(Result(done.returncode, done.stdout, done.stderr), "not enough free space", "nothing was changed")


def test_killed_mid_install_then_rerun_completes(built: Built, installed: Path, tmp_path: Path, tiny_model: Path,
                                                wheelhouse: Path) -> None:
    newer = other_version(built, tmp_path, tiny_model, wheelhouse, "3.0.0")
    before = snapshot(installed)
    command = offline([sys.executable, "-m", "airgap", "install", str(newer), "--trust", str(built.keys.public),
                       "--prefix", str(installed), "-q"])
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((installed / "versions").glob("tiny-chat-3.0.0-*/venv/pyvenv.cfg")):
        assert time.monotonic() < deadline and process.poll() is None, "install ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert os.readlink(installed / "current") == before[0]
    subprocess.run([installed / "current" / "venv" / "bin" / "airgap", "--version"], check=True, capture_output=True)
    status = json.loads(airgap("status", "--prefix", installed, "--json").stdout)
    assert [g["version"] for g in status["generations"]] == ["1.0.0"]

    result = airgap("install", newer, "--trust", built.keys.public, "--prefix", installed, "-q", no_network=True)
    assert result.code == 0, result.stderr
    assert os.readlink(installed / "current").startswith("versions/tiny-chat-3.0.0-")
    assert len(list((installed / "versions").iterdir())) == 2
    assert not (installed / "staging").exists()
