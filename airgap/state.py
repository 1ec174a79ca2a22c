"""The installed state under a prefix, persisted crash-safely (write temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from airgap.errors import InstallError
from airgap.manifest import format_time, parse_time
from airgap.policy import Acceptance

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
class State:
    active: str | None = None
    generations: tuple[Generation, ...] = ()
    history: tuple[str, ...] = ()  # generations in the order they were activated
    pending: str | None = None  # a generation being installed; cleaned up if we crashed
    accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # per bundle name

    def generation(self, gen_id: str) -> Generation | None:
        return next((g for g in self.generations if g.id == gen_id), None)

    def acceptance(self, name: str) -> Acceptance:
        record = self.accepted.get(name, {})
        newest = record.get("newest_created")
        return Acceptance(
            highest_version=record.get("highest_version"),
            highest_manifest_sha256=record.get("highest_manifest_sha256"),
            newest_created=parse_time(newest, "newest_created") if newest else None,
        )

    def with_accepted(self, name: str, acceptance: Acceptance) -> State:
        record = {
            "highest_version": acceptance.highest_version or "",
            "highest_manifest_sha256": acceptance.highest_manifest_sha256 or "",
            "newest_created": format_time(acceptance.newest_created) if acceptance.newest_created else "",
        }
        return replace(self, accepted={**self.accepted, name: {k: v for k, v in record.items() if v}})


def state_path(prefix: Path) -> Path:
    return prefix / "state.json"


def load_state(prefix: Path) -> State:
    path = state_path(prefix)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        raise InstallError(f"{path}: installed state is unreadable: {exc}") from None
    if raw.get("format") != STATE_FORMAT:
        raise InstallError(f"{path}: expected state format {STATE_FORMAT}, found {raw.get('format')!r}")
    return State(
        active=raw.get("active"),
        generations=tuple(_generation(g) for g in raw.get("generations", [])),
        history=tuple(raw.get("history", [])),
        pending=raw.get("pending"),
        accepted=dict(raw.get("accepted", {})),
    )


def _generation(raw: dict[str, Any]) -> Generation:
    models = tuple(InstalledModel(**m) for m in raw.pop("models", []))
    overrides = tuple(raw.pop("overrides", []))
    return Generation(**raw, models=models, overrides=overrides)


def save_state(prefix: Path, state: State) -> None:
    data = {"format": STATE_FORMAT, **asdict(state)}
    write_atomic(state_path(prefix), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallError(f"{prefix} is locked by another airgap process; try again when it finishes") from None
        yield


def now_text(clock: datetime) -> str:
    return format_time(clock)
