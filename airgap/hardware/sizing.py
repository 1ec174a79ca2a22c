"""Size a model to a host: how many layers go to the GPU, how long a context fits, how many threads.

Pure: a model's GGUF shape and a HostInfo in, a Plan out. The memory model is deliberately simple and
slightly pessimistic, so that a plan which fits leaves the host room to breathe:

- weights: the GGUF file size (llama.cpp maps it; counting it keeps page cache from thrashing);
- KV cache: 2 * n_layer * n_ctx * n_head_kv * head_dim * bytes_per_element (f16: 2 bytes),
  with separate key and value widths when the GGUF gives them;
- compute buffers: logits for one micro-batch plus the attention scores of one micro-batch over the context;
- a fixed allowance for the runtime (Python, llama.cpp, the HTTP server; a CUDA context per GPU);
- a safety margin kept free: 10 % of RAM (at least 512 MiB), 5 % of each GPU (at least 256 MiB).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from airgap.errors import PlanError
from airgap.format.fields import Fields
from airgap.hardware.facts import HostInfo

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

MIN_CONTEXT = 2048  # below this a chat with a system prompt does not fit; refuse rather than serve it
PREFERRED_CONTEXT = 8192  # GPU layers are chosen so that at least this much context still fits
MAX_CONTEXT = 32768  # the KV cache is allocated up front; larger contexts only on request (--n-ctx)
CONTEXT_STEP = 256
KV_BYTES_PER_ELEMENT = 2  # f16 cache, llama.cpp's default
MICRO_BATCH = 512  # llama-cpp-python's default n_ubatch
RUNTIME_RAM = 384 * MIB
RUNTIME_VRAM_PER_GPU = 512 * MIB
DEFAULT_PARALLEL = 4  # llama-server slots: concurrent requests decoded together (continuous batching)
MAX_PARALLEL = 256
DEFAULT_MAX_TOKENS = 2048  # a request without max_tokens generates at most this many (or the context)
RAM_MARGIN_FRACTION, RAM_MARGIN_MIN = 0.10, 512 * MIB
VRAM_MARGIN_FRACTION, VRAM_MARGIN_MIN = 0.05, 256 * MIB


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about one model, read from the manifest's `gguf` mapping."""

    id: str
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer; most models repeat one value
    key_length: int
    value_length: int
    context_length: int
    n_vocab: int
    weights_bytes: int
    file_type: str | None = None
    parameter_count: int = 0

    @classmethod
    def from_gguf(cls, model_id: str, gguf: Mapping[str, Any], weights_bytes: int) -> ModelShape:
        reader = Fields(gguf, f"GGUF metadata of model {model_id!r}", error=PlanError)
        n_layer = reader.positive("block_count")
        n_embd = reader.positive("embedding_length")
        n_head = reader.count("head_count", 0)
        kv = gguf.get("head_count_kv", n_head)
        per_layer = isinstance(kv, list | tuple)
        n_head_kv = tuple(kv) if per_layer else (reader.count("head_count_kv", n_head),)
        if len(n_head_kv) not in (1, n_layer) or not all(_is_count(v) for v in n_head_kv):
            raise PlanError(f"model {model_id!r}: head_count_kv must be one count or one per layer, found {kv!r}")
        head_dim = n_embd // n_head if n_head else 0
        return cls(
            id=model_id, architecture=str(gguf.get("architecture") or "unknown"),
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_head_kv=n_head_kv * n_layer if len(n_head_kv) == 1 else n_head_kv,
            key_length=reader.count("key_length", head_dim), value_length=reader.count("value_length", head_dim),
            context_length=reader.count("context_length", 0), n_vocab=reader.count("vocab_size", 0),
            weights_bytes=weights_bytes, file_type=None if gguf.get("file_type") is None else str(gguf["file_type"]),
            parameter_count=reader.count("parameter_count", 0),
        )

    def kv_bytes_per_token(self, layers: range | None = None, bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
        """Key + value cache for one token over the given layers (all by default)."""
        selected = range(self.n_layer) if layers is None else layers
        return sum(self.n_head_kv[i] * (self.key_length + self.value_length) for i in selected) * bytes_per_element

    @property
    def output_bytes(self) -> int:
        """The output projection (n_vocab x n_embd), offloaded only when every repeating layer is."""
        per_weight = self.weights_bytes / self.parameter_count if self.parameter_count else 0.0
        return min(int(self.n_vocab * self.n_embd * per_weight), self.weights_bytes // 4)

    @property
    def layer_bytes(self) -> int:
        # The input embeddings stay on the CPU; they are about as large as the output projection.
        return max(self.weights_bytes - 2 * self.output_bytes, 0) // self.n_layer


@dataclass(frozen=True)
class PlanChoices:
    """Operator choices; each one replaces the planner's."""

    n_gpu_layers: int | None = None  # -1: every layer
    n_ctx: int | None = None
    threads: int | None = None
    parallel: int | None = None  # llama-server slots

    def __post_init__(self) -> None:
        if self.parallel is not None and not 1 <= self.parallel <= MAX_PARALLEL:
            raise PlanError(f"--parallel must be between 1 and {MAX_PARALLEL}, found {self.parallel}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise PlanError(f"--n-gpu-layers must be -1 (all) or a count >= 0, found {self.n_gpu_layers}")
        if self.n_ctx is not None and self.n_ctx < 64:
            raise PlanError(f"--n-ctx must be at least 64 tokens, found {self.n_ctx}")
        if self.threads is not None and self.threads < 1:
            raise PlanError(f"--threads must be at least 1, found {self.threads}")


NO_CHOICES = PlanChoices()


@dataclass(frozen=True)
class Footprint:
    ram: int
    vram: int


@dataclass(frozen=True)
class Plan:
    """The settings one model is served with, the memory they need, and why they were chosen."""

    model_id: str
    n_gpu_layers: int
    n_ctx: int
    n_threads: int
    n_threads_batch: int
    ram_needed: int
    ram_budget: int
    vram_needed: int
    vram_budget: int
    fits: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    tensor_split: tuple[float, ...] = ()  # llama.cpp --tensor-split: each GPU's share of the offloaded layers
    parallel: int = 1  # slots sharing the n_ctx tokens of KV cache (llama-server --kv-unified)
    cpu_fallback: str | None = None  # why the engine's GPU backend cannot be used here, when it cannot

    @property
    def ctx_per_slot(self) -> int:
        """Context each slot is sure of when every slot is busy; one request alone may use all of n_ctx."""
        return self.n_ctx // self.parallel

    @property
    def max_tokens_default(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.n_ctx)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons), "ctx_per_slot": self.ctx_per_slot,
                "max_tokens_default": self.max_tokens_default, "max_tokens_cap": self.n_ctx}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def explain(self) -> str:
        head = (
            f"{self.model_id}: n_gpu_layers={self.n_gpu_layers} n_ctx={self.n_ctx}"
            f"{f' parallel={self.parallel} ({self.ctx_per_slot} per slot)' if self.parallel > 1 else ''}"
            f" threads={self.n_threads}"
            f" (batch {self.n_threads_batch}); needs {_gib(self.ram_needed)} RAM of {_gib(self.ram_budget)} usable"
        )
        if self.vram_budget or self.vram_needed:
            head += f", {_gib(self.vram_needed)} GPU memory of {_gib(self.vram_budget)} usable"
        return "\n".join([head, *(f"  - {reason}" for reason in self.reasons)])


@dataclass(frozen=True)
class _Budget:
    ram: int
    vram: int
    gpus: int


def ram_budget(host: HostInfo) -> int:
    margin = max(RAM_MARGIN_MIN, int(host.ram_total * RAM_MARGIN_FRACTION))
    return max(host.ram_available - margin, 0)


def vram_budget(host: HostInfo) -> int:
    return sum(gpu_budgets(host))


def gpu_budgets(host: HostInfo) -> tuple[int, ...]:
    """Usable bytes of each GPU, in the host's order: free memory less its margin and its CUDA context."""
    budgets = []
    for gpu in host.gpus:
        margin = max(VRAM_MARGIN_MIN, int(gpu.memory_total * VRAM_MARGIN_FRACTION))
        budgets.append(max(gpu.memory_free - margin - RUNTIME_VRAM_PER_GPU, 0))
    return tuple(budgets)


def tensor_split(host: HostInfo) -> tuple[float, ...]:
    """Shares of the offloaded layers per GPU, proportional to each one's usable memory; () for one GPU or none."""
    budgets = gpu_budgets(host)
    total = sum(budgets)
    if len(budgets) < 2 or total == 0:
        return ()
    return tuple(round(b / total, 3) for b in budgets)


def left_after(host: HostInfo, plan: Plan) -> HostInfo:
    """What `host` has left for the next model once `plan`'s model is loaded beside it (a separate process).

    RAM goes down by the plan's need. GPU memory goes down, on each GPU, by that GPU's share of the plan's need
    (its tensor split; all on the first GPU without one) plus the process's own CUDA context there.
    """
    gpus = host.gpus
    if plan.vram_needed > 0 and gpus:
        shares = plan.tensor_split if len(plan.tensor_split) == len(gpus) else (1.0,) + (0.0,) * (len(gpus) - 1)
        gpus = tuple(
            replace(gpu, memory_free=max(gpu.memory_free - int(plan.vram_needed * share) - RUNTIME_VRAM_PER_GPU, 0))
            if share > 0 else gpu
            for gpu, share in zip(gpus, shares, strict=True)
        )
    return replace(host, ram_available=max(host.ram_available - plan.ram_needed, 0), gpus=gpus)


def shortfall(shape: ModelShape, host: HostInfo, gpu_offload: bool = True) -> int:
    """Bytes missing to serve `shape` on `host` at the minimum context; 0 when make_plan would not refuse."""
    use_gpu = gpu_offload and bool(host.gpus)
    budget = _Budget(ram=ram_budget(host), vram=vram_budget(host) if use_gpu else 0,
                     gpus=len(host.gpus) if use_gpu else 0)
    min_ctx = _context_bounds(shape)[1]
    ngl = _choose_gpu_layers(shape, budget, min_ctx) if use_gpu else 0
    if _largest_context(shape, ngl, budget) >= min_ctx:
        return 0
    return max(_missing(footprint(shape, ngl, min_ctx, max(budget.gpus, 1)), budget), 1)


def footprint(shape: ModelShape, n_gpu_layers: int, n_ctx: int, gpu_count: int = 1) -> Footprint:
    """Estimated bytes of RAM and GPU memory to serve `shape` with these settings."""
    fixed, per_token = _cost(shape, n_gpu_layers, gpu_count)
    return Footprint(ram=fixed.ram + n_ctx * per_token.ram, vram=fixed.vram + n_ctx * per_token.vram)


def make_plan(
    shape: ModelShape, host: HostInfo, overrides: PlanChoices = NO_CHOICES, gpu_offload: bool = True,
    slots: bool = False,
) -> Plan:
    """Choose n_gpu_layers, n_ctx and threads for `shape` on `host`; PlanError when it cannot fit.

    `gpu_offload` says whether the installed llama.cpp was built with GPU support at all. With `slots` (the
    llama-server engine) the plan also chooses parallel slots: the KV cache holds n_ctx tokens shared by all
    of them, sized so that each slot is sure of at least the minimum context.
    """
    parallel = 1
    reasons: list[str] = [_describe_model(shape)]
    use_gpu = gpu_offload and bool(host.gpus)
    if host.gpus and not gpu_offload:
        reasons.append("an NVIDIA GPU is present but the installed llama.cpp has no GPU support: planning for CPU only")
    budget = _Budget(
        ram=ram_budget(host), vram=vram_budget(host) if use_gpu else 0, gpus=len(host.gpus) if use_gpu else 0,
    )
    reasons.append(_describe_budget(host, budget))
    max_ctx, min_ctx = _context_bounds(shape)
    all_layers = shape.n_layer + 1

    if overrides.n_gpu_layers is not None:
        ngl = all_layers if overrides.n_gpu_layers == -1 else min(overrides.n_gpu_layers, all_layers)
        reasons.append(f"n_gpu_layers={ngl} as requested")
        if ngl and not use_gpu:
            reasons.append("no usable GPU: llama.cpp will keep those layers on the CPU; memory counted as RAM")
            ngl_for_memory = 0
        else:
            ngl_for_memory = ngl
    else:
        target = overrides.n_ctx or min(PREFERRED_CONTEXT, max_ctx)
        ngl = ngl_for_memory = _choose_gpu_layers(shape, budget, target) if use_gpu else 0
        if use_gpu and overrides.n_ctx is None and _largest_context(shape, ngl, budget) < min_ctx:
            # With that context the rest of the model would not fit in RAM: offload more, settle for less context.
            target = min_ctx
            ngl = ngl_for_memory = _choose_gpu_layers(shape, budget, target)
        reasons.append(_describe_layers(shape, ngl, use_gpu, target))

    if overrides.n_ctx is not None:
        n_ctx = overrides.n_ctx
        reasons.append(f"n_ctx={n_ctx} as requested")
        if shape.context_length and n_ctx > shape.context_length:
            reasons.append(f"n_ctx exceeds the {shape.context_length} tokens the model was trained for")
    else:
        largest = _largest_context(shape, ngl_for_memory, budget)
        if largest < min_ctx:
            raise PlanError(_refusal(shape, ngl_for_memory, min_ctx, budget))
        if slots:
            parallel = overrides.parallel or DEFAULT_PARALLEL
            while overrides.parallel is None and parallel > 1 and largest // parallel < min_ctx:
                parallel -= 1
            per_slot = min(max_ctx, PREFERRED_CONTEXT)
            n_ctx = min(largest, max(max_ctx, parallel * per_slot)) // CONTEXT_STEP * CONTEXT_STEP
            reasons.append(_describe_context(shape, n_ctx, largest, max(max_ctx, parallel * per_slot)))
            reasons.append(_describe_slots(parallel, n_ctx, overrides.parallel is not None, min_ctx))
        else:
            n_ctx = min(largest, max_ctx)
            reasons.append(_describe_context(shape, n_ctx, largest, max_ctx))

    if slots and overrides.n_ctx is not None:
        parallel = overrides.parallel or max(1, min(DEFAULT_PARALLEL, n_ctx // min_ctx))
        reasons.append(_describe_slots(parallel, n_ctx, overrides.parallel is not None, min_ctx))
    n_threads, n_threads_batch, thread_reason = _threads(host, overrides)
    reasons.append(thread_reason)
    split = tensor_split(host) if use_gpu and ngl_for_memory else ()
    if split:
        reasons.append(f"tensor split {','.join(f'{share:g}' for share in split)}: the {ngl_for_memory} offloaded"
                       f" layers spread over {len(split)} GPUs in proportion to their usable memory")
    need = footprint(shape, ngl_for_memory, n_ctx, max(budget.gpus, 1))
    fits = need.ram <= budget.ram and need.vram <= budget.vram
    if not fits:
        reasons.append(f"warning: by this estimate the flags ask for {_gib(_missing(need, budget))} more memory than is"
                       " free; the operator's flags win")
    return Plan(
        model_id=shape.id, n_gpu_layers=ngl, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads_batch,
        ram_needed=need.ram, ram_budget=budget.ram, vram_needed=need.vram, vram_budget=budget.vram, fits=fits,
        reasons=tuple(reasons), tensor_split=split, parallel=parallel,
    )


def _describe_slots(parallel: int, n_ctx: int, requested: bool, min_ctx: int) -> str:
    why = "as requested" if requested else f"so that each is sure of at least {min_ctx} tokens"
    text = (f"parallel={parallel} {why}: {parallel} requests decode together and share the KV cache of {n_ctx}"
            f" tokens ({n_ctx // parallel} per slot when all are busy; one request alone may use all of it)")
    if n_ctx // parallel < min_ctx:
        text += f"; warning: below the minimum of {min_ctx} per slot"
    return text


def _cost(shape: ModelShape, n_gpu_layers: int, gpu_count: int) -> tuple[Footprint, Footprint]:
    """(fixed bytes, bytes per context token) in RAM and GPU memory."""
    gpu_layers = min(n_gpu_layers, shape.n_layer)
    output_on_gpu = n_gpu_layers > shape.n_layer
    weights_gpu = gpu_layers * shape.layer_bytes + (shape.output_bytes if output_on_gpu else 0)
    # llama.cpp offloads the last layers first, and each layer's KV cache lives with the layer.
    kv_gpu = shape.kv_bytes_per_token(range(shape.n_layer - gpu_layers, shape.n_layer))
    kv_cpu = shape.kv_bytes_per_token() - kv_gpu
    logits = MICRO_BATCH * shape.n_vocab * 4
    activations = MICRO_BATCH * 4 * shape.n_embd * 4
    scores_per_token = MICRO_BATCH * shape.n_head * 4  # attention scores of one micro-batch, f32
    # llama-cpp-python keeps one micro-batch of logits, llama.cpp its own output buffer.
    ram_fixed = shape.weights_bytes - weights_gpu + RUNTIME_RAM + 2 * logits
    if gpu_layers == 0:
        return Footprint(ram_fixed + activations, 0), Footprint(kv_cpu + scores_per_token, 0)
    vram_fixed = weights_gpu + logits + activations + RUNTIME_VRAM_PER_GPU * (gpu_count - 1)
    # Several GPUs split by whole layers, so each one may strand up to a layer's worth of memory.
    vram_fixed += shape.layer_bytes * (gpu_count - 1)
    cpu_scores = scores_per_token if gpu_layers < shape.n_layer else 0
    return Footprint(ram_fixed, vram_fixed), Footprint(kv_cpu + cpu_scores, kv_gpu + scores_per_token)


def _largest_context(shape: ModelShape, n_gpu_layers: int, budget: _Budget) -> int:
    """Longest context (a multiple of CONTEXT_STEP) that fits; negative when not even the weights fit."""
    fixed, per_token = _cost(shape, n_gpu_layers, max(budget.gpus, 1))
    limits = [
        (room // cost) if room >= 0 else -1
        for room, cost in ((budget.ram - fixed.ram, per_token.ram), (budget.vram - fixed.vram, per_token.vram))
        if cost > 0 or room < 0
    ]
    largest = min(limits, default=MAX_CONTEXT * 64)
    return largest if largest < 0 else largest // CONTEXT_STEP * CONTEXT_STEP


def _choose_gpu_layers(shape: ModelShape, budget: _Budget, n_ctx: int) -> int:
    """Most layers whose weights and KV cache fit in GPU memory with `n_ctx` tokens of context."""
    for ngl in range(shape.n_layer + 1, 0, -1):
        if footprint(shape, ngl, n_ctx, budget.gpus).vram <= budget.vram:
            return ngl
    return 0


def _context_bounds(shape: ModelShape) -> tuple[int, int]:
    trained = shape.context_length or MAX_CONTEXT
    return min(trained, MAX_CONTEXT), min(trained, MIN_CONTEXT)


def _threads(host: HostInfo, overrides: PlanChoices) -> tuple[int, int, str]:
    if overrides.threads is not None:
        return overrides.threads, overrides.threads, f"threads={overrides.threads} as requested"
    # One thread per physical core (hyper-threads only contend in llama.cpp's spinning thread pool), less one
    # core left to the HTTP server, so /health and the event loop answer while a generation runs.
    threads = max(host.cores - 1, 1)
    return threads, threads, (
        f"threads={threads}: one per physical core ({host.cores}), less one for the HTTP server"
    )


def _missing(need: Footprint, budget: _Budget) -> int:
    return max(need.ram - budget.ram, 0) + max(need.vram - budget.vram, 0)


def _refusal(shape: ModelShape, n_gpu_layers: int, min_ctx: int, budget: _Budget) -> str:
    need = footprint(shape, n_gpu_layers, min_ctx, max(budget.gpus, 1))
    gpu = f" and {_gib(need.vram)} of GPU memory ({_gib(budget.vram)} usable)" if budget.vram else ""
    largest = _largest_context(shape, n_gpu_layers, budget)
    advice = (
        f"use a smaller quantization, add memory, or force a shorter context (--n-ctx {largest} would fit)"
        if largest >= CONTEXT_STEP else "use a smaller quantization or add memory"
    )
    return (
        f"model {shape.id!r} does not fit this host: at the minimum context of {min_ctx} tokens with"
        f" {n_gpu_layers} layers on the GPU it needs {_gib(need.ram)} of RAM ({_gib(budget.ram)} usable){gpu};"
        f" {_gib(_missing(need, budget))} missing; {advice}"
    )


def _describe_model(shape: ModelShape) -> str:
    kv = shape.kv_bytes_per_token()
    quant = f" {shape.file_type}" if shape.file_type else ""
    return (
        f"model: {shape.architecture}{quant}, {shape.n_layer} layers, {_gib(shape.weights_bytes)} of weights,"
        f" KV cache {_gib(kv)} per token of context, trained for {shape.context_length or 'unknown'} tokens"
    )


def _describe_budget(host: HostInfo, budget: _Budget) -> str:
    text = (
        f"host: {_gib(host.ram_available)} of {_gib(host.ram_total)} RAM available, {_gib(budget.ram)} usable"
        f" after the safety margin; {host.cores} cores, {host.cpus} CPUs"
    )
    if budget.gpus:
        names = ", ".join(sorted({g.name for g in host.gpus}))
        text += f"; {budget.gpus} GPU ({names}) with {_gib(budget.vram)} usable"
    return text + "".join(f"; {note}" for note in host.notes)


def _describe_layers(shape: ModelShape, ngl: int, use_gpu: bool, n_ctx: int) -> str:
    if not use_gpu:
        return "n_gpu_layers=0: no usable GPU, the model runs on the CPU"
    if ngl > shape.n_layer:
        return f"n_gpu_layers={ngl}: the whole model and its KV cache fit in GPU memory"
    if ngl == 0:
        return "n_gpu_layers=0: not even one layer fits in GPU memory next to the compute buffers"
    return (
        f"n_gpu_layers={ngl}: {ngl} of {shape.n_layer} layers fit in GPU memory with room for"
        f" {n_ctx} tokens of context; the rest run on the CPU"
    )


def _describe_context(shape: ModelShape, n_ctx: int, largest: int, max_ctx: int) -> str:
    if n_ctx == shape.context_length:
        return f"n_ctx={n_ctx}: the model's full trained context fits"
    if n_ctx == max_ctx and largest > max_ctx:
        return f"n_ctx={n_ctx}: capped at {MAX_CONTEXT} tokens (memory would allow {largest}); raise it with --n-ctx"
    return f"n_ctx={n_ctx}: the longest context that fits in the memory left after the weights"


def _gib(n: int) -> str:
    """Bytes for people: GiB with one decimal down to 0.1 GiB, then MiB, then KiB."""
    if abs(n) >= GIB // 10:
        return f"{n / GIB:.1f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / KIB:.0f} KiB" if abs(n) >= KIB else f"{n} bytes"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
