"""Each kind of manifest file goes only where it belongs; package names and versions are strict."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from airgap.errors import FormatError
from airgap.format.layout import check_layout
from airgap.format.manifest import FileEntry, Manifest, PythonPackage

T = datetime(2030, 1, 1, tzinfo=UTC)
WHEEL = "wheels/x-1.0-py3-none-any.whl"


def manifest(files: dict[str, str], packages: tuple[PythonPackage, ...] = ()) -> Manifest:
    entries = tuple(FileEntry(path, 1, "a" * 64, kind) for path, kind in files.items())  # type: ignore[arg-type]
    return Manifest("b", "1.0", T, T, "0.1.0", entries, packages=packages)


def test_a_normal_layout_passes() -> None:
    check_layout(manifest({"models/m/a.gguf": "model", WHEEL: "wheel", "trust/root.1.json": "meta",
                           "bootstrap-requirements.txt": "meta"}, (PythonPackage("x", "1.0", WHEEL),)))


@pytest.mark.parametrize(("path", "kind", "message"), [
    ("venv/lib/python3.11/site-packages/x.pth", "meta", "may not lie in 'venv', which belongs to airgap"),
    ("Venv/bin/python", "meta", "may not lie in 'venv'"),
    ("manifest.json", "meta", "may not lie in 'manifest.json', which belongs to airgap"),
    ("models/m/readme.txt", "meta", "which belongs to another kind of file"),
    ("wheels/x.pth", "meta", "which belongs to another kind of file"),
    ("wheels/x-1.0.tar.gz", "sdist", "a source distribution; install takes binary wheels only"),
    ("venv/x.gguf", "model", "a model file must lie in models/"),
    ("models.gguf", "model", "a model file must lie in models/"),
    ("wheels/sub/x-1.0-py3-none-any.whl", "wheel", "a wheel file must lie in wheels/<file>"),
])
def test_files_outside_their_kinds_place_are_refused(path: str, kind: str, message: str) -> None:
    with pytest.raises(FormatError, match=f"^{path}: .*{message.replace('(', '.').replace(')', '.')}"):
        check_layout(manifest({path: kind}))


@pytest.mark.parametrize(("name", "version", "message"), [
    ("x\n-r /etc/hostname\n", "1.0", "invalid python package name: .*found 'x\\\\n-r /etc/hostname\\\\n'"),
    ("_virtualenv", "1.0", "invalid python package name"),
    ("x", "1.16.0 ; python_version < '3'", "invalid version of python package 'x': expected a PEP 440 version"),
    ("x", "latest", "invalid version of python package 'x'"),
    ("x", "1.0\n", "invalid version of python package 'x'"),
])
def test_package_names_and_versions_are_strict(name: str, version: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        check_layout(manifest({WHEEL: "wheel"}, (PythonPackage(name, version, WHEEL),)))


def test_every_wheel_file_is_one_package_and_back() -> None:
    with pytest.raises(FormatError, match="a wheel file no python package of the manifest names"):
        check_layout(manifest({WHEEL: "wheel"}))
    with pytest.raises(FormatError, match="its file 'notes.txt' is not a wheel file of the manifest"):
        check_layout(manifest({"notes.txt": "meta"}, (PythonPackage("x", "1.0", "notes.txt"),)))
    with pytest.raises(FormatError, match="python package 'X' is listed twice"):
        check_layout(manifest({WHEEL: "wheel", "wheels/y-1.0-py3-none-any.whl": "wheel"},
                              (PythonPackage("x", "1.0", WHEEL),
                               PythonPackage("X", "1.0", "wheels/y-1.0-py3-none-any.whl"))))
