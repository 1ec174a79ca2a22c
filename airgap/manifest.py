"""The signed manifest: a pure value type with a canonical byte form. No I/O here.

The bytes that are signed are exactly `Manifest.to_bytes()`; parsing validates every field against
explicit `Limits` so that a hostile manifest cannot make us allocate, loop or write without bound.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from airgap.errors import FormatError

FORMAT_VERSION = 1
MANIFEST_TYPE = "airgap/manifest"  # bound into the signed bytes: a signature over other JSON is not a manifest

FileKind = Literal["model", "wheel", "sdist", "meta", "engine"]
Storage = Literal["raw", "zstd", "absent"]
FILE_KINDS: tuple[FileKind, ...] = ("model", "wheel", "sdist", "meta", "engine")
STORAGES: tuple[Storage, ...] = ("raw", "zstd", "absent")

_PATH_RE = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a bundle may ask of the host, checked before anything is allocated."""

    max_manifest_bytes: int = 16 << 20
    max_signatures_bytes: int = 64 << 10
    max_files: int = 100_000
    max_path_length: int = 240
    max_file_size: int = 1 << 40
    max_total_size: int = 4 << 40
    max_signatures: int = 64
    max_root_chain: int = 32
    max_metadata_bytes: int = 1 << 20


DEFAULT_LIMITS = Limits()


def check_path(path: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """Accept only plain relative paths: no `..`, no absolute path, no odd characters."""
    if len(path) > limits.max_path_length or not _PATH_RE.match(path):
        raise FormatError(f"unsafe file path in manifest: expected a plain relative path, found {path!r}")
    if any(part in (".", "..") for part in path.split("/")):
        raise FormatError(f"unsafe file path in manifest: {path!r} contains '.' or '..'")
    return path


def check_name(name: str, what: str) -> str:
    if not _NAME_RE.match(name):
        raise FormatError(f"invalid {what}: expected letters, digits, '.', '_' or '-', found {name!r}")
    return name


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise FormatError(f"invalid {what}: expected YYYY-MM-DDTHH:MM:SSZ, found {text!r}") from None


@dataclass(frozen=True)
class FileEntry:
    """One file of the target state: where it goes, how big it is, its hash, how the bundle carries it."""

    path: str
    size: int
    sha256: str
    kind: FileKind
    storage: Storage = "raw"
    stored_size: int = 0
    source: Mapping[str, str] = field(default_factory=dict)

    @property
    def carried(self) -> bool:
        return self.storage != "absent"

    @property
    def member_name(self) -> str:
        """The name of this file's member in the bundle's tar stream."""
        return f"files/{self.path}.zst" if self.storage == "zstd" else f"files/{self.path}"


@dataclass(frozen=True)
class ModelEntry:
    """A model clients ask for by `id`, its file(s) and what its GGUF header says."""

    id: str
    files: tuple[str, ...]
    gguf: Mapping[str, Any] = field(default_factory=dict)
    embedding: bool = False  # an embedding model: served on /v1/embeddings


@dataclass(frozen=True)
class PythonPackage:
    name: str
    version: str
    path: str


@dataclass(frozen=True)
class BaseRef:
    """The installed version an update drop applies on top of."""

    name: str
    version: str
    manifest_sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: datetime
    expires: datetime
    tool_version: str
    files: tuple[FileEntry, ...]
    models: tuple[ModelEntry, ...] = ()
    packages: tuple[PythonPackage, ...] = ()
    python: Mapping[str, Any] = field(default_factory=dict)
    base: BaseRef | None = None
    sha256sums: str = ""
    format_version: int = FORMAT_VERSION

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise FormatError(f"manifest of {self.name} {self.version} lists no file {path!r}")

    @property
    def carried_files(self) -> tuple[FileEntry, ...]:
        return tuple(e for e in self.files if e.carried)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files)

    def sha256sums_text(self) -> bytes:
        """`sha256sum -c` input for the files the bundle carries, relative to the bundle's `files/`."""
        return "".join(f"{e.sha256}  {e.path}\n" for e in self.carried_files).encode()

    def with_sha256sums(self) -> Manifest:
        from airgap.hashing import digest_bytes

        return replace(self, sha256sums=digest_bytes(self.sha256sums_text()).sha256)

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": MANIFEST_TYPE,
            "format": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "tool": {"name": "airgap", "version": self.tool_version},
            "base": None if self.base is None else {
                "name": self.base.name, "version": self.base.version,
                "manifest_sha256": self.base.manifest_sha256,
            },
            "files": [_file_to_dict(e) for e in self.files],
            "models": [{"id": m.id, "files": list(m.files), "gguf": dict(m.gguf),
                        **({"embedding": True} if m.embedding else {})} for m in self.models],
            "python": {
                **dict(self.python),
                "packages": [{"name": p.name, "version": p.version, "path": p.path} for p in self.packages],
            },
            "sha256sums": self.sha256sums,
        }

    def to_bytes(self) -> bytes:
        """Canonical form: sorted keys, fixed indentation, ASCII only, one trailing newline."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _file_to_dict(entry: FileEntry) -> dict[str, Any]:
    return {
        "path": entry.path, "size": entry.size, "sha256": entry.sha256, "kind": entry.kind,
        "storage": entry.storage, "stored_size": entry.stored_size, "source": dict(entry.source),
    }


def parse_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Parse and validate manifest bytes. Raises FormatError naming the first bad field."""
    if len(data) > limits.max_manifest_bytes:
        raise FormatError(f"manifest too large: limit {limits.max_manifest_bytes} bytes, found {len(data)}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"manifest is not valid JSON: {exc}") from None
    doc = JsonObject(raw, "manifest")
    if doc.text("_type") != MANIFEST_TYPE:
        raise FormatError(f"not an airgap manifest: expected _type {MANIFEST_TYPE!r}, found {raw.get('_type')!r}")
    fmt = doc.num("format")
    if fmt != FORMAT_VERSION:
        raise FormatError(f"unsupported manifest format: this airgap reads format {FORMAT_VERSION}, found {fmt}")
    files = tuple(_parse_file(JsonObject(f, "file"), limits) for f in doc.items("files", limits.max_files))
    _check_unique(files)
    total = sum(f.size for f in files)
    if total > limits.max_total_size:
        raise FormatError(f"bundle too large: limit {limits.max_total_size} bytes, manifest declares {total}")
    python = doc.obj("python")
    manifest = Manifest(
        name=check_name(doc.text("name"), "bundle name"),
        version=check_name(doc.text("version"), "bundle version"),
        created=parse_time(doc.text("created"), "creation time"),
        expires=parse_time(doc.text("expires"), "expiry time"),
        tool_version=JsonObject(doc.obj("tool"), "tool").text("version"),
        files=files,
        models=tuple(_parse_model(JsonObject(m, "model"), files) for m in doc.items("models", limits.max_files)),
        packages=tuple(_parse_package(JsonObject(p, "package"), files) for p in JsonObject(python, "python").items(
            "packages", limits.max_files)),
        python={k: v for k, v in python.items() if k != "packages"},
        base=_parse_base(raw.get("base")),
        sha256sums=_check_sha256(doc.text("sha256sums"), "sha256sums"),
    )
    if manifest.with_sha256sums().sha256sums != manifest.sha256sums:
        raise FormatError("manifest's sha256sums field does not match its own file list")
    return manifest


def _check_unique(files: tuple[FileEntry, ...]) -> None:
    seen: set[str] = set()
    for entry in files:
        key = entry.path.lower()  # case-insensitive file systems (FAT, exFAT) must not merge two entries
        if key in seen:
            raise FormatError(f"manifest lists {entry.path!r} twice")
        seen.add(key)


def _check_sha256(value: str, what: str) -> str:
    if not _SHA256_RE.match(value):
        raise FormatError(f"invalid {what}: expected 64 lowercase hex digits, found {value!r}")
    return value


def _parse_file(doc: JsonObject, limits: Limits) -> FileEntry:
    size = doc.num("size")
    if size > limits.max_file_size:
        raise FormatError(f"file too large: limit {limits.max_file_size} bytes, found {size}")
    kind = doc.text("kind")
    storage = doc.text("storage")
    if kind not in FILE_KINDS:
        raise FormatError(f"invalid file kind: expected one of {', '.join(FILE_KINDS)}, found {kind!r}")
    if storage not in STORAGES:
        raise FormatError(f"invalid storage: expected one of {', '.join(STORAGES)}, found {storage!r}")
    stored_size = doc.num("stored_size")
    if storage == "raw" and stored_size != size:
        raise FormatError(f"raw file {doc.text('path')!r}: stored_size {stored_size} differs from size {size}")
    source = doc.obj("source")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in source.items()):
        raise FormatError("invalid file source: expected string keys and values")
    return FileEntry(
        path=check_path(doc.text("path"), limits), size=size, sha256=_check_sha256(doc.text("sha256"), "sha256"),
        kind=kind, storage=storage, stored_size=stored_size, source=source,
    )


def _parse_model(doc: JsonObject, files: tuple[FileEntry, ...]) -> ModelEntry:
    paths = {f.path for f in files}
    model_files = tuple(str(p) for p in doc.items("files", 10_000))
    missing = [p for p in model_files if p not in paths]
    if missing or not model_files:
        raise FormatError(f"model {doc.text('id')!r} names files the manifest does not list: {missing}")
    embedding = doc.raw.get("embedding", False)
    if not isinstance(embedding, bool):
        raise FormatError(f"invalid model {doc.text('id')!r}: 'embedding' must be true or false, found {embedding!r}")
    return ModelEntry(id=check_name(doc.text("id"), "model id"), files=model_files, gguf=doc.obj("gguf"),
                      embedding=embedding)


def _parse_package(doc: JsonObject, files: tuple[FileEntry, ...]) -> PythonPackage:
    path = doc.text("path")
    if path not in {f.path for f in files}:
        raise FormatError(f"python package {doc.text('name')!r} names a file the manifest does not list: {path}")
    return PythonPackage(name=doc.text("name"), version=doc.text("version"), path=path)


def _parse_base(raw: object) -> BaseRef | None:
    if raw is None:
        return None
    doc = JsonObject(raw, "base")
    return BaseRef(
        name=check_name(doc.text("name"), "base name"), version=check_name(doc.text("version"), "base version"),
        manifest_sha256=_check_sha256(doc.text("manifest_sha256"), "base manifest_sha256"),
    )


class JsonObject:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, raw: object, what: str) -> None:
        if not isinstance(raw, dict):
            raise FormatError(f"invalid {what}: expected a JSON object, found {type(raw).__name__}")
        self.raw: dict[str, Any] = raw
        self.what = what

    def _get(self, key: str, kind: type, kind_name: str) -> Any:
        value = self.raw.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"invalid {self.what}: field {key!r} must be {kind_name}, found {repr(value)[:80]}")
        return value

    def text(self, key: str) -> str:
        return str(self._get(key, str, "a string"))

    def num(self, key: str) -> int:
        value = int(self._get(key, int, "an integer"))
        if value < 0:
            raise FormatError(f"invalid {self.what}: field {key!r} must not be negative, found {value}")
        return value

    def obj(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, dict, "an object"))

    def items(self, key: str, limit: int) -> list[Any]:
        value = list(self._get(key, list, "a list"))
        if len(value) > limit:
            raise FormatError(f"invalid {self.what}: field {key!r} has {len(value)} items, limit {limit}")
        return value
