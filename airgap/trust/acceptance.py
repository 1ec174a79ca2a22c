"""Freshness, anti-rollback and base rules for accepting an authentic manifest. Pure: no I/O, no clock reads.

There is no timestamp server on an isolated host, so freshness rests on two things: every manifest
(and root) carries an expiry chosen when it was made, and the host never believes a time earlier than
the newest creation time it has accepted, so setting the clock back does not revive an expired bundle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from packaging.version import InvalidVersion, Version

from airgap.errors import FormatError, PolicyError, TrustError
from airgap.format.manifest import BaseRef, Manifest, format_time


@dataclass(frozen=True)
class Acceptance:
    """What the host remembers per bundle name so old or frozen bundles cannot be replayed to it."""

    highest_version: str | None = None
    highest_manifest_sha256: str | None = None
    newest_created: datetime | None = None


@dataclass(frozen=True)
class Overrides:
    """Explicit operator decisions; each one used is recorded with the generation it installed."""

    allow_downgrade: bool = False
    allow_expired: bool = False
    allow_future_created: bool = False


MAX_CLOCK_SKEW = timedelta(days=1)  # how far a bundle's creation time may lie ahead of this host's clock


NO_OVERRIDES = Overrides()


def trusted_now(clock: datetime, floor: datetime | None) -> datetime:
    """The later of the clock and `floor` (the newest creation time the host accepted)."""
    if floor is not None and floor > clock:
        return floor
    return clock


def parse_version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion as exc:
        raise PolicyError(f"bundle version {text!r} is not a version number (PEP 440)") from exc


def check_acceptance(
    manifest: Manifest, manifest_sha256: str, accepted: Acceptance, now: datetime, overrides: Overrides,
    installed: Mapping[str, str] | None = None,
) -> list[str]:
    """Raise PolicyError if the manifest must be refused; return the overrides that were needed.

    `now` is the trusted time (see trusted_now); `installed` maps the versions of this bundle name that
    are installed to their manifest SHA-256. `--allow-expired` skips only the expiry check: the rollback
    checks below still run.
    """
    used: list[str] = []
    if manifest.expires <= now:
        if not overrides.allow_expired:
            raise PolicyError(
                f"bundle {manifest.name} {manifest.version} expired at {format_time(manifest.expires)}; "
                f"trusted time is {format_time(now)} (use --allow-expired to accept it anyway)")
        used.append("allow-expired")
    _check_same_version(manifest, manifest_sha256, installed or {})
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


def check_created(manifest: Manifest, clock: datetime, overrides: Overrides) -> list[str]:
    """A creation time far ahead of the host's clock is refused: accepting it would raise the trusted-time
    floor (see trusted_now) to that moment for good, expiring every root and bundle made before it."""
    if manifest.created <= clock + MAX_CLOCK_SKEW:
        return []
    if not overrides.allow_future_created:
        raise PolicyError(
            f"bundle {manifest.name} {manifest.version} claims it was created at {format_time(manifest.created)}, "
            f"more than {MAX_CLOCK_SKEW.days} day ahead of this host's clock ({format_time(clock)}); fix the clock, "
            f"or use --allow-future-created if the clock is wrong")
    return ["allow-future-created"]


def _check_same_version(manifest: Manifest, manifest_sha256: str, installed: Mapping[str, str]) -> None:
    for version, sha in installed.items():
        if parse_version(version) == parse_version(manifest.version) and sha != manifest_sha256:
            raise PolicyError(
                f"bundle {manifest.name} {manifest.version} is installed with other content (manifest {sha}); "
                f"found manifest {manifest_sha256}")


def check_root_fresh(version: int, expires: datetime, now: datetime, overrides: Overrides) -> list[str]:
    """The newest trusted root must not have expired: a frozen host stops trusting stale release keys."""
    if expires > now:
        return []
    if not overrides.allow_expired:
        raise TrustError(f"trusted root version {version} expired at {format_time(expires)}; trusted time is "
                         f"{format_time(now)} (install a bundle carrying a newer root, or use --allow-expired)")
    return ["allow-expired-root"]


def check_base(manifest: Manifest, installed_bases: Iterable[BaseRef]) -> None:
    """An update drop applies only on top of the exact version it names (name, version, manifest hash)."""
    base = manifest.base
    if base is not None and base.name != manifest.name:
        raise PolicyError(f"update drop {manifest.name} {manifest.version} names a base of another bundle, "
                          f"{base.name} {base.version}; a drop applies only on top of a version of its own name")
    if base is None:
        absent = [e.path for e in manifest.files if not e.carried]
        if absent:
            raise FormatError(f"bundle {manifest.name} {manifest.version} leaves out {len(absent)} file(s), first "
                              f"{absent[0]!r}, but names no base version to take them from")
        return
    installed = set(installed_bases)
    if base in installed:
        return
    other = sorted(i.manifest_sha256[:16] for i in installed if (i.name, i.version) == (base.name, base.version))
    if other:
        raise PolicyError(
            f"this update drop applies on top of {base.name} {base.version} built as manifest "
            f"{base.manifest_sha256[:16]}, but this host installed {base.version} from another build (manifest "
            f"{other[0]}); install a full bundle of {manifest.name} {manifest.version} or a drop built on that one")
    raise PolicyError(
        f"this update drop applies on top of {base.name} {base.version} (manifest {base.manifest_sha256[:16]}), "
        f"which is not installed here; install {base.name} {base.version} first, or a full bundle of "
        f"{manifest.name} {manifest.version}")


def advance(accepted: Acceptance, manifest: Manifest, manifest_sha256: str) -> Acceptance:
    """What the host remembers after accepting `manifest`: the highest version never goes down."""
    newest = max(filter(None, [accepted.newest_created, manifest.created]))
    if accepted.highest_version is not None and parse_version(manifest.version) < parse_version(
            accepted.highest_version):
        return Acceptance(accepted.highest_version, accepted.highest_manifest_sha256, newest)
    return Acceptance(manifest.version, manifest_sha256, newest)
