"""The SBOM/AI-BOM every bundle carries, read back through `airgap inspect --sbom` from a real build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airgap.build.sources.sbom import validate_sbom, wheel_license
from airgap.errors import FormatError
from tests.conftest import Built
from tests.support import airgap


@pytest.fixture(scope="module")
def sbom(built: Built) -> dict[str, Any]:
    result = airgap("inspect", built.bundle, "--sbom", "--trust", built.keys.public)
    assert result.code == 0, result.stderr
    assert result.stderr.startswith("airgap: SBOM of tiny-chat 1.0.0 verified: signed by ")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def manifest_of(bundle: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(airgap("inspect", bundle, "--json").stdout)
    return result


def sha256_of(component: dict[str, Any]) -> str:
    [value] = [h["content"] for h in component["hashes"] if h["alg"] == "SHA-256"]
    return str(value)


def test_the_sbom_is_a_signed_file_of_the_manifest(built: Built) -> None:
    entry = next(f for f in manifest_of(built.bundle)["files"] if f["path"] == "sbom.cdx.json")
    assert (entry["kind"], entry["storage"]) == ("meta", "raw")  # in SHA256SUMS: the by-hand recipe covers it


def test_every_wheel_and_model_is_listed_with_the_manifests_hash(built: Built, sbom: dict[str, Any]) -> None:
    manifest = manifest_of(built.bundle)
    files = {f["path"]: f for f in manifest["files"]}
    wheels = {c["bom-ref"]: c for c in sbom["components"] if c["bom-ref"].startswith("wheel:")}
    assert set(wheels) == {"wheel:" + Path(p["path"]).name for p in manifest["python"]["packages"]}
    for package in manifest["python"]["packages"]:
        component = wheels["wheel:" + Path(package["path"]).name]
        assert sha256_of(component) == files[package["path"]]["sha256"]
        assert component["version"] == package["version"]
        kind = "generic" if package["name"] == "airgap" else "pypi"
        assert component["purl"].startswith(f"pkg:{kind}/")
    models = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert [m["name"] for m in models] == [m["id"] for m in manifest["models"]]
    [model_path] = manifest["models"][0]["files"]
    assert sha256_of(models[0]) == files[model_path]["sha256"]
    assert sha256_of(models[0]["components"][0]) == files[model_path]["sha256"]


def test_wheel_licences_come_from_their_metadata(wheelhouse: Path, sbom: dict[str, Any]) -> None:
    click = next(c for c in sbom["components"] if c.get("name") == "click")
    expected = wheel_license(next(wheelhouse.glob("click-*.whl")))
    assert expected is not None
    [licence] = click["licenses"]
    named = licence.get("expression") or licence["license"].get("id") or licence["license"].get("name")
    assert named == expected
    assert sum(bool(c.get("licenses")) for c in sbom["components"] if c["bom-ref"].startswith("wheel:")) >= 5


def test_the_model_card_comes_from_the_gguf_metadata(built: Built, sbom: dict[str, Any]) -> None:
    gguf = manifest_of(built.bundle)["models"][0]["gguf"]
    model = next(c for c in sbom["components"] if c["type"] == "machine-learning-model")
    card = model["modelCard"]
    assert card["modelParameters"]["architectureFamily"] == gguf["architecture"]
    properties = {p["name"]: p["value"] for p in card["properties"]}
    assert properties["airgap:gguf:parameter_count"] == str(gguf["parameter_count"])
    assert properties["airgap:gguf:context_length"] == str(gguf["context_length"])
    assert properties["airgap:quantization"] == gguf["file_type"]


def test_the_sbom_validates_against_the_cyclonedx_1_6_schema(sbom: dict[str, Any]) -> None:
    assert sbom["specVersion"] == "1.6" and sbom["bomFormat"] == "CycloneDX"
    validate_sbom(json.dumps(sbom).encode())
    broken = {**sbom, "components": [{**sbom["components"][0], "type": "spaceship"}]}
    with pytest.raises(FormatError, match=r"^SBOM does not follow the CycloneDX 1\.6 schema: "):
        validate_sbom(json.dumps(broken).encode())


def test_without_trust_the_sbom_is_printed_as_unverified(bundle_copy: Path) -> None:
    result = airgap("inspect", bundle_copy, "--sbom")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["bomFormat"] == "CycloneDX"
    assert result.error_line.startswith("airgap: warning: UNVERIFIED SBOM of tiny-chat 1.0.0: it matches the")


def test_a_changed_sbom_is_refused_even_without_trust(bundle_copy: Path) -> None:
    data = bytearray(bundle_copy.read_bytes())
    at = data.index(b'"bomFormat": "CycloneDX"')
    data[at + 1] ^= 0x20
    bundle_copy.write_bytes(bytes(data))
    result = airgap("inspect", bundle_copy, "--sbom")
    assert result.code != 0 and result.stdout == ""
    assert "sbom.cdx.json" in result.error_line and "sha256" in result.error_line.lower()
