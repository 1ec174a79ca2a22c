"""Bundle specs (`bundles/*.toml`): what to fetch and pack. Parsing only; no fetching here."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap.errors import FormatError, SpecError
from airgap.format.fields import Fields
from airgap.format.manifest import check_name, check_version
from airgap.hardware.target import GGML_CPU_VARIANTS, with_baseline

DEFAULT_EXPIRES_DAYS = 180
# `quantize =`: what llama-quantize makes without an importance matrix (the IQ types and the 1- and 2-bit ones
# need one); F32, F16 and BF16 are written by the converter itself. "auto" picks one for `build --target`.
QUANTIZATIONS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                 "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S")
AUTO = "auto"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: Path | None = None  # a local file, resolved against the spec's folder
    repo: str | None = None  # a Hugging Face hub repo
    revision: str = "main"
    files: tuple[str, ...] = ()
    allow_patterns: tuple[str, ...] = ()
    embedding: bool = False  # served on /v1/embeddings instead of chat
    quantize: str | None = None  # convert the repo's safetensors to GGUF at build time, at this quantization


@dataclass(frozen=True)
class PythonSpec:
    requirements: tuple[str, ...] = ()
    find_links: tuple[Path, ...] = ()
    index_url: str | None = None
    python_version: str | None = None
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    version: str
    models: tuple[ModelSpec, ...]
    python: PythonSpec
    expires_days: int = DEFAULT_EXPIRES_DAYS
    # llama-server compiled from the llama-cpp-python sdist: None builds it whenever the requirements pull in
    # llama-cpp-python; [engine] llama_server = true / false asks for it or leaves it out
    engine: bool | None = None
    # the CUDA ggml backend beside llama-server: None packs it when `build --target` names a host that runs it;
    # [engine] cuda = true / false always packs it or never does
    cuda: bool | None = None
    cuda_architectures: tuple[str, ...] = ()  # [engine] cuda_architectures = ["90"]: overrides the target's GPUs
    # [engine] cpu_variants = ["zen4"]: the ggml CPU variants llama-server carries (x64 always); () leaves it to
    # `build --target` (the target's best) or builds every variant
    cpu_variants: tuple[str, ...] = ()
    # the Vulkan ggml backend beside llama-server: None packs it when `build --target` names a host with an
    # NVIDIA GPU whose driver is older than the CUDA floor; [engine] vulkan = true / false always or never
    vulkan: bool | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")


def load_spec(path: Path) -> Spec:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"spec not found: {path}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec: {exc}") from exc
    return parse_spec(raw, path)


def parse_spec(raw: dict[str, Any], path: Path) -> Spec:
    doc = Fields(raw, "spec", error=lambda message: SpecError(f"{path}: {message}"))
    doc.only(("bundle", "models", "python", "engine"))
    doc.obj("bundle")  # required: sub() alone would call a missing table a NoneType
    bundle = doc.sub("bundle").only(("name", "version", "expires_days"))
    try:
        name = check_name(bundle.text("name", empty=False), "bundle name")
        version = check_version(bundle.text("version", empty=False), "bundle version")
    except FormatError as exc:
        raise doc.error(exc.message) from exc
    expires = DEFAULT_EXPIRES_DAYS if "expires_days" not in bundle.raw else bundle.positive("expires_days")
    models = tuple(_model(m, path.parent) for m in doc.objects("models"))
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise doc.error(f"model ids must be unique, found {ids}")
    engine = doc.optional_sub("engine").only(
        ("llama_server", "cuda", "cuda_architectures", "cpu_variants", "vulkan"))
    return Spec(path=path, name=name, version=version, models=models,
                python=_python(doc.optional_sub("python"), path.parent), expires_days=expires,
                engine=engine.optional_flag("llama_server"), cuda=_cuda(engine),
                cuda_architectures=_cuda_architectures(engine), cpu_variants=_cpu_variants(engine),
                vulkan=_vulkan(engine))


def _cuda(engine: Fields) -> bool | None:
    value = engine.optional_flag("cuda")
    if value is True and engine.optional_flag("llama_server") is False:
        raise engine.error("engine.cuda = true adds a backend to llama-server; expected engine.llama_server "
                           "to be true or absent, found false")
    return value


def _vulkan(engine: Fields) -> bool | None:
    value = engine.optional_flag("vulkan")
    if value is True and engine.optional_flag("llama_server") is False:
        raise engine.error("engine.vulkan = true adds a backend to llama-server; expected engine.llama_server "
                           "to be true or absent, found false")
    if value is True and engine.optional_flag("cuda") is True:
        # llama-server would load both and count every NVIDIA GPU twice, once as CUDA0 and once as Vulkan0
        raise engine.error("engine.cuda and engine.vulkan both drive the same NVIDIA GPUs; expected at most one "
                           "of them true, found both")
    return value


def _cuda_architectures(engine: Fields) -> tuple[str, ...]:
    """Compute capabilities as CMake names them ("90") or as a probe does ("9.0")."""
    value = engine.texts("cuda_architectures")
    if not value and "cuda_architectures" in engine.raw:
        raise engine.refuse("cuda_architectures", 'a non-empty list like ["90"] or ["8.0", "9.0"]', [])
    names = []
    for i, item in enumerate(value):
        text = item.replace(".", "", 1) if re.fullmatch(r"\d+\.\d", item) else item
        if re.fullmatch(r"[1-9]\d{1,2}", text) is None:
            raise engine.refuse(f"cuda_architectures[{i}]", 'a compute capability like "90" or "9.0"', item)
        names.append(text)
    if engine.optional_flag("cuda") is False and names:
        raise engine.error("engine.cuda_architectures chooses what the CUDA backend is built for; expected "
                           "engine.cuda to be true or absent, found false")
    return tuple(sorted(set(names), key=int))


def _cpu_variants(engine: Fields) -> tuple[str, ...]:
    """ggml's names of x86-64 CPU variants; x64 is added, so the engine starts on any x86-64 host."""
    value = engine.texts("cpu_variants")
    if not value and "cpu_variants" in engine.raw:
        raise engine.refuse("cpu_variants", 'a non-empty list like ["zen4"] or ["haswell", "icelake"]', [])
    for i, item in enumerate(value):
        if item not in GGML_CPU_VARIANTS:
            raise engine.refuse(f"cpu_variants[{i}]", f"one of {', '.join(GGML_CPU_VARIANTS)}", item)
    if engine.optional_flag("llama_server") is False and value:
        raise engine.error("engine.cpu_variants chooses what llama-server is built for; expected "
                           "engine.llama_server to be true or absent, found false")
    return with_baseline(value) if value else ()


_LOCAL_KEYS = ("id", "path", "embedding")
_HUB_KEYS = ("id", "repo", "revision", "file", "files", "allow_patterns", "embedding", "quantize")


def _model(doc: Fields, base: Path) -> ModelSpec:
    doc.only({*_LOCAL_KEYS, *_HUB_KEYS})
    try:
        model_id = check_name(doc.text("id", empty=False), "model id")
    except FormatError as exc:
        raise doc.error(exc.message) from exc
    if ("path" in doc.raw) == ("repo" in doc.raw):
        raise doc.error(f"model {model_id!r} needs exactly one of 'path' (local file) or 'repo' (hub)")
    embedding = doc.optional_flag("embedding") is True
    if "path" in doc.raw:
        hub_only = sorted(set(doc.raw) - set(_LOCAL_KEYS))
        if hub_only:
            raise doc.error(f"model {model_id!r} is a local file; expected no hub fields beside 'path', found "
                            f"{', '.join(hub_only)}")
        local = (base / doc.text("path", empty=False)).resolve()
        if not local.is_file():
            raise doc.error(f"model {model_id!r}: file not found: {local}")
        return ModelSpec(id=model_id, path=local, embedding=embedding)
    if "quantize" in doc.raw:
        return _converted(doc, model_id, embedding)
    file = doc.optional_text("file", empty=False)
    files = doc.texts("files") + ((file,) if file is not None else ())
    patterns = doc.texts("allow_patterns")
    if not files and not patterns:
        raise doc.error(f"model {model_id!r} from a repo needs 'file', 'files' or 'allow_patterns'")
    revision = doc.optional_text("revision", empty=False)
    return ModelSpec(id=model_id, repo=doc.text("repo", empty=False),
                     revision=revision if revision is not None else "main", files=files, allow_patterns=patterns,
                     embedding=embedding)


def _converted(doc: Fields, model_id: str, embedding: bool) -> ModelSpec:
    """A hub repo of safetensors weights, converted to GGUF at build time (`quantize = "Q4_K_M"`)."""
    quantize = doc.text("quantize", empty=False)
    chosen = [key for key in ("file", "files", "allow_patterns") if key in doc.raw]
    if chosen:
        raise doc.error(f"model {model_id!r}: quantize fetches the repo's weights, config and tokenizer itself; "
                        f"expected no {' or '.join(chosen)}")
    if quantize not in (*QUANTIZATIONS, AUTO):
        raise doc.refuse("quantize", f"one of {', '.join(QUANTIZATIONS)} (the types llama-quantize makes without "
                                     f"an importance matrix) or \"{AUTO}\"", quantize)
    revision = doc.optional_text("revision", empty=False)
    return ModelSpec(id=model_id, repo=doc.text("repo", empty=False),
                     revision=revision if revision is not None else "main", embedding=embedding, quantize=quantize)


def _python(doc: Fields, base: Path) -> PythonSpec:
    doc.only(("requirements", "find_links", "index_url", "python_version", "platforms"))
    links = tuple((base / link).resolve() for link in doc.texts("find_links"))
    for link in links:
        if not link.is_dir():
            raise doc.error(f"python.find_links folder not found: {link}")
    return PythonSpec(
        requirements=doc.texts("requirements"), find_links=links,
        index_url=doc.optional_text("index_url", empty=False),
        python_version=doc.optional_text("python_version", empty=False),
        platforms=doc.texts("platforms"),
    )
