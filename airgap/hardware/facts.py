"""What this host offers a model server: RAM, CPU cores, NVIDIA GPUs and their free memory.

The facts come from `airgap.hardware.probe` (stdlib-only, so it also runs from a stick as `python3 probe.py`); this
module reads its JSON document, of this host or recorded on another one, into checked values (`HostFacts`)
and turns those into what the planner needs (`HostInfo`). A probe file is input from elsewhere: every field is
type- and size-checked, and a bad one is a one-line ProbeError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap.errors import ProbeError
from airgap.format.fields import Fields
from airgap.hardware import probe

MIB = 1 << 20
GIB = 1 << 30
MAX_PROBE_BYTES = 4 << 20
_MAX_TEXT = 512
_MAX_ITEMS = 4096


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    memory_free: int
    compute_capability: str | None = None
    uuid: str | None = None


@dataclass(frozen=True)
class HostInfo:
    """Memory in bytes. `ram_available` is what the kernel could give us now without swapping."""

    ram_total: int
    ram_available: int
    cpus: int
    cores: int
    gpus: tuple[GpuInfo, ...] = ()
    notes: tuple[str, ...] = ()
    driver_version: str | None = None  # the NVIDIA driver's, "580.65.06"; None without one (or unknown)

    @property
    def vram_free(self) -> int:
        return sum(g.memory_free for g in self.gpus)

    def to_dict(self) -> dict[str, object]:
        return {
            "ram_total": self.ram_total, "ram_available": self.ram_available, "cpus": self.cpus, "cores": self.cores,
            "gpus": [
                {"index": g.index, "name": g.name, "memory_total": g.memory_total, "memory_free": g.memory_free,
                 "compute_capability": g.compute_capability}
                for g in self.gpus
            ],
            "notes": list(self.notes), "driver_version": self.driver_version,
        }


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    uuid: str | None
    bus_id: str | None
    memory_total: int | None  # None where only /proc/driver/nvidia was readable
    memory_free: int | None
    compute_capability: str | None  # "9.0"


@dataclass(frozen=True)
class HostFacts:
    """One probe document (airgap.hardware.probe), checked. Sizes in bytes; None is unknown."""

    python_version: str  # "3.11.7"
    implementation: str  # "cpython"
    abi: str | None  # "cp311"
    machine: str  # "x86_64"
    glibc: str | None  # "2.36"
    musl: str | None
    platform_tags: tuple[str, ...]
    cpu_model: str | None
    x86_64_level: int | None
    usable_cpus: int
    cores: int | None
    ram_total: int
    ram_available: int
    cgroup_limit: int | None
    disk_prefix: str | None
    disk_free: int | None
    driver_version: str | None
    gpu_source: str | None
    gpu_note: str | None
    cuda_visible_devices: str | None
    gpus: tuple[GpuFacts, ...] = ()
    cpu_flags: tuple[str, ...] = ()  # as /proc/cpuinfo names them; empty when the probe could not read them

    @property
    def python_minor(self) -> str:
        return ".".join(self.python_version.split(".")[:2])

    @property
    def wheel_platform(self) -> str | None:
        """The most specific manylinux/musllinux tag (wheel resolution expands it to the older ones)."""
        tagged = [t for t in self.platform_tags if t.startswith(("manylinux_", "musllinux_"))]
        return tagged[0] if tagged else (self.platform_tags[0] if self.platform_tags else None)

    def to_dict(self) -> dict[str, Any]:
        """The probe document again, without the CPU flags and the list of mounts (what a manifest records)."""
        return {
            "_type": probe.PROBE_TYPE, "probe_format": probe.PROBE_FORMAT,
            "python": {"version": self.python_version, "implementation": self.implementation, "abi": self.abi},
            "platform": {"machine": self.machine, "glibc": self.glibc, "musl": self.musl,
                         "tags": list(self.platform_tags)},
            "cpu": {"model": self.cpu_model, "x86_64_level": self.x86_64_level, "usable_cpus": self.usable_cpus,
                    "cores": self.cores},
            "memory": {"total": self.ram_total, "available": self.ram_available, "cgroup_limit": self.cgroup_limit},
            "disk": {"prefix": self.disk_prefix, "free": self.disk_free},
            "nvidia": {
                "driver_version": self.driver_version, "source": self.gpu_source, "note": self.gpu_note,
                "cuda_visible_devices": self.cuda_visible_devices,
                "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid, "bus_id": g.bus_id,
                          "memory_total": g.memory_total, "memory_free": g.memory_free,
                          "compute_capability": g.compute_capability} for g in self.gpus],
            },
        }


def parse_probe(raw: object, where: str) -> HostFacts:
    """Check a probe document (as JSON-decoded) field by field; ProbeError names the first bad one."""
    doc = Fields(raw, "probe", error=lambda message: ProbeError(f"{where}: {message}"))
    if doc.text("_type", longest=_MAX_TEXT) != probe.PROBE_TYPE:
        raise ProbeError(f"{where}: not an airgap probe: expected _type {probe.PROBE_TYPE!r}, "
                         f"found {doc.raw.get('_type')!r}")
    if doc.num("probe_format") != probe.PROBE_FORMAT:
        raise ProbeError(f"{where}: unsupported probe format: this airgap reads format {probe.PROBE_FORMAT}, "
                         f"found {doc.raw.get('probe_format')!r}")
    python, platform, cpu = doc.sub("python"), doc.sub("platform"), doc.sub("cpu")
    memory, disk, nvidia = doc.sub("memory"), doc.sub("disk"), doc.sub("nvidia")
    version = python.text("version", longest=_MAX_TEXT)
    if not all(part.isdigit() for part in version.split(".")) or version.count(".") not in (1, 2):
        raise ProbeError(f"{where}: python.version must look like 3.11.7, found {version!r}")
    level = cpu.optional_num("x86_64_level")
    if level is not None and not 1 <= level <= 4:
        raise ProbeError(f"{where}: cpu.x86_64_level must be 1 to 4, found {level}")
    total = memory.num("total")
    tags = platform.texts("tags", longest=_MAX_TEXT, limit=_MAX_ITEMS)
    if not tags:
        raise ProbeError(f"{where}: platform.tags must list this host's wheel tags, found none")
    return HostFacts(
        python_version=version, implementation=python.text("implementation", longest=_MAX_TEXT, empty=False),
        abi=python.optional_text("abi", longest=_MAX_TEXT),
        machine=platform.text("machine", longest=_MAX_TEXT, empty=False),
        glibc=platform.optional_text("glibc", longest=_MAX_TEXT),
        musl=platform.optional_text("musl", longest=_MAX_TEXT),
        platform_tags=tags,
        cpu_model=cpu.optional_text("model", longest=_MAX_TEXT), x86_64_level=level,
        usable_cpus=max(cpu.num("usable_cpus"), 1), cores=cpu.optional_num("cores"),
        ram_total=total, ram_available=min(memory.num("available"), total),
        cgroup_limit=memory.optional_num("cgroup_limit"),
        disk_prefix=disk.optional_text("prefix", longest=_MAX_TEXT), disk_free=disk.optional_num("free"),
        driver_version=nvidia.optional_text("driver_version", longest=_MAX_TEXT),
        gpu_source=nvidia.optional_text("source", longest=_MAX_TEXT),
        gpu_note=nvidia.optional_text("note", longest=_MAX_TEXT),
        cuda_visible_devices=nvidia.optional_text("cuda_visible_devices", longest=_MAX_TEXT),
        gpus=tuple(_gpu(g, where) for g in nvidia.objects("gpus", limit=64)),
        cpu_flags=cpu.texts("flags", longest=_MAX_TEXT, limit=_MAX_ITEMS),
    )


def _gpu(doc: Fields, where: str) -> GpuFacts:
    capability = doc.optional_text("compute_capability", longest=_MAX_TEXT)
    if capability is not None and not (capability.replace(".", "", 1).isdigit() and "." in capability):
        raise ProbeError(f"{where}: {doc.what}.compute_capability must look like 9.0, found {capability!r}")
    return GpuFacts(
        index=doc.num("index"), name=doc.text("name", longest=_MAX_TEXT),
        uuid=doc.optional_text("uuid", longest=_MAX_TEXT),
        bus_id=doc.optional_text("bus_id", longest=_MAX_TEXT), memory_total=doc.optional_num("memory_total"),
        memory_free=doc.optional_num("memory_free"), compute_capability=capability,
    )


def load_probe(path: Path) -> HostFacts:
    """Read a probe file (`airgap probe -o FILE`, or `python3 probe.py -o FILE` on the target host)."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_PROBE_BYTES + 1)
    except OSError as exc:
        raise ProbeError(f"cannot read probe file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PROBE_BYTES:
        raise ProbeError(f"{path}: too large for a probe file: limit {MAX_PROBE_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path}: not a probe file: expected JSON written by `airgap probe`, found {exc}") from exc
    return parse_probe(raw, str(path))


def probe_facts(
    prefix: Path = Path("/opt/airgap"), *,
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    nvidia_smi: str | None = "nvidia-smi",
    environ: Mapping[str, str] = os.environ,
) -> HostFacts:
    """This host's facts, read now."""
    try:
        raw = probe.collect(prefix, proc=proc, cgroup_root=cgroup_root, nvidia_smi=nvidia_smi, environ=environ)
    except probe.ProbeParseError as exc:
        raise ProbeError(str(exc)) from exc
    return parse_probe(raw, "this host")


def host_info(facts: HostFacts) -> HostInfo:
    """What the planner uses: memory capped by the cgroup, the GPUs CUDA_VISIBLE_DEVICES leaves visible."""
    notes: list[str] = []
    total, available = facts.ram_total, facts.ram_available
    if facts.cgroup_limit is not None and facts.cgroup_limit < total:
        notes.append(f"memory is capped by a cgroup limit of {facts.cgroup_limit / GIB:.1f} GiB")
        total, available = facts.cgroup_limit, min(available, facts.cgroup_limit)
    if facts.gpu_note:
        notes.append(f"{facts.gpu_note}; planning without GPUs")
    gpus: list[GpuInfo] = []
    for gpu in facts.gpus:
        if gpu.memory_total is None or gpu.memory_free is None:
            notes.append(f"GPU {gpu.index} ({gpu.name}): memory unknown without nvidia-smi; planning without it")
            continue
        gpus.append(GpuInfo(index=gpu.index, name=gpu.name, memory_total=gpu.memory_total,
                            memory_free=gpu.memory_free, compute_capability=gpu.compute_capability, uuid=gpu.uuid))
    cores = facts.cores or facts.usable_cpus
    return HostInfo(
        ram_total=total, ram_available=available, cpus=facts.usable_cpus, cores=min(cores, facts.usable_cpus),
        gpus=visible_gpus(tuple(gpus), facts.cuda_visible_devices), notes=tuple(notes),
        driver_version=facts.driver_version,
    )


def probe_host(
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    nvidia_smi: str | None = "nvidia-smi",
    environ: Mapping[str, str] = os.environ,
) -> HostInfo:
    return host_info(probe_facts(proc=proc, cgroup_root=cgroup_root, nvidia_smi=nvidia_smi, environ=environ))


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
