"""The `airgap` command line: thin wrappers that print one line on error and exit non-zero."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

import airgap
from airgap.errors import AirgapError, KeyFileError

if TYPE_CHECKING:
    from airgap.prefix.audit import BundleRef, Event

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Settings:
    """Options of the `airgap` group itself, handed to the group through click's context object."""

    verbose: bool = False


class AirgapGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AirgapError as exc:
            if isinstance(ctx.obj, Settings) and ctx.obj.verbose:
                traceback.print_exc()
            click.echo(f"airgap: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("airgap: interrupted; nothing was changed", err=True)
            sys.exit(130)


@click.group(cls=AirgapGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(airgap.__version__, prog_name="airgap")
@click.option("--verbose", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Signed, verified, offline bundles of open-weight LLMs, and the server to run them."""
    ctx.obj = Settings(verbose=verbose)


def prefix_option(func: F) -> F:
    return click.option("--prefix", type=click.Path(path_type=Path), default=Path("/opt/airgap"),
                        show_default=True, help="Installation root on this host.")(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(func)


def trust_option(func: F) -> F:
    return click.option("--trust", "trust_keys", multiple=True, type=click.Path(path_type=Path),
                        help="Public key (PEM) allowed to sign bundles; repeat for several.")(func)


def quiet_option(func: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(func)


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str) if as_json else text)


def _passphrase(confirm: bool) -> bytes:
    from airgap.trust.keyfiles import PASSPHRASE_ENV

    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise KeyFileError(f"a passphrase is needed: set {PASSPHRASE_ENV} (no terminal to prompt on)")
    value: str = click.prompt("Key passphrase", hide_input=True, confirmation_prompt=confirm)
    return value.encode()


# ---------------------------------------------------------------- the audit trail's one seam

@dataclass(frozen=True)
class Done:
    """What an audited command reports when it succeeds: the rest of its audit record."""

    reason: str
    bundle: BundleRef | None = None
    signers: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


OVERRIDE_FLAGS = ("allow_downgrade", "allow_expired", "force")
CREATING_COMMANDS = ("install", "trust init", "rollback")  # these make the prefix; verify and serve only use one


def _stamp(prefix: Path) -> Any:
    from airgap.prefix.audit import Stamp, current_operator
    from airgap.prefix.state import load_state

    try:
        floor = load_state(prefix.absolute()).time_floor()
    except AirgapError:
        floor = None
    return Stamp(datetime.now(UTC).replace(microsecond=0), floor, current_operator(os.environ), airgap.__version__)


def record(prefix: Path, event: Event, create: bool = True) -> None:
    from airgap.prefix.audit import append

    append(prefix.absolute(), event, _stamp(prefix), create=create)


def _bundle_ref(bundle: Path | None) -> BundleRef | None:
    """Name, version and manifest hash of a bundle that may be unreadable (it was refused, after all)."""
    from airgap.bundle.container import read_head
    from airgap.prefix.audit import BundleRef
    from airgap.prefix.install import open_bundle

    if bundle is None:
        return None
    try:
        with open_bundle(bundle) as stream:
            head, _ = read_head(stream)
    except (AirgapError, OSError):
        return BundleRef(None, None, None, str(bundle))
    return BundleRef(head.manifest.name, head.manifest.version, head.manifest_sha256, str(bundle))


def _prefix_used(ctx: click.Context, kwargs: dict[str, Any]) -> bool:
    """verify touches a prefix only when told to (--prefix) or when it trusts the root pinned there."""
    from click.core import ParameterSource

    given = ctx.get_parameter_source("prefix") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return given or not kwargs.get("trust_keys")


def audited(command: str, required: bool = True) -> Callable[[F], F]:
    """Append exactly one record to PREFIX/audit.jsonl for each run of the command: its outcome, including
    refusals and interruptions. The command returns `Done`; errors are recorded with their one-line reason.

    `required`: a trail that cannot take the record refuses the command before it does anything; otherwise
    (serve, under a read-only unit) a warning says the run is not recorded."""
    from airgap.prefix.audit import AuditError, Event

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def run(**kwargs: Any) -> None:
            from airgap.prefix.audit import check_appendable

            prefix: Path = kwargs["prefix"]
            if command == "verify" and not _prefix_used(click.get_current_context(), kwargs):
                func(**kwargs)
                return
            create = command in CREATING_COMMANDS
            if not create and not prefix.is_dir():
                func(**kwargs)  # nothing was ever installed there: no trail to write to
                return
            try:
                check_appendable(prefix.absolute())  # a trail that cannot take the record: refuse, do nothing
            except AuditError as exc:
                if required:
                    raise
                click.echo(f"airgap: warning: {exc.message}; this {command} is not recorded", err=True)
                func(**kwargs)
                return
            overrides = tuple(f.replace("_", "-") for f in OVERRIDE_FLAGS if kwargs.get(f))
            bundle: Path | None = kwargs.get("bundle")

            def note(event: Event) -> None:
                try:
                    record(prefix, event, create)
                except AuditError as exc:
                    if required:
                        raise
                    click.echo(f"airgap: warning: {exc.message}; this {command} is not recorded", err=True)

            try:
                done: Done | None = func(**kwargs)
            except AirgapError as exc:
                if prefix.is_dir():  # refused before any prefix existed (a dangling link, say): no trail to keep
                    note(Event(command, "refused", exc.message, _bundle_ref(bundle), overrides=overrides))
                raise
            except KeyboardInterrupt:
                note(Event(command, "interrupted", "interrupted by the operator", _bundle_ref(bundle),
                           overrides=overrides))
                raise
            except Exception as exc:
                note(Event(command, "failed", f"internal error: {type(exc).__name__}: {exc}", _bundle_ref(bundle),
                           overrides=overrides))
                raise
            if done is not None:  # serve records its own start, then execs
                note(Event(command, "ok", done.reason, done.bundle, done.signers, overrides, done.details))

        return run  # type: ignore[return-value]

    return decorate


# ---------------------------------------------------------------- keys

@main.command()
@click.argument("stem", type=click.Path(path_type=Path))
@click.option("--no-passphrase", is_flag=True, help="Write the private key unencrypted.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(stem: Path, no_passphrase: bool, force: bool) -> None:
    """Make an Ed25519 signing key: STEM.key (private, 0600) and STEM.pub (public, PEM)."""
    from airgap.trust.keyfiles import write_keypair

    files = write_keypair(stem, None if no_passphrase else _passphrase(confirm=True), overwrite=force)
    click.echo(f"wrote {files.private} (private, keep it off the isolated hosts) and {files.public}")
    click.echo(f"key id {files.keyid}")


def _signing_key(path: Path) -> Any:
    from airgap.trust.keyfiles import key_is_encrypted, read_private_key

    return read_private_key(path, _passphrase(confirm=False) if key_is_encrypted(path) else None)


# ---------------------------------------------------------------- build side

@main.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Private signing key; repeat to co-sign.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Folder for the bundle.")
@click.option("--upgrade", is_flag=True, help="Re-resolve Python requirements instead of using the lock file.")
@click.option("--hub-endpoint", envvar="HF_ENDPOINT", default=None,
              help="Hugging Face hub (or mirror) URL; default from HF_ENDPOINT or the public hub.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Build an update drop on top of this earlier bundle: only files it lacks are packed.")
@click.option("--root", "roots", multiple=True, type=click.Path(path_type=Path),
              help="Root file (root.N.json) for the bundle to carry; repeat for the whole chain.")
@click.option("--expires-days", type=click.IntRange(min=1), default=None,
              help="Days until the bundle expires (default: the spec's, else 180).")
@click.option("--target", "target", type=click.Path(path_type=Path), default=None,
              help="Build for the host this probe file describes (`airgap probe -o FILE` there): its Python and "
                   "platform tags, and models sized to fit its memory.")
@quiet_option
def build(spec: Path, keys: tuple[Path, ...], out_dir: Path, upgrade: bool, hub_endpoint: str | None,
          base: Path | None, roots: tuple[Path, ...], expires_days: int | None, target: Path | None,
          quiet: bool) -> None:
    """Fetch what SPEC names, pin it and pack one signed bundle. Prints the bundle's path last."""
    from airgap.build.builder import BuildOptions, build_bundle
    from airgap.build.spec import load_spec
    from airgap.hardware.facts import load_probe

    signers = [_signing_key(k) for k in keys]
    options = BuildOptions(out_dir=out_dir, upgrade=upgrade, progress=not quiet, hub_endpoint=hub_endpoint,
                           base=base, roots=roots, expires_days=expires_days,
                           target=load_probe(target) if target is not None else None, say=click.echo)
    click.echo(str(build_bundle(load_spec(spec), signers, options)))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Private key to add a signature with; repeat for several.")
def sign(file: Path, keys: tuple[Path, ...]) -> None:
    """Co-sign a bundle (in place, no rebuild; its files are checked first) or a root file."""
    from airgap.bundle.drops import cosign_bundle, cosign_root, is_root_file, missing_signatures

    signers = [_signing_key(k) for k in keys]
    if is_root_file(file):
        root = cosign_root(file, signers)
        lacking = missing_signatures(root)
        click.echo(f"signed root version {root.version}: {len(root.envelope.signatures)} signature(s)"
                   + (f"; still needs {', '.join(lacking)}" if lacking else ""))
        return
    head = cosign_bundle(file, signers)
    click.echo(f"signed {head.manifest.name} {head.manifest.version} (manifest {head.manifest_sha256}): "
               f"{len(head.signatures)} signature(s)")


@main.group()
def trust() -> None:
    """Root files: which keys may sign releases (k of n), pinned once per host, rotated by bundles."""


@trust.command("create")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--version", "version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Root version; a rotation is the trusted version plus one.")
@click.option("--root-key", "root_keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Public key allowed to sign root files; repeat.")
@click.option("--root-threshold", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many distinct root keys must sign the next root version.")
@click.option("--release-key", "release_keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Public key allowed to sign bundles; repeat.")
@click.option("--release-threshold", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many distinct release keys must sign each bundle (2: the two-person rule).")
@click.option("--expires-days", type=click.IntRange(min=1), default=None, help="Default: 1095 (three years).")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Private root key (of this version, or of the previous one) to sign with now; repeat.")
def trust_create(out: Path, version: int, root_keys: tuple[Path, ...], root_threshold: int,
                 release_keys: tuple[Path, ...], release_threshold: int, expires_days: int | None,
                 keys: tuple[Path, ...]) -> None:
    """Write root file OUT; co-sign it later with `airgap sign OUT --key ...`."""
    from datetime import UTC, datetime, timedelta

    from airgap.bundle.drops import create_root, missing_signatures, write_root_file
    from airgap.trust.keyfiles import read_public_key
    from airgap.trust.roots import DEFAULT_ROOT_EXPIRES_DAYS

    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=expires_days or DEFAULT_ROOT_EXPIRES_DAYS)
    root = create_root(version, [read_public_key(k) for k in root_keys], root_threshold,
                       [read_public_key(k) for k in release_keys], release_threshold, expires,
                       [_signing_key(k) for k in keys])
    write_root_file(out, root)
    lacking = missing_signatures(root)
    click.echo(f"wrote root version {version} to {out}" + (f"; still needs {', '.join(lacking)}" if lacking else ""))


@trust.command("init")
@click.argument("root_file", type=click.Path(path_type=Path))
@prefix_option
@click.option("--force", is_flag=True, help="Replace a different root already pinned (an out-of-band decision).")
@click.option("--reset-time-floor", is_flag=True,
              help="With --force: lower the trusted-time floor to this host's clock (recorded in state.json), "
                   "after a bundle claiming a future creation time raised it.")
@audited("trust init")
def trust_init(root_file: Path, prefix: Path, force: bool, reset_time_floor: bool) -> Done:
    """Pin ROOT_FILE as this host's trusted root (once, out of band); later roots come inside bundles."""
    from airgap.prefix.install import trust_init as pin

    try:
        data = root_file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read root file {root_file}: {exc.strerror}") from exc
    root = pin(prefix, data, force=force, reset_time_floor=reset_time_floor)
    line = (f"trusting root version {root.version} under {prefix}: release needs {root.release.threshold} of "
            f"{len(root.release.keys)} key(s), rotation {root.root.threshold} of {len(root.root.keys)}")
    click.echo(line)
    return Done(line, details={"root_file": str(root_file), "root_version": root.version,
                               "release_keys": list(root.release.keyids), "root_keys": list(root.root.keyids),
                               "reset_time_floor": reset_time_floor})


# ---------------------------------------------------------------- isolated side

@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@click.option("--sbom", is_flag=True,
              help="Print the bundle's CycloneDX SBOM, checked against the manifest (and, with --trust, the "
                   "whole bundle against its signatures).")
@trust_option
def inspect(bundle: Path, as_json: bool, sbom: bool, trust_keys: tuple[Path, ...]) -> None:
    """Show what a bundle holds, with what its wheels run at every start (.pth files) and put on PATH
    (scripts). Reads the head and the wheels, not the weights; checks no signature: use verify.
    With --sbom: its CycloneDX SBOM instead."""
    from airgap.bundle.container import read_head
    from airgap.prefix.install import bundle_wheels, open_bundle

    if sbom:
        _print_sbom(bundle, trust_keys)
        return

    with open_bundle(bundle) as stream:
        head, _ = read_head(stream)
    manifest = head.manifest
    try:
        wheels, wheels_error = bundle_wheels(bundle), None
    except AirgapError as exc:  # a head-only copy, a damaged payload: the head is still worth showing
        wheels, wheels_error = (), exc.message
    data = {"manifest_sha256": head.manifest_sha256, "signatures": [s.keyid for s in head.signatures],
            **manifest.to_dict(),
            "wheels": [{"path": w.path, "pth_files": list(w.contents.pth_files) if w.contents else [],
                        "scripts": list(w.contents.scripts) if w.contents else [], "problem": w.problem}
                       for w in wheels], "wheels_error": wheels_error}
    lines = [f"{manifest.name} {manifest.version}  created {data['created']}  expires {data['expires']}",
             f"manifest sha256 {head.manifest_sha256}",
             f"signed by {', '.join(s.keyid[:16] for s in head.signatures) or 'nobody'}"]
    if manifest.base:
        lines.append(f"update drop on top of {manifest.base.name} {manifest.base.version}")
    lines += [f"model {m.id}: {', '.join(m.files)}" for m in manifest.models]
    lines += _target_lines(manifest.target)
    lines.append(f"{len(manifest.files)} files, {manifest.total_size} bytes, {len(manifest.packages)} wheels")
    if wheels_error:
        lines.append(f"wheels not listed: {wheels_error}")
    for wheel in wheels:
        if wheel.contents is None:
            lines.append(f"wheel {wheel.path}: install would refuse it: {wheel.problem}")
            continue
        if wheel.contents.pth_files:
            lines.append(f"wheel {wheel.path}: .pth run at every start of the venv's Python: "
                         f"{', '.join(wheel.contents.pth_files)}")
        if wheel.contents.scripts:
            lines.append(f"wheel {wheel.path}: scripts {', '.join(wheel.contents.scripts)}")
    _emit(as_json, data, "\n".join(lines))


def _print_sbom(bundle: Path, trust_keys: tuple[Path, ...]) -> None:
    from airgap.prefix.inventory import read_sbom
    from airgap.trust.keyfiles import trust_from_files

    found = read_sbom(bundle, trust_from_files(list(trust_keys)) if trust_keys else None)
    click.echo(found.data.decode("utf-8"), nl=False)
    if found.signers:
        click.echo(f"airgap: SBOM of {found.name} {found.version} verified: signed by "
                   f"{', '.join(k[:16] for k in found.signers)}, every file of the bundle checked", err=True)
    else:
        click.echo(f"airgap: warning: UNVERIFIED SBOM of {found.name} {found.version}: it matches the bundle's "
                   f"manifest, but no signature was checked (pass --trust PUBLIC_KEY.pub)", err=True)


def _target_lines(target: Any) -> list[str]:
    from airgap.errors import ProbeError
    from airgap.hardware.target import built_for

    try:
        host = built_for(target)
    except ProbeError as exc:
        return [f"built for: unreadable target record ({exc.message})"]
    if host is None:
        return ["built for: any host (no --target)"]
    gpus = ", ".join(g.name for g in host.gpus) or "no GPU"
    engine = target.get("engine", {}) if isinstance(target, dict) else {}
    cpu = f"x86-64-v{host.x86_64_level}" if host.x86_64_level is not None else host.machine
    lines = [f"built for: python {host.python_minor} on {host.wheel_platform}, {cpu}, "
             f"{host.ram_total / 1e9:.1f} GB RAM, {gpus}, NVIDIA driver {host.driver_version or 'none'}"]
    if isinstance(engine, dict) and isinstance(engine.get("reason"), str):
        lines.append(f"  engine {engine.get('engine')}: {engine['reason']}")
    choices = target.get("choices", []) if isinstance(target, dict) else []
    lines += [f"  {choice}" for choice in choices if isinstance(choice, str)]
    return lines


def _echo_repairs(repairs: tuple[str, ...], as_json: bool) -> None:
    if not as_json:
        for repair in repairs:
            click.echo(f"repaired {repair}")


def _overrides(allow_downgrade: bool = False, allow_expired: bool = False, allow_future_created: bool = False) -> Any:
    from airgap.trust.acceptance import Overrides

    return Overrides(allow_downgrade=allow_downgrade, allow_expired=allow_expired,
                     allow_future_created=allow_future_created)


def future_option(func: F) -> F:
    return click.option("--allow-future-created", is_flag=True,
                        help="Accept a bundle created more than a day ahead of this host's clock (recorded).")(func)


def _anchor(trust_keys: tuple[Path, ...], prefix: Path) -> Any:
    """--trust keys if given, else the root pinned under --prefix."""
    from airgap.prefix.install import pinned_root
    from airgap.trust.keyfiles import trust_from_files

    return trust_from_files(list(trust_keys)) if trust_keys else pinned_root(prefix)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@trust_option
@prefix_option
@click.option("--allow-expired", is_flag=True, help="Accept a bundle past its expiry date.")
@future_option
@click.option("--installed", is_flag=True,
              help="Instead of a bundle, re-hash everything installed under --prefix (store, links, venv files).")
@json_option
@quiet_option
@audited("verify")
def verify(bundle: Path | None, trust_keys: tuple[Path, ...], prefix: Path, allow_expired: bool,
           allow_future_created: bool, installed: bool, as_json: bool, quiet: bool) -> Done | None:
    """Check a bundle's signatures (--trust keys, else the root pinned under --prefix) and every file's size
    and SHA-256, reading it once; or, with --installed, what is installed under --prefix. Recorded in
    PREFIX/audit.jsonl when --prefix is given or its root is used."""
    from airgap.prefix.audit import BundleRef
    from airgap.prefix.install import verify_bundle

    if installed or bundle is None:
        if bundle is not None or not installed:
            raise click.UsageError("give a BUNDLE, or --installed (with --prefix) and no bundle")
        _verify_installed(prefix, as_json, quiet)
        return None
    report = verify_bundle(bundle, _anchor(trust_keys, prefix),
                           overrides=_overrides(allow_expired=allow_expired, allow_future_created=allow_future_created),
                           progress=not quiet and not as_json)
    _echo_repairs(report.repairs, as_json)
    line = (f"OK {report.name} {report.version}: signature by {', '.join(k[:16] for k in report.signers)}, "
            f"{report.files} files, {report.bytes} bytes verified"
            + (f"; an update drop on top of {report.base}" if report.base else ""))
    _emit(as_json, asdict(report), line)
    return Done(line, BundleRef(report.name, report.version, report.manifest_sha256, str(bundle)), report.signers,
                {"trust": "keys" if trust_keys else "pinned root", "root_version": report.root_version})


def _verify_installed(prefix: Path, as_json: bool, quiet: bool) -> None:
    from airgap.errors import IntegrityError
    from airgap.prefix.install import verify_installed

    check = verify_installed(prefix, progress=not quiet and not as_json)
    text = "\n".join(check.problems) if check.problems else (
        f"OK {prefix}: {check.generations} version(s), {check.blobs} store blobs ({check.bytes} bytes) re-hashed, "
        f"{check.venv_files} venv files checked")
    _emit(as_json, {**asdict(check), "ok": check.ok}, text)
    if not check.ok:
        raise IntegrityError(f"{len(check.problems)} problem(s) under {prefix}, first: {check.problems[0]}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@trust_option
@prefix_option
@click.option("--allow-downgrade", is_flag=True, help="Accept a version lower than one already accepted.")
@click.option("--allow-expired", is_flag=True, help="Accept a bundle past its expiry date.")
@future_option
@quiet_option
@audited("install")
def install(bundle: Path, trust_keys: tuple[Path, ...], prefix: Path, allow_downgrade: bool, allow_expired: bool,
            allow_future_created: bool, quiet: bool) -> Done:
    """Verify BUNDLE while unpacking it, install it under PREFIX and make it active atomically.

    Trust: --trust keys if given, else the root pinned under PREFIX (`airgap trust init`)."""
    from airgap.prefix.install import install_bundle
    from airgap.trust.keyfiles import trust_from_files

    trust = trust_from_files(list(trust_keys)) if trust_keys else None
    report = install_bundle(bundle, prefix, trust, _overrides(allow_downgrade, allow_expired, allow_future_created),
                            progress=not quiet)
    gen = report.generation
    _echo_repairs(report.repairs, False)
    if report.already_installed:
        line = f"{gen.name} {gen.version} was already installed; it is active"
    else:
        line = (f"installed {gen.name} {gen.version} under {prefix} ({report.written_bytes} bytes written, "
                f"{report.reused_bytes} reused); active now")
    click.echo(line)
    return Done(line, _bundle_ref(bundle), report.signers,
                {"generation": gen.id, "previous": report.previous, "accepted_with": list(gen.overrides)})


@main.command()
@prefix_option
@json_option
def status(prefix: Path, as_json: bool) -> None:
    """Show installed versions, which one is active, and its models."""
    from airgap.prefix.install import installed_state

    state = installed_state(prefix)
    lines = []
    for gen in state.generations:
        mark = "*" if gen.id == state.active else " "
        overrides = f"  accepted with --{', --'.join(gen.overrides)}" if gen.overrides else ""
        lines.append(f"{mark} {gen.name} {gen.version}  installed {gen.installed_at}  ({gen.id}){overrides}")
        if gen.id == state.active:
            lines += [f"    model {m.id}: {m.path} ({m.size} bytes)" for m in gen.models]
    if lines and state.trusted_root is not None:
        lines.append(f"trusted root: version {state.trusted_root}")
    lines += [f"trusted-time floor reset at {r.at} (it was {r.previous_floor})" for r in state.time_floor_resets]
    _emit(as_json, asdict(state), "\n".join(lines) or f"nothing installed under {prefix}")


@main.command()
@prefix_option
@click.option("--to", "to_version", default=None, help="Installed version to return to (default: the previous).")
@audited("rollback")
def rollback(prefix: Path, to_version: str | None) -> Done:
    """Return to the previously active installed version (one atomic switch)."""
    from airgap.prefix.audit import BundleRef
    from airgap.prefix.install import rollback as do_rollback

    old, new = do_rollback(prefix, to_version)
    line = f"rolled back from {old.name} {old.version} to {new.name} {new.version}"
    click.echo(line)
    return Done(line, BundleRef(new.name, new.version, new.manifest_sha256),
                details={"from": {"name": old.name, "version": old.version, "manifest_sha256": old.manifest_sha256},
                         "to_version": to_version})


# ---------------------------------------------------------------- the audit trail

@main.group(invoke_without_command=True)
@prefix_option
@json_option
@click.pass_context
def audit(ctx: click.Context, prefix: Path, as_json: bool) -> None:
    """Show PREFIX/audit.jsonl: one hash-chained record per verify, install, refusal, rollback, trust change
    and serve start/stop. With --json: the records as JSON lines, for syslog or a SIEM."""
    if ctx.invoked_subcommand is not None:
        return
    from airgap.prefix.audit import describe_all, read_records, read_trail

    records = read_records(prefix.absolute())
    if as_json:
        for item in records:
            click.echo(json.dumps(item, sort_keys=True, separators=(",", ":")))
        return
    click.echo(describe_all(records) or f"no audit records under {prefix}")
    torn = read_trail(prefix.absolute()).torn_bytes
    if torn:
        click.echo(f"(a torn last line of {torn} bytes, left by an interrupted append, is not a record)")


@audit.command("verify")
@prefix_option
@json_option
def audit_verify(prefix: Path, as_json: bool) -> None:
    """Check the chain: every record's hash, order and link. Names the first broken, edited, reordered or
    missing record and exits non-zero."""
    from airgap.prefix.audit import verify_chain

    report = verify_chain(prefix.absolute())
    _emit(as_json, asdict(report),
          f"OK: {report.records} record(s) under {prefix}, chain intact; last record {report.head}"
          + (f"; a torn last line of {report.torn_bytes} bytes is not a record" if report.torn_bytes else ""))


@main.command("fleet-report")
@click.argument("folder", type=click.Path(path_type=Path))
@json_option
def fleet_report(folder: Path, as_json: bool) -> None:
    """One table of many hosts' `airgap status --json` (gathered by deploy/ansible/fleet.yml into FOLDER)."""
    from airgap.fleet import read_fleet, render_table

    view = read_fleet(folder)
    _emit(as_json, {"hosts": [asdict(h) for h in view.hosts], "common": view.common,
                    "differing": list(view.differing)}, render_table(view))


# ---------------------------------------------------------------- serving

def plan_options(func: F) -> F:
    for option in reversed([
        click.option("--model", default=None, help="Model id from the bundle (default: every model)."),
        click.option("--n-gpu-layers", type=int, default=None, help="Layers to offload to the GPU (-1: all)."),
        click.option("--n-ctx", type=int, default=None, help="Context length in tokens."),
        click.option("--threads", type=int, default=None, help="CPU threads for generation."),
        click.option("--parallel", type=int, default=None,
                     help="Requests decoded together per model (llama-server slots)."),
    ]):
        func = option(func)
    return func


def _plan_overrides(n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
                    parallel: int | None = None) -> Any:
    from airgap.hardware.sizing import PlanChoices

    return PlanChoices(n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads, parallel=parallel)


@main.command()
@prefix_option
@plan_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback requires an API key.")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File holding the API key clients must send (or set AIRGAP_API_KEY).")
@audited("serve", required=False)
def serve(prefix: Path, model: str | None, n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
          parallel: int | None, host: str, port: int, api_key_file: Path | None) -> None:
    """Serve the active version's models over an OpenAI-compatible API (llama.cpp).

    Logs request lines (method, path, status), never prompt or completion content. The start, and the stop
    of the server process, are recorded in PREFIX/audit.jsonl where that file is writable."""
    from airgap.serve import serve as run_server

    run_server(prefix, model, host, port, api_key_file, _plan_overrides(n_gpu_layers, n_ctx, threads, parallel),
               log=sys.stderr, before_exec=lambda launch: _record_serving(prefix, launch))


def _record_serving(prefix: Path, launch: Any) -> None:
    """Record the start, then leave a watcher behind that records the stop: it holds the read end of a pipe
    whose write end the server inherits, so it wakes when the server process ends, however it ends."""
    from airgap.prefix.audit import AuditError, Event

    installation = _installed(prefix)
    details = {"host": launch.config.host, "port": launch.config.port, "models": list(launch.config.model_ids),
               "api_key_required": launch.config.require_api_key, "content_logged": False}
    try:
        record(prefix, Event("serve", "ok", f"serving {', '.join(launch.config.model_ids)} on {launch.base_url}",
                             installation, details={**details, "event": "start"}), create=False)
    except AuditError as exc:
        click.echo(f"airgap: warning: {exc.message}; this serve is not recorded", err=True)
        return
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(write_end)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)  # a Ctrl-C or systemd's stop reaches the server; we wait for it
        while os.read(read_end, 4096):
            pass
        try:
            record(prefix, Event("serve", "ok", "the server process ended", installation,
                                 details={**details, "event": "stop"}), create=False)
        except AuditError as exc:
            click.echo(f"airgap: warning: {exc.message}; the stop of this serve is not recorded", err=True)
        os._exit(0)
    os.close(read_end)
    os.set_inheritable(write_end, True)


def _installed(prefix: Path) -> BundleRef | None:
    from airgap.prefix.audit import BundleRef
    from airgap.serve import read_installation
    from airgap.streams.pipeline import digest_bytes

    installation = read_installation(prefix)
    data = (installation.root / "manifest.json").read_bytes()
    return BundleRef(installation.manifest.name, installation.manifest.version, digest_bytes(data).sha256)


@main.command()
@prefix_option
@plan_options
@click.option("--host-facts", type=click.Path(path_type=Path), default=None,
              help="Plan for the host this probe file describes (`airgap probe -o FILE`) instead of this one.")
@json_option
def plan(prefix: Path, model: str | None, n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
         parallel: int | None, host_facts: Path | None, as_json: bool) -> None:
    """Show what serve will do on this host (GPU layers, context, threads) and why."""
    from airgap.hardware.facts import host_info, load_probe, probe_facts
    from airgap.hardware.target import carried_cpu_variants, host_check
    from airgap.serve import cpu_fallback_line, gpu_backends, plan_for, plans_json, read_installation

    facts = load_probe(host_facts) if host_facts is not None else probe_facts(prefix)
    host = host_info(facts)
    plans = plan_for(prefix, model, _plan_overrides(n_gpu_layers, n_ctx, threads, parallel), host)
    manifest = read_installation(prefix).manifest
    engine_files = [f.path for f in manifest.files if f.kind == "engine"]
    check = host_check(manifest.target, facts, carried_cpu_variants(engine_files),
                       vulkan="vulkan" in gpu_backends(engine_files))
    fallback = cpu_fallback_line(plans, "plan")
    if fallback is not None:
        click.echo(fallback, err=True)
    if as_json:
        click.echo(plans_json(plans, host, check))
        return
    cpu = check["cpu_variant"]
    tail = [line for line in (check["warning"], cpu and cpu["warning"], check["driver"]["summary"]) if line]
    click.echo("\n\n".join([*(p.explain() for p in plans), "\n".join(tail)]))


@main.command()
@prefix_option
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="File to write the facts to (default: standard output).")
def probe(prefix: Path, out: Path | None) -> None:
    """Write this host's facts as JSON, for `airgap build --target` (also runs as `python3 probe.py`)."""
    from airgap.hardware.probe import main as probe_main

    sys.exit(probe_main(["--prefix", str(prefix), *(["-o", str(out)] if out is not None else [])]))


@main.command()
@prefix_option
@plan_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the service binds.")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="Absolute path of the API key file, loaded as a systemd credential.")
@click.option("--gpu/--no-gpu", default=None, help="Allow NVIDIA devices (default: if this host has a GPU).")
@click.option("--user", default=None, help="Run as this user instead of a dynamic one.")
@click.option("--allow-from", multiple=True, help="Network (CIDR) allowed to connect; repeat for several.")
def service(prefix: Path, model: str | None, n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
            parallel: int | None, host: str, port: int, api_key_file: Path | None, gpu: bool | None, user: str | None,
            allow_from: tuple[str, ...]) -> None:
    """Print a hardened systemd unit that runs `airgap serve` for PREFIX."""
    from airgap.hardware.facts import probe_host
    from airgap.serve import render_service

    use_gpu = bool(probe_host().gpus) if gpu is None else gpu
    click.echo(render_service(prefix, host, port, model, api_key_file,
                              _plan_overrides(n_gpu_layers, n_ctx, threads, parallel), use_gpu, user, allow_from),
               nl=False)


# ---------------------------------------------------------------- sneakernet

def _volume_size(text: str | None, allow_auto: bool) -> Any:
    from airgap.volumes import parse_size

    if text is None:
        return "auto" if allow_auto else None
    if allow_auto and text == "auto":
        return "auto"
    return parse_size(text)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--volume-size", default=None, help="Largest volume, e.g. 3.9G (K/M/G/T: powers of 1024).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the volumes (default: beside the bundle).")
@click.option("--parity", type=int, default=0, show_default=True,
              help="Recovery volumes to add: any this many lost or damaged volumes can be rebuilt.")
@quiet_option
def split(bundle: Path, volume_size: str | None, out_dir: Path | None, parity: int, quiet: bool) -> None:
    """Cut a bundle into volumes for USB sticks, with an index bound to its signed manifest."""
    from airgap.volumes import split_bundle

    out = out_dir or bundle.parent
    index = split_bundle(bundle, out, _volume_size(volume_size, False), parity, progress=not quiet)
    click.echo(f"{len(index.volumes)} volume(s) and {len(index.recovery)} recovery volume(s) in {out}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--volume-size", default=None,
              help="Largest volume, or 'auto' (default): under 4 GiB on FAT32, else one volume.")
@click.option("--parity", type=int, default=0, show_default=True, help="Recovery volumes to add.")
@quiet_option
def copy(source: Path, dest: Path, volume_size: str | None, parity: int, quiet: bool) -> None:
    """Copy a bundle to a stick: free space checked, fsync, read back from the device, resumable."""
    from airgap.volumes import copy_bundle

    report = copy_bundle(source, dest, _volume_size(volume_size, True), parity, progress=not quiet)
    click.echo(f"copied to {report.dest_dir}: {len(report.written)} volume(s) written, "
               f"{len(report.unchanged)} already correct, all read back and verified; operator sheet {report.readme}")
