"""`airgap build` fetching weights from a Hugging Face hub (the stand-in on 127.0.0.1), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import KeyPair
from tests.hubsim import HubSim
from tests.support import airgap


def hub_spec(folder: Path, wheelhouse: Path, revision: str = "main") -> Path:
    spec = folder / "hub.toml"
    spec.write_text(
        '[bundle]\nname = "hub-chat"\nversion = "1.0.0"\n\n'
        f'[[models]]\nid = "tiny"\nrepo = "acme/tiny-GGUF"\nrevision = "{revision}"\nfile = "tiny-Q8_0.gguf"\n\n'
        f'[python]\nfind_links = ["{wheelhouse}"]\n'
    )
    return spec


def test_build_pins_hub_commit_and_records_gguf(tmp_path: Path, wheelhouse: Path, tiny_model: Path,
                                                keys: KeyPair) -> None:
    with HubSim() as hub:
        card = b"---\nlicense: apache-2.0\n---\n# tiny\n"
        commit = hub.add_repo("acme/tiny-GGUF", {"tiny-Q8_0.gguf": tiny_model, "README.md": card})
        result = airgap("build", hub_spec(tmp_path, wheelhouse), "--key", keys.private, "-o", tmp_path / "d",
                        "-q", "--hub-endpoint", hub.endpoint, env={"HF_HOME": str(tmp_path / "hf")})
        assert result.code == 0, result.stderr
    bundle = Path(result.stdout.split()[-1])
    manifest = json.loads(airgap("inspect", bundle, "--json").stdout)
    # the card is read for the SBOM's licence, at the pinned commit; only what the spec names is packed
    assert not [f for f in manifest["files"] if "README" in f["path"]]
    sbom = json.loads(airgap("inspect", bundle, "--sbom", "--trust", keys.public).stdout)
    [card_model] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert card_model["purl"] == f"pkg:huggingface/acme/tiny-GGUF@{commit}"
    assert card_model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    model = next(f for f in manifest["files"] if f["kind"] == "model")
    assert model["path"] == "models/tiny/tiny-Q8_0.gguf"
    assert model["source"] == {"type": "hub", "repo": "acme/tiny-GGUF", "commit": commit, "file": "tiny-Q8_0.gguf"}
    assert model["size"] == tiny_model.stat().st_size
    gguf = manifest["models"][0]["gguf"]
    assert gguf["architecture"] == "llama" and gguf["block_count"] == 2 and gguf["has_chat_template"] is True
    assert airgap("verify", bundle, "--trust", keys.public, no_network=True).code == 0


def test_build_refuses_bytes_other_than_announced(tmp_path: Path, wheelhouse: Path, tiny_model: Path,
                                                  keys: KeyPair) -> None:
    with HubSim() as hub:
        hub.add_repo("acme/tiny-GGUF", {"tiny-Q8_0.gguf": tiny_model})
        hub.serve_other_bytes("acme/tiny-GGUF", "tiny-Q8_0.gguf", b"X" * tiny_model.stat().st_size)
        result = airgap("build", hub_spec(tmp_path, wheelhouse), "--key", keys.private, "-o", tmp_path / "d",
                        "-q", "--hub-endpoint", hub.endpoint, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.code != 0
    assert result.error_line.startswith("airgap: error:") and "tiny-Q8_0.gguf" in result.error_line
    assert not list((tmp_path / "d").glob("*.airgap"))


def test_build_names_missing_repo(tmp_path: Path, wheelhouse: Path, keys: KeyPair) -> None:
    with HubSim() as hub:
        result = airgap("build", hub_spec(tmp_path, wheelhouse), "--key", keys.private, "-o", tmp_path / "d",
                        "-q", "--hub-endpoint", hub.endpoint, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.code != 0 and "acme/tiny-GGUF" in result.error_line
