from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from airgap.errors import FormatError
from airgap.manifest import FileEntry, Limits, Manifest, ModelEntry, check_path, parse_manifest

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def sample(**changes: object) -> Manifest:
    files = (
        FileEntry("models/tiny/tiny.gguf", 10, "a" * 64, "model", "raw", 10, {"type": "local"}),
        FileEntry("wheels/x-1.0-py3-none-any.whl", 20, "b" * 64, "wheel", "zstd", 15),
    )
    manifest = Manifest(name="tiny-chat", version="1.0.0", created=NOW, expires=NOW + timedelta(days=1),
                        tool_version="0.1.0", files=files,
                        models=(ModelEntry("tiny", ("models/tiny/tiny.gguf",), {"block_count": 2}),))
    return replace(manifest, **changes).with_sha256sums()  # type: ignore[arg-type]


def test_round_trip_is_byte_exact() -> None:
    manifest = sample()
    data = manifest.to_bytes()
    parsed = parse_manifest(data)
    assert parsed == manifest
    assert parsed.to_bytes() == data


def test_canonical_bytes_sorted_ascii() -> None:
    text = sample().to_bytes().decode("ascii")
    assert text.endswith("}\n")
    assert json.dumps(json.loads(text), sort_keys=True, indent=1) + "\n" == text


def mutate(key: str, value: object) -> bytes:
    raw = json.loads(sample().to_bytes())
    raw[key] = value
    return json.dumps(raw).encode()


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "a/./b", "a\\b", "", "é"])
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(FormatError, match="unsafe file path"):
        check_path(path)


def test_manifest_with_escaping_path_refused() -> None:
    raw = json.loads(sample().to_bytes())
    raw["files"][0]["path"] = "../../evil"
    with pytest.raises(FormatError, match="unsafe file path"):
        parse_manifest(json.dumps(raw).encode())


def test_wrong_type_refused() -> None:
    with pytest.raises(FormatError, match="not an airgap manifest"):
        parse_manifest(mutate("_type", "in-toto"))


def test_future_format_refused() -> None:
    with pytest.raises(FormatError, match="reads format 1, found 2"):
        parse_manifest(mutate("format", 2))


def test_size_limit_enforced_before_parsing() -> None:
    with pytest.raises(FormatError, match="manifest too large"):
        parse_manifest(b" " * 100, Limits(max_manifest_bytes=10))


def test_duplicate_paths_differing_in_case_refused() -> None:
    entry = sample().files[0]
    manifest = sample(files=(entry, replace(entry, path=entry.path.upper())))
    with pytest.raises(FormatError, match="twice"):
        parse_manifest(manifest.to_bytes())


def test_sha256sums_field_must_match_files() -> None:
    with pytest.raises(FormatError, match="sha256sums"):
        parse_manifest(mutate("sha256sums", "c" * 64))


def test_negative_and_boolean_numbers_refused() -> None:
    raw = json.loads(sample().to_bytes())
    raw["files"][0]["size"] = -1
    with pytest.raises(FormatError, match="must not be negative"):
        parse_manifest(json.dumps(raw).encode())
    raw["files"][0]["size"] = True
    with pytest.raises(FormatError, match="must be an integer"):
        parse_manifest(json.dumps(raw).encode())


def test_model_naming_unknown_file_refused() -> None:
    manifest = sample(models=(ModelEntry("tiny", ("models/other.gguf",)),))
    with pytest.raises(FormatError, match="does not list"):
        parse_manifest(manifest.to_bytes())


def test_sha256sums_text_lists_carried_files_only() -> None:
    manifest = sample()
    absent = replace(manifest.files[0], storage="absent", stored_size=0)
    drop = sample(files=(absent, manifest.files[1]))
    assert drop.sha256sums_text() == f"{'b' * 64}  wheels/x-1.0-py3-none-any.whl\n".encode()


def test_engine_files_and_embedding_models_round_trip() -> None:
    engine = FileEntry("engine/llama-server", 30, "c" * 64, "engine", "zstd", 12, {"type": "built"})
    manifest = sample(files=(*sample().files, engine),
                      models=(ModelEntry("tiny", ("models/tiny/tiny.gguf",), {"block_count": 2}, embedding=True),))
    parsed = parse_manifest(manifest.to_bytes())
    assert parsed == manifest and parsed.models[0].embedding is True
    assert parsed.file("engine/llama-server").kind == "engine"
    assert b'"embedding"' not in sample().to_bytes()  # a chat model's manifest bytes are as before


def test_embedding_flag_must_be_a_boolean() -> None:
    raw = json.loads(sample().to_bytes())
    raw["models"][0]["embedding"] = "yes"
    with pytest.raises(FormatError) as caught:
        parse_manifest(json.dumps(raw).encode())
    assert caught.value.message == "invalid model 'tiny': 'embedding' must be true or false, found 'yes'"
