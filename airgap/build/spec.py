"""Bundle specs (`bundles/*.toml`): what to fetch and pack. Parsing only; no fetching here."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap.errors import FormatError, SpecError
from airgap.format.manifest import check_name, check_version

DEFAULT_EXPIRES_DAYS = 180
# `quantize =`: what llama-quantize makes without an importance matrix (the IQ types and the 1- and 2-bit ones
# need one); F32, F16 and BF16 are written by the converter itself
QUANTIZATIONS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                 "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S")


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
    base = path.parent
    bundle = _table(raw, "bundle", path)
    try:
        name = check_name(_str(bundle, "name", path), "bundle name")
        version = check_version(_str(bundle, "version", path), "bundle version")
    except FormatError as exc:
        raise SpecError(f"{path}: {exc.message}") from exc
    models = tuple(_model(m, base, path) for m in _list(raw, "models", path))
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{path}: model ids must be unique, found {ids}")
    python = _python(raw.get("python", {}), base, path)
    expires = bundle.get("expires_days", DEFAULT_EXPIRES_DAYS)
    if not isinstance(expires, int) or isinstance(expires, bool) or expires < 1:
        raise SpecError(f"{path}: bundle.expires_days must be a positive integer, found {expires!r}")
    engine = raw.get("engine", {})
    if not isinstance(engine, dict):
        raise SpecError(f"{path}: [engine] must be a table")
    return Spec(path=path, name=name, version=version, models=models, python=python, expires_days=expires,
                engine=_engine(engine, path), cuda=_cuda(engine, path),
                cuda_architectures=_cuda_architectures(engine, path))


def _engine(raw: dict[str, Any], path: Path) -> bool | None:
    unknown = sorted(set(raw) - {"llama_server", "cuda", "cuda_architectures"})
    if unknown:
        raise SpecError(f"{path}: [engine] knows only 'llama_server', 'cuda' and 'cuda_architectures', "
                        f"found {', '.join(unknown)}")
    value = raw.get("llama_server")
    if value is not None and not isinstance(value, bool):
        raise SpecError(f"{path}: engine.llama_server must be true or false, found {value!r}")
    return value


def _cuda(raw: dict[str, Any], path: Path) -> bool | None:
    value = raw.get("cuda")
    if value is not None and not isinstance(value, bool):
        raise SpecError(f"{path}: engine.cuda must be true or false, found {value!r}")
    if value is True and raw.get("llama_server") is False:
        raise SpecError(f"{path}: engine.cuda = true adds a backend to llama-server; expected engine.llama_server "
                        "to be true or absent, found false")
    return value


def _cuda_architectures(raw: dict[str, Any], path: Path) -> tuple[str, ...]:
    """Compute capabilities as CMake names them ("90") or as a probe does ("9.0")."""
    value = raw.get("cuda_architectures", [])
    if not isinstance(value, list) or (not value and "cuda_architectures" in raw):
        raise SpecError(f"{path}: engine.cuda_architectures must be a non-empty list like [\"90\"] or "
                        f"[\"8.0\", \"9.0\"], found {value!r}")
    names = []
    for item in value:
        text = item.replace(".", "", 1) if isinstance(item, str) and re.fullmatch(r"\d+\.\d", item) else item
        if not isinstance(text, str) or re.fullmatch(r"[1-9]\d{1,2}", text) is None:
            raise SpecError(f"{path}: engine.cuda_architectures entries must look like \"90\" or \"9.0\", "
                            f"found {item!r}")
        names.append(text)
    if raw.get("cuda") is False and names:
        raise SpecError(f"{path}: engine.cuda_architectures chooses what the CUDA backend is built for; expected "
                        "engine.cuda to be true or absent, found false")
    return tuple(sorted(set(names), key=int))


def _model(raw: object, base: Path, path: Path) -> ModelSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: each [[models]] entry must be a table")
    model_id = _str(raw, "id", path)
    try:
        check_name(model_id, "model id")
    except FormatError as exc:
        raise SpecError(f"{path}: {exc.message}") from exc
    if ("path" in raw) == ("repo" in raw):
        raise SpecError(f"{path}: model {model_id!r} needs exactly one of 'path' (local file) or 'repo' (hub)")
    embedding = raw.get("embedding", False)
    if not isinstance(embedding, bool):
        raise SpecError(f"{path}: model {model_id!r}: 'embedding' must be true or false, found {embedding!r}")
    if "quantize" in raw:
        return _converted(raw, model_id, embedding, path)
    if "path" in raw:
        local = (base / _str(raw, "path", path)).resolve()
        if not local.is_file():
            raise SpecError(f"{path}: model {model_id!r}: file not found: {local}")
        return ModelSpec(id=model_id, path=local, embedding=embedding)
    files = tuple(_strs(raw, "files", path)) + ((_str(raw, "file", path),) if "file" in raw else ())
    patterns = tuple(_strs(raw, "allow_patterns", path))
    if not files and not patterns:
        raise SpecError(f"{path}: model {model_id!r} from a repo needs 'file', 'files' or 'allow_patterns'")
    return ModelSpec(id=model_id, repo=_str(raw, "repo", path), revision=str(raw.get("revision", "main")),
                     files=files, allow_patterns=patterns, embedding=embedding)


def _converted(raw: dict[str, Any], model_id: str, embedding: bool, path: Path) -> ModelSpec:
    """A hub repo of safetensors weights, converted to GGUF at build time (`quantize = "Q4_K_M"`)."""
    quantize = _str(raw, "quantize", path)
    if "path" in raw:
        raise SpecError(f"{path}: model {model_id!r}: quantize converts a hub repo's safetensors weights; "
                        "expected 'repo', found 'path'")
    chosen = [key for key in ("file", "files", "allow_patterns") if key in raw]
    if chosen:
        raise SpecError(f"{path}: model {model_id!r}: quantize fetches the repo's weights, config and tokenizer "
                        f"itself; expected no {' or '.join(chosen)}")
    if quantize not in QUANTIZATIONS:
        raise SpecError(f"{path}: model {model_id!r}: quantize must be one of {', '.join(QUANTIZATIONS)} (the "
                        f"types llama-quantize makes without an importance matrix), found {quantize!r}")
    return ModelSpec(id=model_id, repo=_str(raw, "repo", path), revision=str(raw.get("revision", "main")),
                     embedding=embedding, quantize=quantize)


def _python(raw: object, base: Path, path: Path) -> PythonSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: [python] must be a table")
    links = tuple((base / link).resolve() for link in _strs(raw, "find_links", path))
    for link in links:
        if not link.is_dir():
            raise SpecError(f"{path}: python.find_links folder not found: {link}")
    index_url = raw.get("index_url")
    version = raw.get("python_version")
    return PythonSpec(
        requirements=tuple(_strs(raw, "requirements", path)), find_links=links,
        index_url=str(index_url) if index_url is not None else None,
        python_version=str(version) if version is not None else None,
        platforms=tuple(_strs(raw, "platforms", path)),
    )


def _table(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise SpecError(f"{path}: expected a [{key}] table, found {type(value).__name__}")
    return value


def _str(raw: dict[str, Any], key: str, path: Path) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}: expected a non-empty string for {key!r}, found {value!r}")
    return value


def _strs(raw: dict[str, Any], key: str, path: Path) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{path}: expected a list of strings for {key!r}, found {value!r}")
    return list(value)


def _list(raw: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise SpecError(f"{path}: expected [[{key}]] entries, found {type(value).__name__}")
    return value
