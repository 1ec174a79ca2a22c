"""Bundle specs: every refusal names the file, what was expected and what was found; the happy paths resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airgap.build.spec import DEFAULT_EXPIRES_DAYS, ModelSpec, PythonSpec, load_spec
from airgap.errors import SpecError

BUNDLE = '[bundle]\nname = "tiny"\nversion = "1.0"\n'


def write(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, message: str) -> None:
    """`load_spec(path)` raises SpecError whose whole message is `<path>: <message>` (message is a regex)."""
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: {message}$"):
        load_spec(path)


# ---------------------------------------------------------------- happy paths

def test_local_model_path_resolves_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "specs" / "weights").mkdir(parents=True)
    model = tmp_path / "specs" / "weights" / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths follow the spec, never the working directory
    spec = load_spec(write(tmp_path / "specs", BUNDLE + '[[models]]\nid = "m"\npath = "weights/../weights/m.gguf"\n'))
    assert spec.models == (ModelSpec(id="m", path=model.resolve()),)
    assert spec.name == "tiny" and spec.version == "1.0"
    assert spec.lock_path == tmp_path / "specs" / "spec.toml.lock"


def test_hub_model_fields(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE + (
        '[[models]]\nid = "a"\nrepo = "org/a-GGUF"\nrevision = "0123abc"\nfile = "a.Q4.gguf"\n'
        'files = ["tokenizer.json"]\n'
        '[[models]]\nid = "b"\nrepo = "org/b"\nallow_patterns = ["*.gguf", "*.json"]\n')))
    assert spec.models == (
        ModelSpec(id="a", repo="org/a-GGUF", revision="0123abc", files=("tokenizer.json", "a.Q4.gguf")),
        ModelSpec(id="b", repo="org/b", revision="main", allow_patterns=("*.gguf", "*.json")),
    )


def test_python_table_defaults_and_no_models(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BUNDLE))
    assert spec.models == ()
    assert spec.python == PythonSpec()
    assert spec.python.index_url is None and spec.python.python_version is None
    assert spec.expires_days == DEFAULT_EXPIRES_DAYS == 180


def test_python_table_fields(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    spec = load_spec(write(tmp_path, BUNDLE + 'expires_days = 30\n[python]\nrequirements = ["numpy>=1"]\n'
                                             'find_links = ["wheels"]\nindex_url = "http://127.0.0.1:9/simple"\n'
                                             'python_version = "3.11"\nplatforms = ["manylinux2014_x86_64"]\n'))
    assert spec.python == PythonSpec(requirements=("numpy>=1",), find_links=(tmp_path / "wheels",),
                                     index_url="http://127.0.0.1:9/simple", python_version="3.11",
                                     platforms=("manylinux2014_x86_64",))
    assert spec.expires_days == 30


# ---------------------------------------------------------------- reading the file

def test_missing_spec(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError, match=rf"^spec not found: {re.escape(str(path))}$"):
        load_spec(path)


def test_invalid_toml(tmp_path: Path) -> None:
    refused(write(tmp_path, "[bundle\n"), r"cannot read spec: Expected '\]' at the end of a table declaration "
                                          r"\(at line 1, column 8\)")


def test_spec_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b'[bundle]\nname = "\xff"\n')
    refused(path, r"cannot read spec: 'utf-8' codec can't decode byte 0xff in position 17: invalid start byte")


def test_spec_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").mkdir()
    refused(tmp_path / "spec.toml", r"cannot read spec: \[Errno 21\] Is a directory: .*spec\.toml'")


# ---------------------------------------------------------------- [bundle]

def test_bundle_table_missing(tmp_path: Path) -> None:
    refused(write(tmp_path, '[[models]]\nid = "m"\n'), r"expected a \[bundle\] table, found NoneType")


def test_bundle_not_a_table(tmp_path: Path) -> None:
    refused(write(tmp_path, 'bundle = "tiny"\n'), r"expected a \[bundle\] table, found str")


def test_bundle_name_missing(tmp_path: Path) -> None:
    refused(write(tmp_path, '[bundle]\nversion = "1.0"\n'), r"expected a non-empty string for 'name', found None")


def test_bundle_name_empty(tmp_path: Path) -> None:
    refused(write(tmp_path, '[bundle]\nname = ""\nversion = "1.0"\n'),
            r"expected a non-empty string for 'name', found ''")


def test_bundle_version_not_a_string(tmp_path: Path) -> None:
    refused(write(tmp_path, '[bundle]\nname = "tiny"\nversion = 1.0\n'),
            r"expected a non-empty string for 'version', found 1\.0")


def test_bundle_name_with_a_slash(tmp_path: Path) -> None:
    refused(write(tmp_path, '[bundle]\nname = "../tiny"\nversion = "1.0"\n'),
            r"invalid bundle name: expected letters, digits, '\.', '_' or '-', found '\.\./tiny'")


def test_bundle_version_with_a_space(tmp_path: Path) -> None:
    refused(write(tmp_path, '[bundle]\nname = "tiny"\nversion = "1 0"\n'),
            r"invalid bundle version: expected letters, digits, '\.', '_' or '-', found '1 0'")


@pytest.mark.parametrize(("value", "shown"), [("0", "0"), ("-3", "-3"), ('"30"', "'30'"), ("true", "True")])
def test_expires_days_not_a_positive_integer(tmp_path: Path, value: str, shown: str) -> None:
    refused(write(tmp_path, BUNDLE + f"expires_days = {value}\n"),
            rf"bundle\.expires_days must be a positive integer, found {shown}")


# ---------------------------------------------------------------- [[models]]

def test_models_not_an_array(tmp_path: Path) -> None:
    refused(write(tmp_path, 'models = "m.gguf"\n' + BUNDLE), r"expected \[\[models\]\] entries, found str")


def test_model_entry_not_a_table(tmp_path: Path) -> None:
    refused(write(tmp_path, 'models = ["m.gguf"]\n' + BUNDLE), r"each \[\[models\]\] entry must be a table")


def test_model_id_missing(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nrepo = "org/m"\nfile = "m.gguf"\n'),
            r"expected a non-empty string for 'id', found None")


def test_model_id_invalid(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "a/b"\nrepo = "org/m"\nfile = "m.gguf"\n'),
            r"invalid model id: expected letters, digits, '\.', '_' or '-', found 'a/b'")


def test_model_ids_must_be_unique(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nrepo = "org/a"\nfile = "a.gguf"\n'
                                     '[[models]]\nid = "m"\nrepo = "org/b"\nfile = "b.gguf"\n'),
            r"model ids must be unique, found \['m', 'm'\]")


def test_model_with_both_path_and_repo(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\npath = "m.gguf"\nrepo = "org/m"\n'),
            r"model 'm' needs exactly one of 'path' \(local file\) or 'repo' \(hub\)")


def test_model_with_neither_path_nor_repo(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nfile = "m.gguf"\n'),
            r"model 'm' needs exactly one of 'path' \(local file\) or 'repo' \(hub\)")


def test_local_model_file_not_found(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\npath = "gone.gguf"\n'),
            rf"model 'm': file not found: {re.escape(str(tmp_path / 'gone.gguf'))}")


def test_local_model_path_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\npath = "weights"\n'),
            rf"model 'm': file not found: {re.escape(str(tmp_path / 'weights'))}")


def test_local_model_path_empty(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\npath = ""\n'),
            r"expected a non-empty string for 'path', found ''")


def test_hub_model_names_no_files(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nrepo = "org/m"\n'),
            r"model 'm' from a repo needs 'file', 'files' or 'allow_patterns'")


def test_hub_model_files_not_strings(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nrepo = "org/m"\nfiles = ["a.gguf", 3]\n'),
            r"expected a list of strings for 'files', found \['a\.gguf', 3\]")


def test_hub_model_allow_patterns_not_a_list(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nrepo = "org/m"\nallow_patterns = "*.gguf"\n'),
            r"expected a list of strings for 'allow_patterns', found '\*\.gguf'")


def test_hub_model_repo_empty(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[[models]]\nid = "m"\nrepo = ""\nfile = "m.gguf"\n'),
            r"expected a non-empty string for 'repo', found ''")


# ---------------------------------------------------------------- [python]

def test_python_not_a_table(tmp_path: Path) -> None:
    refused(write(tmp_path, 'python = "3.11"\n' + BUNDLE), r"\[python\] must be a table")


def test_python_find_links_folder_not_found(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[python]\nfind_links = ["wheels"]\n'),
            rf"python\.find_links folder not found: {re.escape(str(tmp_path / 'wheels'))}")


def test_python_requirements_not_strings(tmp_path: Path) -> None:
    refused(write(tmp_path, BUNDLE + '[python]\nrequirements = "numpy"\n'),
            r"expected a list of strings for 'requirements', found 'numpy'")
