"""The Vulkan ggml backend (libggml-vulkan.so) of the same pinned llama.cpp: the GPU engine for NVIDIA drivers
older than the CUDA 13 floor (R580) and for GPUs CUDA does not drive.

It is built the way every GPU backend is (airgap.build.sources.backend): the `ggml-vulkan` target of the same
sources as llama-server, with the same defines plus GGML_VULKAN, dropped into the engine's folder. Its toolchain
is the build host's: `glslc` compiles ggml's compute shaders to SPIR-V at build time, and the Vulkan and SPIR-V
headers come with it (Debian: glslc, libvulkan-dev, spirv-headers). The toolchain's versions and hashes name the
cache entry and are recorded; after configuring, the CMake cache is read back to prove CMake used that toolchain.

The Vulkan loader (libvulkan.so.1) travels beside the library, so the isolated host needs only its GPU driver's
Vulkan ICD (NVIDIA's driver ships one). Which shader features the build has depends on what the glslc knows:
the recorded `vulkan_shader_features` says which of ggml's optional ones it compiled in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from airgap.build.sources.backend import (
    BackendBuild,
    BuiltBackend,
    build_backend,
    built_source,
    cached_backend,
    check_needs,
    copy_backend_library,
)
from airgap.build.sources.engine import CMAKE_DEFINES, builder_target, offline_prefix, run_build_steps
from airgap.build.sources.wheels import Pin, Pip
from airgap.errors import ResolveError

VULKAN_BACKEND = "libggml-vulkan.so"
VULKAN_LOADER = "libvulkan.so.1"
VULKAN_DEFINES: Mapping[str, str] = {"GGML_VULKAN": "ON"}
LAYOUT_VERSION = 1  # bump when what is copied out of a finished compile changes
TOOLCHAIN_PACKAGES = "glslc, libvulkan-dev and spirv-headers"  # the Debian packages that hold the toolchain
_HEADER = Path("vulkan") / "vulkan_core.h"
# What the pinned llama.cpp's Vulkan backend uses without a guard: headers older than this (Debian 12's 1.3.239)
# stop the compile after its shaders, a quarter of an hour in; find_toolchain refuses them at once instead.
REQUIRED_HEADER_EXTENSIONS = ("VK_EXT_layer_settings",)
# ggml's optional shader features: each is an extension its CMake tests glslc for, and a define it adds if so
_FEATURE_TEST = re.compile(r'test_shader_extension_support\(\s*"(GL_\w+)"\s*"[^"]*"\s*"(GGML_VULKAN_\w+)"\s*\)')


@dataclass(frozen=True)
class VulkanToolchain:
    """The shader compiler and headers a Vulkan build uses, with what identifies them."""

    glslc: Path
    glslc_version: str  # its first --version line: "shaderc v2023.2 v2023.2"
    include_dir: Path
    headers_version: str  # "1.3.239", from vulkan_core.h
    fingerprint: str  # sha256 over the glslc binary and vulkan_core.h

    def to_record(self) -> dict[str, str]:
        return {"glslc": str(self.glslc), "glslc_version": self.glslc_version,
                "headers_version": self.headers_version, "fingerprint": self.fingerprint}


def headers_version(header_text: str) -> str:
    """'1.3.239' from vulkan_core.h: VK_HEADER_VERSION_COMPLETE's major and minor, and VK_HEADER_VERSION."""
    patch = re.search(r"^#define VK_HEADER_VERSION (\d+)\s*$", header_text, re.M)
    complete = re.search(r"^#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\s*\d+,\s*(\d+),\s*(\d+),",
                         header_text, re.M)
    if patch is None or complete is None:
        raise ResolveError("expected VK_HEADER_VERSION and VK_HEADER_VERSION_COMPLETE in vulkan_core.h, found "
                           f"{'neither' if patch is None and complete is None else 'only one'}")
    return f"{complete[1]}.{complete[2]}.{patch[1]}"


def find_toolchain(environ: Mapping[str, str],
                   include_dirs: Sequence[Path] = (Path("/usr/include"),)) -> VulkanToolchain:
    """glslc and the Vulkan headers: from $VULKAN_SDK when it is set (as CMake's FindVulkan does), else the
    system's. One line naming the packages when either is missing."""
    sdk = environ.get("VULKAN_SDK")
    if sdk:
        glslc: str | None = str(Path(sdk) / "bin" / "glslc")
        includes: Sequence[Path] = (Path(sdk) / "include",)
    else:
        glslc = shutil.which("glslc", path=environ.get("PATH"))
        includes = include_dirs
    if glslc is None or not Path(glslc).is_file():
        raise ResolveError(f"expected glslc {'in $VULKAN_SDK/bin' if sdk else 'on PATH'} to build the Vulkan "
                           f"backend (Debian packages: {TOOLCHAIN_PACKAGES}), found none")
    include_dir = next((d for d in includes if (d / _HEADER).is_file()), None)
    if include_dir is None:
        raise ResolveError(f"expected the Vulkan headers ({_HEADER}) in {', '.join(map(str, includes))} to build "
                           f"the Vulkan backend (Debian packages: {TOOLCHAIN_PACKAGES}), found none")
    try:
        shown = subprocess.run([glslc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ResolveError(f"expected {glslc} --version to run, it failed: {exc}") from exc
    first = next((line.strip() for line in shown.stdout.splitlines() if line.strip()), "")
    if shown.returncode != 0 or not first:
        raise ResolveError(f"expected {glslc} --version to print its version, found exit {shown.returncode}")
    header = (include_dir / _HEADER).read_bytes()
    text = header.decode("utf-8", "replace")
    version = headers_version(text)
    lacking = [e for e in REQUIRED_HEADER_EXTENSIONS if re.search(rf"^#define {e} 1\s*$", text, re.M) is None]
    if lacking:
        raise ResolveError(f"expected Vulkan headers that define {', '.join(lacking)} (the pinned llama.cpp's "
                           f"Vulkan backend uses it), found headers {version} in {include_dir} without it; point "
                           "VULKAN_SDK at newer ones (Debian 13's libvulkan-dev, or the LunarG Vulkan SDK)")
    digest = hashlib.sha256(Path(glslc).resolve().read_bytes() + b"\0" + header).hexdigest()
    return VulkanToolchain(Path(glslc).resolve(), first, include_dir, version, digest)


def cache_key(version: str, sdist_sha256: str, toolchain: VulkanToolchain) -> str:
    inputs = {
        "project": "ggml-vulkan",
        "version": version,
        "sdist_sha256": sdist_sha256,
        "target": builder_target(),
        "defines": dict(sorted({**CMAKE_DEFINES, **VULKAN_DEFINES}.items())),
        "toolchain": toolchain.fingerprint,
        "layout": LAYOUT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"ggml-vulkan-{version}-{digest}"


def shader_features(cmake_lists: str, build_ninja: str) -> dict[str, bool]:
    """Which of ggml's optional shader extensions this glslc compiled in: each one its CMakeLists tests for,
    and whether the configured build defines it."""
    tests = _FEATURE_TEST.findall(cmake_lists)
    if not tests:
        raise ResolveError("expected test_shader_extension_support calls in ggml-vulkan's CMakeLists.txt, found none")
    return {extension: f"-D{define}" in build_ninja for extension, define in tests}


def toolchain_in_cmake_cache(text: str, toolchain: VulkanToolchain) -> Path:
    """The loader CMake linked; its glslc and headers must be the toolchain's (not another SDK's)."""
    values: dict[str, str] = dict(re.findall(r"^([A-Za-z_]+):[A-Z]+=(.*)$", text, re.M))
    for name in ("Vulkan_GLSLC_EXECUTABLE", "Vulkan_INCLUDE_DIR", "Vulkan_LIBRARY"):
        if not values.get(name):
            raise ResolveError(f"expected {name} in the Vulkan build's CMake cache, found none")
    if Path(values["Vulkan_GLSLC_EXECUTABLE"]).resolve() != toolchain.glslc:
        raise ResolveError(f"expected CMake's glslc to be {toolchain.glslc}, found {values['Vulkan_GLSLC_EXECUTABLE']}")
    if Path(values["Vulkan_INCLUDE_DIR"]).resolve() != toolchain.include_dir.resolve():
        raise ResolveError(f"expected CMake's Vulkan headers in {toolchain.include_dir}, found "
                           f"{values['Vulkan_INCLUDE_DIR']}")
    return Path(values["Vulkan_LIBRARY"])


def _compile(source: Path, build: Path, toolchain: VulkanToolchain, progress: bool) -> tuple[bool, dict[str, object]]:
    prefix, offline = offline_prefix()
    defines = {**CMAKE_DEFINES, **VULKAN_DEFINES}
    env = {k: v for k, v in os.environ.items() if k not in {"CFLAGS", "CXXFLAGS", "LDFLAGS", "CMAKE_ARGS"}}
    env["PATH"] = os.pathsep.join([str(toolchain.glslc.parent), env.get("PATH", "")])
    steps = [
        [*prefix, "cmake", "-S", str(source), "-B", str(build), "-G", "Ninja",
         *(f"-D{k}={v}" for k, v in defines.items())],
        [*prefix, "cmake", "--build", str(build), "-j", "2", "--target", "ggml-vulkan"],
    ]
    run_build_steps(steps[:1], env, len(prefix), "the Vulkan backend", progress)
    loader = toolchain_in_cmake_cache((build / "CMakeCache.txt").read_text(encoding="utf-8"), toolchain)
    features = shader_features(
        (source / "ggml" / "src" / "ggml-vulkan" / "CMakeLists.txt").read_text(encoding="utf-8"),
        (build / "build.ninja").read_text(encoding="utf-8"))
    run_build_steps(steps[1:], env, len(prefix), "the Vulkan backend", progress)
    return offline, {"vulkan_loader": str(loader.resolve()), "vulkan_shader_features": features}


def collect(build: Path, toolchain: VulkanToolchain, into: Path) -> list[str]:
    """Copy libggml-vulkan.so and the Vulkan loader it links; check what each needs from the host."""
    copy_backend_library(build / "bin", VULKAN_BACKEND, into)
    loader = toolchain_in_cmake_cache((build / "CMakeCache.txt").read_text(encoding="utf-8"), toolchain)
    shutil.copyfile(loader.resolve(), into / VULKAN_LOADER)
    copied = [VULKAN_BACKEND, VULKAN_LOADER]
    check_needs(into, copied, ())
    return sorted(copied)


def find_cached_vulkan(cache_dir: Path, version: str, sdist_sha256: str,
                       toolchain: VulkanToolchain) -> BuiltBackend | None:
    return cached_backend(cache_dir, cache_key(version, sdist_sha256, toolchain))


def build_vulkan(sdist: Path, toolchain: VulkanToolchain, *, version: str, sdist_sha256: str, cache_dir: Path,
                 progress: bool = True) -> BuiltBackend:
    """Return the cached Vulkan backend, or compile it (its shaders are most of the time)."""
    build = BackendBuild(
        project="ggml-vulkan",
        announce=f"building the Vulkan backend from {sdist.name} with {toolchain.glslc_version} and Vulkan headers "
                 f"{toolchain.headers_version} (once per cache key)",
        compile=lambda source, folder, shown: _compile(source, folder, toolchain, shown),
        collect=lambda folder, into: collect(folder, toolchain, into),
        record={"defines": {**CMAKE_DEFINES, **VULKAN_DEFINES}, "toolchain": toolchain.to_record()},
    )
    return build_backend(sdist, build, cache_key(version, sdist_sha256, toolchain), version=version,
                         sdist_sha256=sdist_sha256, cache_dir=cache_dir, progress=progress)


def vulkan_for(sdist: Pin, pip: Pip, *, cache_dir: Path, progress: bool = True) -> BuiltBackend:
    """The Vulkan backend of the pinned sdist: from the cache, or with the sdist fetched by hash and compiled."""
    toolchain = find_toolchain(os.environ)
    found = find_cached_vulkan(cache_dir, sdist.version, sdist.sha256, toolchain)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="airgap-vulkan-sdist-") as work:
        path = pip.download_sdist(sdist, Path(work) / "sdist")
        return build_vulkan(path, toolchain, version=sdist.version, sdist_sha256=sdist.sha256,
                            cache_dir=cache_dir, progress=progress)


def manifest_source(built: BuiltBackend) -> dict[str, str]:
    """What the manifest records for each Vulkan file: the sdist, the toolchain, its shader features, build time."""
    record = built.record
    toolchain = record.get("toolchain", {})
    features = record.get("vulkan_shader_features", {})
    if not isinstance(toolchain, dict) or not isinstance(features, dict):
        raise ResolveError(f"expected the Vulkan build record {built.cache_key} to hold its toolchain and features")
    return {
        **built_source(built),
        "vulkan_toolchain": f"{toolchain.get('glslc_version', '')}; "
                            f"Vulkan headers {toolchain.get('headers_version', '')}",
        "vulkan_shader_features": " ".join(sorted(n for n, on in features.items() if on)) or "none",
    }
