"""The signed manifest: a pure value type with a canonical byte form. No I/O here.

The bytes that are signed are exactly `Manifest.to_bytes()`; parsing validates every field against
explicit `Limits` so that a hostile manifest cannot make us allocate, loop or write without bound.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

from packaging.version import InvalidVersion, Version

from airgap.errors import FormatError, IntegrityError
from airgap.format import strictjson
from airgap.format.fields import Fields

FORMAT_VERSION = 2  # 2: `stored_sha256` for every compressed member (docs/FORMAT.md)
READABLE_FORMATS = (1, 2)  # installed format-1 manifests stay readable; bundle readers may ask for more
MANIFEST_TYPE = "airgap/manifest"  # bound into the signed bytes: a signature over other JSON is not a manifest

FileKind = Literal["model", "wheel", "sdist", "meta", "engine"]
Storage = Literal["raw", "zstd", "absent"]
FILE_KINDS: tuple[FileKind, ...] = ("model", "wheel", "sdist", "meta", "engine")
STORAGES: tuple[Storage, ...] = ("raw", "zstd", "absent")

# always used with fullmatch: `$` would also match before a trailing newline
_PATH_RE = re.compile(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a bundle may ask of the host, checked before anything is allocated."""

    max_manifest_bytes: int = 4 << 20
    max_files: int = 10_000
    max_path_length: int = 240
    max_file_size: int = 1 << 40
    max_total_size: int = 4 << 40
    max_signatures: int = 64
    max_root_chain: int = 32
    max_metadata_bytes: int = 1 << 20
    max_models: int = 256
    max_model_files: int = 1_000
    max_packages: int = 5_000
    max_source_fields: int = 16
    max_source_chars: int = 4096
    max_gguf_fields: int = 64


DEFAULT_LIMITS = Limits()


def check_path(path: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """Accept only plain relative paths: no `..`, no absolute path, no odd characters."""
    if len(path) > limits.max_path_length or not _PATH_RE.fullmatch(path):
        raise FormatError(f"unsafe file path in manifest: expected a plain relative path, found {path!r}")
    framed = f"/{path}/"
    if "/./" in framed or "/../" in framed:
        raise FormatError(f"unsafe file path in manifest: {path!r} contains '.' or '..'")
    return path


def check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise FormatError(f"invalid {what}: expected letters, digits, '.', '_' or '-', found {name!r}")
    return name


def check_version(version: str, what: str) -> str:
    """A bundle version: a plain name that is also a PEP 440 version, so that versions can be ordered."""
    check_name(version, what)
    try:
        Version(version)
    except InvalidVersion as exc:
        raise FormatError(f"invalid {what}: expected a PEP 440 version such as 1.2.0, found {version!r}") from exc
    return version


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"invalid {what}: expected YYYY-MM-DDTHH:MM:SSZ, found {text!r}") from exc


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
    stored_sha256: str | None = None  # SHA-256 of the member's bytes, for compressed members (format 2)

    @property
    def carried(self) -> bool:
        return self.storage != "absent"

    @property
    def member_name(self) -> str:
        """The name of this file's member in the bundle's tar stream."""
        return f"files/{self.path}.zst" if self.storage == "zstd" else f"files/{self.path}"


@dataclass(frozen=True)
class DraftFile:
    """A file on its way into a bundle: `sha256` is None until the packer has read its bytes.

    Only `hashed` turns it into a FileEntry, so no manifest can ever hold a hash nobody computed.
    """

    path: str
    size: int
    kind: FileKind
    sha256: str | None = None
    storage: Storage = "raw"
    stored_size: int = 0
    source: Mapping[str, str] = field(default_factory=dict)
    stored_sha256: str | None = None

    @property
    def member_name(self) -> str:
        return f"files/{self.path}.zst" if self.storage == "zstd" else f"files/{self.path}"

    def hashed(self, sha256: str | None = None) -> FileEntry:
        """The manifest entry, with the hash the packer computed or the one known before (they must agree)."""
        known = self.sha256 if sha256 is None else sha256
        if known is None:
            raise ValueError(f"{self.path} has not been hashed yet")
        if self.sha256 is not None and known != self.sha256:
            raise IntegrityError(f"{self.path} changed since it was hashed: expected sha256 {self.sha256}, "
                                 f"found {known}")
        return FileEntry(path=self.path, size=self.size, sha256=known, kind=self.kind, storage=self.storage,
                         stored_size=self.stored_size, source=self.source, stored_sha256=self.stored_sha256)


def draft_of(entry: FileEntry) -> DraftFile:
    return DraftFile(path=entry.path, size=entry.size, kind=entry.kind, sha256=entry.sha256, storage=entry.storage,
                     stored_size=entry.stored_size, source=entry.source, stored_sha256=entry.stored_sha256)


_HASH_FIELD_WIDTH = len('"') * 2 + 64 - len("null")  # a hash not yet known is written as null: 62 bytes short


def manifest_size(draft: Manifest, files: Sequence[FileEntry | DraftFile]) -> int:
    """The exact length of `draft.to_bytes()` once it lists `files`, every hash known, and its sha256sums.

    Hashes are fixed-width hex, so the length is known before the payload is read.
    """
    doc = draft.to_dict()
    doc["files"] = [_file_to_dict(f) for f in files]
    doc["sha256sums"] = None
    unknown = 1 + sum(f.sha256 is None for f in files)
    return len(_canonical(doc)) + unknown * _HASH_FIELD_WIDTH


def sha256sums_size(files: Sequence[FileEntry | DraftFile]) -> int:
    """The length of the SHA256SUMS text that lists the carried `files` (64 hex digits, two spaces, path)."""
    return sum(64 + 2 + len(f.path.encode()) + 1 for f in files if f.storage != "absent")


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
    target: Mapping[str, Any] | None = None  # the host built for (`build --target`); None: any host

    def __post_init__(self) -> None:
        stray = next((f for f in self.files if not isinstance(f, FileEntry)), None)
        if stray is not None:  # a DraftFile or a hand-made stand-in: a manifest lists only hashed files
            raise TypeError(f"a manifest lists FileEntry values, found {type(stray).__name__} for "
                            f"{getattr(stray, 'path', stray)!r}")

    def file(self, path: str) -> FileEntry:
        entry = self._by_path.get(path)
        if entry is None:
            raise FormatError(f"manifest of {self.name} {self.version} lists no file {path!r}")
        return entry

    @functools.cached_property
    def _by_path(self) -> dict[str, FileEntry]:
        return {e.path: e for e in self.files}

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
        return replace(self, sha256sums=hashlib.sha256(self.sha256sums_text()).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        optional = {} if self.target is None else {"target": dict(self.target)}
        return {
            **optional,
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
        return _canonical(self.to_dict())


def _canonical(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _file_to_dict(entry: FileEntry | DraftFile) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": entry.path, "size": entry.size, "sha256": entry.sha256, "kind": entry.kind,
        "storage": entry.storage, "stored_size": entry.stored_size, "source": dict(entry.source),
    }
    if entry.storage == "zstd" and entry.stored_sha256 is not None:  # an entry made absent keeps no stored hash
        doc["stored_sha256"] = entry.stored_sha256
    return doc


def parse_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS,
                   formats: tuple[int, ...] = READABLE_FORMATS) -> Manifest:
    """Parse and validate manifest bytes. Raises FormatError naming the first bad field.

    Every check is linear in the manifest's size (paths are looked up in one dict built once), so the
    largest manifest the limits allow parses in a fraction of a second.
    """
    if len(data) > limits.max_manifest_bytes:
        raise FormatError(f"manifest too large: limit {limits.max_manifest_bytes} bytes, found {len(data)}")
    raw = strictjson.loads(data, "manifest")
    doc = Fields(raw, "manifest")
    if doc.raw.get("_type") != MANIFEST_TYPE:
        raise FormatError(f"not an airgap manifest: expected _type {MANIFEST_TYPE!r}, "
                          f"found {repr(doc.raw.get('_type'))[:80]}")
    fmt = doc.num("format")
    if fmt not in formats:
        readable = " or ".join(str(f) for f in formats)
        raise FormatError(f"unsupported manifest format: this airgap reads format {readable}, found {fmt}")
    files = tuple(_parse_file(f, limits, fmt) for f in doc.items("files", limits.max_files))
    by_path = _check_unique(files)
    total = sum(f.size for f in files)
    if total > limits.max_total_size:
        raise FormatError(f"bundle too large: limit {limits.max_total_size} bytes, manifest declares {total}")
    python = doc.obj("python")
    manifest = Manifest(
        name=check_name(doc.text("name"), "bundle name"),
        version=check_version(doc.text("version"), "bundle version"),
        created=parse_time(doc.text("created"), "creation time"),
        expires=parse_time(doc.text("expires"), "expiry time"),
        tool_version=Fields(doc.obj("tool"), "tool").text("version"),
        files=files,
        models=_parse_models(doc.items("models", limits.max_models), by_path, limits),
        packages=_parse_packages(Fields(python, "python").items("packages", limits.max_packages), by_path),
        python={k: v for k, v in python.items() if k != "packages"},
        base=_parse_base(doc.raw.get("base")),
        sha256sums=_check_sha256(doc.text("sha256sums"), "sha256sums"),
        target=None if raw.get("target") is None else doc.obj("target"),
        format_version=fmt,
    )
    if manifest.with_sha256sums().sha256sums != manifest.sha256sums:
        raise FormatError("manifest's sha256sums field does not match its own file list")
    return manifest


def _check_unique(files: tuple[FileEntry, ...]) -> dict[str, FileEntry]:
    """Paths by name; a path listed twice (even in another case) is refused."""
    seen: set[str] = set()
    for entry in files:
        key = entry.path.lower()  # case-insensitive file systems (FAT, exFAT) must not merge two entries
        if key in seen:
            raise FormatError(f"manifest lists {entry.path!r} twice")
        seen.add(key)
    return {e.path: e for e in files}


def _check_sha256(value: str, what: str) -> str:
    if not _SHA256_RE.fullmatch(value):
        raise FormatError(f"invalid {what}: expected 64 lowercase hex digits, found {value[:80]!r}")
    return value


_FILE_FIELDS: Mapping[str, type] = {"path": str, "size": int, "sha256": str, "kind": str, "storage": str,
                                    "stored_size": int, "source": dict}


def _parse_file(raw: object, limits: Limits, fmt: int) -> FileEntry:
    # the manifest's bulk: field types checked inline (type() is, so that True is not an integer),
    # Fields only to word the error
    get = raw.get if type(raw) is dict else None
    if get is None or not (type(get("path")) is str and type(get("size")) is int and type(get("sha256")) is str
                           and type(get("kind")) is str and type(get("storage")) is str
                           and type(get("stored_size")) is int and type(get("source")) is dict):
        doc = Fields(raw, "file")
        for key, kind in _FILE_FIELDS.items():
            doc.typed(key, kind, {str: "a string", int: "an integer", dict: "an object"}[kind])
        raise AssertionError("unreachable: a field failed the fast check but not the slow one")
    raw = cast(dict[str, Any], raw)
    size, stored_size, kind, storage = raw["size"], raw["stored_size"], raw["kind"], raw["storage"]
    if size < 0 or stored_size < 0:
        raise FormatError(f"invalid file: sizes must not be negative, found {size} and {stored_size}")
    if size > limits.max_file_size:
        raise FormatError(f"file too large: limit {limits.max_file_size} bytes, found {size}")
    if kind not in FILE_KINDS:
        raise FormatError(f"invalid file kind: expected one of {', '.join(FILE_KINDS)}, found {kind[:80]!r}")
    if storage not in STORAGES:
        raise FormatError(f"invalid storage: expected one of {', '.join(STORAGES)}, found {storage[:80]!r}")
    path = check_path(raw["path"], limits)
    if storage == "raw" and stored_size != size:
        raise FormatError(f"raw file {path!r}: stored_size {stored_size} differs from size {size}")
    if stored_size > limits.max_file_size:
        raise FormatError(f"file {path!r} too large: limit {limits.max_file_size} stored bytes, found {stored_size}")
    stored_sha256 = None
    if "stored_sha256" in raw or (fmt >= 2 and storage == "zstd"):
        if storage != "zstd" or fmt < 2:
            raise FormatError(f"file {path!r}: stored_sha256 belongs to compressed files of format 2, "
                              f"found it on a {storage} file of format {fmt}")
        stored_sha256 = _check_sha256(Fields(raw, "file").text("stored_sha256"), f"stored_sha256 of {path!r}")
    source = raw["source"]
    if source and (len(source) > limits.max_source_fields or not all(
            type(k) is str and type(v) is str and len(k) + len(v) <= limits.max_source_chars
            for k, v in source.items())):
        raise FormatError(f"invalid source of {path!r}: expected at most {limits.max_source_fields} string fields "
                          f"of at most {limits.max_source_chars} characters")
    return FileEntry(
        path=path, size=size, sha256=_check_sha256(raw["sha256"], "sha256"),
        kind=kind, storage=storage, stored_size=stored_size, source=source, stored_sha256=stored_sha256,
    )


def _parse_models(items: list[Any], by_path: Mapping[str, FileEntry], limits: Limits) -> tuple[ModelEntry, ...]:
    models = []
    for item in items:
        doc = Fields(item, "model")
        model_id = check_name(doc.text("id"), "model id")
        model_files = tuple(doc.items("files", limits.max_model_files))
        missing = [p for p in model_files if not isinstance(p, str) or p not in by_path]
        if missing or not model_files:
            raise FormatError(f"model {model_id!r} names files the manifest does not list: {missing[:3]}")
        embedding = doc.raw.get("embedding", False)
        if not isinstance(embedding, bool):
            raise FormatError(f"invalid model {model_id!r}: 'embedding' must be true or false, found {embedding!r}")
        models.append(ModelEntry(id=model_id, files=model_files, gguf=check_gguf(model_id, doc.obj("gguf"), limits),
                                 embedding=embedding))
    return tuple(models)


def _parse_packages(items: list[Any], by_path: Mapping[str, FileEntry]) -> tuple[PythonPackage, ...]:
    packages = []
    for item in items:
        doc = Fields(item, "package")
        path = doc.text("path")
        if path not in by_path:
            raise FormatError(f"python package {doc.text('name')[:100]!r} names a file the manifest does not "
                              f"list: {path[:300]}")
        packages.append(PythonPackage(name=doc.text("name"), version=doc.text("version"), path=path))
    return tuple(packages)


# What llama.cpp models have, with room to spare; the planner multiplies these, so each is bounded.
GGUF_COUNT_LIMITS: Mapping[str, int] = {
    "block_count": 4096, "embedding_length": 1 << 20, "head_count": 4096, "head_count_kv": 4096,
    "key_length": 1 << 16, "value_length": 1 << 16, "context_length": 1 << 27, "vocab_size": 1 << 24,
    "parameter_count": 1 << 50, "tensor_bytes": 1 << 42, "gguf_version": 1 << 16,
}
_GGUF_TEXT_LIMIT = 256


def check_gguf(model_id: str, gguf: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """GGUF metadata as the planner reads it: every count within GGUF_COUNT_LIMITS, other values scalars."""
    if len(gguf) > limits.max_gguf_fields:
        raise FormatError(f"model {model_id!r}: GGUF metadata has {len(gguf)} fields, limit {limits.max_gguf_fields}")
    for key, value in gguf.items():
        bound = GGUF_COUNT_LIMITS.get(key)
        values = value if key == "head_count_kv" and isinstance(value, list) else [value]
        if bound is not None:
            if len(values) > GGUF_COUNT_LIMITS["block_count"] or not all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= bound)
                    for v in values):
                raise FormatError(f"model {model_id!r}: GGUF field {key!r} must be a count from 0 to {bound}, "
                                  f"found {repr(value)[:80]}")
        elif not (value is None or isinstance(value, bool | str | int)) or (
                isinstance(value, str) and len(value) > _GGUF_TEXT_LIMIT) or (
                isinstance(value, int) and not -(1 << 63) <= value < (1 << 64)):
            raise FormatError(f"model {model_id!r}: GGUF field {key[:80]!r} must be a short text, a number or a "
                              f"flag, found {repr(value)[:80]}")
    return dict(gguf)


def _parse_base(raw: object) -> BaseRef | None:
    if raw is None:
        return None
    doc = Fields(raw, "base")
    return BaseRef(
        name=check_name(doc.text("name"), "base name"), version=check_version(doc.text("version"), "base version"),
        manifest_sha256=_check_sha256(doc.text("manifest_sha256"), "base manifest_sha256"),
    )
