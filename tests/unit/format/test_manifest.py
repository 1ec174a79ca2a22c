from __future__ import annotations

import json
import re
import time
import timeit
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from airgap.errors import FormatError, IntegrityError
from airgap.format.manifest import (
    DEFAULT_LIMITS,
    DraftFile,
    FileEntry,
    Limits,
    Manifest,
    ModelEntry,
    PythonPackage,
    check_name,
    check_path,
    draft_of,
    manifest_size,
    parse_manifest,
    sha256sums_size,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def sample(**changes: object) -> Manifest:
    files = (
        FileEntry("models/tiny/tiny.gguf", 10, "a" * 64, "model", "raw", 10, {"type": "local"}),
        FileEntry("wheels/x-1.0-py3-none-any.whl", 20, "b" * 64, "wheel", "zstd", 15, stored_sha256="c" * 64),
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
    with pytest.raises(FormatError, match="reads format 1 or 2, found 3"):
        parse_manifest(mutate("format", 3))


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


def worst_case_manifest(limits: Limits = DEFAULT_LIMITS) -> bytes:
    """As many entries as the limits allow, each model and package naming files, then source text up to the
    byte limit: what a hostile stick can hand `inspect` (made by the real writer, Manifest.to_bytes)."""
    files = [FileEntry(f"f/{i:x}", 0, "a" * 64, "meta", "raw", 0) for i in range(limits.max_files)]
    models = tuple(ModelEntry(f"m{i}", tuple(files[j].path for j in range(i * 10, i * 10 + 10)))
                   for i in range(limits.max_models))
    packages = tuple(PythonPackage(f"p{i}", "1.0", files[i].path) for i in range(limits.max_packages))
    manifest = Manifest("worst", "1.0", NOW, NOW + timedelta(days=1), "0.1.0", tuple(files), models=models,
                        packages=packages).with_sha256sums()
    room = limits.max_manifest_bytes - len(manifest.to_bytes()) - 100
    per_file = room // len(files) - 20  # '"source": {"u": "..."}' on each entry
    source = {"u": "x" * min(per_file, limits.max_source_chars - 1)}
    return replace(manifest, files=tuple(replace(f, source=source) for f in files)).with_sha256sums().to_bytes()


def cpu_seconds(data: bytes, limits: Limits = DEFAULT_LIMITS) -> float:
    """Best of three, in CPU time: the machine running the tests may be busy with other work."""
    return min(timeit.repeat(lambda: parse_manifest(data, limits), number=1, repeat=3, timer=time.process_time))


def test_the_worst_manifest_the_limits_allow_parses_in_well_under_a_second() -> None:
    data = worst_case_manifest()
    assert len(data) > DEFAULT_LIMITS.max_manifest_bytes // 2
    parsed = parse_manifest(data)
    assert (len(parsed.files), len(parsed.packages), len(parsed.models)) == (
        DEFAULT_LIMITS.max_files, DEFAULT_LIMITS.max_packages, DEFAULT_LIMITS.max_models)
    assert len(data) <= DEFAULT_LIMITS.max_manifest_bytes
    best = cpu_seconds(data)
    assert best < 0.5, f"{best:.2f} s"


def test_validation_is_linear() -> None:
    """Twice the entries take about twice the time, not four times (per-entry path sets were quadratic)."""
    small, large = Limits(max_files=2_500, max_packages=1_250, max_models=64), Limits(
        max_files=10_000, max_packages=5_000, max_models=256)
    times = [cpu_seconds(worst_case_manifest(lim), lim) for lim in (small, large)]
    assert times[1] < 8 * times[0], times  # 4x the entries; quadratic would be 16x


@pytest.mark.parametrize(("limits", "message"), [
    (Limits(max_files=9), "field 'files' has 10 items, limit 9"),
    (Limits(max_packages=2), "field 'packages' has 3 items, limit 2"),
    (Limits(max_models=1), "field 'models' has 2 items, limit 1"),
    (Limits(max_manifest_bytes=1000), "manifest too large: limit 1000 bytes"),
    (Limits(max_path_length=2), "unsafe file path"),
])
def test_each_count_has_a_limit(limits: Limits, message: str) -> None:
    files = tuple(FileEntry(f"f/{i}", 0, "a" * 64, "meta", "raw", 0) for i in range(10))
    manifest = sample(files=files, models=(ModelEntry("a", ("f/1",)), ModelEntry("b", ("f/2",))),
                      packages=tuple(PythonPackage(f"p{i}", "1.0", f"f/{i}") for i in range(3)))
    parse_manifest(manifest.to_bytes())
    with pytest.raises(FormatError, match=re.escape(message)):
        parse_manifest(manifest.to_bytes(), limits)


def test_source_fields_are_bounded() -> None:
    entry = replace(sample().files[0], source={"url": "x" * 5000})
    with pytest.raises(FormatError, match="at most 16 string fields of at most 4096 characters"):
        parse_manifest(sample(files=(entry, *sample().files[1:])).to_bytes())


@pytest.mark.parametrize(("key", "value", "message"), [
    ("path", "notes.txt\n", "unsafe file path"),
    ("sha256", "a" * 64 + "\n", "invalid sha256"),
])
def test_a_trailing_newline_never_passes_validation(key: str, value: str, message: str) -> None:
    raw = json.loads(sample().to_bytes())
    raw["files"][0][key] = value
    with pytest.raises(FormatError, match=message):
        parse_manifest(json.dumps(raw).encode())


@pytest.mark.parametrize("name", ["tiny-chat\n", "tiny\nchat"])
def test_a_trailing_newline_never_passes_in_names(name: str) -> None:
    with pytest.raises(FormatError, match="invalid bundle name"):
        parse_manifest(mutate("name", name))
    with pytest.raises(FormatError, match="invalid model id"):
        check_name(name, "model id")


@pytest.mark.parametrize("version", ["latest", "1.0\n", "1.0-final-final", ""])
def test_a_bundle_version_must_be_pep_440(version: str) -> None:
    with pytest.raises(FormatError, match="invalid bundle version"):
        parse_manifest(mutate("version", version))
    base = {"name": "tiny-chat", "version": version, "manifest_sha256": "a" * 64}
    with pytest.raises(FormatError, match="invalid base version"):
        parse_manifest(mutate("base", base))


def test_duplicate_keys_refused_in_the_manifest() -> None:
    data = sample().to_bytes().replace(b'"name": "tiny-chat",', b'"name": "tiny-chat",\n "name": "other",', 1)
    with pytest.raises(FormatError, match="manifest is not valid JSON for airgap: key 'name' appears twice"):
        parse_manifest(data)


def test_deep_nesting_and_huge_integers_refused_in_the_manifest() -> None:
    with pytest.raises(FormatError, match="nested 100001 levels deep"):
        parse_manifest(b'{"python": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(FormatError, match="an integer of 5000 digits"):
        parse_manifest(sample().to_bytes().replace(b'"size": 10,', b'"size": ' + b"7" * 5000 + b",", 1))


@pytest.mark.parametrize(("field", "value"), [
    ("block_count", 2**63), ("embedding_length", 2**40), ("context_length", -1), ("head_count_kv", [1] * 5000),
    ("head_count_kv", [2**63]), ("vocab_size", True), ("architecture", "x" * 1000), ("other", [1, 2]),
])
def test_gguf_metadata_numbers_are_bounded(field: str, value: object) -> None:
    manifest = sample(models=(ModelEntry("tiny", ("models/tiny/tiny.gguf",), {"block_count": 2, field: value}),))
    with pytest.raises(FormatError, match=f"model 'tiny': GGUF field '{field}' must be"):
        parse_manifest(manifest.to_bytes())


def test_stored_sha256_is_required_for_compressed_files_of_format_2_only() -> None:
    manifest = sample()
    zstd = manifest.files[1]
    with pytest.raises(FormatError, match="field 'stored_sha256' must be a string"):
        parse_manifest(sample(files=(manifest.files[0], replace(zstd, stored_sha256=None))).to_bytes())
    raw = json.loads(manifest.to_bytes())
    raw["files"][0]["stored_sha256"] = "c" * 64  # on a raw file
    with pytest.raises(FormatError, match="stored_sha256 belongs to compressed files of format 2"):
        parse_manifest(json.dumps(raw).encode())
    absent = replace(zstd, storage="absent", stored_size=0)  # made absent by a drop: the writer drops the hash
    assert "stored_sha256" not in json.loads(sample(files=(manifest.files[0], absent)).to_bytes())["files"][1]
    old = sample(files=(manifest.files[0], replace(zstd, stored_sha256=None)), format_version=1)
    assert parse_manifest(old.to_bytes()).format_version == 1  # installed format-1 manifests stay readable
    with pytest.raises(FormatError, match="reads format 2, found 1"):
        parse_manifest(old.to_bytes(), formats=(2,))


def test_engine_files_and_embedding_models_round_trip() -> None:
    engine = FileEntry("engine/llama-server", 30, "c" * 64, "engine", "zstd", 12, {"type": "built"},
                       stored_sha256="d" * 64)
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


# ---------------------------------------------------------------- drafts: files not hashed yet

def test_draft_without_hash_cannot_become_an_entry() -> None:
    with pytest.raises(ValueError, match=r"^models/m/w\.gguf has not been hashed yet$"):
        DraftFile("models/m/w.gguf", 3, "model").hashed()


def test_draft_keeps_a_known_hash_and_refuses_another() -> None:
    known = DraftFile("meta/a", 3, "meta", sha256="a" * 64, stored_size=3)
    assert known.hashed() == FileEntry("meta/a", 3, "a" * 64, "meta", "raw", 3)
    assert known.hashed("a" * 64) == known.hashed()
    with pytest.raises(IntegrityError, match=f"^meta/a changed since it was hashed: expected sha256 {'a' * 64}, "
                                             f"found {'b' * 64}$"):
        known.hashed("b" * 64)


def test_manifest_lists_only_hashed_entries() -> None:
    with pytest.raises(TypeError, match=r"^a manifest lists FileEntry values, found DraftFile for 'meta/a'$"):
        replace(sample(), files=(DraftFile("meta/a", 3, "meta"),))


def test_manifest_size_is_exact_before_the_hashes_are_known() -> None:
    base = sample()
    finals = [*base.files, FileEntry("meta/late", 7, "d" * 64, "meta", "raw", 7), *(
        FileEntry(f"models/m/{n}.gguf", 10**n, f"{n:x}" * 64, "model", "absent", 0) for n in range(1, 12))]
    drafts = [draft_of(e) if e.storage == "zstd" else replace(draft_of(e), sha256=None) for e in finals]
    draft = replace(base, files=(), sha256sums="")
    final = replace(base, files=tuple(finals)).with_sha256sums()
    assert manifest_size(draft, drafts) == len(final.to_bytes())
    assert manifest_size(draft, finals) == len(final.to_bytes())
    assert sha256sums_size(drafts) == len(final.sha256sums_text())
