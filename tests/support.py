"""Shared test helpers: run the real CLI (optionally with no network), make keys, specs and bundles."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def offline(command: list[str]) -> list[str]:
    """Run `command` in a fresh network namespace whose only interface is loopback."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def airgap(*args: str | Path, no_network: bool = False, env: dict[str, str] | None = None,
           cwd: Path | None = None, timeout: float = 600) -> Result:
    command = [sys.executable, "-m", "airgap", *map(str, args)]
    if no_network:
        command = offline(command)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
                          check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def assert_refused(result: Result, *fragments: str) -> None:
    """One line on stderr, `airgap: error: ...` holding each fragment, and a non-zero exit."""
    assert result.code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("airgap: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


PrefixSnapshot = tuple[str, bytes, list[str]]


def snapshot(prefix: Path) -> PrefixSnapshot:
    """What must not change when an install is refused: the active link, the state, the tree."""
    tree = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if ".lock" not in p.name)
    return os.readlink(prefix / "current"), (prefix / "state.json").read_bytes(), tree


def assert_still_works(prefix: Path, before: PrefixSnapshot) -> None:
    """Nothing changed under `prefix`, and the active version's airgap still runs."""
    assert snapshot(prefix) == before
    subprocess.run([prefix / "current" / "venv" / "bin" / "airgap", "--version"], check=True, capture_output=True)


def host_cpu_variant() -> str:
    """The ggml CPU variant ggml picks on this host, by airgap's table (what `build --target` on its probe packs)."""
    from airgap.hardware.probe import parse_cpuinfo_model
    from airgap.hardware.target import best_cpu_variant

    _, flags = parse_cpuinfo_model(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    return best_cpu_variant(flags)


def engine_table() -> str:
    """The `[engine]` table of every test spec that builds llama-server: this host's ggml CPU variant (x64 comes
    with it). All of them share one compile, a fraction of the every-variant one; the variant table itself is
    checked against the pinned sources in tests/unit/build/sources/test_engine.py."""
    return f'[engine]\ncpu_variants = ["{host_cpu_variant()}"]\n'


def write_spec(folder: Path, *, name: str = "tiny-chat", version: str = "1.0.0", model: Path,
               wheelhouse: Path, requirements: tuple[str, ...] = (), extra: str = "") -> Path:
    spec = folder / f"{name}-{version}.toml"
    reqs = ", ".join(f'"{r}"' for r in requirements)
    spec.write_text(
        f'[bundle]\nname = "{name}"\nversion = "{version}"\n{extra}\n'
        f'[[models]]\nid = "tiny"\npath = "{model}"\n\n'
        f'[python]\nrequirements = [{reqs}]\nfind_links = ["{wheelhouse}"]\n'
    )
    return spec


def make_test_bundle(folder: Path, files: dict[str, bytes], key: object, *, name: str = "b", version: str = "1.0",
                     expires_days: int = 1, models: tuple[object, ...] = (), kinds: dict[str, str] | None = None,
                     packages: tuple[tuple[str, str, str], ...] | None = None, created: object = None) -> Path:
    """A real signed bundle written in-process (no pip, no CLI): `.gguf` paths are models, `.whl` paths
    wheels (with a python package each, named by the file name, unless `packages` says otherwise: (name,
    version, path) triples), the rest meta; `kinds` overrides the kind of a path (a hostile signer may)."""
    from datetime import UTC, datetime, timedelta

    from airgap.bundle.container import prepare_entry, write_bundle
    from airgap.format.manifest import DraftFile, Manifest, PythonPackage
    from airgap.trust.signing import sign

    made = created if isinstance(created, datetime) else datetime(2026, 1, 2, tzinfo=UTC)
    folder.mkdir(parents=True, exist_ok=True)
    packed = folder / "packed"
    packed.mkdir(exist_ok=True)
    payload = []
    for path, data in files.items():
        source = folder / path.replace("/", "_")
        source.write_bytes(data)
        kind = "model" if path.endswith(".gguf") else "wheel" if path.endswith(".whl") else "meta"
        kind = (kinds or {}).get(path, kind)
        payload.append(prepare_entry(source, DraftFile(path, 0, kind), packed))  # type: ignore[arg-type]
    if packages is None:
        wheels = [p for p in files if p.endswith(".whl") and Path(p).name.count("-") >= 4]  # named as PEP 427 says
        packages = tuple((Path(p).name.split("-")[0], Path(p).name.split("-")[1], p) for p in wheels)
    draft = Manifest(name, version, made, made + timedelta(days=expires_days), "0.1.0",
                     (), models=models,  # type: ignore[arg-type]
                     packages=tuple(PythonPackage(*p) for p in packages))
    out = folder / f"{name}-{version}.airgap"
    payload.sort(key=lambda p: p.entry.kind == "model")  # small files first, as `airgap build` orders them
    write_bundle(out, draft, payload, lambda data: [sign(data, key)])  # type: ignore[arg-type]
    return out


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], *, entry_points: str = "",
                record: dict[str, bytes] | None = None, dist_info: str | None = None) -> Path:
    """A wheel `<name>-<version>-py3-none-any.whl` of `files`, with WHEEL, METADATA and a RECORD of their
    hashes (of `record`'s bytes instead, for a path it names: a RECORD that lies)."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    info = dist_info or f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    if entry_points:
        members[f"{info}/entry_points.txt"] = entry_points.encode()
    rows = []
    for path, data in members.items():
        hashed = (record or {}).get(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(hashed).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(hashed)}\n")
    rows.append(f"{info}/RECORD,,\n")
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as archive:
        for path, data in members.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", "".join(rows))
    return out


UNIT_WHEELHOUSES = Path(os.environ.get("AIRGAP_TEST_WHEELHOUSE",
                                       Path.home() / ".cache" / "airgap-tests" / "wheels-unit"))


def runtime_wheelhouse(folder: Path) -> Path:
    """Binary wheels of airgap's own declared runtime dependencies (and theirs), as every bundle carries them.

    The list comes from airgap's metadata, the same one `airgap build` resolves, so a dependency added to
    pyproject.toml reaches the test wheelhouse with no copy to update. Fails loudly: a bundle needs it.
    """
    from airgap.build.sources.selfwheel import runtime_requirements

    subprocess.run([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), str(folder), "-r",
                    *runtime_requirements()], check=True, stdout=subprocess.DEVNULL)
    return folder


def fill_wheelhouse(name: str, *args: str) -> Path:
    """A folder of real binary wheels, downloaded by scripts/wheelhouse.py on first use only."""
    import pytest

    folder = UNIT_WHEELHOUSES / name
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), str(folder), *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"could not fill the test wheelhouse {folder} from the package registry: {done.stderr[-300:]}")
    return folder


def write_sdist(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A source distribution `<name>-<version>.tar.gz` holding `files` under its top folder."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
