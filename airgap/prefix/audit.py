"""The host's audit trail: `PREFIX/audit.jsonl`, one hash-chained JSON record per command that used the prefix.

Each line is one record in canonical JSON (sorted keys, no spaces, ASCII). `sha256` is the SHA-256 of the
record's canonical form without that field, and `prev` is the `sha256` of the record before it (None for
the first), so an edited, removed or reordered record breaks the chain where it happened.

Appending is crash-safe: under an exclusive flock, the line goes out in one O_APPEND write and is fsynced
before the command reports success. A kill or power loss can leave only a last line without its newline;
that torn line was never a record: readers ignore it, and the next append cuts it off (and says so in the
record it writes). Any other damage is reported by `verify_chain`, naming the first bad record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pwd
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from airgap.errors import AirgapError
from airgap.format.manifest import format_time
from airgap.prefix.paths import Prefix
from airgap.streams.atomic import fsync_dir

AUDIT_FORMAT = 1
OUTCOMES = ("ok", "refused", "failed", "interrupted")
_FIELDS = ("format", "seq", "prev", "time", "time_floor", "operator", "command", "bundle", "signers", "overrides",
           "outcome", "reason", "details", "tool_version", "sha256")
_TAIL_CHUNK = 64 << 10


class AuditError(AirgapError):
    """The audit trail cannot be appended to, or its chain is broken."""


@dataclass(frozen=True)
class Operator:
    uid: int
    user: str | None
    sudo_user: str | None = None  # who ran sudo, as sudo says (informational: the environment can lie)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"uid": self.uid, "user": self.user}
        if self.sudo_user:
            data["sudo_user"] = self.sudo_user
        return data


def current_operator(environ: Mapping[str, str]) -> Operator:
    uid = os.getuid()
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    return Operator(uid, user, environ.get("SUDO_USER") or None)


@dataclass(frozen=True)
class BundleRef:
    name: str | None
    version: str | None
    manifest_sha256: str | None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "manifest_sha256": self.manifest_sha256,
                "path": self.path}


@dataclass(frozen=True)
class Event:
    """What one command did, as the command layer saw it."""

    command: str
    outcome: str
    reason: str
    bundle: BundleRef | None = None
    signers: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stamp:
    """When and by whom: passed in by the caller, so that tests and the CLI choose the clock."""

    time: datetime
    time_floor: datetime | None
    operator: Operator
    tool_version: str


def audit_path(prefix: Path) -> Path:
    return Prefix(prefix).audit_file


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "sha256"})).hexdigest()


def make_record(event: Event, stamp: Stamp, seq: int, prev: str | None, note: str | None = None) -> dict[str, Any]:
    if event.outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {OUTCOMES}, found {event.outcome!r}")
    details = dict(event.details)
    if note:
        details["audit_note"] = note
    record: dict[str, Any] = {
        "format": AUDIT_FORMAT, "seq": seq, "prev": prev,
        "time": format_time(stamp.time),
        "time_floor": format_time(stamp.time_floor) if stamp.time_floor else None,
        "operator": stamp.operator.to_dict(), "command": event.command,
        "bundle": event.bundle.to_dict() if event.bundle else None,
        "signers": list(event.signers), "overrides": list(event.overrides),
        "outcome": event.outcome, "reason": " ".join(event.reason.split()),
        "details": details, "tool_version": stamp.tool_version,
    }
    record["sha256"] = record_hash(record)
    return record


# ---------------------------------------------------------------- appending

@contextlib.contextmanager
def _locked(prefix: Path, create: bool) -> Iterator[int]:
    path = audit_path(prefix)
    if create:
        try:
            prefix.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create {prefix} for the audit trail: {exc.strerror or exc}") from exc
    existed = path.exists()
    try:  # never through a link planted in the prefix: root would append to whatever it points at
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        raise AuditError(f"cannot open the audit trail {path} for appending: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits: concurrent commands append one after the other, in order
        if not existed:
            fsync_dir(prefix)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _tail(fd: int) -> tuple[bytes | None, int, int]:
    """(last complete line, where the complete lines end, size): a torn last line lies past that end."""
    size = os.fstat(fd).st_size
    data = b""
    position = size
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        data = os.pread(fd, position - start, start) + data
        position = start
        last = data.rfind(b"\n")
        if last >= 0:
            prior = data.rfind(b"\n", 0, last)
            if prior >= 0 or position == 0:
                return data[prior + 1:last], position + last + 1, size
    return None, 0, size


def check_appendable(prefix: Path) -> None:
    """Refuse up front when the trail exists but cannot take a record, so that nothing unrecorded happens."""
    path = audit_path(prefix)
    if not path.exists():
        return
    with _locked(prefix, create=False) as fd:
        _last_record(fd, path)


def _last_record(fd: int, path: Path) -> tuple[dict[str, Any] | None, int, int]:
    line, end, size = _tail(fd)
    if line is None:
        return None, end, size
    try:
        record = json.loads(line)
        valid = isinstance(record, dict) and isinstance(record.get("seq"), int) and record_hash(record) == record.get(
            "sha256")
    except ValueError:
        valid = False
    if not valid:
        raise AuditError(f"the last record of {path} is damaged or was edited, so no record can be chained to it; "
                         f"run `airgap audit verify` and keep the file as evidence")
    return record, end, size


def append(prefix: Path, event: Event, stamp: Stamp, create: bool = True) -> dict[str, Any]:
    """Append one record for `event` and fsync it; returns the record written."""
    path = audit_path(prefix)
    with _locked(prefix, create) as fd:
        last, end, size = _last_record(fd, path)
        note = None
        if end < size:
            os.ftruncate(fd, end)
            note = f"dropped a torn last line of {size - end} bytes left by an interrupted append"
        record = make_record(event, stamp, (last["seq"] + 1) if last else 1, last["sha256"] if last else None, note)
        line = canonical(record) + b"\n"
        try:
            written = os.write(fd, line)
            while written < len(line):  # a short write is still at the end: O_APPEND, under the lock
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise AuditError(f"disk full: cannot append to the audit trail {path}") from exc
            raise AuditError(f"cannot append to the audit trail {path}: {exc.strerror}") from exc
    return record


# ---------------------------------------------------------------- reading and checking

@dataclass(frozen=True)
class Trail:
    lines: tuple[bytes, ...]  # complete lines, without their newline
    torn_bytes: int  # length of a last line without a newline (an interrupted append), 0 when none


@dataclass(frozen=True)
class ChainReport:
    records: int
    torn_bytes: int
    head: str | None  # sha256 of the last record: compare it with the copy a SIEM holds


def read_trail(prefix: Path) -> Trail:
    path = audit_path(prefix)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Trail((), 0)
    except OSError as exc:
        raise AuditError(f"cannot read the audit trail {path}: {exc.strerror}") from exc
    complete, _, torn = data.rpartition(b"\n")
    lines = tuple(complete.split(b"\n")) if complete or data.startswith(b"\n") else ()
    return Trail(lines, len(torn))


def read_records(prefix: Path) -> list[dict[str, Any]]:
    """Every record, in file order; AuditError naming the first line that is not a record."""
    records = []
    for number, line in enumerate(read_trail(prefix).lines, start=1):
        records.append(_parse(line, number))
    return records


def _parse(line: bytes, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise AuditError(f"line {number} of the audit trail is not a record (damaged or edited)") from exc
    if not isinstance(record, dict) or set(record) != set(_FIELDS) or not isinstance(record.get("seq"), int):
        raise AuditError(f"line {number} of the audit trail is not a record of format {AUDIT_FORMAT} (edited)")
    return record


def verify_chain(prefix: Path) -> ChainReport:
    """Check every record's hash, sequence and link; AuditError naming the first broken, edited, reordered
    or missing record."""
    trail = read_trail(prefix)
    records = [_parse(line, n) for n, line in enumerate(trail.lines, start=1)]
    seqs = [r["seq"] for r in records]
    previous: dict[str, Any] | None = None
    for position, (line, record) in enumerate(zip(trail.lines, records, strict=True), start=1):
        if record_hash(record) != record["sha256"] or canonical(record) != line:
            raise AuditError(f"record {record['seq']} (line {position}) was edited: its content does not match "
                             f"its hash")
        if record["seq"] != position:
            if position in seqs[position:]:
                raise AuditError(f"record {position} is out of order: line {position} holds record {record['seq']}")
            if record["seq"] > position:
                raise AuditError(f"record {position} is missing: line {position} holds record {record['seq']}")
            raise AuditError(f"record {record['seq']} appears twice (line {position})")
        expected = previous["sha256"] if previous else None
        if record["prev"] != expected:
            raise AuditError(f"record {position} does not chain to record {position - 1}: record {position - 1} was "
                             f"rewritten or replaced" if position > 1 else
                             "record 1 does not start the chain: records before it were removed")
        previous = record
    return ChainReport(len(records), trail.torn_bytes, previous["sha256"] if previous else None)


def describe(record: Mapping[str, Any]) -> str:
    """One line per record for `airgap audit`."""
    bundle = record.get("bundle") or {}
    what = " ".join(str(bundle[k]) for k in ("name", "version") if bundle.get(k))
    operator = record.get("operator") or {}
    who = operator.get("user") or f"uid {operator.get('uid')}"
    extras: list[str] = []
    if record.get("overrides"):
        extras.append("--" + ", --".join(record["overrides"]))
    text = f"{record['seq']:>5} {record['time']} {who:<10} {record['command']:<10} {record['outcome']:<11}"
    return " ".join(part for part in (text, what, record.get("reason", ""), *extras) if part)


def describe_all(records: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(describe(r) for r in records)
