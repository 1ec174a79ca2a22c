"""The README's first command: the main job on the built-in example, as a new user runs it."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import REPO


@pytest.mark.slow
def test_demo_script_builds_verifies_and_installs() -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK example 1.0.0" in done.stdout
    assert "installed example 1.0.0" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("demo done:")
