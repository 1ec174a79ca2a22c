"""Resolve with the real pip against local wheelhouses (--no-index), filled once by scripts/wheelhouse.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from airgap.build.sources import llama
from airgap.build.sources.wheels import Pip, ResolvedWheel, compatible_platforms, resolve_wheels
from airgap.errors import ResolveError
from tests.support import fill_wheelhouse, write_sdist

MANYLINUX = "manylinux_2_28_x86_64"
fill = fill_wheelhouse


@pytest.fixture(scope="session")
def base() -> Path:
    return fill("base", "-r", "click==8.1.7", "jinja2==3.1.6", "markupsafe==3.0.3", "setuptools>=61")


@pytest.fixture(scope="session")
def newer() -> Path:
    return fill("newer", "-r", "click==8.2.1", "--no-deps")


@pytest.fixture(scope="session")
def py312() -> Path:
    return fill("py312", "-r", "markupsafe==3.0.3", "--no-deps", "--python-version", "3.12", "--platform", MANYLINUX)


@pytest.fixture(scope="session")
def glibc_2_17() -> Path:
    """A wheel tagged only manylinux2014 / manylinux_2_17."""
    return fill("glibc-2-17", "-r", "google-crc32c==1.9.0", "--no-deps")


@pytest.fixture
def own_base(base: Path, tmp_path: Path) -> Path:
    """A private copy of the base wheelhouse that a test may tamper with."""
    return Path(shutil.copytree(base, tmp_path / "wheelhouse"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(wheels: list[ResolvedWheel]) -> list[tuple[str, str, str, str]]:
    return [(w.name, w.version, w.filename, w.sha256) for w in wheels]


def make_sdist(folder: Path, name: str = "tinysrc", version: str = "1.0") -> Path:
    """A source-only project built with setuptools, so pip must compile it into a wheel."""
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = ["click"]\n'
        ),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}/__init__.py": "VALUE = 42\n",
    }
    return write_sdist(folder, name, version, files)


def test_resolves_dependencies_from_a_local_wheelhouse(base: Path, tmp_path: Path) -> None:
    wheels = resolve_wheels(["jinja2==3.1.6"], dest=tmp_path / "out", find_links=[base], no_index=True, progress=False)

    assert [(w.name, w.version) for w in wheels] == [("jinja2", "3.1.6"), ("markupsafe", "3.0.3")]
    for wheel in wheels:
        assert wheel.path == tmp_path / "out" / wheel.filename
        assert wheel.sha256 == sha256(wheel.path) == sha256(base / wheel.filename)
        assert wheel.size == wheel.path.stat().st_size
        assert wheel.source["type"] == "find-links"
        assert wheel.source["location"] == str(base)


@pytest.mark.parametrize("requirement", ["click>=99", "no-such-project-airgap==1.0"])
def test_unsatisfiable_requirement_is_named(base: Path, tmp_path: Path, requirement: str) -> None:
    with pytest.raises(ResolveError, match=requirement.replace(".", r"\.")) as caught:
        resolve_wheels([requirement], dest=tmp_path / "out", find_links=[base], no_index=True, progress=False)
    assert "\n" not in str(caught.value)


def test_lock_is_written_and_reused_exactly(base: Path, newer: Path, tmp_path: Path) -> None:
    lock = tmp_path / "spec.toml.lock"
    first = resolve_wheels(
        ["click"], dest=tmp_path / "a", find_links=[base], no_index=True, lock_path=lock, progress=False
    )
    data = tomllib.loads(lock.read_text())
    assert data["requirements"] == ["click"]
    assert [(p["name"], p["version"], p["sha256"]) for p in data["package"]] == [("click", "8.1.7", first[0].sha256)]

    # a newer click is now on offer, but the lock decides
    again = resolve_wheels(
        ["click"], dest=tmp_path / "b", find_links=[newer, base], no_index=True, lock_path=lock, progress=False
    )
    assert summary(again) == summary(first)
    assert [sha256(w.path) for w in again] == [w.sha256 for w in first]


def test_upgrade_re_resolves_and_rewrites_the_lock(base: Path, newer: Path, tmp_path: Path) -> None:
    lock = tmp_path / "spec.toml.lock"
    resolve_wheels(["click"], dest=tmp_path / "a", find_links=[base], no_index=True, lock_path=lock, progress=False)

    upgraded = resolve_wheels(
        ["click"],
        dest=tmp_path / "b",
        find_links=[newer, base],
        no_index=True,
        lock_path=lock,
        upgrade=True,
        progress=False,
    )

    assert [(w.name, w.version) for w in upgraded] == [("click", "8.2.1")]
    assert [p["version"] for p in tomllib.loads(lock.read_text())["package"]] == ["8.2.1"]


def test_tampered_wheel_with_the_locked_name_is_refused(own_base: Path, tmp_path: Path) -> None:
    lock = tmp_path / "spec.toml.lock"
    [click] = resolve_wheels(
        ["click"], dest=tmp_path / "a", find_links=[own_base], no_index=True, lock_path=lock, progress=False
    )
    tampered = own_base / click.filename
    tampered.write_bytes(tampered.read_bytes() + b"extra")

    with pytest.raises(ResolveError, match=rf"other bytes.*click.*{click.sha256}"):
        resolve_wheels(
            ["click"], dest=tmp_path / "b", find_links=[own_base], no_index=True, lock_path=lock, progress=False
        )
    assert not (tmp_path / "b" / click.filename).exists()


def test_lock_made_for_other_requirements_is_refused(base: Path, tmp_path: Path) -> None:
    lock = tmp_path / "spec.toml.lock"
    resolve_wheels(["click"], dest=tmp_path / "a", find_links=[base], no_index=True, lock_path=lock, progress=False)

    with pytest.raises(ResolveError, match=r"pins \['click'\] but the spec asks for \['jinja2'\].*upgrade"):
        resolve_wheels(
            ["jinja2"], dest=tmp_path / "b", find_links=[base], no_index=True, lock_path=lock, progress=False
        )
    with pytest.raises(ResolveError, match=r"made for python 3\.11.*asks for python 3\.12"):
        resolve_wheels(
            ["click"],
            dest=tmp_path / "b",
            find_links=[base],
            no_index=True,
            lock_path=lock,
            python_version="3.12",
            progress=False,
        )


@pytest.mark.parametrize(("python", "abi"), [("3.12", "cp312"), ("3.11", "cp311")])
def test_target_python_and_platform_choose_the_wheels(
    base: Path, py312: Path, tmp_path: Path, python: str, abi: str
) -> None:
    [markupsafe] = resolve_wheels(
        ["markupsafe"],
        dest=tmp_path / "out",
        find_links=[base, py312],
        no_index=True,
        python_version=python,
        platforms=[MANYLINUX],
        progress=False,
    )

    tags = parse_wheel_filename(markupsafe.filename)[3]
    assert {tag.abi for tag in tags} == {abi}
    assert any(tag.platform == MANYLINUX for tag in tags)


def test_newer_manylinux_target_takes_wheels_for_older_glibc(glibc_2_17: Path, tmp_path: Path) -> None:
    [crc] = resolve_wheels(
        ["google-crc32c"],
        dest=tmp_path / "out",
        find_links=[glibc_2_17],
        no_index=True,
        python_version="3.11",
        platforms=[MANYLINUX],
        progress=False,
    )
    assert "manylinux_2_17_x86_64" in crc.filename

    with pytest.raises(ResolveError, match=r"google-crc32c.*manylinux_2_12_x86_64"):
        resolve_wheels(
            ["google-crc32c"],
            dest=tmp_path / "old",
            find_links=[glibc_2_17],
            no_index=True,
            python_version="3.11",
            platforms=["manylinux_2_12_x86_64"],
            progress=False,
        )


def test_platform_tags_expand_to_the_older_ones_they_run() -> None:
    tags = compatible_platforms(["manylinux_2_28_x86_64", "manylinux2014_aarch64", "musllinux_1_1_x86_64"])
    assert tags[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"} <= set(tags)
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(tags)
    assert "manylinux_2_16_aarch64" not in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert tags[-2:] == ["musllinux_1_1_x86_64", "musllinux_1_0_x86_64"]


def test_target_platform_without_a_wheel_is_refused(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ResolveError, match=r"markupsafe.*python 3\.11 on musllinux_1_2_x86_64"):
        resolve_wheels(
            ["markupsafe"],
            dest=tmp_path / "out",
            find_links=[base],
            no_index=True,
            python_version="3.11",
            platforms=["musllinux_1_2_x86_64"],
            progress=False,
        )


def test_source_only_project_is_built_once_for_the_builder(base: Path, tmp_path: Path) -> None:
    sdists = make_sdist(tmp_path / "sdists").parent
    cache = tmp_path / "cache"
    lock = tmp_path / "spec.toml.lock"

    wheels = resolve_wheels(
        ["tinysrc"],
        dest=tmp_path / "a",
        find_links=[base, sdists],
        no_index=True,
        lock_path=lock,
        build_cache=cache,
        progress=False,
    )

    assert [(w.name, w.version) for w in wheels] == [("click", "8.1.7"), ("tinysrc", "1.0")]
    built = wheels[1]
    assert built.filename.endswith(".whl")
    assert built.source["type"] == "built"
    assert built.source["from"] == "tinysrc-1.0.tar.gz"
    assert built.source["sdist_sha256"] == sha256(sdists / "tinysrc-1.0.tar.gz")
    [entry] = cache.iterdir()
    assert entry.name == built.source["cache_key"]
    locked = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    assert locked["tinysrc"]["filename"] == "tinysrc-1.0.tar.gz"
    assert locked["tinysrc"]["sha256"] == built.source["sdist_sha256"]

    # with the lock, the cached wheel is used as is: same bytes, no new cache entry
    again = resolve_wheels(
        ["tinysrc"],
        dest=tmp_path / "b",
        find_links=[base, sdists],
        no_index=True,
        lock_path=lock,
        build_cache=cache,
        progress=False,
    )
    assert summary(again) == summary(wheels)
    assert [p.name for p in cache.iterdir()] == [entry.name]


def test_source_only_project_for_another_target_is_refused(base: Path, py312: Path, tmp_path: Path) -> None:
    sdists = make_sdist(tmp_path / "sdists").parent
    with pytest.raises(ResolveError, match=r"tinysrc.*python 3\.12.*matches this builder \(python 3\.11"):
        resolve_wheels(
            ["tinysrc"],
            dest=tmp_path / "out",
            find_links=[base, py312, sdists],
            no_index=True,
            python_version="3.12",
            platforms=[MANYLINUX],
            build_cache=tmp_path / "cache",
            progress=False,
        )
    assert not (tmp_path / "cache").exists()


def test_pip_configuration_of_the_machine_does_not_leak_into_an_explicit_source(
    base: Path, newer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", str(newer))
    [click] = resolve_wheels(["click"], dest=tmp_path / "out", find_links=[base], no_index=True, progress=False)
    assert click.version == "8.1.7"


def test_pip_configuration_is_kept_when_the_source_is_left_to_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", "/somewhere")
    assert Pip().environment()["PIP_FIND_LINKS"] == "/somewhere"
    isolated = Pip(index_url="http://127.0.0.1:9/simple").environment()
    assert "PIP_FIND_LINKS" not in isolated
    assert isolated["PIP_CONFIG_FILE"] == os.devnull


def test_builder_platform_is_a_wheel_platform_tag() -> None:
    assert llama.builder_platform().startswith(("linux_", "macosx_", "win"))
    assert "-" not in llama.builder_platform()
