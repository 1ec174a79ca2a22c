"""airgap installed without extras, as `pip install airgap` gives it: build says which extra it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import write_spec


@pytest.mark.slow
def test_build_without_the_build_extra_names_the_extra(tmp_path: Path, wheelhouse: Path, tiny_model: Path) -> None:
    from airgap.build.sources.selfwheel import build_self_wheel

    own_wheel = build_self_wheel(tmp_path / "self")
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-index",
                    "--find-links", str(wheelhouse), str(own_wheel)], check=True)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import gguf"], capture_output=True, check=False)
    assert probe.returncode != 0, "the core install must not carry gguf for this test to mean anything"
    keys = tmp_path / "keys" / "release"
    subprocess.run([str(venv / "bin" / "airgap"), "keygen", str(keys), "--no-passphrase"], check=True,
                   capture_output=True)
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse)

    hub_spec = tmp_path / "hub.toml"
    hub_spec.write_text('[bundle]\nname = "h"\nversion = "1"\n[[models]]\nid = "m"\nrepo = "org/m"\nfile = "m.gguf"\n')
    extra = ("which airgap's core install lacks; install the build extra on the connected host: "
             "pip install 'airgap[build]'")
    for path, needs in [
        (spec, "gguf (for reading the models' GGUF metadata)"),
        (hub_spec, "gguf (for reading the models' GGUF metadata) and huggingface_hub (for fetching models from the "
                   "Hugging Face hub)"),
    ]:
        done = subprocess.run([str(venv / "bin" / "airgap"), "build", str(path), "--key", f"{keys}.key",
                               "-o", str(tmp_path / "dist")], capture_output=True, text=True, check=False)
        assert done.returncode != 0
        assert done.stderr.splitlines() == [f"airgap: error: this spec needs {needs}, {extra}"]
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
