"""What the engine's GPU backends (CUDA, Vulkan) share: one loadable ggml library compiled from the same pinned
sdist as llama-server, cached under a key with a record of what went into it, and the libraries it needs from
outside the engine carried beside it.

The CPU engine (airgap.build.sources.engine) is built with GGML_BACKEND_DL: llama-server loads every libggml-*.so
lying in its folder. A backend build compiles only its `ggml-<name>` target of the same sources with the same
defines plus its own, so the library drops into that folder and speaks the same ggml ABI.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from airgap.build.sources.engine import (
    BUILD_RECORD,
    CARRIED_RUNTIME,
    EngineFile,
    _extract_vendor,
    build_lock,
    builder_target,
    read_elf,
)
from airgap.errors import ResolveError
from airgap.streams.pipeline import digest_file

GLIBC = frozenset(
    {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"}
)
# What the CPU engine folder already holds, where a backend library is put: ggml's base library (by its soname,
# libggml-base.so.0) and the compiler runtime. The builder checks these are among the engine's files.
ENGINE_LIBRARY_PREFIX = "libggml-base.so"


@dataclass(frozen=True)
class BuiltBackend:
    """A backend library and what it carries, as they lie in the cache."""

    folder: Path
    files: tuple[EngineFile, ...]
    cache_key: str
    record: Mapping[str, object]
    cached: bool


@dataclass(frozen=True)
class BackendBuild:
    """One backend's compile: its name, how it compiles and what it copies out of the build folder.

    `compile(source, build, progress)` runs cmake and returns whether it ran offline and what it checked of the
    toolchain it used (recorded); `collect(build, into)` copies the files and returns their names.
    """

    project: str  # "ggml-cuda"
    announce: str  # the progress line before a compile
    compile: Callable[[Path, Path, bool], tuple[bool, Mapping[str, object]]]
    collect: Callable[[Path, Path], list[str]]
    record: Mapping[str, object] = field(default_factory=dict)  # its defines, toolchain pins, ...


def cached_backend(cache_dir: Path, key: str) -> BuiltBackend | None:
    """The backend built earlier under `key`, if every file still matches what the build recorded."""
    folder = cache_dir / key
    try:
        record = json.loads((folder / BUILD_RECORD).read_text(encoding="utf-8"))
        recorded = dict(record["files"])
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
    return BuiltBackend(folder / "files", tuple(files), key, record, cached=True)


def build_backend(sdist: Path, build: BackendBuild, key: str, *, version: str, sdist_sha256: str,
                  cache_dir: Path, progress: bool) -> BuiltBackend:
    """Return the cached backend, or compile it once under a lock on its key."""
    found = cached_backend(cache_dir, key)
    if found is not None:
        return found
    with build_lock(cache_dir, key):
        # another process may have finished this very build while this one waited for the lock
        found = cached_backend(cache_dir, key)
        if found is not None:
            return found
        return _build(sdist, build, key, version=version, sdist_sha256=sdist_sha256, cache_dir=cache_dir,
                      progress=progress)


def _build(sdist: Path, build: BackendBuild, key: str, *, version: str, sdist_sha256: str, cache_dir: Path,
           progress: bool) -> BuiltBackend:
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise ResolveError(f"expected {tool} on PATH to build {build.project}, found none")
    work = cache_dir / f".work-{key}"
    work.mkdir(parents=True, exist_ok=True)
    source = _extract_vendor(sdist, work / "src")
    if progress:
        print(build.announce, file=sys.stderr)
    # a retry after a failure resumes the compile: the record counts the seconds of every attempt
    spent = work / "seconds"
    earlier = float(spent.read_text(encoding="utf-8")) if spent.is_file() else 0.0
    started = time.monotonic()
    try:
        offline, checked = build.compile(source, work / "build", progress)
    finally:
        spent.write_text(f"{earlier + time.monotonic() - started:.1f}\n", encoding="utf-8")
    seconds = float(spent.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache_dir) as staging:
        entry = Path(staging) / "entry"
        (entry / "files").mkdir(parents=True)
        names = build.collect(work / "build", entry / "files")
        record = {
            "project": build.project,
            "version": version,
            "sdist": sdist.name,
            "sdist_sha256": sdist_sha256,
            "target": builder_target(),
            **build.record,
            **checked,
            "built_offline": offline,
            "seconds": round(seconds, 1),
            "files": {n: digest_file(entry / "files" / n).sha256 for n in names},
        }
        (entry / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        final = cache_dir / key
        shutil.rmtree(final, ignore_errors=True)
        entry.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    built = cached_backend(cache_dir, key)
    if built is None:
        raise ResolveError(f"expected a built {build.project} in {cache_dir / key}, found none")
    return BuiltBackend(built.folder, built.files, key, built.record, cached=False)


def check_needs(folder: Path, names: Iterable[str], allowed: Iterable[str]) -> None:
    """Each of `names` in `folder` needs only glibc, the engine's libraries, the others and `allowed`."""
    names = list(names)
    permitted = GLIBC | set(CARRIED_RUNTIME) | set(allowed) | set(names)
    for name in names:
        leftover = [n for n in read_elf(folder / name).needed
                    if n not in permitted and not n.startswith(ENGINE_LIBRARY_PREFIX)]
        if leftover:
            raise ResolveError(f"expected {name} to need only glibc, the engine's and carried libraries, "
                               f"it needs {leftover}")


def copy_backend_library(bin_dir: Path, name: str, into: Path) -> None:
    """Copy the backend library out of the build; its RUNPATH must be exactly $ORIGIN (what it carries is there)."""
    found = bin_dir / name
    if not found.is_file():
        raise ResolveError(f"expected {name} in the build output {bin_dir}, found none")
    shutil.copyfile(found.resolve(), into / name)
    elf = read_elf(into / name)
    if elf.runpath != "$ORIGIN":
        raise ResolveError(f"expected RUNPATH exactly $ORIGIN in {name}, found {elf.runpath!r}")


def engine_needs(built: BuiltBackend, host_provided: Iterable[str] = ()) -> set[str]:
    """What the backend's files need from the CPU engine's folder (ggml's base library, the compiler runtime)."""
    carried = {f.name for f in built.files}
    outside = GLIBC | set(host_provided)
    return {n for f in built.files for n in read_elf(f.path).needed if n not in carried and n not in outside}


def built_source(built: BuiltBackend) -> dict[str, str]:
    """What the manifest records for every backend file: the sdist, the cache key, the defines and build time;
    each backend adds its toolchain."""
    record = built.record
    defines = record.get("defines", {})
    if not isinstance(defines, dict):
        raise ResolveError(f"expected the build record's defines as a table, found {type(defines).__name__}")
    return {
        "type": "built",
        "from": str(record.get("sdist", "")),
        "sdist_sha256": str(record.get("sdist_sha256", "")),
        "cache_key": built.cache_key,
        "cmake_defines": " ".join(f"{k}={v}" for k, v in sorted(defines.items())),
        "build_seconds": str(record.get("seconds", "")),
    }
