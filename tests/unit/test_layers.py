"""The architecture rules, checked: imports point down, each third-party library behind one module,
and the offline path (verify, install, serve) never loads the fetching code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGE = REPO / "airgap"
OWNERS = {"huggingface_hub": {"sources/hf.py"}, "click": {"cli.py"}, "jinja2": {"templates.py"},
          "llama_cpp": {"serve/__init__.py"}, "h11": {"serve/proxy.py"}, "gguf": {"sources/gguf_meta.py"},
          "zfec": {"parity.py"}}
OFFLINE = ["airgap.install", "airgap.bundle", "airgap.trust", "airgap.manifest", "airgap.cli"]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_library_lives_behind_one_module(library: str) -> None:
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any(m == library or m.startswith(library + ".") for m in imported_modules(p))}
    assert users <= OWNERS[library], f"{library} imported outside its module: {users - OWNERS[library]}"


def test_pure_modules_do_no_io_imports() -> None:
    for name in ("manifest.py", "trust.py", "policy.py"):
        modules = imported_modules(PACKAGE / name)
        assert not modules & {"os", "subprocess", "shutil", "socket", "pathlib", "airgap.sources"}, name


def test_offline_path_never_loads_sources() -> None:
    code = ("import sys; import " + ", ".join(OFFLINE) + "; "
            "bad = [m for m in sys.modules if m.startswith(('airgap.sources', 'huggingface_hub', 'gguf'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_never_imports_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "airgap.cli" not in imported_modules(path), path
