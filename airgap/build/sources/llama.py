"""Build wheels from source distributions once, and keep them in a cache keyed by everything that shapes them.

llama-cpp-python is published as a source distribution only, so the builder compiles it. The build must not
depend on the build host's CPU (no -march=native), and an identical request must never compile twice: the
cache key covers project, version, the sdist's SHA-256, the interpreter and platform the wheel is built for,
and the build flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from airgap.errors import ResolveError
from airgap.streams.pipeline import digest_file

# No -march=native: the wheel must run on the target, whose CPU is not the builder's. On x86-64 ggml then still
# enables SSE4.2/AVX/AVX2/FMA/F16C/BMI2, so targets need an x86-64-v3 CPU (Haswell, Zen or later).
# GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS would pick CPU code at run time, but llama-cpp-python 0.3.36 packs the
# variant libraries into the wheel's top-level bin/ and ggml looks for them only beside the executable and in the
# working directory, so the model does not load (measured: 14 min build here, "Failed to load model").
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF"

# Caller environment that would change what the compiler produces without showing in the cache key. Dropped, so
# that only `flags` shape a build (SOURCE_DATE_EPOCH, for one, silently turns ggml's AVX defaults off).
_BUILD_ENV_DROPPED = frozenset(
    {"CMAKE_ARGS", "SKBUILD_CMAKE_ARGS", "SKBUILD_CMAKE_DEFINE", "FORCE_CMAKE", "SOURCE_DATE_EPOCH", "CFLAGS",
     "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "CC", "CXX"}
)  # fmt: skip

BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class BuiltWheel:
    """A wheel compiled from a source distribution, as it lies in the cache."""

    path: Path
    sha256: str
    size: int
    cache_key: str
    flags: Mapping[str, str]
    seconds: float  # how long the compiler ran; 0.0 when nothing was built this time
    cached: bool


def airgap_cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/airgap/<name>` (`~/.cache` by default): where the build side keeps what it made once."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "airgap" / name


def default_cache_dir() -> Path:
    return airgap_cache_dir("wheels")


def build_flags(project: str) -> dict[str, str]:
    """Environment variables that shape the build of `project`; part of the cache key."""
    if canonicalize_name(project) == "llama-cpp-python":
        return {"CMAKE_ARGS": LLAMA_CMAKE_ARGS}
    return {}


def builder_platform() -> str:
    """The platform tag of a wheel compiled here, e.g. linux_x86_64."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def builder_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cache_key(project: str, version: str, sdist_sha256: str, flags: Mapping[str, str]) -> str:
    """Name of the cache entry: readable prefix, then a digest of every input that changes the wheel."""
    inputs = {
        "project": canonicalize_name(project),
        "version": version,
        "sdist_sha256": sdist_sha256,
        "implementation": sys.implementation.name,
        "python": builder_python(),
        "platform": builder_platform(),
        "flags": dict(sorted(flags.items())),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"{canonicalize_name(project)}-{version}-{digest}"


def cached_wheel(cache_dir: Path, key: str) -> BuiltWheel | None:
    """The wheel built earlier under `key`, if its bytes still match what the build recorded."""
    entry = cache_dir / key
    try:
        record = json.loads((entry / BUILD_RECORD).read_text(encoding="utf-8"))
        path = entry / record["wheel"]
        recorded_sha256 = record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not path.is_file():
        return None
    digest = digest_file(path)
    if digest.sha256 != recorded_sha256:
        raise ResolveError(f"expected cached {path} with sha256 {recorded_sha256}, found {digest.sha256}")
    return BuiltWheel(path, digest.sha256, digest.size, key, record["flags"], 0.0, cached=True)


def build_wheel(
    sdist: Path,
    *,
    project: str,
    version: str,
    sdist_sha256: str,
    cache_dir: Path,
    pip_options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    progress: bool = True,
) -> BuiltWheel:
    """Return the cached wheel for this sdist, or compile it with `pip wheel --no-deps` and cache it.

    `pip_options` say where the build dependencies come from (index, find-links); `env` is pip's environment.
    """
    flags = build_flags(project) if flags is None else dict(flags)
    key = cache_key(project, version, sdist_sha256, flags)
    found = cached_wheel(cache_dir, key)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache_dir) as staging:
        entry = Path(staging) / "entry"
        entry.mkdir()
        if progress:
            shown = " ".join(f"{k}={v}" for k, v in flags.items()) or "default flags"
            print(f"building {project} {version} from source with {shown}, once per cache key", file=sys.stderr)
        started = time.monotonic()
        clean = {k: v for k, v in (env or os.environ).items() if k not in _BUILD_ENV_DROPPED}
        _compile(sdist, entry, pip_options, {**clean, **flags}, progress)
        seconds = time.monotonic() - started
        wheel = _single_wheel(entry, project, version)
        digest = digest_file(wheel)
        record = {
            "project": canonicalize_name(project),
            "version": version,
            "sdist": sdist.name,
            "sdist_sha256": sdist_sha256,
            "python": builder_python(),
            "platform": builder_platform(),
            "flags": dict(flags),
            "wheel": wheel.name,
            "sha256": digest.sha256,
            "seconds": round(seconds, 1),
        }
        (entry / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _publish(entry, cache_dir / key)
    built = cached_wheel(cache_dir, key)
    if built is None:
        raise ResolveError(f"expected a built wheel in {cache_dir / key}, found none")
    return BuiltWheel(built.path, built.sha256, built.size, key, built.flags, seconds, cached=False)


def _compile(sdist: Path, into: Path, pip_options: Sequence[str], env: Mapping[str, str], progress: bool) -> None:
    # --no-cache-dir: pip's own wheel cache is keyed by URL only and would hand back a build made with other flags
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"]
    command += ["--no-input", "-w", str(into), *pip_options, str(sdist)]
    result = subprocess.run(
        command,
        env=dict(env),
        stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise ResolveError(f"expected pip to build a wheel from {sdist.name}, it failed: {tail[0].strip()}")


def _single_wheel(folder: Path, project: str, version: str) -> Path:
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ResolveError(f"expected one wheel from building {project} {version}, found {len(wheels)}")
    name, built_version, _, _ = parse_wheel_filename(wheels[0].name)
    if name != canonicalize_name(project) or str(built_version) != version:
        raise ResolveError(f"expected a wheel of {project} {version}, the build produced {wheels[0].name}")
    return wheels[0]


def _publish(entry: Path, final: Path) -> None:
    """Move a finished entry into place in one rename; a concurrent build that won keeps its entry."""
    try:
        entry.rename(final)
    except OSError:
        if not (final / BUILD_RECORD).is_file():
            shutil.rmtree(final, ignore_errors=True)
            entry.rename(final)
