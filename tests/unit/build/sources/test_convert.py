"""The converter's pure parts: what is fetched, the cache key and the cache entry's check."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from airgap.build.sources import convert
from airgap.errors import MissingDependencyError, ResolveError, SpecError

COMMIT = "c" * 40


def test_only_weights_config_and_tokenizer_are_fetched() -> None:
    listing = {name: 1 for name in (
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "consolidated.safetensors", "params.json", "tokenizer.model",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
        "modeling_custom.py", "pytorch_model.bin", "README.md", "original/model.safetensors")}
    assert convert.files_to_fetch("acme/m", COMMIT, listing) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]


@pytest.mark.parametrize("names", [["config.json", "pytorch_model.bin"], ["model.safetensors"]])
def test_a_repo_without_safetensors_weights_and_config_is_refused(names: list[str]) -> None:
    with pytest.raises(SpecError) as refused:
        convert.files_to_fetch("acme/m", COMMIT, dict.fromkeys(names, 1))
    assert refused.value.message == (
        "acme/m@cccccccccccc: converting needs config.json and model*.safetensors (weights in Hugging Face "
        f"layout), found {', '.join(sorted(names))}")


def test_a_missing_converter_library_names_the_extra() -> None:
    convert.check_converter_installed("tiny")  # the dev install has them all
    with pytest.raises(MissingDependencyError) as refused:
        convert.check_converter_installed("tiny", lambda module: None if module in {"torch", "yaml"} else object())
    assert refused.value.message == (
        "model 'tiny' is converted from safetensors at build time, which needs torch, PyYAML; install the convert "
        "extra on the connected host: pip install 'airgap[convert]'")


def sources(tmp_path: Path, **contents: bytes) -> list[convert.SourceFile]:
    found = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        found.append(convert.SourceFile(name, tmp_path / name, hashlib.sha256(data).hexdigest()))
    return found


def test_the_sources_digest_is_what_sha256sum_gives(tmp_path: Path) -> None:
    files = sources(tmp_path, **{"tokenizer.model": b"t", "config.json": b"{}", "model.safetensors": b"w" * 99})
    listing = subprocess.run(["sha256sum", "config.json", "model.safetensors", "tokenizer.model"], cwd=tmp_path,
                             capture_output=True, check=True).stdout
    assert convert.sources_digest(files) == hashlib.sha256(listing).hexdigest()


def quantizer(quantize_sha256: str = "q" * 64, sdist_sha256: str = "s" * 64) -> convert.Quantizer:
    def never(into: Path) -> Path:
        raise AssertionError("the sdist is fetched only when a conversion runs")

    return convert.Quantizer(sdist_name="llama_cpp_python-0.3.36.tar.gz", sdist_sha256=sdist_sha256,
                             fetch_sdist=never, quantize=Path("/nonexistent"), quantize_sha256=quantize_sha256)


def test_every_input_changes_the_cache_key(tmp_path: Path) -> None:
    files = sources(tmp_path, **{"config.json": b"{}", "model.safetensors": b"w"})
    (tmp_path / "other").mkdir()
    other = sources(tmp_path / "other", **{"config.json": b"{ }", "model.safetensors": b"w"})
    base = convert.conversion_key(files, model_name="tiny", quantization="Q4_K_M", quantizer=quantizer())
    assert base.startswith("tiny-Q4_K_M-")
    assert base == convert.conversion_key(files, model_name="tiny", quantization="Q4_K_M", quantizer=quantizer())
    changed = {
        convert.conversion_key(other, model_name="tiny", quantization="Q4_K_M", quantizer=quantizer()),
        convert.conversion_key(files, model_name="tiny2", quantization="Q4_K_M", quantizer=quantizer()),
        convert.conversion_key(files, model_name="tiny", quantization="Q8_0", quantizer=quantizer()),
        convert.conversion_key(files, model_name="tiny", quantization="Q4_K_M", quantizer=quantizer("x" * 64)),
        convert.conversion_key(files, model_name="tiny", quantization="Q4_K_M",
                               quantizer=quantizer(sdist_sha256="x" * 64)),
    }
    assert len(changed) == 5 and base not in changed


def test_a_cached_conversion_is_checked_before_use(tmp_path: Path) -> None:
    files = sources(tmp_path, **{"config.json": b"{}", "model.safetensors": b"w"})
    key = convert.conversion_key(files, model_name="tiny", quantization="F16", quantizer=quantizer())
    entry = tmp_path / "cache" / key
    entry.mkdir(parents=True)
    assert convert.cached_conversion(tmp_path / "cache", key) is None  # no record: not a finished entry
    (entry / "tiny-F16.gguf").write_bytes(b"GGUF")
    (entry / convert.RECORD).write_text(json.dumps({"file": "tiny-F16.gguf",
                                                    "sha256": hashlib.sha256(b"GGUF").hexdigest()}))
    found = convert.cached_conversion(tmp_path / "cache", key)
    assert found is not None and found.cached and found.size == 4
    # cached, so the conversion never runs (its sdist fetch would fail the test)
    assert convert.convert(files, model_name="tiny", quantization="F16", quantizer=quantizer(),
                           cache_dir=tmp_path / "cache").sha256 == found.sha256
    (entry / "tiny-F16.gguf").write_bytes(b"GGUF!")
    with pytest.raises(ResolveError) as refused:
        convert.cached_conversion(tmp_path / "cache", key)
    assert refused.value.message == (f"expected cached {entry / 'tiny-F16.gguf'} with sha256 "
                                     f"{hashlib.sha256(b'GGUF').hexdigest()}, found "
                                     f"{hashlib.sha256(b'GGUF!').hexdigest()}")
