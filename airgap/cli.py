"""The `airgap` command line: thin wrappers that print one line on error and exit non-zero."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

import airgap
from airgap.errors import AirgapError, KeyFileError

F = TypeVar("F", bound=Callable[..., Any])
_VERBOSE = {"on": False}


class AirgapGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AirgapError as exc:
            if _VERBOSE["on"]:
                traceback.print_exc()
            click.echo(f"airgap: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("airgap: interrupted; nothing was changed", err=True)
            sys.exit(130)


@click.group(cls=AirgapGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(airgap.__version__, prog_name="airgap")
@click.option("--verbose", is_flag=True, help="Show the full traceback on errors.")
def main(verbose: bool) -> None:
    """Signed, verified, offline bundles of open-weight LLMs, and the server to run them."""
    _VERBOSE["on"] = verbose


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
    from airgap.keys import PASSPHRASE_ENV

    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise KeyFileError(f"a passphrase is needed: set {PASSPHRASE_ENV} (no terminal to prompt on)")
    value: str = click.prompt("Key passphrase", hide_input=True, confirmation_prompt=confirm)
    return value.encode()


# ---------------------------------------------------------------- keys

@main.command()
@click.argument("stem", type=click.Path(path_type=Path))
@click.option("--no-passphrase", is_flag=True, help="Write the private key unencrypted.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(stem: Path, no_passphrase: bool, force: bool) -> None:
    """Make an Ed25519 signing key: STEM.key (private, 0600) and STEM.pub (public, PEM)."""
    from airgap.keys import write_keypair

    files = write_keypair(stem, None if no_passphrase else _passphrase(confirm=True), overwrite=force)
    click.echo(f"wrote {files.private} (private, keep it off the isolated hosts) and {files.public}")
    click.echo(f"key id {files.keyid}")


def _signing_key(path: Path) -> Any:
    from airgap.keys import key_is_encrypted, read_private_key

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
@quiet_option
def build(spec: Path, keys: tuple[Path, ...], out_dir: Path, upgrade: bool, hub_endpoint: str | None,
          base: Path | None, roots: tuple[Path, ...], expires_days: int | None, quiet: bool) -> None:
    """Fetch what SPEC names, pin it and pack one signed bundle. Prints the bundle's path last."""
    from airgap.build import BuildOptions, build_bundle
    from airgap.spec import load_spec

    signers = [_signing_key(k) for k in keys]
    options = BuildOptions(out_dir=out_dir, upgrade=upgrade, progress=not quiet, hub_endpoint=hub_endpoint,
                           base=base, roots=roots, expires_days=expires_days)
    click.echo(str(build_bundle(load_spec(spec), signers, options)))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Private key to add a signature with; repeat for several.")
def sign(file: Path, keys: tuple[Path, ...]) -> None:
    """Co-sign a bundle (in place, no rebuild; its files are checked first) or a root file."""
    from airgap.updates import cosign_bundle, cosign_root, is_root_file, missing_signatures

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

    from airgap.keys import read_public_key
    from airgap.roots import DEFAULT_ROOT_EXPIRES_DAYS
    from airgap.updates import create_root, missing_signatures, write_root_file

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
def trust_init(root_file: Path, prefix: Path, force: bool) -> None:
    """Pin ROOT_FILE as this host's trusted root (once, out of band); later roots come inside bundles."""
    from airgap.install import trust_init as pin

    try:
        data = root_file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read root file {root_file}: {exc.strerror}") from None
    root = pin(prefix, data, force=force)
    click.echo(f"trusting root version {root.version} under {prefix}: release needs {root.release.threshold} of "
               f"{len(root.release.keys)} key(s), rotation {root.root.threshold} of {len(root.root.keys)}")


# ---------------------------------------------------------------- isolated side

@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what a bundle holds (reads only its head; checks nothing: use verify)."""
    from airgap.bundle import read_head
    from airgap.install import open_bundle

    with open_bundle(bundle) as stream:
        head, _ = read_head(stream)
    manifest = head.manifest
    data = {"manifest_sha256": head.manifest_sha256, "signatures": [s.keyid for s in head.signatures],
            **manifest.to_dict()}
    lines = [f"{manifest.name} {manifest.version}  created {data['created']}  expires {data['expires']}",
             f"manifest sha256 {head.manifest_sha256}",
             f"signed by {', '.join(s.keyid[:16] for s in head.signatures) or 'nobody'}"]
    if manifest.base:
        lines.append(f"update drop on top of {manifest.base.name} {manifest.base.version}")
    lines += [f"model {m.id}: {', '.join(m.files)}" for m in manifest.models]
    lines.append(f"{len(manifest.files)} files, {manifest.total_size} bytes, {len(manifest.packages)} wheels")
    _emit(as_json, data, "\n".join(lines))


def _echo_repairs(repairs: tuple[str, ...], as_json: bool) -> None:
    if not as_json:
        for repair in repairs:
            click.echo(f"repaired {repair}")


def _overrides(allow_downgrade: bool = False, allow_expired: bool = False) -> Any:
    from airgap.policy import Overrides

    return Overrides(allow_downgrade=allow_downgrade, allow_expired=allow_expired)


def _anchor(trust_keys: tuple[Path, ...], prefix: Path) -> Any:
    """--trust keys if given, else the root pinned under --prefix."""
    from airgap.install import pinned_root
    from airgap.keys import trust_from_files

    return trust_from_files(list(trust_keys)) if trust_keys else pinned_root(prefix)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@trust_option
@prefix_option
@click.option("--allow-expired", is_flag=True, help="Accept a bundle past its expiry date.")
@json_option
@quiet_option
def verify(bundle: Path, trust_keys: tuple[Path, ...], prefix: Path, allow_expired: bool, as_json: bool,
           quiet: bool) -> None:
    """Check a bundle's signatures (--trust keys, else the root pinned under --prefix) and every file's size
    and SHA-256, reading it once."""
    from airgap.install import verify_bundle

    report = verify_bundle(bundle, _anchor(trust_keys, prefix),
                           overrides=_overrides(allow_expired=allow_expired), progress=not quiet and not as_json)
    _echo_repairs(report.repairs, as_json)
    _emit(as_json, asdict(report),
          f"OK {report.name} {report.version}: signature by {', '.join(k[:16] for k in report.signers)}, "
          f"{report.files} files, {report.bytes} bytes verified"
          + (f"; an update drop on top of {report.base}" if report.base else ""))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@trust_option
@prefix_option
@click.option("--allow-downgrade", is_flag=True, help="Accept a version lower than one already accepted.")
@click.option("--allow-expired", is_flag=True, help="Accept a bundle past its expiry date.")
@quiet_option
def install(bundle: Path, trust_keys: tuple[Path, ...], prefix: Path, allow_downgrade: bool, allow_expired: bool,
            quiet: bool) -> None:
    """Verify BUNDLE while unpacking it, install it under PREFIX and make it active atomically.

    Trust: --trust keys if given, else the root pinned under PREFIX (`airgap trust init`)."""
    from airgap.install import install_bundle
    from airgap.keys import trust_from_files

    trust = trust_from_files(list(trust_keys)) if trust_keys else None
    report = install_bundle(bundle, prefix, trust, _overrides(allow_downgrade, allow_expired), progress=not quiet)
    gen = report.generation
    _echo_repairs(report.repairs, False)
    if report.already_installed:
        click.echo(f"{gen.name} {gen.version} was already installed; it is active")
        return
    click.echo(f"installed {gen.name} {gen.version} under {prefix} ({report.written_bytes} bytes written, "
               f"{report.reused_bytes} reused); active now")


@main.command()
@prefix_option
@json_option
def status(prefix: Path, as_json: bool) -> None:
    """Show installed versions, which one is active, and its models."""
    from airgap.install import installed_state

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
    _emit(as_json, asdict(state), "\n".join(lines) or f"nothing installed under {prefix}")


@main.command()
@prefix_option
@click.option("--to", "to_version", default=None, help="Installed version to return to (default: the previous).")
def rollback(prefix: Path, to_version: str | None) -> None:
    """Return to the previously active installed version (one atomic switch)."""
    from airgap.install import rollback as do_rollback

    old, new = do_rollback(prefix, to_version)
    click.echo(f"rolled back from {old.name} {old.version} to {new.name} {new.version}")


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
    from airgap.plan import Overrides

    return Overrides(n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads, parallel=parallel)


@main.command()
@prefix_option
@plan_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback requires an API key.")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File holding the API key clients must send (or set AIRGAP_API_KEY).")
def serve(prefix: Path, model: str | None, n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
          parallel: int | None, host: str, port: int, api_key_file: Path | None) -> None:
    """Serve the active version's models over an OpenAI-compatible API (llama.cpp)."""
    from airgap.serve import serve as run_server

    run_server(prefix, model, host, port, api_key_file, _plan_overrides(n_gpu_layers, n_ctx, threads, parallel),
               log=sys.stderr)


@main.command()
@prefix_option
@plan_options
@json_option
def plan(prefix: Path, model: str | None, n_gpu_layers: int | None, n_ctx: int | None, threads: int | None,
         parallel: int | None, as_json: bool) -> None:
    """Show what serve will do on this host (GPU layers, context, threads) and why."""
    from airgap.host import probe_host
    from airgap.serve import plan_for, plans_json

    host = probe_host()
    plans = plan_for(prefix, model, _plan_overrides(n_gpu_layers, n_ctx, threads, parallel), host)
    click.echo(plans_json(plans, host) if as_json else "\n\n".join(p.explain() for p in plans))


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
    from airgap.host import probe_host
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
