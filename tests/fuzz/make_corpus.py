"""Write the seed corpus in tests/fuzz/corpus/<target>/: small real files made by airgap's own writers.

    python tests/fuzz/make_corpus.py

Re-run after a format change; the files are committed so that fuzzing starts from valid input.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from airgap.bundle.container import read_head
from airgap.trust.roots import Role, new_root
from airgap.trust.signing import sign_envelope
from airgap.volumes import split_bundle
from tests.support import make_test_bundle

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> None:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundles = {
            "plain": make_test_bundle(work / "a", {"models/m.gguf": b"GGUF" + bytes(200), "a.txt": b"hi " * 200}, key),
            "long-name": make_test_bundle(work / "b", {"d/" * 60 + "x.txt": b"long " * 100}, key),
            "empty": make_test_bundle(work / "c", {"empty": b""}, key),
        }
        for name, path in bundles.items():
            write("head", name, path.read_bytes()[:16384])
            write("tar", name, path.read_bytes())
            with path.open("rb") as stream:
                write("manifest", name, read_head(stream)[0].manifest_bytes)
        out = work / "volumes"
        index = split_bundle(bundles["plain"], out, 4096, 1, progress=False)
        write("index", "plain", (out / index.index_name).read_bytes())
        index = split_bundle(bundles["empty"], work / "v2", None, 0, progress=False)
        write("index", "single", (work / "v2" / index.index_name).read_bytes())
    root_key, release = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    expires = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=1)
    root = new_root(1, expires, Role((root_key.public_key(),), 1), Role((release.public_key(), key.public_key()), 2))
    write("root", "signed", sign_envelope(root.envelope, root_key).to_bytes())
    write("root", "unsigned", root.to_bytes())


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
