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

import json
import math
from pathlib import Path
from typing import Any

import pytest

from airgap.build.fit import (
    Candidate,
    HubReader,
    check,
    choose,
    estimated_size,
    quant_label,
    safetensors_parameters,
    shape_from_config,
    size_converted,
)
from airgap.build.spec import ModelSpec
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


# ---------------------------------------------------------------- converted at build time (`quantize =`)

def estimated(model: str, quant: str) -> int:
    return estimated_size(FILES[model][0]["parameter_count"], quant)


def test_estimated_sizes_of_converted_models_are_close_to_the_published_files() -> None:
    """llama.cpp's Llama-3-8B sizes scaled by parameter count, against the files the GGUF repositories publish:
    within 2 % for the dense models and never under; Mixtral's experts come out 8 % over (on the safe side)."""
    for model, (_, published) in FILES.items():
        for quant in ("Q4_K_M", "Q8_0"):
            ratio = estimated(model, quant) / published[quant]
            assert 0.995 <= ratio <= (1.09 if model == "mixtral-8x7b" else 1.02), (model, quant, ratio)
    assert estimated("mistral-7b", "F16") == 2 * 7_241_732_096
    assert estimated("mistral-7b", "BF16") == estimated("mistral-7b", "F16") == estimated("mistral-7b", "F32") // 2


MISTRAL_7B_CONFIG = {  # mistralai/Mistral-7B-Instruct-v0.2 config.json, as published
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "vocab_size": 32000, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16"}


def safetensors_header(tensors: dict[str, list[int]]) -> bytes:
    offset, doc = 0, {"__metadata__": {"format": "pt"}}
    for name, shape in tensors.items():
        size = 2 * math.prod(shape)
        doc[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(doc).encode()
    return len(body).to_bytes(8, "little") + body


class StandInHub(HubReader):
    """A repository's files by name, read by range as the hub serves them."""

    def __init__(self, files: dict[str, bytes], sizes: dict[str, int]) -> None:
        super().__init__(None)
        self.files, self.sizes = files, sizes

    def head(self, repo: str, commit: str, filename: str, length: int) -> bytes:
        return self.files[filename][:length]


def mistral_7b_repo() -> StandInHub:
    """Mistral 7B's tensors in two shards, by their real shapes (7,241,732,096 parameters)."""
    layer = {"self_attn.q_proj.weight": [4096, 4096], "self_attn.k_proj.weight": [1024, 4096],
             "self_attn.v_proj.weight": [1024, 4096], "self_attn.o_proj.weight": [4096, 4096],
             "mlp.gate_proj.weight": [14336, 4096], "mlp.up_proj.weight": [14336, 4096],
             "mlp.down_proj.weight": [4096, 14336], "input_layernorm.weight": [4096],
             "post_attention_layernorm.weight": [4096]}
    shards: list[dict[str, list[int]]] = [{"model.embed_tokens.weight": [32000, 4096]},
                                          {"lm_head.weight": [32000, 4096], "model.norm.weight": [4096]}]
    for i in range(32):
        shards[i // 16].update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    files = {"config.json": json.dumps(MISTRAL_7B_CONFIG).encode()}
    sizes = {"config.json": len(files["config.json"]), "tokenizer.model": 493_443, "README.md": 100}
    for n, shard in enumerate(shards, 1):
        name = f"model-0000{n}-of-00002.safetensors"
        files[name] = safetensors_header(shard)
        sizes[name] = len(files[name]) + 2 * sum(math.prod(s) for s in shard.values())
    return StandInHub(files, sizes)


def converted(quantize: str) -> ModelSpec:
    return ModelSpec(id="mistral-7b", repo="mistralai/Mistral-7B-Instruct-v0.2", quantize=quantize)


def test_the_parameter_count_is_read_from_the_safetensors_headers_alone() -> None:
    hub = mistral_7b_repo()
    counts = [safetensors_parameters(hub.files[n], n) for n in sorted(hub.files) if n.endswith(".safetensors")]
    assert sum(counts) == 7_241_732_096
    assert shape_from_config("m", MISTRAL_7B_CONFIG, sum(counts)) == {
        "architecture": "mistral", "block_count": 32, "embedding_length": 4096, "head_count": 32,
        "head_count_kv": 8, "context_length": 32768, "vocab_size": 32000, "parameter_count": 7_241_732_096}


@pytest.mark.parametrize(("ram_gib", "expected", "short"), [
    (6, "Q4_K_M", "F16 is 10.0 GB short, Q8_0 is 3.3 GB short, Q6_K is 1.5 GB short, Q5_1 is 1.0 GB short, "
                  "Q5_K_M is 0.7 GB short, Q5_0 is 0.6 GB short, Q5_K_S is 0.6 GB short, Q4_1 is 0.2 GB short"),
    (8, "Q6_K", "F16 is 8.2 GB short, Q8_0 is 1.5 GB short"),
    (12, "Q8_0", "F16 is 4.6 GB short"),
])
def test_quantize_auto_picks_the_largest_quantization_that_fits(tmp_path: Path, ram_gib: int, expected: str,
                                                               short: str) -> None:
    hub = mistral_7b_repo()
    host = recorded_host(tmp_path, ram_gib)
    model, sized = size_converted(converted("auto"), "c" * 40, hub.sizes, host, False, hub)
    assert model.quantize == expected and model.revision == "c" * 40
    size = f"{estimated('mistral-7b', expected) / 1e9:.1f} GB"
    assert sized.explanation == (
        f"model mistral-7b: chose {expected} ({size}), the largest of 14 quantizations that fits the target's "
        f"{host.ram_available / 1e9:.1f} GB of available RAM; larger ones do not fit: {short} (to be converted; "
        "size estimated from its 7.24B parameters)")


def test_quantize_auto_takes_f16_where_it_fits(hosts: dict[str, HostInfo]) -> None:
    hub = mistral_7b_repo()
    for host in ("8GB", "24GB", "cpu64"):  # never F32 or BF16: a spec names those itself
        assert size_converted(converted("auto"), "c" * 40, hub.sizes, hosts[host], True, hub)[0].quantize == "F16"


def test_a_named_quantization_that_does_not_fit_names_the_largest_that_would(hosts: dict[str, HostInfo]) -> None:
    hub = mistral_7b_repo()
    with pytest.raises(FitError) as refused:
        size_converted(converted("F16"), "c" * 40, hub.sizes, hosts["cpu16"], False, hub)
    assert refused.value.message == (
        "model 'mistral-7b' does not fit the target host even at 2048 tokens of context: F16 (14.5 GB) needs "
        "1.0 GB more than the target's 16.1 GB of "
        "available RAM; the largest quantization that would fit is Q8_0 (7.7 GB): quantize = \"Q8_0\" or "
        "\"auto\" in the spec; nothing was downloaded")


def test_a_safetensors_header_that_lies_about_its_length_is_refused(hosts: dict[str, HostInfo]) -> None:
    hub = mistral_7b_repo()
    name = "model-00001-of-00002.safetensors"
    hub.files[name] = (10**12).to_bytes(8, "little") + hub.files[name][8:]
    with pytest.raises(FitError) as refused:
        size_converted(converted("auto"), "c" * 40, hub.sizes, hosts["cpu16"], False, hub)
    assert refused.value.message == (
        f"model 'mistral-7b': mistralai/Mistral-7B-Instruct-v0.2 {name}: expected a safetensors header of at most "
        "100 MiB inside the file, found 1000000000000 bytes")
