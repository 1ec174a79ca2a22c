#!/usr/bin/env python3
"""Benchmark airgap against what one would script by hand, on the same data in the same run.

    python scripts/bench.py [--size 2GiB] [--reps 3] [--json out.json] [--only build,verify,install]

It makes its own data: a GGUF model of about `--size` bytes of random (incompressible) Q8_0 weights,
written in chunks by scripts/make_tiny_gguf.py, plus a folder of real wheels copied from a local
wheelhouse (default ~/.cache/airgap-tests/wheelhouse; `pip download` fills it once if it is empty).
Then, repeating each measurement `--reps` times in turn (ours, then the baselines, so that a noisy
machine slows both alike) and reporting medians, it times:

- `airgap build` (local sources) vs `tar -I 'zstd -T0' -cf` of the same files;
- `airgap verify` vs `sha256sum -c` and `openssl dgst -sha256` of the same files;
- `airgap install` (verify + unpack + store + virtualenv + wheel installer) vs `zstd -dc | tar -x` (checks
  nothing) and vs the careful manual way (`sha256sum -c` of the archive, extract, `sha256sum -c` of
  the files, then `python -m venv` and `pip install --no-index --require-hashes` of the same wheels).

Each run's wall time, CPU time and peak RSS (of the process tree, from wait4) are recorded; airgap runs
also report phases (pip resolve in build, virtualenv + pip in install) and the airgap process's own
peak RSS, through a small wrapper that times two functions. Caches are warm unless `--cold` (root:
drop the page cache before every run); every run starts after `sync`, with its inputs read once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WHEELHOUSE = Path.home() / ".cache" / "airgap-tests" / "wheelhouse"
# The bench payload's wheels: airgap's own declared runtime dependencies (what every bundle carries), read
# from its metadata so a new dependency needs no edit here, plus numpy as a large real wheel.
EXTRA_PAYLOAD_WHEELS = ["numpy"]
MiB = 1 << 20
GROUPS = ("build", "verify", "install")

# Runs the real CLI, timing a few functions by name and recording this process's own peak RSS.
# Phases that a future airgap no longer has are simply missing from the result.
WRAPPER = r"""
import atexit, importlib, json, os, sys, time
timings = {}
def wrap(spec):
    module_name, function_name, key = spec.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name, None)
    if original is None:
        return
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
    setattr(module, function_name, timed)
def dump():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                timings["self_peak_rss_kb"] = int(line.split()[1])
    with open(os.environ["AIRGAP_BENCH_TIMINGS"], "w") as out:
        json.dump(timings, out)
for spec in filter(None, os.environ.get("AIRGAP_BENCH_WRAP", "").split(",")):
    wrap(spec)
atexit.register(dump)
sys.argv[0] = "airgap"
from airgap.cli import main
main()
"""
PHASES = {
    "build": "airgap.build.builder:resolve_wheels:pip_resolve_s",
    "install": "airgap.prefix.install:install_wheels:venv_pip_s",  # venv + wheel installer (no pip any more)
    "verify": "",
}


# ---------------------------------------------------------------- measuring

@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    peak_rss_kb: int
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Case:
    """One thing measured: a command line, how many payload bytes it handles, its samples."""

    name: str
    group: str
    command: str
    bytes: int
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    def median(self, metric: Callable[[Sample], float | None]) -> float | None:
        values = [v for v in map(metric, self.samples) if v is not None]
        return statistics.median(values) if values else None


class CommandFailed(RuntimeError):
    pass


def run_measured(command: Sequence[str] | str, env: dict[str, str], cwd: Path,
                 timings_file: Path | None = None) -> Sample:
    """Run one command to completion; wall time, CPU and peak RSS of its whole tree (wait4)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(command, shell=isinstance(command, str), env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-8:]
            raise CommandFailed(f"{command!r} exited {proc.returncode}:\n" + "\n".join(tail))
    phases: dict[str, float] = {}
    if timings_file is not None and timings_file.exists():
        phases = json.loads(timings_file.read_text())
        timings_file.unlink()
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, phases)


def settle(inputs: Sequence[Path], cold: bool) -> None:
    """Start every run alike: no dirty data from the last one, inputs cached (or nothing cached)."""
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for path in inputs:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            with file.open("rb", buffering=0) as stream:
                while stream.read(8 * MiB):
                    pass


# ---------------------------------------------------------------- data

def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, 512MiB or 8G, found {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * (1 << (10 * " KMGT".index(unit or " "))))


def make_model(path: Path, size: int) -> Path:
    """A loadable GGUF of about `size` bytes whose weights are random Q8_0 blocks (written in chunks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_gguf.py"), str(path), "--seed", "1",
                    "--pad-mb", str(max(1, size // MiB))], check=True, stdout=subprocess.DEVNULL)
    return path


def ensure_wheelhouse(folder: Path) -> list[Path]:
    """The wheels of airgap's runtime dependencies and EXTRA_PAYLOAD_WHEELS, downloaded once by wheelhouse.py."""
    from airgap.build.sources.selfwheel import runtime_requirements

    wanted = [*runtime_requirements(), *EXTRA_PAYLOAD_WHEELS]
    print(f"wheelhouse {folder}: {' '.join(wanted)}", file=sys.stderr)
    subprocess.run([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), str(folder), "-r", *wanted],
                   check=True, stdout=subprocess.DEVNULL)
    return sorted(folder.glob("*.whl"))


@dataclass(frozen=True)
class Workspace:
    root: Path
    data: Path  # the payload: model/ and wheels/, exactly what the baselines handle
    spec: Path
    key: Path
    pub: Path
    sums: Path  # sha256sum -c input for data/
    requirements: Path  # hashed requirements of every wheel, for the manual pip install
    env: dict[str, str]

    @property
    def payload_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data.rglob("*") if p.is_file())


def prepare(root: Path, size: int, wheelhouse: Path) -> Workspace:
    data = root / "data"
    model = make_model(data / "model" / "weights.gguf", size)
    wheels_dir = data / "wheels"
    wheels_dir.mkdir(parents=True)
    for wheel in ensure_wheelhouse(wheelhouse):
        shutil.copy2(wheel, wheels_dir / wheel.name)
    spec = root / "bench.toml"
    requirements = '"numpy"' if any(wheels_dir.glob("numpy-*.whl")) else ""
    spec.write_text(f'[bundle]\nname = "bench"\nversion = "1.0"\n\n[[models]]\nid = "weights"\npath = "{model}"\n\n'
                    f'[python]\nrequirements = [{requirements}]\nfind_links = ["{wheels_dir}"]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "airgap", "keygen", str(root / "bench"), "--no-passphrase"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    sums = root / "data.sha256"
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    sums.write_bytes(subprocess.run(["sha256sum", *files], cwd=data, check=True, capture_output=True).stdout)
    reqs = root / "wheels.txt"
    reqs.write_text(hashed_requirements(sorted(wheels_dir.glob("*.whl")), sums))
    return Workspace(root, data, spec, root / "bench.key", root / "bench.pub", sums, reqs, env)


def hashed_requirements(wheels: list[Path], sums: Path) -> str:
    from packaging.utils import parse_wheel_filename

    hashes = {Path(line.split(maxsplit=1)[1].strip()).name: line.split()[0]
              for line in sums.read_text().splitlines()}
    lines = []
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        lines.append(f"{name}=={version} --hash=sha256:{hashes[wheel.name]}\n")
    return "".join(lines)


# ---------------------------------------------------------------- the runs

@dataclass
class Bench:
    ws: Workspace
    reps: int
    cold: bool
    nice: int = 0
    python: str = sys.executable
    cases: dict[str, Case] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.ws.root

    @property
    def niced(self) -> list[str]:
        return ["nice", "-n", str(self.nice)] if self.nice else []

    def case(self, name: str, group: str, command: str, note: str = "") -> Case:
        if name not in self.cases:
            self.cases[name] = Case(name, group, command, self.ws.payload_bytes, note=note)
        return self.cases[name]

    def airgap(self, name: str, group: str, args: list[str], inputs: Sequence[Path], note: str = "") -> Sample:
        timings = self.root / "timings.json"
        env = {**self.ws.env, "AIRGAP_BENCH_TIMINGS": str(timings), "AIRGAP_BENCH_WRAP": PHASES[group]}
        case = self.case(name, group, "airgap " + " ".join(args), note)
        settle(inputs, self.cold)
        sample = run_measured([*self.niced, self.python, "-c", WRAPPER, *args], env, self.root, timings)
        case.samples.append(sample)
        return sample

    def shell(self, name: str, group: str, script: str, inputs: Sequence[Path], note: str = "") -> Sample:
        case = self.case(name, group, script, note)
        settle(inputs, self.cold)
        sample = run_measured([*self.niced, "bash", "-c", f"set -euo pipefail; {script}"], self.ws.env, self.root)
        case.samples.append(sample)
        return sample

    # ---- build

    def build_round(self, measure: bool) -> tuple[Path, Path]:
        """Build the bundle and the baseline archive of the same files; time both if `measure`."""
        out, base = self.root / "dist", self.root / "base"
        for folder in (out, base):
            shutil.rmtree(folder, ignore_errors=True)
        base.mkdir()
        archive = base / "payload.tar.zst"
        build = ["build", str(self.ws.spec), "--key", str(self.ws.key), "-o", str(out), "--quiet"]
        tar = f"tar -I 'zstd -T0' -cf {archive} -C data ."
        if measure:
            self.airgap("airgap build", "build", build, [self.ws.data])
            self.shell("tar -I 'zstd -T0' -cf", "build", tar, [self.ws.data])
            archive.unlink()
            self.shell("tar -I 'zstd -T0' -cf + sync", "build", f"{tar} && sync {archive}", [self.ws.data],
                       note="flushed to disk, as airgap build does (fsync)")
        else:
            subprocess.run([self.python, "-m", "airgap", *build], env=self.ws.env, cwd=self.root, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(tar, shell=True, cwd=self.root, check=True)
        subprocess.run(f"sha256sum {archive} > {archive}.sha256", shell=True, cwd=self.root, check=True)
        return next(out.glob("*.airgap")), archive

    # ---- verify

    def verify_round(self, bundle: Path) -> None:
        self.airgap("airgap verify", "verify", ["verify", str(bundle), "--trust", str(self.ws.pub), "--quiet"],
                    [bundle])
        self.shell("sha256sum -c", "verify", f"cd data && sha256sum -c --quiet {self.ws.sums}", [self.ws.data])
        files = " ".join(line.split(maxsplit=1)[1].strip() for line in self.ws.sums.read_text().splitlines())
        self.shell("openssl dgst -sha256", "verify", f"cd data && openssl dgst -sha256 {files} > /dev/null",
                   [self.ws.data], note="hashes only, compares nothing")

    # ---- install

    def install_round(self, bundle: Path, archive: Path) -> None:
        prefix = self.root / "prefix"
        shutil.rmtree(prefix, ignore_errors=True)
        self.airgap("airgap install", "install",
                    ["install", str(bundle), "--trust", str(self.ws.pub), "--prefix", str(prefix), "--quiet"], [bundle])
        shutil.rmtree(prefix, ignore_errors=True)
        out = self.root / "extract"
        for name, script, note in [
            ("zstd -dc | tar -x", f"mkdir {out} && zstd -dc {archive} | tar -x -C {out}", "checks nothing"),
            ("zstd -dc | tar -x + sync", f"mkdir {out} && zstd -dc {archive} | tar -x -C {out} && sync -f {out}",
             "checks nothing; flushed to disk as airgap install does (fsync)"),
        ]:
            shutil.rmtree(out, ignore_errors=True)
            self.shell(name, "install", script, [archive], note)
        shutil.rmtree(out, ignore_errors=True)
        marks = self.root / "marks"
        careful = (f"sha256sum -c --quiet {archive}.sha256 && mkdir {out} && zstd -dc {archive} | tar -x -C {out} "
                   f"&& (cd {out} && sha256sum -c --quiet {self.ws.sums}) && date +%s.%N > {marks} "
                   f"&& {self.python} -m venv {out}/venv && {out}/venv/bin/python -m pip install --quiet --no-index "
                   f"--require-hashes --no-input --no-cache-dir --find-links {out}/wheels -r {self.ws.requirements} "
                   f"&& date +%s.%N >> {marks}")
        sample = self.shell("careful manual + venv + pip", "install", careful, [archive],
                            "sha256sum -c archive, extract, sha256sum -c files, python -m venv, "
                            "pip install --no-index --require-hashes")
        start, end = map(float, marks.read_text().split())
        sample.phases["venv_pip_s"] = end - start
        shutil.rmtree(out, ignore_errors=True)

    def run(self, groups: Sequence[str]) -> None:
        built: tuple[Path, Path] | None = None
        for rep in range(self.reps):
            print(f"round {rep + 1}/{self.reps}", file=sys.stderr, flush=True)
            if built is None or "build" in groups:
                built = self.build_round(measure="build" in groups)
            bundle, archive = built
            if "verify" in groups:
                self.verify_round(bundle)
            if "install" in groups:
                self.install_round(bundle, archive)


# ---------------------------------------------------------------- results

def derived_cases(cases: dict[str, Case]) -> dict[str, Case]:
    """Phases shown as rows of their own: the same samples less the pip / virtualenv part."""
    out = dict(cases)
    for name, phase, label, note in [
        ("airgap build", "pip_resolve_s", "airgap build, packing only", "build less pip resolving the wheels"),
        ("airgap install", "venv_pip_s", "airgap install, payload only",
         "verify + unpack + store + fsync; install less venv + pip"),
        ("careful manual + venv + pip", "venv_pip_s", "careful manual",
         "sha256sum -c archive, extract, sha256sum -c files (no venv, no pip)"),
    ]:
        case = cases.get(name)
        if case is None or not all(phase in s.phases for s in case.samples):
            continue
        out[label] = Case(label, case.group, case.command, case.bytes, note=note, samples=[
            Sample(s.wall_s - s.phases[phase], float("nan"), s.peak_rss_kb, {}) for s in case.samples])
    return out


@dataclass(frozen=True)
class Comparison:
    ours: str
    baseline: str
    target: float | None  # the most ours may take, as a multiple of the baseline's time
    ratio: float | None = None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target


COMPARISONS = [
    Comparison("airgap build", "tar -I 'zstd -T0' -cf", 1.2),
    Comparison("airgap build, packing only", "tar -I 'zstd -T0' -cf", 1.2),
    Comparison("airgap build, packing only", "tar -I 'zstd -T0' -cf + sync", None),
    Comparison("airgap verify", "sha256sum -c", 1.0),
    Comparison("airgap verify", "openssl dgst -sha256", None),
    Comparison("airgap install, payload only", "zstd -dc | tar -x", 1.3),
    Comparison("airgap install, payload only", "zstd -dc | tar -x + sync", None),
    Comparison("airgap install, payload only", "careful manual", 1.0),
    Comparison("airgap install", "careful manual + venv + pip", 1.0),
]


def compare(cases: dict[str, Case]) -> list[Comparison]:
    out = []
    for c in COMPARISONS:
        ours, base = cases.get(c.ours), cases.get(c.baseline)
        if ours is None or base is None:
            continue
        a, b = ours.median(lambda s: s.wall_s), base.median(lambda s: s.wall_s)
        out.append(Comparison(c.ours, c.baseline, c.target, None if not a or not b else a / b))
    return out


def machine() -> dict[str, Any]:
    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError:
            return "missing"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) << 10 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    commit = head.stdout.strip() if head.returncode == 0 else "not a git checkout"
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=False).stdout.strip())
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / (1 << 30), 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "sha_ni": "sha_ni" in Path("/proc/cpuinfo").read_text(),
        "tools": {"zstd": first_line(["zstd", "--version"]), "tar": first_line(["tar", "--version"]),
                  "sha256sum": first_line(["sha256sum", "--version"]), "openssl": first_line(["openssl", "version"])},
        "commit": commit + ("+dirty" if dirty else ""),
        "load_average": os.getloadavg(),
    }


def filesystem(path: Path) -> str:
    done = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or "unknown"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def table(cases: dict[str, Case], comparisons: list[Comparison]) -> str:
    lines = ["| group | operation | median wall s | MB/s | CPU s | peak RSS MB (tree) | airgap process RSS MB | runs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for group in GROUPS:
        for case in (c for c in cases.values() if c.group == group):
            wall = case.median(lambda s: s.wall_s)
            rate = case.bytes / wall / 1e6 if wall else None
            own = case.median(lambda s: s.phases.get("self_peak_rss_kb"))
            lines.append(
                f"| {group} | {case.name} | {fmt(wall)} | {fmt(rate, 0)} | {fmt(case.median(lambda s: s.cpu_s))} | "
                f"{fmt(case.median(lambda s: s.peak_rss_kb / 1024), 0)} | {fmt(own / 1024 if own else None, 0)} | "
                f"{len(case.samples)} |")
    lines += ["", "| ours | baseline | time ratio (ours / baseline) | target | met |",
              "| --- | --- | ---: | ---: | --- |"]
    for c in comparisons:
        target = f"<= {c.target}" if c.target is not None else "(reference)"
        met = {True: "yes", False: "no", None: "-"}[c.met]
        lines.append(f"| {c.ours} | {c.baseline} | {fmt(c.ratio)} | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="model size (default 2GiB)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: build,verify,install")
    parser.add_argument("--workdir", type=Path, help="where to make data and run (default: a temporary folder)")
    parser.add_argument("--wheelhouse", type=Path, default=DEFAULT_WHEELHOUSE)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--nice", type=int, default=0,
                        help="run every measured command (ours and baselines alike) at this niceness; "
                             "negative (root) shields them from other load on a shared machine")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))}; expected some of {', '.join(GROUPS)}")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="airgap-bench-", dir=args.workdir))
    started = machine()
    try:
        t0 = time.perf_counter()
        ws = prepare(root, args.size, args.wheelhouse)
        print(f"data ready in {time.perf_counter() - t0:.1f} s: {ws.payload_bytes} payload bytes in {root}",
              file=sys.stderr)
        bench = Bench(ws, args.reps, args.cold, args.nice)
        bench.run(groups)
        cases = derived_cases(bench.cases)
        comparisons = compare(cases)
        info = {**started, "load_average_after": os.getloadavg(), "filesystem": filesystem(root),
                "cache": "cold (page cache dropped before each run)" if args.cold else
                "warm (inputs read once before each run; sync before each run)", "nice": args.nice}
        print(f"\n{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['filesystem']}, "
              f"{info['cache']}; payload {ws.payload_bytes / (1 << 30):.2f} GiB; commit {info['commit']}; "
              f"load {started['load_average'][0]:.1f} -> {info['load_average_after'][0]:.1f}\n")
        print(table(cases, comparisons))
        if args.json is not None:
            args.json.write_text(json.dumps({
                "machine": info, "size": args.size, "payload_bytes": ws.payload_bytes, "reps": args.reps,
                "cases": {name: {**asdict(c), "median_wall_s": c.median(lambda s: s.wall_s)}
                          for name, c in cases.items()},
                "comparisons": [{**asdict(c), "met": c.met} for c in comparisons],
            }, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
