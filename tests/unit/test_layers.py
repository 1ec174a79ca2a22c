"""The architecture rules, checked at package level: each rule reads "package A never imports package B".

Packages (and the few top-level modules that stand alone) sit in layers; a module may import only from its
own package and the packages its layer lists below. Each third-party library lives behind one module, the
offline path (verify, install, serve) never loads the build side, and a module that calls itself pure does
no I/O.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGE = REPO / "airgap"
SHARED = {"airgap", "errors"}  # the package root (its version) and the error root: everyone may use them
MAY_IMPORT: dict[str, set[str]] = {
    "format": set(),
    "streams": set(),
    "progress": set(),
    "templates": set(),
    "trust": {"format"},
    "bundle": {"format", "trust", "streams"},
    "volumes": {"format", "streams", "bundle", "progress", "templates", "hardware"},  # probe.py goes on the stick
    "prefix": {"format", "trust", "streams", "bundle", "volumes", "progress"},
    "hardware": {"format"},  # host facts, the probe (stdlib only: tests/unit/hardware/test_probe.py), sizing
    "serve": {"format", "prefix", "hardware", "templates"},
    "build": {"format", "trust", "streams", "bundle", "progress", "hardware"},
    "cli": {"format", "trust", "streams", "bundle", "volumes", "prefix", "hardware", "serve", "build", "fleet",
            "progress", "templates"},
    "fleet": set(),  # the fleet view: gathered `status --json` documents in, one table out
    "__main__": {"cli"},
}
OWNERS = {"cryptography": ("trust",), "huggingface_hub": ("build/sources/hf.py",),
          "gguf": ("build/sources/gguf_meta.py",), "click": ("cli.py",), "jinja2": ("templates.py",),
          "zfec": ("volumes/parity.py",), "zstandard": ("bundle",),
          "llama_cpp": ("serve/__init__.py",), "h11": ("serve/proxy.py",),
          "tqdm": ("progress.py", "build/sources/hf.py"),  # hf.py quiets huggingface_hub's own tqdm
          "installer": ("prefix/wheelinstall.py",), "cyclonedx": ("build/sources/sbom.py",),
          "packageurl": ("build/sources/sbom.py",)}
OFFLINE = ["format", "trust", "streams", "bundle", "volumes", "prefix", "serve", "cli"]
BUILD_SIDE = ("airgap.build", "huggingface_hub", "gguf", "cyclonedx")
IO_MODULES = {"os", "subprocess", "shutil", "socket", "pathlib", "io", "tempfile", "fcntl"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def airgap_packages(path: Path) -> set[str]:
    found = set()
    for module in imported_modules(path):
        parts = module.split(".")
        if parts[0] == "airgap":
            found.add(parts[1] if len(parts) > 1 else "airgap")
    return found


def test_every_package_has_a_layer() -> None:
    assert {package_of(p) for p in modules()} - SHARED - {"__init__"} <= set(MAY_IMPORT)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_the_layers_below(package: str) -> None:
    allowed = MAY_IMPORT[package] | SHARED | {package}
    for path in modules():
        if package_of(path) == package:
            assert airgap_packages(path) <= allowed, (
                f"{path.relative_to(REPO)} imports {sorted(airgap_packages(path) - allowed)}: {package} never "
                f"imports those")


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_library_lives_behind_one_module(library: str) -> None:
    owners = OWNERS[library]
    users = {str(p.relative_to(PACKAGE)) for p in modules()
             if any(m == library or m.startswith(library + ".") for m in imported_modules(p))}
    outside = {u for u in users if not any(u == o or u.startswith(o + "/") for o in owners)}
    assert not outside, f"{library} imported outside {', '.join(owners)}: {sorted(outside)}"


def calls_itself_pure(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return package_of(path) == "format" or doc.startswith("Pure") or "\nPure" in doc or " Pure:" in doc


def test_pure_modules_do_no_io() -> None:
    pure = [p for p in modules() if calls_itself_pure(p) and p.name != "__init__.py"]
    assert {"sizing.py", "target.py", "roots.py", "manifest.py"} <= {p.name for p in pure}
    for path in pure:
        io = {m.split(".")[0] for m in imported_modules(path)} & IO_MODULES
        assert not io, f"{path.relative_to(REPO)} calls itself pure but imports {sorted(io)}"


def test_offline_path_never_loads_the_build_side() -> None:
    names = sorted({f"airgap.{'.'.join(p.relative_to(PACKAGE).with_suffix('').parts)}".removesuffix(".__init__")
                    for p in modules() if package_of(p) in OFFLINE and p.name != "__main__.py"})
    code = ("import importlib, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({BUILD_SIDE!r}))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_never_imports_cli() -> None:
    for path in modules():
        if package_of(path) not in ("cli", "__main__"):
            assert "cli" not in airgap_packages(path), path
