"""Resolve Python requirements into binary wheels for the target host, pinned by hash in a lock file.

pip does the resolving, as a subprocess (`sys.executable -m pip`): `install --dry-run --report` learns the full
dependency set for the target interpreter and platform with URLs and hashes, then `download --require-hashes`
fetches exactly those bytes. A project pip finds only as a source distribution is compiled here (see
airgap.build.sources.llama) when the target matches this builder, and refused otherwise.

The lock file is TOML: it records what was asked (requirements, target) and, per project, the one file chosen
with its SHA-256 and URL. A build with a lock asks pip for exactly those hashes, so a registry that now serves
other bytes is refused; a source distribution is pinned by the hash of the sdist, since compilers do not give
byte-identical wheels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from airgap.build.sources import llama
from airgap.errors import ResolveError
from airgap.streams.pipeline import digest_file

LOCK_VERSION = 1

# Environment variables that configure pip but do not choose where packages come from: they survive isolation.
_PIP_ENV_KEPT = frozenset({"PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CACHE_DIR"})


@dataclass(frozen=True)
class ResolvedWheel:
    """One wheel of the resolved set, as it lies in `dest`."""

    name: str
    version: str
    filename: str
    path: Path
    size: int
    sha256: str
    source: Mapping[str, str]


@dataclass(frozen=True)
class Pin:
    """One file the resolution chose: exact project, version, file and hash, and the URL it was found at."""

    name: str
    version: str
    filename: str
    sha256: str
    url: str

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


@dataclass(frozen=True)
class Target:
    """The interpreter and platforms the wheels are for; None and () mean this builder's own."""

    python_version: str | None = None
    platforms: tuple[str, ...] = ()

    @classmethod
    def of(cls, python_version: str | None, platforms: Sequence[str]) -> Target:
        if python_version is not None and re.fullmatch(r"3\.\d+", python_version) is None:
            raise ResolveError(f"expected a python_version like '3.11', found {python_version!r}")
        if python_version == llama.builder_python() and not platforms:
            python_version = None
        return cls(python_version, tuple(platforms))

    @property
    def is_builder(self) -> bool:
        """Whether a wheel compiled here runs on the target: same Python, platforms this host supports."""
        if self.python_version not in (None, llama.builder_python()):
            return False
        supported = {tag.platform for tag in sys_tags()}
        return all(platform in supported for platform in self.platforms)

    def pip_args(self, extra_platforms: Sequence[str] = ()) -> list[str]:
        """pip options choosing binary wheels for this target (and for `extra_platforms` too)."""
        if self.python_version is None and not self.platforms:
            return ["--only-binary", ":all:"]
        version = self.python_version or llama.builder_python()
        args = ["--python-version", version, "--implementation", "cp", "--abi", "cp" + version.replace(".", "")]
        for platform in (*compatible_platforms(self.platforms), *extra_platforms):
            args += ["--platform", platform]
        return [*args, "--only-binary", ":all:"]

    def describe(self) -> str:
        python = self.python_version or llama.builder_python()
        return f"python {python} on {', '.join(self.platforms) or 'this builder platform'}"


_LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
_OLDEST_GLIBC = {"x86_64": 5, "i686": 5}  # other architectures start at manylinux_2_17


def compatible_platforms(platforms: Sequence[str]) -> list[str]:
    """Each platform tag with every older tag it runs, newest first: pip does not expand manylinux_2_28 itself,
    and would otherwise reject the many wheels tagged only manylinux2014 / manylinux_2_17."""
    expanded: list[str] = []
    for platform in platforms:
        for tag in _older_tags(platform):
            if tag not in expanded:
                expanded.append(tag)
    return expanded


def _older_tags(platform: str) -> list[str]:
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
    if legacy is not None:
        platform = f"manylinux_2_{_LEGACY_MANYLINUX[legacy.group(1)]}_{legacy.group(2)}"
    if (match := re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)) is not None:
        newest, arch = int(match.group(1)), match.group(2)
        tags = []
        for minor in range(newest, _OLDEST_GLIBC.get(arch, 17) - 1, -1):
            tags.append(f"manylinux_2_{minor}_{arch}")
            tags += [f"{alias}_{arch}" for alias, aliased in _LEGACY_MANYLINUX.items() if aliased == minor]
        return tags
    if (match := re.fullmatch(r"musllinux_1_(\d+)_(\w+)", platform)) is not None:
        return [f"musllinux_1_{minor}_{match.group(2)}" for minor in range(int(match.group(1)), -1, -1)]
    return [platform]


def builder_description() -> str:
    return f"python {llama.builder_python()} on {llama.builder_platform()}"


@dataclass(frozen=True)
class Lock:
    """What a resolution was asked for and the exact files it chose."""

    requirements: tuple[str, ...]
    target: Target
    pins: tuple[Pin, ...]


def resolve_wheels(
    requirements: Sequence[str],
    *,
    dest: Path,
    find_links: Sequence[Path] = (),
    index_url: str | None = None,
    no_index: bool = False,
    python_version: str | None = None,
    platforms: Sequence[str] = (),
    lock_path: Path | None = None,
    upgrade: bool = False,
    build_cache: Path | None = None,
    progress: bool = True,
) -> list[ResolvedWheel]:
    """Resolve `requirements` to wheels for the target in `dest`, each with its hash and origin, sorted by name.

    With an existing `lock_path` (and no `upgrade`) exactly the locked files are used; otherwise pip resolves
    afresh and the lock is (re)written.
    """
    target = Target.of(python_version, platforms)
    wanted = tuple(r.strip() for r in requirements if r.strip())
    lock = read_lock(lock_path) if lock_path is not None and lock_path.exists() and not upgrade else None
    if lock is not None:
        _check_lock_matches(lock, wanted, target, lock_path)
    if not wanted:
        return []
    pip = Pip(find_links=tuple(find_links), index_url=index_url, no_index=no_index, progress=progress)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="airgap-pip-") as work:
        session = Session(pip, target, Path(work), build_cache or llama.default_cache_dir(), progress)
        pins = session.relocate(lock.pins) if lock is not None else session.resolve(wanted)
        wheels = session.fetch(pins, dest)
    if lock_path is not None and lock is None:
        write_lock(lock_path, Lock(wanted, target, tuple(pins)), wheels)
    return sorted(wheels, key=lambda w: w.name)


@dataclass
class Session:
    """One resolution: pip, the target, a scratch folder, and the wheels compiled along the way."""

    pip: Pip
    target: Target
    work: Path
    cache_dir: Path
    progress: bool
    built: dict[str, llama.BuiltWheel] = field(default_factory=dict)  # keyed by sdist file name

    def resolve(self, requirements: Sequence[str]) -> list[Pin]:
        """Pins for the whole dependency set; a project compiled here is pinned by its sdist."""
        links = self.work / "built"
        links.mkdir()
        sdists: dict[str, Pin] = {}  # built wheel file name -> the sdist it came from
        while True:
            extra = [llama.builder_platform()] if sdists and self.target.platforms else []
            try:
                pins = self.pip.report(requirements, self.target.pip_args(extra), self.work, [links] if sdists else [])
            except PipFailed as failure:
                if failure.missing is None:
                    raise
                sdist = self._sdist_for(failure.missing, already=sdists.values())
                wheel = self.build(sdist)
                shutil.copyfile(wheel.path, links / wheel.path.name)
                sdists[wheel.path.name] = sdist
                continue
            return [sdists.get(pin.filename, pin) for pin in pins]

    def relocate(self, locked: Sequence[Pin]) -> list[Pin]:
        """The locked pins with the URLs pip finds them at today; pip refuses any other bytes."""
        wheels = [pin for pin in locked if pin.is_wheel]
        found = {pin.filename: pin for pin in self.pip.report_pinned(wheels, self.target.pip_args(), self.work)}
        missing = [pin.filename for pin in wheels if pin.filename not in found]
        if missing:
            raise ResolveError(f"expected the locked files {', '.join(missing)}, pip chose others for this target")
        return [found.get(pin.filename, pin) for pin in locked]

    def fetch(self, pins: Sequence[Pin], dest: Path) -> list[ResolvedWheel]:
        """Put the wheel of every pin into `dest`: downloaded by hash, or compiled from its pinned sdist."""
        wheels = [pin for pin in pins if pin.is_wheel]
        files = self.pip.download(wheels, self.target.pip_args(), self.work / "download") if wheels else {}
        placed = [_place(pin, files[pin.filename], dest, self.pip.describe(pin.url)) for pin in wheels]
        return placed + [self._place_built(pin, dest) for pin in pins if not pin.is_wheel]

    def build(self, sdist: Pin) -> llama.BuiltWheel:
        """The wheel compiled from `sdist`, from the cache when this exact build was done before."""
        if sdist.filename in self.built:
            return self.built[sdist.filename]
        if not self.target.is_builder:
            raise ResolveError(
                f"{sdist.name} {sdist.version} is available only as source ({sdist.filename}) and the target "
                f"({self.target.describe()}) differs from this builder ({builder_description()}); "
                f"build the bundle on a host matching the target, or add a wheel for the target to find_links"
            )
        flags = llama.build_flags(sdist.name)
        key = llama.cache_key(sdist.name, sdist.version, sdist.sha256, flags)
        wheel = llama.cached_wheel(self.cache_dir, key)
        if wheel is None:
            path = self.pip.download_sdist(sdist, self.work / "sdist")
            wheel = llama.build_wheel(
                path,
                project=sdist.name,
                version=sdist.version,
                sdist_sha256=sdist.sha256,
                cache_dir=self.cache_dir,
                pip_options=self.pip.source_args(),
                env=self.pip.environment(),
                flags=flags,
                progress=self.progress,
            )
        self.built[sdist.filename] = wheel
        return wheel

    def _sdist_for(self, requirement: str, already: Collection[Pin]) -> Pin:
        if not self.target.is_builder:
            raise ResolveError(
                f"no wheel satisfies {requirement} for the target ({self.target.describe()}); airgap compiles "
                f"source-only packages only when the target matches this builder ({builder_description()}): "
                f"build the bundle on such a host, or add a wheel for the target to find_links"
            )
        try:
            sdist = self.pip.report_sdist(requirement, self.work)
        except PipFailed as failure:
            if failure.missing is None:
                raise
            raise ResolveError(
                f"no distribution satisfies {requirement}: no wheel for the target ({self.target.describe()}) "
                f"and no source distribution to build"
            ) from failure
        if any(pin.name == sdist.name for pin in already):
            raise ResolveError(f"built {sdist.filename} from source, yet pip finds no wheel satisfying {requirement}")
        return sdist

    def _place_built(self, sdist: Pin, dest: Path) -> ResolvedWheel:
        wheel = self.build(sdist)
        target = dest / wheel.path.name
        shutil.copyfile(wheel.path, target)
        digest = digest_file(target)
        if digest.sha256 != wheel.sha256:
            raise ResolveError(f"expected {target} with sha256 {wheel.sha256}, found {digest.sha256}")
        source = {
            "type": "built",
            "from": sdist.filename,
            "sdist_sha256": sdist.sha256,
            "sdist_url": sdist.url,
            "cache_key": wheel.cache_key,
            **{key.lower(): value for key, value in wheel.flags.items()},
        }
        return ResolvedWheel(sdist.name, sdist.version, target.name, target, digest.size, digest.sha256, source)


class PipFailed(ResolveError):
    """pip exited with an error; `missing` names the requirement it found no distribution for, if that was it."""

    def __init__(self, message: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Pip:
    """pip as a subprocess, configured once: where packages may come from and how chatty it is."""

    find_links: tuple[Path, ...] = ()
    index_url: str | None = None
    no_index: bool = False
    progress: bool = True

    def report(
        self, requirements: Sequence[str], target: list[str], work: Path, extra_links: Sequence[Path] = ()
    ) -> list[Pin]:
        """Run pip's resolver for the target without installing anything, and read back its choices."""
        reqs = work / "requirements.txt"
        reqs.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        links = [arg for link in extra_links for arg in ("--find-links", str(link))]
        return self._report(["-r", str(reqs), *links, *target], work)

    def report_pinned(self, pins: Sequence[Pin], target: list[str], work: Path) -> list[Pin]:
        if not pins:
            return []
        reqs = work / "locked.txt"
        reqs.write_text(pinned_requirements(pins), encoding="utf-8")
        return self._report(["--no-deps", "--require-hashes", "-r", str(reqs), *target], work)

    def report_sdist(self, requirement: str, work: Path) -> Pin:
        """The source distribution pip would pick for `requirement` on this builder."""
        name = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
        pins = self._report(["--no-deps", "--no-binary", name, requirement], work)
        if len(pins) != 1 or pins[0].is_wheel:
            raise ResolveError(f"expected one source distribution for {requirement}, pip chose {pins}")
        return pins[0]

    def download(self, pins: Sequence[Pin], target: list[str], into: Path) -> dict[str, Path]:
        """Fetch exactly the pinned files (pip refuses any other bytes), keyed by file name."""
        into.mkdir(parents=True, exist_ok=True)
        reqs = into.parent / "pinned.txt"
        reqs.write_text(pinned_requirements(pins), encoding="utf-8")
        self.run(["download", "--no-deps", "--require-hashes", "-d", str(into), "-r", str(reqs), *target])
        found = {path.name: path for path in into.iterdir()}
        missing = [pin.filename for pin in pins if pin.filename not in found]
        if missing:
            raise ResolveError(f"expected pip to download {', '.join(missing)}, found {', '.join(sorted(found))}")
        return found

    def download_sdist(self, pin: Pin, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        reqs = into.parent / f"{pin.name}-sdist.txt"
        reqs.write_text(pinned_requirements([pin]), encoding="utf-8")
        only_source = ["--no-binary", pin.name]
        self.run(["download", "--no-deps", "--require-hashes", *only_source, "-d", str(into), "-r", str(reqs)])
        path = into / pin.filename
        digest = digest_file(path) if path.is_file() else None
        if digest is None or digest.sha256 != pin.sha256:
            raise ResolveError(f"expected {pin.filename} with sha256 {pin.sha256}, found {digest}")
        return path

    def describe(self, url: str) -> dict[str, str]:
        """Where a file came from: a find-links folder or an index URL."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            folder = Path(unquote(parts.path)).parent
            for link in self.find_links:
                if folder == link.resolve():
                    return {"type": "find-links", "location": str(link), "url": url}
        return {"type": "index", "url": url}

    def run(self, args: Sequence[str]) -> None:
        command = [sys.executable, "-m", "pip", *args, *self.source_args(), "--disable-pip-version-check", "--no-input"]
        if not self.progress:
            command += ["--quiet", "--progress-bar", "off"]
        stdout = None if self.progress else subprocess.DEVNULL
        result = subprocess.run(command, env=self.environment(), stdout=stdout, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            missing = re.search(r"No matching distribution found for (\S.*)", result.stderr)
            raise PipFailed(pip_failure(result.stderr), missing.group(1).strip() if missing else None)

    def source_args(self) -> list[str]:
        args = ["--no-index"] if self.no_index else []
        if self.index_url is not None:
            args += ["--index-url", self.index_url]
        for link in self.find_links:
            args += ["--find-links", str(link)]
        return args

    def environment(self) -> dict[str, str]:
        """Keep pip's own configuration only when the caller left the package source to it."""
        env = dict(os.environ)
        if self.index_url is None and not self.no_index:
            return env
        env = {k: v for k, v in env.items() if not k.startswith("PIP_") or k in _PIP_ENV_KEPT}
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
        return env

    def _report(self, args: Sequence[str], work: Path) -> list[Pin]:
        report = work / "report.json"
        report.unlink(missing_ok=True)
        # pip accepts platform options with --dry-run only when given a --target, which it never writes to
        install = ["install", "--dry-run", "--ignore-installed", "--target", str(work / "unused-target")]
        self.run([*install, "--report", str(report), *args])
        return sorted(_pins_from_report(report), key=lambda p: p.name)


def pinned_requirements(pins: Sequence[Pin]) -> str:
    """A requirements file pinning each project to one version and the hash of one file."""
    return "".join(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n" for pin in pins)


def pip_failure(stderr: str) -> str:
    """Turn pip's error output into one line that names what could not be satisfied."""
    if match := re.search(r"No matching distribution found for (\S.*)", stderr):
        return f"no distribution satisfies {match.group(1).strip()} for this target (pip found none)"
    if match := re.search(r"Cannot install (.+?) because these package versions have conflicting", stderr, re.S):
        return f"conflicting requirements: {' '.join(match.group(1).split())}"
    if "DO NOT MATCH THE HASHES" in stderr:
        return "the package source now serves other bytes than the lock pins: " + _hash_mismatch(stderr)
    errors = [line.removeprefix("ERROR:").strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    return "pip failed: " + (errors[0] if errors else (stderr.strip().splitlines() or ["no output"])[-1])


def _hash_mismatch(stderr: str) -> str:
    match = re.search(r"^\s*(\S+) from (\S+?):?\s.*?Expected sha256 (\w+)\s+Got\s+(\w+)", stderr, re.S | re.M)
    if match is None:
        return stderr.strip().splitlines()[-1].strip()
    name, url, expected, got = match.groups()
    return f"{name} from {url}: expected sha256 {expected}, got {got}"


def _pins_from_report(report: Path) -> list[Pin]:
    data = json.loads(report.read_text(encoding="utf-8"))
    pins = []
    for item in data["install"]:
        info = item["download_info"]
        sha256 = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        filename = unquote(urlsplit(info["url"]).path.rsplit("/", 1)[-1])
        if sha256 is None:
            raise ResolveError(f"expected pip to report a sha256 for {filename}, found none")
        metadata = item["metadata"]
        name = canonicalize_name(metadata["name"])
        pins.append(Pin(name=name, version=metadata["version"], filename=filename, sha256=sha256, url=info["url"]))
    return pins


def _place(pin: Pin, downloaded: Path, dest: Path, source: Mapping[str, str]) -> ResolvedWheel:
    """Check the downloaded bytes against the pin, then move the file into `dest`."""
    digest = digest_file(downloaded)
    if digest.sha256 != pin.sha256:
        raise ResolveError(f"expected {pin.filename} with sha256 {pin.sha256}, found {digest.sha256}")
    name, version, _, _ = parse_wheel_filename(pin.filename)
    target = dest / pin.filename
    shutil.move(downloaded, target)
    return ResolvedWheel(name, str(version), pin.filename, target, digest.size, digest.sha256, source)


# --- lock file -------------------------------------------------------------------------------------------------


def read_lock(path: Path) -> Lock:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != LOCK_VERSION:
            raise ResolveError(f"expected lock file version {LOCK_VERSION} in {path}, found {data.get('version')!r}")
        target = Target(data.get("python_version"), tuple(data.get("platforms", ())))
        pins = tuple(
            Pin(canonicalize_name(p["name"]), p["version"], p["filename"], p["sha256"], p["url"])
            for p in data["package"]
        )
        return Lock(tuple(data["requirements"]), target, pins)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ResolveError(f"expected a readable airgap lock file at {path}, found {exc}") from exc


def _check_lock_matches(lock: Lock, requirements: Sequence[str], target: Target, path: Path | None) -> None:
    if lock.requirements != tuple(requirements):
        raise ResolveError(
            f"lock file {path} pins {list(lock.requirements)} but the spec asks for {list(requirements)}; "
            f"re-resolve with upgrade"
        )
    if lock.target != target:
        raise ResolveError(
            f"lock file {path} was made for {lock.target.describe()} but the spec asks for {target.describe()}; "
            f"re-resolve with upgrade"
        )


def write_lock(path: Path, lock: Lock, wheels: Sequence[ResolvedWheel]) -> None:
    """Write the lock atomically, in a stable order so that an unchanged resolution gives identical bytes."""
    built = {w.source.get("from"): w for w in wheels if w.source.get("type") == "built"}
    lines = [
        "# airgap lock file: every package pinned to one file by SHA-256. Written by `airgap build`;",
        "# a build with this file uses exactly these files. Re-resolve with --upgrade.",
        f"version = {LOCK_VERSION}",
        f"requirements = {_toml_list(lock.requirements)}",
    ]
    if lock.target.python_version is not None:
        lines.append(f"python_version = {_toml(lock.target.python_version)}")
    lines.append(f"platforms = {_toml_list(lock.target.platforms)}")
    for pin in sorted(lock.pins, key=lambda p: (p.name, p.filename)):
        lines.append("")
        if (wheel := built.get(pin.filename)) is not None:
            flags = " ".join(f"{k}={v}" for k, v in wheel.source.items() if k not in _BUILT_META)
            lines.append(f"# source only: compiled here into {wheel.filename} with {flags or 'default flags'}")
        lines.append("[[package]]")
        for key in ("name", "version", "filename", "sha256", "url"):
            lines.append(f"{key} = {_toml(getattr(pin, key))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    staging.replace(path)


_BUILT_META = frozenset({"type", "from", "sdist_sha256", "sdist_url", "cache_key"})


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_toml(v) for v in values) + "]"
