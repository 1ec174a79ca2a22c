"""`airgap probe`: the facts of this host that a bundle must be built for, as one JSON document.

Runs on the isolated host without airgap installed: `python3 -I probe.py [--prefix P] [-o probe.json]`.
It imports nothing but the standard library (not even the rest of airgap; a test holds it to that), so
`airgap copy` puts this one file on the stick beside the bundle. Every parser is a pure function on text,
so tests feed it recorded /proc files and nvidia-smi output; `collect` is the only code that reads the system.

Unknown facts are null. Sizes are bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PROBE_FORMAT = 1
PROBE_TYPE = "airgap/probe"
MIB = 1 << 20
NVIDIA_SMI_TIMEOUT_S = 15.0
# name last: it is the one field that may itself contain commas
GPU_FIELDS = ("index", "uuid", "pci.bus_id", "memory.total", "memory.free", "compute_cap", "driver_version", "name")
GPU_FIELDS_OLD = tuple(f for f in GPU_FIELDS if f != "compute_cap")  # drivers before R510 lack compute_cap
_CGROUP_V1_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-rounded number
_PSEUDO_FS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "pstore", "bpf", "debugfs",
    "tracefs", "configfs", "fusectl", "mqueue", "hugetlbfs", "autofs", "binfmt_misc", "rpc_pipefs", "nsfs",
    "efivarfs", "selinuxfs", "ramfs", "squashfs", "overlay", "tmpfs", "devfs",
})

# x86-64 micro-architecture levels (x86-64 psABI), as /proc/cpuinfo names the flags (pni = SSE3, abm = LZCNT).
X86_64_LEVELS: tuple[tuple[int, frozenset[str]], ...] = (
    (2, frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})),
    (3, frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})),
    (4, frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)
# The newest glibc minor of each older major, as packaging.tags assumes (glibc 1.x never had manylinux tags).
_LAST_GLIBC_MINOR = {1: -1}
_LEGACY_MANYLINUX = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
_MANYLINUX_ARCHS = frozenset({"x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x", "loongarch64",
                              "riscv64"})


class ProbeParseError(ValueError):
    """A system file or tool answered something this probe cannot read."""


# ---------------------------------------------------------------- memory

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
        raise ProbeParseError("cannot read host memory: expected a MemTotal line in /proc/meminfo, found none")
    total = values["MemTotal"]
    # Kernels before 3.14 lack MemAvailable; free + reclaimable page cache is the classic estimate.
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return total, min(available, total)


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


# ---------------------------------------------------------------- CPU

def parse_cpuinfo_cores(text: str, allowed_cpus: frozenset[int] | None = None) -> int | None:
    """Physical cores among the allowed logical CPUs, from /proc/cpuinfo; None when it does not say."""
    cores: set[tuple[str, str]] = set()
    for block in _cpuinfo_blocks(text):
        processor, core = block.get("processor", ""), block.get("core id")
        if processor.isdigit() and core is not None and (allowed_cpus is None or int(processor) in allowed_cpus):
            cores.add((block.get("physical id") or "0", core))
    return len(cores) or None


def parse_cpuinfo_model(text: str) -> tuple[str | None, tuple[str, ...]]:
    """(model name, sorted flags) of the first CPU in /proc/cpuinfo; (None, ()) when it does not say."""
    for block in _cpuinfo_blocks(text):
        model = block.get("model name") or block.get("Model") or block.get("cpu model")
        flags = block.get("flags") or block.get("Features") or ""
        if model or flags:
            return model or None, tuple(sorted(set(flags.split())))
    return None, ()


def _cpuinfo_blocks(text: str) -> Iterator[dict[str, str]]:
    block: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if block:
                yield block
            block = {}
            continue
        key, _, value = (part.strip() for part in line.partition(":"))
        block.setdefault(key, value)


X86_64_MACHINES = ("x86_64", "amd64", "AMD64")  # what platform.machine() and uname call x86-64


def x86_64_level(machine: str, flags: Sequence[str]) -> int | None:
    """The x86-64 micro-architecture level (1..4) these CPU flags reach; None off x86-64."""
    if machine not in X86_64_MACHINES:
        return None
    present = set(flags)
    level = 1
    for candidate, needed in X86_64_LEVELS:
        if not needed <= present:
            break
        level = candidate
    return level


# ---------------------------------------------------------------- Python and platform tags

def parse_glibc_version(text: str | None) -> tuple[int, int] | None:
    """(major, minor) from os.confstr('CS_GNU_LIBC_VERSION') text such as 'glibc 2.36'; None otherwise."""
    match = re.fullmatch(r"glibc (\d+)\.(\d+)\S*", (text or "").strip())
    return (int(match[1]), int(match[2])) if match else None


def parse_musl_version(loader_output: str) -> tuple[int, int] | None:
    """(major, minor) from what the musl dynamic loader prints when run bare ('musl libc ...\\nVersion 1.2.4')."""
    lines = [line.strip() for line in loader_output.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("musl"):
        return None
    match = re.match(r"Version (\d+)\.(\d+)", lines[1])
    return (int(match[1]), int(match[2])) if match else None


def elf_interpreter(header: bytes) -> str | None:
    """The PT_INTERP path of an ELF executable from its first bytes (the program headers); None when absent."""
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) or header[5] not in (1, 2):
        return None
    wide = header[4] == 2
    order = "<" if header[5] == 1 else ">"
    word = "Q" if wide else "I"
    (phoff,) = struct.unpack_from(order + word, header, 32 if wide else 28)
    phentsize, phnum = struct.unpack_from(order + "HH", header, 54 if wide else 42)
    # (offset, size) positions inside one program header: Elf64_Phdr and Elf32_Phdr differ
    offset_at, size_at, entry_size = (8, 32, 56) if wide else (4, 16, 32)
    for i in range(phnum):
        start = phoff + i * phentsize
        if start + entry_size > len(header):
            return None
        if struct.unpack_from(order + "I", header, start)[0] != 3:  # PT_INTERP
            continue
        (offset,) = struct.unpack_from(order + word, header, start + offset_at)
        (size,) = struct.unpack_from(order + word, header, start + size_at)
        raw = header[offset:offset + size]
        return raw.rstrip(b"\0").decode("ascii", "replace") if len(raw) == size else None
    return None


def linux_archs(platform_name: str, is_32bit: bool) -> tuple[str, list[str]]:
    """(the linux_* tag, its architectures) as packaging.tags derives them from sysconfig.get_platform()."""
    linux = re.sub(r"[^A-Za-z0-9]+", "_", platform_name)
    if is_32bit:
        linux = {"linux_x86_64": "linux_i686", "linux_aarch64": "linux_armv8l"}.get(linux, linux)
    _, _, arch = linux.partition("_")
    return linux, {"armv8l": ["armv8l", "armv7l"]}.get(arch, [arch])


def platform_tags(
    platform_name: str, *, is_32bit: bool, glibc: tuple[int, int] | None, musl: tuple[int, int] | None,
) -> list[str]:
    """The wheel platform tags this host runs, most specific first, as packaging.tags (26) orders them on Linux:
    linux_* (a wheel built here), manylinux_2_N down to the oldest for the architecture with the legacy
    aliases, then musllinux."""
    linux, archs = linux_archs(platform_name, is_32bit)
    if not linux.startswith("linux_"):
        return [linux]
    tags = [f"linux_{arch}" for arch in archs]
    if glibc is not None and set(archs) & _MANYLINUX_ARCHS:
        oldest = (2, 4) if set(archs) & {"x86_64", "i686"} else (2, 16)  # the newest glibc *too old* for a tag
        majors = [glibc, *((major, _LAST_GLIBC_MINOR.get(major, -1)) for major in range(glibc[0] - 1, 1, -1))]
        for arch in archs:
            for major, newest in majors:
                floor = oldest[1] if major == oldest[0] else -1
                for minor in range(newest, floor, -1):
                    tags.append(f"manylinux_{major}_{minor}_{arch}")
                    if (major, minor) in _LEGACY_MANYLINUX:
                        tags.append(f"{_LEGACY_MANYLINUX[(major, minor)]}_{arch}")
    if musl is not None:
        tags += [f"musllinux_{musl[0]}_{minor}_{arch}" for arch in archs for minor in range(musl[1], -1, -1)]
    return tags


# ---------------------------------------------------------------- NVIDIA

def parse_nvidia_smi(text: str, fields: Sequence[str] = GPU_FIELDS) -> list[dict[str, Any]]:
    """GPUs from `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` (memory in MiB, name last).

    A value nvidia-smi cannot give ("[N/A]", "[Not Supported]") is null; a GPU without memory figures (a MIG
    parent) is left out.
    """
    gpus: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(",", len(fields) - 1)]
        if len(values) != len(fields):
            raise ProbeParseError(
                f"cannot read nvidia-smi output: expected {len(fields)} values ({', '.join(fields)}), found {line!r}")
        row = {field: (None if value.startswith("[") else value) for field, value in zip(fields, values, strict=True)}
        index, total, free = row["index"], row["memory.total"], row["memory.free"]
        if index is None or not index.isdigit():
            raise ProbeParseError(f"cannot read nvidia-smi output: expected a GPU index first, found {line!r}")
        if total is None or free is None:
            continue
        if not (total.isdigit() and free.isdigit()):
            raise ProbeParseError(f"cannot read nvidia-smi output: expected memory in MiB, found {line!r}")
        capability = row.get("compute_cap")
        if capability is not None and re.fullmatch(r"\d+\.\d+", capability) is None:
            raise ProbeParseError(f"cannot read nvidia-smi output: expected a compute capability like 9.0, "
                                  f"found {capability!r}")
        gpus.append({
            "index": int(index), "name": row.get("name") or "", "uuid": row.get("uuid"),
            "bus_id": row.get("pci.bus_id"), "memory_total": int(total) * MIB, "memory_free": int(free) * MIB,
            "compute_capability": capability, "driver_version": row.get("driver_version"),
        })
    return gpus


def parse_driver_version(text: str) -> str | None:
    """The kernel module version from /proc/driver/nvidia/version ('... Kernel Module  580.65.06  ...')."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)\b", text)
    return match[1] if match else None


def parse_gpu_information(text: str) -> dict[str, str]:
    """The key: value lines of /proc/driver/nvidia/gpus/<bus>/information ('Model', 'GPU UUID', 'Bus Location')."""
    facts: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            facts[key.strip()] = value.strip()
    return facts


def gpus_from_proc(information: Mapping[str, str], driver_version: str | None) -> list[dict[str, Any]]:
    """GPUs from the driver's /proc files (bus id -> information text): names and ids, no memory figures."""
    gpus: list[dict[str, Any]] = []
    for position, (bus, text) in enumerate(sorted(information.items())):
        facts = parse_gpu_information(text)
        minor = facts.get("Device Minor", "")
        gpus.append({
            "index": int(minor) if minor.isdigit() else position, "name": facts.get("Model", ""),
            "uuid": facts.get("GPU UUID"), "bus_id": facts.get("Bus Location", bus),
            "memory_total": None, "memory_free": None, "compute_capability": None, "driver_version": driver_version,
        })
    return gpus


# ---------------------------------------------------------------- disks

def parse_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) from /proc/self/mounts, octal escapes decoded."""
    mounts: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
            mounts.append((point, fields[2]))
    return mounts


def mount_of(path: str, mounts: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The mount (point, type) holding an absolute path: the longest mount point that is a prefix of it."""
    best: tuple[str, str] | None = None
    for point, fstype in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing parent: where a prefix that does not exist yet would be made."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


# ---------------------------------------------------------------- reading this host

def collect(
    prefix: Path = Path("/opt/airgap"), *,
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    nvidia_smi: str | None = "nvidia-smi",
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """This host's facts as a JSON-ready mapping (see docs/FORMAT.md, "Probe")."""
    total, available = parse_meminfo(_read(proc / "meminfo") or "")
    limits = [parse_cgroup_memory_limit(_read(path) or "max")
              for path in cgroup_memory_files(_read(proc / "self" / "cgroup") or "", cgroup_root)]
    known = [limit for limit in limits if limit is not None]
    cpuinfo = _read(proc / "cpuinfo") or ""
    model, flags = parse_cpuinfo_model(cpuinfo)
    allowed = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(
        range(os.cpu_count() or 1))
    machine = os.uname().machine
    glibc, musl = _libc()
    is_32bit = sys.maxsize <= 2**32
    return {
        "_type": PROBE_TYPE,
        "probe_format": PROBE_FORMAT,
        "python": {
            "version": ".".join(str(part) for part in sys.version_info[:3]),
            "implementation": sys.implementation.name,
            "abi": _abi_tag(),
        },
        "platform": {
            "system": os.uname().sysname, "machine": machine, "kernel": os.uname().release,
            "glibc": None if glibc is None else f"{glibc[0]}.{glibc[1]}",
            "musl": None if musl is None else f"{musl[0]}.{musl[1]}",
            "tags": platform_tags(sysconfig.get_platform(), is_32bit=is_32bit, glibc=glibc, musl=musl),
        },
        "cpu": {
            "model": model, "flags": list(flags), "x86_64_level": x86_64_level(machine, flags),
            "logical_cpus": os.cpu_count(), "usable_cpus": len(allowed),
            "cores": parse_cpuinfo_cores(cpuinfo, allowed),
        },
        "memory": {"total": total, "available": available, "cgroup_limit": min(known) if known else None},
        "disk": _disk(prefix, proc),
        "nvidia": _nvidia(proc, nvidia_smi, environ),
    }


def _libc() -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    try:
        glibc = parse_glibc_version(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, OSError, ValueError):
        glibc = None
    if glibc is not None:
        return glibc, None
    try:
        with open(sys.executable, "rb") as stream:
            interpreter = elf_interpreter(stream.read(4096))
    except OSError:
        return None, None
    if interpreter is None or "musl" not in interpreter:
        return None, None
    try:
        loader = subprocess.run([interpreter], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return None, parse_musl_version(loader.stderr)


def _abi_tag() -> str | None:
    """cp311 and friends; None for interpreters whose ABI tag this probe cannot name."""
    if sys.implementation.name != "cpython":
        return None
    flags = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    return f"cp{sys.version_info[0]}{sys.version_info[1]}{flags}"


def _disk(prefix: Path, proc: Path) -> dict[str, Any]:
    checked = nearest_existing(prefix)
    stat = os.statvfs(checked)
    mount = mount_of(str(checked.resolve()), parse_mounts(_read(proc / "self" / "mounts") or ""))
    return {
        "prefix": str(prefix), "checked": str(checked),
        "mount_point": None if mount is None else mount[0], "fstype": None if mount is None else mount[1],
        "total": stat.f_blocks * stat.f_frsize, "free": stat.f_bavail * stat.f_frsize,
        "mounts": _mounts(proc),
    }


def _mounts(proc: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for point, fstype in parse_mounts(_read(proc / "self" / "mounts") or ""):
        if fstype in _PSEUDO_FS or any(m["mount_point"] == point for m in found):
            continue
        try:
            stat = os.statvfs(point)
        except OSError:
            continue
        found.append({"mount_point": point, "fstype": fstype, "total": stat.f_blocks * stat.f_frsize,
                      "free": stat.f_bavail * stat.f_frsize})
    return found


def _nvidia(proc: Path, nvidia_smi: str | None, environ: Mapping[str, str]) -> dict[str, Any]:
    driver = parse_driver_version(_read(proc / "driver" / "nvidia" / "version") or "")
    gpus: list[dict[str, Any]] = []
    source: str | None = None
    note: str | None = None
    executable = shutil.which(nvidia_smi) if nvidia_smi else None
    if executable is not None:
        fields: Sequence[str] = GPU_FIELDS
        answer, note = _run_nvidia_smi(executable, fields)
        if answer is None and note is not None and "compute_cap" in note:  # a driver older than R510
            fields = GPU_FIELDS_OLD
            answer, note = _run_nvidia_smi(executable, fields)
        if answer is not None:
            try:
                gpus, source, note = parse_nvidia_smi(answer, fields), "nvidia-smi", None
            except ProbeParseError as exc:
                note = str(exc)
    if source is None:
        information = {path.name: _read(path / "information") or ""
                       for path in _listdir(proc / "driver" / "nvidia" / "gpus")}
        if information:
            gpus, source = gpus_from_proc(information, driver), "/proc/driver/nvidia"
    driver = driver or next((g["driver_version"] for g in gpus if g.get("driver_version")), None)
    return {"driver_version": driver, "source": source, "note": note,
            "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"), "gpus": gpus}


def _run_nvidia_smi(executable: str, fields: Sequence[str]) -> tuple[str | None, str | None]:
    try:
        result = subprocess.run(
            [executable, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi did not answer ({exc})"
    if result.returncode != 0:
        reason = (result.stdout + result.stderr).strip().splitlines()[:1] or [f"exit status {result.returncode}"]
        return None, f"nvidia-smi failed ({reason[0]})"
    return result.stdout, None


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe.py", description=(
        "Write this host's facts (Python, platform tags, glibc, CPU level, RAM, disk, NVIDIA GPUs) as JSON, "
        "for `airgap build --target` on the connected host."))
    parser.add_argument("--prefix", type=Path, default=Path("/opt/airgap"),
                        help="Where airgap will install (its free space is recorded). Default: /opt/airgap.")
    parser.add_argument("-o", "--out", default="-", help="File to write (default: standard output).")
    args = parser.parse_args(argv)
    try:
        text = json.dumps(collect(args.prefix), indent=2, sort_keys=True) + "\n"
        if args.out == "-":
            sys.stdout.write(text)
        else:
            Path(args.out).write_text(text, encoding="utf-8")
    except (OSError, ProbeParseError) as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 1
    if args.out != "-":
        print(f"wrote {args.out}: carry it to the connected host for `airgap build --target {args.out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
