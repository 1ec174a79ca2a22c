from __future__ import annotations

import json

import pytest

from airgap.errors import FormatError
from airgap.format.strictjson import JsonLimits, loads, nesting_depth


def test_deep_nesting_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="nested 100000 levels deep, limit 16"):
        loads(b"[" * 100_000 + b"]" * 100_000, "manifest")
    with pytest.raises(FormatError, match="nested 100000 levels deep"):  # unbalanced: still counted, not parsed
        loads(b'{"a":' * 100_000, "manifest")


def test_huge_integers_and_numbers_out_of_range_are_refused() -> None:
    with pytest.raises(FormatError, match="an integer of 5000 digits, limit 20"):
        loads(b'{"size": ' + b"9" * 5000 + b"}", "manifest")
    with pytest.raises(FormatError, match="out of range"):
        loads(b"[1e999]", "manifest")
    with pytest.raises(FormatError, match="NaN is not a JSON number"):
        loads(b"[NaN]", "manifest")
    assert loads(b"[18446744073709551615, -1, 0.5]", "x") == [2**64 - 1, -1, 0.5]


def test_duplicate_keys_are_refused_at_any_depth() -> None:
    with pytest.raises(FormatError, match="key 'name' appears twice in one object"):
        loads(b'{"name": "a", "name": "b"}', "manifest")
    with pytest.raises(FormatError, match="key 'k' appears twice"):
        loads(b'{"files": [{"k": 1, "j": 2, "k": 3}]}', "root file")


def test_invalid_json_and_encoding_are_one_error() -> None:
    with pytest.raises(FormatError, match="manifest is not valid JSON: Expecting"):
        loads(b'{"a": }', "manifest")
    with pytest.raises(FormatError, match="not UTF-8 at byte 2"):
        loads(b'["\xff"]', "manifest")


@pytest.mark.parametrize("document", [
    {"a": [1, {"b": "[[[{{{"}], "c": "\\\"]]]"},
    [[["x\"y", "\\"], {}], []],
    {"s": "}" * 50, "t": [[[[[[1]]]]]]},
    "plain",
])
def test_nesting_depth_is_exact_whatever_the_strings_hold(document: object) -> None:
    def depth(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max((depth(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        return 0

    for text in (json.dumps(document), json.dumps(document, ensure_ascii=False, indent=1)):
        assert nesting_depth(text.encode()) == depth(document)
        assert loads(text.encode(), "x", JsonLimits(max_depth=depth(document))) == document
