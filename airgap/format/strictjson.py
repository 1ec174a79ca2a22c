"""The one JSON loader for hostile documents: manifests, root files and volume indexes. Pure: bytes in.

Python's `json` accepts what no airgap writer emits and fails in ways that are not errors of ours:
nesting deeper than the interpreter's recursion limit (RecursionError), integers of thousands of
digits (ValueError, or seconds of CPU), NaN and Infinity, and duplicate keys (the last one wins, so
two readers could see two documents in one file). Here each of those is a FormatError, and the
bounds are checked in time linear in the input, before the document is built.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from airgap.errors import FormatError


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int = 16  # manifests nest 4 deep, root files 4, volume indexes 4
    max_int_digits: int = 20  # 2**64 has 20 digits; every number airgap writes fits in 64 bits
    max_float_chars: int = 32


DEFAULT_JSON_LIMITS = JsonLimits()

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def nesting_depth(data: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, counted without parsing it (exact for valid JSON).

    Escaped backslashes and escaped quotes are removed first (a backslash only occurs inside strings,
    and pairs are taken left to right as a JSON parser does), then everything but quotes and
    brackets; splitting at the quotes leaves the brackets outside strings at the even places.
    """
    marks = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    structure = b"".join(marks.split(b'"')[::2])
    return max(itertools.accumulate(map(_STEP.__getitem__, structure), initial=0))


def loads(data: bytes, what: str, limits: JsonLimits = DEFAULT_JSON_LIMITS) -> Any:
    """Parse UTF-8 JSON strictly; FormatError (naming `what`) for anything outside the limits."""
    depth = nesting_depth(data)
    if depth > limits.max_depth:
        raise FormatError(f"{what} is not valid JSON for airgap: nested {depth} levels deep, limit {limits.max_depth}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not valid JSON: not UTF-8 at byte {exc.start}") from exc

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > limits.max_int_digits:
            raise FormatError(f"{what} is not valid JSON for airgap: an integer of {len(digits)} digits, "
                              f"limit {limits.max_int_digits}")
        return int(digits)

    def parse_float(digits: str) -> float:
        if len(digits) > limits.max_float_chars or not math.isfinite(value := float(digits)):
            raise FormatError(f"{what} is not valid JSON for airgap: number {digits[:40]!r} out of range")
        return value

    def constant(name: str) -> Any:
        raise FormatError(f"{what} is not valid JSON: {name} is not a JSON number")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise FormatError(f"{what} is not valid JSON for airgap: key {duplicate[:80]!r} appears twice in "
                              "one object")
        return result

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=constant,
                          object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # only for invalid JSON that the depth count could not see through
        raise FormatError(f"{what} is not valid JSON: nested too deep") from exc
