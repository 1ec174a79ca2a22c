"""`airgap verify` and `airgap install`: check everything in one pass, then switch versions atomically.

Nothing outside `PREFIX/staging` is written before the whole bundle has verified. Model files and
wheels go into a content-addressed store (`PREFIX/store/sha256/<hex>`), so a later version that keeps
the same weights neither copies nor rewrites them. The active version is the symlink `PREFIX/current`.

An install goes through recorded steps: staged, stored, built (all undone by the next run if it
crashed), then `ready` (state.json records the complete new version), switched (one symlink swap),
committed (state.json names the new version active). From `ready` on, the next run finishes the
install instead of undoing it. A `reached` hook is told each one; crash tests kill there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from airgap.bundle.container import FileSink, Head, Sink, read_head, read_payload
from airgap.bundle.gate import Anchor, SinkFactory, TrustGate, VerifiedManifest, check_before_parsing
from airgap.errors import (
    AirgapError,
    DiskFullError,
    FormatError,
    InstallError,
    PolicyError,
    TrustError,
    UnsafePathError,
)
from airgap.format.layout import check_layout
from airgap.format.manifest import FileEntry, Manifest, format_time, parse_manifest
from airgap.prefix.paths import Prefix
from airgap.prefix.state import (
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
from airgap.prefix.wheelinstall import (
    WheelContents,
    WheelToInstall,
    check_venv_records,
    examine_wheel,
    install_wheels,
    wheel_contents_from_bytes,
)
from airgap.progress import byte_progress
from airgap.streams.atomic import check_private_path, create_new, fsync_dir, remove_tree, write_new
from airgap.streams.pipeline import digest_file
from airgap.trust.acceptance import (
    NO_OVERRIDES,
    Acceptance,
    Overrides,
    advance,
    check_acceptance,
    check_base,
    check_created,
    check_root_fresh,
    trusted_now,
)
from airgap.trust.roots import Root, check_self_signed, parse_root
from airgap.trust.signing import TrustPolicy
from airgap.volumes import BundleStream
from airgap.volumes import open_bundle as open_volumes

VENV_EXPANSION = 4  # installed wheels (with their bytecode) take about this many times their compressed size
VENV_BASE_BYTES = 1 << 20  # a fresh virtualenv without pip: pyvenv.cfg, links and folders, with room to spare
# the names airgap makes directly under a prefix; none may be a symlink or writable by others


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
    signers: tuple[str, ...] = ()  # key ids whose signatures were verified and counted


StepHook = Callable[[str], object]  # told each durable step as it is done (crash tests kill the process there)


def _no_hook(step: str) -> None:
    """The default: nobody listens to the steps."""


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
        head, tar = read_head(stream, authenticate=check_before_parsing(trust))
        manifest = head.manifest
        check_layout(manifest)
        check_created(manifest, now, overrides)
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


def trust_init(prefix: Path, data: bytes, clock: datetime | None = None, force: bool = False,
               reset_time_floor: bool = False) -> Root:
    """Pin a root on this host, out of band. Refuses to replace a different pinned root unless forced.

    `reset_time_floor` (with `force`) lowers the trusted-time floor to the host's clock, recorded in
    state.json: the way back after a bundle claiming a future creation time raised it."""
    prefix = check_prefix(prefix)
    if reset_time_floor and not force:
        raise TrustError("--reset-time-floor is an out-of-band decision: pass it together with --force")
    clock = clock or datetime.now(UTC)
    with _private_umask(), prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        if reset_time_floor:
            state = state.with_time_floor_reset(clock)
        root = parse_root(data)
        check_self_signed(root)
        check_root_fresh(root.version, root.expires, trusted_now(clock, state.time_floor()), NO_OVERRIDES)
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
    return Prefix(prefix).blob(sha256)


def generation_id(manifest: Manifest, manifest_sha256: str) -> str:
    return f"{manifest.name}-{manifest.version}-{manifest_sha256[:12]}"


def check_prefix(prefix: Path) -> Path:
    """The absolute prefix, once it is safe to install into (see fsio.check_private_path)."""
    prefix = prefix.absolute()
    check_private_path(prefix, Prefix.PRIVATE_NAMES, os.geteuid())
    return prefix


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """What airgap creates is never group- or other-writable, whatever the caller's umask."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def install_bundle(
    path: Path, prefix: Path, trust: TrustPolicy | None = None, overrides: Overrides = NO_OVERRIDES,
    clock: datetime | None = None, progress: bool = True, *, reached: StepHook = _no_hook,
) -> InstallReport:
    """Install a full bundle or an update drop; `trust` None means the root pinned under `prefix`.

    `reached` is called with each durable step's name (staged, stored, built, ready, switched, committed)."""
    prefix = check_prefix(prefix)
    with _private_umask(), prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        anchor: Anchor = trust if trust is not None else pinned_root(prefix, state)
        with open_bundle(path) as stream:
            head, tar = read_head(stream, authenticate=check_before_parsing(anchor))
            manifest, manifest_sha = head.manifest, head.manifest_sha256
            check_layout(manifest)
            clock = clock or datetime.now(UTC)
            now = trusted_now(clock, state.time_floor())
            accepted = state.acceptance(manifest.name)
            used = check_created(manifest, clock, overrides)
            used += check_acceptance(manifest, manifest_sha, accepted, now, overrides,
                                     state.installed_versions(manifest.name))
            gen_id = generation_id(manifest, manifest_sha)
            existing = state.generation(gen_id)
            if existing is not None:  # still read it all: a damaged or forged copy is reported, not ignored
                gate = TrustGate(head, anchor, now, overrides)
                read_payload(tar, manifest, gate.open_sink)
                checked = gate.finish()
                return replace(_reactivate(prefix, state, existing), repairs=tuple(str(r) for r in stream.repaired),
                               signers=checked.signers)
            check_base(manifest, state.installed_bases())
            _check_store(prefix, manifest)
            _check_space(prefix, manifest)
            staging = Prefix(prefix).staging_for(gen_id)
            try:
                written, auth = _stage(tar, head, lambda inner: TrustGate(head, anchor, now, overrides, inner),
                                       prefix, staging, progress)
                reached("staged")
                for wheel in _wheels(prefix, manifest, staging):  # before any of it reaches the store
                    examine_wheel(wheel)
                _store(prefix, staging)
                reached("stored")
                generation = _assemble(prefix, auth, gen_id, clock, [*used, *auth.overrides])
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
                raise _os_error(exc, prefix) from exc
            except BaseException:
                _discard(prefix, gen_id)
                raise
            repairs = tuple(str(r) for r in stream.repaired)
        previous = state.active
        _finish(prefix, state, reached)
        remove_tree(Prefix(prefix).staging)
    return InstallReport(generation, previous, written, manifest.total_size - written, repairs=repairs,
                         signers=auth.signers)


def _finish(prefix: Path, state: State, reached: StepHook = _no_hook) -> State:
    """Switch to the ready version (one symlink swap), then record it as active."""
    assert state.pending is not None
    swap_symlink(Prefix(prefix).current, Prefix.current_target(state.pending.id))
    reached("switched")
    state = state.committed()
    save_state(prefix, state)
    reached("committed")
    return state


def _os_error(exc: OSError, prefix: Path) -> AirgapError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(prefix)
        return DiskFullError(f"disk full under {prefix} while writing {exc.filename or 'the new version'} "
                             f"({'unknown' if free is None else free >> 20} MiB free now); nothing was changed, "
                             f"free space and retry")
    return InstallError(f"install failed, nothing was changed: {exc.strerror or exc} ({exc.filename or prefix})")


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _reactivate(prefix: Path, state: State, generation: Generation) -> InstallReport:
    if state.active != generation.id:
        save_state(prefix, replace(state, active=generation.id, history=(*state.history, generation.id)))
        swap_symlink(Prefix(prefix).current, Prefix.current_target(generation.id))
    return InstallReport(generation, state.active, 0, 0, already_installed=True)


def _stored(prefix: Path, entry: FileEntry) -> bool:
    """Whether the store holds a plain file of the entry's size under its hash (it was verified on the way in;
    `airgap verify --installed` re-hashes it). A blob of another size is as good as absent."""
    try:
        info = os.lstat(store_path(prefix, entry.sha256))
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == entry.size


def _check_store(prefix: Path, manifest: Manifest) -> None:
    """The files a drop leaves out must be in the store (put there by its base), verified on the way in."""
    missing = [e for e in manifest.files if not e.carried and not _stored(prefix, e)]
    if missing:
        base = manifest.base
        needs = f"{base.name} {base.version}" if base else "a base version"
        raise PolicyError(f"this update drop needs the files of {needs}: {len(missing)} file(s) it does not "
                          f"carry are not in the store under {prefix}, first {missing[0].path}")


def space_needed(manifest: Manifest, stored: Callable[[FileEntry], bool]) -> int:
    """Bytes an install writes: the files the store lacks, and a fresh virtualenv (every version gets its own,
    even when the store already has all its wheels)."""
    new_files = sum(e.size for e in manifest.carried_files if not stored(e))
    engine = sum(e.size for e in manifest.files if e.kind == "engine")  # copied into every version it is in
    wheels = sum(manifest.file(p.path).size for p in manifest.packages)
    return new_files + engine + (wheels * VENV_EXPANSION + VENV_BASE_BYTES if manifest.packages else 0)


def _check_space(prefix: Path, manifest: Manifest) -> None:
    needed = space_needed(manifest, lambda e: _stored(prefix, e))
    free = shutil.disk_usage(prefix).free
    if needed > free:
        raise InstallError(f"not enough free space under {prefix}: need about {needed >> 20} MiB, "
                           f"found {free >> 20} MiB; nothing was changed")


def _stage(tar: object, head: Head, gate_for: Callable[[SinkFactory], TrustGate], prefix: Path, staging: Path,
           progress: bool) -> tuple[int, VerifiedManifest]:
    """Verify the payload into staging; the gate authenticates before the first file is written."""
    manifest = head.manifest
    staging.parent.mkdir(mode=0o755, exist_ok=True)
    if staging.parent.is_symlink():  # recover() removed any; one planted since is refused, never staged through
        raise UnsafePathError(f"{staging.parent} is a symlink airgap did not make; remove it")
    remove_tree(staging)
    staging.mkdir(mode=0o755)
    written = 0

    def open_sink(entry: FileEntry) -> Sink | None:
        nonlocal written
        if _stored(prefix, entry) or (staging / entry.sha256).is_file():
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
    store = Prefix(prefix).store
    store.mkdir(mode=0o755, parents=True, exist_ok=True)
    for staged in staging.iterdir():
        staged.chmod(0o444)
        os.replace(staged, store / staged.name)  # a new file under the name: an older blob is replaced, not written
    fsync_dir(store)


def _assemble(prefix: Path, verified: VerifiedManifest, gen_id: str, clock: datetime,
              overrides: list[str]) -> Generation:
    """Build the new version beside the active one, from the store. Nothing is written through a link:
    model and meta files become links to their blobs, manifest.json is a new file of its own, and the
    venv (a new folder) is filled by the wheel installer alone."""
    manifest = verified.manifest
    store = Prefix(prefix).store
    versions = Prefix(prefix).versions
    versions.mkdir(mode=0o755, exist_ok=True)
    gen_dir = versions / gen_id
    remove_tree(gen_dir)
    gen_dir.mkdir(mode=0o755)
    for entry in manifest.files:
        if entry.kind == "engine":
            _place_engine_file(gen_dir / entry.path, store / entry.sha256)
        elif entry.kind != "wheel":
            _link(gen_dir / entry.path, store / entry.sha256)
    write_new(gen_dir / "manifest.json", verified.manifest_bytes)
    if manifest.packages:
        install_wheels(gen_dir / "venv", _wheels(prefix, manifest))
    sync_filesystem(gen_dir)  # links, manifest and venv are durable before state.json calls them ready
    models = tuple(InstalledModel(m.id, f, manifest.file(f).size, manifest.file(f).sha256)
                   for m in manifest.models for f in m.files)
    return Generation(
        id=gen_id, name=manifest.name, version=manifest.version, manifest_sha256=verified.manifest_sha256,
        created=format_time(manifest.created), installed_at=format_time(clock), models=models,
        overrides=tuple(overrides),
    )


def _wheels(prefix: Path, manifest: Manifest, staging: Path | None = None) -> list[WheelToInstall]:
    """The manifest's wheels in the store, or where they were staged (those the store had already are there)."""
    wheels = []
    for package in manifest.packages:
        sha = manifest.file(package.path).sha256
        staged = staging / sha if staging is not None else None
        blob = staged if staged is not None and staged.is_file() else store_path(prefix, sha)
        wheels.append(WheelToInstall(blob, Path(package.path).name, package.name, package.version))
    return wheels


def _place_engine_file(path: Path, blob: Path) -> None:
    """A private, read-only, executable copy in the version: the store's blobs stay non-executable, so no link
    written there later (another file with the same bytes) can ever be run. Written as a new file, never
    through a link."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with blob.open("rb") as source, os.fdopen(create_new(path), "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    path.chmod(0o555)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _discard(prefix: Path, gen_id: str) -> None:
    """Undo an install that failed before it was committed: the host is as it was before."""
    remove_tree(Prefix(prefix).staging)
    remove_tree(Prefix(prefix).version(gen_id))
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
            Prefix(prefix).version(pending.id)).is_dir()
        state = state.committed() if complete else replace(state, pending=None)
        save_state(prefix, state)
    remove_tree(Prefix(prefix).staging)  # a symlink there is removed as a name, never staged through
    known = {g.id for g in state.generations}
    versions = Prefix(prefix).versions
    if versions.is_dir() and not versions.is_symlink():
        for leftover in versions.iterdir():
            if leftover.name not in known:
                remove_tree(leftover)
    remove_roots_above(prefix, state.trusted_root)
    _point_current(prefix, state.active)
    return state


def _point_current(prefix: Path, active: str | None) -> None:
    link = Prefix(prefix).current
    if active is None:
        if link.is_symlink():
            link.unlink()
        return
    target = Prefix.current_target(active)
    if not link.is_symlink() or os.readlink(link) != target:
        swap_symlink(link, target)


# ---------------------------------------------------------------- rollback and status

def rollback(prefix: Path, to_version: str | None = None) -> tuple[Generation, Generation]:
    """Activate the previously active generation (or the named version); returns (from, to)."""
    prefix = check_prefix(prefix)
    with _private_umask(), prefix_lock(prefix):
        state = recover(prefix, load_state(prefix))
        current = state.generation(state.active or "")
        if current is None:
            raise InstallError(f"nothing is installed under {prefix}")
        target = _rollback_target(state, current, to_version)
        save_state(prefix, replace(state, active=target.id, history=(*state.history, target.id)))
        swap_symlink(Prefix(prefix).current, Prefix.current_target(target.id))
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



# ---------------------------------------------------------------- checking what is installed

@dataclass(frozen=True)
class InstalledCheck:
    """`airgap verify --installed`: every blob re-hashed, every version's links and venv files checked."""

    prefix: str
    generations: int
    blobs: int
    bytes: int
    venv_files: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_installed(prefix: Path, progress: bool = True) -> InstalledCheck:
    """Re-hash every store blob an installed version uses, and check each version's manifest.json, its links
    into the store, and its venv's files against the RECORD the wheel installer wrote."""
    prefix = prefix.absolute()
    state = load_state(prefix)
    problems: list[str] = []
    blobs: dict[str, FileEntry] = {}
    venv_files = 0
    for gen in state.generations:
        gen_dir = Prefix(prefix).version(gen.id)
        manifest = _installed_manifest(gen_dir, gen.manifest_sha256, problems)
        if manifest is None:
            continue
        for entry in manifest.files:
            blobs.setdefault(entry.sha256, entry)
            if entry.kind != "wheel":
                link = gen_dir / entry.path
                expected = os.path.relpath(store_path(prefix, entry.sha256), link.parent)
                if not link.is_symlink() or os.readlink(link) != expected:
                    problems.append(f"{gen.id}: {entry.path} is not the link to its store blob")
        if manifest.packages:
            checked, found = check_venv_records(gen_dir / "venv")
            venv_files += checked
            problems += [f"{gen.id}: {p}" for p in found]
    total = sum(e.size for e in blobs.values())
    with byte_progress(total, "re-hashing the store", progress) as advance_bar:
        for sha, entry in sorted(blobs.items()):
            problem = _check_blob(store_path(prefix, sha), entry, advance_bar)
            if problem:
                problems.append(problem)
    return InstalledCheck(str(prefix), len(state.generations), len(blobs), total, venv_files, tuple(problems))


def _installed_manifest(gen_dir: Path, manifest_sha256: str, problems: list[str]) -> Manifest | None:
    path = gen_dir / "manifest.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        problems.append(f"{path}: unreadable ({exc.strerror}); is it a link?")
        return None
    from airgap.streams.pipeline import digest_bytes

    if digest_bytes(data).sha256 != manifest_sha256:
        problems.append(f"{path}: its SHA-256 is not the installed manifest's {manifest_sha256}")
        return None
    try:
        return parse_manifest(data)
    except FormatError as exc:
        problems.append(f"{path}: {exc.message}")
        return None


def _check_blob(path: Path, entry: FileEntry, advance_bar: Callable[[int], object]) -> str | None:
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"store blob {path.name} ({entry.path}) is not a plain file"
        digest = digest_file(path, advance_bar)
    except OSError as exc:
        return f"store blob {path.name} ({entry.path}) is unreadable: {exc.strerror}"
    if digest.size != entry.size or digest.sha256 != entry.sha256:
        return (f"store blob {path.name} ({entry.path}) changed: expected {entry.size} bytes with that SHA-256, "
                f"found {digest.size} bytes with SHA-256 {digest.sha256}")
    return None


# ---------------------------------------------------------------- what a bundle's wheels hold

class _Enough(Exception):
    """Every wheel has been read: the rest of the bundle (the weights) is not needed."""


class _SpooledSink:
    def __init__(self, keep: Callable[[tempfile.SpooledTemporaryFile[bytes]], None]) -> None:
        self.keep = keep
        self.spool: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (close)
            max_size=16 << 20)

    def write(self, chunk: bytes, /) -> object:
        return self.spool.write(chunk)

    def close(self, ok: bool) -> None:
        with self.spool:
            if ok:
                self.spool.seek(0)
                self.keep(self.spool)


@dataclass(frozen=True)
class WheelListing:
    """A wheel of a bundle as `airgap inspect` shows it; `problem` says why install would refuse it."""

    contents: WheelContents | None
    path: str
    problem: str | None = None


def bundle_wheels(path: Path) -> tuple[WheelListing, ...]:
    """The .pth files and scripts of each wheel the bundle carries (wheels come before the weights)."""
    with open_bundle(path) as stream:
        head, tar = read_head(stream)
        manifest = head.manifest
        packages = {p.path: p for p in manifest.packages}
        wanted = {e.path for e in manifest.carried_files if e.path in packages}
        found: list[WheelListing] = []

        def keep(entry: FileEntry, data: tempfile.SpooledTemporaryFile[bytes]) -> None:
            package = packages[entry.path]
            try:
                found.append(WheelListing(wheel_contents_from_bytes(
                    data, Path(entry.path).name, package.name, package.version), entry.path))  # type: ignore[arg-type]
            except AirgapError as exc:
                found.append(WheelListing(None, entry.path, exc.message))

        def open_sink(entry: FileEntry) -> Sink | None:
            if entry.path not in wanted:
                if not wanted:
                    raise _Enough
                return None
            wanted.discard(entry.path)
            return _SpooledSink(lambda data: keep(entry, data))

        with contextlib.suppress(_Enough):
            read_payload(tar, manifest, open_sink)
    order = {p.path: i for i, p in enumerate(manifest.packages)}
    return tuple(sorted(found, key=lambda w: order[w.path]))
