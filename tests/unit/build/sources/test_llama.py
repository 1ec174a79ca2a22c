"""The source-build cache: real pip builds of a tiny setuptools sdist, and (slow) of llama-cpp-python itself."""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from airgap.build.sources import llama
from airgap.build.sources.wheels import Pip, ResolvedWheel, resolve_wheels
from airgap.errors import ResolveError
from tests.support import fill_wheelhouse, write_sdist

# setup.py writes the CMAKE_ARGS it was built with into the package, proving the flags reach the build
SETUP_PY = """\
import os
from pathlib import Path
from setuptools import setup
Path("flagged/flags.txt").write_text(os.environ.get("CMAKE_ARGS", "<unset>"))
setup(package_data={"flagged": ["flags.txt"]})
"""


@pytest.fixture(scope="session")
def build_deps() -> Path:
    return fill_wheelhouse("build-deps", "-r", "setuptools>=61")


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
            '[project]\nname = "flagged"\nversion = "2.0"\n'
        ),
        "setup.py": SETUP_PY,
        "PKG-INFO": "Metadata-Version: 2.1\nName: flagged\nVersion: 2.0\n",
        "flagged/__init__.py": "",
    }
    return write_sdist(tmp_path, "flagged", "2.0", files)


def build(sdist: Path, cache: Path, deps: Path, flags: dict[str, str]) -> llama.BuiltWheel:
    pip = Pip(find_links=(deps,), no_index=True)
    return llama.build_wheel(
        sdist,
        project="flagged",
        version="2.0",
        sdist_sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
        cache_dir=cache,
        pip_options=pip.source_args(),
        env=pip.environment(),
        flags=flags,
        progress=False,
    )


def flags_inside(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read("flagged/flags.txt").decode()


def test_second_build_is_served_from_the_cache(sdist: Path, build_deps: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build(sdist, cache, build_deps, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    assert not first.cached
    assert first.seconds > 0
    assert flags_inside(first.path) == "-DGGML_NATIVE=OFF"
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()

    started = time.monotonic()
    second = build(sdist, cache, build_deps, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    assert time.monotonic() - started < 1.0
    assert second.cached
    assert (second.path, second.sha256, second.cache_key) == (first.path, first.sha256, first.cache_key)


def test_other_flags_are_another_cache_entry(sdist: Path, build_deps: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = build(sdist, cache, build_deps, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    other = build(sdist, cache, build_deps, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX512=ON"})

    assert not other.cached
    assert other.cache_key != plain.cache_key
    assert flags_inside(other.path) == "-DGGML_NATIVE=OFF -DGGML_AVX512=ON"
    assert sorted(p.name for p in cache.iterdir()) == sorted([plain.cache_key, other.cache_key])


def test_the_caller_environment_cannot_change_the_flags(
    sdist: Path, build_deps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_NATIVE=ON")
    built = build(sdist, tmp_path / "cache", build_deps, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    assert flags_inside(built.path) == "-DGGML_NATIVE=OFF"
    unflagged = build(sdist, tmp_path / "cache", build_deps, {})
    assert flags_inside(unflagged.path) == "<unset>"


def test_a_corrupted_cache_entry_is_refused(sdist: Path, build_deps: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = build(sdist, cache, build_deps, {})
    built.path.write_bytes(built.path.read_bytes()[:-1])

    with pytest.raises(ResolveError, match=r"cached .*flagged-2\.0.*sha256"):
        build(sdist, cache, build_deps, {})


def test_failed_build_names_the_sdist_and_leaves_no_entry(tmp_path: Path, build_deps: Path) -> None:
    broken = tmp_path / "broken-1.0.tar.gz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(ResolveError, match=r"broken-1\.0\.tar\.gz"):
        llama.build_wheel(
            broken,
            project="broken",
            version="1.0",
            sdist_sha256="0" * 64,
            cache_dir=tmp_path / "c",
            pip_options=["--no-index", "--find-links", str(build_deps)],
            progress=False,
        )
    assert [p.name for p in (tmp_path / "c").iterdir()] == []


def test_cache_key_covers_every_input() -> None:
    key = llama.cache_key("llama_cpp_python", "0.3.36", "a" * 64, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    assert key.startswith("llama-cpp-python-0.3.36-")
    assert key == llama.cache_key("llama-cpp-python", "0.3.36", "a" * 64, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    others = {
        llama.cache_key("llama-cpp-python", "0.3.35", "a" * 64, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}),
        llama.cache_key("llama-cpp-python", "0.3.36", "b" * 64, {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}),
        llama.cache_key("llama-cpp-python", "0.3.36", "a" * 64, {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}),
        llama.cache_key("llama-cpp-python", "0.3.36", "a" * 64, {}),
    }
    assert key not in others
    assert len(others) == 4


def test_llama_is_built_for_any_cpu_and_other_projects_plainly() -> None:
    assert "-DGGML_NATIVE=OFF" in llama.build_flags("llama_cpp_python")["CMAKE_ARGS"].split()
    assert llama.build_flags("click") == {}


def test_default_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert llama.default_cache_dir() == tmp_path / "airgap" / "wheels"


SERVER_DEPENDENCIES = {
    "numpy", "typing-extensions", "diskcache", "jinja2", "markupsafe", "fastapi", "uvicorn", "sse-starlette",
    "starlette-context", "pydantic-settings", "pyyaml", "starlette", "pydantic", "pydantic-core",
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first compile took 12 minutes on 2 busy cores
def test_llama_cpp_python_server_for_manylinux_target(tmp_path: Path) -> None:
    """Uses pip's configuration (the registry this machine reaches) and the default build cache, so the
    compile (4-12 minutes on 2 cores) happens once per machine; later runs take the cached wheel."""
    cache = Path(os.environ.get("AIRGAP_TEST_BUILD_CACHE", llama.default_cache_dir()))
    lock = tmp_path / "spec.toml.lock"

    def resolve(dest: Path) -> list[ResolvedWheel]:
        return resolve_wheels(
            ["llama-cpp-python[server]==0.3.36"],
            dest=dest,
            python_version="3.11",
            platforms=["manylinux_2_28_x86_64"],
            build_cache=cache,
            lock_path=lock,
            progress=False,
        )

    wheels = resolve(tmp_path / "a")

    by_name = {w.name: w for w in wheels}
    assert set(by_name) >= SERVER_DEPENDENCIES
    assert all(w.filename.endswith(".whl") for w in wheels)
    numpy_tags = parse_wheel_filename(by_name["numpy"].filename)[3]
    assert {t.abi for t in numpy_tags} == {"cp311"}
    assert any(t.platform.startswith("manylinux") for t in numpy_tags)
    built = by_name["llama-cpp-python"]
    assert built.version == "0.3.36"
    assert built.source["type"] == "built"
    assert built.source["from"] == "llama_cpp_python-0.3.36.tar.gz"
    assert "-DGGML_NATIVE=OFF" in built.source["cmake_args"]
    assert (cache / built.source["cache_key"] / built.filename).is_file()
    locked = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    assert locked["llama-cpp-python"]["sha256"] == built.source["sdist_sha256"]
    assert {w.name for w in wheels} == set(locked)

    started = time.monotonic()
    again = resolve(tmp_path / "b")
    assert time.monotonic() - started < 120, "a locked resolve must take the cached wheel, not compile again"
    assert [(w.filename, w.sha256) for w in again] == [(w.filename, w.sha256) for w in wheels]

    with pytest.raises(ResolveError, match=r"llama-cpp-python.*python 3\.12.*this builder \(python 3\.11"):
        resolve_wheels(
            ["llama-cpp-python[server]==0.3.36"],
            dest=tmp_path / "c",
            python_version="3.12",
            platforms=["manylinux_2_28_x86_64"],
            build_cache=cache,
            progress=False,
        )
