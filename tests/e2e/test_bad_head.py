"""Hostile heads through the real CLI: one line on stderr, a non-zero exit, the active version untouched.

The stick attacker edits a real bundle's bytes; the leaked-key holder signs with a real release key
(the in-process writer, airgap.bundle.container.write_bundle, with the key `airgap keygen` made).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airgap.bundle.container import member_bytes, read_head_from_path
from airgap.format.manifest import ModelEntry
from airgap.trust.keyfiles import read_private_key
from airgap.trust.roots import ROOT_PAYLOAD_TYPE, Role, new_root
from airgap.trust.signing import Envelope, encode_signatures, sign_envelope
from tests.conftest import Built, make_keys
from tests.e2e.serve_support import make_installed_prefix
from tests.support import airgap, assert_refused, assert_still_works, make_test_bundle, snapshot, write_spec


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One installation for the module: every test here checks that a refusal leaves it as it was."""
    prefix = tmp_path_factory.mktemp("installed") / "prefix"
    result = airgap("install", built.bundle, "--trust", built.keys.public, "--prefix", prefix, "-q")
    assert result.code == 0, result.stderr
    return prefix


def with_manifest(bundle: Path, manifest: bytes, out: Path) -> Path:
    """The bundle with its manifest member replaced (framed by the real writer's member_bytes)."""
    data = bundle.read_bytes()
    size = int(data[124:135], 8)
    mtime = int(data[136:147], 8)
    out.write_bytes(member_bytes("manifest.json", manifest, mtime) + data[512 + size + (-size % 512):])
    return out


def with_pax_before_manifest(bundle: Path, records: bytes, out: Path) -> Path:
    header = bytearray(member_bytes("././@PaxHeader", records, 0))
    header[156:157] = b"x"
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header[:512])
    out.write_bytes(bytes(header) + bundle.read_bytes())
    return out


@pytest.mark.parametrize(("manifest", "message"), [
    (b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100001 levels deep, limit 16"),
    (b'{"format": ' + b"9" * 5000 + b"}", "an integer of 5000 digits, limit 20"),
    (b'{"format": 2, "format": 1}', "key 'format' appears twice"),
])
def test_hostile_json_in_the_manifest_is_one_line_and_never_parsed_under_a_trusted_key(
        built: Built, installed: Path, tmp_path: Path, manifest: bytes, message: str) -> None:
    before = snapshot(installed)
    bad = with_manifest(built.bundle, manifest, tmp_path / "bad.airgap")
    assert_refused(airgap("inspect", bad), message)  # no trust anchor: parsed, within bounds
    assert_refused(airgap("verify", bad, "--trust", built.keys.public), "found 0 valid")  # signature first
    assert_refused(airgap("install", bad, "--trust", built.keys.public, "--prefix", installed), "found 0 valid")
    assert_still_works(installed, before)


@pytest.mark.parametrize(("records", "message"), [
    ("size=\u00b2", "pax size is not a number"), ("size=" + "9" * 30, "pax size is not a number"),
    ("path=manifest.json", "non-canonical tar header"),
])
def test_a_hostile_pax_header_is_one_line(built: Built, tmp_path: Path, records: str, message: str) -> None:
    body = f" {records}\n".encode()
    length = len(body) + len(str(len(body) + 2))
    bad = with_pax_before_manifest(built.bundle, str(length).encode() + body, tmp_path / "pax.airgap")
    for command in ("inspect", "verify"):
        assert_refused(airgap(command, bad, "--trust", built.keys.public) if command == "verify"
                       else airgap(command, bad), message)


@pytest.mark.parametrize("replacement", [b" ", b"\t", b"+"])
def test_a_checksum_in_another_form_is_refused(built: Built, bundle_copy: Path, replacement: bytes) -> None:
    data = bundle_copy.read_bytes()
    bundle_copy.write_bytes(data[:148] + replacement + data[149:])
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public),
                   "non-canonical tar header for member 'manifest.json' at offset 0")


def test_a_signature_with_other_padding_bits_is_refused(built: Built, bundle_copy: Path) -> None:
    head = read_head_from_path(bundle_copy)
    text = base64.b64encode(head.signatures[0].value)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = text[:-3] + bytes([alphabet[alphabet.index(text[-3]) ^ 1]]) + b"=="
    bundle_copy.write_bytes(bundle_copy.read_bytes().replace(text, other, 1))
    assert_refused(airgap("verify", bundle_copy, "--trust", built.keys.public), "non-canonical base64")


def test_sign_refuses_a_short_signatures_member_and_writes_nothing(built: Built, bundle_copy: Path) -> None:
    head = read_head_from_path(bundle_copy)
    data = bundle_copy.read_bytes()
    start = head.signatures_offset - 512
    short = member_bytes("signatures", encode_signatures(head.signatures, block_size=1024),
                         int(head.manifest.created.timestamp()))
    bundle_copy.write_bytes(data[:start] + short + data[start + 512 + 8192:])
    before = bundle_copy.read_bytes()
    assert_refused(airgap("sign", bundle_copy, "--key", built.keys.private),
                   "signatures member must be exactly 8192 bytes, found 1024")
    assert bundle_copy.read_bytes() == before


def test_a_version_that_is_not_pep_440_is_refused_at_build(tmp_path: Path, built: Built, wheelhouse: Path,
                                                          tiny_model: Path) -> None:
    spec = write_spec(tmp_path, version="latest", model=tiny_model, wheelhouse=wheelhouse)
    assert_refused(airgap("build", spec, "--key", built.keys.private, "-o", tmp_path / "dist"),
                   "invalid bundle version: expected a PEP 440 version such as 1.2.0, found 'latest'")


@pytest.mark.parametrize(("files", "version", "models", "message"), [
    ({"notes.txt\n": b"x"}, "1.0", (), "unsafe file path in manifest"),
    ({"notes.txt": b"x"}, "latest", (), "invalid bundle version"),
    ({"models/m.gguf": b"GGUF" * 10}, "1.0", (ModelEntry("m", ("models/m.gguf",), {"block_count": 2**63}),),
     "GGUF field 'block_count' must be a count from 0 to 4096"),
])
def test_a_bundle_signed_with_a_leaked_key_is_still_parsed_strictly(
        built: Built, installed: Path, tmp_path: Path, files: dict[str, bytes], version: str,
        models: tuple[ModelEntry, ...], message: str) -> None:
    before = snapshot(installed)
    key = read_private_key(built.keys.private, None)
    bundle = make_test_bundle(tmp_path / "leaked", files, key, name="tiny-chat", version=version, models=models)
    assert_refused(airgap("verify", bundle, "--trust", built.keys.public), message)
    assert_refused(airgap("install", bundle, "--trust", built.keys.public, "--prefix", installed), message)
    assert_still_works(installed, before)


def test_plan_on_an_installed_manifest_with_absurd_gguf_counts_is_one_line(tmp_path: Path) -> None:
    """A version installed before counts were bounded: plan names the field instead of a MemoryError."""
    install = make_installed_prefix(tmp_path)
    path = install.version / "manifest.json"
    raw = json.loads(path.read_bytes())
    raw["models"][0]["gguf"]["block_count"] = 2**63
    path.write_text(json.dumps(raw, sort_keys=True, indent=1) + "\n")
    assert_refused(airgap("plan", "--prefix", install.prefix),
                   "GGUF field 'block_count' must be a count from 0 to 4096, found 9223372036854775808")


def test_a_root_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, "root")
    private = read_private_key(keys.private, None)
    root = new_root(1, datetime.now(UTC) + timedelta(days=30), Role((private.public_key(),), 1),
                    Role((private.public_key(),), 1))
    payload = root.envelope.payload.replace(b'"format": 1,', b'"format": 1,\n "format": 1,', 1)
    assert payload != root.envelope.payload
    path = tmp_path / "root.json"
    path.write_bytes(sign_envelope(Envelope(ROOT_PAYLOAD_TYPE, payload), private).to_bytes())
    assert_refused(airgap("trust", "init", path, "--prefix", tmp_path / "prefix"), "key 'format' appears twice")


def test_build_refuses_a_gguf_with_absurd_counts(tmp_path: Path, built: Built, wheelhouse: Path) -> None:
    import gguf

    model = tmp_path / "absurd.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_uint64("llama.block_count", 2**63)
    writer.add_embedding_length(64)
    writer.add_context_length(512)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = write_spec(tmp_path, model=model, wheelhouse=wheelhouse)
    assert_refused(airgap("build", spec, "--key", built.keys.private, "-o", tmp_path / "dist"),
                   "GGUF field 'block_count' must be a count from 0 to 4096, found 9223372036854775808")
