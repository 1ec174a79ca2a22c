"""`airgap fleet-report`: host records holding real `airgap status --json` output from real installs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.update_support import T0, airgap, install, make_bundle, new_key


def _record(folder: Path, host: str, prefix: Path | None, error: str | None = None) -> None:
    status = None
    if prefix is not None:
        done = airgap("status", "--prefix", prefix, "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
    (folder / f"{host}.json").write_text(json.dumps({"host": host, "status": status, "error": error}))


def test_the_table_names_the_active_version_of_each_host_and_the_ones_that_differ(tmp_path: Path) -> None:
    key = new_key()
    v1 = make_bundle(tmp_path, "1.0.0", {"models/m/m.gguf": b"one"}, [key])
    v2 = make_bundle(tmp_path, "1.1.0", {"models/m/m.gguf": b"two"}, [key])
    records = tmp_path / "hosts"
    records.mkdir()
    for host, bundles in {"a": [v1, v2], "b": [v1, v2], "c": [v1]}.items():
        prefix = tmp_path / host
        for bundle in bundles:
            install(bundle, prefix, trust=[key], clock=T0)
        _record(records, host, prefix)
    _record(records, "d", None, "unreachable: Failed to connect to the host via ssh")

    done = airgap("fleet-report", records, "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["common"] == "x 1.1.0"
    assert view["differing"] == ["c", "d"]
    rows = {h["host"]: h for h in view["hosts"]}
    assert rows["a"]["version"] == "1.1.0" and rows["a"]["installed"] == ["1.0.0", "1.1.0"]
    assert rows["c"]["version"] == "1.0.0" and rows["c"]["differs"]
    assert rows["d"]["version"] is None and rows["d"]["error"].startswith("unreachable")

    text = airgap("fleet-report", records).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["host", "active", "manifest", "installed", "note"]
    assert lines[3].split()[:3] == ["c", "x", "1.0.0"] and lines[3].endswith("differs")
    assert "unreachable: Failed to connect" in lines[4]
    assert lines[-1] == "4 host(s); most run x 1.1.0; differing: c, d"


def test_a_malformed_record_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"host": "a", "status": {"active": None}}))
    done = airgap("fleet-report", tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip() == (f"airgap: error: {tmp_path / 'a.json'}: expected a host record with the output "
                                   "of `airgap status --json`, found a record without 'generations'")


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    done = airgap("fleet-report", tmp_path)
    assert done.stderr.strip() == f"airgap: error: expected host records (*.json) in {tmp_path}, found none"
