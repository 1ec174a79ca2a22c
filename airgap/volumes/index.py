"""The volume index: which byte ranges of a bundle each volume holds, their hashes, the recovery volumes.

The index (`x.airgap.volumes.json`) is not signed: it only lets damage be named (which volume, which
bytes) and repaired before any byte reaches the installer. Authority stays with the signed manifest,
whose SHA-256 the index records so that an index or a volume from another build is refused. It is read
as hostile input: every number and name is checked against explicit limits before it is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from airgap.errors import FormatError, VolumeError
from airgap.format import strictjson
from airgap.format.fields import Fields
from airgap.streams.pipeline import digest_bytes

INDEX_TYPE = "airgap/volumes"
INDEX_FORMAT = 1
INDEX_SUFFIX = ".volumes.json"
SEGMENT_SIZE = 16 << 20  # hashed unit: damage is found, and repaired, before a segment's bytes are handed out
MIN_SEGMENT_SIZE = 4 << 10
MAX_SEGMENT_SIZE = 1 << 30

_BUNDLE_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
VOLUME_NAME_RE = re.compile(r"(?P<bundle>.+)\.(?:(?P<data>[0-9]{3,})|r(?P<recovery>[0-9]{2}))")


@dataclass(frozen=True)
class IndexLimits:
    max_index_bytes: int = 64 << 20
    max_volumes: int = 9999
    max_recovery_volumes: int = 99
    max_segments: int = 4_000_000
    max_bundle_size: int = 4 << 40


DEFAULT_INDEX_LIMITS = IndexLimits()


@dataclass(frozen=True)
class VolumeFile:
    """One file of a volume set: its name, size, SHA-256 and the SHA-256 of each segment."""

    name: str
    size: int
    sha256: str
    segments: tuple[str, ...]


@dataclass(frozen=True)
class VolumeIndex:
    bundle_file: str
    bundle_size: int
    bundle_sha256: str
    manifest_sha256: str
    bundle_name: str
    bundle_version: str
    volume_size: int
    segment_size: int
    volumes: tuple[VolumeFile, ...]
    recovery: tuple[VolumeFile, ...] = ()
    stripe_size: int = 0  # zfec stripe; 0 without recovery volumes

    @property
    def index_name(self) -> str:
        return index_name(self.bundle_file)

    @property
    def files(self) -> tuple[VolumeFile, ...]:
        """Data volumes, then recovery volumes: position i is share number i of every codeword."""
        return self.volumes + self.recovery

    def describe(self, share: int) -> str:
        """How messages name a file of the set: `volume 3 of 7 (x.airgap.003)`."""
        if share < len(self.volumes):
            return f"volume {share + 1} of {len(self.volumes)} ({self.volumes[share].name})"
        r = share - len(self.volumes)
        return f"recovery volume {r + 1} of {len(self.recovery)} ({self.recovery[r].name})"

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_type": INDEX_TYPE,
            "format": INDEX_FORMAT,
            "bundle": {
                "file": self.bundle_file, "size": self.bundle_size, "sha256": self.bundle_sha256,
                "manifest_sha256": self.manifest_sha256, "name": self.bundle_name, "version": self.bundle_version,
            },
            "volume_size": self.volume_size,
            "segment_size": self.segment_size,
            "volumes": [_file_dict(v) for v in self.volumes],
            "recovery": None if not self.recovery else {
                "scheme": "zfec", "stripe_size": self.stripe_size, "volumes": [_file_dict(v) for v in self.recovery],
            },
        }
        return doc

    def to_bytes(self) -> bytes:
        doc = self.to_dict()
        doc["checksum"] = _checksum(doc)
        return (json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _file_dict(v: VolumeFile) -> dict[str, Any]:
    return {"name": v.name, "size": v.size, "sha256": v.sha256, "segments": list(v.segments)}


def _checksum(doc: dict[str, Any]) -> str:
    """Catches an index damaged on the stick, which would otherwise read as damage in good volumes."""
    return digest_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).sha256


# ---------------------------------------------------------------- names and sizes

def index_name(bundle_file: str) -> str:
    return f"{bundle_file}{INDEX_SUFFIX}"


def volume_name(bundle_file: str, number: int, count: int) -> str:
    """Fixed-width numbers, so that `cat x.airgap.[0-9]*` joins them in order."""
    return f"{bundle_file}.{number:0{max(3, len(str(count)))}d}"


def recovery_name(bundle_file: str, number: int) -> str:
    return f"{bundle_file}.r{number:02d}"


def check_bundle_file(name: str) -> str:
    if not _BUNDLE_FILE_RE.fullmatch(name):
        raise FormatError(f"invalid bundle file name: expected letters, digits, '.', '_', '+' or '-', found {name!r}")
    return name


def plan_volume_sizes(bundle_size: int, volume_size: int | None) -> list[int]:
    """Sizes of the data volumes: all `volume_size` but the last; one volume when no size is given."""
    if bundle_size <= 0:
        raise FormatError(f"bundle is empty: expected at least one byte, found {bundle_size}")
    if volume_size is None or volume_size >= bundle_size:
        return [bundle_size]
    if volume_size < 1:
        raise VolumeError(f"volume size: expected at least 1 byte, found {volume_size}")
    full, rest = divmod(bundle_size, volume_size)
    return [volume_size] * full + ([rest] if rest else [])


def segment_count(size: int, segment_size: int) -> int:
    return max(1, -(-size // segment_size))


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """`3.9G` -> bytes. K, M, G, T and KiB.. are powers of 1024; KB, MB, GB, TB powers of 1000 (as GNU split)."""
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise VolumeError(f"invalid size: expected a number with an optional unit (K, M, G, T, KB, MB, GB, KiB...), "
                          f"found {text!r}")
    try:
        size = int(Decimal(match.group(1)) * _UNITS[unit])
    except InvalidOperation as exc:
        raise VolumeError(f"invalid size: {text!r}") from exc
    if size < 1:
        raise VolumeError(f"invalid size: expected at least 1 byte, found {text!r}")
    return size


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# ---------------------------------------------------------------- parsing

def read_index(path: Path, limits: IndexLimits = DEFAULT_INDEX_LIMITS) -> VolumeIndex:
    try:
        with path.open("rb") as stream:
            data = stream.read(limits.max_index_bytes + 1)
    except FileNotFoundError as exc:
        raise VolumeError(f"volume index {path} not found: it lists the volumes and their hashes; "
                          "copy it from the same build (or re-run airgap copy)") from exc
    except OSError as exc:
        raise VolumeError(f"cannot read volume index {path}: {exc.strerror}") from exc
    index = parse_index(data, limits)
    if path.name != index.index_name:
        raise FormatError(f"volume index {path.name} describes bundle file {index.bundle_file!r}: "
                          f"expected it to be named {index.index_name}")
    return index


def parse_index(data: bytes, limits: IndexLimits = DEFAULT_INDEX_LIMITS) -> VolumeIndex:
    """Parse and check an index. Raises FormatError naming the first bad field."""
    if len(data) > limits.max_index_bytes:
        raise FormatError(f"volume index too large: limit {limits.max_index_bytes} bytes, found {len(data)}")
    raw = strictjson.loads(data, "volume index")
    doc = Fields(raw, "volume index")
    if raw.get("_type") != INDEX_TYPE:
        raise FormatError(f"not an airgap volume index: expected _type {INDEX_TYPE!r}, found {raw.get('_type')!r}")
    if doc.num("format") != INDEX_FORMAT:
        raise FormatError(f"unsupported volume index format: this airgap reads format {INDEX_FORMAT}, "
                          f"found {raw.get('format')!r}")
    checksum = doc.text("checksum")
    if checksum != _checksum({k: v for k, v in raw.items() if k != "checksum"}):
        raise FormatError("volume index is damaged: its checksum does not match its content")
    bundle = Fields(doc.obj("bundle"), "volume index bundle")
    bundle_file = check_bundle_file(bundle.text("file"))
    bundle_size = bundle.num("size")
    if not 0 < bundle_size <= limits.max_bundle_size:
        raise FormatError(f"volume index: bundle size must be 1..{limits.max_bundle_size} bytes, found {bundle_size}")
    segment_size = doc.num("segment_size")
    if not (MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE and segment_size & (segment_size - 1) == 0):
        raise FormatError(f"volume index: segment_size must be a power of two in {MIN_SEGMENT_SIZE}.."
                          f"{MAX_SEGMENT_SIZE}, found {segment_size}")
    volume_size = doc.num("volume_size")
    sizes = _check_plan(bundle_size, volume_size, limits)
    budget = _SegmentBudget(limits.max_segments)
    volumes = tuple(
        _parse_file(item, volume_name(bundle_file, i + 1, len(sizes)), sizes[i], segment_size, budget)
        for i, item in enumerate(doc.items("volumes", limits.max_volumes)))
    if len(volumes) != len(sizes):
        raise FormatError(f"volume index: a {bundle_size}-byte bundle in {volume_size}-byte volumes makes "
                          f"{len(sizes)} volumes, the index lists {len(volumes)}")
    recovery, stripe = _parse_recovery(raw.get("recovery"), bundle_file, sizes, segment_size, budget, limits)
    return VolumeIndex(
        bundle_file=bundle_file, bundle_size=bundle_size,
        bundle_sha256=_check_sha256(bundle.text("sha256"), "bundle sha256"),
        manifest_sha256=_check_sha256(bundle.text("manifest_sha256"), "manifest_sha256"),
        bundle_name=bundle.text("name")[:100], bundle_version=bundle.text("version")[:100],
        volume_size=volume_size, segment_size=segment_size, volumes=volumes, recovery=recovery, stripe_size=stripe,
    )


def _check_plan(bundle_size: int, volume_size: int, limits: IndexLimits) -> list[int]:
    if volume_size < 1 or -(-bundle_size // volume_size) > limits.max_volumes:
        raise FormatError(f"volume index: volume_size {volume_size} does not cut a {bundle_size}-byte bundle into "
                          f"1..{limits.max_volumes} volumes")
    return plan_volume_sizes(bundle_size, volume_size)


def _parse_recovery(
    raw: object, bundle_file: str, sizes: list[int], segment_size: int, budget: _SegmentBudget, limits: IndexLimits,
) -> tuple[tuple[VolumeFile, ...], int]:
    if raw is None:
        return (), 0
    doc = Fields(raw, "volume index recovery")
    if doc.text("scheme") != "zfec":
        raise FormatError(f"volume index: unknown recovery scheme, expected 'zfec', found {doc.text('scheme')!r}")
    stripe = doc.num("stripe_size")
    if not (0 < stripe <= segment_size and stripe & (stripe - 1) == 0):
        raise FormatError(f"volume index: stripe_size must be a power of two up to segment_size, found {stripe}")
    items = doc.items("volumes", limits.max_recovery_volumes)
    if not items or len(items) + len(sizes) > 256:
        raise FormatError(f"volume index: 1..{256 - len(sizes)} recovery volumes possible, found {len(items)}")
    recovery = tuple(_parse_file(item, recovery_name(bundle_file, i + 1), sizes[0], segment_size, budget)
                     for i, item in enumerate(items))
    return recovery, stripe


class _SegmentBudget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise FormatError("volume index lists too many segments")


def _parse_file(raw: object, name: str, size: int, segment_size: int, budget: _SegmentBudget) -> VolumeFile:
    doc = Fields(raw, f"volume {name}")
    if doc.text("name") != name:
        raise FormatError(f"volume index: expected volume name {name!r}, found {doc.text('name')[:100]!r}")
    if doc.num("size") != size:
        raise FormatError(f"volume index: {name} must be {size} bytes, the index says {doc.num('size')}")
    count = segment_count(size, segment_size)
    budget.take(count)
    segments = doc.items("segments", count)
    if len(segments) != count:
        raise FormatError(f"volume index: {name} has {count} segments, the index lists {len(segments)}")
    return VolumeFile(
        name=name, size=size, sha256=_check_sha256(doc.text("sha256"), f"{name} sha256"),
        segments=tuple(_check_sha256(s, f"{name} segment sha256") for s in segments),
    )


def _check_sha256(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise FormatError(f"volume index: invalid {what}: expected 64 lowercase hex digits, found {str(value)[:80]!r}")
    return value
