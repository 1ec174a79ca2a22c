"""The Vulkan backend build (airgap.build.sources.vulkan), its pure parts and its refusals: which toolchain it
finds (and the headers it refuses before a quarter of an hour of compiling), the cache key, the shader features
it records and the check that CMake used that toolchain. The real build is tests/e2e/test_vulkan_engine.py
(opt-in)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from airgap.build.builder import _can_pack_vulkan
from airgap.build.sources import engine, vulkan
from airgap.build.sources.backend import BuiltBackend
from airgap.build.spec import load_spec
from airgap.errors import ResolveError
from airgap.hardware.facts import GpuFacts, HostFacts, probe_facts
from airgap.hardware.target import choose_engine, driver_report
from tests.conftest import KeyPair
from tests.support import airgap, assert_refused, write_spec

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # llama-cpp-python 0.3.36
RTX = GpuFacts(0, "NVIDIA GeForce RTX 3090", "GPU-0", "00000000:01:00.0", 24576 << 20, 24000 << 20, "8.6")
# the two lines of vulkan_core.h that give its version, as Debian 12's and Debian 13's headers write them
OLD_HEADER = ("#define VK_HEADER_VERSION 239\n"
              "#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 3, VK_HEADER_VERSION)\n")
NEW_HEADER = ("#define VK_HEADER_VERSION 309\n"
              "#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 4, VK_HEADER_VERSION)\n"
              "#define VK_EXT_layer_settings 1\n")


def _sdk(root: Path, header: str, glslc: bool = True) -> Path:
    """A folder laid out as $VULKAN_SDK is: bin/glslc (here a script that prints a version) and include/."""
    (root / "include" / "vulkan").mkdir(parents=True)
    (root / "include" / "vulkan" / "vulkan_core.h").write_text(header, encoding="utf-8")
    if glslc:
        (root / "bin").mkdir()
        (root / "bin" / "glslc").write_text("#!/bin/sh\necho 'shaderc v2025.2 v2025.2'\n", encoding="utf-8")
        (root / "bin" / "glslc").chmod(0o755)
    return root


def test_headers_version_reads_the_complete_version() -> None:
    assert vulkan.headers_version(OLD_HEADER) == "1.3.239"
    assert vulkan.headers_version(NEW_HEADER) == "1.4.309"
    with pytest.raises(ResolveError) as caught:
        vulkan.headers_version("#define VK_HEADER_VERSION 309\n")
    assert caught.value.message == ("expected VK_HEADER_VERSION and VK_HEADER_VERSION_COMPLETE in vulkan_core.h, "
                                    "found only one")


def test_the_toolchain_from_vulkan_sdk_is_identified_by_version_and_hash(tmp_path: Path) -> None:
    sdk = _sdk(tmp_path / "sdk", NEW_HEADER)
    found = vulkan.find_toolchain({"VULKAN_SDK": str(sdk), "PATH": "/usr/bin"})
    assert found.glslc == (sdk / "bin" / "glslc").resolve() and found.include_dir == sdk / "include"
    assert (found.glslc_version, found.headers_version) == ("shaderc v2025.2 v2025.2", "1.4.309")
    other = _sdk(tmp_path / "other", NEW_HEADER + "/* another build of the same version */\n")
    changed = vulkan.find_toolchain({"VULKAN_SDK": str(other)})
    assert changed.fingerprint != found.fingerprint  # the cache key follows the bytes, not only the version
    assert vulkan.cache_key("0.3.36", SDIST_SHA256, changed) != vulkan.cache_key("0.3.36", SDIST_SHA256, found)
    assert vulkan.cache_key("0.3.36", SDIST_SHA256, found).startswith("ggml-vulkan-0.3.36-")


def test_headers_the_pinned_llama_cpp_cannot_compile_with_are_refused_before_the_build(tmp_path: Path) -> None:
    sdk = _sdk(tmp_path / "sdk", OLD_HEADER)
    with pytest.raises(ResolveError) as caught:
        vulkan.find_toolchain({"VULKAN_SDK": str(sdk)})
    assert caught.value.message == (
        "expected Vulkan headers that define VK_EXT_layer_settings (the pinned llama.cpp's Vulkan backend uses "
        f"it), found headers 1.3.239 in {sdk / 'include'} without it; point VULKAN_SDK at newer ones (Debian "
        "13's libvulkan-dev, or the LunarG Vulkan SDK)")


def test_a_missing_glslc_or_missing_headers_name_the_packages(tmp_path: Path) -> None:
    with pytest.raises(ResolveError) as no_glslc:
        vulkan.find_toolchain({"PATH": str(tmp_path)})
    assert no_glslc.value.message == ("expected glslc on PATH to build the Vulkan backend (Debian packages: glslc, "
                                      "libvulkan-dev and spirv-headers), found none")
    sdk = _sdk(tmp_path / "sdk", NEW_HEADER, glslc=False)
    with pytest.raises(ResolveError) as not_in_sdk:
        vulkan.find_toolchain({"VULKAN_SDK": str(sdk)})
    assert not_in_sdk.value.message.startswith("expected glslc in $VULKAN_SDK/bin to build the Vulkan backend")
    bare = _sdk(tmp_path / "bare", NEW_HEADER)
    with pytest.raises(ResolveError) as no_headers:
        vulkan.find_toolchain({"PATH": str(bare / "bin")}, include_dirs=(tmp_path / "none",))
    assert no_headers.value.message == (
        f"expected the Vulkan headers (vulkan/vulkan_core.h) in {tmp_path / 'none'} to build the Vulkan backend "
        "(Debian packages: glslc, libvulkan-dev and spirv-headers), found none")


CMAKE_LISTS = """
    test_shader_extension_support(
        "GL_KHR_cooperative_matrix"
        "${CMAKE_CURRENT_SOURCE_DIR}/vulkan-shaders/feature-tests/coopmat.comp"
        "GGML_VULKAN_COOPMAT_GLSLC_SUPPORT"
    )

    test_shader_extension_support(
        "GL_EXT_integer_dot_product"
        "${CMAKE_CURRENT_SOURCE_DIR}/vulkan-shaders/feature-tests/integer_dot.comp"
        "GGML_VULKAN_INTEGER_DOT_GLSLC_SUPPORT"
    )
"""


def test_shader_features_are_what_the_configured_build_defines() -> None:
    ninja = "  DEFINES = -DGGML_BACKEND_BUILD -DGGML_VULKAN_INTEGER_DOT_GLSLC_SUPPORT -DGGML_SHARED\n"
    assert vulkan.shader_features(CMAKE_LISTS, ninja) == {"GL_KHR_cooperative_matrix": False,
                                                          "GL_EXT_integer_dot_product": True}
    assert vulkan.shader_features(CMAKE_LISTS, "") == {"GL_KHR_cooperative_matrix": False,
                                                       "GL_EXT_integer_dot_product": False}
    with pytest.raises(ResolveError) as caught:
        vulkan.shader_features("project(ggml)\n", ninja)
    assert caught.value.message == ("expected test_shader_extension_support calls in ggml-vulkan's CMakeLists.txt, "
                                    "found none")


def test_cmake_must_have_used_the_toolchain_that_names_the_cache(tmp_path: Path) -> None:
    toolchain = vulkan.find_toolchain({"VULKAN_SDK": str(_sdk(tmp_path / "sdk", NEW_HEADER))})
    ours = (f"Vulkan_GLSLC_EXECUTABLE:FILEPATH={toolchain.glslc}\n"
            f"Vulkan_INCLUDE_DIR:PATH={toolchain.include_dir}\n"
            "Vulkan_LIBRARY:FILEPATH=/usr/lib/x86_64-linux-gnu/libvulkan.so\n")
    assert vulkan.toolchain_in_cmake_cache(ours, toolchain) == Path("/usr/lib/x86_64-linux-gnu/libvulkan.so")
    with pytest.raises(ResolveError) as other_headers:
        vulkan.toolchain_in_cmake_cache(ours.replace(str(toolchain.include_dir), "/usr/include"), toolchain)
    assert other_headers.value.message == (f"expected CMake's Vulkan headers in {toolchain.include_dir}, found "
                                           "/usr/include")
    with pytest.raises(ResolveError) as other_glslc:
        vulkan.toolchain_in_cmake_cache(ours.replace(str(toolchain.glslc), "/opt/sdk/bin/glslc"), toolchain)
    assert other_glslc.value.message == f"expected CMake's glslc to be {toolchain.glslc}, found /opt/sdk/bin/glslc"
    with pytest.raises(ResolveError) as missing:
        vulkan.toolchain_in_cmake_cache(ours.replace("Vulkan_LIBRARY", "OTHER"), toolchain)
    assert missing.value.message == "expected Vulkan_LIBRARY in the Vulkan build's CMake cache, found none"


def test_manifest_source_records_the_toolchain_features_and_build_seconds(tmp_path: Path) -> None:
    record = {"sdist": "llama_cpp_python-0.3.36.tar.gz", "sdist_sha256": SDIST_SHA256,
              "defines": {**engine.CMAKE_DEFINES, **vulkan.VULKAN_DEFINES},
              "toolchain": {"glslc_version": "shaderc v2023.2 v2023.2", "headers_version": "1.4.309"},
              "vulkan_shader_features": {"GL_KHR_cooperative_matrix": False, "GL_EXT_integer_dot_product": True},
              "seconds": 901.5}
    source = vulkan.manifest_source(BuiltBackend(tmp_path, (), "ggml-vulkan-key", record, cached=True))
    assert source["vulkan_toolchain"] == "shaderc v2023.2 v2023.2; Vulkan headers 1.4.309"
    assert source["vulkan_shader_features"] == "GL_EXT_integer_dot_product"
    assert "GGML_VULKAN=ON" in source["cmake_defines"] and source["build_seconds"] == "901.5"
    assert all(isinstance(v, str) for v in source.values())


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> HostFacts:
    return probe_facts(tmp_path_factory.mktemp("p"), nvidia_smi=None)


def test_a_target_below_the_cuda_floor_gets_the_vulkan_engine_when_it_is_packed(here: HostFacts) -> None:
    old = dataclasses.replace(here, gpus=(RTX,), driver_version="535.183.01")
    chosen = choose_engine(old, cuda_packed=True, vulkan_packed=True)
    assert chosen.engine == "vulkan"
    assert chosen.reason == ("the target's NVIDIA driver 535.183.01 is older than R580 (which the CUDA 13 engine "
                             "needs): Vulkan engine, which needs no CUDA floor")
    assert choose_engine(old, cuda_packed=True, vulkan_packed=False).engine == "cpu"
    unknown = dataclasses.replace(old, driver_version=None)
    assert choose_engine(unknown, cuda_packed=True, vulkan_packed=True).engine == "vulkan"
    new = dataclasses.replace(old, driver_version="580.65.06")
    assert choose_engine(new, cuda_packed=True, vulkan_packed=True).engine == "cuda"  # CUDA where it runs
    assert choose_engine(dataclasses.replace(here, gpus=()), cuda_packed=True, vulkan_packed=True).engine == "cpu"
    assert driver_report(old, vulkan=True)["summary"] == (
        "NVIDIA driver 535.183.01 is older than R580, which the CUDA 13 engine needs: the Vulkan engine serves")


@pytest.mark.parametrize(("requirements", "table", "packs"), [
    (["llama-cpp-python[server]==0.3.36"], "", True),
    (["llama-cpp-python==0.3.36"], "vulkan = false\n", False),
    (["llama-cpp-python==0.3.36"], "cuda = true\n", False),  # the same GPUs, twice: never both
    (["llama-cpp-python==0.3.36"], "llama_server = false\n", False),
    (["numpy"], "", False),
    (["numpy"], "vulkan = true\n", True),  # and the build then says it needs llama-cpp-python from source
])
def test_which_builds_can_carry_the_vulkan_backend_for_a_target(
    tmp_path: Path, requirements: list[str], table: str, packs: bool
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'[bundle]\nname = "s"\nversion = "1"\n[python]\nrequirements = {json.dumps(requirements)}\n'
                    f"[engine]\n{table}", encoding="utf-8")
    loaded = load_spec(path)
    assert _can_pack_vulkan(loaded) is packs
    assert loaded.vulkan is ({"vulkan = false\n": False, "vulkan = true\n": True}.get(table))


def test_a_vulkan_build_without_its_toolchain_stops_before_downloading_anything(
    tmp_path: Path, tiny_model: Path, wheelhouse: Path, keys: KeyPair,
) -> None:
    spec = write_spec(tmp_path, model=tiny_model, wheelhouse=wheelhouse, extra="\n[engine]\nvulkan = true\n")
    empty = tmp_path / "sdk"
    empty.mkdir()
    built = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q",
                   env={"VULKAN_SDK": str(empty)})
    assert_refused(built, f"{spec}: engine.vulkan = true: expected glslc in $VULKAN_SDK/bin to build the Vulkan "
                          "backend (Debian packages: glslc, libvulkan-dev and spirv-headers), found none")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_a_vulkan_target_is_sized_for_its_gpu_as_a_cuda_one_is(tmp_path: Path, tiny_model: Path,
                                                                here: HostFacts) -> None:
    from airgap.build.fit import HubReader, size_for_target

    path = tmp_path / "s.toml"
    path.write_text(f'[bundle]\nname = "s"\nversion = "1"\n[[models]]\nid = "tiny"\npath = "{tiny_model}"\n',
                    encoding="utf-8")
    spec = load_spec(path)
    old = dataclasses.replace(here, gpus=(RTX,), driver_version="535.183.01", implementation="cpython")
    new = dataclasses.replace(old, driver_version="580.65.06")
    hub = HubReader(None)  # a local model: the hub is never asked
    on_vulkan = size_for_target(spec, old, hub, None, cuda_packed=True, vulkan_packed=True)
    on_cuda = size_for_target(spec, new, hub, None, cuda_packed=True, vulkan_packed=True)
    on_cpu = size_for_target(spec, old, hub, None, cuda_packed=True, vulkan_packed=False)
    assert (on_vulkan.engine.engine, on_cuda.engine.engine, on_cpu.engine.engine) == ("vulkan", "cuda", "cpu")
    assert on_vulkan.record["choices"][1:] == on_cuda.record["choices"][1:]  # the same GPU sizing per model
    assert on_vulkan.record["choices"][1:] != on_cpu.record["choices"][1:]
