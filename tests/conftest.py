from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO, airgap, runtime_wheelhouse, write_spec

CACHE = Path.home() / ".cache" / "airgap-tests"


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Binary wheels of airgap's runtime dependencies, downloaded once from the package registry."""
    return runtime_wheelhouse(CACHE / "wheelhouse")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_gguf.py"), str(path)], check=True)
    return path


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def make_keys(folder: Path, stem: str = "release") -> KeyPair:
    result = airgap("keygen", folder / stem, "--no-passphrase")
    assert result.code == 0, result.stderr
    return KeyPair(folder / f"{stem}.key", folder / f"{stem}.pub")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keys(tmp_path_factory.mktemp("keys"))


@dataclass(frozen=True)
class Built:
    bundle: Path
    spec: Path
    keys: KeyPair


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, tiny_model: Path, keys: KeyPair) -> Built:
    """One real bundle (tiny model + airgap's own wheels), built once per session; tests copy it."""
    folder = tmp_path_factory.mktemp("built")
    spec = write_spec(folder, model=tiny_model, wheelhouse=wheelhouse)
    result = airgap("build", spec, "--key", keys.private, "-o", folder / "dist", "--quiet")
    assert result.code == 0, result.stderr
    return Built(Path(result.stdout.strip().splitlines()[-1]), spec, keys)


@pytest.fixture
def bundle_copy(built: Built, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / built.bundle.name
    copy.write_bytes(built.bundle.read_bytes())
    yield copy
