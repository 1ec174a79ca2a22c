"""Freshness and anti-rollback rules for accepting a verified manifest. Pure: no I/O, no clock reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from packaging.version import InvalidVersion, Version

from airgap.errors import PolicyError
from airgap.manifest import Manifest, format_time


@dataclass(frozen=True)
class Acceptance:
    """What the host remembers so old or frozen bundles cannot be replayed to it."""

    highest_version: str | None = None
    highest_manifest_sha256: str | None = None
    newest_created: datetime | None = None


@dataclass(frozen=True)
class Overrides:
    allow_downgrade: bool = False
    allow_expired: bool = False


def trusted_now(clock: datetime, accepted: Acceptance) -> datetime:
    """The host never believes a time earlier than the newest bundle it accepted: a clock set back
    does not revive an expired bundle."""
    if accepted.newest_created is not None and accepted.newest_created > clock:
        return accepted.newest_created
    return clock


def parse_version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise PolicyError(f"bundle version {text!r} is not a version number (PEP 440)") from None


def check_acceptance(
    manifest: Manifest, manifest_sha256: str, accepted: Acceptance, clock: datetime, overrides: Overrides
) -> list[str]:
    """Raise PolicyError if the manifest must be refused; return the overrides that were needed."""
    used: list[str] = []
    now = trusted_now(clock, accepted)
    if manifest.expires <= now:
        if not overrides.allow_expired:
            raise PolicyError(
                f"bundle {manifest.name} {manifest.version} expired at {format_time(manifest.expires)}; "
                f"trusted time is {format_time(now)} (use --allow-expired to accept it anyway)")
        used.append("allow-expired")
    if accepted.highest_version is None:
        return used
    new, old = parse_version(manifest.version), parse_version(accepted.highest_version)
    if new == old and manifest_sha256 != accepted.highest_manifest_sha256:
        raise PolicyError(
            f"bundle {manifest.name} {manifest.version} was already accepted with other content "
            f"(manifest {accepted.highest_manifest_sha256}); found manifest {manifest_sha256}")
    if new < old:
        if not overrides.allow_downgrade:
            raise PolicyError(
                f"downgrade refused: {manifest.name} {accepted.highest_version} was accepted, this bundle is "
                f"{manifest.version} (use --allow-downgrade, or `airgap rollback` to an installed version)")
        used.append("allow-downgrade")
    return used


NO_OVERRIDES = Overrides()
