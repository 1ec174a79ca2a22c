"""Test hosts for the Ansible rollout: each a network namespace with its own veth link and address, its own
sshd (Debian's openssh-server, private config, a key the test made, no systemd) and its own prefix, tool venv
and run folder on the shared file system. The controller (this process's namespace) runs the real
`ansible-playbook` against them over SSH; HAProxy, started by the playbook, runs here on 127.0.0.1.

Everything a fleet makes is named after it: namespaces `agft<PID>h<N>` (PID: the process that made them) and
every file under a root folder whose name starts with `agft<PID>`. `Fleet.close()` (run from `fleet_session`, also
on Ctrl-C and SIGTERM) kills the processes in those namespaces (`ip netns pids`), the ones outside whose command
line names the root (HAProxy, SSH control masters), and deletes the namespaces, and with them the veth links and
the tmpfs mounts of their private mount namespaces. `remove_stale()` does the same for fleets whose process is
gone (a run killed with SIGKILL), before a new fleet starts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import REPO, airgap, engine_table

PLAYBOOKS = REPO / "deploy" / "ansible"
SSHD = "/usr/sbin/sshd"
HAPROXY = "/usr/sbin/haproxy"
API_KEY = "fleet-test-key-0123456789abcdef"
# namespaces, links and the root folder of a fleet start with this and the maker's pid (links: 15 characters)
NAME_PREFIX = "agft"
STALE_NETNS = re.compile(rf"^{NAME_PREFIX}(\d+)h\d+$")


def run(*command: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass
class TestHost:
    name: str
    index: int
    netns: str
    address: str
    root: Path
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def prefix(self) -> Path:
        return self.root / "prefix"

    @property
    def tool(self) -> Path:
        return self.root / "tool"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def api_key_file(self) -> Path:
        return self.root / "api-key"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:8080"

    def inventory_vars(self) -> dict[str, Any]:
        return {"ansible_host": self.address, "airgap_prefix": str(self.prefix), "airgap_tool_venv": str(self.tool),
                "airgap_incoming": str(self.incoming), "airgap_run_dir": str(self.run_dir),
                "airgap_api_key_file": str(self.api_key_file), "airgap_serve_port": 8080,
                "airgap_serve_extra_args": ["--threads", "1", "--n-ctx", "512"]}

    def active_version(self) -> str | None:
        state_file = self.prefix / "state.json"
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        return next((g["version"] for g in state["generations"] if g["id"] == state["active"]), None)


@dataclass(frozen=True)
class PlaybookRun:
    code: int
    output: str
    report: list[dict[str, Any]]
    seconds: float
    profile: list[dict[str, Any]] = field(default_factory=list)  # seconds per task, slowest first

    def outcome(self, host: str) -> dict[str, Any]:
        return next(entry for entry in self.report if entry["host"] == host)

    def task_results(self, task: str) -> list[str]:
        """The result lines ('ok: [h2] => ...', 'changed: [h3] ...') under every header of the task named `task`
        (one per batch)."""
        lines: list[str] = []
        blocks = re.split(r"^TASK \[", self.output, flags=re.MULTILINE)
        for block in blocks[1:]:
            header, _, body = block.partition("\n")
            if header.split("]", 1)[0].split(" : ", 1)[-1].startswith(task):
                lines += [line for line in body.splitlines() if re.match(r"^(ok|changed|failed|skipping): ", line)]
        return lines

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counters per host: {'h1': {'ok': 9, 'changed': 0, ...}}."""
        found: dict[str, dict[str, int]] = {}
        for line in self.output.split("PLAY RECAP", 1)[-1].splitlines():
            match = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
            if match:
                found[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
        return found


def fleet_root_name() -> str:
    """The first part of a fleet's root folder name: every process it leaves outside a namespace names it."""
    return f"{NAME_PREFIX}{os.getpid()}"


@dataclass
class Fleet:
    root: Path
    count: int
    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: list[TestHost] = field(default_factory=list)
    lb_port: int = 0
    mounts: list[Path] = field(default_factory=list)

    @property
    def lb_dir(self) -> Path:
        return self.root / "lb"

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def control_dir(self) -> Path:
        return self.root / "cp"

    def start(self) -> Fleet:
        remove_stale()
        for folder in (self.lb_dir, self.control_dir, self.root / "ansible"):
            folder.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.client_key = self.root / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "airgap-fleet-test", "-f", self.client_key)
        (self.root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.lb_port = _free_port()
        for i in range(1, self.count + 1):
            self.hosts.append(self.add_host(i, sshd=True))
        return self

    def add_host(self, index: int, *, sshd: bool) -> TestHost:
        """A namespace with its own /30 link; with sshd, a host Ansible can reach, else an unreachable one."""
        netns = f"{NAME_PREFIX}{self.tag}h{index}"
        outer, inner = f"{netns}o", f"{netns}i"
        net = f"10.{200 + int(self.tag) % 50}.{index + 10 * (int(self.tag) // 50 % 20)}"
        host = TestHost(name=f"h{index}", index=index, netns=netns, address=f"{net}.2", root=self.root / f"h{index}")
        host.root.mkdir(parents=True, exist_ok=True)
        run("ip", "netns", "add", netns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        run("ip", "link", "set", inner, "netns", netns)
        run("ip", "addr", "add", f"{net}.1/30", "dev", outer)
        run("ip", "link", "set", outer, "up")
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{net}.2/30", "dev", inner],
                        ["ip", "link", "set", inner, "up"]):
            run("ip", "netns", "exec", netns, *command)
        host.api_key_file.write_text(API_KEY + "\n")
        host.api_key_file.chmod(0o600)
        if sshd:
            self._start_sshd(host)
        return host

    def _start_sshd(self, host: TestHost) -> None:
        key = host.root / "ssh_host_ed25519_key"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        config = host.root / "sshd_config"
        config.write_text(
            f"ListenAddress {host.address}:22\nHostKey {key}\nPidFile {host.root / 'sshd.pid'}\nUsePAM no\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n"
            "MaxSessions 50\nMaxStartups 50\nLogLevel ERROR\n"
        )
        # a mount namespace of its own, so a test can fill this host's disk without touching the machine
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private", SSHD, "-D", "-e",
             "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(host.root / "sshd.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host.address, 22), timeout=1):
                    return
            except OSError:
                if host.sshd.poll() is not None:
                    break
                time.sleep(0.1)
        raise AssertionError(f"sshd for {host.name} did not start: {(host.root / 'sshd.log').read_text()[-2000:]}")

    # ------------------------------------------------------------ disk

    def fill_disk(self, host: TestHost, size: str = "64k") -> None:
        """A small tmpfs over the host's PREFIX/staging, in its sshd's mount namespace only."""
        assert host.sshd is not None
        staging = host.prefix / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        run("nsenter", "-t", str(host.sshd.pid), "-m", "mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
            staging)  # mode: a 1777 tmpfs is a prefix others can write to, which install refuses
        self.mounts.append(staging)

    def free_disk(self, host: TestHost) -> None:
        assert host.sshd is not None
        staging = host.prefix / "staging"
        run("nsenter", "-t", str(host.sshd.pid), "-m", "umount", staging)
        self.mounts.remove(staging)

    # ------------------------------------------------------------ ansible

    def inventory(self, hosts: Sequence[TestHost] | None = None, *, health_timeout: int = 60,
                  lb: bool = True) -> Path:
        """An inventory of `hosts` (default: all), with the load balancer in front unless `lb` is false."""
        chosen = list(self.hosts if hosts is None else hosts)
        data = {
            "all": {
                "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(self.client_key),
                         "ansible_python_interpreter": "/usr/bin/python3",
                         "airgap_controller_command": f"{sys.prefix}/bin/airgap",
                         "airgap_controller_cache": str(self.root / "controller-cache"),
                         "airgap_health_timeout": health_timeout},
                "children": {
                    "airgap_servers": {"hosts": {h.name: h.inventory_vars() for h in chosen}},
                    "airgap_lb": {"hosts": {"lb": {
                        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                        "airgap_lb_dir": str(self.lb_dir), "airgap_lb_socket": str(self.lb_dir / "admin.sock"),
                        "airgap_lb_bind": f"127.0.0.1:{self.lb_port}", "airgap_lb_manager": "supervised",
                        "airgap_lb_check_inter": "500ms", "airgap_lb_check_rise": 1, "airgap_lb_check_fall": 1,
                    }}},
                },
            }
        }
        if not lb:
            del data["all"]["children"]["airgap_lb"]
        path = self.root / f"inventory-{'-'.join(h.name for h in chosen)}{'' if lb else '-no-lb'}.yml"
        path.write_text(json.dumps(data, indent=2))
        return path

    def playbook(self, name: str, inventory: Path, extra: dict[str, Any] | None = None,
                 timeout: float = 600) -> PlaybookRun:
        report, profile = self.root / "rollout-report.json", self.root / "rollout-profile.json"
        report.unlink(missing_ok=True)
        profile.unlink(missing_ok=True)
        env = {**os.environ, "ANSIBLE_HOME": str(self.root / "ansible"), "ANSIBLE_HOST_KEY_CHECKING": "False",
               "ANSIBLE_PIPELINING": "True", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "False",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir), "ANSIBLE_LOCAL_TEMP": str(self.root / "atmp"),
               "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=600s -o UserKnownHostsFile=/dev/null",
               "ANSIBLE_DEPRECATION_WARNINGS": "False", "ANSIBLE_FORKS": "10", "AIRGAP_ROLLOUT_REPORT": str(report),
               "AIRGAP_ROLLOUT_PROFILE": str(profile),
               "ANSIBLE_CONFIG": str(self.root / "no-ansible.cfg")}
        command = [f"{sys.prefix}/bin/ansible-playbook", "-i", str(inventory), str(PLAYBOOKS / name)]
        if extra:
            command += ["-e", json.dumps(extra)]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=self.root, timeout=timeout,
                              check=False)
        seconds = time.monotonic() - started
        entries = json.loads(report.read_text()) if report.exists() else []
        tasks = json.loads(profile.read_text()) if profile.exists() else []
        return PlaybookRun(done.returncode, done.stdout + done.stderr, entries, seconds, tasks)

    # ------------------------------------------------------------ load balancer

    def lb_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's `show stat` rows of backend airgap, by server name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.lb_dir / "admin.sock"))
            sock.sendall(b"show stat\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "airgap" and r["svname"] not in ("BACKEND", "FRONTEND")}

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Tear down everything this fleet made; safe to call twice and after a half-done start."""
        tear_down(self.tag, self.root)
        for host in self.hosts:
            if host.sshd is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.sshd.wait(5)
        self.mounts.clear()


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in cmdline  # a reused pid of some other program does not keep a fleet alive


def _pids_naming(marker: str) -> list[int]:
    """Processes of this namespace (HAProxy, ssh control masters) whose command line names `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def tear_down(tag: str, root: Path | None) -> None:
    """Kill every process of fleet `tag` (in its namespaces, and outside those naming its root), delete the
    namespaces. Each step goes on when one before failed: a teardown that stops halfway leaks."""
    names = [n.split()[0] for n in run("ip", "netns", "list", check=False).stdout.splitlines() if n.strip()]
    mine = [n for n in names if (m := STALE_NETNS.match(n)) and m.group(1) == tag]
    markers = [str(root)] if root is not None else []
    markers.append(f"/{NAME_PREFIX}{tag}-")
    for _ in range(3):  # a supervisor may start a new child while its siblings die
        pids = {int(p) for n in mine for p in run("ip", "netns", "pids", n, check=False).stdout.split()}
        pids.update(p for marker in markers for p in _pids_naming(marker))
        if not pids:
            break
        for pid in pids:
            _kill(pid)
        time.sleep(0.2)
    for name in mine:
        run("ip", "netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Tear down the fleets of processes that are gone (killed before their teardown ran); their tags."""
    names = [n.split()[0] for n in run("ip", "netns", "list", check=False).stdout.splitlines() if n.strip()]
    tags = sorted({m.group(1) for n in names if (m := STALE_NETNS.match(n)) and not _alive(int(m.group(1)))})
    for proc in Path("/proc").iterdir():  # left-overs outside a namespace, e.g. a fleet whose namespaces are gone
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                found = re.search(rb"/" + NAME_PREFIX.encode() + rb"(\d+)-", (proc / "cmdline").read_bytes())
                if found and not _alive(int(found.group(1))) and found.group(1).decode() not in tags:
                    tags.append(found.group(1).decode())
    for tag in tags:
        tear_down(tag, None)
    return tags


@contextlib.contextmanager
def torn_down_on_signals(close: Callable[[], None]) -> Iterator[None]:
    """Run `close` however the block ends: normally, by an exception, by Ctrl-C, or by SIGTERM/SIGHUP (a
    timeout's kill), which are turned into KeyboardInterrupt so that the unwinding runs."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig in previous:  # a second signal must not cut the teardown short
            signal.signal(sig, signal.SIG_IGN)
        try:
            close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat(base_url: str, timeout: float = 30) -> tuple[int, str]:
    """(HTTP status, X-Airgap-Server header) of one chat completion; (0, '') when nothing answered."""
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status), response.headers.get("X-Airgap-Server", "")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.headers.get("X-Airgap-Server", "")
    except (urllib.error.URLError, OSError):
        return 0, ""


class Load:
    """Chat completions against the load balancer, back to back from `workers` threads, while a rollout runs."""

    def __init__(self, url: str, workers: int = 2, pause: float = 0.2) -> None:
        self.url = url
        self.pause = pause  # between a worker's requests: a steady stream that leaves the CPUs to the rollout
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.results.append(chat(self.url))
            time.sleep(self.pause)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    @property
    def lost(self) -> int:
        return sum(1 for status, _ in self.results if status != 200)


def prefix_snapshot(host: TestHost) -> tuple[Any, ...]:
    """What an update must not change when it is refused: active link, state, trusted roots, versions."""
    prefix = host.prefix
    link = prefix / "current"
    trust = prefix / "trust"
    return (
        os.readlink(link) if link.is_symlink() else None,
        (prefix / "state.json").read_bytes() if (prefix / "state.json").exists() else b"",
        tuple(sorted(p.name for p in trust.iterdir())) if trust.is_dir() else (),
        tuple(sorted(p.name for p in (prefix / "versions").iterdir())) if (prefix / "versions").is_dir() else (),
    )


@contextlib.contextmanager
def fleet_session(parent: Path, count: int) -> Iterator[Fleet]:
    """A started fleet of `count` hosts under a new folder in `parent`, torn down however the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=fleet_root_name() + "-", dir=parent))
    made = Fleet(root, count=count)
    with torn_down_on_signals(made.close):
        yield made.start()


# ------------------------------------------------------------ bundles

@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path  # an update drop on top of v1
    broken: Path  # a drop on top of v1 (installable once v1 is) whose model llama.cpp cannot load
    tampered: Path  # v2 with one byte of its model changed
    public_key: Path


def write_broken_gguf(path: Path) -> Path:
    """The tiny model with one tensor of the wrong shape: a valid GGUF header, a model llama.cpp refuses."""
    from tests.e2e.serve_support import write_tiny_gguf

    write_tiny_gguf(path, seed=7)
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    tensor.field.parts[3][0] = 32  # first dimension 64 -> 32 (the data is left as it was)
    reader.data.flush()
    return path


def build_bundle(folder: Path, version: str, model: Path, *, wheelhouse: Path, private_key: Path,
                 base: Path | None = None, lock: Path | None = None) -> Path:
    """`airgap build` of bundle "fleet" VERSION: the model and llama-cpp-python[server] (from the wheel cache);
    with `lock`, that resolution is reused (one pip resolution for all the fleet's bundles)."""
    spec = folder / f"fleet-{version}.toml"
    spec.write_text(
        f'[bundle]\nname = "fleet"\nversion = "{version}"\n\n[[models]]\nid = "tiny"\npath = "{model}"\n\n'
        f'[python]\nrequirements = ["llama-cpp-python[server]==0.3.36"]\nfind_links = ["{wheelhouse}"]\n\n'
        f'{engine_table()}')
    if lock is not None:
        shutil.copyfile(lock, spec.with_name(spec.name + ".lock"))
    args = ["build", spec, "--key", private_key, "-o", folder / version, "-q", *(["--base", base] if base else [])]
    built = airgap(*args, timeout=3600)
    assert built.code == 0, built.stderr[-3000:]
    return Path(built.stdout.split()[-1])


def build_bundles(folder: Path, *, wheelhouse: Path, private_key: Path, public_key: Path) -> Bundles:
    """1.0.0, then its drops 1.1.0 and 1.2.0 (broken) side by side, and 1.1.0 with one byte flipped."""
    from tests.e2e.serve_support import write_tiny_gguf

    folder.mkdir(parents=True, exist_ok=True)
    v1 = build_bundle(folder, "1.0.0", write_tiny_gguf(folder / "m1.gguf", seed=1), wheelhouse=wheelhouse,
                      private_key=private_key)
    lock = folder / "fleet-1.0.0.toml.lock"
    with ThreadPoolExecutor(2) as pool:
        v2 = pool.submit(build_bundle, folder, "1.1.0", write_tiny_gguf(folder / "m2.gguf", seed=2),
                         wheelhouse=wheelhouse, private_key=private_key, base=v1, lock=lock)
        broken = pool.submit(build_bundle, folder, "1.2.0", write_broken_gguf(folder / "m3.gguf"),
                             wheelhouse=wheelhouse, private_key=private_key, base=v1, lock=lock)
        v2_path, broken_path = v2.result(), broken.result()
    data = bytearray(v2_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the model, the one big member of this drop
    tampered = folder / "tampered" / v2_path.name
    tampered.parent.mkdir()
    tampered.write_bytes(bytes(data))
    return Bundles(v1, v2_path, broken_path, tampered, public_key)


def have_tools() -> str | None:
    """Why the fleet tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in (SSHD, HAPROXY, shutil.which("ssh") or "ssh", shutil.which("nsenter") or "nsenter")
               if not Path(t).exists()]
    return f"missing {', '.join(missing)} (scripts/setup.sh installs them)" if missing else None
