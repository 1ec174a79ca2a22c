"""Errors keep their cause: no `raise ... from None` hides the original, and --verbose shows it."""

from __future__ import annotations

import ast

from click.testing import CliRunner

from airgap.cli import main
from tests.support import REPO


def test_no_error_drops_its_cause() -> None:
    hidden = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sorted((REPO / "airgap").rglob("*.py"))
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None]
    assert not hidden, f"raise ... from None hides the cause at {', '.join(hidden)}"


def test_verbose_traceback_shows_the_original_exception(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["--verbose", "build", "/nonexistent/spec.toml", "--key", "/nonexistent.key"])
    assert result.exit_code != 0
    assert "FileNotFoundError" in result.output and "The above exception was the direct cause" in result.output
