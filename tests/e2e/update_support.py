"""Helpers for update tests: keys, roots and bundles made in-process (no wheels, no venv), hosts, tampering.

Bundles are written by the same code `airgap build` uses (airgap.bundle.drops.pack: roots first, drops
against a base), from hand-made manifests holding model and meta files only, so an install needs no
virtualenv and each test stays well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.bundle.container import BLOCK, Head, prepare_entry, read_head_from_path
from airgap.bundle.drops import create_root, pack, root_payload
from airgap.format.manifest import DraftFile, Manifest, ModelEntry
from airgap.prefix.install import InstallReport, install_bundle
from airgap.trust.acceptance import NO_OVERRIDES, Overrides
from airgap.trust.keyfiles import write_keypair
from airgap.trust.roots import Root
from airgap.trust.signing import TrustPolicy, sign

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2030, 1, 1, tzinfo=UTC)  # every test runs on its own calendar, never the machine's clock


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_root(version: int, root_keys: Sequence[Ed25519PrivateKey], release_keys: Sequence[Ed25519PrivateKey], *,
              root_threshold: int = 1, release_threshold: int = 1, signers: Sequence[Ed25519PrivateKey] | None = None,
              expires: datetime | None = None) -> Root:
    """A root signed by `signers` (default: all its own root keys)."""
    return create_root(version, [k.public_key() for k in root_keys], root_threshold,
                       [k.public_key() for k in release_keys], release_threshold, expires or day(3 * 365),
                       list(root_keys) if signers is None else signers)


def make_bundle(
    folder: Path, version: str, files: Mapping[str, bytes], signers: Sequence[Ed25519PrivateKey], *,
    name: str = "x", base: Path | None = None, roots: Sequence[Root] = (), created: datetime = T0,
    expires_days: float = 180,
) -> Path:
    """A bundle of `files` (paths under models/<id>/ become models), written like `airgap build` does."""
    src = folder / f"src-{name}-{version}"
    work = folder / f"work-{name}-{version}"
    for path in (src, work):
        path.mkdir(parents=True, exist_ok=True)
    sources = []
    for rel, data in files.items():
        local = src / rel.replace("/", "__")
        local.write_bytes(data)
        kind = "model" if rel.startswith("models/") else "meta"
        sources.append(prepare_entry(local, DraftFile(path=rel, size=0, kind=kind), work))
    models = {rel.split("/")[1] for rel in files if rel.startswith("models/")}
    draft = Manifest(
        name=name, version=version, created=created, expires=created + timedelta(days=expires_days),
        tool_version="test", files=(),
        models=tuple(ModelEntry(m, tuple(sorted(r for r in files if r.startswith(f"models/{m}/")))) for m in
                     sorted(models)),
    )
    out = folder / f"{name}-{version}{'-drop' if base else ''}.airgap"
    base_head = read_head_from_path(base) if base is not None else None
    pack(out, draft, [*root_payload(roots, work), *sources], lambda data: [sign(data, k) for k in signers],
         base_head)
    return out


def head(bundle: Path) -> Head:
    return read_head_from_path(bundle)


@dataclass(frozen=True)
class Snapshot:
    """Everything an attack must not change: the active version and all persisted state."""

    current: str | None
    state: bytes
    trust: tuple[tuple[str, bytes], ...]
    versions: tuple[str, ...]


def snapshot(prefix: Path) -> Snapshot:
    link = prefix / "current"
    state = prefix / "state.json"
    trust = prefix / "trust"
    versions = prefix / "versions"
    return Snapshot(
        current=os.readlink(link) if link.is_symlink() else None,
        state=state.read_bytes() if state.exists() else b"",
        trust=tuple((p.name, p.read_bytes()) for p in sorted(trust.iterdir())) if trust.is_dir() else (),
        versions=tuple(sorted(p.name for p in versions.iterdir())) if versions.is_dir() else (),
    )


def install(bundle: Path, prefix: Path, *, trust: Sequence[Ed25519PrivateKey] | None = None,
            clock: datetime = T0, overrides: Overrides = NO_OVERRIDES) -> InstallReport:
    policy = TrustPolicy(tuple(k.public_key() for k in trust)) if trust is not None else None
    return install_bundle(bundle, prefix, policy, overrides, clock=clock, progress=False)


def active_version(prefix: Path) -> str:
    state = json.loads((prefix / "state.json").read_text())
    return next(g["version"] for g in state["generations"] if g["id"] == state["active"])


# ---------------------------------------------------------------- tampering

def members(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of each member of a bundle's tar stream."""
    found = []
    offset = 0
    while offset + BLOCK <= len(data) and data[offset:offset + BLOCK] != bytes(BLOCK):
        info = tarfile.TarInfo.frombuf(data[offset:offset + BLOCK], "utf-8", "strict")
        found.append((info.name, offset, offset + BLOCK, info.size))
        offset += BLOCK + info.size + (-info.size % BLOCK)
    return found


def replace_member(data: bytes, name: str, new: bytes) -> bytes:
    """The bundle with member `name`'s content replaced (its tar header rewritten for the new size)."""
    for member, header_at, data_at, size in members(data):
        if member == name:
            info = tarfile.TarInfo.frombuf(data[header_at:header_at + BLOCK], "utf-8", "strict")
            info.size = len(new)
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
            end = data_at + size + (-size % BLOCK)
            return data[:header_at] + header + new + bytes(-len(new) % BLOCK) + data[end:]
    raise KeyError(name)


def member_data(data: bytes, name: str) -> bytes:
    for member, _, data_at, size in members(data):
        if member == name:
            return data[data_at:data_at + size]
    raise KeyError(name)


# ---------------------------------------------------------------- the real CLI

def write_key_files(folder: Path, stem: str) -> tuple[Path, Path]:
    files = write_keypair(folder / stem, None)
    return files.private, files.public


def airgap(*args: str | Path, env: Mapping[str, str] | None = None,
           no_network: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from airgap.cli import main; main()", *map(str, args)]
    if no_network:
        command = offline(command)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, check=False, timeout=600)


def offline(command: list[str]) -> list[str]:
    """Run `command` in a network namespace with only loopback (root only)."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
