"""`build --target`: size each model to the target host before anything is downloaded.

The fit is plan.py's memory model run against the target's RAM (and GPU memory, when the bundle's engine can
use it), at the minimum context. A hub spec naming several quantizations (`file = "auto"`, or a glob) gets the
largest that fits; any other spec is refused when it does not fit, naming the shortfall and the largest
quantization of the same repository that would. Sizes in messages are decimal GB (10^9 bytes).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from airgap.build.spec import AUTO, ModelSpec, Spec
from airgap.build.spec import QUANTIZATIONS as CONVERTIBLE
from airgap.errors import FitError, FormatError, SpecError
from airgap.format import strictjson
from airgap.format.fields import Fields
from airgap.hardware.facts import HostFacts, HostInfo, host_info
from airgap.hardware.sizing import MIN_CONTEXT, ModelShape, shortfall
from airgap.hardware.target import EngineChoice, choose_engine, target_record

GB = 10**9
HEAD_SIZES = (2 << 20, 16 << 20, 64 << 20)  # a 256k-token vocabulary puts the tensor table past 10 MB
_QUANT = re.compile(
    r"(?i)(?<![A-Za-z0-9])(IQ\d_[A-Z0-9]+|Q\d_K_[SML]|Q\d_K_XL|Q\d_K|Q\d_\d|BF16|F16|F32)(?![A-Za-z0-9])")
_GLOB = re.compile(r"[*?\[]")

ReadHead = Callable[[str, int], bytes]  # (file name, length) -> its first bytes


@dataclass(frozen=True)
class Candidate:
    """One quantization of a model: its GGUF file(s) and their total size."""

    files: tuple[str, ...]
    size: int

    @property
    def label(self) -> str:
        return quant_label(self.files[0]) or self.files[0]

    def describe(self) -> str:
        return f"{self.label} ({_gb(self.size)})"


def quant_label(filename: str) -> str | None:
    """The quantization a GGUF file name announces ('Q4_K_M' from 'mistral-7b.Q4_K_M.gguf'); None if it names none."""
    found = _QUANT.findall(filename.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


@dataclass(frozen=True)
class Sized:
    """What one model's fit decided: the file(s) to fetch and one line saying why."""

    candidate: Candidate
    explanation: str


def choose(model_id: str, gguf: Mapping[str, Any], candidates: Sequence[Candidate], host: HostInfo, *,
           gpu_offload: bool) -> Sized:
    """The largest candidate that fits `host` at the minimum context; FitError when none does."""
    ordered = sorted(candidates, key=lambda c: (-c.size, c.files))
    too_big: list[str] = []
    for candidate in ordered:
        missing = _shortfall(model_id, gguf, candidate, host, gpu_offload)
        if missing == 0:
            skipped = f"; larger ones do not fit: {', '.join(too_big)}" if too_big else ""
            return Sized(candidate, f"model {model_id}: chose {candidate.describe()}, the largest of "
                                    f"{len(ordered)} quantizations that fits {_memory(host, gpu_offload)}{skipped}")
        too_big.append(f"{candidate.label} is {_gb(missing)} short")
    smallest = ordered[-1]
    raise FitError(
        f"model {model_id!r} does not fit the target host even at {MIN_CONTEXT} tokens of context: the smallest "
        f"quantization, {smallest.describe()}, needs {_gb(_shortfall(model_id, gguf, smallest, host, gpu_offload))}"
        f" more than {_memory(host, gpu_offload)}; no quantization in the repository fits; nothing was downloaded")


def check(model_id: str, gguf: Mapping[str, Any], fixed: Candidate, alternatives: Sequence[Candidate],
          host: HostInfo, *, gpu_offload: bool, converted: bool = False) -> Sized:
    """The spec's own file, if it fits; else FitError naming the shortfall and the largest alternative that fits.

    `converted`: the candidates are quantizations `build` would make (`quantize =`), not files of the repo."""
    missing = _shortfall(model_id, gguf, fixed, host, gpu_offload)
    if missing == 0:
        return Sized(fixed, f"model {model_id}: {fixed.describe()} fits {_memory(host, gpu_offload)}")
    fitting = [c for c in sorted(alternatives, key=lambda c: -c.size)
               if c.files != fixed.files and _shortfall(model_id, gguf, c, host, gpu_offload) == 0]
    if converted:
        advice = (f"the largest quantization that would fit is {fitting[0].describe()}: quantize = "
                  f"\"{fitting[0].label}\" or \"{AUTO}\" in the spec" if fitting else "no smaller quantization fits")
    else:
        advice = (f"the largest quantization that would fit is {fitting[0].describe()}: name "
                  f"{fitting[0].files[0]!r} or file = \"{AUTO}\" in the spec" if fitting
                  else "no other quantization in its repository fits")
    raise FitError(
        f"model {model_id!r} does not fit the target host even at {MIN_CONTEXT} tokens of context: "
        f"{fixed.describe()} needs {_gb(missing)} more than {_memory(host, gpu_offload)}; {advice}; "
        "nothing was downloaded")


def _shortfall(model_id: str, gguf: Mapping[str, Any], candidate: Candidate, host: HostInfo,
               gpu_offload: bool) -> int:
    # Quantizations of one model share its shape; only the weights' size differs.
    shape = ModelShape.from_gguf(model_id, {**gguf, "file_type": candidate.label}, candidate.size)
    return shortfall(shape, host, gpu_offload)


def _memory(host: HostInfo, gpu_offload: bool) -> str:
    text = f"the target's {_gb(host.ram_available)} of available RAM"
    if gpu_offload and host.gpus:
        text += f" and {_gb(sum(g.memory_free for g in host.gpus))} of free GPU memory"
    return text


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


# ---------------------------------------------------------------- a whole spec

@dataclass(frozen=True)
class TargetedSpec:
    spec: Spec  # python version/platforms and model files pinned for the target
    record: dict[str, Any]  # the manifest's `target` field
    engine: EngineChoice  # "cuda" or "vulkan" when the bundle carries that GPU backend for this host


class HubReader:
    """The hub calls the fit needs: a listing with sizes, and the first bytes of a file. Tests pass a stand-in."""

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint

    def listing(self, repo: str, revision: str) -> tuple[str, dict[str, int]]:
        from airgap.build.sources.hf import list_hub_files

        return list_hub_files(repo, revision, endpoint=self.endpoint)

    def head(self, repo: str, commit: str, filename: str, length: int) -> bytes:
        from airgap.build.sources.hf import read_hub_head

        return read_hub_head(repo, commit, filename, length, endpoint=self.endpoint)


def size_for_target(
    spec: Spec, facts: HostFacts, hub: HubReader, say: Callable[[str], object] | None, *, cuda_packed: bool,
    vulkan_packed: bool = False,
) -> TargetedSpec:
    """Pin the spec to the target host: its Python and platform tags, and each model sized to fit it.

    `cuda_packed`, `vulkan_packed`: whether this build can carry that backend (the spec does not turn it off).
    """
    if facts.implementation != "cpython" or facts.abi is None:
        raise SpecError(f"the target runs {facts.implementation} {facts.python_version}; airgap packs wheels for "
                        "CPython only")
    if facts.wheel_platform is None:
        raise SpecError("the target's probe lists no wheel platform tags; run `airgap probe` there again")
    engine = choose_engine(facts, cuda_packed=cuda_packed, vulkan_packed=vulkan_packed)
    host = host_info(facts)
    lines = [f"target: python {facts.python_minor} on {facts.wheel_platform}; engine {engine.engine}: {engine.reason}"]
    models = []
    for model in spec.models:
        pinned, sized = _size_model(model, host, engine, hub)
        models.append(pinned)
        lines.append(sized.explanation)
    if say is not None:
        for line in lines:
            say(line)
    python = replace(spec.python, python_version=facts.python_minor, platforms=(facts.wheel_platform,))
    return TargetedSpec(replace(spec, python=python, models=tuple(models)), target_record(facts, engine, lines), engine)


def _size_model(model: ModelSpec, host: HostInfo, engine: EngineChoice, hub: HubReader) -> tuple[ModelSpec, Sized]:
    gpu = engine.engine in ("cuda", "vulkan")
    if model.path is not None:
        from airgap.build.sources.gguf_meta import read_gguf_metadata

        own = Candidate((model.path.name,), model.path.stat().st_size)
        return model, check(model.id, read_gguf_metadata(model.path), own, (), host, gpu_offload=gpu)
    assert model.repo is not None
    commit, sizes = hub.listing(model.repo, model.revision)
    if model.quantize is not None:
        return size_converted(model, commit, sizes, host, gpu, hub)
    every = [Candidate((name,), size) for name, size in sorted(sizes.items()) if name.endswith(".gguf")]
    pattern = _pattern(model)
    if pattern is not None:
        candidates = [c for c in every if pattern == AUTO or fnmatch.fnmatch(c.files[0], pattern)]
        if not candidates:
            raise SpecError(f"model {model.id!r}: {model.repo}@{model.revision} has no GGUF file matching "
                            f"{pattern!r}; it has: {', '.join(c.files[0] for c in every) or 'none'}")
        gguf = _read_header(model, commit, min(candidates, key=lambda c: c.size), hub)
        sized = choose(model.id, gguf, candidates, host, gpu_offload=gpu)
        return replace(model, revision=commit, files=sized.candidate.files, allow_patterns=()), sized
    named = [f for f in model.files if f.endswith(".gguf")]
    named += sorted(n for n in sizes if n.endswith(".gguf") and n not in named
                    and any(fnmatch.fnmatch(n, p) for p in model.allow_patterns))
    if not named or any(n not in sizes for n in named):
        return replace(model, revision=commit), Sized(Candidate(tuple(named), 0),
                                                      f"model {model.id}: no GGUF size announced; not sized")
    fixed = Candidate(tuple(named), sum(sizes[n] for n in named))
    gguf = _read_header(model, commit, Candidate((named[0],), sizes[named[0]]), hub)
    return replace(model, revision=commit), check(model.id, gguf, fixed, every, host, gpu_offload=gpu)


# llama.cpp's own sizes for each quantization of Llama-3-8B (8 030 261 248 parameters), in GiB, from
# tools/quantize/quantize.cpp of the pinned sdist; a converted model's size is estimated from them by its
# parameter count. F16, BF16 and F32 are exact (2, 2 and 4 bytes per parameter).
_LLAMA3_8B_PARAMETERS = 8_030_261_248
_LLAMA3_8B_GIB = {"Q8_0": 7.96, "Q6_K": 6.14, "Q5_K_M": 5.33, "Q5_K_S": 5.21, "Q5_1": 5.65, "Q5_0": 5.21,
                  "Q4_K_M": 4.58, "Q4_K_S": 4.37, "Q4_1": 4.78, "Q4_0": 4.34, "Q3_K_L": 4.03, "Q3_K_M": 3.74,
                  "Q3_K_S": 3.41}
_EXACT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_SAFETENSORS_HEADER_LIMIT = 100 << 20


def estimated_size(parameters: int, quantization: str) -> int:
    """The GGUF size of a model of `parameters` weights at `quantization` (estimated for the quantized types)."""
    if quantization in _EXACT_BYTES:
        return parameters * _EXACT_BYTES[quantization]
    return int(parameters * _LLAMA3_8B_GIB[quantization] * (1 << 30) / _LLAMA3_8B_PARAMETERS)


def shape_from_config(model_id: str, config: Mapping[str, Any], parameters: int) -> dict[str, object]:
    """The GGUF fields the fit reads, from a Hugging Face config.json (its text model's, for a multimodal one)."""
    text = config.get("text_config")
    doc = Fields(text if isinstance(text, dict) and "num_hidden_layers" in text else config,
                 f"config.json of model {model_id!r}", error=FitError)
    heads = doc.positive("num_attention_heads")
    shape: dict[str, object] = {
        "architecture": doc.optional_text("model_type", longest=100) or "unknown",
        "block_count": doc.positive("num_hidden_layers"), "embedding_length": doc.positive("hidden_size"),
        "head_count": heads, "head_count_kv": doc.count("num_key_value_heads", heads),
        "context_length": doc.count("max_position_embeddings", 0), "vocab_size": doc.count("vocab_size", 0),
        "parameter_count": parameters,
    }
    head_dim = doc.optional_num("head_dim")
    if head_dim:
        shape["key_length"] = shape["value_length"] = head_dim
    return shape


def safetensors_parameters(header: bytes, name: str) -> int:
    """The number of weights a safetensors file holds, from its JSON header (8-byte length, then the JSON)."""
    try:
        tensors = strictjson.loads(header[8:], f"the safetensors header of {name}")
    except FormatError as exc:
        raise FitError(exc.message) from exc
    doc = Fields(tensors, f"safetensors header of {name}", error=FitError)
    total = 0
    for key in sorted(doc.raw):
        if key != "__metadata__":
            shape = doc.sub(key).items("shape", 8)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise FitError(f"{name}: tensor {key[:80]!r} has shape {shape!r}; expected whole numbers")
            total += math.prod(shape)
    return total


def size_converted(model: ModelSpec, commit: str, sizes: Mapping[str, int], host: HostInfo, gpu: bool,
                   hub: HubReader) -> tuple[ModelSpec, Sized]:
    """`quantize =`: the GGUF does not exist yet; its size is estimated from the weights' parameter count."""
    from airgap.build.sources.convert import files_to_fetch

    assert model.repo is not None and model.quantize is not None
    names = files_to_fetch(model.repo, commit, sizes)
    parameters = 0
    for name in (n for n in names if n.endswith(".safetensors")):
        length = int.from_bytes(hub.head(model.repo, commit, name, 8)[:8], "little")
        if not 0 < length <= min(_SAFETENSORS_HEADER_LIMIT, sizes[name] - 8):
            raise FitError(f"model {model.id!r}: {model.repo} {name}: expected a safetensors header of at most "
                           f"{_SAFETENSORS_HEADER_LIMIT >> 20} MiB inside the file, found {length} bytes")
        parameters += safetensors_parameters(hub.head(model.repo, commit, name, 8 + length), name)
    try:
        config = strictjson.loads(hub.head(model.repo, commit, "config.json", sizes["config.json"]),
                                  f"{model.repo} config.json")
    except FormatError as exc:
        raise FitError(f"model {model.id!r}: {exc.message}") from exc
    gguf = shape_from_config(model.id, config, parameters)
    every = [Candidate((f"{model.id}-{q}.gguf",), estimated_size(parameters, q)) for q in CONVERTIBLE]
    pinned = replace(model, revision=commit)
    if model.quantize == AUTO:
        # F32 and BF16 are left to a spec that names them: F32 adds nothing to F16, BF16 is F16's size
        sized = choose(model.id, gguf, [c for c in every if c.label not in {"F32", "BF16"}], host, gpu_offload=gpu)
        return replace(pinned, quantize=sized.candidate.label), _estimated(sized, parameters)
    fixed = next(c for c in every if c.label == model.quantize)
    return pinned, _estimated(check(model.id, gguf, fixed, every, host, gpu_offload=gpu, converted=True), parameters)


def _estimated(sized: Sized, parameters: int) -> Sized:
    count = f"{parameters / 1e9:.2f}B" if parameters >= 10**8 else f"{parameters:,}"
    return Sized(sized.candidate, f"{sized.explanation} (to be converted; size estimated from its {count} parameters)")


def _pattern(model: ModelSpec) -> str | None:
    """`auto` or the glob a spec's single `file` names; None for named files and allow_patterns."""
    if len(model.files) == 1 and (model.files[0] == AUTO or _GLOB.search(model.files[0])):
        return model.files[0]
    return None


def _read_header(model: ModelSpec, commit: str, candidate: Candidate, hub: HubReader) -> dict[str, object]:
    from airgap.build.sources.gguf_meta import read_gguf_metadata_head

    assert model.repo is not None
    name = candidate.files[0]
    for length in HEAD_SIZES:
        head = hub.head(model.repo, commit, name, min(length, candidate.size))
        try:
            gguf = read_gguf_metadata_head(head, candidate.size, name)
        except FormatError as exc:
            raise FitError(f"model {model.id!r}: {model.repo} {name}: cannot size it: {exc.message}") from exc
        if gguf is not None:
            return gguf
    raise FitError(f"model {model.id!r}: {model.repo} {name}: its GGUF header runs past {HEAD_SIZES[-1] >> 20} MiB; "
                   "cannot size it before downloading")
