#!/usr/bin/env python3
"""Fleet benchmark: the Ansible rollout against the same steps done by hand, and requests lost while it rolls.

    .venv/bin/python scripts/bench_fleet.py [--hosts 3] [--serial 1] [--json fleet.json]   # as root

It makes the test hosts of tests/e2e/test_fleet.py (network namespaces with their own veth link, address,
sshd and prefix; tests/e2e/fleet_support.py) and two real bundles (`airgap build`: a tiny model with
llama-cpp-python[server]; 1.0.0 and an update drop 1.1.0), then measures:

- **rollout time**: `ansible-playbook deploy/ansible/rollout.yml` of 1.0.0 onto N fresh hosts (airgap
  installed from the bundle itself, verify, install, start serving, /health, one chat completion, HAProxy
  in front) against the same steps typed by hand on N other fresh hosts, one host after the other, over the
  same kind of SSH connection (one control master per host): `scp` the bundle, the README's bootstrap
  recipe (signature and SHA256SUMS checked with openssl and sha256sum, pip --require-hashes), `airgap
  verify`, `airgap install`, start `airgap serve`, poll /health, one chat completion. The hand-run side
  has no load balancer to set up and no checks between steps beyond each command's exit status.
  Reported as the ratio Ansible / by hand (below 1: the playbook is faster).
- **requests lost during a rolling update**: the playbook rolls 1.1.0 over the first fleet while two
  clients send chat completions back to back through HAProxy; every answer but HTTP 200 is lost.

Needs root (namespaces), sshd, ssh, haproxy, nsenter (scripts/setup.sh) and the venv of scripts/setup.sh
(airgap[dev], llama-cpp-python's wheel in the cache). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.wheelhouse import Request, fill  # noqa: E402
from tests.e2e.fleet_support import (  # noqa: E402
    Fleet,
    Load,
    TestHost,
    build_bundle,
    chat,
    fleet_session,
    have_tools,
)
from tests.e2e.serve_support import write_tiny_gguf  # noqa: E402
from tests.support import WHEELHOUSE_REQUIREMENTS, airgap  # noqa: E402

WHEELHOUSE = Path.home() / ".cache" / "airgap-tests" / "wheelhouse"


def wheelhouse() -> Path:
    """The tests' wheelhouse when a test run filled it, else the same wheels fetched here once."""
    if (WHEELHOUSE / ".complete").exists():
        return WHEELHOUSE
    folder = Path.home() / ".cache" / "airgap-bench" / "wheelhouse"
    fill(folder, Request(tuple(WHEELHOUSE_REQUIREMENTS)))
    return folder


def ssh(fleet: Fleet, host: TestHost, command: str, timeout: float = 900) -> None:
    """One command on `host`, as an operator types it: over SSH, through the host's control master."""
    done = subprocess.run(
        ["ssh", *ssh_options(fleet), f"root@{host.address}", command], capture_output=True, text=True,
        timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"by hand on {host.name}: `{command[:120]}` failed ({done.returncode}): "
                         f"{done.stderr.strip()[-1500:]}")


def ssh_options(fleet: Fleet) -> list[str]:
    return ["-i", str(fleet.client_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ControlMaster=auto", "-o", "ControlPersist=600s",
            "-o", f"ControlPath={fleet.control_dir}/%C"]


def by_hand(fleet: Fleet, bundle: Path, public_key: Path) -> float:
    """The rollout's steps typed by hand, host after host; the seconds it took."""
    started = time.monotonic()
    for host in fleet.hosts:
        incoming = host.incoming
        remote_bundle = incoming / bundle.name
        ssh(fleet, host, f"mkdir -p {incoming}")
        done = subprocess.run(["scp", "-q", *ssh_options(fleet), str(bundle), str(public_key),
                               f"root@{host.address}:{incoming}/"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"scp to {host.name} failed: {done.stderr.strip()}")
        pub = incoming / public_key.name
        tool = host.tool
        # SECURITY.md's steps 1-3, then README's bootstrap recipe
        ssh(fleet, host, " && ".join([
            "set -eu", "WORK=$(mktemp -d)", 'cd "$WORK"',
            f"tar -xf {remote_bundle} manifest.json signatures SHA256SUMS",
            f"KEYID=$(openssl pkey -pubin -in {pub} -outform DER | tail -c 32 | sha256sum | cut -d' ' -f1)",
            """awk -v id="$KEYID" '$1 == "ed25519" && $2 == id {print $3}' signatures | base64 -d > manifest.sig""",
            f"openssl pkeyutl -verify -pubin -inkey {pub} -rawin -in manifest.json -sigfile manifest.sig >/dev/null",
            """grep -q "\\"sha256sums\\": \\"$(sha256sum < SHA256SUMS | cut -d' ' -f1)\\"" manifest.json""",
            f"tar -xf {remote_bundle} files/bootstrap-requirements.txt files/wheels",
            "(cd files && sha256sum -c --ignore-missing --quiet ../SHA256SUMS)",
            f"/usr/bin/python3 -m venv {tool}",
            f"{tool}/bin/pip install --quiet --no-index --find-links files/wheels --require-hashes "
            "-r files/bootstrap-requirements.txt",
            'rm -rf "$WORK"']))
        ssh(fleet, host, f"{tool}/bin/airgap verify {remote_bundle} --trust {pub} --prefix {host.prefix} -q")
        ssh(fleet, host, f"{tool}/bin/airgap install {remote_bundle} --trust {pub} --prefix {host.prefix} -q")
        serve = (f"{host.prefix}/current/venv/bin/airgap serve --prefix {host.prefix} --host {host.address} "
                 f"--port 8080 --api-key-file {host.api_key_file} --threads 1 --n-ctx 512")
        host.run_dir.mkdir(parents=True, exist_ok=True)
        ssh(fleet, host, f"setsid -f sh -c {shlex.quote(serve)} </dev/null >{host.run_dir}/serve.log 2>&1")
        deadline = time.monotonic() + 300
        while chat(host.base_url, timeout=30)[0] != 200:  # /health, then a completion: one request does both
            if time.monotonic() > deadline:
                raise SystemExit(f"by hand: {host.name} did not serve: {(host.run_dir / 'serve.log').read_text()}")
            time.sleep(0.25)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--serial", default="1", help="the rollout's batches, e.g. '1' or '1,2' (default 1)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    why = have_tools()
    if why is not None:
        raise SystemExit(f"bench_fleet: {why}")
    serial = [int(part) for part in args.serial.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        work = Path(scratch)
        keys = work / "keys"
        keys.mkdir()
        made = airgap("keygen", keys / "release", "--no-passphrase")
        assert made.code == 0, made.stderr
        private_key, public_key = keys / "release.key", keys / "release.pub"
        print("building the bundles (1.0.0 and its drop 1.1.0)...", flush=True)
        bundles = work / "bundles"
        bundles.mkdir()
        houses = wheelhouse()
        v1 = build_bundle(bundles, "1.0.0", write_tiny_gguf(bundles / "m1.gguf", seed=1), wheelhouse=houses,
                          private_key=private_key)
        v2 = build_bundle(bundles, "1.1.0", write_tiny_gguf(bundles / "m2.gguf", seed=2), wheelhouse=houses,
                          private_key=private_key, base=v1, lock=bundles / "fleet-1.0.0.toml.lock")

        print(f"by hand: {args.hosts} hosts, one after the other...", flush=True)
        with fleet_session(work, count=args.hosts) as manual_fleet:
            manual_s = by_hand(manual_fleet, v1, public_key)
        print(f"  {manual_s:.1f} s", flush=True)

        print(f"ansible-playbook rollout.yml: {args.hosts} hosts, serial {serial}...", flush=True)
        with fleet_session(work, count=args.hosts) as fleet:
            extra = {"airgap_trust": str(public_key), "airgap_serial": serial}
            first = fleet.playbook("rollout.yml", fleet.inventory(), {"airgap_bundle": str(v1), **extra})
            if first.code != 0:
                raise SystemExit(f"the rollout failed:\n{first.output[-4000:]}")
            print(f"  {first.seconds:.1f} s; slowest tasks:", flush=True)
            for row in first.profile[:10]:
                print(f"    {row['seconds']:7.1f} s  {row['task']}", flush=True)
            print("rolling update to 1.1.0 with two clients sending through HAProxy...", flush=True)
            with Load(fleet.lb_url) as load:
                update = fleet.playbook("rollout.yml", fleet.inventory(), {"airgap_bundle": str(v2), **extra})
            if update.code != 0:
                raise SystemExit(f"the update failed:\n{update.output[-4000:]}")
            statuses = sorted({status for status, _ in load.results})
            served_by = sorted({server for _, server in load.results if server})
    result = {
        "hosts": args.hosts, "serial": serial,
        "rollout_ratio_ansible_over_by_hand": round(first.seconds / manual_s, 3),
        "update_requests": len(load.results), "update_requests_lost": load.lost, "update_statuses": statuses,
        "update_served_by": served_by,
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "rollout_tasks": first.profile,
        "seconds": {"ansible_rollout": round(first.seconds, 1), "by_hand": round(manual_s, 1),
                    "ansible_update": round(update.seconds, 1)},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
