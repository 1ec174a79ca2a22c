"""airgap/probe.py: the stdlib-only host probe. Parsers on recorded text; the script itself under `python3 -I`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.tags import sys_tags

from airgap.errors import ProbeError
from airgap.hardware import probe
from airgap.hardware.facts import host_info, load_probe, parse_probe, probe_facts
from tests.support import REPO

PROBE = REPO / "airgap" / "hardware" / "probe.py"
# A Haswell (x86-64-v3) as /proc/cpuinfo lists it, and this lab's Sapphire Rapids (v4), cut to the flags.
HASWELL_FLAGS = [
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "syscall", "nx", "pdpe1gb",
    "rdtscp", "lm", "constant_tsc", "pni", "pclmulqdq", "ssse3", "fma", "cx16", "pcid", "sse4_1", "sse4_2",
    "movbe", "popcnt", "aes", "xsave", "avx", "f16c", "rdrand", "lahf_lm", "abm", "bmi1", "avx2", "bmi2",
    "erms", "invpcid"
]
V4_FLAGS = [*HASWELL_FLAGS, "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"]
NEHALEM_FLAGS = [f for f in HASWELL_FLAGS if f not in {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}]
CORE2_FLAGS = [f for f in NEHALEM_FLAGS if f not in {"sse4_2", "popcnt"}]
# /proc/driver/nvidia/version of the proprietary and of the open kernel module
DRIVER_PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
DRIVER_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
               "(dvs-builder@U16-I3-B13-4-3)  Wed Jul 23 22:53:52 UTC 2025\n")
GPU_INFORMATION = """Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 139
GPU UUID: \t GPU-0b4f8c2d-1e2a-4d8e-b0c4-6a8e3c2f9d10
Video BIOS: \t 96.00.99.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
Bus Location: \t 0000:41:00.0
Device Minor: \t 1
GPU Excluded:\t No
"""


def test_x86_64_levels_from_cpu_flags() -> None:
    assert probe.x86_64_level("x86_64", V4_FLAGS) == 4
    assert probe.x86_64_level("x86_64", HASWELL_FLAGS) == 3
    assert probe.x86_64_level("x86_64", NEHALEM_FLAGS) == 2
    assert probe.x86_64_level("x86_64", CORE2_FLAGS) == 1
    assert probe.x86_64_level("aarch64", V4_FLAGS) is None


def test_platform_tags_match_packaging_on_this_machine() -> None:
    glibc = probe.parse_glibc_version(os.confstr("CS_GNU_LIBC_VERSION"))
    ours = probe.platform_tags(sysconfig.get_platform(), is_32bit=sys.maxsize <= 2**32, glibc=glibc, musl=None)
    theirs = list(dict.fromkeys(tag.platform for tag in sys_tags() if tag.platform != "any"))
    assert ours == theirs


def test_platform_tags_for_other_hosts() -> None:
    tags = probe.platform_tags("linux-x86_64", is_32bit=False, glibc=(2, 28), musl=None)
    assert tags[:3] == ["linux_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert tags[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"] and "manylinux2014_x86_64" in tags
    arm = probe.platform_tags("linux-aarch64", is_32bit=False, glibc=(2, 31), musl=None)
    assert arm[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"] and "manylinux_2_16_aarch64" not in arm
    musl = probe.platform_tags("linux-x86_64", is_32bit=False, glibc=None, musl=(1, 2))
    assert musl == ["linux_x86_64", "musllinux_1_2_x86_64", "musllinux_1_1_x86_64", "musllinux_1_0_x86_64"]


def test_libc_versions_and_the_elf_interpreter() -> None:
    assert probe.parse_glibc_version("glibc 2.36") == (2, 36)
    assert probe.parse_glibc_version(None) is None
    assert probe.parse_musl_version("musl libc (x86_64)\nVersion 1.2.4\nDynamic Program Loader\n") == (1, 2)
    assert probe.parse_musl_version("ld.so: usage\n") is None
    interpreter = probe.elf_interpreter(Path(sys.executable).resolve().read_bytes()[:4096])
    assert interpreter is not None and "ld-linux" in interpreter
    assert probe.elf_interpreter(b"#!/bin/sh\n" + b"\0" * 100) is None


def test_driver_version_and_gpus_from_proc_when_nvidia_smi_is_absent() -> None:
    assert probe.parse_driver_version(DRIVER_PROPRIETARY) == "550.54.15"
    assert probe.parse_driver_version(DRIVER_OPEN) == "580.65.06"
    assert probe.parse_driver_version("") is None
    gpus = probe.gpus_from_proc({"0000:41:00.0": GPU_INFORMATION}, "580.65.06")
    assert gpus == [{"index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0b4f8c2d-1e2a-4d8e-b0c4-6a8e3c2f9d10",
                     "bus_id": "0000:41:00.0", "memory_total": None, "memory_free": None, "compute_capability": None,
                     "driver_version": "580.65.06"}]


def test_mounts_and_the_nearest_existing_parent(tmp_path: Path) -> None:
    mounts = probe.parse_mounts(
        "/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /opt/my\\040data xfs rw 0 0\nproc /proc proc rw 0 0\n")
    assert mounts == [("/", "ext4"), ("/opt/my data", "xfs"), ("/proc", "proc")]
    assert probe.mount_of("/opt/my data/airgap", mounts) == ("/opt/my data", "xfs")
    assert probe.mount_of("/opt/my datum", mounts) == ("/", "ext4")
    assert probe.nearest_existing(tmp_path / "a" / "b") == tmp_path


def fake_proc(tmp_path: Path, *, driver: str | None = None, gpus: dict[str, str] | None = None) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       65536000 kB\nMemAvailable:   60000000 kB\n")
    (proc / "cpuinfo").write_text("".join(
        f"processor\t: {cpu}\nmodel name\t: Example Haswell\nflags\t\t: {' '.join(HASWELL_FLAGS)}\n"
        f"physical id\t: 0\ncore id\t\t: {cpu}\n\n" for cpu in range(4)))
    (proc / "self" / "cgroup").write_text("0::/\n")
    (proc / "self" / "mounts").write_text("/dev/root / ext4 rw 0 0\n")
    if driver is not None:
        (proc / "driver" / "nvidia").mkdir(parents=True)
        (proc / "driver" / "nvidia" / "version").write_text(driver)
    for bus, text in (gpus or {}).items():
        (proc / "driver" / "nvidia" / "gpus" / bus).mkdir(parents=True)
        (proc / "driver" / "nvidia" / "gpus" / bus / "information").write_text(text)
    return proc


def test_collect_reads_recorded_proc_files_into_checked_facts(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, driver=DRIVER_OPEN, gpus={"0000:41:00.0": GPU_INFORMATION})
    facts = probe_facts(tmp_path / "not" / "yet", proc=proc, cgroup_root=tmp_path, nvidia_smi=None, environ={})
    assert (facts.cpu_model, facts.x86_64_level) == ("Example Haswell", 3)
    assert (facts.ram_total, facts.ram_available) == (65536000 * 1024, 60000000 * 1024)
    assert facts.driver_version == "580.65.06" and facts.gpu_source == "/proc/driver/nvidia"
    assert [g.name for g in facts.gpus] == ["NVIDIA H100 80GB HBM3"] and facts.gpus[0].memory_total is None
    assert facts.disk_free is not None and facts.disk_free > 0
    host = host_info(facts)
    assert host.gpus == ()  # no memory figures without nvidia-smi: nothing to plan with
    assert any("memory unknown without nvidia-smi" in note for note in host.notes)


def test_probe_runs_under_a_bare_isolated_python_and_imports_only_the_standard_library(tmp_path: Path) -> None:
    pythons = {sys.executable, *(p for p in ("/usr/bin/python3",) if shutil.which(p))}
    for python in sorted(pythons):
        out = tmp_path / f"probe-{Path(python).name}.json"
        code = (
            "import sys, runpy, sysconfig\n"
            "before = set(sys.modules)\n"
            f"sys.argv = ['probe.py', '--prefix', {str(tmp_path / 'p')!r}, '-o', {str(out)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(PROBE)!r}, run_name='__main__')\n"
            "except SystemExit as done:\n"
            "    assert done.code == 0, done.code\n"
            "stdlib = sysconfig.get_paths()['stdlib']\n"
            "def outside(name):\n"
            "    where = getattr(sys.modules[name], '__file__', None) or ''\n"
            "    return name.split('.')[0] not in sys.stdlib_module_names and not where.startswith(stdlib + '/')\n"
            "print(sorted(m for m in set(sys.modules) - before if m != '__main__' and outside(m)))\n"
        )
        done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout  # nothing outside the standard library
        facts = load_probe(out)  # what the script wrote is a valid probe
        assert facts.python_minor == ".".join(done_version(python).split(".")[:2])
    plain = subprocess.run([sys.executable, "-I", str(PROBE)], capture_output=True, text=True, check=False, timeout=60)
    assert plain.returncode == 0 and json.loads(plain.stdout)["probe_format"] == probe.PROBE_FORMAT


def done_version(python: str) -> str:
    return subprocess.run([python, "-I", "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_probe_source_imports_nothing_from_airgap() -> None:
    text = PROBE.read_text()
    assert "from airgap" not in text and "import airgap" not in text


def test_hostile_probe_files_are_refused_naming_the_field(tmp_path: Path) -> None:
    good = probe.collect(tmp_path)
    parse_probe(good, "x")
    bad_type = {**good, "_type": "something/else"}
    with pytest.raises(ProbeError, match="not an airgap probe: expected _type 'airgap/probe'"):
        parse_probe(bad_type, "x")
    with pytest.raises(ProbeError, match="unsupported probe format: this airgap reads format 1, found 7"):
        parse_probe({**good, "probe_format": 7}, "x")
    for changed, message in [
        ({"memory": {**good["memory"], "total": -5}},
         "invalid probe.memory: field 'total' must not be negative, found -5"),
        ({"platform": {**good["platform"], "tags": ["t"] * 5000}},
         "invalid probe.platform: field 'tags' has 5000 items, limit 4096"),
        ({"platform": {**good["platform"], "tags": []}}, "platform.tags must list this host's wheel tags, found none"),
        ({"platform": {**good["platform"], "machine": "x" * 513}},
         f"invalid probe.platform: field 'machine' must be a non-empty string of at most 512 characters, "
         f"found {repr('x' * 513)[:80]}"),
        ({"nvidia": {**good["nvidia"], "gpus": [{"index": "0"}]}},
         "invalid probe.nvidia gpus[0]: field 'index' must be an integer, found '0'"),
        ({"cpu": None}, "invalid probe.cpu: expected a JSON object, found NoneType"),
    ]:
        with pytest.raises(ProbeError) as refused:
            parse_probe({**good, **changed}, "x")
        assert str(refused.value) == f"x: {message}"
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ProbeError, match="not a probe file: expected JSON written by `airgap probe`"):
        load_probe(tmp_path / "p.json")
