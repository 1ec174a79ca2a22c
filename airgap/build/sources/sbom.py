"""The bundle's SBOM and AI-BOM: one CycloneDX 1.6 JSON document, made with cyclonedx-python-lib.

This is the only module that imports cyclonedx and packageurl (build side only: the isolated host reads
the document as bytes, it never parses it). It lists every file of the target state with its SHA-256:
each wheel as a library with its purl and the licence its METADATA declares, a wheel compiled here with
its source distribution (hash, URL) and build flags as pedigree, each model as a `machine-learning-model`
with a model card from the GGUF metadata the manifest records, its hub repo, commit and licence.

cyclonedx-python-lib 11 has no model-card type yet, so the `modelCard` objects are added to its output;
the whole document is then checked against the CycloneDX 1.6 JSON schema the library ships, so nothing
invalid is ever packed. Everything is derived from the manifest (timestamp: its creation time; serial
number: a hash of its file list), so equal inputs give equal bytes, and the length does not depend on
the hashes (fixed-width hex), which lets the bundle writer reserve its place before hashing the weights.
"""

from __future__ import annotations

import email.parser
import json
import uuid
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airgap.errors import FormatError
from airgap.format.manifest import FileEntry, Manifest, format_time

SBOM_PATH = "sbom.cdx.json"
PROPERTY_PREFIX = "airgap"
_CLASSIFIER_PREFIX = "License :: "
_MAX_LICENSE_TEXT = 200  # a `License:` field longer than this is the whole licence text, not its name
_GGUF_CARD_KEYS = ("architecture", "parameter_count", "file_type", "context_length", "block_count",
                   "embedding_length", "head_count", "head_count_kv", "vocab_size", "has_chat_template",
                   "gguf_version")


@dataclass(frozen=True)
class ModelLicense:
    """What a model repository's card says about its licence (`license:`, and for "other" a name and link)."""

    license: str
    name: str | None = None
    link: str | None = None


@dataclass(frozen=True)
class SbomFacts:
    """What the manifest does not hold: licences read at build time, keyed by manifest path / model id."""

    wheel_licenses: Mapping[str, str] = field(default_factory=dict)
    model_licenses: Mapping[str, ModelLicense] = field(default_factory=dict)


def wheel_license(path: Path) -> str | None:
    """The licence a wheel's METADATA declares: License-Expression, else a short License, else classifiers."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                return None
            text = wheel.read(names[0]).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: cannot read the wheel's METADATA: {exc}") from exc
    headers = email.parser.HeaderParser().parsestr(text)
    expression = (headers.get("License-Expression") or "").strip()
    if expression:
        return expression
    declared = (headers.get("License") or "").strip()
    if declared and "\n" not in declared and len(declared) <= _MAX_LICENSE_TEXT and declared.upper() != "UNKNOWN":
        return declared
    classifiers = [c.strip()[len(_CLASSIFIER_PREFIX):].split(" :: ")[-1]
                   for c in headers.get_all("Classifier") or [] if c.strip().startswith(_CLASSIFIER_PREFIX)]
    return ", ".join(classifiers) or None


def serial_number(manifest: Manifest) -> uuid.UUID:
    """A fixed serial number per bundle content: the same files give the same document."""
    from airgap.streams.pipeline import digest_bytes

    seed = json.dumps([manifest.name, manifest.version, format_time(manifest.created),
                       [(e.path, e.sha256) for e in manifest.files]]).encode()
    return uuid.UUID(hex=digest_bytes(seed).sha256[:32], version=5)


def render_sbom(manifest: Manifest, facts: SbomFacts) -> bytes:
    """The CycloneDX 1.6 JSON document for `manifest`, validated against the schema."""
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    from airgap import __version__

    described = [e for e in manifest.files if e.path != SBOM_PATH]
    bundle = Component(type=ComponentType.APPLICATION, name=manifest.name, version=manifest.version,
                       bom_ref=f"bundle:{manifest.name}@{manifest.version}",
                       properties=_properties({"bundle:expires": format_time(manifest.expires)}))
    tool = Component(type=ComponentType.APPLICATION, name="airgap", version=manifest.tool_version or __version__,
                     bom_ref="tool:airgap")
    models = {path: m for m in manifest.models for path in m.files}
    packages = {p.path: p for p in manifest.packages}
    components = [_model_component(m, manifest, facts) for m in manifest.models]
    for entry in described:
        if entry.path in packages:
            components.append(_wheel_component(entry, packages[entry.path].name, packages[entry.path].version,
                                               facts.wheel_licenses.get(entry.path)))
        elif entry.path not in models:
            components.append(_file_component(entry))
    metadata = BomMetaData(timestamp=manifest.created, component=bundle)
    metadata.tools.components.add(tool)
    bom = Bom(serial_number=serial_number(manifest), metadata=metadata, components=components)
    bom.register_dependency(bundle, components)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library warns about incomplete documents: refuse them instead
        try:
            text = JsonV1Dot6(bom).output_as_string(indent=1)
        except (UserWarning, ValueError, TypeError) as exc:
            raise FormatError(f"cannot write the SBOM of {manifest.name} {manifest.version}: {exc}") from exc
    document = json.loads(text)
    cards = {f"model:{m.id}": _model_card(m.gguf) for m in manifest.models}
    for component in document.get("components", []):
        if component.get("bom-ref") in cards:
            component["modelCard"] = cards[component["bom-ref"]]
    data = (json.dumps(document, indent=1, ensure_ascii=True) + "\n").encode()
    validate_sbom(data)
    return data


def validate_sbom(data: bytes) -> None:
    """Check a document against the CycloneDX 1.6 JSON schema (shipped with the library; no network)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"SBOM is not valid JSON: {exc}") from exc
    if error is not None:
        raise FormatError(f"SBOM does not follow the CycloneDX 1.6 schema: {str(error)[:300]}")


def _properties(values: Mapping[str, object]) -> list[Any]:
    from cyclonedx.model import Property

    return [Property(name=f"{PROPERTY_PREFIX}:{key}", value=_text(value)) for key, value in values.items()
            if value is not None and value != ""]


def _text(value: object) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _sha256(entry: FileEntry) -> list[Any]:
    from cyclonedx.model import HashAlgorithm, HashType

    return [HashType(alg=HashAlgorithm.SHA_256, content=entry.sha256)]


def _licenses(value: str | None) -> list[Any]:
    from cyclonedx.factory.license import LicenseFactory

    return [] if not value else [LicenseFactory().make_from_string(value)]


def _wheel_component(entry: FileEntry, name: str, version: str, license_text: str | None) -> Any:
    from cyclonedx.model import ExternalReference, ExternalReferenceType, XsUri
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from packageurl import PackageURL

    filename = Path(entry.path).name
    source = dict(entry.source)
    # airgap packs its own wheel and never takes the name from an index, where another project may own it
    purl = (PackageURL(type="generic", name=name, version=version, qualifiers={"file_name": filename})
            if source.get("type") == "self" else
            PackageURL(type="pypi", name=name.lower().replace("_", "-"), version=version,
                       qualifiers={"file_name": filename}))
    refs = [ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(source["url"]))
            ] if source.get("url", "").startswith(("http://", "https://")) else []
    pedigree = None
    properties = {"path": entry.path, "source": source.get("type")}
    if source.get("type") == "built":
        sdist = Component(
            type=ComponentType.LIBRARY, name=name, version=version, bom_ref=f"sdist:{source.get('from')}",
            purl=PackageURL(type="pypi", name=name.lower().replace("_", "-"), version=version,
                            qualifiers={"file_name": source.get("from", "")}),
            hashes=_sha256(FileEntry(source.get("from", ""), 0, source.get("sdist_sha256", ""), "sdist")),
            external_references=[ExternalReference(type=ExternalReferenceType.DISTRIBUTION,
                                                   url=XsUri(source["sdist_url"]))]
            if source.get("sdist_url", "").startswith(("http://", "https://")) else [])
        flags = {k: v for k, v in source.items() if k not in {"type", "from", "sdist_sha256", "sdist_url", "cache_key"}}
        pedigree = Pedigree(ancestors=[sdist], notes=f"compiled from {source.get('from')} by airgap build with "
                                                     + (" ".join(f"{k.upper()}={v}" for k, v in flags.items())
                                                        or "default flags"))
        properties.update({f"build:{k}": v for k, v in flags.items()})
        properties["build:cache_key"] = source.get("cache_key")
    return Component(type=ComponentType.LIBRARY, name=name, version=version, bom_ref=f"wheel:{filename}",
                     purl=purl, hashes=_sha256(entry), licenses=_licenses(license_text), external_references=refs,
                     pedigree=pedigree, properties=_properties(properties))


def _file_component(entry: FileEntry) -> Any:
    from cyclonedx.model.component import Component, ComponentType

    return Component(type=ComponentType.FILE, name=entry.path, bom_ref=f"file:{entry.path}", hashes=_sha256(entry),
                     properties=_properties({"kind": entry.kind, "source": entry.source.get("type")}))


def _model_component(model: Any, manifest: Manifest, facts: SbomFacts) -> Any:
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    entries: Sequence[FileEntry] = [manifest.file(p) for p in model.files]
    hub = next((e.source for e in entries if e.source.get("type") in {"hub", "converted"}), None)
    purl = None
    if hub is not None and "/" in hub.get("repo", ""):
        namespace, _, name = hub["repo"].partition("/")
        purl = PackageURL(type="huggingface", namespace=namespace, name=name, version=hub.get("commit"))
    card_license = facts.model_licenses.get(model.id)
    licenses = []
    if card_license is not None:
        licenses = _model_licenses(card_license)
    files = [Component(type=ComponentType.FILE, name=e.path, bom_ref=f"file:{e.path}", hashes=_sha256(e),
                       properties=_properties({"kind": e.kind, "source": e.source.get("type"),
                                               "hub:file": e.source.get("file")}))
             for e in entries]
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=model.id, version=hub.get("commit") if hub else None,
        bom_ref=f"model:{model.id}", purl=purl, hashes=_sha256(entries[0]) if len(entries) == 1 else None,
        licenses=licenses, components=files,
        properties=_properties({"hub:repo": hub.get("repo") if hub else None,
                                "hub:commit": hub.get("commit") if hub else None,
                                "license:source": "model card" if card_license else None,
                                "converted:quantization": hub.get("quantization") if hub else None,
                                "converted:converter": hub.get("converter") if hub else None}),
    )


def _model_licenses(card: ModelLicense) -> list[Any]:
    from cyclonedx.factory.license import LicenseFactory
    from cyclonedx.model import XsUri
    from cyclonedx.model.license import DisjunctiveLicense

    if card.license == "other" and card.name:
        return [DisjunctiveLicense(name=card.name, url=XsUri(card.link) if card.link else None)]
    return [LicenseFactory().make_from_string(card.license)]


def _model_card(gguf: Mapping[str, Any]) -> dict[str, Any]:
    """The CycloneDX model card from the GGUF header: architecture, size, quantization, context length."""
    parameters: dict[str, Any] = {"task": "text-generation", "inputs": [{"format": "text"}],
                                  "outputs": [{"format": "text"}]}
    if gguf.get("architecture"):
        parameters["architectureFamily"] = str(gguf["architecture"])
        layers, width = gguf.get("block_count"), gguf.get("embedding_length")
        parameters["modelArchitecture"] = (f"{gguf['architecture']}, {layers} layers of width {width}"
                                           if layers and width else str(gguf["architecture"]))
    card: dict[str, Any] = {"modelParameters": parameters}
    properties = [{"name": f"{PROPERTY_PREFIX}:gguf:{key}", "value": _text(gguf[key])}
                  for key in _GGUF_CARD_KEYS if gguf.get(key) is not None]
    if gguf.get("file_type") is not None:
        properties.append({"name": f"{PROPERTY_PREFIX}:quantization", "value": _text(gguf["file_type"])})
    if properties:
        card["properties"] = properties
    return card
