"""The CUDA 13 driver floor, the engine choice for a target, and how plan compares a host with the built-for one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from airgap.hardware.facts import GpuFacts, HostFacts, host_info, probe_facts
from airgap.hardware.target import (
    CUDA_DRIVER_FLOOR,
    GGML_CPU_VARIANTS,
    best_cpu_variant,
    carried_cpu_variants,
    choose_engine,
    cpu_variant_report,
    cpu_variant_score,
    cpu_variants_for,
    differences,
    driver_branch,
    driver_report,
    host_check,
    meets_cuda_floor,
    no_usable_gpu,
    target_record,
)
from tests.unit.hardware.test_probe import CORE2_FLAGS, HASWELL_FLAGS, NEHALEM_FLAGS, V4_FLAGS

H100 = GpuFacts(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-1", bus_id=None, memory_total=81559 << 20,
                memory_free=81003 << 20, compute_capability="9.0")


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> HostFacts:
    return probe_facts(tmp_path_factory.mktemp("p"), nvidia_smi=None)


def test_the_cuda_13_floor_is_r580() -> None:
    assert CUDA_DRIVER_FLOOR == 580
    assert driver_branch("580.65.06") == 580 and driver_branch("garbage") is None
    assert meets_cuda_floor("580.65.06") is True
    assert meets_cuda_floor("590.44.01") is True
    assert meets_cuda_floor("575.57.08") is False
    assert meets_cuda_floor("550.54.15") is False
    assert meets_cuda_floor(None) is None


def test_engine_choice_names_why_in_one_line(here: HostFacts) -> None:
    gpu_new = dataclasses.replace(here, gpus=(H100,), driver_version="580.65.06")
    gpu_old = dataclasses.replace(gpu_new, driver_version="550.54.15")
    assert choose_engine(gpu_new, cuda_packed=True).engine == "cuda"
    old = choose_engine(gpu_old, cuda_packed=True)
    assert old.engine == "cpu"
    assert old.reason == ("the target's NVIDIA driver 550.54.15 is older than R580, which the CUDA 13 engine needs: "
                          "CPU engine")
    assert choose_engine(dataclasses.replace(here, gpus=()), cuda_packed=True).reason == (
        "the target has no NVIDIA GPU: CPU engine")
    unpacked = choose_engine(gpu_new, cuda_packed=False)
    assert unpacked.engine == "cpu" and "packs the CPU engine only" in unpacked.reason
    record = target_record(gpu_old, old, ["a choice"])
    assert record["engine"] == {"engine": "cpu", "reason": old.reason} and record["choices"] == ["a choice"]


def test_driver_report_for_plan(here: HostFacts) -> None:
    old = driver_report(dataclasses.replace(here, gpus=(H100,), driver_version="550.54.15"))
    assert old["meets_floor"] is False and old["summary"] == (
        "NVIDIA driver 550.54.15 is older than R580, which the CUDA 13 engine needs: the CPU engine serves")
    new = driver_report(dataclasses.replace(here, gpus=(H100,), driver_version="580.65.06"))
    assert new["meets_floor"] is True and new["floor"] == 580


def test_differences_name_each_way_this_host_falls_short(here: HostFacts) -> None:
    built = dataclasses.replace(here, gpus=(H100,), driver_version="580.65.06", ram_total=128 * 10**9,
                                x86_64_level=4, glibc="2.36", python_version="3.12.3")
    smaller = dataclasses.replace(here, gpus=(), driver_version=None, ram_total=16 * 10**9, x86_64_level=3,
                                  glibc="2.31", python_version="3.11.7")
    assert differences(built, built) == []
    assert differences(built, smaller) == [
        "CPU level x86-64-v3 here, x86-64-v4 there",
        f"Python {here.implementation} 3.11 here, {here.implementation} 3.12 there",
        "C library glibc 2.31 here, glibc 2.36 there",
        "16.0 GB RAM here, 128.0 GB there",
        "GPUs none here, NVIDIA H100 80GB HBM3 there",
        "0.0 GB GPU memory here, 85.5 GB there",
        "NVIDIA driver none here, 580.65.06 there",
    ]
    # a little less MemTotal (another kernel's reservations) is the same host
    assert differences(built, dataclasses.replace(built, ram_total=int(built.ram_total * 0.99))) == []


def test_host_check_warns_in_one_line_and_survives_a_malformed_record(here: HostFacts, tmp_path: Path) -> None:
    built = dataclasses.replace(here, ram_total=here.ram_total * 4)
    check = host_check({"host": built.to_dict()}, here)
    assert check["warning"].startswith("warning: this host differs from the one the bundle was built for: ")
    assert "\n" not in check["warning"] and check["differences"] and check["built_for"] == built.to_dict()
    assert host_check({"host": here.to_dict()}, here)["warning"] is None
    assert host_check(None, here) == {"driver": driver_report(here), "built_for": None, "differences": [],
                                      "warning": None, "cpu_variant": None}
    broken = host_check({"host": {"_type": "airgap/probe", "probe_format": 1}}, here)
    assert broken["warning"] == ("warning: cannot compare with the host this bundle was built for: the bundle's "
                                 "target record: invalid probe.python: expected a JSON object, found NoneType")


def test_a_gpu_engine_has_no_usable_gpu_without_an_nvidia_gpu_or_below_the_driver_floor(here: HostFacts) -> None:
    current = host_info(dataclasses.replace(here, gpus=(H100,), driver_version="580.65.06"))
    old = host_info(dataclasses.replace(here, gpus=(H100,), driver_version="550.54.15"))
    unknown = host_info(dataclasses.replace(here, gpus=(H100,), driver_version=None))
    none = host_info(dataclasses.replace(here, gpus=(), driver_version=None))
    assert current.driver_version == "580.65.06" and current.to_dict()["driver_version"] == "580.65.06"
    assert no_usable_gpu(current, cuda=True) is None
    assert no_usable_gpu(old, cuda=True) == "NVIDIA driver 550.54.15 is older than R580, which the CUDA 13 engine needs"
    assert no_usable_gpu(unknown, cuda=True) == (
        "NVIDIA driver version unknown; the CUDA 13 engine needs R580 or newer")
    assert no_usable_gpu(none, cuda=True) == no_usable_gpu(none, cuda=False) == "none found on this host"
    assert no_usable_gpu(old, cuda=False) is None  # the floor is CUDA's; another backend is not held to it


# CPUs as /proc/cpuinfo lists them, cut to the flags that matter, and the ggml variant each one runs best
AVX512_VNNI_VBMI = [*V4_FLAGS, "avx512vbmi", "avx512_vnni"]
CPU_VARIANT_CASES = [
    (CORE2_FLAGS, "x64"),  # no SSE4.2
    (NEHALEM_FLAGS, "sse42"),
    ([*NEHALEM_FLAGS, "avx"], "sandybridge"),
    ([*NEHALEM_FLAGS, "avx", "f16c"], "ivybridge"),
    ([*NEHALEM_FLAGS, "avx", "f16c", "fma"], "piledriver"),  # AMD, before AVX2
    (HASWELL_FLAGS, "haswell"),
    ([*HASWELL_FLAGS, "avx512f", "avx512cd", "avx512er", "avx512pf"], "haswell"),  # Knights Landing: no BW/DQ/VL
    (V4_FLAGS, "skylakex"),
    ([*V4_FLAGS, "avx512vbmi"], "cannonlake"),
    ([*V4_FLAGS, "avx512_vnni"], "cascadelake"),
    (AVX512_VNNI_VBMI, "icelake"),
    ([*V4_FLAGS, "avx512_vnni", "avx512_bf16"], "cooperlake"),
    ([*AVX512_VNNI_VBMI, "avx512_bf16"], "zen4"),
    ([*AVX512_VNNI_VBMI, "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"], "zen4"),  # Sapphire Rapids
    ([*HASWELL_FLAGS, "avx_vnni"], "alderlake"),  # AVX-VNNI without AVX-512
]


@pytest.mark.parametrize(("flags", "variant"), CPU_VARIANT_CASES)
def test_the_cpu_variant_is_the_one_ggml_scores_highest(flags: list[str], variant: str) -> None:
    assert best_cpu_variant(flags) == variant
    assert cpu_variant_score(variant, flags) == max(cpu_variant_score(v, flags) for v in GGML_CPU_VARIANTS) > 0


def test_a_variant_scores_zero_on_a_cpu_that_lacks_one_of_its_features() -> None:
    assert cpu_variant_score("x64", []) == 1
    assert cpu_variant_score("haswell", [f for f in HASWELL_FLAGS if f != "bmi2"]) == 0
    assert cpu_variant_score("skylakex", [f for f in V4_FLAGS if f != "avx512vl"]) == 0
    # ggml's weights: SSE4.2 4, AVX 16, F16C 2, FMA 1, AVX2 32, BMI2 8, and 1 for being there
    assert cpu_variant_score("haswell", HASWELL_FLAGS) == 1 + 4 + 16 + 2 + 1 + 32 + 8
    assert "sapphirerapids" not in GGML_CPU_VARIANTS  # dies on AMX (an open upstream bug)


def test_an_engine_for_a_target_carries_its_best_variant_and_x64(here: HostFacts) -> None:
    assert here.cpu_flags  # the probe records them
    best = best_cpu_variant(here.cpu_flags)
    assert cpu_variants_for(here) == tuple(v for v in GGML_CPU_VARIANTS if v in ("x64", best))
    assert cpu_variants_for(dataclasses.replace(here, cpu_flags=tuple(HASWELL_FLAGS))) == ("x64", "haswell")
    assert cpu_variants_for(dataclasses.replace(here, cpu_flags=tuple(CORE2_FLAGS))) == ("x64",)
    # unknown flags, or not x86-64: every variant is built (None)
    assert cpu_variants_for(dataclasses.replace(here, cpu_flags=())) is None
    assert cpu_variants_for(dataclasses.replace(here, machine="aarch64", cpu_flags=("fp", "asimd"))) is None


def test_plan_says_which_carried_cpu_variant_runs_here_and_warns_when_a_better_one_would(here: HostFacts) -> None:
    haswell = dataclasses.replace(here, cpu_flags=tuple(HASWELL_FLAGS))
    carried = carried_cpu_variants(["engine/llama-server", "engine/libggml-cpu-zen4.so", "engine/libggml-base.so.0",
                                    "engine/libggml-cpu-x64.so", "engine/libggml-cpu-haswell.so.bak"])
    assert carried == ["x64", "zen4"]
    # built for a Zen 4, installed on a Haswell: ggml falls back to x64, and plan says so in one line
    report = cpu_variant_report(carried, haswell)
    assert report == {"carried": ["x64", "zen4"], "runs": "x64", "best": "haswell", "warning": (
        "warning: llama-server carries the CPU variants x64, zen4; this CPU runs x64 of them, slower than haswell, "
        "which it could run: rebuild with `airgap build --target` on a probe of this host")}
    assert cpu_variant_report(["x64", "haswell"], haswell) == {"carried": ["x64", "haswell"], "runs": "haswell",
                                                              "best": "haswell", "warning": None}
    # a bundle without x64 (not one airgap builds) on a CPU that runs none of its variants
    assert cpu_variant_report(["zen4"], haswell) == {"carried": ["zen4"], "runs": None, "best": "haswell", "warning": (
        "warning: llama-server carries the CPU variants zen4, none of which this CPU runs (its best is haswell): "
        "rebuild with `airgap build --target` on a probe of this host")}
    assert cpu_variant_report([], haswell) is None  # no llama-server
    assert cpu_variant_report(["x64"], dataclasses.replace(here, cpu_flags=())) is None  # flags unknown
    assert host_check(None, haswell, carried)["cpu_variant"] == report
