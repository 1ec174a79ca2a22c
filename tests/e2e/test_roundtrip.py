"""The main job, end to end through the real CLI: build, inspect, verify and install with no network."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from tests.conftest import Built, KeyPair
from tests.support import airgap, write_spec


def test_inspect_reads_only_the_head(built: Built, tmp_path: Path) -> None:
    head_only = tmp_path / "head.airgap"
    head_only.write_bytes(built.bundle.read_bytes()[:32 << 10])  # payload cut off: inspect must not care
    result = airgap("inspect", head_only, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["name"] == "tiny-chat"
    assert data["models"][0]["id"] == "tiny"
    assert {f["kind"] for f in data["files"]} == {"model", "wheel", "meta"}
    assert data["wheels"] == [] and data["wheels_error"].startswith("bundle truncated")


def test_inspect_lists_console_scripts_of_the_wheels(built: Built) -> None:
    result = airgap("inspect", built.bundle, "--json")
    assert result.code == 0, result.stderr
    wheels = {Path(w["path"]).name.split("-")[0]: w for w in json.loads(result.stdout)["wheels"]}
    assert wheels["airgap"]["scripts"] == ["airgap"] and wheels["airgap"]["problem"] is None
    assert "tqdm" in wheels["tqdm"]["scripts"]
    text = airgap("inspect", built.bundle).stdout
    assert any(line.startswith("wheel wheels/airgap-") and line.endswith(": scripts airgap")
               for line in text.splitlines())


def test_verify_offline(built: Built) -> None:
    result = airgap("verify", built.bundle, "--trust", built.keys.public, no_network=True)
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("OK tiny-chat 1.0.0")
    report = json.loads(airgap("verify", built.bundle, "--trust", built.keys.public, "--json").stdout)
    assert report["files"] > 5 and report["name"] == "tiny-chat"


def test_install_status_rollback_offline(built: Built, tiny_model: Path, wheelhouse: Path, keys: KeyPair,
                                          tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    result = airgap("install", built.bundle, "--trust", keys.public, "--prefix", prefix, "--quiet",
                    no_network=True)
    assert result.code == 0, result.stderr
    assert "installed tiny-chat 1.0.0" in result.stdout
    model = prefix / "current" / "models" / "tiny" / tiny_model.name
    assert hashlib.sha256(model.read_bytes()).digest() == hashlib.sha256(tiny_model.read_bytes()).digest()
    tool = subprocess.run([prefix / "current" / "venv" / "bin" / "airgap", "--version"], capture_output=True,
                          text=True, check=True)
    assert "0.1.0" in tool.stdout

    # version 1.1.0 keeps the same weights: they are not copied again
    spec = write_spec(tmp_path, version="1.1.0", model=tiny_model, wheelhouse=wheelhouse)
    newer = Path(airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q").stdout.split()[-1])
    inode = model.resolve().stat().st_ino
    result = airgap("install", newer, "--trust", keys.public, "--prefix", prefix, "-q", no_network=True)
    assert result.code == 0, result.stderr
    assert model.resolve().stat().st_ino == inode
    status = json.loads(airgap("status", "--prefix", prefix, "--json").stdout)
    assert [g["version"] for g in status["generations"]] == ["1.0.0", "1.1.0"]
    assert status["active"].startswith("tiny-chat-1.1.0")
    assert status["generations"][1]["models"][0]["id"] == "tiny"

    result = airgap("rollback", "--prefix", prefix)
    assert result.code == 0, result.stderr
    assert "to tiny-chat 1.0.0" in result.stdout
    assert json.loads(airgap("status", "--prefix", prefix, "--json").stdout)["active"].startswith("tiny-chat-1.0.0")
    assert model.read_bytes() == tiny_model.read_bytes()


def test_reproducible_build(tiny_model: Path, wheelhouse: Path, keys: KeyPair, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse)
    env = {"SOURCE_DATE_EPOCH": "1767225600"}
    first = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "a", "-q", env=env)
    second = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "b", "-q", env=env)
    assert first.code == 0 and second.code == 0, first.stderr + second.stderr
    one, two = Path(first.stdout.split()[-1]), Path(second.stdout.split()[-1])
    assert one.read_bytes() == two.read_bytes()
    assert json.loads(airgap("inspect", one, "--json").stdout)["created"] == "2026-01-01T00:00:00Z"


def test_encrypted_key_needs_passphrase(tmp_path: Path, tiny_model: Path, wheelhouse: Path) -> None:
    env = {"AIRGAP_KEY_PASSPHRASE": "correct horse"}
    assert airgap("keygen", tmp_path / "k", env=env).code == 0
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" in (tmp_path / "k.key").read_bytes()
    opened = subprocess.run(["openssl", "pkey", "-pubin", "-in", tmp_path / "k.pub", "-noout", "-text"],
                            capture_output=True, text=True, check=True)
    assert "ED25519" in opened.stdout
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse)
    wrong = airgap("build", spec, "--key", tmp_path / "k.key", "-o", tmp_path / "d", "-q",
                   env={"AIRGAP_KEY_PASSPHRASE": "wrong"})
    assert wrong.code != 0 and "wrong passphrase" in wrong.error_line
    assert airgap("build", spec, "--key", tmp_path / "k.key", "-o", tmp_path / "d", "-q", env=env).code == 0


def test_airgap_packs_its_own_wheel_never_one_from_an_index(built: Built, tmp_path: Path, tiny_model: Path,
                                                             wheelhouse: Path, keys: KeyPair) -> None:
    from airgap.build.sources.selfwheel import build_self_wheel

    files = json.loads(airgap("inspect", built.bundle, "--json").stdout)["files"]
    own = [f for f in files if f["path"].startswith("wheels/airgap-")]
    assert len(own) == 1 and own[0]["source"] == {"type": "self"}
    expected = hashlib.sha256(build_self_wheel(tmp_path / "self").read_bytes()).hexdigest()
    assert own[0]["sha256"] == expected

    # a package named "airgap" offered by a find-links folder (or an index) is refused, not packed
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    build_self_wheel(decoy)
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse, requirements=("airgap",))
    text = spec.read_text()
    spec.write_text(text.replace(f'find_links = ["{wheelhouse}"]', f'find_links = ["{wheelhouse}", "{decoy}"]'))
    result = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "d", "-q")
    assert result.code != 0 and "airgap packs itself" in result.error_line
