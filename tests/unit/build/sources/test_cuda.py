"""The CUDA backend build (airgap.build.sources.cuda), its pure parts: the toolkit pins and how the wheels are
laid out into a toolkit folder, the cache key, the architectures, the CMake defines and the check that CMake used
the wheel toolkit and not a system one. The real build is tests/e2e/test_cuda_engine.py (opt-in, 20+ minutes)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from airgap.build.builder import _can_pack_cuda
from airgap.build.sources import cuda, engine
from airgap.build.sources.backend import BuiltBackend
from airgap.build.spec import load_spec
from airgap.errors import ResolveError, SpecError
from airgap.hardware.facts import GpuFacts, HostFacts, probe_facts
from tests.conftest import KeyPair
from tests.support import airgap, write_spec

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # llama-cpp-python 0.3.36
H200 = GpuFacts(0, "NVIDIA H200", "GPU-0", "00000000:01:00.0", 143771 << 20, 143190 << 20, "9.0")
A100 = GpuFacts(1, "NVIDIA A100-SXM4-80GB", "GPU-1", "00000000:02:00.0", 81920 << 20, 81000 << 20, "8.0")


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> HostFacts:
    return probe_facts(tmp_path_factory.mktemp("p"), nvidia_smi=None)


def test_the_toolkit_is_pinned_cuda_13_wheels_with_hashes() -> None:
    names = {w.name for w in cuda.TOOLKIT_WHEELS}
    assert {"nvidia-cuda-nvcc", "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cuda-cccl", "nvidia-nvvm",
            "nvidia-cuda-crt"} == names
    for wheel in cuda.TOOLKIT_WHEELS:
        assert wheel.version.startswith("13."), wheel  # CUDA 13: the engine's driver floor is R580
        assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256) and wheel.size > 0
        assert wheel.filename.startswith(wheel.name.replace("-", "_") + "-" + wheel.version + "-")
        assert "cu12" not in wheel.name  # the CUDA 12 nvcc wheel ships no nvcc
    assert cuda.DEVELOPMENT_LINKS == {"libcudart.so": "libcudart.so.13", "libcublas.so": "libcublas.so.13",
                                      "libcublasLt.so": "libcublasLt.so.13"}


def test_extract_plan_takes_the_toolkit_tree_keeps_executables_and_refuses_climbing_out() -> None:
    plan = cuda.extract_plan([
        ("nvidia/cu13/bin/nvcc", 0o100755), ("nvidia/cu13/include/", 0o40755),
        ("nvidia/cu13/include/cuda_runtime.h", 0o100644), ("nvidia_cuda_nvcc-13.5.37.dist-info/RECORD", 0o100644),
        ("nvidia/__init__.py", 0o100644),
    ])
    assert plan.members == (("nvidia/cu13/bin/nvcc", "bin/nvcc", True),
                            ("nvidia/cu13/include/cuda_runtime.h", "include/cuda_runtime.h", False))
    with pytest.raises(ResolveError) as climbing:
        cuda.extract_plan([("nvidia/cu13/../../etc/passwd", 0o100644)])
    assert climbing.value.message == "expected toolkit paths inside nvidia/cu13, found 'nvidia/cu13/../../etc/passwd'"
    with pytest.raises(ResolveError) as empty:
        cuda.extract_plan([("nvidia/cu12/bin/ptxas", 0o100755)])
    assert empty.value.message == "expected files under nvidia/cu13/ in the wheel, found none"


def test_architectures_come_from_the_spec_then_the_target_then_the_data_centre_set(here: HostFacts) -> None:
    assert cuda.architectures_for(None) == ("80", "86", "89", "90")
    assert cuda.architectures_for(dataclasses.replace(here, gpus=())) == ("80", "86", "89", "90")
    assert cuda.architectures_for(dataclasses.replace(here, gpus=(H200,))) == ("90",)
    assert cuda.architectures_for(dataclasses.replace(here, gpus=(H200, A100, H200))) == ("80", "90")
    unknown = dataclasses.replace(H200, compute_capability=None)
    assert cuda.architectures_for(dataclasses.replace(here, gpus=(unknown,))) == ("80", "86", "89", "90")
    assert cuda.architectures_for(dataclasses.replace(here, gpus=(H200,)), ("89", "86")) == ("86", "89")
    with pytest.raises(ResolveError) as bad:
        cuda.architectures_for(None, ("9.0",))
    assert bad.value.message == "expected CUDA architectures like '90' or '86', found 9.0"


def test_cuda_defines_add_to_the_cpu_ones_build_machine_code_only_and_skip_the_vmm_pool() -> None:
    defines = cuda.cuda_defines(("80", "90"))
    assert defines == {"GGML_CUDA": "ON", "GGML_CUDA_NO_VMM": "ON", "CMAKE_CUDA_ARCHITECTURES": "80-real;90-real",
                       "CMAKE_CUDA_RUNTIME_LIBRARY": "Shared"}
    assert not set(defines) & set(engine.CMAKE_DEFINES)  # same ggml ABI: the CPU defines stay as they are


def test_cache_key_covers_sdist_architectures_and_toolkit_pins() -> None:
    key = cuda.cache_key("0.3.36", SDIST_SHA256, ("90",))
    assert key.startswith("ggml-cuda-0.3.36-90-") and key == cuda.cache_key("0.3.36", SDIST_SHA256, ("90",))
    assert cuda.cache_key("0.3.36", "0" * 64, ("90",)) != key
    assert cuda.cache_key("0.3.37", SDIST_SHA256, ("90",)) != key
    assert cuda.cache_key("0.3.36", SDIST_SHA256, ("80", "90")) != key
    other = (*cuda.TOOLKIT_WHEELS[:-1], dataclasses.replace(cuda.TOOLKIT_WHEELS[-1], sha256="1" * 64))
    assert cuda.cache_key("0.3.36", SDIST_SHA256, ("90",), other) != key
    assert cuda.toolkit_key(other) != cuda.toolkit_key()
    assert key != engine.cache_key("0.3.36", SDIST_SHA256)


def test_the_cmake_cache_must_name_the_wheel_toolkit_not_a_system_one(tmp_path: Path) -> None:
    root = tmp_path / "cuda-toolkit"
    ours = (f"CMAKE_CUDA_COMPILER:STRING={root}/bin/nvcc\nCUDAToolkit_BIN_DIR:PATH={root}/bin\n"
            f"CUDA_CUDART:FILEPATH={root}/lib/libcudart.so\nCMAKE_CUDA_COMPILER-ADVANCED:INTERNAL=1\n")
    assert cuda.toolkit_in_cmake_cache(ours, root) == f"{root}/bin/nvcc"
    system = ours.replace(f"CUDA_CUDART:FILEPATH={root}/lib", "CUDA_CUDART:FILEPATH=/usr/local/cuda/lib64")
    with pytest.raises(ResolveError) as caught:
        cuda.toolkit_in_cmake_cache(system, root)
    assert caught.value.message == (f"expected CMake's CUDA_CUDART inside the wheel toolkit {root}, found "
                                    "/usr/local/cuda/lib64/libcudart.so")
    with pytest.raises(ResolveError) as missing:
        cuda.toolkit_in_cmake_cache(ours.replace("CUDAToolkit_BIN_DIR", "OTHER"), root)
    assert missing.value.message == "expected CUDAToolkit_BIN_DIR in the CUDA build's CMake cache, found none"


def test_manifest_source_records_toolkit_pins_architectures_and_build_seconds(tmp_path: Path) -> None:
    record = {"sdist": "llama_cpp_python-0.3.36.tar.gz", "sdist_sha256": SDIST_SHA256,
              "defines": {**engine.CMAKE_DEFINES, **cuda.cuda_defines(("90",))}, "architectures": ["90"],
              "toolkit": ["nvidia-cuda-nvcc==13.5.37 sha256:ab", "nvidia-cublas==13.10.0.20 sha256:cd"],
              "seconds": 1234.5}
    built = BuiltBackend(tmp_path, (), "ggml-cuda-key", record, cached=True)
    source = cuda.manifest_source(built)
    assert source["cuda_toolkit"] == "nvidia-cuda-nvcc==13.5.37 sha256:ab nvidia-cublas==13.10.0.20 sha256:cd"
    assert source["cuda_architectures"] == "90" and source["build_seconds"] == "1234.5"
    assert "GGML_CUDA_NO_VMM=ON" in source["cmake_defines"] and source["cache_key"] == "ggml-cuda-key"
    assert all(isinstance(v, str) for v in source.values())  # the manifest's source map holds strings only


def _spec(tmp_path: Path, engine_table: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'[bundle]\nname = "s"\nversion = "1"\n[engine]\n{engine_table}', encoding="utf-8")
    return path


def test_spec_engine_cuda_and_its_architectures(tmp_path: Path) -> None:
    loaded = load_spec(_spec(tmp_path, 'cuda = true\ncuda_architectures = ["9.0", "86", "90"]\n'))
    assert loaded.cuda is True and loaded.cuda_architectures == ("86", "90")
    assert load_spec(_spec(tmp_path, "cuda = false\n")).cuda is False
    absent = load_spec(_spec(tmp_path, ""))
    assert absent.cuda is None and absent.cuda_architectures == ()


@pytest.mark.parametrize(("table", "message"), [
    ('cuda = "yes"\n', "invalid spec.engine: field 'cuda' must be true or false, found 'yes'"),
    ("cuda = true\nllama_server = false\n",
     "engine.cuda = true adds a backend to llama-server; expected engine.llama_server to be true or absent, "
     "found false"),
    ("cuda_architectures = []\n",
     'invalid spec.engine: field \'cuda_architectures\' must be a non-empty list like ["90"] or ["8.0", "9.0"], '
     "found []"),
    ('cuda_architectures = "90"\n',
     "invalid spec.engine: field 'cuda_architectures' must be a list of strings, found '90'"),
    ('cuda_architectures = ["sm_90"]\n', "invalid spec.engine: field 'cuda_architectures[0]' must be a compute "
                                         'capability like "90" or "9.0", found \'sm_90\''),
    ("cuda_architectures = [90]\n", "invalid spec.engine: field 'cuda_architectures' must be a list of strings, "
                                    "found [90]"),
    ('cuda = false\ncuda_architectures = ["90"]\n',
     "engine.cuda_architectures chooses what the CUDA backend is built for; expected engine.cuda to be true or "
     "absent, found false"),
])
def test_spec_engine_cuda_refusals(tmp_path: Path, table: str, message: str) -> None:
    path = _spec(tmp_path, table)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.message == f"{path}: {message}"


def test_asking_for_cuda_without_llama_cpp_python_fails_the_build(
    tmp_path: Path, tiny_model: Path, wheelhouse: Path, keys: KeyPair,
) -> None:
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse, extra="\n[engine]\ncuda = true\n")
    built = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q")
    assert built.code == 1
    assert built.error_line == (f"airgap: error: {spec}: engine.cuda = true builds llama-server from the "
                                f"llama-cpp-python sdist; expected the requirements to build it from source, found "
                                f"no llama-cpp-python")
    assert not list(tmp_path.glob("dist/*.airgap"))


@pytest.mark.parametrize(("requirements", "table", "packs"), [
    (["llama-cpp-python[server]==0.3.36"], "", True),
    (["Llama_CPP_Python>=0.3"], "", True),
    (["llama-cpp-python==0.3.36"], "cuda = false\n", False),
    (["llama-cpp-python==0.3.36"], "llama_server = false\n", False),
    (["numpy"], "", False),
    (["numpy"], "cuda = true\n", True),  # and the build then says it needs llama-cpp-python from source
])
def test_which_builds_can_carry_the_cuda_backend_for_a_target(
    tmp_path: Path, requirements: list[str], table: str, packs: bool
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'[bundle]\nname = "s"\nversion = "1"\n[python]\nrequirements = {json.dumps(requirements)}\n'
                    f"[engine]\n{table}", encoding="utf-8")
    assert _can_pack_cuda(load_spec(path)) is packs
