"""Every test README, SECURITY.md and docs/ name as the backing of a claim exists."""

from __future__ import annotations

import re

import pytest

from tests.support import REPO

DOCS = ["README.md", "SECURITY.md", "docs/FORMAT.md", "docs/BENCHMARKS.md"]
TESTS = sorted((REPO / "tests").rglob("*.py"))
DEFINED = {m.group(1) for path in TESTS for m in re.finditer(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_test_file_exists(doc: str) -> None:
    named = set(re.findall(r"tests/[\w/]+\.py", (REPO / doc).read_text()))
    assert named, f"{doc} names no test file"
    assert not {p for p in named if not (REPO / p).is_file()}, f"{doc} names missing test files"


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_test_function_exists(doc: str) -> None:
    files = {p.stem for p in TESTS}
    named = set(re.findall(r"\b(test_\w+)", (REPO / doc).read_text())) - files
    assert not named - DEFINED, f"{doc} names tests that do not exist: {sorted(named - DEFINED)}"
