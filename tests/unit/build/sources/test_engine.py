"""The llama-server build (airgap.build.sources.engine): what shapes the cache key, what the build refuses, and (slow)
the real build from the llama-cpp-python sdist with every property the bundle relies on checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from airgap.build.sources import engine
from airgap.build.spec import load_spec
from airgap.errors import ResolveError, SpecError
from airgap.hardware.target import GGML_CPU_VARIANTS, GGML_X86_FEATURES
from tests.conftest import KeyPair
from tests.support import airgap, host_cpu_variant, write_sdist, write_spec

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # llama-cpp-python 0.3.36


def test_cache_key_covers_the_sdist_and_version() -> None:
    key = engine.cache_key("0.3.36", SDIST_SHA256)
    assert key.startswith("llama-server-0.3.36-") and key == engine.cache_key("0.3.36", SDIST_SHA256)
    assert engine.cache_key("0.3.36", "0" * 63 + "1") != key
    assert engine.cache_key("0.3.37", SDIST_SHA256) != key
    assert engine.cache_key("0.3.36", SDIST_SHA256, engine.CPU_VARIANTS) == key  # every variant is the default
    assert engine.cache_key("0.3.36", SDIST_SHA256, ("x64", "zen4")) != key


def test_chosen_variants_add_x64_in_ggmls_order_and_refuse_unknown_names() -> None:
    assert engine.chosen_variants(["zen4", "haswell"]) == ("x64", "haswell", "zen4")
    assert engine.chosen_variants(["x64"]) == ("x64",)
    assert engine.chosen_variants(engine.CPU_VARIANTS) == engine.CPU_VARIANTS
    with pytest.raises(ResolveError) as caught:
        engine.chosen_variants(["zen4", "sapphirerapids"])
    assert caught.value.message == ("expected CPU variants among x64, sse42, sandybridge, ivybridge, piledriver, "
                                    "haswell, skylakex, cannonlake, cascadelake, icelake, cooperlake, zen4, "
                                    "alderlake, found sapphirerapids")


def test_a_build_step_shows_ninjas_count_every_5_percent_not_the_compilers_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    noisy = ("import sys\n"
             "for i in range(1, 201):\n"
             "    print(f'[{i}/200] Building CXX object x{i}.o')\n"
             "    print('warning: unused variable', flush=True)\n"
             "print('ninja: build stopped', file=sys.stderr)\n"
             "sys.exit(3)\n")
    code, errors = engine.run_build_step([sys.executable, "-c", noisy], dict(os.environ), progress=True)
    assert (code, errors) == (3, "ninja: build stopped\n")
    shown = capsys.readouterr().err.splitlines()
    assert shown == [f"  {n}/200 build steps" for n in (1, *range(10, 201, 10))]
    assert engine.run_build_step([sys.executable, "-c", noisy], dict(os.environ), progress=False) == (3, errors)
    assert capsys.readouterr().err == ""


def _vendored(sdist: Path, member: str) -> str:
    with tarfile.open(sdist, "r:gz") as archive:
        handle = archive.extractfile(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{member}")
        assert handle is not None
        return handle.read().decode()


@pytest.mark.slow
def test_the_variant_table_is_the_pinned_ggmls_own(llama_sdist: Path) -> None:
    """airgap chooses variants by its own copy of ggml's table: it must be the vendored one, less sapphirerapids."""
    cmake = _vendored(llama_sdist, "ggml/src/CMakeLists.txt")
    block = cmake[cmake.index("if (GGML_CPU_ALL_VARIANTS)"):]
    x86 = block[block.index('STREQUAL "x86"'):block.index('STREQUAL "ARM"')]
    vendored = {m[1]: tuple(m[2].split()) for m in re.finditer(r"ggml_add_cpu_backend_variant\((\w+)([^)]*)\)", x86)}
    assert list(vendored.pop("sapphirerapids")) == [*GGML_CPU_VARIANTS["zen4"], "AMX_TILE", "AMX_INT8"]
    assert list(vendored.items()) == list(GGML_CPU_VARIANTS.items())
    # ...and scored with ggml's own weights (ggml_backend_cpu_x86_score)
    feats = _vendored(llama_sdist, "ggml/src/ggml-cpu/arch/x86/cpu-feats.cpp")
    weights = {m[1]: 1 << int(m[2] or 0) for m in
               re.finditer(r"#ifdef GGML_(\w+)\n[^#]*?score \+= 1(?:<<(\d+))?;", feats)}
    features = {f for needed in GGML_CPU_VARIANTS.values() for f in needed}
    assert {f: weights[f] for f in features} == {f: GGML_X86_FEATURES[f][0] for f in features}


def test_the_flags_turn_off_every_download_and_the_amx_variant() -> None:
    defines = engine.CMAKE_DEFINES
    assert defines["LLAMA_BUILD_UI"] == "OFF" and defines["LLAMA_USE_PREBUILT_UI"] == "OFF"
    assert defines["LLAMA_OPENSSL"] == "OFF" and defines["GGML_NATIVE"] == "OFF"
    assert defines["CMAKE_INSTALL_RPATH"] == "$ORIGIN" and defines["CMAKE_BUILD_WITH_INSTALL_RPATH"] == "ON"
    assert "sapphirerapids" not in engine.CPU_VARIANTS and "x64" in engine.CPU_VARIANTS


def test_an_sdist_without_vendored_llama_cpp_is_refused(tmp_path: Path) -> None:
    sdist = write_sdist(tmp_path, "llama_cpp_python", "0.3.36", {"pyproject.toml": "[project]\n"})
    with pytest.raises(ResolveError) as caught:
        engine.build_engine(sdist, version="0.3.36", sdist_sha256="1" * 64, cache_dir=tmp_path / "cache",
                            progress=False)
    assert caught.value.message == (
        "expected vendor/llama.cpp/tools/server in llama_cpp_python-0.3.36.tar.gz, found none")


def test_spec_engine_table_and_embedding_models(tmp_path: Path, tiny_model: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(f'[bundle]\nname = "s"\nversion = "1"\n[engine]\nllama_server = false\n'
                    f'[[models]]\nid = "e"\npath = "{tiny_model}"\nembedding = true\n')
    loaded = load_spec(spec)
    assert loaded.engine is False and loaded.models[0].embedding is True
    spec.write_text('[bundle]\nname = "s"\nversion = "1"\n[engine]\nllama_server = "yes"\n')
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    assert caught.value.message == (f"{spec}: invalid spec.engine: field 'llama_server' must be true or false, "
                                    "found 'yes'")
    spec.write_text('[bundle]\nname = "s"\nversion = "1"\n[engine]\nvulkan = true\n')
    with pytest.raises(SpecError) as unknown:
        load_spec(spec)
    assert unknown.value.message == (f"{spec}: invalid spec.engine: expected only the fields cpu_variants, cuda, "
                                     "cuda_architectures, llama_server, found 'vulkan'")


def test_asking_for_the_engine_without_llama_cpp_python_fails_the_build(
    tmp_path: Path, tiny_model: Path, wheelhouse: Path, keys: KeyPair,
) -> None:
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse, extra="\n[engine]\nllama_server = true\n")
    built = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q")
    assert built.code == 1
    assert built.error_line == (f"airgap: error: {spec}: engine.llama_server = true builds llama-server from the "
                                f"llama-cpp-python sdist; expected the requirements to build it from source, found "
                                f"no llama-cpp-python")
    assert not list(tmp_path.glob("dist/*.airgap"))


@pytest.fixture(scope="session")
def llama_sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(folder), "llama-cpp-python==0.3.36"], check=True)
    return next(folder.glob("llama_cpp_python-0.3.36.tar.gz"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # minutes on two cores the first time (scripts/setup.sh compiles it), then from the cache
def test_the_real_build_is_portable_offline_and_cached(llama_sdist: Path, tmp_path: Path) -> None:
    # the variants every engine test shares (this host's and x64): the same compile, a fraction of all of them
    variants = engine.chosen_variants([host_cpu_variant()])
    built = engine.build_engine(llama_sdist, version="0.3.36", sdist_sha256=SDIST_SHA256,
                                cache_dir=engine.default_cache_dir(), variants=variants, progress=False)
    names = {f.name for f in built.files}
    assert {"llama-server", "libllama.so.0", "libggml-base.so.0", "libstdc++.so.6", "libgcc_s.so.1",
            "libgomp.so.1"} <= names
    assert {n for n in names if n.startswith("libggml-cpu-")} == {f"libggml-cpu-{v}.so" for v in variants}
    assert built.record["variants"] == list(variants) and built.cache_key == engine.cache_key(
        "0.3.36", SDIST_SHA256, variants)
    for file in built.files:
        elf = engine.read_elf(file.path)
        if file.name not in engine.CARRIED_RUNTIME:
            assert elf.runpath == "$ORIGIN", file.name
        assert not any("ssl" in n or "crypto" in n or "curl" in n for n in elf.needed), (file.name, elf.needed)
    floor = str(built.record["glibc_floor"])
    assert floor == engine.glibc_floor([f.path for f in built.files])
    host = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    assert tuple(map(int, floor.split("."))) <= tuple(map(int, host.split()[-1].split(".")))
    assert built.record["built_offline"] is True  # cmake ran in a network namespace with no interface
    again = engine.build_engine(llama_sdist, version="0.3.36", sdist_sha256=SDIST_SHA256,
                                cache_dir=engine.default_cache_dir(), variants=variants, progress=False)
    assert again.cached and again.files == built.files

    # llama-quantize, for converting models at build time, is kept beside the engine but never packed
    assert "llama-quantize" not in names
    assert sorted(built.record["tools"]) == ["libllama-quantize-impl.so", "llama-quantize"]  # type: ignore[call-overload]
    usage = subprocess.run([str(again.quantize)], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           check=False, env={"PATH": os.defpath})
    assert "model-f32.gguf [model-quant.gguf] type" in usage.stdout + usage.stderr, usage.stderr[-2000:]

    # a cached file changed afterwards is refused, naming it
    copy = tmp_path / "cache"
    shutil.copytree(built.folder.parent, copy / built.cache_key)
    victim = copy / built.cache_key / "files" / "libggml-cpu-x64.so"
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ResolveError) as caught:
        engine.cached_engine(copy, built.cache_key)
    assert caught.value.message.startswith(f"expected cached {victim} with sha256 ")

    # the binary runs from any folder, finding its libraries beside itself through $ORIGIN alone
    folder = tmp_path / "elsewhere"
    shutil.copytree(built.folder, folder)
    (folder / "llama-server").chmod(0o555)
    version = subprocess.run([str(folder / "llama-server"), "--version"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60, check=False, env={"PATH": os.defpath})
    assert version.returncode == 0, version.stderr[-2000:]
    assert "built with GNU" in version.stdout + version.stderr
    record = json.loads((built.folder.parent / engine.BUILD_RECORD).read_text())
    assert record["sdist_sha256"] == SDIST_SHA256
