"""The fleet's test hosts leave nothing behind: not when the run ends, not when it is interrupted by SIGTERM
(a timeout), and not even when it is killed with SIGKILL (the next fleet removes what the dead one left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet_support import NAME_PREFIX, have_tools, remove_stale, run
from tests.support import REPO

pytestmark = pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))

# A fleet of one host whose sshd runs, plus a process outside the namespaces naming the fleet's root (what
# HAProxy and the ssh control masters are), and a sleeper inside the namespace (what `airgap serve` is).
CHILD = """
import subprocess, sys, time
from pathlib import Path
from tests.e2e.fleet_support import fleet_session
with fleet_session(Path(sys.argv[1]), count=1) as fleet:
    host = fleet.hosts[0]
    subprocess.Popen(["ip", "netns", "exec", host.netns, "setsid", "-f", "sleep", "600"])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "outside-" + str(fleet.root)])
    print("ready", host.netns, fleet.root, flush=True)
    time.sleep(600)
"""


def namespaces() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()}


def processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return [p for p in found if p != os.getpid()]


def start_child(tmp_path: Path) -> tuple[subprocess.Popen[str], str, str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    line = child.stdout.readline().split()
    assert line[:1] == ["ready"], line
    netns, root = line[1], line[2]
    assert netns.startswith(f"{NAME_PREFIX}{child.pid}h") and netns in namespaces()
    deadline = time.monotonic() + 10
    while len(run("ip", "netns", "pids", netns).stdout.split()) < 2 or not processes_naming("outside-" + root):
        assert time.monotonic() < deadline, "the child's processes did not start"
        time.sleep(0.1)
    return child, netns, root


def assert_nothing_left(netns: str, root: str) -> None:
    assert netns not in namespaces()
    assert processes_naming("outside-" + root) == []
    assert not any(link.startswith(netns) for link in run("ip", "-o", "link").stdout.split())


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    made = start_child(tmp_path)
    try:
        yield made
    finally:
        made[0].kill()
        made[0].wait(10)
        remove_stale()


def test_sigterm_tears_the_fleet_down(child: tuple[subprocess.Popen[str], str, str]) -> None:
    process, netns, root = child
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) != 0
    assert_nothing_left(netns, root)


def test_a_fleet_killed_with_sigkill_is_removed_by_the_next_one(child: tuple[subprocess.Popen[str], str, str]
                                                                 ) -> None:
    process, netns, root = child
    process.kill()
    process.wait(10)
    assert netns in namespaces()  # SIGKILL: no teardown ran
    assert str(process.pid) in remove_stale()
    assert_nothing_left(netns, root)
