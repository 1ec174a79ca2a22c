"""The audit trail through the real CLI: every command that uses a prefix appends exactly one record."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Built
from tests.support import airgap, write_spec


def records(prefix: Path) -> list[dict[str, Any]]:
    result = airgap("audit", "--prefix", prefix, "--json")
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def run_and_count(prefix: Path, *args: str | Path) -> tuple[Any, dict[str, Any]]:
    """Run one command; it must have appended exactly one record, which is returned."""
    before = len(records(prefix)) if (prefix / "audit.jsonl").exists() else 0
    result = airgap(*args)
    after = records(prefix)
    assert len(after) == before + 1, (args, result.stderr, after[before:])
    return result, after[-1]


def tampered(bundle: Path, folder: Path) -> Path:
    copy = folder / "bad" / bundle.name
    copy.parent.mkdir()
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.slow
def test_every_prefix_command_appends_exactly_one_record(built: Built, bundle_copy: Path, tmp_path: Path,
                                                        tiny_model: Path, wheelhouse: Path) -> None:
    prefix = tmp_path / "prefix"
    pub, key = built.keys.public, built.keys.private
    manifest = json.loads(airgap("inspect", bundle_copy, "--json").stdout)

    result, rec = run_and_count(prefix, "install", bundle_copy, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code == 0, result.stderr
    assert (rec["command"], rec["outcome"]) == ("install", "ok")
    assert rec["bundle"]["name"] == "tiny-chat" and rec["bundle"]["version"] == "1.0.0"
    assert rec["bundle"]["manifest_sha256"] == manifest["manifest_sha256"]
    assert rec["signers"] == manifest["signatures"] and rec["prev"] is None
    assert rec["operator"] == {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name}
    assert rec["time_floor"] == manifest["created"]  # the host's trusted-time floor after accepting it

    bad = tampered(bundle_copy, tmp_path)
    result, rec = run_and_count(prefix, "install", bad, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code != 0
    assert (rec["command"], rec["outcome"]) == ("install", "refused")
    assert rec["reason"] == result.error_line.removeprefix("airgap: error: ")
    assert rec["bundle"]["name"] == "tiny-chat" and rec["bundle"]["path"] == str(bad)

    result, rec = run_and_count(prefix, "verify", bundle_copy, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code == 0 and (rec["command"], rec["outcome"]) == ("verify", "ok")
    result, rec = run_and_count(prefix, "verify", bad, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code != 0 and (rec["command"], rec["outcome"]) == ("verify", "refused")

    # a verify that names no prefix and trusts a key file touches no prefix: nothing recorded
    count = len(records(prefix))
    assert airgap("verify", bundle_copy, "--trust", pub, "-q").code == 0
    assert len(records(prefix)) == count

    result, rec = run_and_count(prefix, "rollback", "--prefix", prefix)
    assert result.code != 0 and (rec["command"], rec["outcome"]) == ("rollback", "refused")
    assert rec["reason"].startswith("no earlier version to roll back to")

    spec = write_spec(tmp_path, version="1.1.0", model=tiny_model, wheelhouse=wheelhouse)
    newer = Path(airgap("build", spec, "--key", key, "-o", tmp_path / "dist", "-q").stdout.split()[-1])
    result, rec = run_and_count(prefix, "install", newer, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code == 0 and rec["bundle"]["version"] == "1.1.0"
    result, rec = run_and_count(prefix, "install", bundle_copy, "--trust", pub, "--prefix", prefix, "-q")
    assert result.code != 0 and rec["outcome"] == "refused"  # a downgrade, and an operator sees the attempt
    result, rec = run_and_count(prefix, "rollback", "--prefix", prefix)
    assert result.code == 0 and (rec["outcome"], rec["bundle"]["version"]) == ("ok", "1.0.0")
    assert rec["details"]["from"]["version"] == "1.1.0"

    root = tmp_path / "root.json"
    assert airgap("trust", "create", root, "--root-key", pub, "--release-key", pub, "--key", key).code == 0
    result, rec = run_and_count(prefix, "trust", "init", root, "--prefix", prefix)
    assert result.code == 0 and (rec["command"], rec["outcome"]) == ("trust init", "ok")
    assert rec["details"]["root_version"] == 1
    other = tmp_path / "other.json"
    assert airgap("trust", "create", other, "--root-key", pub, "--release-key", pub, "--key", key,
                  "--expires-days", "30").code == 0
    result, rec = run_and_count(prefix, "trust", "init", other, "--prefix", prefix)
    assert result.code != 0 and rec["outcome"] == "refused" and rec["overrides"] == []
    result, rec = run_and_count(prefix, "trust", "init", other, "--prefix", prefix, "--force")
    assert result.code == 0 and rec["overrides"] == ["force"]

    result, rec = run_and_count(prefix, "serve", "--prefix", prefix, "--host", "0.0.0.0")
    assert result.code != 0 and (rec["command"], rec["outcome"]) == ("serve", "refused")
    assert "an API key is required" in rec["reason"]

    # read-only commands record nothing
    count = len(records(prefix))
    for args in (("status", "--prefix", prefix), ("plan", "--prefix", prefix), ("audit", "--prefix", prefix)):
        airgap(*args)
    assert len(records(prefix)) == count

    checked = airgap("audit", "verify", "--prefix", prefix)
    assert checked.code == 0, checked.stderr
    assert checked.stdout.startswith(f"OK: {count} record(s) under {prefix}, chain intact")
    shown = airgap("audit", "--prefix", prefix)
    assert len(shown.stdout.splitlines()) == count and " refused " in shown.stdout

    lines = (prefix / "audit.jsonl").read_bytes().splitlines(keepends=True)
    del lines[3]
    (prefix / "audit.jsonl").write_bytes(b"".join(lines))
    broken = airgap("audit", "verify", "--prefix", prefix)
    assert broken.code != 0
    assert broken.error_line == "airgap: error: record 4 is missing: line 4 holds record 5"
    # the damage stays visible: the next record chains to the sound last one, the gap is still named
    assert airgap("rollback", "--prefix", prefix).code == 0
    assert airgap("audit", "verify", "--prefix", prefix).error_line == broken.error_line


def test_a_damaged_last_record_refuses_the_command_before_it_runs(bundle_copy: Path, built: Built,
                                                                  tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "audit.jsonl").write_bytes(b'{"seq": 1, "edited": true}\n')
    result = airgap("install", bundle_copy, "--trust", built.keys.public, "--prefix", prefix, "-q")
    assert result.code != 0
    assert "audit.jsonl is damaged or was edited, so no record can be chained to it" in result.error_line
    assert not (prefix / "current").exists()
