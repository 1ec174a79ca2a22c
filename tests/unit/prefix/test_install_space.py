"""Install's free-space estimate: what a new version writes, including its fresh virtualenv."""

from __future__ import annotations

from datetime import UTC, datetime

from airgap.format.manifest import FileEntry, Manifest, PythonPackage
from airgap.prefix.install import VENV_BASE_BYTES, VENV_EXPANSION, space_needed

T = datetime(2030, 1, 1, tzinfo=UTC)
WHEEL = "wheels/x-1.0-py3-none-any.whl"


def test_space_needed_counts_a_fresh_venv_even_when_every_blob_is_reused() -> None:
    files = (FileEntry("models/m/w.gguf", 1000, "a" * 64, "model"), FileEntry(WHEEL, 10, "b" * 64, "wheel"))
    manifest = Manifest("b", "1.0", T, T, "0.1.0", files, packages=(PythonPackage("x", "1.0", WHEEL),))
    venv = 10 * VENV_EXPANSION + VENV_BASE_BYTES
    assert space_needed(manifest, lambda entry: False) == 1010 + venv
    assert space_needed(manifest, lambda entry: True) == venv
    assert space_needed(Manifest("b", "1.0", T, T, "0.1.0", files[:1]), lambda entry: True) == 0
