"""`airgap verify` and `airgap install`: check everything in one pass, then switch versions atomically.

Nothing outside `PREFIX/staging` is written before the whole bundle has verified. Model files and
wheels go into a content-addressed store (`PREFIX/store/sha256/<hex>`), so a later version that keeps
the same weights neither copies nor rewrites them. The active version is the symlink `PREFIX/current`.

An install goes through recorded steps: staged, stored, built (all undone by the next run if it
crashed), then `ready` (state.json records the complete new version), switched (one symlink swap),
committed (state.json names the new version active). From `ready` on, the next run finishes the
install instead of undoing it. `reached(step)` is called after each one; crash tests kill there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from airgap.bundle import FileSink, Head, Sink, read_head, read_payload
from airgap.errors import AirgapError, InstallError, PolicyError, TrustError
from airgap.fsio import fsync_dir
from airgap.gate import Anchor, Authenticated, SinkFactory, TrustGate
from airgap.manifest import FileEntry, Manifest, format_time
from airgap.policy import (
    NO_OVERRIDES,
    Acceptance,
    Overrides,
    advance,
    check_acceptance,
    check_base,
    check_root_fresh,
    trusted_now,
)
from airgap.progress import byte_progress
from airgap.roots import Root, check_self_signed, parse_root
from airgap.state import (
    STEP_READY,
    Generation,
    InstalledModel,
    Pending,
    State,
    acceptance_record,
    load_state,
    prefix_lock,
    read_root,
    remove_roots_above,
    save_state,
    swap_symlink,
    sync_filesystem,
    write_root,
)
from airgap.trust import TrustPolicy
from airgap.volumes import BundleStream
from airgap.volumes import open_bundle as open_volumes

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
    base: str | None = None  # "name version" of the version an update drop applies on top of
    root_version: int | None = None  # the newest root the bundle's chain reached, when trust is a root
    repairs: tuple[str, ...] = ()  # volumes rebuilt from recovery volumes on the way


@dataclass(frozen=True)
class InstallReport:
    generation: Generation
    previous: str | None
    written_bytes: int
    reused_bytes: int
    already_installed: bool = False
    repairs: tuple[str, ...] = ()


def reached(step: str) -> None:
    """A durable install step is done. Crash tests replace this to kill the installer right here."""


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[BundleStream]:
    """A readable stream over a bundle: one file, or its USB volumes read in order (repaired from
    recovery volumes where needed) without joining them first."""
    with open_volumes(path) as stream:
        yield stream


def pinned_root(prefix: Path, state: State | None = None) -> Root:
    """The root this host trusts now (pinned by `airgap trust init`, advanced by rotations)."""
    prefix = prefix.absolute()
    state = state if state is not None else load_state(prefix)
    if state.trusted_root is None:
        raise TrustError(f"no trusted key given and no root pinned under {prefix}: pass --trust PUBLIC_KEY.pub, "
                         f"or pin a root once with `airgap trust init ROOT.json --prefix {prefix}`")
    root = parse_root(read_root(prefix, state.trusted_root))
    if root.version != state.trusted_root:
        raise TrustError(f"{prefix}/trust/root.{state.trusted_root}.json holds root version {root.version}")
    check_self_signed(root)
    return root


def verify_bundle(
    path: Path, trust: Anchor, clock: datetime | None = None, overrides: Overrides = NO_OVERRIDES,
    progress: bool = True,
) -> VerifyReport:
    """Check signatures (through the bundle's root chain when trust is a root), expiry and every
    carried file's size and SHA-256, reading the bundle once."""
    now = clock or datetime.now(UTC)
    with open_bundle(path) as stream:
        head, tar = read_head(stream)
        manifest = head.manifest
        gate = TrustGate(head, trust, now, overrides)
        stored = sum(e.stored_size for e in manifest.carried_files)
        with byte_progress(stored, f"verifying {path.name}", progress) as advance_bar:
            read_payload(tar, manifest, gate.open_sink, advance_bar)
        auth = gate.finish()
        check_acceptance(manifest, head.manifest_sha256, Acceptance(), now, overrides)
        repairs = tuple(str(r) for r in stream.repaired)
    base = manifest.base
    return VerifyReport(
        name=manifest.name, version=manifest.version, manifest_sha256=head.manifest_sha256,
        files=len(manifest.carried_files), bytes=sum(e.size for e in manifest.carried_files), signers=auth.signers,
        expires=format_time(manifest.expires), base=f"{base.name} {base.version}" if base else None,
        root_version=auth.root_version or (trust.version if isinstance(trust, Root) else None), repairs=repairs,
    )


def trust_init(prefix: Path, data: bytes, clock: datetime | None = None, force: bool = False) -> Root:
    """Pin a root on this host, out of band. Refuses to replace a different pinned root unless forced."""
    prefix = prefix.absolute()
    with prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        root = parse_root(data)
        check_self_signed(root)
        check_root_fresh(root.version, root.expires, trusted_now(clock or datetime.now(UTC), state.time_floor()),
                         NO_OVERRIDES)
        if state.trusted_root is not None and not force:
            current = parse_root(read_root(prefix, state.trusted_root))
            if current.envelope.payload == root.envelope.payload:
                return current
            raise TrustError(
                f"root version {state.trusted_root} is already pinned under {prefix}; new roots arrive inside "
                f"bundles (rotation), or re-pin out of band with --force (found version {root.version})")
        write_root(prefix, root.version, root.to_bytes())
        save_state(prefix, replace(state, trusted_root=root.version))
        remove_roots_above(prefix, root.version)
    return root


# ---------------------------------------------------------------- install

def store_path(prefix: Path, sha256: str) -> Path:
    return prefix / "store" / "sha256" / sha256


def generation_id(manifest: Manifest, manifest_sha256: str) -> str:
    return f"{manifest.name}-{manifest.version}-{manifest_sha256[:12]}"


def install_bundle(
    path: Path, prefix: Path, trust: TrustPolicy | None = None, overrides: Overrides = NO_OVERRIDES,
    clock: datetime | None = None, progress: bool = True, python: str = sys.executable,
) -> InstallReport:
    """Install a full bundle or an update drop; `trust` None means the root pinned under `prefix`."""
    prefix = prefix.absolute()
    with prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        anchor: Anchor = trust if trust is not None else pinned_root(prefix, state)
        with open_bundle(path) as stream:
            head, tar = read_head(stream)
            manifest, manifest_sha = head.manifest, head.manifest_sha256
            clock = clock or datetime.now(UTC)
            now = trusted_now(clock, state.time_floor())
            accepted = state.acceptance(manifest.name)
            used = check_acceptance(manifest, manifest_sha, accepted, now, overrides,
                                    state.installed_versions(manifest.name))
            gen_id = generation_id(manifest, manifest_sha)
            existing = state.generation(gen_id)
            if existing is not None:  # still read it all: a damaged or forged copy is reported, not ignored
                gate = TrustGate(head, anchor, now, overrides)
                read_payload(tar, manifest, gate.open_sink)
                gate.finish()
                return replace(_reactivate(prefix, state, existing), repairs=tuple(str(r) for r in stream.repaired))
            check_base(manifest, state.installed_bases())
            _check_store(prefix, manifest)
            _check_space(prefix, manifest)
            staging = prefix / "staging" / gen_id
            try:
                written, auth = _stage(tar, head, lambda inner: TrustGate(head, anchor, now, overrides, inner),
                                       prefix, staging, progress)
                reached("staged")
                _store(prefix, staging)
                reached("stored")
                generation = _assemble(prefix, staging, manifest, head, gen_id, clock, [*used, *auth.overrides],
                                       python)
                reached("built")
                for root in auth.new_roots:
                    write_root(prefix, root.version, root.to_bytes())
                pending = Pending(gen_id, STEP_READY, generation, acceptance_record(advance(accepted, manifest,
                                                                                             manifest_sha)),
                                  auth.root_version)
                state = replace(state, pending=pending)
                save_state(prefix, state)
                reached("ready")
            except OSError as exc:
                _discard(prefix, gen_id)
                raise _os_error(exc, prefix) from None
            except BaseException:
                _discard(prefix, gen_id)
                raise
            repairs = tuple(str(r) for r in stream.repaired)
        previous = state.active
        _finish(prefix, state)
        shutil.rmtree(prefix / "staging", ignore_errors=True)
    return InstallReport(generation, previous, written, manifest.total_size - written, repairs=repairs)


def _finish(prefix: Path, state: State) -> State:
    """Switch to the ready version (one symlink swap), then record it as active."""
    assert state.pending is not None
    swap_symlink(prefix / "current", f"versions/{state.pending.id}")
    reached("switched")
    state = state.committed()
    save_state(prefix, state)
    reached("committed")
    return state


def _os_error(exc: OSError, prefix: Path) -> AirgapError:
    if exc.errno == errno.ENOSPC:
        return InstallError(f"disk full under {prefix} while installing; nothing was changed, free space and retry")
    return InstallError(f"install failed, nothing was changed: {exc.strerror or exc} ({exc.filename or prefix})")


def _reactivate(prefix: Path, state: State, generation: Generation) -> InstallReport:
    if state.active != generation.id:
        save_state(prefix, replace(state, active=generation.id, history=(*state.history, generation.id)))
        swap_symlink(prefix / "current", f"versions/{generation.id}")
    return InstallReport(generation, state.active, 0, 0, already_installed=True)


def _check_store(prefix: Path, manifest: Manifest) -> None:
    """The files a drop leaves out must be in the store (put there by its base), verified on the way in."""
    missing = [e for e in manifest.files if not e.carried and not store_path(prefix, e.sha256).is_file()]
    if missing:
        base = manifest.base
        needs = f"{base.name} {base.version}" if base else "a base version"
        raise PolicyError(f"this update drop needs the files of {needs}: {len(missing)} file(s) it does not "
                          f"carry are not in the store under {prefix}, first {missing[0].path}")


def _check_space(prefix: Path, manifest: Manifest) -> None:
    # engine files are stored, then copied into the version (see _place_engine_file): twice their size
    factor = {"wheel": VENV_EXPANSION, "engine": 2}
    needed = sum(e.size * factor.get(e.kind, 1) for e in manifest.carried_files
                 if not store_path(prefix, e.sha256).is_file())
    free = shutil.disk_usage(prefix).free
    if needed > free:
        raise InstallError(f"not enough free space under {prefix}: need about {needed >> 20} MiB, "
                           f"found {free >> 20} MiB; nothing was changed")


def _stage(tar: object, head: Head, gate_for: Callable[[SinkFactory], TrustGate], prefix: Path, staging: Path,
           progress: bool) -> tuple[int, Authenticated]:
    """Verify the payload into staging; the gate authenticates before the first file is written."""
    manifest = head.manifest
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = 0

    def open_sink(entry: FileEntry) -> Sink | None:
        nonlocal written
        if store_path(prefix, entry.sha256).is_file() or (staging / entry.sha256).is_file():
            return None
        written += entry.size
        return FileSink(staging / entry.sha256)

    gate = gate_for(open_sink)
    stored = sum(e.stored_size for e in manifest.carried_files)
    with byte_progress(stored, "verifying and unpacking", progress) as advance_bar:
        read_payload(tar, manifest, gate.open_sink, advance_bar)  # type: ignore[arg-type]
    return written, gate.finish()


def _store(prefix: Path, staging: Path) -> None:
    """Verified: move staged files into the content-addressed store (a blob already there is the same)."""
    store = prefix / "store" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    for staged in staging.iterdir():
        staged.chmod(0o444)
        os.replace(staged, store / staged.name)
    fsync_dir(store)


def _assemble(
    prefix: Path, staging: Path, manifest: Manifest, head: Head, gen_id: str, clock: datetime,
    overrides: list[str], python: str,
) -> Generation:
    """Build the new version beside the active one, from the store."""
    store = prefix / "store" / "sha256"
    gen_dir = prefix / "versions" / gen_id
    shutil.rmtree(gen_dir, ignore_errors=True)
    gen_dir.mkdir(parents=True)
    for entry in manifest.files:
        if entry.kind == "engine":
            _place_engine_file(gen_dir / entry.path, store / entry.sha256)
        elif entry.kind != "wheel":
            _link(gen_dir / entry.path, store / entry.sha256)
    (gen_dir / "manifest.json").write_bytes(head.manifest_bytes)
    _install_wheels(gen_dir, staging, manifest, store, python)
    sync_filesystem(gen_dir)  # links, manifest and venv are durable before state.json calls them ready
    models = tuple(InstalledModel(m.id, f, manifest.file(f).size, manifest.file(f).sha256)
                   for m in manifest.models for f in m.files)
    return Generation(
        id=gen_id, name=manifest.name, version=manifest.version, manifest_sha256=head.manifest_sha256,
        created=format_time(manifest.created), installed_at=format_time(clock), models=models,
        overrides=tuple(overrides),
    )


def _place_engine_file(path: Path, blob: Path) -> None:
    """A private, read-only, executable copy in the version: the store's blobs stay non-executable, so no link
    written there later (another file with the same bytes) can ever be run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blob, path)
    path.chmod(0o555)


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
    """Undo an install that failed before it was committed: the host is as it was before."""
    shutil.rmtree(prefix / "staging", ignore_errors=True)
    shutil.rmtree(prefix / "versions" / gen_id, ignore_errors=True)
    state = load_state(prefix)
    remove_roots_above(prefix, state.trusted_root)
    if state.pending is not None and state.pending.id == gen_id:
        save_state(prefix, replace(state, pending=None))


def recover(prefix: Path, state: State) -> State:
    """After a crash: finish an install that reached `ready`, clean up anything earlier, and make
    `current` point where state.json says."""
    pending = state.pending
    if pending is not None:
        complete = pending.step == STEP_READY and pending.generation is not None and (
            prefix / "versions" / pending.id).is_dir()
        state = state.committed() if complete else replace(state, pending=None)
        save_state(prefix, state)
    shutil.rmtree(prefix / "staging", ignore_errors=True)
    known = {g.id for g in state.generations}
    versions = prefix / "versions"
    if versions.is_dir():
        for leftover in versions.iterdir():
            if leftover.name not in known:
                shutil.rmtree(leftover, ignore_errors=True)
    remove_roots_above(prefix, state.trusted_root)
    _point_current(prefix, state.active)
    return state


def _point_current(prefix: Path, active: str | None) -> None:
    link = prefix / "current"
    if active is None:
        if link.is_symlink():
            link.unlink()
        return
    target = f"versions/{active}"
    if not link.is_symlink() or os.readlink(link) != target:
        swap_symlink(link, target)


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
        save_state(prefix, replace(state, active=target.id, history=(*state.history, target.id)))
        swap_symlink(prefix / "current", f"versions/{target.id}")
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

