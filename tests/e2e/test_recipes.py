"""The standard-tool recipes in SECURITY.md and README.md, run exactly as written, with no network."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Built
from tests.support import REPO, offline


def recipe(document: str, name: str) -> str:
    text = (REPO / document).read_text()
    match = re.search(rf"<!-- recipe:{name} -->\n```sh\n(.*?)```\n<!-- /recipe:{name} -->", text, re.S)
    assert match, f"recipe {name} not found in {document}"
    return match.group(1)


def run_recipe(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run(offline(["bash", "-c", script]), capture_output=True, text=True, cwd=cwd,
                          env={**clean, "PIP_CONFIG_FILE": os.devnull, **env}, check=False)


def test_verify_by_hand(built: Built, tmp_path: Path) -> None:
    env = {"BUNDLE": str(built.bundle), "PUB": str(built.keys.public), "WORK": str(tmp_path / "w")}
    done = run_recipe(recipe("SECURITY.md", "verify"), env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Signature Verified Successfully" in done.stdout
    assert done.stdout.strip().endswith("bundle verified by hand")


def test_verify_by_hand_catches_tampering(built: Built, tmp_path: Path) -> None:
    tampered = tmp_path / "t.airgap"
    data = bytearray(built.bundle.read_bytes())
    data[len(data) - 3000] ^= 1  # inside the last members (the model, or the SBOM after it)
    tampered.write_bytes(bytes(data))
    env = {"BUNDLE": str(tampered), "PUB": str(built.keys.public), "WORK": str(tmp_path / "w")}
    done = run_recipe(recipe("SECURITY.md", "verify"), env, tmp_path)
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr


def test_bootstrap_with_bare_python(built: Built, tmp_path: Path) -> None:
    work = tmp_path / "w"
    env = {"BUNDLE": str(built.bundle), "PUB": str(built.keys.public), "WORK": str(work),
           "TOOL": str(tmp_path / "tool"), "PREFIX": str(tmp_path / "prefix")}
    checked = run_recipe(recipe("SECURITY.md", "verify"), env, tmp_path)
    assert checked.returncode == 0, checked.stderr
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    bare = {"PATH": f"{base_python.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ""}
    done = run_recipe(recipe("README.md", "bootstrap"), {**env, **bare}, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed tiny-chat 1.0.0" in done.stdout
    assert (tmp_path / "prefix" / "current" / "models" / "tiny").is_dir()
