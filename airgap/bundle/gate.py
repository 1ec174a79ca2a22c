"""Authenticate a bundle's manifest before any payload file is unpacked, from the roots it carries.

Root files travel as the first payload members (`files/trust/root.N.json`, listed in the manifest as
meta files). Roots need no other authority: each one is checked against the root the host already
trusts, one version at a time (airgap.trust.roots.walk_chain). So the reader keeps those few small members
in memory, and at the first other member (or at the end) walks the chain, checks that the newest root
has not expired and that a threshold of its release keys signed the manifest. Only then are any bytes
handed to the installer: nothing unauthenticated reaches the disk, and a bundle whose roots come late
or are missing is refused rather than half-trusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from airgap.bundle.container import Head, Sink
from airgap.errors import FormatError
from airgap.format.manifest import DEFAULT_LIMITS, FileEntry, Limits, Manifest
from airgap.trust.acceptance import Overrides, check_root_fresh
from airgap.trust.roots import ROOTS_FOLDER, Root, root_member_version, walk_chain
from airgap.trust.signing import Signature, TrustPolicy, key_id, public_key_from_raw

Anchor = TrustPolicy | Root  # `--trust PUB` (plain keys) or the root pinned on the host
SinkFactory = Callable[[FileEntry], Sink | None]


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signatures the gate checked against the trust anchor: only `authenticate` makes one.

    A parsed `Head` is untrusted; what install writes into a version (manifest.json, the generation record,
    the roots to pin) comes from this value, so an unverified manifest cannot reach the prefix by mistake.
    """

    manifest: Manifest
    manifest_bytes: bytes  # exactly the signed bytes
    signers: tuple[str, ...]  # key ids of the release keys whose signatures counted
    new_roots: tuple[Root, ...]  # roots after the trusted one that this bundle's chain reached
    overrides: tuple[str, ...]  # overrides the trust checks needed (an expired root)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def root_version(self) -> int | None:
        return self.new_roots[-1].version if self.new_roots else None


def authenticate(head: Head, anchor: Anchor, roots: Mapping[int, bytes], now: datetime, overrides: Overrides,
                 limits: Limits = DEFAULT_LIMITS) -> VerifiedManifest:
    """Check the manifest's signatures against the release keys of the newest root reachable."""
    if isinstance(anchor, TrustPolicy):
        good_keys = anchor.check(head.manifest_bytes, head.signatures)
        return VerifiedManifest(head.manifest, head.manifest_bytes, _key_ids(good_keys), (), ())
    new_roots = walk_chain(anchor, roots, limits)
    final = new_roots[-1] if new_roots else anchor
    used = check_root_fresh(final.version, final.expires, now, overrides)
    good = final.release_policy.check(head.manifest_bytes, head.signatures)
    return VerifiedManifest(head.manifest, head.manifest_bytes, _key_ids(good), new_roots, tuple(used))


def check_before_parsing(anchor: Anchor) -> Callable[[bytes, Sequence[Signature]], None]:
    """For read_head: refuse a manifest that cannot be authentic before its JSON is parsed.

    With `--trust` keys the anchor alone decides. So does a pinned root when the manifest lists no
    root file (the writer writes `"trust/root.` literally; a manifest that spells it otherwise is
    refused, which is safe). A manifest that lists root files may be signed by the release keys of a
    newer root that only the payload carries: it is parsed first (bounded and linear) and the
    TrustGate decides once those roots are read.
    """
    def check(manifest_bytes: bytes, signatures: Sequence[Signature]) -> None:
        if isinstance(anchor, TrustPolicy):
            anchor.check(manifest_bytes, signatures)
        elif f'"{ROOTS_FOLDER}/root.'.encode() not in manifest_bytes:
            anchor.release_policy.check(manifest_bytes, signatures)

    return check


def _key_ids(raw_keys: set[bytes]) -> tuple[str, ...]:
    return tuple(sorted(key_id(public_key_from_raw(raw)) for raw in raw_keys))


class _MemorySink:
    def __init__(self, keep: Callable[[bytes], None]) -> None:
        self.keep = keep
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes, /) -> object:
        self.chunks.append(chunk)
        return len(chunk)

    def close(self, ok: bool) -> None:
        if ok:
            self.keep(b"".join(self.chunks))


class TrustGate:
    """Wraps the installer's sink factory: root members are held back until the manifest is authentic."""

    def __init__(self, head: Head, anchor: Anchor, now: datetime, overrides: Overrides,
                 inner: SinkFactory | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.head, self.anchor, self.now, self.overrides = head, anchor, now, overrides
        self.inner, self.limits = inner, limits
        self.roots: dict[int, tuple[FileEntry, bytes]] = {}
        self.result: VerifiedManifest | None = None  # set once, by finish(): the only way to a verified value

    def open_sink(self, entry: FileEntry) -> Sink | None:
        version = root_member_version(entry.path) if entry.kind == "meta" else None
        if version is None:
            self.finish()
            return self.inner(entry) if self.inner is not None else None
        if self.result is not None:
            raise FormatError(f"{entry.path} comes after other payload files: root files must come first")
        if entry.size > self.limits.max_metadata_bytes:
            raise FormatError(f"{entry.path}: root file too large: limit {self.limits.max_metadata_bytes} bytes, "
                              f"manifest declares {entry.size}")
        return _MemorySink(lambda data: self.roots.__setitem__(version, (entry, data)))

    def finish(self) -> VerifiedManifest:
        """Authenticate (once), then hand the held-back root files to the installer."""
        if self.result is None:
            candidates = {version: data for version, (_, data) in self.roots.items()}
            self.result = authenticate(self.head, self.anchor, candidates, self.now, self.overrides, self.limits)
            for entry, data in self.roots.values():
                sink = self.inner(entry) if self.inner is not None else None
                if sink is not None:
                    sink.write(data)
                    sink.close(True)
        return self.result
