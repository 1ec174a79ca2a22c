"""Smoke test of the benchmark at a tiny size: every measurement runs and lands in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.mark.slow
def test_bench_runs_every_measurement_at_a_tiny_size(tmp_path: Path) -> None:
    """From an empty wheelhouse, as on a fresh machine: the bench fills it from airgap's own dependencies."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--size", "8MiB", "--reps", "1", "--json", str(out),
         "--workdir", str(tmp_path), "--wheelhouse", str(tmp_path / "empty-wheelhouse")],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["payload_bytes"] >= 8 << 20
    cases = result["cases"]
    for name in ["airgap build", "tar -I 'zstd -T0' -cf", "airgap verify", "sha256sum -c", "openssl dgst -sha256",
                 "airgap install", "zstd -dc | tar -x", "careful manual + venv + pip", "airgap install, payload only",
                 "careful manual", "airgap build, packing only"]:
        assert cases[name]["median_wall_s"] > 0, name
        assert cases[name]["bytes"] == result["payload_bytes"], name
    install = cases["airgap install"]["samples"][0]
    assert 0 < install["phases"]["venv_pip_s"] < install["wall_s"]
    assert install["phases"]["self_peak_rss_kb"] > 0
    compared = {(c["ours"], c["baseline"]) for c in result["comparisons"]}
    assert ("airgap verify", "sha256sum -c") in compared
    assert ("airgap install", "careful manual + venv + pip") in compared
    assert "| verify | airgap verify |" in done.stdout
    assert not list(tmp_path.glob("airgap-bench-*")), "the work folder was left behind"
