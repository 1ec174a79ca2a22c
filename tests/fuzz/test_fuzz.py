"""Bounded coverage-guided fuzzing in the suite: each parser of hostile input for FUZZ_SECONDS from the seed
corpus. A failure names the exception and leaves the input that caused it under the test's tmp_path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

FUZZ = REPO / "tests" / "fuzz"
FUZZ_SECONDS = 30  # five targets: 2.5 minutes in all
TARGETS = ("head", "tar", "manifest", "root", "index")


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzzing_finds_no_exception_but_airgaps_own(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)  # libFuzzer adds what it finds to the corpus folder
    done = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), target, f"-max_total_time={FUZZ_SECONDS}", "-timeout=10",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, cwd=REPO, check=False, timeout=FUZZ_SECONDS + 120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Done " in done.stderr, done.stderr[-2000:]  # it ran inputs, and stopped at the time limit


def test_the_seed_corpus_is_what_the_writers_make_now(tmp_path: Path) -> None:
    """Each seed parses: after a format change, re-run tests/fuzz/make_corpus.py."""
    from airgap.bundle.container import read_head
    from airgap.format.manifest import parse_manifest
    from airgap.trust.roots import parse_root
    from airgap.volumes.index import parse_index

    for path in (FUZZ / "corpus" / "manifest").iterdir():
        parse_manifest(path.read_bytes())
    for path in (FUZZ / "corpus" / "root").iterdir():
        parse_root(path.read_bytes())
    for path in (FUZZ / "corpus" / "index").iterdir():
        parse_index(path.read_bytes())
    for path in (FUZZ / "corpus" / "tar").iterdir():
        with path.open("rb") as stream:
            read_head(stream)
