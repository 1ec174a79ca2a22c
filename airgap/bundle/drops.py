"""Build side of signed updates: update drops (`--base`) and the root chain a bundle carries.

A drop's manifest describes the whole target state, every file with size and SHA-256, and names its
base (name, version, manifest SHA-256); files whose content the base already has are listed with
storage "absent" and not packed. Root files go first in the payload so the installer can walk the
chain and authenticate the manifest before it unpacks anything else (airgap.bundle.gate).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from airgap.bundle.container import (
    Head,
    LateFile,
    PayloadFile,
    add_signatures,
    read_head,
    read_head_from_path,
    read_payload,
    write_bundle,
)
from airgap.errors import AirgapError, SpecError
from airgap.format.manifest import BaseRef, DraftFile, FileEntry, Manifest
from airgap.streams.pipeline import digest_bytes, digest_files
from airgap.trust.acceptance import parse_version
from airgap.trust.roots import (
    Role,
    Root,
    check_chain,
    new_root,
    parse_root,
    root_member_path,
    root_member_version,
    with_envelope,
)
from airgap.trust.signing import PrivateKey, PublicKey, Signature, sign, sign_envelope, verified_keys

SignManifest = Callable[[bytes], Sequence[Signature]]


# ---------------------------------------------------------------- roots

def load_roots(paths: Sequence[Path]) -> tuple[Root, ...]:
    """Read the root files a bundle is to carry; they must form one unbroken, signed chain."""
    roots = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"cannot read root file {path}: {exc.strerror}") from exc
        roots.append(parse_root(data, what=str(path)))
    versions = [r.version for r in roots]
    if len(set(versions)) != len(versions):
        raise SpecError(f"root files given twice for one version: versions {sorted(versions)}")
    check_chain(roots)
    return tuple(sorted(roots, key=lambda r: r.version))


def root_payload(roots: Sequence[Root], work: Path) -> list[PayloadFile]:
    """Root files as raw meta members `trust/root.N.json`, readable with tar and a JSON viewer."""
    folder = work / "roots"
    folder.mkdir(parents=True, exist_ok=True)
    payload = []
    for root in roots:
        data = root.to_bytes()
        path = folder / f"root.{root.version}.json"
        path.write_bytes(data)
        digest = digest_bytes(data)
        payload.append(PayloadFile(path, DraftFile(
            path=root_member_path(root.version), size=digest.size, sha256=digest.sha256, kind="meta",
            storage="raw", stored_size=digest.size, source={"type": "root"})))
    return payload


def order(payload: Sequence[PayloadFile]) -> list[PayloadFile]:
    """Roots first (trust before data), then small files, weights last."""
    return sorted(payload, key=lambda p: (root_member_version(p.entry.path) is None, p.entry.kind == "model",
                                          p.entry.path))


# ---------------------------------------------------------------- drops

def read_base(path: Path) -> Head:
    """The head of the bundle a drop applies on top of (only its manifest is needed)."""
    try:
        return read_head_from_path(path)
    except FileNotFoundError as exc:
        raise SpecError(f"base bundle not found: {path}") from exc
    except AirgapError as exc:
        raise SpecError(f"base bundle {path}: {exc.message}") from exc


def base_ref(base: Head, draft: Manifest) -> BaseRef:
    old = base.manifest
    if old.name != draft.name:
        raise SpecError(f"a drop applies on top of the same bundle name: building {draft.name}, base is {old.name}")
    if parse_version(old.version) >= parse_version(draft.version):
        raise SpecError(f"a drop must be newer than its base: building {draft.version}, base is {old.version}")
    return BaseRef(old.name, old.version, base.manifest_sha256)


def plan_drop(payload: Sequence[PayloadFile], base: Manifest) -> tuple[list[PayloadFile], list[FileEntry]]:
    """Split the target state into files to carry and files the base already has (by content)."""
    have = {e.sha256 for e in base.files}
    unknown = [p for p in payload if p.entry.sha256 is None]
    digests = dict(zip((id(p) for p in unknown), digest_files([p.source_path for p in unknown]), strict=True))
    carried: list[PayloadFile] = []
    absent: list[FileEntry] = []
    for item in payload:
        entry = item.entry
        if id(item) in digests:
            digest = digests[id(item)]
            entry = replace(entry, size=digest.size, sha256=digest.sha256)
        if entry.sha256 in have and root_member_version(entry.path) is None:
            absent.append(replace(entry, storage="absent", stored_size=0, stored_sha256=None).hashed())
        else:
            carried.append(item)
    return carried, absent


def pack(
    out_path: Path, draft: Manifest, payload: Sequence[PayloadFile], sign_manifest: SignManifest,
    base: Head | None = None, progress: Callable[[int], object] | None = None, late: LateFile | None = None,
) -> Head:
    """Write a full bundle, or a drop on top of `base` when one is given; `late` is written last."""
    payload = order(payload)
    if base is None:
        return write_bundle(out_path, draft, payload, sign_manifest, progress, late=late)
    draft = replace(draft, base=base_ref(base, draft))
    carried, absent = plan_drop(payload, base.manifest)
    return write_bundle(out_path, draft, carried, sign_manifest, progress, absent, late)


# ---------------------------------------------------------------- co-signing and making roots

def is_root_file(path: Path) -> bool:
    """Root files are JSON envelopes; bundles start with a tar header."""
    try:
        with path.open("rb") as stream:
            return stream.read(1) == b"{"
    except FileNotFoundError as exc:
        raise AirgapError(f"file to sign not found: {path}") from exc


def cosign_bundle(path: Path, signers: Sequence[PrivateKey]) -> Head:
    """Add signatures to a built bundle in place, after checking every file it carries against its manifest:
    a co-signer vouches for the whole bundle, not only for its head."""
    with path.open("rb") as stream:
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)
    return add_signatures(path, [sign(head.manifest_bytes, key) for key in signers])


def cosign_root(path: Path, signers: Sequence[PrivateKey]) -> Root:
    root = parse_root(path.read_bytes(), what=str(path))
    envelope = root.envelope
    for key in signers:
        envelope = sign_envelope(envelope, key)
    signed = with_envelope(root, envelope)
    write_root_file(path, signed)
    return signed


def create_root(
    version: int, root_keys: Sequence[PublicKey], root_threshold: int,
    release_keys: Sequence[PublicKey], release_threshold: int, expires: datetime,
    signers: Sequence[PrivateKey] = (),
) -> Root:
    root = new_root(version, expires, Role(tuple(root_keys), root_threshold),
                    Role(tuple(release_keys), release_threshold))
    envelope = root.envelope
    for key in signers:
        envelope = sign_envelope(envelope, key)
    return with_envelope(root, envelope)


def write_root_file(path: Path, root: Root) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(root.to_bytes())
    os.replace(tmp, path)


def missing_signatures(root: Root) -> list[str]:
    """What a root still lacks to be trusted on its own: root keys short of the threshold."""
    good = verified_keys(root.envelope.signed_bytes, root.envelope.signatures, root.root.keys)
    short = root.root.threshold - len(good)
    return [f"{short} more root-key signature(s) of version {root.version}"] if short > 0 else []
