"""The controller is air-gapped too: airgap[fleet]'s pins come as a bundle, installed offline like any other."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import KeyPair
from tests.support import REPO, airgap, offline

SPEC = REPO / "bundles" / "fleet-controller.toml"


def test_the_controller_bundle_carries_exactly_the_fleet_extra() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["fleet"]
    spec = tomllib.loads(SPEC.read_text())["python"]["requirements"]
    assert sorted(spec) == sorted(extra)
    assert all("==" in requirement for requirement in extra)


@pytest.mark.slow
def test_the_controller_bundle_builds_and_runs_ansible_offline(tmp_path: Path, wheelhouse: Path,
                                                               keys: KeyPair) -> None:
    spec = tmp_path / SPEC.name
    spec.write_text(SPEC.read_text() + f'find_links = ["{wheelhouse}"]\n')
    built = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q")
    assert built.code == 0, built.stderr[-3000:]
    bundle = Path(built.stdout.split()[-1])
    prefix = tmp_path / "controller"
    installed = airgap("install", bundle, "--trust", keys.public, "--prefix", prefix, "-q", no_network=True)
    assert installed.code == 0, installed.stderr[-3000:]
    venv = prefix / "current" / "venv" / "bin"
    done = subprocess.run(offline([str(venv / "ansible-playbook"), "--version"]), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "core 2.19.14" in done.stdout.splitlines()[0]
    syntax = subprocess.run(offline([str(venv / "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                                     str(REPO / "deploy" / "ansible" / "rollout.yml")]),
                            capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stdout[-2000:] + syntax.stderr[-2000:]
