"""Acceptance rules: expiry against trusted time, anti-rollback, equal-version replay, drops' base."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from airgap.errors import FormatError, PolicyError, TrustError
from airgap.format.manifest import BaseRef, FileEntry, Manifest
from airgap.trust.acceptance import (
    NO_OVERRIDES,
    Acceptance,
    Overrides,
    advance,
    check_acceptance,
    check_base,
    check_root_fresh,
    trusted_now,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
SHA = "a" * 64
OTHER = "b" * 64


def manifest(version: str = "1.1.0", *, created: datetime = T0, days: int = 180, base: BaseRef | None = None,
             absent: bool = False) -> Manifest:
    entry = FileEntry(path="models/m/w.gguf", size=10, sha256="c" * 64, kind="model",
                      storage="absent" if absent else "raw", stored_size=0 if absent else 10)
    return Manifest(name="x", version=version, created=created, expires=created + timedelta(days=days),
                    tool_version="t", files=(entry,), base=base)


def test_trusted_now_never_goes_below_the_floor() -> None:
    assert trusted_now(T0, None) == T0
    assert trusted_now(T0, T0 + timedelta(days=3)) == T0 + timedelta(days=3)
    assert trusted_now(T0 + timedelta(days=5), T0) == T0 + timedelta(days=5)


def test_fresh_first_bundle_is_accepted() -> None:
    assert check_acceptance(manifest(), SHA, Acceptance(), T0, NO_OVERRIDES) == []


def test_expiry_and_its_override() -> None:
    late = T0 + timedelta(days=181)
    with pytest.raises(PolicyError, match="expired at 2030-06-30T00:00:00Z"):
        check_acceptance(manifest(), SHA, Acceptance(), late, NO_OVERRIDES)
    assert check_acceptance(manifest(), SHA, Acceptance(), late, Overrides(allow_expired=True)) == ["allow-expired"]


def test_lower_version_refused_unless_allowed() -> None:
    accepted = Acceptance("1.2.0", SHA, T0)
    with pytest.raises(PolicyError, match=r"downgrade refused: x 1\.2\.0 was accepted, this bundle is 1\.1\.0"):
        check_acceptance(manifest(), OTHER, accepted, T0, NO_OVERRIDES)
    assert check_acceptance(manifest(), OTHER, accepted, T0, Overrides(allow_downgrade=True)) == ["allow-downgrade"]


def test_allow_expired_still_runs_the_rollback_checks() -> None:
    with pytest.raises(PolicyError, match="downgrade refused"):
        check_acceptance(manifest(), OTHER, Acceptance("1.2.0", SHA, T0), T0 + timedelta(days=400),
                         Overrides(allow_expired=True))


def test_equal_version_other_content_refused_even_with_overrides() -> None:
    everything = Overrides(allow_downgrade=True, allow_expired=True)
    with pytest.raises(PolicyError, match="already accepted with other content"):
        check_acceptance(manifest("1.2.0"), OTHER, Acceptance("1.2.0", SHA, T0), T0, everything)
    with pytest.raises(PolicyError, match="installed with other content"):
        check_acceptance(manifest("1.1.0"), OTHER, Acceptance("1.2.0", SHA, T0), T0, everything, {"1.1.0": SHA})
    with pytest.raises(PolicyError, match="installed with other content"):  # PEP 440 equal, spelt otherwise
        check_acceptance(manifest("1.1"), OTHER, Acceptance(), T0, NO_OVERRIDES, {"1.1.0": SHA})
    assert check_acceptance(manifest("1.2.0"), SHA, Acceptance("1.2.0", SHA, T0), T0, NO_OVERRIDES) == []


def test_versions_compare_as_versions_not_text() -> None:
    assert check_acceptance(manifest("1.10.0"), OTHER, Acceptance("1.9.0", SHA, T0), T0, NO_OVERRIDES) == []
    with pytest.raises(PolicyError, match="not a version number"):
        check_acceptance(manifest("banana"), OTHER, Acceptance("1.9.0", SHA, T0), T0, NO_OVERRIDES)


def test_root_freshness() -> None:
    assert check_root_fresh(2, T0 + timedelta(days=1), T0, NO_OVERRIDES) == []
    with pytest.raises(TrustError, match="trusted root version 2 expired"):
        check_root_fresh(2, T0, T0, NO_OVERRIDES)
    assert check_root_fresh(2, T0, T0, Overrides(allow_expired=True)) == ["allow-expired-root"]


def test_base_must_be_installed_exactly() -> None:
    base = BaseRef("x", "1.0.0", SHA)
    drop = manifest(base=base, absent=True)
    check_base(drop, [BaseRef("x", "0.9.0", OTHER), base])
    with pytest.raises(PolicyError, match=r"on top of x 1.0.0 \(manifest aaaaaaaaaaaaaaaa\), which is not installed"):
        check_base(drop, [])
    with pytest.raises(PolicyError, match=r"installed 1\.0\.0 from another build"):
        check_base(drop, [replace(base, manifest_sha256=OTHER)])
    with pytest.raises(FormatError, match="names no base version"):
        check_base(manifest(absent=True), [base])
    check_base(manifest(), [])


def test_advance_keeps_the_highest_version_and_the_newest_time() -> None:
    first = advance(Acceptance(), manifest("1.2.0"), SHA)
    assert first == Acceptance("1.2.0", SHA, T0)
    later = T0 + timedelta(days=9)
    downgraded = advance(first, manifest("1.1.0", created=later), OTHER)
    assert downgraded == Acceptance("1.2.0", SHA, later)
    assert advance(downgraded, manifest("1.3.0"), OTHER) == Acceptance("1.3.0", OTHER, later)


def test_a_creation_time_far_ahead_of_the_clock_is_refused_unless_overridden() -> None:
    from airgap.trust.acceptance import check_created

    assert check_created(manifest(created=T0 + timedelta(hours=23)), T0, NO_OVERRIDES) == []
    future = manifest(created=datetime(2099, 1, 1, tzinfo=UTC))
    with pytest.raises(PolicyError, match=r"claims it was created at 2099-01-01T00:00:00Z, more than 1 day ahead of "
                                          r"this host's clock \(2030-01-01T00:00:00Z\)"):
        check_created(future, T0, NO_OVERRIDES)
    assert check_created(future, T0, Overrides(allow_future_created=True)) == ["allow-future-created"]


def test_a_drop_naming_a_base_of_another_bundle_name_is_refused() -> None:
    other = BaseRef("y", "1.0.0", SHA)
    with pytest.raises(PolicyError, match="update drop x 1.1.0 names a base of another bundle, y 1.0.0"):
        check_base(manifest(base=other, absent=True), [other])
