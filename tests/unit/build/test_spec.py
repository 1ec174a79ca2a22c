"""Bundle specs: every refusal, word for word, names the file, the field, what was expected and what was found;
the happy paths resolve, and every spec under bundles/ parses."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from airgap.build.spec import DEFAULT_EXPIRES_DAYS, ModelSpec, PythonSpec, Spec, load_spec, parse_spec
from airgap.errors import SpecError

BUNDLE = '[bundle]\nname = "tiny"\nversion = "1.0"\n'
HUB = BUNDLE + '[[models]]\nid = "m"\nrepo = "org/m"\n'
LOCAL = BUNDLE + '[[models]]\nid = "m"\npath = "m.gguf"\n'
REPO = Path(__file__).resolve().parents[3]


def write(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, message: str) -> None:
    """`load_spec(path)` raises SpecError whose whole message is `<path>: <message>`, word for word."""
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}: {message}"


# ---------------------------------------------------------------- happy paths

def test_local_model_path_resolves_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "specs" / "weights").mkdir(parents=True)
    model = tmp_path / "specs" / "weights" / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths follow the spec, never the working directory
    spec = load_spec(write(tmp_path / "specs", BUNDLE + '[[models]]\nid = "m"\npath = "weights/../weights/m.gguf"\n'))
    assert spec.models == (ModelSpec(id="m", path=model.resolve()),)
    assert spec.name == "tiny" and spec.version == "1.0"
    assert spec.lock_path == tmp_path / "specs" / "spec.toml.lock"


def test_hub_model_fields(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE + (
        '[[models]]\nid = "a"\nrepo = "org/a-GGUF"\nrevision = "0123abc"\nfile = "a.Q4.gguf"\n'
        'files = ["tokenizer.json"]\n'
        '[[models]]\nid = "b"\nrepo = "org/b"\nallow_patterns = ["*.gguf", "*.json"]\n')))
    assert spec.models == (
        ModelSpec(id="a", repo="org/a-GGUF", revision="0123abc", files=("tokenizer.json", "a.Q4.gguf")),
        ModelSpec(id="b", repo="org/b", revision="main", allow_patterns=("*.gguf", "*.json")),
    )


def test_converted_hub_model(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE + (
        '[[models]]\nid = "a"\nrepo = "mistralai/M"\nquantize = "Q4_K_M"\n'
        '[[models]]\nid = "b"\nrepo = "mistralai/M"\nrevision = "v1"\nquantize = "auto"\nembedding = true\n')))
    assert spec.models == (
        ModelSpec(id="a", repo="mistralai/M", quantize="Q4_K_M"),
        ModelSpec(id="b", repo="mistralai/M", revision="v1", quantize="auto", embedding=True),
    )


def test_python_table_defaults_and_no_models(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE))
    assert spec.models == ()
    assert spec.python == PythonSpec()
    assert spec.python.index_url is None and spec.python.python_version is None
    assert spec.expires_days == DEFAULT_EXPIRES_DAYS == 180


def test_python_table_fields(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    spec = load_spec(write(tmp_path, BUNDLE + 'expires_days = 30\n[python]\nrequirements = ["numpy>=1"]\n'
                                             'find_links = ["wheels"]\nindex_url = "http://127.0.0.1:9/simple"\n'
                                             'python_version = "3.11"\nplatforms = ["manylinux2014_x86_64"]\n'))
    assert spec.python == PythonSpec(requirements=("numpy>=1",), find_links=(tmp_path / "wheels",),
                                     index_url="http://127.0.0.1:9/simple", python_version="3.11",
                                     platforms=("manylinux2014_x86_64",))
    assert spec.expires_days == 30


def test_engine_table(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE + '[engine]\nllama_server = true\ncuda = true\n'
                                              'cuda_architectures = ["9.0", "86", "90"]\n'))
    assert (spec.engine, spec.cuda, spec.cuda_architectures) == (True, True, ("86", "90"))
    absent = load_spec(write(tmp_path, BUNDLE + "[engine]\n"))
    assert (absent.engine, absent.cuda, absent.cuda_architectures) == (None, None, ())
    assert absent.cpu_variants == ()  # every variant, or the target's
    chosen = load_spec(write(tmp_path, BUNDLE + '[engine]\ncpu_variants = ["zen4", "haswell", "zen4"]\n'))
    assert chosen.cpu_variants == ("x64", "haswell", "zen4")  # x64 always, in ggml's order


def test_embedding_model(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    spec = load_spec(write(tmp_path, LOCAL + "embedding = true\n"))
    assert spec.models == (ModelSpec(id="m", path=tmp_path / "m.gguf", embedding=True),)
    assert load_spec(write(tmp_path, HUB + 'file = "m.gguf"\nembedding = false\n')).models[0].embedding is False


@pytest.mark.parametrize("shipped", sorted((REPO / "bundles").glob("*.toml")), ids=lambda p: p.name)
def test_each_shipped_bundle_spec_parses(tmp_path: Path, shipped: Path) -> None:
    """bundles/*.toml, copied with a stand-in for each local model it names (those are made by scripts)."""
    copy = tmp_path / "bundles" / shipped.name
    copy.parent.mkdir()
    shutil.copyfile(shipped, copy)
    raw = tomllib.loads(shipped.read_text(encoding="utf-8"))
    for model in raw.get("models", []):
        if "path" in model:
            (copy.parent / model["path"]).parent.mkdir(parents=True, exist_ok=True)
            (copy.parent / model["path"]).write_bytes(b"GGUF")
    spec = load_spec(copy)
    assert isinstance(spec, Spec) and spec.path == copy
    assert (spec.name, spec.version) == (raw["bundle"]["name"], raw["bundle"]["version"])
    assert [m.id for m in spec.models] == [m["id"] for m in raw.get("models", [])]
    assert spec.python.requirements == tuple(raw.get("python", {}).get("requirements", []))


# ---------------------------------------------------------------- reading the file

def test_missing_spec(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"spec not found: {path}"


def test_invalid_toml(tmp_path: Path) -> None:
    refused(write(tmp_path, "[bundle\n"),
            "cannot read spec: Expected ']' at the end of a table declaration (at line 1, column 8)")


def test_spec_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b'[bundle]\nname = "\xff"\n')
    refused(path, "cannot read spec: 'utf-8' codec can't decode byte 0xff in position 17: invalid start byte")


def test_spec_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").mkdir()
    refused(tmp_path / "spec.toml", f"cannot read spec: [Errno 21] Is a directory: '{tmp_path / 'spec.toml'}'")


def test_parsed_spec_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec([], tmp_path / "spec.toml")  # type: ignore[arg-type]
    assert str(caught.value) == f"{tmp_path / 'spec.toml'}: invalid spec: expected a JSON object, found list"


# ---------------------------------------------------------------- every refusal of a spec's content, word for word
# `{dir}` in a message stands for the spec's folder.

REFUSALS = [
    # the top level
    ('modles = []\n' + BUNDLE, "invalid spec: expected only the fields bundle, engine, models, python, found 'modles'"),
    ('[[models]]\nid = "m"\n', "invalid spec: field 'bundle' must be an object, found None"),
    ('bundle = "tiny"\n', "invalid spec: field 'bundle' must be an object, found 'tiny'"),
    # [bundle]
    (BUNDLE + "expires = 30\n", "invalid spec.bundle: expected only the fields expires_days, name, version, found "
                                "'expires'"),
    ('[bundle]\nversion = "1.0"\n', "invalid spec.bundle: field 'name' must be a string, found None"),
    ('[bundle]\nname = ""\nversion = "1.0"\n',
     "invalid spec.bundle: field 'name' must be a non-empty string, found ''"),
    ('[bundle]\nname = "tiny"\nversion = 1.0\n', "invalid spec.bundle: field 'version' must be a string, found 1.0"),
    ('[bundle]\nname = "tiny"\nversion = ""\n',
     "invalid spec.bundle: field 'version' must be a non-empty string, found ''"),
    ('[bundle]\nname = "../tiny"\nversion = "1.0"\n',
     "invalid bundle name: expected letters, digits, '.', '_' or '-', found '../tiny'"),
    ('[bundle]\nname = "tiny"\nversion = "1 0"\n',
     "invalid bundle version: expected letters, digits, '.', '_' or '-', found '1 0'"),
    ('[bundle]\nname = "tiny"\nversion = "one"\n',
     "invalid bundle version: expected a PEP 440 version such as 1.2.0, found 'one'"),
    (BUNDLE + "expires_days = 0\n",
     "invalid spec.bundle: field 'expires_days' must be a positive integer, found 0"),
    (BUNDLE + "expires_days = -3\n",
     "invalid spec.bundle: field 'expires_days' must be a positive integer, found -3"),
    (BUNDLE + 'expires_days = "30"\n',
     "invalid spec.bundle: field 'expires_days' must be a positive integer, found '30'"),
    (BUNDLE + "expires_days = true\n",
     "invalid spec.bundle: field 'expires_days' must be a positive integer, found True"),
    # [[models]]
    ('models = "m.gguf"\n' + BUNDLE, "invalid spec: field 'models' must be a list, found 'm.gguf'"),
    ('models = ["m.gguf"]\n' + BUNDLE, "invalid spec models[0]: expected a JSON object, found str"),
    (HUB + 'file = "m.gguf"\nsha256 = "ab"\n',
     "invalid spec models[0]: expected only the fields allow_patterns, embedding, file, files, id, path, quantize, "
     "repo, revision, found 'sha256'"),
    (BUNDLE + '[[models]]\nrepo = "org/m"\nfile = "m.gguf"\n',
     "invalid spec models[0]: field 'id' must be a string, found None"),
    (BUNDLE + '[[models]]\nid = ""\nrepo = "org/m"\nfile = "m.gguf"\n',
     "invalid spec models[0]: field 'id' must be a non-empty string, found ''"),
    (BUNDLE + '[[models]]\nid = "a/b"\nrepo = "org/m"\nfile = "m.gguf"\n',
     "invalid model id: expected letters, digits, '.', '_' or '-', found 'a/b'"),
    (BUNDLE + '[[models]]\nid = "m"\nrepo = "org/a"\nfile = "a.gguf"\n[[models]]\nid = "m"\nrepo = "org/b"\n'
              'file = "b.gguf"\n', "model ids must be unique, found ['m', 'm']"),
    (LOCAL + 'repo = "org/m"\n', "model 'm' needs exactly one of 'path' (local file) or 'repo' (hub)"),
    (BUNDLE + '[[models]]\nid = "m"\nfile = "m.gguf"\n',
     "model 'm' needs exactly one of 'path' (local file) or 'repo' (hub)"),
    (HUB + 'file = "m.gguf"\nembedding = "yes"\n',
     "invalid spec models[0]: field 'embedding' must be true or false, found 'yes'"),
    (LOCAL + 'revision = "main"\nfile = "m.gguf"\n',
     "model 'm' is a local file; expected no hub fields beside 'path', found file, revision"),
    (BUNDLE + '[[models]]\nid = "m"\npath = ""\n', "invalid spec models[0]: field 'path' must be a non-empty string, "
                                                   "found ''"),
    (BUNDLE + '[[models]]\nid = "m"\npath = 3\n', "invalid spec models[0]: field 'path' must be a string, found 3"),
    (BUNDLE + '[[models]]\nid = "m"\npath = "gone.gguf"\n', "model 'm': file not found: {dir}/gone.gguf"),
    (BUNDLE + '[[models]]\nid = "m"\npath = "."\n', "model 'm': file not found: {dir}"),
    (HUB, "model 'm' from a repo needs 'file', 'files' or 'allow_patterns'"),
    (HUB + 'files = []\nallow_patterns = []\n', "model 'm' from a repo needs 'file', 'files' or 'allow_patterns'"),
    (HUB + 'file = ""\n', "invalid spec models[0]: field 'file' must be a non-empty string, found ''"),
    (HUB + "file = 3\n", "invalid spec models[0]: field 'file' must be a string, found 3"),
    (HUB + 'files = ["a.gguf", 3]\n',
     "invalid spec models[0]: field 'files' must be a list of strings, found ['a.gguf', 3]"),
    (HUB + 'allow_patterns = "*.gguf"\n',
     "invalid spec models[0]: field 'allow_patterns' must be a list of strings, found '*.gguf'"),
    (HUB + 'file = "m.gguf"\nrevision = 3\n', "invalid spec models[0]: field 'revision' must be a string, found 3"),
    (HUB + 'file = "m.gguf"\nrevision = ""\n',
     "invalid spec models[0]: field 'revision' must be a non-empty string, found ''"),
    (BUNDLE + '[[models]]\nid = "m"\nrepo = ""\nfile = "m.gguf"\n',
     "invalid spec models[0]: field 'repo' must be a non-empty string, found ''"),
    (BUNDLE + '[[models]]\nid = "m"\nrepo = ["org/m"]\nfile = "m.gguf"\n',
     "invalid spec models[0]: field 'repo' must be a string, found ['org/m']"),
    # [python]
    ('python = "3.11"\n' + BUNDLE, "invalid spec: field 'python' must be an object, found '3.11'"),
    (BUNDLE + '[python]\nrequirement = ["numpy"]\n',
     "invalid spec.python: expected only the fields find_links, index_url, platforms, python_version, "
     "requirements, found 'requirement'"),
    (BUNDLE + '[python]\nrequirements = "numpy"\n',
     "invalid spec.python: field 'requirements' must be a list of strings, found 'numpy'"),
    (BUNDLE + '[python]\nfind_links = "wheels"\n',
     "invalid spec.python: field 'find_links' must be a list of strings, found 'wheels'"),
    (BUNDLE + '[python]\nfind_links = ["wheels"]\n', "python.find_links folder not found: {dir}/wheels"),
    (BUNDLE + '[python]\nindex_url = 9\n', "invalid spec.python: field 'index_url' must be a string, found 9"),
    (BUNDLE + '[python]\nindex_url = ""\n',
     "invalid spec.python: field 'index_url' must be a non-empty string, found ''"),
    (BUNDLE + '[python]\npython_version = 3.11\n',
     "invalid spec.python: field 'python_version' must be a string, found 3.11"),
    (BUNDLE + '[python]\npython_version = ""\n',
     "invalid spec.python: field 'python_version' must be a non-empty string, found ''"),
    (BUNDLE + '[python]\nplatforms = [1]\n', "invalid spec.python: field 'platforms' must be a list of strings, "
                                             "found [1]"),
    # [engine]
    ('engine = true\n' + BUNDLE, "invalid spec: field 'engine' must be an object, found True"),
    (BUNDLE + "[engine]\nrocm = true\n",
     "invalid spec.engine: expected only the fields cpu_variants, cuda, cuda_architectures, llama_server, vulkan, "
     "found 'rocm'"),
    (BUNDLE + "[engine]\nvulkan = \"yes\"\n", "invalid spec.engine: field 'vulkan' must be true or false, found 'yes'"),
    (BUNDLE + "[engine]\nllama_server = false\nvulkan = true\n",
     "engine.vulkan = true adds a backend to llama-server; expected engine.llama_server to be true or absent, "
     "found false"),
    (BUNDLE + "[engine]\ncuda = true\nvulkan = true\n",
     "engine.cuda and engine.vulkan both drive the same NVIDIA GPUs; expected at most one of them true, found both"),
    (BUNDLE + "[engine]\ncpu_variants = []\n",
     "invalid spec.engine: field 'cpu_variants' must be a non-empty list like [\"zen4\"] or [\"haswell\", "
     "\"icelake\"], found []"),
    (BUNDLE + '[engine]\ncpu_variants = "zen4"\n',
     "invalid spec.engine: field 'cpu_variants' must be a list of strings, found 'zen4'"),
    (BUNDLE + '[engine]\ncpu_variants = ["zen4", "sapphirerapids"]\n',
     "invalid spec.engine: field 'cpu_variants[1]' must be one of x64, sse42, sandybridge, ivybridge, piledriver, "
     "haswell, skylakex, cannonlake, cascadelake, icelake, cooperlake, zen4, alderlake, found 'sapphirerapids'"),
    (BUNDLE + '[engine]\nllama_server = false\ncpu_variants = ["zen4"]\n',
     "engine.cpu_variants chooses what llama-server is built for; expected engine.llama_server to be true or "
     "absent, found false"),
    (BUNDLE + '[engine]\nllama_server = "yes"\n',
     "invalid spec.engine: field 'llama_server' must be true or false, found 'yes'"),
    (BUNDLE + '[engine]\ncuda = "yes"\n', "invalid spec.engine: field 'cuda' must be true or false, found 'yes'"),
    (BUNDLE + "[engine]\ncuda = true\nllama_server = false\n",
     "engine.cuda = true adds a backend to llama-server; expected engine.llama_server to be true or absent, "
     "found false"),
    (BUNDLE + "[engine]\ncuda_architectures = []\n",
     "invalid spec.engine: field 'cuda_architectures' must be a non-empty list like [\"90\"] or [\"8.0\", \"9.0\"], "
     "found []"),
    (BUNDLE + '[engine]\ncuda_architectures = "90"\n',
     "invalid spec.engine: field 'cuda_architectures' must be a list of strings, found '90'"),
    (BUNDLE + "[engine]\ncuda_architectures = [90]\n",
     "invalid spec.engine: field 'cuda_architectures' must be a list of strings, found [90]"),
    (BUNDLE + '[engine]\ncuda_architectures = ["90", "sm_90"]\n',
     "invalid spec.engine: field 'cuda_architectures[1]' must be a compute capability like \"90\" or \"9.0\", "
     "found 'sm_90'"),
    (BUNDLE + '[engine]\ncuda_architectures = ["9.0.1"]\n',
     "invalid spec.engine: field 'cuda_architectures[0]' must be a compute capability like \"90\" or \"9.0\", "
     "found '9.0.1'"),
    (BUNDLE + '[engine]\ncuda = false\ncuda_architectures = ["90"]\n',
     "engine.cuda_architectures chooses what the CUDA backend is built for; expected engine.cuda to be true or "
     "absent, found false"),
    (HUB + 'quantize = "IQ2_XS"\n',
     "invalid spec models[0]: field 'quantize' must be one of F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, "
     "Q5_0, Q4_K_M, Q4_K_S, Q4_1, Q4_0, Q3_K_L, Q3_K_M, Q3_K_S (the types llama-quantize makes without an "
     "importance matrix) or \"auto\", found 'IQ2_XS'"),
    (HUB + 'quantize = ""\n', "invalid spec models[0]: field 'quantize' must be a non-empty string, found ''"),
    (HUB + 'quantize = 4\n', "invalid spec models[0]: field 'quantize' must be a string, found 4"),
    (HUB + 'quantize = "Q4_K_M"\nfile = "m.gguf"\nallow_patterns = ["*"]\n',
     "model 'm': quantize fetches the repo's weights, config and tokenizer itself; expected no file or "
     "allow_patterns"),
    (LOCAL + 'quantize = "Q4_K_M"\n',
     "model 'm' is a local file; expected no hub fields beside 'path', found quantize"),
]


@pytest.mark.parametrize(("text", "message"), REFUSALS)
def test_each_refusal_word_for_word(tmp_path: Path, text: str, message: str) -> None:
    refused(write(tmp_path, text), message.replace("{dir}", str(tmp_path)))
