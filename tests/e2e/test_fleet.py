"""The Ansible rollout against three test hosts (network namespaces with their own sshd and prefix) behind
HAProxy: a full rollout, an idempotent re-run, a tampered bundle, a disk that fills, a rolling update under
load, a version that fails its health check, an unreachable host, a bundle not signed by the trusted key on a
host without airgap. The cases run in order on one fleet and one set of bundles (built once by the real
`airgap build` with one pip resolution, llama-cpp-python[server] from the wheel cache)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KeyPair, make_keys
from tests.e2e.fleet_support import (
    Bundles,
    Fleet,
    Load,
    PlaybookRun,
    build_bundles,
    chat,
    fleet_session,
    have_tools,
    prefix_snapshot,
)

# the canary alone, then the other two side by side (the cases that count hosts "not reached" use the default:
# one host at a time)
CANARY_THEN_THE_REST = [1, 2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, keys: KeyPair) -> Bundles:
    return build_bundles(tmp_path_factory.mktemp("fleet-bundles"), wheelhouse=wheelhouse, private_key=keys.private,
                         public_key=keys.public)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_session(tmp_path_factory.getbasetemp(), count=3) as made:
        yield made


def rollout(fleet: Fleet, bundle: Path, public_key: Path, inventory: Path | None = None,
            **extra: object) -> PlaybookRun:
    run = fleet.playbook("rollout.yml", inventory or fleet.inventory(),
                         {"airgap_bundle": str(bundle), "airgap_trust": str(public_key), **extra})
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
    run = rollout(fleet, bundles.v1, bundles.public_key, airgap_serial=CANARY_THEN_THE_REST)
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
    run = rollout(fleet, bundles.v1, bundles.public_key, airgap_serial=CANARY_THEN_THE_REST)
    assert run.code == 0, run.output[-4000:]
    recap = run.recap()
    assert set(recap) == {"localhost", "lb", "h1", "h2", "h3"}
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    assert [run.outcome(h.name)["outcome"] for h in fleet.hosts] == ["unchanged"] * 3


def test_a_tampered_bundle_is_refused_on_the_canary_and_nothing_changes(fleet: Fleet, bundles: Bundles) -> None:
    before = [prefix_snapshot(h) for h in fleet.hosts]
    run = rollout(fleet, bundles.tampered, bundles.public_key)
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
        run = rollout(fleet, bundles.v2, bundles.public_key)
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
        run = rollout(fleet, bundles.v2, bundles.public_key)
    assert run.code == 0, run.output[-4000:]
    assert [run.outcome(h.name)["outcome"] for h in fleet.hosts] == ["unchanged", "updated", "updated"]
    assert all(h.active_version() == "1.1.0" for h in fleet.hosts)
    print(f"rolling update of 2 hosts: {len(load.results)} requests, {load.lost} lost, {run.seconds:.1f} s")
    assert len(load.results) >= 20 and load.lost == 0
    # h2 got 1.1.0's volumes in the rollout its full disk stopped: they are not copied again
    copies = run.task_results("Copy the bundle's volumes")
    assert [line.split(" =>")[0] for line in copies if "[h2]" in line] == ["ok: [h2]"] * 2, copies
    assert [line.split(" =>")[0] for line in copies if "[h3]" in line] == ["changed: [h3]"] * 2, copies
    view = fleet_table(fleet, fleet.inventory())["json"]
    assert view["common"] == "fleet 1.1.0" and view["differing"] == []


def test_a_version_that_fails_its_health_check_is_rolled_back_and_never_got_traffic(fleet: Fleet,
                                                                                    bundles: Bundles) -> None:
    h1 = fleet.hosts[0]
    before = {name: dict(row) for name, row in fleet.lb_stats().items()}
    with Load(fleet.lb_url) as load:
        run = rollout(fleet, bundles.broken, bundles.public_key, inventory=fleet.inventory(health_timeout=20))
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
    run = rollout(fleet, bundles.v2, bundles.public_key, inventory=inventory)
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


def test_a_bundle_not_signed_by_the_trusted_key_is_refused_before_airgap_is_installed(
        fleet: Fleet, bundles: Bundles, tmp_path: Path) -> None:
    fresh = fleet.add_host(5, sshd=True)
    fleet.hosts.append(fresh)
    other = make_keys(tmp_path, "other")
    run = rollout(fleet, bundles.v1, other.public, inventory=fleet.inventory([fresh], lb=False))
    assert run.code != 0
    refused = run.outcome("h5")
    assert refused["outcome"] == "failed", refused
    assert "h5 refused the bundle before installing airgap, nothing changed" in refused["reason"], refused
    assert "expected manifest.json signed by the release key" in refused["reason"], refused
    assert not fresh.tool.exists() and not fresh.prefix.exists()
    assert not (fresh.incoming / hashlib.sha256(bundles.v1.read_bytes()).hexdigest()).exists()
