"""The host a bundle is built for: the CUDA driver floor, the engine it can run, and how another host differs.

Pure functions on HostFacts (airgap.hardware.facts); no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airgap.errors import ProbeError
from airgap.hardware.facts import HostFacts, HostInfo, parse_probe
from airgap.hardware.probe import X86_64_MACHINES

CUDA_MAJOR = 13
CUDA_DRIVER_FLOOR = 580  # CUDA 13.0 needs an NVIDIA driver of branch R580 or newer (Linux 580.65.06 shipped it)
_SAME_MEMORY = 0.97  # kernels and firmware reserve slightly different amounts of the same RAM


def driver_branch(version: str | None) -> int | None:
    """580 from '580.65.06'; None when the version is unknown or unreadable."""
    match = re.match(r"(\d+)\.", version or "")
    return int(match[1]) if match else None


def meets_cuda_floor(version: str | None) -> bool | None:
    """Whether a driver runs the CUDA 13 engine; None when the version is unknown."""
    branch = driver_branch(version)
    return None if branch is None else branch >= CUDA_DRIVER_FLOOR


def no_usable_gpu(host: HostInfo, cuda: bool) -> str | None:
    """Why an engine built with a GPU backend cannot use this host's GPUs, in a few words; None when it can.

    Only NVIDIA GPUs are probed, so a host without one has no usable GPU; the driver floor applies to the
    CUDA backend (`cuda`), which fails to initialise on an older driver.
    """
    if not host.gpus:
        return "none found on this host"
    if not cuda:
        return None
    meets = meets_cuda_floor(host.driver_version)
    if meets is None:
        return f"NVIDIA driver version unknown; the CUDA {CUDA_MAJOR} engine needs R{CUDA_DRIVER_FLOOR} or newer"
    if not meets:
        return (f"NVIDIA driver {host.driver_version} is older than R{CUDA_DRIVER_FLOOR}, which the CUDA "
                f"{CUDA_MAJOR} engine needs")
    return None


def driver_report(facts: HostFacts, vulkan: bool = False) -> dict[str, Any]:
    """What `plan` says about the NVIDIA driver against the CUDA engine's floor; `vulkan`: the installed engine
    carries the Vulkan backend, which serves on a driver below that floor."""
    meets = meets_cuda_floor(facts.driver_version)
    below = "the Vulkan engine serves" if vulkan else "the CPU engine serves"
    if not facts.gpus and facts.driver_version is None:
        line = "no NVIDIA driver: the CPU engine serves"
    elif meets is None:
        line = f"NVIDIA driver version unknown: the CUDA {CUDA_MAJOR} engine needs R{CUDA_DRIVER_FLOOR} or newer"
    elif meets:
        line = f"NVIDIA driver {facts.driver_version} meets the CUDA {CUDA_MAJOR} floor (R{CUDA_DRIVER_FLOOR} or newer)"
    else:
        line = (f"NVIDIA driver {facts.driver_version} is older than R{CUDA_DRIVER_FLOOR}, which the CUDA "
                f"{CUDA_MAJOR} engine needs: {below}")
    return {"version": facts.driver_version, "cuda_major": CUDA_MAJOR, "floor": CUDA_DRIVER_FLOOR,
            "meets_floor": meets, "summary": line}


# The /proc/cpuinfo flags behind each feature ggml's x86 CPU backend checks at start, with the weight ggml's
# ggml_backend_cpu_x86_score gives it (ggml/src/ggml-cpu/arch/x86/cpu-feats.cpp of the pinned sdist).
GGML_X86_FEATURES: Mapping[str, tuple[int, tuple[str, ...]]] = {
    "FMA": (1, ("fma",)), "F16C": (1 << 1, ("f16c",)), "SSE42": (1 << 2, ("sse4_2",)), "BMI2": (1 << 3, ("bmi2",)),
    "AVX": (1 << 4, ("avx",)), "AVX2": (1 << 5, ("avx2",)), "AVX_VNNI": (1 << 6, ("avx_vnni",)),
    "AVX512": (1 << 7, ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    "AVX512_VBMI": (1 << 8, ("avx512vbmi",)), "AVX512_BF16": (1 << 9, ("avx512_bf16",)),
    "AVX512_VNNI": (1 << 10, ("avx512_vnni",)),
}
# ggml's x86-64 CPU variants (GGML_CPU_ALL_VARIANTS in the pinned ggml/src/CMakeLists.txt) and the features each
# is compiled for, in ggml's order. sapphirerapids is left out: on Xeons that report AMX it is chosen and dies
# with an illegal instruction on its first computation (an open upstream bug).
GGML_CPU_VARIANTS: Mapping[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
}
# The variant every x86-64 CPU runs: always built, so an engine made for one host still starts on another.
BASELINE_CPU_VARIANT = "x64"


def with_baseline(names: Iterable[str]) -> tuple[str, ...]:
    """The known variants among `names`, and x64, in ggml's order."""
    wanted = set(names)
    return tuple(v for v in GGML_CPU_VARIANTS if v == BASELINE_CPU_VARIANT or v in wanted)


def cpu_variant_score(variant: str, flags: Sequence[str]) -> int:
    """ggml's score of a CPU variant on a CPU with these flags: 0 when the CPU lacks one of its features."""
    present = set(flags)
    score = 1
    for feature in GGML_CPU_VARIANTS[variant]:
        weight, needed = GGML_X86_FEATURES[feature]
        if not present.issuperset(needed):
            return 0
        score += weight
    return score


def best_cpu_variant(flags: Sequence[str]) -> str:
    """The variant ggml picks on a CPU with these flags, out of all of them (x64 when none of the others runs)."""
    return max(GGML_CPU_VARIANTS, key=lambda v: cpu_variant_score(v, flags))


def _x86_64_flags(facts: HostFacts) -> tuple[str, ...] | None:
    """The host's CPU flags where they say what ggml's x86 variants need; None off x86-64 or when unknown."""
    return facts.cpu_flags if facts.machine in X86_64_MACHINES and facts.cpu_flags else None


def cpu_variants_for(facts: HostFacts) -> tuple[str, ...] | None:
    """The CPU variants an engine for this host needs: the one ggml would pick there, and x64; None when the probe
    names no x86-64 CPU flags (then every variant is built)."""
    flags = _x86_64_flags(facts)
    if flags is None:
        return None
    return with_baseline([best_cpu_variant(flags)])


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a bundle for this host carries: "cuda", "vulkan" or "cpu", and why, in one line."""

    engine: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"engine": self.engine, "reason": self.reason}


def choose_engine(facts: HostFacts, *, cuda_packed: bool, vulkan_packed: bool = False) -> EngineChoice:
    """CUDA for a host with an NVIDIA GPU whose driver meets the floor, if this airgap packs it; Vulkan, if packed,
    for one whose driver is older or unknown (Vulkan has no such floor); the CPU engine otherwise."""
    if not facts.gpus:
        return EngineChoice("cpu", "the target has no NVIDIA GPU: CPU engine")
    names = ", ".join(sorted({g.name for g in facts.gpus}))
    meets = meets_cuda_floor(facts.driver_version)
    if meets is None:
        why = (f"the target's NVIDIA driver version is unknown ({names})", f"the CUDA {CUDA_MAJOR} engine needs "
               f"R{CUDA_DRIVER_FLOOR} or newer")
    elif not meets:
        why = (f"the target's NVIDIA driver {facts.driver_version} is older than R{CUDA_DRIVER_FLOOR}",
               f"which the CUDA {CUDA_MAJOR} engine needs")
    if meets is not True:
        if vulkan_packed:
            return EngineChoice("vulkan", f"{why[0]} ({why[1]}): Vulkan engine, which needs no CUDA floor")
        return EngineChoice("cpu", f"{why[0]}: CPU engine; {why[1]}" if meets is None else
                            f"{why[0]}, {why[1]}: CPU engine")
    if not cuda_packed:
        return EngineChoice("cpu", f"the target's {names} with driver {facts.driver_version} could run the CUDA "
                                   f"{CUDA_MAJOR} engine, but this airgap packs the CPU engine only: sized for CPU")
    return EngineChoice("cuda", f"the target's {names} with driver {facts.driver_version} runs the CUDA "
                                f"{CUDA_MAJOR} engine")


def target_record(facts: HostFacts, engine: EngineChoice, choices: list[str]) -> dict[str, Any]:
    """The manifest's `target` field: the host facts, the engine decision, and each fitting choice explained."""
    return {"host": facts.to_dict(), "engine": engine.to_dict(), "choices": list(choices)}


def built_for(target: Mapping[str, Any] | None) -> HostFacts | None:
    """The host facts a manifest's `target` records; None for bundles built without --target."""
    if target is None:
        return None
    if not isinstance(target, Mapping):
        raise ProbeError("the bundle's target record must be a JSON object")
    return parse_probe(target.get("host"), "the bundle's target record")


def differences(built: HostFacts, here: HostFacts) -> list[str]:
    """How this host falls short of, or differs from, the one the bundle was built for; [] when it matches."""
    found: list[str] = []
    if built.machine != here.machine:
        found.append(f"CPU architecture {here.machine} here, {built.machine} there")
    if built.x86_64_level != here.x86_64_level and None not in (built.x86_64_level, here.x86_64_level):
        found.append(f"CPU level x86-64-v{here.x86_64_level} here, x86-64-v{built.x86_64_level} there")
    if built.python_minor != here.python_minor or built.implementation != here.implementation:
        found.append(f"Python {here.implementation} {here.python_minor} here, "
                     f"{built.implementation} {built.python_minor} there")
    if built.glibc != here.glibc or built.musl != here.musl:
        found.append(f"C library {_libc(here)} here, {_libc(built)} there")
    if here.ram_total < built.ram_total * _SAME_MEMORY:
        found.append(f"{_gb(here.ram_total)} RAM here, {_gb(built.ram_total)} there")
    built_gpus, here_gpus = sorted(g.name for g in built.gpus), sorted(g.name for g in here.gpus)
    if built_gpus != here_gpus:
        found.append(f"GPUs {', '.join(here_gpus) or 'none'} here, {', '.join(built_gpus) or 'none'} there")
    built_vram, here_vram = _vram(built), _vram(here)
    if here_vram < built_vram * _SAME_MEMORY:
        found.append(f"{_gb(here_vram)} GPU memory here, {_gb(built_vram)} there")
    if meets_cuda_floor(built.driver_version) and not meets_cuda_floor(here.driver_version):
        found.append(f"NVIDIA driver {here.driver_version or 'none'} here, {built.driver_version} there")
    return found


def _vram(facts: HostFacts) -> int:
    return sum(g.memory_total or 0 for g in facts.gpus)


def _libc(facts: HostFacts) -> str:
    if facts.glibc:
        return f"glibc {facts.glibc}"
    return f"musl {facts.musl}" if facts.musl else "unknown"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def carried_cpu_variants(engine_paths: Iterable[str]) -> list[str]:
    """The ggml CPU variants among an engine's files (`engine/libggml-cpu-<variant>.so`), in ggml's order."""
    names = {m[1] for p in engine_paths if (m := re.fullmatch(r"engine/libggml-cpu-(\w+)\.so", p))}
    return [v for v in GGML_CPU_VARIANTS if v in names]


def cpu_variant_report(carried: Sequence[str], here: HostFacts) -> dict[str, Any] | None:
    """Which of the engine's CPU variants ggml runs on this host, against the best this CPU could run, with a
    warning line when they differ; None without llama-server CPU variants or without this CPU's flags."""
    known = [v for v in GGML_CPU_VARIANTS if v in carried]
    flags = _x86_64_flags(here)
    if not known or flags is None:
        return None
    top = max(known, key=lambda v: cpu_variant_score(v, flags))
    runs = top if cpu_variant_score(top, flags) > 0 else None
    best = best_cpu_variant(flags)
    if runs is None:
        line: str | None = (f"warning: llama-server carries the CPU variants {', '.join(known)}, none of which this "
                            f"CPU runs (its best is {best}): rebuild with `airgap build --target` on a probe of "
                            "this host")
    elif runs != best:
        line = (f"warning: llama-server carries the CPU variants {', '.join(known)}; this CPU runs {runs} of them, "
                f"slower than {best}, which it could run: rebuild with `airgap build --target` on a probe of this "
                "host")
    else:
        line = None
    return {"carried": known, "runs": runs, "best": best, "warning": line}


def host_check(target: Mapping[str, Any] | None, here: HostFacts, cpu_variants: Sequence[str] = (), *,
               vulkan: bool = False) -> dict[str, Any]:
    """What `plan` adds about the host: the driver against the CUDA floor (`vulkan`: the engine carries the
    Vulkan backend), which of the engine's `cpu_variants` runs here, and one warning line when this host differs
    from the one the bundle was built for (a malformed record is itself the warning, never an error)."""
    report: dict[str, Any] = {"driver": driver_report(here, vulkan), "built_for": None, "differences": [],
                              "warning": None, "cpu_variant": cpu_variant_report(cpu_variants, here)}
    try:
        built = built_for(target)
    except ProbeError as exc:
        report["warning"] = f"warning: cannot compare with the host this bundle was built for: {exc.message}"
        return report
    if built is None:
        return report
    found = differences(built, here)
    report["built_for"] = built.to_dict()
    report["differences"] = found
    if found:
        report["warning"] = ("warning: this host differs from the one the bundle was built for: " + "; ".join(found)
                             + "; rebuild with `airgap build --target` on a probe of this host")
    return report
