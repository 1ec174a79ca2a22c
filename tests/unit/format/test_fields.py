"""The one reader of untrusted JSON: each refusal, word for word, in the caller's error class."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from airgap.errors import FormatError, PlanError
from airgap.format.fields import Fields

DOC = {"name": "x", "size": 3, "flag": True, "neg": -1, "list": [1, 2, 3], "obj": {"a": "b"}, "names": ["a", "b"],
       "objs": [{"k": 1}, 2], "mixed": {"a": 1}}


def test_reads_each_kind() -> None:
    doc = Fields(DOC, "thing")
    assert (doc.text("name"), doc.num("size"), doc.obj("obj"), doc.items("list", 3)) == ("x", 3, {"a": "b"}, [1, 2, 3])
    assert (doc.optional_text("missing"), doc.optional_num("missing"), doc.count("missing", 7)) == (None, None, 7)
    assert (doc.positive("size"), doc.texts("names"), doc.texts("missing")) == (3, ("a", "b"), ())
    assert (doc.mapping("missing"), doc.text_table("obj")) == ({}, {"a": "b"})
    assert doc.objects("missing") == [] and doc.only(DOC) is doc
    assert (doc.optional_flag("flag"), doc.optional_flag("missing"), doc.optional_text("name", empty=False)) == (
        True, None, "x")
    assert (doc.optional_sub("obj").what, doc.optional_sub("obj").text("a"), doc.optional_sub("missing").raw) == (
        "thing.obj", "b", {})


@pytest.mark.parametrize(("read", "message"), [
    (lambda d: d.text("size"), "field 'size' must be a string, found 3"),
    (lambda d: d.num("flag"), "field 'flag' must be an integer, found True"),
    (lambda d: d.num("neg"), "field 'neg' must not be negative, found -1"),
    (lambda d: d.obj("list"), "field 'list' must be an object, found [1, 2, 3]"),
    (lambda d: d.items("obj", 3), "field 'obj' must be a list, found {'a': 'b'}"),
    (lambda d: d.items("list", 2), "field 'list' has 3 items, limit 2"),
    (lambda d: d.positive("neg"), "field 'neg' must be a positive integer, found -1"),
    (lambda d: d.texts("list"), "field 'list' must be a list of strings, found [1, 2, 3]"),
    (lambda d: d.objects("obj"), "field 'obj' must be a list, found {'a': 'b'}"),
    (lambda d: d.objects("objs"), "expected a JSON object, found int"),
    (lambda d: d.optional_flag("name"), "field 'name' must be true or false, found 'x'"),
    (lambda d: d.optional_flag("size"), "field 'size' must be true or false, found 3"),
    (lambda d: d.optional_sub("list"), "field 'list' must be an object, found [1, 2, 3]"),
    (lambda d: d.text_table("mixed"), "field 'mixed' must be an object of strings, found {'a': 1}"),
    (lambda d: d.only(("name", "size")), "expected only the fields name, size, found 'flag', 'list', 'mixed', "
                                         "'names', 'neg'"),
])
def test_each_refusal_names_the_object_and_the_field(read: Callable[[Fields], object], message: str) -> None:
    with pytest.raises(PlanError) as refused:
        read(Fields(DOC, "thing", error=PlanError))
    what = "thing objs[1]" if "found int" in message else "thing"
    assert str(refused.value) == f"invalid {what}: {message}"


def test_an_empty_optional_text_can_be_refused() -> None:
    assert Fields({"e": ""}, "thing").optional_text("e") == ""
    with pytest.raises(FormatError) as refused:
        Fields({"e": ""}, "thing").optional_text("e", empty=False)
    assert str(refused.value) == "invalid thing: field 'e' must be a non-empty string, found ''"


def test_a_huge_value_is_quoted_short() -> None:
    with pytest.raises(FormatError) as refused:
        Fields({"name": 7 * 10**200}, "thing").text("name")
    assert len(str(refused.value)) == len("invalid thing: field 'name' must be a string, found ") + 80


def test_not_an_object() -> None:
    with pytest.raises(FormatError, match=r"^invalid thing: expected a JSON object, found list$"):
        Fields([], "thing")
