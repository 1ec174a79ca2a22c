"""`airgap verify` and `airgap install`: check everything in one pass, then switch versions atomically.

Nothing outside `PREFIX/staging` is written before the whole bundle has verified. Model files and
wheels go into a content-addressed store (`PREFIX/store/sha256/<hex>`), so a later version that keeps
the same weights neither copies nor rewrites them. The active version is the symlink `PREFIX/current`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from airgap.bundle import Head, Sink, read_head, read_payload
from airgap.errors import AirgapError, InstallError, PolicyError
from airgap.hashing import Readable
from airgap.manifest import FileEntry, Manifest, format_time
from airgap.policy import NO_OVERRIDES, Acceptance, Overrides, check_acceptance, parse_version
from airgap.progress import byte_progress
from airgap.state import (
    Generation,
    InstalledModel,
    State,
    fsync_dir,
    load_state,
    prefix_lock,
    save_state,
    swap_symlink,
)
from airgap.trust import TrustPolicy

VENV_EXPANSION = 4  # installed wheels take roughly this many times their compressed size


@dataclass(frozen=True)
class VerifyReport:
    name: str
    version: str
    manifest_sha256: str
    files: int
    bytes: int
    signers: tuple[str, ...]
    expires: str


@dataclass(frozen=True)
class InstallReport:
    generation: Generation
    previous: str | None
    written_bytes: int
    reused_bytes: int
    already_installed: bool = False


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[Readable]:
    """A readable stream over a bundle: one file, or its USB volumes read in order (repaired from
    recovery volumes where needed) without joining them first."""
    from airgap.volumes import open_bundle as open_volumes

    with open_volumes(path) as stream:
        yield stream


def _authenticate(head: Head, trust: TrustPolicy) -> tuple[str, ...]:
    from airgap.trust import key_id, public_key_from_raw

    good = trust.check(head.manifest_bytes, head.signatures)
    return tuple(sorted(key_id(public_key_from_raw(raw)) for raw in good))


def verify_bundle(
    path: Path, trust: TrustPolicy, clock: datetime | None = None, overrides: Overrides = NO_OVERRIDES,
    progress: bool = True,
) -> VerifyReport:
    """Check signature, expiry and every file's size and SHA-256, reading the bundle once."""
    with open_bundle(path) as stream:
        head, tar = read_head(stream)
        signers = _authenticate(head, trust)
        check_acceptance(head.manifest, head.manifest_sha256, Acceptance(), clock or datetime.now(UTC), overrides)
        manifest = head.manifest
        stored = sum(e.stored_size for e in manifest.carried_files)
        with byte_progress(stored, f"verifying {path.name}", progress) as advance:
            read_payload(tar, manifest, None, advance)
    return VerifyReport(
        name=manifest.name, version=manifest.version, manifest_sha256=head.manifest_sha256,
        files=len(manifest.carried_files), bytes=manifest.total_size, signers=signers,
        expires=format_time(manifest.expires),
    )


# ---------------------------------------------------------------- install

def store_path(prefix: Path, sha256: str) -> Path:
    return prefix / "store" / "sha256" / sha256


def generation_id(manifest: Manifest, manifest_sha256: str) -> str:
    return f"{manifest.name}-{manifest.version}-{manifest_sha256[:12]}"


class _StagingSink:
    """Writes one file into staging; keeps it only if the reader verified it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO = path.open("wb")

    def write(self, chunk: bytes, /) -> object:
        return self.handle.write(chunk)

    def close(self, ok: bool) -> None:
        if ok:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.handle.close()
        if not ok:
            self.path.unlink(missing_ok=True)


def install_bundle(
    path: Path, prefix: Path, trust: TrustPolicy, overrides: Overrides = NO_OVERRIDES,
    clock: datetime | None = None, progress: bool = True, python: str = sys.executable,
) -> InstallReport:
    prefix = prefix.absolute()
    with prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        with open_bundle(path) as stream:
            head, tar = read_head(stream)
            _authenticate(head, trust)
            manifest, manifest_sha = head.manifest, head.manifest_sha256
            clock = clock or datetime.now(UTC)
            accepted = state.acceptance(manifest.name)
            used = check_acceptance(manifest, manifest_sha, accepted, clock, overrides)
            gen_id = generation_id(manifest, manifest_sha)
            existing = state.generation(gen_id)
            if existing is not None:  # still read it all: a damaged copy is reported, not silently ignored
                read_payload(tar, manifest)
                return _reactivate(prefix, state, existing)
            _check_base(prefix, manifest)
            _check_space(prefix, manifest)
            staging = prefix / "staging" / gen_id
            try:
                written = _stage(tar, manifest, prefix, staging, progress)
                state = replace(state, pending=gen_id)
                save_state(prefix, state)
                generation = _assemble(prefix, staging, manifest, head, gen_id, clock, used, python)
            except OSError as exc:
                _discard(prefix, gen_id)
                raise _os_error(exc, prefix) from None
            except BaseException:
                _discard(prefix, gen_id)
                raise
        previous = state.active
        swap_symlink(prefix / "current", f"versions/{gen_id}")
        new_accepted = _advance(accepted, manifest, manifest_sha, clock)
        state = replace(state, active=gen_id, pending=None, generations=(*state.generations, generation),
                        history=(*state.history, gen_id)).with_accepted(manifest.name, new_accepted)
        save_state(prefix, state)
        shutil.rmtree(prefix / "staging", ignore_errors=True)
    return InstallReport(generation, previous, written, manifest.total_size - written)


def _advance(accepted: Acceptance, manifest: Manifest, manifest_sha: str, clock: datetime) -> Acceptance:
    newest = max(filter(None, [accepted.newest_created, manifest.created]))
    if accepted.highest_version is not None and parse_version(manifest.version) < parse_version(
            accepted.highest_version):
        return replace(accepted, newest_created=newest)
    return Acceptance(manifest.version, manifest_sha, newest)


def _os_error(exc: OSError, prefix: Path) -> AirgapError:
    if exc.errno == errno.ENOSPC:
        return InstallError(f"disk full under {prefix} while installing; nothing was changed, free space and retry")
    return InstallError(f"install failed, nothing was changed: {exc.strerror or exc} ({exc.filename or prefix})")


def _reactivate(prefix: Path, state: State, generation: Generation) -> InstallReport:
    if state.active != generation.id:
        swap_symlink(prefix / "current", f"versions/{generation.id}")
        save_state(prefix, replace(state, active=generation.id, history=(*state.history, generation.id)))
    return InstallReport(generation, state.active, 0, 0, already_installed=True)


def _check_base(prefix: Path, manifest: Manifest) -> None:
    missing = [e for e in manifest.files if not e.carried and not store_path(prefix, e.sha256).is_file()]
    if not missing:
        return
    base = manifest.base
    needs = f"{base.name} {base.version}" if base else "a base version"
    raise PolicyError(f"this update drop needs {needs} installed first: {len(missing)} file(s) it does not "
                      f"carry are not on this host, first {missing[0].path}")


def _check_space(prefix: Path, manifest: Manifest) -> None:
    needed = sum(e.size * (VENV_EXPANSION if e.kind == "wheel" else 1) for e in manifest.carried_files
                 if not store_path(prefix, e.sha256).is_file())
    free = shutil.disk_usage(prefix).free
    if needed > free:
        raise InstallError(f"not enough free space under {prefix}: need about {needed >> 20} MiB, "
                           f"found {free >> 20} MiB; nothing was changed")


def _stage(tar: object, manifest: Manifest, prefix: Path, staging: Path, progress: bool) -> int:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = 0

    def open_sink(entry: FileEntry) -> Sink | None:
        nonlocal written
        if store_path(prefix, entry.sha256).is_file():
            return None
        written += entry.size
        return _StagingSink(staging / entry.sha256)

    stored = sum(e.stored_size for e in manifest.carried_files)
    with byte_progress(stored, "verifying and unpacking", progress) as advance:
        read_payload(tar, manifest, open_sink, advance)  # type: ignore[arg-type]
    return written


def _assemble(
    prefix: Path, staging: Path, manifest: Manifest, head: Head, gen_id: str, clock: datetime,
    overrides: list[str], python: str,
) -> Generation:
    """Verified: move staged files into the store and build the new version beside the active one."""
    store = prefix / "store" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    for staged in staging.iterdir():
        staged.chmod(0o444)
        os.replace(staged, store / staged.name)
    fsync_dir(store)
    gen_dir = prefix / "versions" / gen_id
    shutil.rmtree(gen_dir, ignore_errors=True)
    gen_dir.mkdir(parents=True)
    for entry in manifest.files:
        if entry.kind != "wheel":
            _link(gen_dir / entry.path, store / entry.sha256)
    (gen_dir / "manifest.json").write_bytes(head.manifest_bytes)
    _install_wheels(gen_dir, staging, manifest, store, python)
    fsync_dir(gen_dir)
    models = tuple(InstalledModel(m.id, f, manifest.file(f).size, manifest.file(f).sha256)
                   for m in manifest.models for f in m.files)
    return Generation(
        id=gen_id, name=manifest.name, version=manifest.version, manifest_sha256=head.manifest_sha256,
        created=format_time(manifest.created), installed_at=format_time(clock), models=models,
        overrides=tuple(overrides),
    )


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _install_wheels(gen_dir: Path, staging: Path, manifest: Manifest, store: Path, python: str) -> None:
    if not manifest.packages:
        return
    wheels = staging / "wheels"
    wheels.mkdir()
    lines = []
    for package in manifest.packages:
        entry = manifest.file(package.path)
        (wheels / Path(package.path).name).symlink_to(store / entry.sha256)
        lines.append(f"{package.name}=={package.version} --hash=sha256:{entry.sha256}\n")
    requirements = staging / "requirements.txt"
    requirements.write_text("".join(lines))
    venv = gen_dir / "venv"
    _run([python, "-m", "venv", str(venv)], "creating the virtualenv")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--require-hashes", "--no-input",
          "--disable-pip-version-check", "--no-cache-dir", "--find-links", str(wheels), "-r", str(requirements)],
         "installing wheels with pip --no-index")


def pip_environment() -> dict[str, str]:
    """pip sees only what we pass: no host pip.conf, no PIP_* variables adding sources behind our back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=pip_environment(), check=False)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        detail = next((line for line in lines if "ERROR" in line), lines[-1] if lines else "no output")
        raise InstallError(f"{what} failed (exit {result.returncode}): {detail.strip()}")


def _discard(prefix: Path, gen_id: str) -> None:
    shutil.rmtree(prefix / "staging", ignore_errors=True)
    shutil.rmtree(prefix / "versions" / gen_id, ignore_errors=True)
    state = load_state(prefix)
    if state.pending == gen_id:
        save_state(prefix, replace(state, pending=None))


def recover(prefix: Path, state: State) -> State:
    """Finish or clean up after a crash: drop a half-built version and the staging area."""
    shutil.rmtree(prefix / "staging", ignore_errors=True)
    if state.pending is not None:
        if state.generation(state.pending) is None:
            shutil.rmtree(prefix / "versions" / state.pending, ignore_errors=True)
        state = replace(state, pending=None)
        save_state(prefix, state)
    known = {g.id for g in state.generations}
    versions = prefix / "versions"
    if versions.is_dir():
        for leftover in versions.iterdir():
            if leftover.name not in known:
                shutil.rmtree(leftover, ignore_errors=True)
    return state


# ---------------------------------------------------------------- rollback and status

def rollback(prefix: Path, to_version: str | None = None) -> tuple[Generation, Generation]:
    """Activate the previously active generation (or the named version); returns (from, to)."""
    prefix = prefix.absolute()
    with prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        current = state.generation(state.active or "")
        if current is None:
            raise InstallError(f"nothing is installed under {prefix}")
        target = _rollback_target(state, current, to_version)
        swap_symlink(prefix / "current", f"versions/{target.id}")
        save_state(prefix, replace(state, active=target.id, history=(*state.history, target.id)))
    return current, target


def _rollback_target(state: State, current: Generation, to_version: str | None) -> Generation:
    if to_version is not None:
        match = [g for g in state.generations if g.version == to_version and g.name == current.name]
        if not match:
            have = ", ".join(g.version for g in state.generations)
            raise InstallError(f"version {to_version} is not installed; installed: {have}")
        return match[-1]
    for gen_id in reversed(state.history):
        candidate = state.generation(gen_id)
        if gen_id != current.id and candidate is not None:
            return candidate
    raise InstallError(f"no earlier version to roll back to: only {current.name} {current.version} is installed")


def installed_state(prefix: Path) -> State:
    return load_state(prefix.absolute())

