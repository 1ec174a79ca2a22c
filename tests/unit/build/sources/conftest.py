"""Fixtures for the sources tests: the tiny GGUF model and a hub simulator on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import REPO

TESTS = REPO / "tests"
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from hubsim import HubSim  # noqa: E402


def load_make_tiny_gguf() -> ModuleType:
    """The scripts folder is not a package: load the generator by path."""
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", ROOT / "scripts" / "make_tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_tiny_gguf() -> ModuleType:
    return load_make_tiny_gguf()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, make_tiny_gguf: ModuleType) -> Path:
    path: Path = make_tiny_gguf.make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)
    return path


@pytest.fixture(scope="session")
def padded_gguf(tmp_path_factory: pytest.TempPathFactory, make_tiny_gguf: ModuleType) -> Path:
    """About 16 MiB: more than huggingface_hub's 10 MiB download chunk, so a cut download can resume mid-file."""
    path: Path = make_tiny_gguf.make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "padded.gguf", seed=1, pad_mb=16)
    return path


@pytest.fixture(autouse=True)
def hub_client_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE at import: a host that sets it must not turn these tests off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub() -> Iterator[HubSim]:
    with HubSim() as sim:
        yield sim
