"""Coverage-guided fuzzing of airgap's parsers of hostile input, with atheris (libFuzzer).

    python tests/fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of: head, tar, manifest, root, index. Any exception other than airgap's own AirgapError
is a crash: atheris prints it, writes the input (see -artifact_prefix) and exits non-zero.
tests/fuzz/test_fuzz.py runs each target for a bounded time from the seed corpus in tests/fuzz/corpus.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["airgap"]):
    from airgap.bundle.container import read_head, read_payload
    from airgap.errors import AirgapError
    from airgap.format.manifest import parse_manifest
    from airgap.trust.roots import parse_root
    from airgap.volumes.index import parse_index


def fuzz_head(data: bytes) -> None:
    read_head(io.BytesIO(data))


def fuzz_tar(data: bytes) -> None:
    head, tar = read_head(io.BytesIO(data))
    read_payload(tar, head.manifest)


def fuzz_manifest(data: bytes) -> None:
    manifest = parse_manifest(data)
    manifest.to_bytes()  # what inspect --json and install do with a parsed manifest


def fuzz_root(data: bytes) -> None:
    parse_root(data).to_bytes()


def fuzz_index(data: bytes) -> None:
    parse_index(data).to_bytes()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "head": fuzz_head, "tar": fuzz_tar, "manifest": fuzz_manifest, "root": fuzz_root, "index": fuzz_index,
}


def main() -> None:
    target = TARGETS[sys.argv.pop(1)]

    def one_input(data: bytes) -> None:
        with contextlib.suppress(AirgapError):
            target(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
