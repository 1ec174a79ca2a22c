"""The prefix layout as documented (README, FORMAT.md): each name, once."""

from __future__ import annotations

from pathlib import Path

from airgap.prefix.paths import Prefix


def test_every_name_under_a_prefix() -> None:
    p = Prefix(Path("/opt/airgap"))
    assert p.current == Path("/opt/airgap/current") and p.active_venv == Path("/opt/airgap/current/venv")
    assert p.version("x-1-abc") == Path("/opt/airgap/versions/x-1-abc")
    assert Prefix.current_target("x-1-abc") == "versions/x-1-abc"  # relative: the prefix can move
    assert p.blob("ab" * 32) == Path("/opt/airgap/store/sha256") / ("ab" * 32)
    assert p.staging_for("g") == Path("/opt/airgap/staging/g")
    assert p.root_file(3) == Path("/opt/airgap/trust/root.3.json")
    assert (p.state_file, p.lock_file, p.audit_file) == (
        Path("/opt/airgap/state.json"), Path("/opt/airgap/.lock"), Path("/opt/airgap/audit.jsonl"))
    assert set(Prefix.PRIVATE_NAMES) >= {"state.json", ".lock", "staging", "store", "versions", "trust"}
