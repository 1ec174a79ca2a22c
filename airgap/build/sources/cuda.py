"""The CUDA ggml backend (libggml-cuda.so) of the same pinned llama.cpp, built with a CUDA toolkit from wheels.

It is built the way every GPU backend is (airgap.build.sources.backend): the `ggml-cuda` target of the same
sources as llama-server, with the same defines plus the CUDA ones, dropped into the engine's folder.

The CUDA toolkit is not the host's: it is assembled from pinned, hash-checked NVIDIA wheels (CUDA 13), and CMake
is pinned to it (`CUDAToolkit_ROOT`, `CMAKE_CUDA_COMPILER`), because CMake silently prefers a system CUDA. After
the build the CMake cache is read back to prove the system toolkit was not used. No wheel ships the driver stub
(libcuda.so), so the build turns off ggml's virtual-memory pool (GGML_CUDA_NO_VMM), the one user of driver API
symbols at link time; libcuda.so.1 then comes from the host's NVIDIA driver, through libcudart.

The CUDA runtime (libcudart, libcublas, libcublasLt) travels beside the library, so the isolated host needs only
the NVIDIA driver (R580 or newer for CUDA 13).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
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
from airgap.hardware.facts import HostFacts
from airgap.streams.pipeline import digest_file

CUDA_BACKEND = "libggml-cuda.so"
TOOLKIT_ROOT = "nvidia/cu13"  # where every CUDA 13 wheel puts its part of the toolkit
LAYOUT_VERSION = 1  # bump when what is copied out of a finished compile changes


@dataclass(frozen=True)
class ToolkitWheel:
    name: str
    version: str
    filename: str
    sha256: str
    size: int


# The CUDA 13 toolkit, one wheel per part. nvcc alone is not enough: cicc (nvvm), the crt headers, the
# runtime's headers and library, cuBLAS and CCCL (thrust/cub) are separate wheels.
TOOLKIT_WHEELS: tuple[ToolkitWheel, ...] = (
    ToolkitWheel("nvidia-cuda-nvcc", "13.5.37",
                 "nvidia_cuda_nvcc-13.5.37-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "f5c4f7ead5d964fb4af42bbf1e6d3ec3c1e6e9d83b53749f691d387e7fcaa3a7", 47028279),
    ToolkitWheel("nvidia-nvvm", "13.5.37",
                 "nvidia_nvvm-13.5.37-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
                 "c41bfa362e407405163f103c2229f0765f8cc2ed7d148b754dc77f228bf7e070", 75141406),
    ToolkitWheel("nvidia-cuda-crt", "13.5.37",
                 "nvidia_cuda_crt-13.5.37-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "e898b7f73d3035fa89915a3f7bf3b54a73e90249746111aed295822c4729bb29", 166163),
    ToolkitWheel("nvidia-cuda-runtime", "13.5.37",
                 "nvidia_cuda_runtime-13.5.37-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "df2b79a8852f10d1fef8c848489c49eebb5754051bf870202a862831412b179d", 2504024),
    ToolkitWheel("nvidia-cublas", "13.10.0.20",
                 "nvidia_cublas-13.10.0.20-py3-none-manylinux1_x86_64.manylinux_2_5_x86_64.whl",
                 "dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84", 444289903),
    ToolkitWheel("nvidia-cuda-cccl", "13.3.5.0.6",
                 "nvidia_cuda_cccl-13.3.5.0.6-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "d5230098fa2df5021e1a00c0c4eee41797671a91119d31e892463e5ccf3ee326", 4113651),
)  # fmt: skip

# The wheels ship only the versioned sonames; the linker looks for the plain names.
DEVELOPMENT_LINKS: Mapping[str, str] = {
    "libcudart.so": "libcudart.so.13",
    "libcublas.so": "libcublas.so.13",
    "libcublasLt.so": "libcublasLt.so.13",
}
# Carried beside libggml-cuda.so: the host needs only the driver.
CARRIED_CUDA = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")
DRIVER_LIBRARIES = frozenset({"libcuda.so.1"})
# The data-centre GPUs: A100 (8.0), A10/A40 (8.6), L4/L40S (8.9), H100/H200 (9.0).
DEFAULT_ARCHITECTURES = ("80", "86", "89", "90")
_JOBS = "2"


def cuda_defines(architectures: Sequence[str]) -> dict[str, str]:
    """What the CUDA build adds to the CPU engine's defines. Toolkit paths are not here: they name the cache.

    Every architecture is built `-real` (machine code only, no PTX): the toolkit is newer than the CUDA 13.0 that
    an R580 driver knows, and such a driver refuses to JIT newer PTX anyway, while SASS runs on it (CUDA minor
    version compatibility). PTX would only add size for GPUs the list does not name.
    """
    return {
        "GGML_CUDA": "ON",
        "GGML_CUDA_NO_VMM": "ON",
        "CMAKE_CUDA_ARCHITECTURES": ";".join(f"{a}-real" for a in architectures),
        "CMAKE_CUDA_RUNTIME_LIBRARY": "Shared",
    }


def architectures_for(facts: HostFacts | None, chosen: Sequence[str] = ()) -> tuple[str, ...]:
    """CUDA architectures to build: the spec's list, else the target's GPUs, else the data-centre set."""
    if chosen:
        bad = [a for a in chosen if re.fullmatch(r"[1-9]\d{1,2}", a) is None]
        if bad:
            raise ResolveError(f"expected CUDA architectures like '90' or '86', found {', '.join(bad)}")
        return tuple(sorted(set(chosen), key=int))
    if facts is None:
        return DEFAULT_ARCHITECTURES
    capabilities = {g.compute_capability for g in facts.gpus if g.compute_capability}
    if not capabilities:
        return DEFAULT_ARCHITECTURES
    return tuple(sorted({c.replace(".", "") for c in capabilities}, key=int))


def toolkit_key(wheels: Sequence[ToolkitWheel] = TOOLKIT_WHEELS) -> str:
    inputs = {"wheels": [[w.name, w.version, w.sha256] for w in wheels], "links": dict(DEVELOPMENT_LINKS),
              "layout": LAYOUT_VERSION}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"cuda-toolkit-{wheels[0].version}-{digest}"


def cache_key(version: str, sdist_sha256: str, architectures: Sequence[str],
              wheels: Sequence[ToolkitWheel] = TOOLKIT_WHEELS) -> str:
    inputs = {
        "project": "ggml-cuda",
        "version": version,
        "sdist_sha256": sdist_sha256,
        "target": builder_target(),
        "defines": dict(sorted({**CMAKE_DEFINES, **cuda_defines(architectures)}.items())),
        "toolkit": [[w.name, w.version, w.sha256] for w in wheels],
        "layout": LAYOUT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"ggml-cuda-{version}-{'-'.join(architectures)}-{digest}"


@dataclass(frozen=True)
class ExtractPlan:
    """Which files of one wheel land where in the toolkit folder, and which are executables."""

    members: tuple[tuple[str, str, bool], ...]  # (name in the wheel, path in the toolkit, executable)


def extract_plan(names_and_modes: Sequence[tuple[str, int]]) -> ExtractPlan:
    """The toolkit part of a wheel: everything under nvidia/cu13/, nothing that climbs out of it."""
    members = []
    for name, mode in names_and_modes:
        if not name.startswith(TOOLKIT_ROOT + "/") or name.endswith("/"):
            continue
        relative = name.removeprefix(TOOLKIT_ROOT + "/")
        if relative.startswith("/") or ".." in relative.split("/"):
            raise ResolveError(f"expected toolkit paths inside {TOOLKIT_ROOT}, found {name!r}")
        members.append((name, relative, bool(mode & 0o111)))
    if not members:
        raise ResolveError(f"expected files under {TOOLKIT_ROOT}/ in the wheel, found none")
    return ExtractPlan(tuple(members))


def _zip_modes(archive: zipfile.ZipFile) -> list[tuple[str, int]]:
    return [(info.filename, info.external_attr >> 16) for info in archive.infolist()]


@dataclass(frozen=True)
class Toolkit:
    root: Path
    key: str
    wheels: tuple[ToolkitWheel, ...]
    download_bytes: int

    @property
    def nvcc(self) -> Path:
        return self.root / "bin" / "nvcc"


def toolkit_for(pip: Pip, *, cache_dir: Path, wheels: Sequence[ToolkitWheel] = TOOLKIT_WHEELS) -> Toolkit:
    """The CUDA toolkit folder assembled from the pinned wheels: from the cache, or downloaded by hash once."""
    key = toolkit_key(wheels)
    root = cache_dir / key
    size = sum(w.size for w in wheels)
    if (root / ".complete").is_file():
        return Toolkit(root, key, tuple(wheels), size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache_dir) as staging:
        pins = [Pin(w.name, w.version, w.filename, w.sha256, "") for w in wheels]
        found = pip.download(pins, ["--only-binary", ":all:"], Path(staging) / "wheels")
        tree = Path(staging) / "toolkit"
        for wheel in wheels:
            path = found[wheel.filename]
            digest = digest_file(path)
            if digest.sha256 != wheel.sha256:
                raise ResolveError(f"expected {wheel.filename} with sha256 {wheel.sha256}, found {digest.sha256}")
            with zipfile.ZipFile(path) as archive:
                for member, relative, executable in extract_plan(_zip_modes(archive)).members:
                    out = tree / relative
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
                    out.chmod(0o755 if executable else 0o644)
        for link, soname in DEVELOPMENT_LINKS.items():
            if not (tree / "lib" / soname).is_file():
                raise ResolveError(f"expected {soname} in the CUDA toolkit wheels, found none")
            (tree / "lib" / link).symlink_to(soname)
        if not (tree / "bin" / "nvcc").is_file():
            raise ResolveError(f"expected bin/nvcc in the CUDA toolkit wheels {wheels[0].filename}, found none")
        (tree / ".complete").write_text("ok\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        tree.rename(root)
    return Toolkit(root, key, tuple(wheels), size)


def find_cached_cuda(cache_dir: Path, version: str, sdist_sha256: str,
                     architectures: Sequence[str]) -> BuiltBackend | None:
    return cached_backend(cache_dir, cache_key(version, sdist_sha256, architectures))


def build_cuda(sdist: Path, toolkit: Toolkit, *, version: str, sdist_sha256: str, architectures: Sequence[str],
               cache_dir: Path, progress: bool = True) -> BuiltBackend:
    """Return the cached CUDA backend, or compile it (about 20 minutes per architecture on 2 cores)."""
    build = BackendBuild(
        project="ggml-cuda",
        announce=f"building the CUDA backend for sm_{', sm_'.join(architectures)} from {sdist.name} "
                 "(once per cache key; ~20 min per architecture on 2 cores)",
        compile=lambda source, folder, shown: _compile(source, folder, toolkit, architectures, shown),
        collect=lambda folder, into: collect(folder / "bin", toolkit.root / "lib", into),
        record={
            "defines": {**CMAKE_DEFINES, **cuda_defines(architectures)},
            "architectures": list(architectures),
            "toolkit": [f"{w.name}=={w.version} sha256:{w.sha256}" for w in toolkit.wheels],
        },
    )
    return build_backend(sdist, build, cache_key(version, sdist_sha256, architectures, toolkit.wheels),
                         version=version, sdist_sha256=sdist_sha256, cache_dir=cache_dir, progress=progress)


def toolkit_defines(toolkit: Toolkit) -> dict[str, str]:
    """Pin CMake to the wheel toolkit: with a system CUDA installed it would otherwise pick that one."""
    return {
        "CUDAToolkit_ROOT": str(toolkit.root),
        "CMAKE_CUDA_COMPILER": str(toolkit.nvcc),
    }


def _compile(source: Path, build: Path, toolkit: Toolkit, architectures: Sequence[str],
             progress: bool) -> tuple[bool, dict[str, str]]:
    prefix, offline = offline_prefix()
    defines = {**CMAKE_DEFINES, **cuda_defines(architectures), **toolkit_defines(toolkit)}
    dropped = {"CFLAGS", "CXXFLAGS", "LDFLAGS", "CMAKE_ARGS", "CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT",
               "CUDACXX", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    # a system nvcc on PATH must not be found by anything the build runs
    env["PATH"] = os.pathsep.join([str(toolkit.root / "bin"), *(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvcc").exists())])
    steps = [
        [*prefix, "cmake", "-S", str(source), "-B", str(build), "-G", "Ninja",
         *(f"-D{k}={v}" for k, v in defines.items())],
        [*prefix, "cmake", "--build", str(build), "-j", _JOBS, "--target", "ggml-cuda"],
    ]
    run_build_steps(steps, env, len(prefix), "the CUDA backend", progress)
    return offline, {"toolkit_compiler": _check_toolkit_used(build / "CMakeCache.txt", toolkit)}


def _check_toolkit_used(cmake_cache: Path, toolkit: Toolkit) -> str:
    try:
        text = cmake_cache.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResolveError(f"expected a CMake cache at {cmake_cache}, found {exc}") from exc
    return toolkit_in_cmake_cache(text, toolkit.root)


def toolkit_in_cmake_cache(text: str, root: Path) -> str:
    """Which nvcc CMake settled on; the compiler, toolkit and runtime it found must all be the wheel toolkit's."""
    values: dict[str, str] = dict(re.findall(r"^([A-Za-z_]+):[A-Z]+=(.*)$", text, re.M))
    for name in ("CMAKE_CUDA_COMPILER", "CUDAToolkit_BIN_DIR", "CUDA_CUDART"):
        value = values.get(name)
        if value is None:
            raise ResolveError(f"expected {name} in the CUDA build's CMake cache, found none")
        if not Path(value).is_relative_to(root):
            raise ResolveError(f"expected CMake's {name} inside the wheel toolkit {root}, found {value}")
    return values["CMAKE_CUDA_COMPILER"]


def collect(bin_dir: Path, toolkit_lib: Path, into: Path) -> list[str]:
    """Copy libggml-cuda.so and the CUDA runtime it needs; check what each one needs from the host."""
    copy_backend_library(bin_dir, CUDA_BACKEND, into)
    for name in CARRIED_CUDA:
        shutil.copyfile((toolkit_lib / name).resolve(), into / name)
    copied = [CUDA_BACKEND, *CARRIED_CUDA]
    check_needs(into, copied, DRIVER_LIBRARIES)
    return sorted(copied)


def cuda_for(sdist: Pin, pip: Pip, *, architectures: Sequence[str], cache_dir: Path,
             progress: bool = True) -> BuiltBackend:
    """The CUDA backend of the pinned sdist: from the cache, or with the toolkit and sdist fetched by hash."""
    found = find_cached_cuda(cache_dir, sdist.version, sdist.sha256, architectures)
    if found is not None:
        return found
    toolkit = toolkit_for(pip, cache_dir=cache_dir)
    with tempfile.TemporaryDirectory(prefix="airgap-cuda-sdist-") as work:
        path = pip.download_sdist(sdist, Path(work) / "sdist")
        return build_cuda(path, toolkit, version=sdist.version, sdist_sha256=sdist.sha256,
                          architectures=architectures, cache_dir=cache_dir, progress=progress)


def manifest_source(built: BuiltBackend) -> dict[str, str]:
    """What the manifest records for each CUDA file: the sdist, the toolkit pins, the archs and build time."""
    record = built.record
    toolkit = record.get("toolkit", [])
    architectures = record.get("architectures", [])
    if not isinstance(toolkit, list) or not isinstance(architectures, list):
        raise ResolveError(f"expected the CUDA build record {built.cache_key} to list its toolkit and architectures")
    return {
        **built_source(built),
        "cuda_toolkit": " ".join(str(t) for t in toolkit),
        "cuda_architectures": " ".join(str(a) for a in architectures),
    }
