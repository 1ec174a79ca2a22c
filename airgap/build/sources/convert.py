"""Official safetensors weights turned into one GGUF at build time, by the pinned llama.cpp's own tools.

The converter is `convert_hf_to_gguf.py` (with its `conversion/` package and its own `gguf-py`) from the
llama-cpp-python sdist the bundle's engine is compiled from, run by this interpreter, which needs the `convert`
extra (torch, transformers, safetensors, sentencepiece). The quantizer is `llama-quantize` of that same engine
build. Both run offline: the hub libraries are told to stay offline and, as root, both run in a network
namespace with no interface. Only weights, config and tokenizer files are fetched, never Python files, so the
converter's `trust_remote_code` finds no repository code to run.

The result is cached under the sha256 of every input (source files, sdist, quantizer, quantization, the
converter's libraries); the same inputs give the same bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from airgap.build.sources.engine import build_lock, extract_vendor, offline_prefix
from airgap.build.sources.llama import airgap_cache_dir
from airgap.errors import MissingDependencyError, ResolveError, SpecError
from airgap.streams.pipeline import digest_file

_UNQUANTIZED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # written by the converter itself

# Weights in Hugging Face layout (`model*.safetensors`, not Mistral's `consolidated.safetensors` twin), config
# and tokenizer. Pickled weights (`*.bin`) and code (`*.py`) are never fetched.
REQUIRED_FILES = ("config.json",)
OPTIONAL_PATTERNS = ("model.safetensors.index.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
WEIGHT_PATTERN = "model*.safetensors"

# What the converter imports; their versions are part of the cache key.
CONVERTER_MODULES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
                     "sentencepiece": "sentencepiece", "numpy": "numpy", "yaml": "PyYAML"}
_SDIST_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
RECORD = "converted.json"
LAYOUT_VERSION = 1  # bump when how a conversion runs changes


@dataclass(frozen=True)
class SourceFile:
    """One fetched file of the safetensors repository: its name there and its verified local copy."""

    name: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class Quantizer:
    """The pinned converter's sdist (fetched only when a conversion runs) and the engine build's llama-quantize."""

    sdist_name: str
    sdist_sha256: str
    fetch_sdist: Callable[[Path], Path]  # downloads the sdist into a folder, checked against sdist_sha256
    quantize: Path
    quantize_sha256: str


@dataclass(frozen=True)
class Converted:
    path: Path
    size: int
    sha256: str
    cache_key: str
    record: Mapping[str, object]
    cached: bool


def check_converter_installed(model_id: str, find_spec: Callable[[str], object] = importlib.util.find_spec) -> None:
    """Refuse, naming the extra, when this interpreter lacks a library the converter imports."""
    missing = [dist for module, dist in CONVERTER_MODULES.items() if find_spec(module) is None]
    if missing:
        raise MissingDependencyError(
            f"model {model_id!r} is converted from safetensors at build time, which needs {', '.join(missing)}; "
            "install the convert extra on the connected host: pip install 'airgap[convert]'")


def files_to_fetch(repo: str, commit: str, listing: Mapping[str, int]) -> list[str]:
    """The weights, config and tokenizer files of a safetensors repository, by its listing at `commit`."""
    names = sorted(n for n in listing if "/" not in n)
    weights = [n for n in names if fnmatch.fnmatch(n, WEIGHT_PATTERN)]
    missing = [n for n in REQUIRED_FILES if n not in listing]
    if missing or not weights:
        found = ", ".join(names) or "no files"
        raise SpecError(f"{repo}@{commit[:12]}: converting needs config.json and {WEIGHT_PATTERN} (weights in "
                        f"Hugging Face layout), found {found}")
    optional = [n for n in names if any(fnmatch.fnmatch(n, p) for p in OPTIONAL_PATTERNS)]
    return [*REQUIRED_FILES, *weights, *optional]


def sources_digest(sources: Sequence[SourceFile]) -> str:
    """The sha256 of the sources' `sha256sum` listing in name order: `sha256sum NAMES | sha256sum` re-derives it."""
    listing = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(sources, key=lambda f: f.name))
    return hashlib.sha256(listing.encode()).hexdigest()


def default_cache_dir() -> Path:
    return airgap_cache_dir("converted")


def converter_versions() -> dict[str, str]:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in CONVERTER_MODULES.values():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "none"
    return versions


def conversion_key(
    sources: Sequence[SourceFile], *, model_name: str, quantization: str, quantizer: Quantizer,
) -> str:
    inputs = {
        "sources": {f.name: f.sha256 for f in sources},
        "model_name": model_name,
        "quantization": quantization,
        "sdist_sha256": quantizer.sdist_sha256,
        "quantize_sha256": quantizer.quantize_sha256,
        "versions": converter_versions(),
        "layout": LAYOUT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"{model_name}-{quantization}-{digest}"


def output_name(model_name: str, quantization: str) -> str:
    return f"{model_name}-{quantization}.gguf"


def cached_conversion(cache_dir: Path, key: str) -> Converted | None:
    """A finished conversion in the cache, its file checked against the hash recorded when it was made."""
    folder = cache_dir / key
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        name, sha256 = str(record["file"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = folder / name
    if not path.is_file():
        return None
    digest = digest_file(path)
    if digest.sha256 != sha256:
        raise ResolveError(f"expected cached {path} with sha256 {sha256}, found {digest.sha256}")
    return Converted(path, digest.size, digest.sha256, key, record, cached=True)


def convert(
    sources: Sequence[SourceFile], *, model_name: str, quantization: str, quantizer: Quantizer, cache_dir: Path,
    progress: bool = True,
) -> Converted:
    """The GGUF of `sources` at `quantization`: from the cache, or converted (and quantized) once."""
    key = conversion_key(sources, model_name=model_name, quantization=quantization, quantizer=quantizer)
    found = cached_conversion(cache_dir, key)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir, key):
        found = cached_conversion(cache_dir, key)
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(prefix=f".work-{key}-", dir=cache_dir) as work:
            return _convert(sources, Path(work), key, model_name=model_name, quantization=quantization,
                            quantizer=quantizer, cache_dir=cache_dir, progress=progress)


def _convert(
    sources: Sequence[SourceFile], work: Path, key: str, *, model_name: str, quantization: str,
    quantizer: Quantizer, cache_dir: Path, progress: bool,
) -> Converted:
    started = time.monotonic()
    converter = _extract_converter(quantizer.fetch_sdist(work / "sdist"), work / "converter")
    model_dir = work / "model"
    model_dir.mkdir()
    for source in sources:
        (model_dir / source.name).symlink_to(source.path)
    entry = work / "entry"
    entry.mkdir()
    name = output_name(model_name, quantization)
    direct = _UNQUANTIZED.get(quantization)
    converted = entry / name if direct else work / "unquantized.gguf"
    prefix, offline = offline_prefix()
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(work), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
           "TOKENIZERS_PARALLELISM": "false", "LC_ALL": "C.UTF-8"}
    if progress:
        print(f"converting {model_name} to GGUF with the pinned llama.cpp converter", file=sys.stderr)
    _run([*prefix, sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
          str(converted), "--outtype", direct or "auto", "--model-name", model_name], env, "convert_hf_to_gguf.py")
    if not direct:
        if progress:
            print(f"quantizing {model_name} to {quantization} with llama-quantize", file=sys.stderr)
        threads = str(max(1, len(os.sched_getaffinity(0))))
        _run([*prefix, str(quantizer.quantize), str(converted), str(entry / name), quantization, threads], env,
             "llama-quantize")
        converted.unlink()
    digest = digest_file(entry / name)
    record = {
        "file": name,
        "sha256": digest.sha256,
        "sources": {f.name: f.sha256 for f in sources},
        "converter": f"convert_hf_to_gguf.py of {quantizer.sdist_name}",
        "sdist_sha256": quantizer.sdist_sha256,
        "quantizer": f"llama-quantize of {quantizer.sdist_name}",
        "quantize_sha256": quantizer.quantize_sha256,
        "quantization": quantization,
        "versions": converter_versions(),
        "offline": offline,
        "seconds": round(time.monotonic() - started, 1),
    }
    (entry / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    final = cache_dir / key
    shutil.rmtree(final, ignore_errors=True)
    entry.rename(final)
    built = cached_conversion(cache_dir, key)
    if built is None:
        raise ResolveError(f"expected a converted model in {final}, found none")
    return Converted(built.path, built.size, built.sha256, key, built.record, cached=False)


def _run(command: list[str], env: Mapping[str, str], what: str) -> None:
    try:
        result = subprocess.run(command, env=dict(env), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ResolveError(f"expected to run {what}, found {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ResolveError(f"{what} failed with exit code {result.returncode}: {' | '.join(tail) or 'no output'}")


def _extract_converter(sdist: Path, into: Path) -> Path:
    """Unpack only the converter, its `conversion/` package and `gguf-py` from vendor/llama.cpp of the sdist."""
    extract_vendor(sdist, into, lambda inner: inner.startswith(_SDIST_PARTS) or f"{inner}/" in _SDIST_PARTS)
    if not (into / "convert_hf_to_gguf.py").is_file():
        raise ResolveError(f"expected vendor/llama.cpp/convert_hf_to_gguf.py in {sdist.name}, found none")
    return into
