"""Resolve Python requirements into binary wheels for the target host, with pip doing the resolving.

pip runs as a subprocess (`sys.executable -m pip`): first `install --dry-run --report` to learn the full
dependency set with URLs and hashes, then `download --require-hashes` to fetch exactly those files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.utils import canonicalize_name, parse_wheel_filename

from airgap.errors import ResolveError
from airgap.hashing import digest_file

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
    """One file the resolution chose: exact name, version, file and hash, and where it was found."""

    name: str
    version: str
    filename: str
    sha256: str
    url: str


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
    """Resolve `requirements` to wheels in `dest`, each with its hash and origin, sorted by name."""
    if not requirements:
        return []
    pip = Pip(find_links=tuple(find_links), index_url=index_url, no_index=no_index, progress=progress)
    target = pip_target_args(python_version, platforms)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="airgap-pip-") as work:
        pins = pip.resolve(requirements, target, Path(work))
        files = pip.download(pins, target, Path(work) / "download")
        return [_place(pin, files[pin.filename], dest, pip.describe(pin.url)) for pin in pins]


def pip_target_args(python_version: str | None, platforms: Sequence[str]) -> list[str]:
    """pip options selecting binary wheels for another interpreter/platform; empty for the builder itself."""
    if python_version is None and not platforms:
        return []
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    match = re.fullmatch(r"3\.(\d+)", version)
    if match is None:
        raise ResolveError(f"expected a python_version like '3.11', found {version!r}")
    args = ["--python-version", version, "--implementation", "cp", "--abi", f"cp3{match.group(1)}"]
    for platform in platforms:
        args += ["--platform", platform]
    return [*args, "--only-binary", ":all:"]


@dataclass(frozen=True)
class Pip:
    """pip as a subprocess, configured once: where packages may come from and how chatty it is."""

    find_links: tuple[Path, ...] = ()
    index_url: str | None = None
    no_index: bool = False
    progress: bool = True

    def resolve(self, requirements: Sequence[str], target: list[str], work: Path) -> list[Pin]:
        """Run pip's resolver without installing anything and read back its report."""
        report = work / "report.json"
        reqs = work / "requirements.txt"
        reqs.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        args = ["install", "--dry-run", "--ignore-installed", "--report", str(report), "-r", str(reqs)]
        if target:
            args += ["--target", str(work / "unused-target")]  # pip demands it with platform options
        else:
            args += ["--only-binary", ":all:"]
        self.run([*args, *target])
        return sorted(_pins_from_report(report), key=lambda p: p.name)

    def download(self, pins: Sequence[Pin], target: list[str], into: Path) -> dict[str, Path]:
        """Fetch exactly the pinned files (pip refuses any other bytes), keyed by file name."""
        into.mkdir(parents=True, exist_ok=True)
        reqs = into.parent / "pinned.txt"
        reqs.write_text(pinned_requirements(pins), encoding="utf-8")
        binary = [] if target else ["--only-binary", ":all:"]
        self.run(["download", "--no-deps", "--require-hashes", "-d", str(into), "-r", str(reqs), *binary, *target])
        found = {path.name: path for path in into.iterdir()}
        missing = [pin.filename for pin in pins if pin.filename not in found]
        if missing:
            raise ResolveError(f"expected pip to download {', '.join(missing)}, found {', '.join(sorted(found))}")
        return found

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
            raise ResolveError(pip_failure(result.stderr))

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


def pinned_requirements(pins: Sequence[Pin]) -> str:
    """A requirements file pinning each project to one version and the hash of one file."""
    return "".join(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n" for pin in pins)


def pip_failure(stderr: str) -> str:
    """Turn pip's error output into one line that names what could not be satisfied."""
    if match := re.search(r"No matching distribution found for (\S.*)", stderr):
        return f"no distribution satisfies {match.group(1).strip()} for this target (pip found none)"
    if match := re.search(r"Cannot install (.+?) because these package versions have conflicting", stderr):
        return f"conflicting requirements: {match.group(1).strip()}"
    if "DO NOT MATCH THE HASHES" in stderr:
        return "the package source now serves other bytes than pinned: " + _hash_mismatch(stderr)
    errors = [line.removeprefix("ERROR:").strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    return "pip failed: " + (errors[0] if errors else (stderr.strip().splitlines() or ["no output"])[-1])


def _hash_mismatch(stderr: str) -> str:
    match = re.search(r"^\s*(\S+) from (\S+?)[:\s].*?Expected sha256 (\w+)\s+Got\s+(\w+)", stderr, re.S | re.M)
    if match is None:
        return stderr.strip().splitlines()[-1]
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
    return ResolvedWheel(
        name=name,
        version=str(version),
        filename=pin.filename,
        path=target,
        size=digest.size,
        sha256=digest.sha256,
        source=source,
    )
