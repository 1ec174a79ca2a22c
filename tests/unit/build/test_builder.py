"""build_bundle on a real tiny GGUF and real wheels: the manifest tells the truth, and builds reproduce."""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airgap.build.builder import BOOTSTRAP_REQUIREMENTS, BuildOptions, build_bundle, cpu_variants, creation_time
from airgap.build.sources.engine import CPU_VARIANTS
from airgap.build.sources.gguf_meta import read_gguf_metadata
from airgap.build.spec import Spec, load_spec
from airgap.bundle.container import Head, read_head, read_payload
from airgap.bundle.drops import create_root, write_root_file
from airgap.errors import SpecError
from airgap.hardware.facts import probe_facts
from airgap.trust.signing import TrustPolicy, key_id
from tests.support import write_spec

EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Build:
    bundle: Path
    spec: Spec
    key: Ed25519PrivateKey
    model: Path


def build(spec: Spec, key: Ed25519PrivateKey, out: Path, **options: object) -> Path:
    return build_bundle(spec, [key], BuildOptions(out_dir=out, progress=False, **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, wheelhouse: Path) -> Build:
    """One bundle of the tiny model and airgap's own wheels, stamped with SOURCE_DATE_EPOCH."""
    folder = tmp_path_factory.mktemp("builder")
    spec = load_spec(write_spec(folder, model=tiny_model, wheelhouse=wheelhouse))
    key = Ed25519PrivateKey.generate()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
        bundle = build(spec, key, folder / "dist")
    return Build(bundle, spec, key, tiny_model)


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def head_of(bundle: Path) -> Head:
    with bundle.open("rb") as stream:
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)  # the bundle verifies against its own manifest
    return head


def test_manifest_lists_every_file_with_its_real_size_and_hash(built: Build) -> None:
    head = head_of(built.bundle)
    TrustPolicy((built.key.public_key(),)).check(head.manifest_bytes, head.signatures)
    stored = members(built.bundle)
    payload = {name for name in stored if name.startswith("files/")}
    assert payload == {e.member_name for e in head.manifest.files}  # nothing packed that the manifest lacks
    for entry in head.manifest.files:  # recomputed from the tar members, with tarfile and zstandard only
        data = stored[entry.member_name]
        assert len(data) == entry.stored_size, entry.path
        if entry.storage == "zstd":
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=entry.size)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), entry.path
    assert stored["SHA256SUMS"] == "".join(f"{e.sha256}  {e.path}\n" for e in head.manifest.files).encode()


def test_model_is_stored_raw_with_its_metadata(built: Build) -> None:
    manifest = head_of(built.bundle).manifest
    entry = manifest.file(f"models/tiny/{built.model.name}")
    assert (entry.kind, entry.storage) == ("model", "raw")
    assert entry.sha256 == hashlib.sha256(built.model.read_bytes()).hexdigest()
    assert entry.source == {"type": "local", "path": str(built.model)}
    (model,) = manifest.models
    assert model.id == "tiny" and model.files == (entry.path,)
    assert model.gguf == dict(read_gguf_metadata(built.model))  # read from the file, not written by hand
    assert model.gguf["architecture"] == "llama" and model.gguf["has_chat_template"] is True


def test_wheels_and_bootstrap_requirements(built: Build) -> None:
    manifest = head_of(built.bundle).manifest
    names = {p.name for p in manifest.packages}
    assert {"airgap", "cryptography", "click", "zfec"} <= names
    bootstrap = manifest.file(BOOTSTRAP_REQUIREMENTS)
    assert bootstrap.storage == "raw"  # an operator installs airgap with tar, sha256sum and pip: no zstd
    text = members(built.bundle)[bootstrap.member_name].decode()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==\S+ --hash=sha256:([0-9a-f]{64})$", text, re.M))
    assert len(pinned) == len(text.splitlines()) and "airgap" in pinned
    by_name = {p.name: manifest.file(p.path) for p in manifest.packages}
    for name, sha in pinned.items():
        assert by_name[name].sha256 == sha
        assert by_name[name].storage == "raw", name  # the wheels those lines pin stay raw too
    assert manifest.python["bootstrap"] == BOOTSTRAP_REQUIREMENTS


def test_source_date_epoch_stamps_the_bundle(built: Build) -> None:
    manifest = head_of(built.bundle).manifest
    assert manifest.created == datetime(2026, 1, 1, tzinfo=UTC)
    assert manifest.expires == manifest.created + timedelta(days=built.spec.expires_days)
    with tarfile.open(built.bundle) as tar:
        assert {m.mtime for m in tar.getmembers()} == {EPOCH}


@pytest.mark.slow
def test_same_inputs_same_bytes(built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    again = build(built.spec, built.key, tmp_path / "dist")
    assert again.read_bytes() == built.bundle.read_bytes()


@pytest.mark.parametrize("value", ["yesterday", "1.5"])
def test_source_date_epoch_must_be_whole_seconds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(SpecError, match=rf"^SOURCE_DATE_EPOCH must be whole seconds since 1970, found "
                                        rf"{re.escape(repr(value))}$"):
        creation_time()


def test_signer_not_a_release_key_of_the_newest_root(built: Build, tmp_path: Path) -> None:
    root_key, release = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    root = create_root(1, [root_key.public_key()], 1, [release.public_key()], 1,
                       datetime(2030, 1, 1, tzinfo=UTC), [root_key])
    write_root_file(tmp_path / "root.1.json", root)
    with pytest.raises(SpecError, match=rf"^signing key {key_id(built.key.public_key())[:16]} is not a release key "
                                        rf"of root version 1; its release keys are "
                                        rf"{key_id(release.public_key())[:16]}$"):
        build(built.spec, built.key, tmp_path / "dist", roots=(tmp_path / "root.1.json",))
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())




def test_quantize_auto_without_a_target_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    spec_path = tmp_path / "auto.toml"
    spec_path.write_text('[bundle]\nname = "auto"\nversion = "1.0"\n\n'
                         '[[models]]\nid = "m"\nrepo = "mistralai/M"\nquantize = "auto"\n')
    with pytest.raises(SpecError) as refused:
        build(load_spec(spec_path), Ed25519PrivateKey.generate(), tmp_path / "out")
    assert refused.value.message == (
        "model 'm': quantize = 'auto' picks the largest quantization that fits a target host; pass --target "
        "PROBE.json (written by `airgap probe` on that host)")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_engine_carries_the_specs_cpu_variants_else_the_targets_else_all(tmp_path: Path) -> None:
    here = probe_facts(tmp_path, nvidia_smi=None)
    haswell = replace(here, cpu_flags=("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"))
    assert cpu_variants((), None) == CPU_VARIANTS
    assert cpu_variants((), haswell) == ("x64", "haswell")
    assert cpu_variants((), replace(here, cpu_flags=())) == CPU_VARIANTS  # a probe without flags: all
    assert cpu_variants(("x64", "zen4"), haswell) == ("x64", "zen4")  # the spec's choice beats the target's
