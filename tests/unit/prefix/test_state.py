"""Persisted state: atomic writes, install steps that survive a crash, the host's time floor, root files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from airgap.errors import InstallError
from airgap.format.manifest import BaseRef
from airgap.prefix.state import (
    STEP_READY,
    Generation,
    InstalledModel,
    Pending,
    State,
    acceptance_record,
    load_state,
    remove_roots_above,
    root_path,
    save_state,
    swap_symlink,
    sync_filesystem,
    write_atomic,
    write_root,
)
from airgap.trust.acceptance import Acceptance

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def generation(version: str, sha: str = "a" * 64) -> Generation:
    return Generation(id=f"x-{version}-{sha[:12]}", name="x", version=version, manifest_sha256=sha,
                      created="2030-01-01T00:00:00Z", installed_at="2030-01-01T00:00:00Z",
                      models=(InstalledModel("m", "models/m/w", 3, "c" * 64),), overrides=("allow-expired",))


def test_state_round_trips_with_a_pending_install(tmp_path: Path) -> None:
    gen = generation("1.1.0")
    state = State(active="x-1.0.0", generations=(generation("1.0.0", "b" * 64),), history=("x-1.0.0",),
                  pending=Pending(gen.id, STEP_READY, gen, acceptance_record(Acceptance("1.1.0", "a" * 64, T0)), 3),
                  trusted_root=2)
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_older_state_file_with_a_plain_pending_id_still_loads(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, "pending": "x-1.0.0-abc"}))
    assert load_state(tmp_path).pending == Pending("x-1.0.0-abc")


def _saved(tmp_path: Path) -> dict[str, object]:
    gen = generation("1.1.0")
    save_state(tmp_path, State(active=gen.id, generations=(gen,), history=(gen.id,), trusted_root=1,
                               pending=Pending("x-1.2.0", generation=gen)))
    return dict(json.loads((tmp_path / "state.json").read_text()))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["generations"][0].update(id=1), "invalid state generations[0]: field 'id' must be a string, found 1"),
    (lambda d: d["generations"][0]["models"][0].update(size=-3),
     "invalid state generations[0] models[0]: field 'size' must not be negative, found -3"),
    (lambda d: d["generations"][0].update(colour="red"),
     "invalid state generations[0]: expected only the fields created, id, installed_at, manifest_sha256, models, "
     "name, overrides, version, found 'colour'"),
    (lambda d: d.update(history="x"), "invalid state: field 'history' must be a list of strings, found 'x'"),
    (lambda d: d.update(trusted_root=True), "invalid state: field 'trusted_root' must be an integer, found True"),
    (lambda d: d.update(generations={}), "invalid state: field 'generations' must be a list, found {}"),
    (lambda d: d["pending"].update(accepted={"highest_version": 2}),
     "invalid state pending: field 'accepted' must be an object of strings, found {'highest_version': 2}"),
    (lambda d: d["pending"]["generation"].update(version=None),
     "invalid state pending generation: field 'version' must be a string, found None"),
    (lambda d: d.update(time_floor_resets=[{"at": "2030-01-01T00:00:00Z"}]),
     "invalid state time_floor_resets[0]: field 'previous_floor' must be a string, found None"),
    (lambda d: d.update(pending=[1]), "invalid state pending: expected a JSON object, found list"),
])
def test_malformed_state_is_an_install_error_that_names_the_field(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    document = _saved(tmp_path)
    change(document)
    (tmp_path / "state.json").write_text(json.dumps(document))
    with pytest.raises(InstallError) as refused:
        load_state(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'state.json'}: installed state is malformed: {message}"


def test_a_state_file_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(InstallError) as refused:
        load_state(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'state.json'}: expected state format 1, found 2"


def test_committing_makes_the_pending_version_active_in_one_value() -> None:
    old, new = generation("1.0.0", "b" * 64), generation("1.1.0")
    record = acceptance_record(Acceptance("1.1.0", "a" * 64, T0))
    state = State(active=old.id, generations=(old,), history=(old.id,), trusted_root=1,
                  pending=Pending(new.id, STEP_READY, new, record, 2))
    done = state.committed()
    assert done.active == new.id and done.pending is None
    assert done.generations == (old, new) and done.history == (old.id, new.id)
    assert done.accepted == {"x": record} and done.trusted_root == 2
    assert done.acceptance("x") == Acceptance("1.1.0", "a" * 64, T0)
    assert State(pending=Pending(new.id, STEP_READY, new, record, None), trusted_root=4).committed().trusted_root == 4
    with pytest.raises(InstallError):
        State(pending=Pending(new.id)).committed()


def test_time_floor_is_the_newest_creation_time_of_any_bundle_name() -> None:
    later = datetime(2030, 5, 1, tzinfo=UTC)
    state = State().with_accepted("x", Acceptance("1", "a" * 64, T0)).with_accepted("y", Acceptance("2", "b" * 64,
                                                                                                    later))
    assert state.time_floor() == later
    assert State().time_floor() is None


def test_installed_versions_and_bases() -> None:
    state = State(generations=(generation("1.0.0"), generation("1.1.0", "b" * 64)))
    assert state.installed_versions("x") == {"1.0.0": "a" * 64, "1.1.0": "b" * 64}
    assert state.installed_versions("y") == {}
    assert BaseRef("x", "1.1.0", "b" * 64) in state.installed_bases()


def test_uncommitted_root_files_are_removed(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        write_root(tmp_path, version, b"{}")
    remove_roots_above(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "trust").iterdir()) == ["root.1.json", "root.2.json"]
    remove_roots_above(tmp_path, None)
    assert not root_path(tmp_path, 1).exists()


def test_atomic_write_and_symlink_swap(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    swap_symlink(tmp_path / "current", "versions/a")
    swap_symlink(tmp_path / "current", "versions/b")
    assert os.readlink(tmp_path / "current") == "versions/b"
    sync_filesystem(tmp_path)


def test_resetting_the_time_floor_lowers_it_to_the_clock_and_is_recorded(tmp_path: Path) -> None:
    future = datetime(2099, 1, 1, tzinfo=UTC)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    state = State().with_accepted("x", Acceptance("1.0", "a" * 64, future))
    state = state.with_accepted("y", Acceptance("2.0", "b" * 64, datetime(2029, 1, 1, tzinfo=UTC)))
    reset = state.with_time_floor_reset(now)
    assert reset.time_floor() == now and reset.acceptance("x").highest_version == "1.0"
    assert reset.acceptance("y") == state.acceptance("y")
    assert [(r.at, r.previous_floor) for r in reset.time_floor_resets] == [("2030-01-01T00:00:00Z",
                                                                             "2099-01-01T00:00:00Z")]
    assert reset.with_time_floor_reset(now) == reset  # nothing above the clock: nothing to record
    save_state(tmp_path, reset)
    assert load_state(tmp_path) == reset
