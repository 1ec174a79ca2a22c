"""Fit rules of `build --target`: which quantization of a real model fits a recorded host, and the refusals.

Hosts are recorded probes: the real `airgap.hardware.probe.collect` run on recorded /proc/meminfo text and recorded
`nvidia-smi` rows (an RTX 4060 8 GB, RTX 4090 24 GB, H100 80 GB, H200 141 GB, two RTX 4090s) and on CPU-only
hosts with 16 and 64 GB.

Models: the shapes are those in the GGUF metadata of the public files (= the models' config.json), the file
sizes those the GGUF repositories publish (decimal GB, as their model cards round them):

- Mistral 7B Instruct v0.2 (mistralai/Mistral-7B-Instruct-v0.2 config.json): 32 layers, hidden 4096,
  32 heads, 8 KV heads, head_dim 128, 32768 tokens of context, vocabulary 32000, 7,241,732,096 parameters.
  TheBloke/Mistral-7B-Instruct-v0.2-GGUF: Q4_K_M 4.37 GB (4,368,439,584 bytes), Q8_0 7.70 GB; F16 14.48 GB
  (two bytes per parameter; that repository publishes no F16).
- Mistral Small 24B Instruct 2501 (mistralai/Mistral-Small-24B-Instruct-2501 config.json): 40 layers, hidden
  5120, 32 heads, 8 KV heads, head_dim 128 (so key/value length 128, not 5120/32), 32768 tokens, vocabulary
  131072, 23,572,403,200 parameters. bartowski/Mistral-Small-24B-Instruct-2501-GGUF: Q4_K_M 14.33 GB,
  Q8_0 25.05 GB, F16 47.15 GB (third-party tables list the same files as 14.4 GB and 24.0 GiB).
- Mixtral 8x7B v0.1 (mistralai/Mixtral-8x7B-v0.1 config.json): 32 layers, hidden 4096, 32 heads, 8 KV heads,
  8 experts (2 active), 32768 tokens, vocabulary 32000, 46,702,792,704 parameters (the hub shows "46.7B
  params"). TheBloke/Mixtral-8x7B-v0.1-GGUF: Q4_K_M 26.44 GB, Q8_0 49.62 GB; F16 93.4 GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airgap.build.fit import Candidate, check, choose, quant_label
from airgap.errors import FitError
from airgap.hardware.facts import HostInfo, host_info, probe_facts
from airgap.hardware.sizing import ModelShape, make_plan

MISTRAL_7B: dict[str, Any] = {
    "architecture": "llama", "block_count": 32, "embedding_length": 4096, "head_count": 32, "head_count_kv": 8,
    "context_length": 32768, "vocab_size": 32000, "parameter_count": 7_241_732_096}
MISTRAL_SMALL_24B: dict[str, Any] = {
    "architecture": "llama", "block_count": 40, "embedding_length": 5120, "head_count": 32, "head_count_kv": 8,
    "key_length": 128, "value_length": 128, "context_length": 32768, "vocab_size": 131072,
    "parameter_count": 23_572_403_200}
MIXTRAL_8X7B: dict[str, Any] = {
    "architecture": "llama", "block_count": 32, "embedding_length": 4096, "head_count": 32, "head_count_kv": 8,
    "context_length": 32768, "vocab_size": 32000, "parameter_count": 46_702_792_704}
FILES = {
    "mistral-7b": (MISTRAL_7B, {"Q4_K_M": 4_368_439_584, "Q8_0": 7_700_000_000, "F16": 14_480_000_000}),
    "mistral-small-24b": (MISTRAL_SMALL_24B, {"Q4_K_M": 14_330_000_000, "Q8_0": 25_050_000_000,
                                              "F16": 47_150_000_000}),
    "mixtral-8x7b": (MIXTRAL_8X7B, {"Q4_K_M": 26_440_000_000, "Q8_0": 49_620_000_000, "F16": 93_410_000_000}),
}
# recorded `nvidia-smi --query-gpu=index,uuid,pci.bus_id,memory.total,memory.free,compute_cap,driver_version,name`
GPU_ROWS = {
    "rtx4060": "{i}, GPU-{i}, 00000000:0{i}:00.0, 8188, 7800, 8.9, 580.65.06, NVIDIA GeForce RTX 4060",
    "rtx4090": "{i}, GPU-{i}, 00000000:0{i}:00.0, 24564, 24080, 8.9, 580.65.06, NVIDIA GeForce RTX 4090",
    "h100": "{i}, GPU-{i}, 00000000:0{i}:00.0, 81559, 81003, 9.0, 580.65.06, NVIDIA H100 80GB HBM3",
    "h200": "{i}, GPU-{i}, 00000000:0{i}:00.0, 143771, 143190, 9.0, 580.65.06, NVIDIA H200",
}


def recorded_host(tmp_path: Path, ram_gib: int, *gpus: str) -> HostInfo:
    """The probe run on a recorded /proc and nvidia-smi: RAM total ram_gib, 94 % of it available."""
    proc = tmp_path / f"proc-{ram_gib}-{'-'.join(gpus) or 'cpu'}"
    (proc / "self").mkdir(parents=True)
    kib = ram_gib * 1024 * 1024
    (proc / "meminfo").write_text(f"MemTotal: {kib} kB\nMemFree: {kib // 2} kB\nMemAvailable: {kib * 94 // 100} kB\n")
    (proc / "cpuinfo").write_text(
        "".join(f"processor\t: {c}\nphysical id\t: 0\ncore id\t\t: {c}\n\n" for c in range(8)))
    (proc / "self" / "cgroup").write_text("0::/\n")
    smi = None
    if gpus:
        rows = proc / "nvidia-smi.txt"
        rows.write_text("".join(GPU_ROWS[g].format(i=i) + "\n" for i, g in enumerate(gpus)))
        script = proc / "nvidia-smi"
        script.write_text(f"#!/bin/sh\ncat {rows}\n")
        script.chmod(0o755)
        smi = str(script)
    return host_info(probe_facts(tmp_path, proc=proc, cgroup_root=tmp_path, nvidia_smi=smi, environ={}))


def candidates(model: str) -> list[Candidate]:
    return [Candidate((f"{model}-{quant}.gguf",), size) for quant, size in FILES[model][1].items()]


def pick(model: str, host: HostInfo, gpu_offload: bool = True) -> str:
    return choose(model, FILES[model][0], candidates(model), host, gpu_offload=gpu_offload).candidate.label


def offload(model: str, quant: str, host: HostInfo) -> tuple[int, tuple[float, ...]]:
    meta, sizes = FILES[model]
    plan = make_plan(ModelShape.from_gguf(model, {**meta, "file_type": quant}, sizes[quant]), host)
    return plan.n_gpu_layers, plan.tensor_split


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostInfo]:
    tmp = tmp_path_factory.mktemp("hosts")
    return {
        "8GB": recorded_host(tmp, 32, "rtx4060"), "24GB": recorded_host(tmp, 32, "rtx4090"),
        "80GB": recorded_host(tmp, 64, "h100"), "141GB": recorded_host(tmp, 128, "h200"),
        "2x24GB": recorded_host(tmp, 32, "rtx4090", "rtx4090"),
        "cpu16": recorded_host(tmp, 16), "cpu64": recorded_host(tmp, 64),
    }


def test_recorded_probes_read_as_the_hosts_they_record(hosts: dict[str, HostInfo]) -> None:
    assert [g.name for g in hosts["2x24GB"].gpus] == ["NVIDIA GeForce RTX 4090"] * 2
    assert hosts["141GB"].gpus[0].compute_capability == "9.0"
    assert hosts["cpu16"].gpus == () and hosts["cpu16"].ram_total == 16 << 30


@pytest.mark.parametrize(("host", "expected"), [
    # (Mistral 7B, Mistral Small 24B, Mixtral 8x7B): the largest of Q4_K_M, Q8_0, F16 that fits
    ("8GB", ("F16", "Q8_0", "Q4_K_M")),  # 32 GB of RAM takes the layers the GPU cannot
    ("24GB", ("F16", "F16", "Q8_0")),
    ("80GB", ("F16", "F16", "F16")),
    ("141GB", ("F16", "F16", "F16")),
    ("2x24GB", ("F16", "F16", "Q8_0")),
    ("cpu64", ("F16", "F16", "Q8_0")),
])
def test_the_largest_quantization_that_fits_is_chosen(hosts: dict[str, HostInfo], host: str,
                                                      expected: tuple[str, str, str]) -> None:
    assert tuple(pick(model, hosts[host]) for model in FILES) == expected


def test_whole_models_go_to_the_gpu_where_they_fit_and_split_across_two(hosts: dict[str, HostInfo]) -> None:
    assert offload("mistral-7b", "Q4_K_M", hosts["8GB"])[0] == 33  # 32 layers and the output layer
    assert offload("mistral-7b", "Q8_0", hosts["8GB"])[0] < 32  # 7.7 GB of weights: most, not all
    assert offload("mixtral-8x7b", "Q8_0", hosts["80GB"])[0] == 33
    assert offload("mixtral-8x7b", "F16", hosts["141GB"])[0] == 33  # 93 GB on one H200
    assert offload("mixtral-8x7b", "Q4_K_M", hosts["24GB"])[0] < 32  # 26 GB does not fit one 4090 ...
    layers, split = offload("mixtral-8x7b", "Q4_K_M", hosts["2x24GB"])
    assert layers == 33 and split == (0.5, 0.5)  # ... but does fit two, half each
    assert offload("mixtral-8x7b", "Q4_K_M", hosts["24GB"])[1] == ()  # one GPU: no split


def test_a_16_gb_cpu_host_takes_mistral_7b_q8_and_refuses_the_larger_models(hosts: dict[str, HostInfo]) -> None:
    assert pick("mistral-7b", hosts["cpu16"]) == "Q8_0"  # F16 (14.5 GB) is about 1 GB short
    with pytest.raises(FitError) as refused:
        pick("mistral-small-24b", hosts["cpu16"])
    assert str(refused.value) == (
        "model 'mistral-small-24b' does not fit the target host even at 2048 tokens of context: the smallest "
        "quantization, Q4_K_M (14.3 GB), needs 1.4 GB more than the target's 16.1 GB of available RAM; no "
        "quantization in the repository fits; nothing was downloaded")


def test_a_named_file_that_does_not_fit_names_the_shortfall_and_the_largest_that_would(
        hosts: dict[str, HostInfo]) -> None:
    model = "mixtral-8x7b"
    fixed = Candidate(("mixtral-8x7b-F16.gguf",), FILES[model][1]["F16"])
    with pytest.raises(FitError) as refused:
        check(model, FILES[model][0], fixed, candidates(model), hosts["cpu64"], gpu_offload=True)
    message = str(refused.value)
    assert message.startswith("model 'mixtral-8x7b' does not fit the target host even at 2048 tokens of context: "
                              "F16 (93.4 GB) needs 36.7 GB more than the target's 64.6 GB of available RAM;")
    assert "the largest quantization that would fit is Q8_0 (49.6 GB): name 'mixtral-8x7b-Q8_0.gguf'" in message
    sized = check(model, FILES[model][0], candidates(model)[1], candidates(model), hosts["cpu64"], gpu_offload=True)
    assert sized.explanation == "model mixtral-8x7b: Q8_0 (49.6 GB) fits the target's 64.6 GB of available RAM"


def test_without_a_gpu_engine_the_gpu_memory_does_not_count(hosts: dict[str, HostInfo]) -> None:
    assert pick("mistral-small-24b", hosts["24GB"], gpu_offload=True) == "F16"
    assert pick("mistral-small-24b", hosts["24GB"], gpu_offload=False) == "Q8_0"  # 32 GB of RAM alone


def test_quantization_labels_from_file_names() -> None:
    assert quant_label("mistral-7b-instruct-v0.2.Q4_K_M.gguf") == "Q4_K_M"
    assert quant_label("Mistral-Small-24B-Instruct-2501-f16.gguf") == "F16"
    assert quant_label("mixtral-8x7b-v0.1.Q8_0.gguf") == "Q8_0"
    assert quant_label("qwen2.5-0.5b-instruct-iq4_xs.gguf") == "IQ4_XS"
    assert quant_label("model.gguf") is None
