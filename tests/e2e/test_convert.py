"""Official weights converted at build time: a tiny Llama model in safetensors (written by the test) on the hub
stand-in, `quantize = "Q4_K_M"` in the spec, converted and quantized by the pinned llama.cpp's own tools, bundled,
installed with no network, served by `airgap serve` and answering the real `openai` SDK. The conversion is
byte-for-byte reproducible, and only weights, config and tokenizer are ever fetched from the repository.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KeyPair
from tests.e2e.engine_support import LLAMA_REQUIREMENT, start_serving, stop_serving
from tests.hubsim import HubSim
from tests.safetensors_model import write_tiny_safetensors_model
from tests.support import airgap, engine_table, host_cpu_variant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO_ID = "acme/Tiny-Llama"
NEVER_FETCHED = {"modeling_evil.py": b"raise SystemExit('repository code ran')\n",
                 "pytorch_model.bin": b"pickled weights are never fetched",
                 "consolidated.safetensors": b"the Mistral-format twin of the weights"}
CARD = b"---\nlicense: apache-2.0\n---\n# Tiny Llama\n"


@dataclass(frozen=True)
class Converted:
    folder: Path
    bundle: Path
    manifest: dict[str, Any]
    model_files: dict[str, Path]
    commit: str
    fetched: list[str]


def write_spec(folder: Path, quantize: str = "Q4_K_M", *, variants_from_target: bool = False) -> Path:
    """With `variants_from_target`, no [engine] table: `build --target` picks the CPU variants."""
    spec = folder / f"converted-{quantize}.toml"
    spec.write_text(
        '[bundle]\nname = "converted"\nversion = "1.0.0"\n\n'
        f'[[models]]\nid = "tiny"\nrepo = "{REPO_ID}"\nquantize = "{quantize}"\n\n'
        f'[python]\nrequirements = ["{LLAMA_REQUIREMENT}"]\n\n{"" if variants_from_target else engine_table()}')
    return spec


def build(spec: Path, out: Path, keys: KeyPair, hub: HubSim, hf_home: Path, *options: str | Path,
          ) -> tuple[Path, dict[str, Any]]:
    built = airgap("build", spec, "--key", keys.private, "-o", out, "-q", "--hub-endpoint", hub.endpoint, *options,
                   env={"HF_HOME": str(hf_home)}, timeout=3600)
    assert built.code == 0, built.stderr[-3000:]
    bundle = Path(built.stdout.split()[-1])
    return bundle, json.loads(airgap("inspect", bundle, "--json").stdout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Iterator[Converted]:
    folder = tmp_path_factory.mktemp("convert")
    files = write_tiny_safetensors_model(folder / "repo")
    with HubSim() as hub:
        commit = hub.add_repo(REPO_ID, {**files, "README.md": CARD, **NEVER_FETCHED})
        bundle, manifest = build(write_spec(folder), folder / "dist", keys, hub, folder / "hf")
        fetched = [r.path for r in hub.requests if "/resolve/" in r.path]
    yield Converted(folder, bundle, manifest, files, commit, fetched)


def model_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    [entry] = [f for f in manifest["files"] if f["kind"] == "model"]
    return entry


def test_the_manifest_records_where_the_gguf_came_from(converted: Converted) -> None:
    entry = model_entry(converted.manifest)
    assert entry["path"] == "models/tiny/tiny-Q4_K_M.gguf"
    source = entry["source"]
    listing = subprocess.run(["sha256sum", *sorted(converted.model_files)], cwd=converted.folder / "repo",
                             capture_output=True, check=True).stdout
    assert source == {
        "type": "converted", "repo": REPO_ID, "commit": converted.commit,
        "files": "config.json model.safetensors tokenizer.model tokenizer_config.json",
        "sources_sha256": hashlib.sha256(listing).hexdigest(),
        "converter": "convert_hf_to_gguf.py of llama_cpp_python-0.3.36.tar.gz",
        "sdist_sha256": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        "quantizer": "llama-quantize of llama_cpp_python-0.3.36.tar.gz",
        "quantize_sha256": source["quantize_sha256"], "quantization": "Q4_K_M",
        "torch": "2.13.0+cpu", "transformers": "5.24.0", "cache_key": source["cache_key"],
    }
    gguf = converted.manifest["models"][0]["gguf"]
    assert (gguf["architecture"], gguf["file_type"], gguf["block_count"]) == ("llama", "Q4_K_M", 2)
    assert gguf["has_chat_template"] is True


def test_only_weights_config_and_tokenizer_are_fetched(converted: Converted) -> None:
    names = {path.rsplit("/", 1)[-1] for path in converted.fetched}
    assert names == {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md"}
    assert not names & set(NEVER_FETCHED)


def test_the_sbom_names_the_source_repository(converted: Converted, keys: KeyPair) -> None:
    sbom = json.loads(airgap("inspect", converted.bundle, "--sbom", "--trust", keys.public).stdout)
    [model] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert model["purl"] == f"pkg:huggingface/acme/Tiny-Llama@{converted.commit}"
    assert model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    properties = {p["name"]: p["value"] for p in model["properties"]}
    assert properties["airgap:converted:quantization"] == "Q4_K_M"
    assert properties["airgap:converted:converter"] == "convert_hf_to_gguf.py of llama_cpp_python-0.3.36.tar.gz"


def test_the_conversion_is_reproducible(converted: Converted, keys: KeyPair) -> None:
    """Converted again from nothing (its cache entry removed), the GGUF has the very same bytes."""
    entry = model_entry(converted.manifest)
    cache = Path.home() / ".cache" / "airgap" / "converted" / entry["source"]["cache_key"]
    assert cache.is_dir()
    shutil.rmtree(cache)
    with HubSim() as hub:
        assert hub.add_repo(REPO_ID, {**converted.model_files, "README.md": CARD, **NEVER_FETCHED}) == converted.commit
        _, again = build(write_spec(converted.folder), converted.folder / "dist-again", keys, hub,
                         converted.folder / "hf-again")
    assert cache.is_dir()
    record = json.loads((cache / "converted.json").read_text())
    assert record["offline"] is True  # converter and quantizer ran in a network namespace with no interface
    assert model_entry(again)["sha256"] == entry["sha256"]
    assert model_entry(again)["source"] == entry["source"]


def test_installed_offline_it_serves_and_answers(converted: Converted, keys: KeyPair) -> None:
    prefix = converted.folder / "prefix"
    installed = airgap("install", converted.bundle, "--trust", keys.public, "--prefix", prefix, "-q",
                       no_network=True)
    assert installed.code == 0, installed.stderr[-3000:]
    server = start_serving(prefix, converted.bundle, converted.folder / "serve.log", port=18097)
    try:
        answer = server.json(
            "import json, sys, openai\n"
            "client = openai.OpenAI(base_url=sys.argv[1] + '/v1', api_key=sys.argv[2], max_retries=0, timeout=120)\n"
            "reply = client.chat.completions.create(model='tiny', max_tokens=8, seed=1, temperature=0,\n"
            "    messages=[{'role': 'user', 'content': 'hello world'}])\n"
            "print(json.dumps({'model': reply.model, 'tokens': reply.usage.completion_tokens,\n"
            "                  'finish': reply.choices[0].finish_reason}))\n")
    finally:
        stop_serving(server)
    assert isinstance(answer, dict)
    assert answer["model"] == "tiny" and 1 <= answer["tokens"] <= 8
    assert answer["finish"] in {"length", "stop"}


def test_quantize_auto_for_a_target_host_converts_the_largest_that_fits(converted: Converted, keys: KeyPair) -> None:
    """Sized before the download from the safetensors header and config.json alone; F16 fits this host."""
    probe = converted.folder / "here.json"
    assert airgap("probe", "--prefix", converted.folder / "opt", "-o", probe).code == 0
    with HubSim() as hub:
        hub.add_repo(REPO_ID, {**converted.model_files, "README.md": CARD, **NEVER_FETCHED})
        _, manifest = build(write_spec(converted.folder, "auto", variants_from_target=True),
                            converted.folder / "dist-auto", keys, hub, converted.folder / "hf-auto", "--target", probe)
        ranged = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    entry = model_entry(manifest)
    assert entry["path"] == "models/tiny/tiny-F16.gguf" and entry["source"]["quantization"] == "F16"
    assert manifest["models"][0]["gguf"]["file_type"] == "F16"
    [choice] = [line for line in manifest["target"]["choices"] if line.startswith("model tiny:")]
    assert choice.startswith("model tiny: chose F16 (") and choice.endswith(
        "(to be converted; size estimated from its 1,465,600 parameters)")
    # the engine for this target: its best ggml CPU variant and x64 (the same build the other tests share)
    engine = {f["path"] for f in manifest["files"] if f["kind"] == "engine" and "libggml-cpu-" in f["path"]}
    assert engine == {"engine/libggml-cpu-x64.so", f"engine/libggml-cpu-{host_cpu_variant()}.so"}
    header = int.from_bytes(converted.model_files["model.safetensors"].read_bytes()[:8], "little")
    assert ranged[:2] == ["bytes=0-7", f"bytes=0-{7 + header}"]  # the header alone, then the download
    assert ranged[2:] == [None]
