from __future__ import annotations

import os
from pathlib import Path

import pytest

from airgap.hardware.facts import MIB, GpuInfo, probe_host, visible_gpus
from airgap.hardware.probe import (
    ProbeParseError,
    cgroup_memory_files,
    parse_cgroup_memory_limit,
    parse_cpuinfo_cores,
    parse_meminfo,
    parse_nvidia_smi,
)

MEMINFO = """\
MemTotal:        8029600 kB
MemFree:          512000 kB
MemAvailable:    6815744 kB
Buffers:          102400 kB
Cached:          4194304 kB
SwapTotal:             0 kB
HugePages_Total:       0
"""

# `nvidia-smi --query-gpu=index,uuid,pci.bus_id,memory.total,memory.free,compute_cap,driver_version,name
#  --format=csv,noheader,nounits`
NVIDIA_SMI = """\
0, GPU-5c1e0e4e-7d0e-4a51-9d55-2f1f0c9a1b01, 00000000:01:00.0, 24564, 23880, 8.9, 580.65.06, NVIDIA GeForce RTX 4090
1, GPU-0b4f8c2d-1e2a-4d8e-b0c4-6a8e3c2f9d10, 00000000:41:00.0, 81559, 81003, 9.0, 580.65.06, NVIDIA H100 80GB HBM3
"""

# Two sockets' worth of a hyper-threaded CPU, cut to the fields that matter: 4 logical CPUs, 2 cores.
CPUINFO = "".join(
    f"processor\t: {cpu}\nmodel name\t: Example CPU\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n\n" for cpu in range(4)
)


def test_meminfo_gives_total_and_available_in_bytes() -> None:
    assert parse_meminfo(MEMINFO) == (8029600 * 1024, 6815744 * 1024)


def test_old_kernels_without_memavailable_use_free_plus_cache() -> None:
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 300 kB\n"
    assert parse_meminfo(text) == (1000 * 1024, 400 * 1024)


def test_meminfo_without_total_is_refused() -> None:
    with pytest.raises(ProbeParseError, match="expected a MemTotal line"):
        parse_meminfo("garbage\n")


def test_nvidia_smi_csv_gives_gpus_in_bytes() -> None:
    gpus = parse_nvidia_smi(NVIDIA_SMI)
    assert [(g["index"], g["name"], g["memory_total"], g["memory_free"], g["compute_capability"]) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4090", 24564 * MIB, 23880 * MIB, "8.9"),
        (1, "NVIDIA H100 80GB HBM3", 81559 * MIB, 81003 * MIB, "9.0"),
    ]
    assert {g["driver_version"] for g in gpus} == {"580.65.06"}


def test_nvidia_smi_rows_without_memory_figures_are_skipped() -> None:
    text = ("0, GPU-a, 00000000:01:00.0, [N/A], [N/A], 8.0, 580.65.06, NVIDIA A100-SXM4-40GB\n"
            "1, GPU-b, 00000000:02:00.0, 15360, 15000, 7.5, 580.65.06, Tesla T4\n")
    assert [g["index"] for g in parse_nvidia_smi(text)] == [1]


def test_nvidia_smi_garbage_is_refused() -> None:
    with pytest.raises(ProbeParseError, match="cannot read nvidia-smi output: expected 8 values"):
        parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")


def test_cuda_visible_devices_selects_and_orders_gpus() -> None:
    gpus = tuple(GpuInfo(g["index"], g["name"], g["memory_total"], g["memory_free"])
                 for g in parse_nvidia_smi(NVIDIA_SMI))
    assert visible_gpus(gpus, None) == gpus
    assert [g.index for g in visible_gpus(gpus, "1")] == [1]
    assert [g.index for g in visible_gpus(gpus, "1,0")] == [1, 0]
    assert visible_gpus(gpus, "") == ()
    assert visible_gpus(gpus, "-1") == ()
    assert visible_gpus(gpus, "GPU-8f6e1c2a") == gpus


def test_cpuinfo_counts_physical_cores_among_allowed_cpus() -> None:
    assert parse_cpuinfo_cores(CPUINFO) == 2
    assert parse_cpuinfo_cores(CPUINFO, frozenset({0, 2})) == 1
    assert parse_cpuinfo_cores("processor : 0\n") is None


def test_cgroup_limits() -> None:
    assert parse_cgroup_memory_limit("max\n") is None
    assert parse_cgroup_memory_limit("4294967296\n") == 4 << 30
    assert parse_cgroup_memory_limit("9223372036854771712\n") is None  # v1's "unlimited"


def test_cgroup_files_cover_v2_and_v1_and_every_ancestor(tmp_path: Path) -> None:
    text = "4:memory:/a/b\n0::/system.slice/airgap.service\n"
    files = cgroup_memory_files(text, tmp_path)
    assert tmp_path / "memory" / "a" / "b" / "memory.limit_in_bytes" in files
    assert tmp_path / "memory" / "memory.limit_in_bytes" in files
    assert tmp_path / "system.slice" / "airgap.service" / "memory.max" in files
    assert tmp_path / "memory.max" in files


def fake_proc(tmp_path: Path, cgroup: str = "0::/svc\n") -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "cpuinfo").write_text(CPUINFO)
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def fake_nvidia_smi(tmp_path: Path, output: str, status: int = 0) -> str:
    script = tmp_path / "nvidia-smi"
    (tmp_path / "out.txt").write_text(output)
    query = "--query-gpu=index,uuid,pci.bus_id,memory.total,memory.free,compute_cap,driver_version,name"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = {query} ] || exit 9\n"
                      f"cat {tmp_path / 'out.txt'}\nexit {status}\n")
    script.chmod(0o755)
    return str(script)


def test_probe_reads_memory_cpus_and_gpus(tmp_path: Path) -> None:
    cgroot = tmp_path / "cgroup"
    (cgroot / "svc").mkdir(parents=True)
    (cgroot / "svc" / "memory.max").write_text("max\n")
    host = probe_host(fake_proc(tmp_path), cgroot, fake_nvidia_smi(tmp_path, NVIDIA_SMI), environ={})
    assert (host.ram_total, host.ram_available) == parse_meminfo(MEMINFO)
    assert host.cpus == len(os.sched_getaffinity(0))
    assert 1 <= host.cores <= host.cpus
    assert [g.name for g in host.gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"]
    assert host.vram_free == (23880 + 81003) * MIB
    assert host.notes == ()


def test_probe_applies_a_cgroup_memory_limit(tmp_path: Path) -> None:
    cgroot = tmp_path / "cgroup"
    (cgroot / "svc").mkdir(parents=True)
    (cgroot / "svc" / "memory.max").write_text(f"{2 << 30}\n")
    host = probe_host(fake_proc(tmp_path), cgroot, None)
    assert host.ram_total == host.ram_available == 2 << 30
    assert any("cgroup" in note for note in host.notes)


def test_probe_without_nvidia_smi_or_with_a_failing_one_has_no_gpus(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert probe_host(proc, tmp_path, "no-such-nvidia-smi").gpus == ()
    failing = fake_nvidia_smi(tmp_path, "No devices were found\n", status=6)
    host = probe_host(proc, tmp_path, failing)
    assert host.gpus == ()
    assert any("No devices were found" in note for note in host.notes)


def test_probe_honours_cuda_visible_devices(tmp_path: Path) -> None:
    host = probe_host(fake_proc(tmp_path), tmp_path, fake_nvidia_smi(tmp_path, NVIDIA_SMI),
                      environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert [g.index for g in host.gpus] == [1]


def test_probe_of_this_machine_is_plausible() -> None:
    host = probe_host()
    assert 0 < host.ram_available <= host.ram_total
    assert host.cpus >= 1 and host.cores >= 1
