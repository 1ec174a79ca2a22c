from __future__ import annotations

import json
import re
from typing import Any

import pytest

from airgap.errors import PlanError
from airgap.hardware.facts import GpuInfo, HostInfo
from airgap.hardware.sizing import (
    CONTEXT_STEP,
    MAX_CONTEXT,
    MIN_CONTEXT,
    RUNTIME_VRAM_PER_GPU,
    ModelShape,
    PlanChoices,
    footprint,
    gpu_budgets,
    left_after,
    make_plan,
    ram_budget,
    vram_budget,
)

GIB = 1 << 30
MIB = 1 << 20


def shape(model_id: str, file_size: int, **gguf: Any) -> ModelShape:
    base = {"architecture": "llama", "file_type": "Q4_K_M", "key_length": None, "value_length": None}
    return ModelShape.from_gguf(model_id, {**base, **gguf}, file_size)


# Shapes and file sizes of real Q4_K_M GGUF files.
LLAMA2_7B = shape("llama2-7b", 4_081_004_224, block_count=32, embedding_length=4096, head_count=32,
                  head_count_kv=32, context_length=4096, vocab_size=32000, parameter_count=6_738_415_616)
MISTRAL_7B = shape("mistral-7b", 4_368_439_584, block_count=32, embedding_length=4096, head_count=32,
                   head_count_kv=8, context_length=32768, vocab_size=32000, parameter_count=7_241_732_096)
LLAMA3_70B = shape("llama3-70b", 42_520_412_160, block_count=80, embedding_length=8192, head_count=64,
                   head_count_kv=8, context_length=8192, vocab_size=128256, parameter_count=70_553_706_496)
QWEN_05B = shape("qwen2.5-0.5b", 397_808_192, block_count=24, embedding_length=896, head_count=14,
                 head_count_kv=2, context_length=32768, vocab_size=151936, parameter_count=494_032_768)


def cpu_host(total_gib: float, available_gib: float, cores: int = 4, cpus: int = 8) -> HostInfo:
    return HostInfo(ram_total=int(total_gib * GIB), ram_available=int(available_gib * GIB), cpus=cpus, cores=cores)


def gpu_host(total_gib: float, available_gib: float, *gpus_gib: float) -> HostInfo:
    gpus = tuple(GpuInfo(index=i, name="RTX 4090", memory_total=int(g * GIB), memory_free=int(g * GIB) - 300 * MIB)
                 for i, g in enumerate(gpus_gib))
    return HostInfo(ram_total=int(total_gib * GIB), ram_available=int(available_gib * GIB), cpus=16, cores=8,
                    gpus=gpus)


def assert_fits_and_is_maximal(plan_shape: ModelShape, host: HostInfo, n_ctx: int, ngl: int) -> None:
    """The chosen context fits, and one step more would not (unless a cap stopped it)."""
    gpus = max(len(host.gpus), 1)
    need = footprint(plan_shape, ngl, n_ctx, gpus)
    vram = vram_budget(host) if ngl else 0
    assert need.ram <= ram_budget(host)
    assert need.vram <= vram
    if n_ctx < min(plan_shape.context_length, MAX_CONTEXT):
        more = footprint(plan_shape, ngl, n_ctx + CONTEXT_STEP, gpus)
        assert more.ram > ram_budget(host) or more.vram > vram


def test_kv_cache_follows_the_documented_formula() -> None:
    # 2 (K and V) * n_layer * n_head_kv * head_dim * 2 bytes (f16), per token of context
    assert LLAMA2_7B.kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2
    assert MISTRAL_7B.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert LLAMA3_70B.kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2


def test_explicit_key_and_value_lengths_and_per_layer_kv_heads() -> None:
    mla = shape("mla", 10 * GIB, block_count=4, embedding_length=1024, head_count=8, head_count_kv=[8, 8, 2, 2],
                key_length=192, value_length=128, context_length=4096, vocab_size=1000, parameter_count=10**9)
    assert mla.kv_bytes_per_token() == (8 + 8 + 2 + 2) * (192 + 128) * 2
    assert mla.kv_bytes_per_token(range(2, 4)) == (2 + 2) * (192 + 128) * 2


def test_7b_q4_on_8_gib_without_gpu_runs_on_cpu_with_the_longest_context_that_fits() -> None:
    host = cpu_host(7.7, 7.0)
    plan = make_plan(LLAMA2_7B, host)
    assert plan.fits and plan.n_gpu_layers == 0
    assert MIN_CONTEXT <= plan.n_ctx < LLAMA2_7B.context_length
    assert plan.n_ctx % CONTEXT_STEP == 0
    assert_fits_and_is_maximal(LLAMA2_7B, host, plan.n_ctx, 0)
    assert (plan.n_threads, plan.n_threads_batch) == (3, 3)  # 4 cores, one left to the HTTP server


def test_grouped_query_attention_buys_a_longer_context_in_the_same_memory() -> None:
    host = cpu_host(7.7, 7.0)
    assert make_plan(MISTRAL_7B, host).n_ctx > 2 * make_plan(LLAMA2_7B, host).n_ctx


def test_70b_on_16_gib_is_refused_saying_how_much_is_missing() -> None:
    host = cpu_host(16, 15)
    with pytest.raises(PlanError) as refused:
        make_plan(LLAMA3_70B, host)
    message = str(refused.value)
    assert "llama3-70b" in message and "does not fit" in message
    missing = float(re.search(r"([\d.]+) GiB missing", message).group(1))  # type: ignore[union-attr]
    expected = (footprint(LLAMA3_70B, 0, MIN_CONTEXT).ram - ram_budget(host)) / GIB
    assert missing == pytest.approx(expected, abs=0.051)
    assert 25 < missing < 32  # ~40 GiB of weights against ~13 GiB usable


def test_7b_with_a_24_gib_gpu_is_fully_offloaded() -> None:
    host = gpu_host(32, 28, 24)
    plan = make_plan(MISTRAL_7B, host)
    assert plan.n_gpu_layers == MISTRAL_7B.n_layer + 1  # every repeating layer and the output layer
    assert plan.n_ctx == MISTRAL_7B.context_length
    assert plan.fits and plan.vram_needed <= plan.vram_budget
    assert plan.ram_needed < MISTRAL_7B.weights_bytes  # only the input embeddings stay in RAM


def test_70b_with_a_24_gib_gpu_and_64_gib_ram_is_partially_offloaded() -> None:
    host = gpu_host(64, 60, 24)
    plan = make_plan(LLAMA3_70B, host)
    assert 0 < plan.n_gpu_layers < LLAMA3_70B.n_layer
    assert plan.fits
    assert_fits_and_is_maximal(LLAMA3_70B, host, plan.n_ctx, plan.n_gpu_layers)
    # one more layer would not fit in GPU memory at that context
    assert footprint(LLAMA3_70B, plan.n_gpu_layers + 1, plan.n_ctx).vram > vram_budget(host)
    assert any("of 80 layers fit in GPU memory" in r for r in plan.reasons)


def test_two_gpus_take_more_layers_than_one() -> None:
    one = make_plan(LLAMA3_70B, gpu_host(64, 60, 24))
    two = make_plan(LLAMA3_70B, gpu_host(64, 60, 24, 24))
    assert two.n_gpu_layers > one.n_gpu_layers + 20


def test_partial_offload_saves_a_model_that_ram_alone_cannot_hold() -> None:
    with pytest.raises(PlanError):
        make_plan(LLAMA3_70B, cpu_host(32, 30))
    plan = make_plan(LLAMA3_70B, gpu_host(32, 30, 24))
    assert plan.fits and 0 < plan.n_gpu_layers < 80 and plan.n_ctx >= MIN_CONTEXT


def test_a_gpu_the_runtime_cannot_use_is_ignored() -> None:
    plan = make_plan(MISTRAL_7B, gpu_host(32, 28, 24), gpu_offload=False)
    assert plan.n_gpu_layers == 0 and plan.vram_budget == 0
    assert any("no GPU support" in r for r in plan.reasons)


def test_long_context_models_are_capped_but_can_be_asked_for_more() -> None:
    big_ram = cpu_host(256, 250)
    long_ctx = shape("long", 4 * GIB, block_count=32, embedding_length=4096, head_count=32, head_count_kv=8,
                     context_length=131072, vocab_size=128256, parameter_count=8 * 10**9)
    plan = make_plan(long_ctx, big_ram)
    assert plan.n_ctx == MAX_CONTEXT
    assert any("--n-ctx" in r for r in plan.reasons)
    assert make_plan(long_ctx, big_ram, PlanChoices(n_ctx=131072)).n_ctx == 131072


def test_small_model_gets_its_whole_trained_context() -> None:
    plan = make_plan(QWEN_05B, cpu_host(8, 6))
    assert plan.n_ctx == 32768 and plan.fits


def test_flags_override_every_choice_even_when_they_do_not_fit() -> None:
    host = cpu_host(16, 15)
    plan = make_plan(LLAMA3_70B, host, PlanChoices(n_gpu_layers=0, n_ctx=1024, threads=3))
    assert (plan.n_gpu_layers, plan.n_ctx, plan.n_threads, plan.n_threads_batch) == (0, 1024, 3, 3)
    assert not plan.fits
    assert any(r.startswith("warning:") for r in plan.reasons)


def test_forced_gpu_layers_still_get_an_automatic_context() -> None:
    host = gpu_host(64, 60, 24)
    plan = make_plan(MISTRAL_7B, host, PlanChoices(n_gpu_layers=10))
    assert plan.n_gpu_layers == 10
    assert_fits_and_is_maximal(MISTRAL_7B, host, plan.n_ctx, 10)
    assert make_plan(MISTRAL_7B, host, PlanChoices(n_gpu_layers=-1)).n_gpu_layers == 33


def test_a_context_too_small_to_chat_is_refused_with_a_hint() -> None:
    # The weights fit, but not 2048 tokens of context next to them.
    host = cpu_host(6, 5.5)
    with pytest.raises(PlanError, match=r"--n-ctx \d+ would fit"):
        make_plan(LLAMA2_7B, host)


def test_more_memory_never_means_less_context() -> None:
    contexts = [make_plan(MISTRAL_7B, cpu_host(ram, ram * 0.9)).n_ctx for ram in (7, 8, 12, 16, 24, 32, 64)]
    assert contexts == sorted(contexts)
    assert contexts[0] < contexts[-1] == MAX_CONTEXT


def test_plan_explains_itself_in_words_and_json() -> None:
    plan = make_plan(LLAMA2_7B, cpu_host(7.7, 7.0))
    text = plan.explain()
    assert f"n_ctx={plan.n_ctx}" in text and "n_gpu_layers=0" in text and "no usable GPU" in text
    document = json.loads(plan.to_json())
    assert document["n_ctx"] == plan.n_ctx and document["model_id"] == "llama2-7b"
    assert document["reasons"] == list(plan.reasons)
    assert document["ram_needed"] == footprint(LLAMA2_7B, 0, plan.n_ctx).ram


@pytest.mark.parametrize(("bad", "message"), [
    ({"block_count": 0}, "field 'block_count' must be a positive integer, found 0"),
    ({"embedding_length": None}, "field 'embedding_length' must be a positive integer, found None"),
    ({"block_count": True}, "field 'block_count' must be a positive integer, found True"),
    ({"head_count_kv": "8"}, "field 'head_count_kv' must be an integer, found '8'"),
    ({"head_count_kv": [8, 8]}, "head_count_kv must be one count or one per layer, found [8, 8]"),
    ({"context_length": -1}, "field 'context_length' must not be negative, found -1"),
    ({"vocab_size": 1.5}, "field 'vocab_size' must be an integer, found 1.5"),
])
def test_malformed_gguf_metadata_is_refused(bad: dict[str, Any], message: str) -> None:
    gguf = {"block_count": 32, "embedding_length": 4096, "head_count": 32, "head_count_kv": 8,
            "context_length": 4096, "vocab_size": 32000, "parameter_count": 7 * 10**9, **bad}
    with pytest.raises(PlanError) as refused:
        ModelShape.from_gguf("broken", gguf, 4 * GIB)
    prefix = "model 'broken': " if "one per layer" in message else "invalid GGUF metadata of model 'broken': "
    assert str(refused.value) == prefix + message


@pytest.mark.parametrize("overrides", [
    {"n_gpu_layers": -2}, {"n_ctx": 10}, {"threads": 0},
])
def test_nonsense_overrides_are_refused(overrides: dict[str, int]) -> None:
    with pytest.raises(PlanError):
        PlanChoices(**overrides)


def test_several_gpus_get_a_tensor_split_in_proportion_to_their_usable_memory() -> None:
    host = gpu_host(64, 60, 24, 48)
    plan = make_plan(LLAMA3_70B, host)
    assert plan.n_gpu_layers > 0 and len(plan.tensor_split) == 2
    small, large = (g.memory_free - max(256 * MIB, int(g.memory_total * 0.05)) - 512 * MIB for g in host.gpus)
    assert plan.tensor_split == (round(small / (small + large), 3), round(large / (small + large), 3))
    assert json.loads(plan.to_json())["tensor_split"] == list(plan.tensor_split)
    assert any(r.startswith("tensor split 0.3") and "over 2 GPUs" in r for r in plan.reasons)
    assert make_plan(LLAMA3_70B, gpu_host(64, 60, 24)).tensor_split == ()


def test_engine_plan_gives_each_slot_its_context_from_one_shared_kv_cache() -> None:
    plan = make_plan(LLAMA2_7B, cpu_host(64, 60), slots=True)
    assert plan.parallel == 4 and plan.n_ctx == 4 * 4096 and plan.ctx_per_slot == 4096
    assert footprint(LLAMA2_7B, 0, plan.n_ctx).ram == plan.ram_needed  # the KV cache of every slot counted
    assert plan.to_dict()["ctx_per_slot"] == 4096 and plan.to_dict()["parallel"] == 4
    assert any(r.startswith("parallel=4 so that each is sure of at least 2048 tokens") for r in plan.reasons)


def test_engine_plan_takes_fewer_slots_when_memory_is_short_and_obeys_parallel() -> None:
    tight = make_plan(LLAMA2_7B, cpu_host(8, 7.5), slots=True)
    assert tight.parallel < 4 and tight.ctx_per_slot >= MIN_CONTEXT
    forced = make_plan(LLAMA2_7B, cpu_host(64, 60), PlanChoices(parallel=8), slots=True)
    assert forced.parallel == 8 and forced.n_ctx == 8 * 4096
    with pytest.raises(PlanError) as caught:
        PlanChoices(parallel=0)
    assert caught.value.message == "--parallel must be between 1 and 256, found 0"


def test_without_the_engine_the_plan_is_one_slot_as_before() -> None:
    assert make_plan(LLAMA2_7B, cpu_host(64, 60)).parallel == 1


@pytest.mark.parametrize("gpus_gib", [(24,), (24, 24)], ids=["1x24GB", "2x24GB"])
def test_a_second_engine_is_planned_in_the_gpu_memory_the_first_one_left(gpus_gib: tuple[float, ...]) -> None:
    host = gpu_host(64, 60, *gpus_gib)
    first = make_plan(MISTRAL_7B, host, slots=True)
    left = left_after(host, first)
    second = make_plan(LLAMA3_70B, left, slots=True)
    alone = make_plan(LLAMA3_70B, host, slots=True)
    assert first.n_gpu_layers == MISTRAL_7B.n_layer + 1 and first.vram_needed > 0
    assert 0 < second.n_gpu_layers < alone.n_gpu_layers
    assert second.vram_budget < alone.vram_budget - first.vram_needed
    assert first.vram_needed + second.vram_needed <= vram_budget(host)
    assert first.ram_needed + second.ram_needed <= ram_budget(host)
    # on each GPU: both models' shares, and the second engine's own CUDA context, within what it had usable
    shares = [first.tensor_split or (1.0,), second.tensor_split or (1.0,)]
    for i, usable in enumerate(gpu_budgets(host)):
        used = first.vram_needed * shares[0][i] + second.vram_needed * shares[1][i] + RUNTIME_VRAM_PER_GPU
        assert used <= usable
    assert len(first.tensor_split) == len(second.tensor_split) == (2 if len(gpus_gib) == 2 else 0)


def test_what_a_plan_leaves_comes_off_each_gpu_by_its_share_and_cpu_plans_leave_gpus_alone() -> None:
    host = gpu_host(64, 60, 24, 48)
    plan = make_plan(LLAMA3_70B, host, slots=True)
    left = left_after(host, plan)
    assert left.ram_available == host.ram_available - plan.ram_needed
    for before, after, share in zip(host.gpus, left.gpus, plan.tensor_split, strict=True):
        assert after.memory_free == max(before.memory_free - int(plan.vram_needed * share) - RUNTIME_VRAM_PER_GPU, 0)
        assert after.memory_total == before.memory_total
    one = gpu_host(64, 60, 24)
    on_one = make_plan(MISTRAL_7B, one, slots=True)
    assert left_after(one, on_one).gpus[0].memory_free == (
        one.gpus[0].memory_free - on_one.vram_needed - RUNTIME_VRAM_PER_GPU)
    on_cpu = make_plan(MISTRAL_7B, one, gpu_offload=False, slots=True)
    assert on_cpu.vram_needed == 0 and left_after(one, on_cpu).gpus == one.gpus
