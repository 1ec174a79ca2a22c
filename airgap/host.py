"""What this host offers a model server: RAM, CPU cores, NVIDIA GPUs and their free memory.

Parsing is done by pure functions on text (so tests feed them recorded /proc files and nvidia-smi output);
`probe_host` is the only function that reads the system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from airgap.errors import ServeError

MIB = 1 << 20
NVIDIA_SMI_QUERY = ("--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 15.0
_CGROUP_V1_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class HostInfo:
    """Memory in bytes. `ram_available` is what the kernel could give us now without swapping."""

    ram_total: int
    ram_available: int
    cpus: int
    cores: int
    gpus: tuple[GpuInfo, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def vram_free(self) -> int:
        return sum(g.memory_free for g in self.gpus)

    def to_dict(self) -> dict[str, object]:
        return {
            "ram_total": self.ram_total, "ram_available": self.ram_available, "cpus": self.cpus, "cores": self.cores,
            "gpus": [
                {"index": g.index, "name": g.name, "memory_total": g.memory_total, "memory_free": g.memory_free}
                for g in self.gpus
            ],
            "notes": list(self.notes),
        }


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo text."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            unit = fields[1].lower() if len(fields) > 1 else ""
            values[key.strip()] = int(fields[0]) * (1024 if unit == "kb" else 1)
    if "MemTotal" not in values:
        raise ServeError("cannot read host memory: expected a MemTotal line in /proc/meminfo, found none")
    total = values["MemTotal"]
    # Kernels before 3.14 lack MemAvailable; free + reclaimable page cache is the classic estimate.
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return total, min(available, total)


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits`.

    Memory is reported in MiB. A GPU whose memory reads "[N/A]" (e.g. a MIG parent) is left out.
    """
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            raise ServeError(f"cannot read nvidia-smi output: expected 'index, name, total, free', found {line!r}")
        index, total, free = fields[0], fields[-2], fields[-1]
        name = ",".join(fields[1:-2]).strip()
        if not (index.isdigit() and total.isdigit() and free.isdigit()):
            if "N/A" in total or "N/A" in free:
                continue
            raise ServeError(f"cannot read nvidia-smi output: expected numbers in MiB, found {line!r}")
        gpus.append(GpuInfo(index=int(index), name=name, memory_total=int(total) * MIB, memory_free=int(free) * MIB))
    return tuple(gpus)


def visible_gpus(gpus: tuple[GpuInfo, ...], cuda_visible_devices: str | None) -> tuple[GpuInfo, ...]:
    """Apply CUDA_VISIBLE_DEVICES when it lists indexes; UUIDs and MIG names leave the list as is."""
    if cuda_visible_devices is None:
        return gpus
    wanted = [part.strip() for part in cuda_visible_devices.split(",") if part.strip()]
    if not wanted or wanted[0].startswith("-"):
        return ()
    if not all(part.isdigit() for part in wanted):
        return gpus
    order: list[int] = []
    for part in wanted:
        if int(part) in order:
            break
        order.append(int(part))
    by_index = {g.index: g for g in gpus}
    return tuple(by_index[i] for i in order if i in by_index)


def parse_cpuinfo_cores(text: str, allowed_cpus: frozenset[int] | None = None) -> int | None:
    """Physical cores among the allowed logical CPUs, from /proc/cpuinfo; None when it does not say."""
    cores: set[tuple[str, str]] = set()
    processor: int | None = None
    physical = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor" and value.isdigit():
            processor = int(value)
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not line.strip():
            if processor is not None and core is not None and (allowed_cpus is None or processor in allowed_cpus):
                cores.add((physical or "0", core))
            processor = physical = core = None
    return len(cores) or None


def parse_cgroup_memory_limit(text: str) -> int | None:
    """A cgroup's memory limit (v2 memory.max or v1 memory.limit_in_bytes); None when unlimited."""
    value = text.strip()
    if value == "max" or not value.isdigit():
        return None
    limit = int(value)
    return None if limit >= _CGROUP_V1_UNLIMITED else limit


def cgroup_memory_files(proc_self_cgroup: str, cgroup_root: Path) -> list[Path]:
    """The memory-limit files of this process's cgroup and its ancestors (v2 and v1 layouts)."""
    candidates: list[Path] = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            candidates.append(base.joinpath(*parts[:depth], name))
    return candidates


def probe_host(
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    nvidia_smi: str | None = "nvidia-smi",
    environ: Mapping[str, str] = os.environ,
) -> HostInfo:
    total, available = parse_meminfo(_read(proc / "meminfo") or "")
    notes: list[str] = []
    limit = _cgroup_limit(proc, cgroup_root)
    if limit is not None and limit < total:
        notes.append(f"memory is capped by a cgroup limit of {limit / (1 << 30):.1f} GiB")
        total, available = limit, min(available, limit)
    allowed = frozenset(os.sched_getaffinity(0))
    cores = parse_cpuinfo_cores(_read(proc / "cpuinfo") or "", allowed) or len(allowed)
    gpus, gpu_note = _probe_gpus(nvidia_smi, environ)
    if gpu_note:
        notes.append(gpu_note)
    return HostInfo(
        ram_total=total, ram_available=available, cpus=len(allowed), cores=min(cores, len(allowed)),
        gpus=gpus, notes=tuple(notes),
    )


def _cgroup_limit(proc: Path, cgroup_root: Path) -> int | None:
    limits = [
        parse_cgroup_memory_limit(_read(path) or "max")
        for path in cgroup_memory_files(_read(proc / "self" / "cgroup") or "", cgroup_root)
    ]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _probe_gpus(nvidia_smi: str | None, environ: Mapping[str, str]) -> tuple[tuple[GpuInfo, ...], str]:
    executable = shutil.which(nvidia_smi) if nvidia_smi else None
    if executable is None:
        return (), ""
    try:
        result = subprocess.run(
            [executable, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (), f"nvidia-smi did not answer ({exc}); planning without GPUs"
    if result.returncode != 0:
        reason = (result.stdout + result.stderr).strip().splitlines()[:1] or [f"exit status {result.returncode}"]
        return (), f"nvidia-smi failed ({reason[0]}); planning without GPUs"
    return visible_gpus(parse_nvidia_smi(result.stdout), environ.get("CUDA_VISIBLE_DEVICES")), ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
