"""Where each kind of manifest file may go in an installed version. Pure: no I/O.

An installed version is `versions/<gen>/` holding `manifest.json` (written by airgap), `venv/` (made by
airgap, filled only by the wheel installer), and one link per model or meta file. So a path of each kind
goes only where that kind belongs, checked before anything of the bundle is read:

- `model` files under `models/`;
- `wheel` files as `wheels/<PEP 427 file name>`, each named by exactly one python package and back;
- `engine` files (llama-server and its libraries) under `engine/`, copied into the version executable;
- `meta` files anywhere else, except `manifest.json`, `venv/`, `models/`, `wheels/` and `engine/`;
- `sdist` files nowhere: install takes binary wheels only, since building one runs its code.
"""

from __future__ import annotations

import re

from packaging.utils import canonicalize_name
from packaging.version import VERSION_PATTERN, InvalidVersion, Version

from airgap.errors import FormatError
from airgap.format.manifest import Manifest

_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")  # PEP 508 names, matched whole
_VERSION_RE = re.compile(VERSION_PATTERN, re.VERBOSE | re.IGNORECASE)
KIND_FOLDERS = {"model": "models", "wheel": "wheels", "engine": "engine"}
RESERVED_TOP = frozenset({"manifest.json", "venv"})  # made by airgap in every version, never by the bundle


def check_package_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise FormatError(f"invalid python package name: expected a PEP 503 name (letters, digits, '.', '_', '-', "
                          f"starting and ending with a letter or digit), found {name!r}")
    return name


def check_package_version(version: str, name: str) -> Version:
    if not _VERSION_RE.fullmatch(version):
        raise FormatError(f"invalid version of python package {name!r}: expected a PEP 440 version, "
                          f"found {version!r}")
    try:
        return Version(version)
    except InvalidVersion as exc:
        raise FormatError(f"invalid version of python package {name!r}: {exc}") from exc


def check_layout(manifest: Manifest) -> None:
    """Raise FormatError at the first file that would land where its kind does not belong."""
    for entry in manifest.files:
        top = entry.path.split("/")[0].lower()  # case-insensitively: a FAT stick must not merge the two
        if entry.kind == "sdist":
            raise FormatError(f"{entry.path}: a source distribution; install takes binary wheels only (building "
                              f"one runs its code)")
        folder = KIND_FOLDERS.get(entry.kind)
        if folder is not None:
            depth = entry.path.count("/")
            if top != folder or depth == 0 or (entry.kind == "wheel" and depth != 1):
                where = f"{folder}/<file>" if entry.kind == "wheel" else f"{folder}/"
                raise FormatError(f"{entry.path}: a {entry.kind} file must lie in {where}")
        elif top in RESERVED_TOP or top in KIND_FOLDERS.values():
            raise FormatError(f"{entry.path}: a {entry.kind} file may not lie in {top!r}, which belongs to "
                              f"{'airgap' if top in RESERVED_TOP else 'another kind of file'}")
    _check_packages(manifest)


def _check_packages(manifest: Manifest) -> None:
    kinds = {e.path: e.kind for e in manifest.files}
    named: dict[str, str] = {}
    seen: set[str] = set()
    for package in manifest.packages:
        canonical = canonicalize_name(check_package_name(package.name))
        check_package_version(package.version, package.name)
        if canonical in seen:
            raise FormatError(f"python package {package.name!r} is listed twice")
        seen.add(canonical)
        if kinds.get(package.path) != "wheel":
            raise FormatError(f"python package {package.name} {package.version}: its file {package.path!r} is not "
                              f"a wheel file of the manifest")
        if package.path in named:
            raise FormatError(f"{package.path} is named by two python packages, {named[package.path]!r} and "
                              f"{package.name!r}")
        named[package.path] = package.name
    unnamed = [path for path, kind in kinds.items() if kind == "wheel" and path not in named]
    if unnamed:
        raise FormatError(f"{unnamed[0]}: a wheel file no python package of the manifest names")
