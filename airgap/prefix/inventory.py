"""`airgap inspect --sbom`: the bundle's SBOM (`files/sbom.cdx.json`) as bytes, read on the isolated host.

The host never parses the document (cyclonedx is build-side only); it checks its size and SHA-256 against
the manifest while reading the whole bundle once, and, given a trust anchor, the signatures too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from airgap.bundle.container import Sink, read_head, read_payload
from airgap.bundle.gate import Anchor, TrustGate
from airgap.errors import FormatError
from airgap.format.manifest import FileEntry
from airgap.prefix.install import open_bundle
from airgap.trust.acceptance import NO_OVERRIDES

SBOM_PATH = "sbom.cdx.json"  # the member airgap.build.sources.sbom writes; fixed by docs/FORMAT.md
MAX_SBOM_BYTES = 64 << 20


@dataclass(frozen=True)
class BundleSbom:
    data: bytes
    name: str
    version: str
    manifest_sha256: str
    signers: tuple[str, ...]  # verified key ids; empty when no trust anchor was given


class _Keep:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.data: bytes | None = None

    def write(self, chunk: bytes, /) -> object:
        self.chunks.append(chunk)
        return len(chunk)

    def close(self, ok: bool) -> None:
        self.data = b"".join(self.chunks) if ok else None


def read_sbom(path: Path, trust: Anchor | None, clock: datetime | None = None) -> BundleSbom:
    """The SBOM bytes, checked against the manifest (and, with `trust`, the manifest against its signatures)."""
    keep = _Keep()

    def open_sink(entry: FileEntry) -> Sink | None:
        return keep if entry.path == SBOM_PATH else None

    with open_bundle(path) as stream:
        head, tar = read_head(stream)
        manifest = head.manifest
        entry = next((e for e in manifest.files if e.path == SBOM_PATH), None)
        if entry is None or not entry.carried:
            raise FormatError(f"{manifest.name} {manifest.version} carries no SBOM ({SBOM_PATH}); it was built by an "
                              f"airgap without SBOM support")
        if entry.size > MAX_SBOM_BYTES:
            raise FormatError(f"{SBOM_PATH}: too large: limit {MAX_SBOM_BYTES} bytes, manifest declares {entry.size}")
        signers: tuple[str, ...] = ()
        if trust is None:
            read_payload(tar, manifest, open_sink)
        else:
            gate = TrustGate(head, trust, clock or datetime.now(UTC), NO_OVERRIDES, open_sink)
            read_payload(tar, manifest, gate.open_sink)
            signers = gate.finish().signers
    if keep.data is None:
        raise FormatError(f"{SBOM_PATH} was not read from the bundle")
    return BundleSbom(keep.data, manifest.name, manifest.version, head.manifest_sha256, signers)
