"""The installed state under a prefix, persisted crash-safely (write temp, fsync, rename, fsync dir).

`state.json` is the single source of truth: which generation is active, which versions were accepted
(anti-rollback), which root version is trusted, and the install in progress with the step it reached,
so that the next run finishes it (once the new version is complete) or cleans it up (before that).
Trusted roots lie in `PREFIX/trust/root.N.json`; only the version `state.json` names is trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from airgap.errors import InstallError
from airgap.format.fields import Fields, MakeError
from airgap.format.manifest import BaseRef, format_time, parse_time
from airgap.prefix.paths import Prefix
from airgap.streams.atomic import fsync_dir, write_atomic
from airgap.trust.acceptance import Acceptance

STEP_STAGING = "staging"  # verifying and unpacking, storing, building the version: a crash is cleaned up
STEP_READY = "ready"  # the new version is complete on disk: a crash is finished (switch and commit)

STATE_FORMAT = 1


@dataclass(frozen=True)
class InstalledModel:
    id: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Generation:
    id: str
    name: str
    version: str
    manifest_sha256: str
    created: str
    installed_at: str
    models: tuple[InstalledModel, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pending:
    """An install in progress: what a re-run after a crash needs to finish or clean it up."""

    id: str
    step: str = STEP_STAGING
    generation: Generation | None = None  # set at STEP_READY, with what the commit records
    accepted: dict[str, str] = field(default_factory=dict)
    root_version: int | None = None


@dataclass(frozen=True)
class FloorReset:
    """The operator lowered the trusted-time floor (a bundle had claimed a creation time in the future)."""

    at: str
    previous_floor: str


@dataclass(frozen=True)
class State:
    active: str | None = None
    generations: tuple[Generation, ...] = ()
    history: tuple[str, ...] = ()  # generations in the order they were activated
    pending: Pending | None = None
    accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # per bundle name
    trusted_root: int | None = None  # version of PREFIX/trust/root.N.json in force; None: --trust only
    time_floor_resets: tuple[FloorReset, ...] = ()  # each `trust init --force --reset-time-floor`

    def generation(self, gen_id: str) -> Generation | None:
        return next((g for g in self.generations if g.id == gen_id), None)

    def acceptance(self, name: str) -> Acceptance:
        return _acceptance(self.accepted.get(name, {}))

    def with_accepted(self, name: str, acceptance: Acceptance) -> State:
        return replace(self, accepted={**self.accepted, name: acceptance_record(acceptance)})

    def with_time_floor_reset(self, clock: datetime) -> State:
        """Lower every remembered creation time above `clock` to `clock`, recording the floor it replaces."""
        floor = self.time_floor()
        if floor is None or floor <= clock:
            return self
        accepted = {}
        for name in self.accepted:
            acceptance = self.acceptance(name)
            if acceptance.newest_created is not None and acceptance.newest_created > clock:
                acceptance = replace(acceptance, newest_created=clock)
            accepted[name] = acceptance_record(acceptance)
        reset = FloorReset(at=format_time(clock), previous_floor=format_time(floor))
        return replace(self, accepted=accepted, time_floor_resets=(*self.time_floor_resets, reset))

    def time_floor(self) -> datetime | None:
        """The newest creation time accepted for any bundle: this host's clock never goes below it."""
        times = [a.newest_created for a in map(self.acceptance, self.accepted) if a.newest_created is not None]
        return max(times, default=None)

    def installed_versions(self, name: str) -> dict[str, str]:
        return {g.version: g.manifest_sha256 for g in self.generations if g.name == name}

    def installed_bases(self) -> tuple[BaseRef, ...]:
        return tuple(BaseRef(g.name, g.version, g.manifest_sha256) for g in self.generations)

    def committed(self) -> State:
        """The state once the pending install (at STEP_READY) is active: one write makes it so."""
        pending = self.pending
        if pending is None or pending.generation is None:
            raise InstallError("internal error: no completed install to commit")
        gen = pending.generation
        return replace(
            self, active=gen.id, pending=None, history=(*self.history, gen.id),
            generations=(*(g for g in self.generations if g.id != gen.id), gen),
            accepted={**self.accepted, gen.name: pending.accepted},
            trusted_root=pending.root_version if pending.root_version is not None else self.trusted_root,
        )


def acceptance_record(acceptance: Acceptance) -> dict[str, str]:
    record = {
        "highest_version": acceptance.highest_version or "",
        "highest_manifest_sha256": acceptance.highest_manifest_sha256 or "",
        "newest_created": format_time(acceptance.newest_created) if acceptance.newest_created else "",
    }
    return {k: v for k, v in record.items() if v}


def _acceptance(record: dict[str, str]) -> Acceptance:
    newest = record.get("newest_created")
    return Acceptance(
        highest_version=record.get("highest_version"),
        highest_manifest_sha256=record.get("highest_manifest_sha256"),
        newest_created=parse_time(newest, "newest_created") if newest else None,
    )


def state_path(prefix: Path) -> Path:
    return Prefix(prefix).state_file


def load_state(prefix: Path) -> State:
    path = state_path(prefix)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        raise InstallError(f"{path}: installed state is unreadable: {exc}") from exc

    def malformed(message: str) -> InstallError:
        return InstallError(f"{path}: installed state is malformed: {message}")

    doc = Fields(raw, "state", error=malformed)
    if doc.raw.get("format") != STATE_FORMAT:
        raise InstallError(f"{path}: expected state format {STATE_FORMAT}, found {doc.raw.get('format')!r}")
    doc.only(("format", *(f.name for f in fields(State))))
    accepted = doc.mapping("accepted")
    return State(
        active=doc.optional_text("active"),
        generations=tuple(_generation(g) for g in doc.objects("generations")),
        history=doc.texts("history"),
        pending=_pending(doc.raw.get("pending"), malformed),
        accepted={name: Fields(accepted, "state accepted", error=malformed).text_table(name) for name in accepted},
        trusted_root=doc.optional_num("trusted_root"),
        time_floor_resets=tuple(
            FloorReset(at=r.only(("at", "previous_floor")).text("at"), previous_floor=r.text("previous_floor"))
            for r in doc.objects("time_floor_resets")),
    )


def _generation(doc: Fields) -> Generation:
    doc.only(f.name for f in fields(Generation))
    return Generation(
        id=doc.text("id"), name=doc.text("name"), version=doc.text("version"),
        manifest_sha256=doc.text("manifest_sha256"), created=doc.text("created"),
        installed_at=doc.text("installed_at"),
        models=tuple(InstalledModel(id=m.only(f.name for f in fields(InstalledModel)).text("id"), path=m.text("path"),
                                    size=m.num("size"), sha256=m.text("sha256")) for m in doc.objects("models")),
        overrides=doc.texts("overrides"),
    )


def _pending(raw: object, malformed: MakeError) -> Pending | None:
    if raw is None:
        return None
    if isinstance(raw, str):  # written before install steps were recorded
        return Pending(id=raw)
    doc = Fields(raw, "state pending", error=malformed).only(f.name for f in fields(Pending))
    generation = None if doc.raw.get("generation") is None else _generation(
        Fields(doc.obj("generation"), "state pending generation", error=malformed))
    return Pending(id=doc.text("id"), step=doc.optional_text("step") or STEP_STAGING, generation=generation,
                   accepted=doc.text_table("accepted"), root_version=doc.optional_num("root_version"))


def save_state(prefix: Path, state: State) -> None:
    data = {"format": STATE_FORMAT, **asdict(state)}
    write_atomic(state_path(prefix), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def root_path(prefix: Path, version: int) -> Path:
    return Prefix(prefix).root_file(version)


def write_root(prefix: Path, version: int, data: bytes) -> None:
    """Write a root file; it is trusted only once state.json names its version."""
    root_path(prefix, version).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(root_path(prefix, version), data)


def read_root(prefix: Path, version: int) -> bytes:
    path = root_path(prefix, version)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InstallError(f"trusted root version {version} is unreadable at {path}: {exc.strerror}") from exc


def remove_roots_above(prefix: Path, version: int | None) -> None:
    """Drop root files an interrupted install wrote but never committed."""
    folder = Prefix(prefix).trust
    if not folder.is_dir():
        return
    for path in folder.glob("root.*.json"):
        number = path.name.removeprefix("root.").removesuffix(".json")
        if number.isdigit() and (version is None or int(number) > version):
            path.unlink()


def sync_filesystem(path: Path) -> None:
    """Flush everything written on `path`'s file system (syncfs, as OSTree does before it switches):
    one call instead of an fsync per file of a freshly built virtualenv."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


_LIBC = _load_libc()


def swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one atomic rename: readers see the old or the new, never neither."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


@contextlib.contextmanager
def prefix_lock(prefix: Path) -> Iterator[None]:
    """One writer per prefix at a time; a second install waits for none and is refused at once."""
    prefix.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        fd = os.open(Prefix(prefix).lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InstallError(f"cannot open the lock file {prefix / '.lock'}: {exc.strerror}") from exc
    with os.fdopen(fd, "r+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InstallError(f"{prefix} is locked by another airgap process; try again when it finishes") from exc
        yield
