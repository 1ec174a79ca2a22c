"""Python wheels on the isolated host, through pypa/installer: no pip, no resolver, no build step.

The manifest already pins the exact set of wheels with their hashes, so the host only unpacks them.
A wheel is a zip file; installing one runs none of its code (no setup.py, no build backend, no
post-install hook). The virtualenv is made without pip (`venv.EnvBuilder(with_pip=False)`), so
nothing of pip runs either. Every wheel is checked before a byte of it is written: its file name
(PEP 427, with a PEP 503 name and a PEP 440 version equal to the manifest's), its zip structure (one
`.dist-info` matching name and version, with `WHEEL` and a `RECORD` that lists every file with its
hash and size, all checked), and where its files land (see `_check_destination`).

Each file's content is checked against the wheel's RECORD as it is written (one pass over the zip,
not two): a mismatch fails the install of a version that is not active yet, and it is discarded.

No bytecode is compiled at install, though compiling would run nothing of the wheel (it only parses
source into code objects). Two reasons: it was most of the install's fixed cost (0.8 s of 2.4 s for
airgap's own wheels), and without .pyc files the code Python runs is exactly the sources that RECORD
lists and `airgap verify --installed` re-hashes; a .pyc beside its source is loaded instead of it and
checked against nothing but the source's mtime and size. The server compiles in memory at import.

This is the only module that imports `installer`; its exceptions become ours here.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import re
import sys
import sysconfig
import venv
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.exceptions import InstallerError
from installer.records import Hash, RecordEntry, parse_record_file
from installer.sources import WheelFile
from installer.utils import Scheme, copyfileobj_with_hashing, make_file_executable, parse_entrypoints
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from airgap.errors import FormatError, InstallError
from airgap.format.layout import check_package_version

_SCRIPT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_RESERVED_SCRIPT_RE = re.compile(r"python(3(\.\d+)?)?|pip.*|activate.*|easy_install.*", re.IGNORECASE)

# `pip` in a venv made without pip would only wait for someone to run it as the real pip
REFUSED_DISTRIBUTIONS = frozenset({"pip"})
# imported by `site` at every start of the venv's Python, like a .pth but not even a listed file
REFUSED_MODULES = frozenset({"sitecustomize", "usercustomize"})
VENV_OWN_FILES = frozenset({"pyvenv.cfg", "lib64"})
INSTALLER_NAME = b"airgap\n"


@dataclass(frozen=True)
class WheelContents:
    """What an operator should see before installing a wheel: what runs at every start, what goes on PATH."""

    name: str
    version: str
    filename: str
    pth_files: tuple[str, ...]
    scripts: tuple[str, ...]


@dataclass(frozen=True)
class WheelToInstall:
    """A verified wheel blob in the store, with the name and version the signed manifest gives it."""

    blob: Path
    filename: str
    name: str
    version: str


def check_wheel_filename(filename: str, name: str, version: str) -> None:
    """The file is a PEP 427 wheel of exactly the package and version the manifest names."""
    try:
        wheel_name, wheel_version, _, _ = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion) as exc:
        raise FormatError(f"python package {name} {version}: {filename!r} is not a wheel file name (PEP 427; "
                          f"install takes binary wheels only, never a source distribution): {exc}") from exc
    if wheel_name != canonicalize_name(name) or wheel_version != check_package_version(version, name):
        raise FormatError(f"python package {name} {version}: its file {filename!r} is a wheel of {wheel_name} "
                          f"{wheel_version}")
    if canonicalize_name(name) in REFUSED_DISTRIBUTIONS:
        raise FormatError(f"python package {name!r} refused: the virtualenv is made without pip and no bundle "
                          f"may put one there")


def reserved_script(name: str) -> bool:
    return bool(_RESERVED_SCRIPT_RE.fullmatch(name))


def examine_wheel(wheel: WheelToInstall) -> WheelContents:
    """Check one wheel completely (name, zip structure, RECORD hashes, destinations); nothing is written."""
    with _open_wheel(wheel) as (source, archive):
        return _examine(source, archive, wheel)


def install_wheels(venv_dir: Path, wheels: Sequence[WheelToInstall]) -> tuple[WheelContents, ...]:
    """Make a virtualenv without pip at `venv_dir` (which must not exist) and install exactly `wheels`."""
    create_venv(venv_dir)
    schemes = venv_schemes(venv_dir)
    interpreter = str(venv_dir / "bin" / "python")
    contents = []
    for wheel in wheels:
        with _open_wheel(wheel) as (source, archive):
            contents.append(_examine(source, archive, wheel))
            destination = _ExclusiveDestination(
                scheme_dict={**schemes, "headers": str(venv_dir / "include" / "site" / _python_tag()
                                                       / canonicalize_name(wheel.name))},
                interpreter=interpreter, script_kind="posix")
            destination.expected = _recorded(source, archive, wheel)
            try:
                install(source, destination, {"INSTALLER": INSTALLER_NAME})
            except FileExistsError as exc:
                raise InstallError(f"{wheel.filename}: refused to overwrite {exc.filename or exc} (another wheel "
                                   f"or the virtualenv itself has that file)") from exc
            except FormatError:
                raise
            except (InstallerError, ValueError, AssertionError, zipfile.BadZipFile) as exc:
                raise InstallError(f"{wheel.filename}: installing the wheel failed: {exc}") from exc
    check_installed(venv_dir, wheels)
    return tuple(contents)


def create_venv(venv_dir: Path) -> None:
    """A virtualenv of this Python, without pip: only the interpreter links and pyvenv.cfg."""
    venv_dir.mkdir(mode=0o755)  # a fresh folder of our own: nothing planted in it is written through
    venv.EnvBuilder(with_pip=False, symlinks=True).create(venv_dir)


def venv_schemes(venv_dir: Path) -> dict[str, str]:
    base = str(venv_dir)
    return sysconfig.get_paths("venv", vars={"base": base, "platbase": base, "installed_base": base,
                                             "installed_platbase": base})


def site_packages(venv_dir: Path) -> Path:
    return Path(venv_schemes(venv_dir)["purelib"])


def check_installed(venv_dir: Path, wheels: Sequence[WheelToInstall]) -> None:
    """Exactly the manifest's packages at their versions are in the venv, read from the installed .dist-info."""
    expected: dict[str, Version] = {canonicalize_name(w.name): Version(w.version) for w in wheels}
    found: dict[str, Version] = {}
    for dist_info in sorted(site_packages(venv_dir).glob("*.dist-info")):
        try:
            metadata = email.parser.BytesParser().parsebytes((dist_info / "METADATA").read_bytes(), headersonly=True)
            name, version = canonicalize_name(str(metadata["Name"])), Version(str(metadata["Version"]))
        except (OSError, InvalidVersion) as exc:
            raise InstallError(f"installed {dist_info.name} has no readable name and version: {exc}") from exc
        if name in found:
            raise InstallError(f"the virtualenv holds {name} twice ({found[name]} and {version})")
        found[name] = version
    if found != expected:
        missing = sorted(f"{n} {v}" for n, v in expected.items() if found.get(n) != v)
        extra = sorted(f"{n} {v}" for n, v in found.items() if expected.get(n) != v)
        raise InstallError(f"the virtualenv does not hold exactly the manifest's packages: expected "
                           f"{', '.join(missing) or 'nothing more'}, found {', '.join(extra) or 'nothing more'}")


def check_venv_records(venv_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every file each installed distribution's RECORD lists: (files checked, problems found)."""
    checked, problems = 0, []
    root = site_packages(venv_dir)
    for record_path in sorted(root.glob("*.dist-info/RECORD")):
        try:
            rows = list(parse_record_file(record_path.read_text().splitlines()))
        except (OSError, ValueError, InstallerError) as exc:
            problems.append(f"{record_path}: unreadable: {exc}")
            continue
        for row in rows:
            try:
                record = RecordEntry.from_elements(*row)
            except InstallerError as exc:
                problems.append(f"{record_path}: bad entry {row[0]!r}: {exc}")
                continue
            if record.hash_ is None:  # RECORD itself
                continue
            target = Path(os.path.normpath(root / record.path))
            checked += 1
            try:
                fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as handle:
                    good = record.validate_stream(handle)
            except OSError as exc:
                problems.append(f"venv file {target} is unreadable: {exc.strerror}")
                continue
            if not good:
                problems.append(f"venv file {target} differs from what the wheel installed (RECORD)")
    return checked, problems


def wheel_contents_from_bytes(data: BinaryIO, filename: str, name: str, version: str) -> WheelContents:
    """`examine_wheel` for a wheel held in memory or a temporary file (for `airgap inspect`)."""
    wheel = WheelToInstall(Path(filename), filename, name, version)
    check_wheel_filename(filename, name, version)
    try:
        archive = zipfile.ZipFile(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise FormatError(f"{filename}: not a zip archive, so not a wheel: {exc}") from exc
    with archive:
        archive.filename = filename
        return _examine(_wheel_source(archive, wheel), archive, wheel)


# ---------------------------------------------------------------- checks

class _OpenWheel:
    def __init__(self, wheel: WheelToInstall) -> None:
        self.wheel = wheel

    def __enter__(self) -> tuple[WheelFile, zipfile.ZipFile]:
        check_wheel_filename(self.wheel.filename, self.wheel.name, self.wheel.version)
        try:
            fd = os.open(self.wheel.blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InstallError(f"{self.wheel.filename}: cannot open {self.wheel.blob}: {exc.strerror}") from exc
        self.handle = os.fdopen(fd, "rb")
        try:
            self.archive = zipfile.ZipFile(self.handle)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
            self.handle.close()
            raise FormatError(f"{self.wheel.filename}: not a zip archive, so not a wheel: {exc}") from exc
        self.archive.filename = self.wheel.filename  # installer reads name and version from it
        return _wheel_source(self.archive, self.wheel), self.archive

    def __exit__(self, *exc: object) -> None:
        self.archive.close()
        self.handle.close()


def _open_wheel(wheel: WheelToInstall) -> _OpenWheel:
    return _OpenWheel(wheel)


def _wheel_source(archive: zipfile.ZipFile, wheel: WheelToInstall) -> WheelFile:
    try:
        return WheelFile(archive)
    except (InstallerError, ValueError) as exc:
        raise FormatError(f"{wheel.filename}: not a valid wheel: {exc}") from exc


def _examine(source: WheelFile, archive: zipfile.ZipFile, wheel: WheelToInstall) -> WheelContents:
    try:
        dist_info = source.dist_info_dir
        stem = dist_info.removesuffix(".dist-info")
        dist_name, _, dist_version = stem.rpartition("-")
        if (canonicalize_name(dist_name) != canonicalize_name(wheel.name)
                or Version(dist_version) != Version(wheel.version)):
            raise FormatError(f"{wheel.filename}: its metadata folder {dist_info!r} is not {wheel.name} "
                              f"{wheel.version}")
        present = set(source.dist_info_filenames)
        for required in ("WHEEL", "RECORD", "METADATA"):
            if required not in present:
                raise FormatError(f"{wheel.filename}: not a valid wheel: {dist_info}/{required} is missing")
        source.validate_record(validate_contents=False)  # every name listed, with hash and size
        scripts = list(_entry_point_scripts(source, wheel))
        root_scheme = _root_scheme(source, wheel)
        pth: list[str] = []
        for name in archive.namelist():
            if name.endswith("/"):
                continue
            scheme, path = _scheme_of(name, source.data_dir, root_scheme, wheel)
            _check_destination(scheme, path, wheel, pth, scripts)
    except (InstallerError, ValueError, InvalidVersion, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(f"{wheel.filename}: not a valid wheel: {exc}") from exc
    return WheelContents(wheel.name, wheel.version, wheel.filename, tuple(sorted(pth)), tuple(sorted(scripts)))


def _root_scheme(source: WheelFile, wheel: WheelToInstall) -> str:
    text = source.read_dist_info("WHEEL")
    fields = email.parser.Parser().parsestr(text, headersonly=True)
    if not str(fields.get("Wheel-Version", "")).startswith("1."):
        raise FormatError(f"{wheel.filename}: expected Wheel-Version 1.x, found {fields.get('Wheel-Version')!r}")
    return "purelib" if str(fields.get("Root-Is-Purelib", "")).strip().lower() == "true" else "platlib"


def _entry_point_scripts(source: WheelFile, wheel: WheelToInstall) -> Iterator[str]:
    if "entry_points.txt" not in source.dist_info_filenames:
        return
    try:
        entries = list(parse_entrypoints(source.read_dist_info("entry_points.txt")))
    except (configparser.Error, AssertionError, UnicodeDecodeError) as exc:
        raise FormatError(f"{wheel.filename}: unreadable entry_points.txt: {exc!r}") from exc
    for name, _, _, _ in entries:
        _check_script_name(name, wheel)
        yield name


def _check_script_name(name: str, wheel: WheelToInstall) -> None:
    if not _SCRIPT_RE.fullmatch(name):
        raise FormatError(f"{wheel.filename}: script name {name!r} is not a plain file name")
    if reserved_script(name):
        raise FormatError(f"{wheel.filename}: refused script {name!r}: python*, pip*, activate* in the "
                          f"virtualenv's bin belong to the virtualenv")


def _scheme_of(name: str, data_dir: str, root_scheme: str, wheel: WheelToInstall) -> tuple[str, str]:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise FormatError(f"{wheel.filename}: unsafe file name {name!r} in the wheel")
    if parts[0] != data_dir:
        return root_scheme, name
    if len(parts) < 3 or parts[1] not in ("purelib", "platlib", "headers", "scripts", "data"):
        raise FormatError(f"{wheel.filename}: {name!r} is not in a valid .data subfolder")
    return parts[1], "/".join(parts[2:])


def _check_destination(scheme: str, path: str, wheel: WheelToInstall, pth: list[str], scripts: list[str]) -> None:
    """Where a file may land: nothing over the venv's own files, nothing that runs at start unlisted."""
    major_minor = _python_tag()
    if scheme == "data":  # the venv's root: map it onto the other schemes' folders to apply their rules
        parts = path.split("/")
        if parts[0] in VENV_OWN_FILES or (parts[0] == "include" and len(parts) > 1 and parts[1] != "site"):
            raise FormatError(f"{wheel.filename}: refused {path!r}: it would land on the virtualenv's own files")
        if parts[0] == "bin" and len(parts) == 2:
            scheme, path = "scripts", parts[1]
        elif parts[:3] == ["lib", major_minor, "site-packages"] and len(parts) > 3:
            scheme, path = "purelib", "/".join(parts[3:])
        elif parts[0] == "lib":
            raise FormatError(f"{wheel.filename}: refused {path!r}: only site-packages of the venv's lib is the "
                              f"wheels' place")
    if scheme == "scripts":
        _check_script_name(path, wheel)
        scripts.append(path)
    elif scheme in ("purelib", "platlib"):
        top = path.split("/")[0]
        if top.split(".")[0] in REFUSED_MODULES:
            raise FormatError(f"{wheel.filename}: refused {path!r}: a top-level {top.split('.')[0]} module runs at "
                              f"every start of the virtualenv's Python")
        if "/" not in path and path.endswith(".pth"):
            pth.append(path)


def _python_tag() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def _recorded(source: WheelFile, archive: zipfile.ZipFile, wheel: WheelToInstall) -> dict[tuple[str, str], RecordEntry]:
    """The wheel's RECORD, keyed by where each file lands (scheme, path in it)."""
    root_scheme = _root_scheme(source, wheel)
    expected = {}
    for row in parse_record_file(source.read_dist_info("RECORD").splitlines()):
        record = RecordEntry.from_elements(*row)
        if record.hash_ is not None:
            expected[_scheme_of(record.path, source.data_dir, root_scheme, wheel)] = record
    return expected


class _ExclusiveDestination(SchemeDictionaryDestination):
    """installer's destination, but every file is a new name (never over an existing file, never through a
    link), and its content must be what the wheel's RECORD says."""

    expected: dict[tuple[str, str], RecordEntry] | None = None

    def write_to_fs(self, scheme: Scheme, path: str, stream: BinaryIO, is_executable: bool) -> RecordEntry:
        target = self._path_with_destdir(scheme, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            digest, size = copyfileobj_with_hashing(stream, out, self.hash_algorithm)
        if is_executable:
            make_file_executable(target)
        written = RecordEntry(path, Hash(self.hash_algorithm, digest), size)
        record = (self.expected or {}).get((str(scheme), path))
        if record is not None and scheme != "scripts" and not _same(record, written, target):  # scripts: new shebang
            raise FormatError(f"{path}: its content differs from the wheel's RECORD (hash or size)")
        return written


def _same(record: RecordEntry, written: RecordEntry, target: Path) -> bool:
    if record.hash_ is not None and written.hash_ is not None and record.hash_.name == written.hash_.name:
        return record.hash_.value == written.hash_.value and record.size in (None, written.size)
    with target.open("rb") as handle:  # RECORD made with another algorithm: hash the written file with it
        return record.validate_stream(handle)
