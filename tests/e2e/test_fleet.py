"""The Ansible rollout against three test hosts (network namespaces with their own sshd and prefix) behind
HAProxy: a full rollout, an idempotent re-run, a tampered bundle, a disk that fills, a rolling update under
load, a version that fails its health check, an unreachable host. The cases run in order on one fleet and one
set of bundles (built once by the real `airgap build`, llama-cpp-python[server] from the wheel cache)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import KeyPair
from tests.e2e.fleet_support import Fleet, Load, chat, fleet_session, have_tools, prefix_snapshot
from tests.e2e.serve_support import write_tiny_gguf
from tests.support import airgap

pytestmark = [pytest.mark.slow, pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))]


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path  # an update drop on top of v1
    broken: Path  # a drop on top of v2 whose model llama.cpp cannot load
    tampered: Path  # v2 with one byte of its model changed
    keys: KeyPair


def write_broken_gguf(path: Path) -> Path:
    """The tiny model with one tensor of the wrong shape: a valid GGUF header, a model llama.cpp refuses."""
    write_tiny_gguf(path, seed=7)
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    tensor.field.parts[3][0] = 32  # first dimension 64 -> 32 (the data is left as it was)
    reader.data.flush()
    return path


def _build(spec: Path, version: str, model: Path, wheelhouse: Path, keys: KeyPair, out: Path,
           base: Path | None = None) -> Path:
    spec.write_text(
        f'[bundle]\nname = "fleet"\nversion = "{version}"\n\n[[models]]\nid = "tiny"\npath = "{model}"\n\n'
        f'[python]\nrequirements = ["llama-cpp-python[server]==0.3.36"]\nfind_links = ["{wheelhouse}"]\n')
    args = ["build", spec, "--key", keys.private, "-o", out, "-q", *(["--base", base] if base else [])]
    built = airgap(*args, timeout=3600)
    assert built.code == 0, built.stderr[-3000:]
    return Path(built.stdout.split()[-1])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, keys: KeyPair) -> Bundles:
    folder = tmp_path_factory.mktemp("fleet-bundles")
    spec = folder / "fleet.toml"
    v1 = _build(spec, "1.0.0", write_tiny_gguf(folder / "m1.gguf", seed=1), wheelhouse, keys, folder / "v1")
    v2 = _build(spec, "1.1.0", write_tiny_gguf(folder / "m2.gguf", seed=2), wheelhouse, keys, folder / "v2", v1)
    broken = _build(spec, "1.2.0", write_broken_gguf(folder / "m3.gguf"), wheelhouse, keys, folder / "v3", v2)
    data = bytearray(v2.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the model, the one big member of this drop
    tampered = folder / "tampered" / v2.name
    tampered.parent.mkdir()
    tampered.write_bytes(bytes(data))
    return Bundles(v1, v2, broken, tampered, keys)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_session(tmp_path_factory.getbasetemp(), count=3) as made:
        yield made


def rollout(fleet: Fleet, bundle: Path, keys: KeyPair, inventory: Path | None = None, **extra: object) -> object:
    run = fleet.playbook("rollout.yml", inventory or fleet.inventory(),
                         {"airgap_bundle": str(bundle), "airgap_trust": str(keys.public), **extra})
    print(run.output[-6000:])
    return run


def fleet_table(fleet: Fleet, inventory: Path) -> dict[str, object]:
    run = fleet.playbook("fleet.yml", inventory, {"airgap_fleet_dir": str(fleet.root / "fleet-report")})
    assert run.code == 0, run.output[-4000:]
    done = subprocess.run([f"{sys.prefix}/bin/airgap", "fleet-report", str(fleet.root / "fleet-report" / "hosts"),
                           "--json"], capture_output=True, text=True, check=True)
    return {"json": json.loads(done.stdout), "output": run.output}


def test_first_rollout_installs_airgap_from_the_bundle_and_serves_behind_the_lb(fleet: Fleet, bundles: Bundles
                                                                                 ) -> None:
    assert not any(h.tool.exists() for h in fleet.hosts)
    run = rollout(fleet, bundles.v1, bundles.keys)
    assert run.code == 0, run.output[-4000:]
    for host in fleet.hosts:
        assert run.outcome(host.name)["outcome"] == "updated"
        assert host.active_version() == "1.0.0"
        assert (host.tool / "bin" / "airgap").exists()
        assert chat(host.base_url)[0] == 200
    served_by = {chat(fleet.lb_url)[1] for _ in range(12)}
    assert served_by == {"h1", "h2", "h3"}
    assert all(row["status"] == "UP" for row in fleet.lb_stats().values())


def test_a_rerun_on_an_up_to_date_fleet_changes_nothing(fleet: Fleet, bundles: Bundles) -> None:
    run = rollout(fleet, bundles.v1, bundles.keys)
    assert run.code == 0, run.output[-4000:]
    recap = run.recap()
    assert set(recap) == {"localhost", "lb", "h1", "h2", "h3"}
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    assert [run.outcome(h.name)["outcome"] for h in fleet.hosts] == ["unchanged"] * 3


def test_a_tampered_bundle_is_refused_on_the_canary_and_nothing_changes(fleet: Fleet, bundles: Bundles) -> None:
    before = [prefix_snapshot(h) for h in fleet.hosts]
    run = rollout(fleet, bundles.tampered, bundles.keys)
    assert run.code != 0
    canary = run.outcome("h1")
    assert canary["outcome"] == "failed" and "h1 refused the bundle, nothing changed" in canary["reason"]
    assert "airgap: error:" in canary["reason"], canary["reason"]
    assert [run.outcome(h)["outcome"] for h in ("h2", "h3")] == ["not reached", "not reached"]
    assert [prefix_snapshot(h) for h in fleet.hosts] == before
    sha = hashlib.sha256(bundles.tampered.read_bytes()).hexdigest()
    assert not (fleet.hosts[0].incoming / sha).exists()
    assert not any((h.incoming / sha).exists() for h in fleet.hosts[1:])
    assert all(row["status"] == "UP" for row in fleet.lb_stats().values())
    assert {chat(fleet.lb_url)[0] for _ in range(6)} == {200}


def test_a_host_whose_disk_fills_fails_keeps_serving_and_the_rollout_stops(fleet: Fleet, bundles: Bundles) -> None:
    h1, h2, h3 = fleet.hosts
    fleet.fill_disk(h2)
    try:
        run = rollout(fleet, bundles.v2, bundles.keys)
    finally:
        fleet.free_disk(h2)
    assert run.code != 0
    assert run.outcome("h1")["outcome"] == "updated" and h1.active_version() == "1.1.0"
    failed = run.outcome("h2")
    assert failed["outcome"] == "failed", failed
    assert "Install the bundle" in failed["reason"] and "still serving fleet 1.0.0" in failed["reason"], failed
    assert "space" in failed["reason"].lower(), failed["reason"]
    assert h2.active_version() == "1.0.0" and chat(h2.base_url)[0] == 200
    assert run.outcome("h3")["outcome"] == "not reached" and h3.active_version() == "1.0.0"
    assert fleet.lb_stats()["h2"]["status"] == "UP"


def test_a_rolling_update_behind_the_lb_loses_no_request(fleet: Fleet, bundles: Bundles) -> None:
    with Load(fleet.lb_url) as load:
        run = rollout(fleet, bundles.v2, bundles.keys)
    assert run.code == 0, run.output[-4000:]
    assert [run.outcome(h.name)["outcome"] for h in fleet.hosts] == ["unchanged", "updated", "updated"]
    assert all(h.active_version() == "1.1.0" for h in fleet.hosts)
    print(f"rolling update of 2 hosts: {len(load.results)} requests, {load.lost} lost, {run.seconds:.1f} s")
    assert len(load.results) >= 20 and load.lost == 0
    view = fleet_table(fleet, fleet.inventory())["json"]
    assert view["common"] == "fleet 1.1.0" and view["differing"] == []


def test_a_version_that_fails_its_health_check_is_rolled_back_and_never_got_traffic(fleet: Fleet,
                                                                                    bundles: Bundles) -> None:
    h1 = fleet.hosts[0]
    before = {name: dict(row) for name, row in fleet.lb_stats().items()}
    with Load(fleet.lb_url) as load:
        run = rollout(fleet, bundles.broken, bundles.keys, inventory=fleet.inventory(health_timeout=20))
    assert run.code != 0
    failed = run.outcome("h1")
    assert failed["outcome"] == "failed" and "rolled back to fleet 1.1.0" in failed["reason"], failed
    assert "/health did not answer 200" in failed["reason"], failed
    assert [run.outcome(h)["outcome"] for h in ("h2", "h3")] == ["not reached", "not reached"]
    assert h1.active_version() == "1.1.0" and chat(h1.base_url)[0] == 200
    assert "cannot load the models" in (h1.run_dir / "serve.log").read_text()
    after = fleet.lb_stats()["h1"]
    # every request sent to a server that does not answer is a connection error, a retry or a redispatch
    for counter in ("econ", "eresp", "wretr", "wredis", "hrsp_5xx"):
        assert after[counter] == before["h1"][counter], (counter, before["h1"][counter], after[counter])
    assert after["status"] == "UP"
    assert load.lost == 0 and len(load.results) >= 10


def test_an_unreachable_host_is_named_in_the_reports(fleet: Fleet, bundles: Bundles) -> None:
    ghost = fleet.add_host(4, sshd=False)
    fleet.hosts.append(ghost)
    inventory = fleet.inventory()
    run = rollout(fleet, bundles.v2, bundles.keys, inventory=inventory)
    assert run.code != 0
    assert [run.outcome(h)["outcome"] for h in ("h1", "h2", "h3")] == ["unchanged"] * 3
    assert run.outcome("h4")["outcome"] == "unreachable", run.report
    assert "h4: unreachable" in run.output
    table = fleet_table(fleet, inventory)
    view = table["json"]
    assert view["differing"] == ["h4"]
    ghost_row = next(h for h in view["hosts"] if h["host"] == "h4")
    assert ghost_row["error"].startswith("unreachable") and ghost_row["version"] is None
    assert all(h["version"] == "1.1.0" for h in view["hosts"] if h["host"] != "h4")
