"""The one way to read untrusted JSON (a manifest, a volume index, state.json, GGUF metadata): pure, no I/O.

Every refusal names the object and the field, says what was expected and what was found, and is raised
as the caller's error class, so that each layer keeps its own error while the wording stays one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from airgap.errors import AirgapError, FormatError

MakeError = Callable[[str], AirgapError]
_SHOWN = 80  # characters of a bad value quoted back: a hostile file can make a value huge


class Fields:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, raw: object, what: str, *, error: MakeError = FormatError) -> None:
        if not isinstance(raw, Mapping):
            raise error(f"invalid {what}: expected a JSON object, found {type(raw).__name__}")
        self.raw: Mapping[str, Any] = raw
        self.what = what
        self.error = error

    def refuse(self, key: str, expected: str, value: object) -> AirgapError:
        return self.error(f"invalid {self.what}: field {key!r} must be {expected}, found {repr(value)[:_SHOWN]}")

    def typed(self, key: str, kind: type, kind_name: str) -> Any:
        value = self.raw.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.refuse(key, kind_name, value)
        return value

    def text(self, key: str, *, longest: int | None = None, empty: bool = True) -> str:
        value = str(self.typed(key, str, "a string"))
        if (longest is not None and len(value) > longest) or not (value or empty):
            shape = "a non-empty string" if longest is None else f"a{' non-empty' if not empty else ''} string of " \
                    f"at most {longest} characters"
            raise self.refuse(key, shape, value)
        return value

    def num(self, key: str) -> int:
        value = int(self.typed(key, int, "an integer"))
        if value < 0:
            raise self.error(f"invalid {self.what}: field {key!r} must not be negative, found {value}")
        return value

    def obj(self, key: str) -> dict[str, Any]:
        return dict(self.typed(key, dict, "an object"))

    def items(self, key: str, limit: int) -> list[Any]:
        value = list(self.typed(key, list, "a list"))
        if len(value) > limit:
            raise self.error(f"invalid {self.what}: field {key!r} has {len(value)} items, limit {limit}")
        return value

    def optional_text(self, key: str, *, longest: int | None = None, empty: bool = True) -> str | None:
        """A string, or None where the field is absent or null."""
        return None if self.raw.get(key) is None else self.text(key, longest=longest, empty=empty)

    def optional_flag(self, key: str) -> bool | None:
        """True or false, or None where the field is absent or null."""
        return None if self.raw.get(key) is None else bool(self.typed(key, bool, "true or false"))

    def optional_num(self, key: str) -> int | None:
        """A non-negative integer, or None where the field is absent or null."""
        return None if self.raw.get(key) is None else self.num(key)

    def count(self, key: str, default: int) -> int:
        """A non-negative integer, or `default` where the field is absent or null."""
        return default if self.raw.get(key) is None else self.num(key)

    def positive(self, key: str) -> int:
        value = self.raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.refuse(key, "a positive integer", value)
        return value

    def texts(self, key: str, *, longest: int | None = None, limit: int | None = None) -> tuple[str, ...]:
        """A list of strings (each non-empty and at most `longest` long, where given); absent is the empty list."""
        value = self._bounded(key, limit)
        if not isinstance(value, list) or not all(
                isinstance(v, str) and (longest is None or 0 < len(v) <= longest) for v in value):
            shape = "a list of strings" if longest is None else f"a list of non-empty strings of at most {longest} " \
                    "characters"
            raise self.refuse(key, shape, value)
        return tuple(value)

    def _bounded(self, key: str, limit: int | None) -> Any:
        value = self.raw.get(key, [])
        if limit is not None and isinstance(value, list) and len(value) > limit:
            raise self.error(f"invalid {self.what}: field {key!r} has {len(value)} items, limit {limit}")
        return value

    def sub(self, key: str) -> Fields:
        """The object under `key`, read the same way and named by its path (`probe.memory`)."""
        return Fields(self.raw.get(key), f"{self.what}.{key}", error=self.error)

    def optional_sub(self, key: str) -> Fields:
        """The object under `key` read as sub() reads it; absent is the empty object."""
        return Fields(self.mapping(key), f"{self.what}.{key}", error=self.error)

    def objects(self, key: str, *, limit: int | None = None) -> list[Fields]:
        """A list of objects, each read with its index in its name; absent is the empty list."""
        value = self._bounded(key, limit)
        if not isinstance(value, list):
            raise self.refuse(key, "a list", value)
        return [Fields(item, f"{self.what} {key}[{i}]", error=self.error) for i, item in enumerate(value)]

    def mapping(self, key: str) -> dict[str, Any]:
        """An object; absent is the empty object."""
        return {} if key not in self.raw else self.obj(key)

    def text_table(self, key: str) -> dict[str, str]:
        """An object of strings; absent is the empty object."""
        value = self.mapping(key)
        if not all(isinstance(v, str) for v in value.values()):
            raise self.refuse(key, "an object of strings", value)
        return value

    def only(self, known: Iterable[str]) -> Fields:
        """Refuse fields this reader does not know: a typo or a newer writer, never silently dropped."""
        known = sorted(set(known))
        unknown = sorted(set(self.raw) - set(known))
        if unknown:
            raise self.error(f"invalid {self.what}: expected only the fields {', '.join(known)}, "
                             f"found {', '.join(repr(k)[:_SHOWN] for k in unknown[:5])}")
        return self
