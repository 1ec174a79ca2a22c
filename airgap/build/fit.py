"""`build --target`: size each model to the target host before anything is downloaded.

The fit is plan.py's memory model run against the target's RAM (and GPU memory, when the bundle's engine can
use it), at the minimum context. A hub spec naming several quantizations (`file = "auto"`, or a glob) gets the
largest that fits; any other spec is refused when it does not fit, naming the shortfall and the largest
quantization of the same repository that would. Sizes in messages are decimal GB (10^9 bytes).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from airgap.build.spec import ModelSpec, Spec
from airgap.errors import FitError, FormatError, SpecError
from airgap.hardware.facts import HostFacts, HostInfo, host_info
from airgap.hardware.sizing import MIN_CONTEXT, ModelShape, shortfall
from airgap.hardware.target import EngineChoice, choose_engine, target_record

GB = 10**9
HEAD_SIZES = (2 << 20, 16 << 20, 64 << 20)  # a 256k-token vocabulary puts the tensor table past 10 MB
AUTO = "auto"
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
          host: HostInfo, *, gpu_offload: bool) -> Sized:
    """The spec's own file, if it fits; else FitError naming the shortfall and the largest alternative that fits."""
    missing = _shortfall(model_id, gguf, fixed, host, gpu_offload)
    if missing == 0:
        return Sized(fixed, f"model {model_id}: {fixed.describe()} fits {_memory(host, gpu_offload)}")
    fitting = [c for c in sorted(alternatives, key=lambda c: -c.size)
               if c.files != fixed.files and _shortfall(model_id, gguf, c, host, gpu_offload) == 0]
    advice = (f"the largest quantization that would fit is {fitting[0].describe()}: name {fitting[0].files[0]!r}"
              f" or file = \"{AUTO}\" in the spec" if fitting else "no other quantization in its repository fits")
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
    engine: EngineChoice  # "cuda" when the bundle carries the CUDA backend for this host


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
    spec: Spec, facts: HostFacts, hub: HubReader, say: Callable[[str], object] | None, *, cuda_packed: bool
) -> TargetedSpec:
    """Pin the spec to the target host: its Python and platform tags, and each model sized to fit it.

    `cuda_packed`: whether this build can carry the CUDA backend (the spec does not turn it off).
    """
    if facts.implementation != "cpython" or facts.abi is None:
        raise SpecError(f"the target runs {facts.implementation} {facts.python_version}; airgap packs wheels for "
                        "CPython only")
    if facts.wheel_platform is None:
        raise SpecError("the target's probe lists no wheel platform tags; run `airgap probe` there again")
    engine = choose_engine(facts, cuda_packed=cuda_packed)
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
    gpu = engine.engine == "cuda"
    if model.path is not None:
        from airgap.build.sources.gguf_meta import read_gguf_metadata

        own = Candidate((model.path.name,), model.path.stat().st_size)
        return model, check(model.id, read_gguf_metadata(model.path), own, (), host, gpu_offload=gpu)
    assert model.repo is not None
    commit, sizes = hub.listing(model.repo, model.revision)
    if model.quantize is not None:  # its GGUF exists only once converted: nothing to read a size from yet
        return replace(model, revision=commit), Sized(
            Candidate((), 0), f"model {model.id}: converted to {model.quantize} at build time; not sized before")
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
