"""Every name under an installation prefix, owned by one type: nothing else joins names onto a prefix.

    PREFIX/
      current -> versions/<generation>     the active version (one symlink, swapped atomically)
      versions/<generation>/               manifest.json, models/ (links into the store), venv/
      store/sha256/<hex>                   verified blobs, read-only, shared by versions
      staging/<generation>/                an install in progress (removed on success or by recovery)
      trust/root.<N>.json                  the pinned root chain
      state.json, .lock, audit.jsonl       install state, the install lock, the audit trail
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prefix:
    root: Path

    # the names airgap creates under the root, each checked like sshd's StrictModes before an install
    PRIVATE_NAMES = ("state.json", ".lock", "staging", "store", "store/sha256", "versions", "trust")

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def active_venv(self) -> Path:
        return self.current / "venv"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    def version(self, generation: str) -> Path:
        return self.versions / generation

    @staticmethod
    def current_target(generation: str) -> str:
        """What `current` points to: relative, so a prefix can be moved or mounted elsewhere."""
        return f"versions/{generation}"

    @property
    def store(self) -> Path:
        return self.root / "store" / "sha256"

    def blob(self, sha256: str) -> Path:
        return self.store / sha256

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def staging_for(self, generation: str) -> Path:
        return self.staging / generation

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    def root_file(self, version: int) -> Path:
        return self.trust / f"root.{version}.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def audit_file(self) -> Path:
        return self.root / "audit.jsonl"
