"""Compile llama.cpp's own server (`llama-server`) from the llama-cpp-python sdist, once per cache key.

The llama-cpp-python sdist vendors llama.cpp (vendor/llama.cpp, with tools/server). airgap builds the server
from those very sources, so the engine and the Python binding in a bundle are the same code. The build is made
portable the way llama.cpp's releases are: ggml's CPU code is a set of loadable libraries, one per x86-64
feature level, and ggml picks the best one the host supports at start (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS).

Things the build takes care of (each checked after the build, the build fails otherwise):
- no network: the web UI is neither built nor downloaded; as root the whole cmake run happens inside a fresh
  network namespace (`unshare -n`) that has no interface at all;
- RUNPATH is exactly `$ORIGIN` (CMake's default `$ORIGIN:` has an empty entry: the loader would search the
  current directory);
- nothing outside glibc is needed from the host: libstdc++, libgcc_s and libgomp travel beside the binary;
- no OpenSSL;
- the `sapphirerapids` variant is left out: on Xeons that report AMX it is chosen and dies with an illegal
  instruction on its first computation (an open upstream bug).

A build for one known host (`build --target`, or the spec's `[engine] cpu_variants`) compiles only the variants
it names, plus x64, which every x86-64 CPU runs: a fraction of the compile.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from airgap.build.sources.llama import airgap_cache_dir
from airgap.build.sources.wheels import Pin, Pip
from airgap.errors import ResolveError
from airgap.hardware.target import GGML_CPU_VARIANTS, with_baseline
from airgap.streams.pipeline import digest_file

ENGINE_BINARY = "llama-server"
# Built beside the server for the builder's own use (converting safetensors at build time); never packed.
QUANTIZE_BINARY = "llama-quantize"
BUILD_RECORD = "engine.json"
LAYOUT_VERSION = 2  # bump when what is copied out of a finished compile changes

# Every x86-64 CPU variant of the vendored ggml except sapphirerapids (see the module docstring).
CPU_VARIANTS = tuple(GGML_CPU_VARIANTS)

CMAKE_DEFINES: Mapping[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "ON",
    "GGML_NATIVE": "OFF",
    "GGML_BACKEND_DL": "ON",
    "GGML_CPU_ALL_VARIANTS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "CMAKE_BUILD_WITH_INSTALL_RPATH": "ON",
    "CMAKE_INSTALL_RPATH": "$ORIGIN",
}

# Libraries every glibc system has; anything else the engine needs must travel with it.
_HOST_LIBRARIES = frozenset(
    {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"}
)
# Compiler runtime carried beside the binary, so a host with an older libstdc++ runs it.
CARRIED_RUNTIME = ("libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1")
_JOBS = "2"


@dataclass(frozen=True)
class EngineFile:
    name: str  # file name inside the engine folder
    path: Path  # where it lies in the cache
    sha256: str
    size: int


@dataclass(frozen=True)
class BuiltEngine:
    """llama-server and the libraries it loads, as they lie in the cache."""

    folder: Path
    files: tuple[EngineFile, ...]
    cache_key: str
    record: Mapping[str, object]  # what shaped it: sdist, flags, variants, glibc floor, seconds
    cached: bool
    # tools/ of the cache entry: llama-quantize, with links to the libraries in files/ ($ORIGIN finds them)
    tools: Path | None = None

    @property
    def quantize(self) -> Path:
        if self.tools is None or not (self.tools / QUANTIZE_BINARY).is_file():
            raise ResolveError(f"expected {QUANTIZE_BINARY} in the engine cache entry {self.folder.parent}, "
                               "found none")
        return self.tools / QUANTIZE_BINARY


def default_cache_dir() -> Path:
    return airgap_cache_dir("engine")


def builder_target() -> str:
    return f"{sys.platform}-{os.uname().machine}"


def chosen_variants(names: Sequence[str]) -> tuple[str, ...]:
    """`names` and x64, in ggml's order; every name must be one of CPU_VARIANTS."""
    unknown = sorted(set(names) - set(CPU_VARIANTS))
    if unknown:
        raise ResolveError(f"expected CPU variants among {', '.join(CPU_VARIANTS)}, found {', '.join(unknown)}")
    return with_baseline(names)


def cache_key(version: str, sdist_sha256: str, variants: Sequence[str] = CPU_VARIANTS) -> str:
    inputs = {
        "project": "llama-server",
        "version": version,
        "sdist_sha256": sdist_sha256,
        "target": builder_target(),
        "defines": dict(sorted(CMAKE_DEFINES.items())),
        "variants": list(variants),
        "layout": LAYOUT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"llama-server-{version}-{digest}"


def cached_engine(cache_dir: Path, key: str) -> BuiltEngine | None:
    """The engine built earlier under `key`, if every file still matches what the build recorded."""
    folder = cache_dir / key
    try:
        record = json.loads((folder / BUILD_RECORD).read_text(encoding="utf-8"))
        recorded = dict(record["files"])
        tools = dict(record.get("tools", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = []
    for name, sha256 in sorted(recorded.items()):
        path = folder / "files" / name
        if not path.is_file():
            return None
        digest = digest_file(path)
        if digest.sha256 != sha256:
            raise ResolveError(f"expected cached {path} with sha256 {sha256}, found {digest.sha256}")
        files.append(EngineFile(name, path, digest.sha256, digest.size))
    for name, sha256 in sorted(tools.items()):
        path = folder / "tools" / name
        if not path.is_file():
            return None
        found = digest_file(path).sha256
        if found != sha256:
            raise ResolveError(f"expected cached {path} with sha256 {sha256}, found {found}")
    return BuiltEngine(folder / "files", tuple(files), key, record, cached=True,
                       tools=folder / "tools" if tools else None)


@contextlib.contextmanager
def build_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on `<cache>/<key>.lock`: builds of one key share `.work-<key>`, so they take turns.

    The lock is released by the kernel when the process dies, so a crashed build never leaves it held.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.lock"
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_engine(
    sdist: Path, *, version: str, sdist_sha256: str, cache_dir: Path, variants: Sequence[str] = CPU_VARIANTS,
    progress: bool = True,
) -> BuiltEngine:
    """Return the cached engine for this sdist and these CPU variants, or compile it and cache it (about 20
    minutes on 2 cores for every variant, about 0.6x that for one host's and x64)."""
    variants = chosen_variants(variants)
    key = cache_key(version, sdist_sha256, variants)
    found = cached_engine(cache_dir, key)
    if found is not None:
        return found
    with build_lock(cache_dir, key):
        # another process may have finished this very build while this one waited for the lock
        found = cached_engine(cache_dir, key)
        if found is not None:
            return found
        return _build_engine(sdist, key, version=version, sdist_sha256=sdist_sha256, cache_dir=cache_dir,
                             variants=variants, progress=progress)


def _build_engine(
    sdist: Path, key: str, *, version: str, sdist_sha256: str, cache_dir: Path, variants: Sequence[str],
    progress: bool,
) -> BuiltEngine:
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise ResolveError(f"expected {tool} on PATH to build llama-server, found none")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # the compile folder survives a failed attempt, so that a retry only redoes what is missing
    work = cache_dir / f".work-{key}"
    work.mkdir(exist_ok=True)
    source = _extract_vendor(sdist, work / "src")
    if progress:
        print(f"building llama-server {version} from {sdist.name} with CPU variants {', '.join(variants)} "
              f"(once per cache key; minutes)", file=sys.stderr)
    started = time.monotonic()
    offline = _compile(source, work / "build", variants, progress)
    seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache_dir) as staging:
        entry = Path(staging) / "entry"
        (entry / "files").mkdir(parents=True)
        names = _collect(work / "build" / "bin", entry / "files", variants)
        tools = _collect_tools(work / "build" / "bin", entry, names)
        floor = glibc_floor([entry / "files" / n for n in names])
        record = {
            "project": "llama-server",
            "version": version,
            "sdist": sdist.name,
            "sdist_sha256": sdist_sha256,
            "target": builder_target(),
            "defines": dict(CMAKE_DEFINES),
            "variants": list(variants),
            "glibc_floor": floor,
            "built_offline": offline,
            "seconds": round(seconds, 1),
            "files": {n: digest_file(entry / "files" / n).sha256 for n in names},
            "tools": {n: digest_file(entry / "tools" / n).sha256 for n in tools},
        }
        (entry / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        final = cache_dir / key
        try:
            entry.rename(final)
        except OSError:
            if not (final / BUILD_RECORD).is_file():
                shutil.rmtree(final, ignore_errors=True)
                entry.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    built = cached_engine(cache_dir, key)
    if built is None:
        raise ResolveError(f"expected a built engine in {cache_dir / key}, found none")
    return BuiltEngine(built.folder, built.files, key, built.record, cached=False, tools=built.tools)


def _extract_vendor(sdist: Path, into: Path) -> Path:
    """Unpack only vendor/llama.cpp of the sdist (regular files and folders, no links out)."""
    marker = into / ".complete"
    if marker.is_file():
        return into
    shutil.rmtree(into, ignore_errors=True)
    extract_vendor(sdist, into, lambda inner: True)
    if not (into / "tools" / "server" / "CMakeLists.txt").is_file():
        raise ResolveError(f"expected vendor/llama.cpp/tools/server in {sdist.name}, found none")
    marker.write_text("ok\n", encoding="utf-8")
    return into


def extract_vendor(sdist: Path, into: Path, wanted: Callable[[str], bool]) -> None:
    """Unpack the regular files and folders of vendor/llama.cpp in the sdist whose path there is `wanted`."""
    into.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = []
            for member in archive.getmembers():
                parts = member.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                    continue
                member.name = parts[1].removeprefix("vendor/llama.cpp/")
                if (member.isfile() or member.isdir()) and wanted(member.name):
                    members.append(member)
            archive.extractall(into, members=members, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise ResolveError(f"expected a llama-cpp-python sdist with vendor/llama.cpp at {sdist}, found {exc}") from exc


def offline_prefix() -> tuple[list[str], bool]:
    """As root, run in a new network namespace with no interface: the build cannot reach anything."""
    if os.geteuid() == 0 and shutil.which("unshare") is not None:
        return ["unshare", "-n"], True
    return [], False


def _compile(source: Path, build: Path, variants: Sequence[str], progress: bool) -> bool:
    prefix, offline = offline_prefix()
    defines = [f"-D{k}={v}" for k, v in CMAKE_DEFINES.items()]
    env = {k: v for k, v in os.environ.items() if k not in {"CFLAGS", "CXXFLAGS", "LDFLAGS", "CMAKE_ARGS"}}
    targets = [ENGINE_BINARY, QUANTIZE_BINARY, *(f"ggml-cpu-{v}" for v in variants)]
    steps = [
        [*prefix, "cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *defines],
        [*prefix, "cmake", "--build", str(build), "-j", _JOBS, "--target", *targets],
    ]
    run_build_steps(steps, env, len(prefix), "llama-server", progress)
    return offline


def run_build_steps(steps: Sequence[Sequence[str]], env: Mapping[str, str], prefix_length: int, what: str,
                    progress: bool) -> None:
    """Run cmake steps in order; the first that fails stops the build with one line: its last errors."""
    for step in steps:
        code, errors = run_build_step(step, env, progress)
        if code != 0:
            tail = [line.strip() for line in errors.splitlines() if line.strip()][-3:] or ["no output"]
            command = " ".join(step[prefix_length:prefix_length + 2])
            raise ResolveError(f"expected {command} to succeed building {what}, it failed: {' | '.join(tail)}")


def run_build_step(step: Sequence[str], env: Mapping[str, str], progress: bool) -> tuple[int, str]:
    """Run one cmake step; return its exit status and its stderr. With `progress`, show ninja's count of build
    steps done every 5 % or so, not the compiler's lines (a build of llama-server writes over 100,000)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errors:
        process = subprocess.Popen(step, env=env, stdout=subprocess.PIPE if progress else subprocess.DEVNULL,
                                   stderr=errors, text=True, errors="replace")
        shown = -1
        for line in process.stdout or ():
            counted = re.match(r"\[(\d+)/(\d+)\]", line)
            if counted and int(counted[1]) * 20 // int(counted[2]) > shown:
                shown = int(counted[1]) * 20 // int(counted[2])
                print(f"  {counted[1]}/{counted[2]} build steps", file=sys.stderr)
        code = process.wait()
        errors.seek(0)
        return code, errors.read()


def _collect(bin_dir: Path, into: Path, variants: Sequence[str]) -> list[str]:
    """Copy llama-server, the libraries it needs and its CPU variants into `into`; check each one."""
    copied = _copy_needed(bin_dir, into, [ENGINE_BINARY, *(f"libggml-cpu-{v}.so" for v in variants)],
                          CARRIED_RUNTIME)
    for name in CARRIED_RUNTIME:
        shutil.copyfile(compiler_library(name), into / name)
        copied.append(name)
    for name in copied:
        leftover = [n for n in read_elf(into / name).needed if n not in _HOST_LIBRARIES and n not in copied]
        if leftover:
            raise ResolveError(f"expected {name} to need only glibc and carried libraries, it needs {leftover}")
    return sorted(copied)


def _collect_tools(bin_dir: Path, entry: Path, engine_files: Sequence[str]) -> list[str]:
    """Copy llama-quantize and the libraries only it needs into `entry/tools`; link the engine's libraries beside it.

    Returns the names copied (the ones the build record hashes); `$ORIGIN` finds both kinds at run time.
    """
    tools = entry / "tools"
    tools.mkdir()
    copied = _copy_needed(bin_dir, tools, [QUANTIZE_BINARY], engine_files)
    (tools / QUANTIZE_BINARY).chmod(0o755)
    for name in engine_files:
        if name != ENGINE_BINARY:
            (tools / name).symlink_to(Path("..") / "files" / name)
    return sorted(copied)


def _copy_needed(bin_dir: Path, into: Path, wanted: list[str], elsewhere: Sequence[str]) -> list[str]:
    """Copy `wanted` and every library they need (but glibc's and `elsewhere`) from the build output; each one's
    RUNPATH must be exactly `$ORIGIN`."""
    copied: list[str] = []
    while wanted:
        name = wanted.pop()
        if name in copied or name in elsewhere:
            continue
        found = bin_dir / name
        if not found.exists():
            raise ResolveError(f"expected {name} in the llama-server build output {bin_dir}, found none")
        shutil.copyfile(found.resolve(), into / name)
        copied.append(name)
        elf = read_elf(into / name)
        if elf.runpath != "$ORIGIN":
            raise ResolveError(f"expected RUNPATH exactly $ORIGIN in {name}, found {elf.runpath!r}")
        wanted += [n for n in elf.needed if n not in _HOST_LIBRARIES]
    return copied


def compiler_library(name: str) -> Path:
    """The file of a compiler runtime library (libstdc++.so.6 and the like) the build linked against."""
    result = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True)
    path = Path(result.stdout.strip())
    if result.returncode != 0 or not path.is_absolute() or not path.is_file():
        raise ResolveError(f"expected gcc to know where {name} lies, found {result.stdout.strip()!r}")
    return path.resolve()


@dataclass(frozen=True)
class ElfInfo:
    needed: tuple[str, ...]
    runpath: str | None


def read_elf(path: Path) -> ElfInfo:
    """DT_NEEDED and DT_RUNPATH/DT_RPATH of an ELF file, read with readelf (binutils, beside the compiler)."""
    result = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ResolveError(f"expected an ELF file at {path}, readelf says: {result.stderr.strip()[:200]}")
    needed = tuple(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", result.stdout))
    runpath = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[([^\]]*)\]", result.stdout)
    return ElfInfo(needed, runpath.group(1) if runpath else None)


def glibc_floor(paths: Sequence[Path]) -> str:
    """The newest GLIBC_x.y symbol version any of the files asks for: the oldest glibc they run on."""
    newest = (2, 0)
    for path in paths:
        for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", path.read_bytes()):
            newest = max(newest, (int(major), int(minor)))
    return f"{newest[0]}.{newest[1]}"


def engine_for(
    sdist: Pin, pip: Pip, *, cache_dir: Path, variants: Sequence[str] = CPU_VARIANTS, progress: bool = True
) -> BuiltEngine:
    """The engine built from the pinned sdist: from the cache, or downloaded by hash and compiled once."""
    found = cached_engine(cache_dir, cache_key(sdist.version, sdist.sha256, chosen_variants(variants)))
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="airgap-engine-sdist-") as work:
        path = pip.download_sdist(sdist, Path(work) / "sdist")
        return build_engine(path, version=sdist.version, sdist_sha256=sdist.sha256, cache_dir=cache_dir,
                            variants=variants, progress=progress)


def manifest_source(engine: BuiltEngine) -> dict[str, str]:
    """What the manifest records for each engine file: where it came from and what shaped it."""
    record = engine.record
    defines = record.get("defines", {})
    assert isinstance(defines, dict)
    variants = record.get("variants", [])
    assert isinstance(variants, list)
    return {
        "type": "built",
        "from": str(record.get("sdist", "")),
        "sdist_sha256": str(record.get("sdist_sha256", "")),
        "cache_key": engine.cache_key,
        "cmake_defines": " ".join(f"{k}={v}" for k, v in sorted(defines.items())),
        "variants": " ".join(str(v) for v in variants),
        "glibc_floor": str(record.get("glibc_floor", "")),
    }
