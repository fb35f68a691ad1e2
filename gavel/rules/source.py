"""Where rule text lives: the file position of every field, and of every character of condition-bearing strings.

A `RuleSource` is one rule file (YAML or .gvl) seen from one node (a rule of a pack, or the pack itself); a
`SourceText` is one string of it (a condition, an exception's or a macro's condition, an action) whose
offsets map back to file line and column, so every error can point at the exact character.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gavel.errors import Location, RuleError
from gavel.rules.parser import excerpt, line_column
from gavel.io.yamlsource import PathKey


class RuleErrors(RuleError):
    """Several rule errors reported together, so one bad rule never hides the others."""

    def __init__(self, errors: Sequence[RuleError]) -> None:
        self.errors = tuple(errors)
        n = len(self.errors)
        super().__init__(f"{n} rule error{'s' if n != 1 else ''}")

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return "\n\n".join([self.message, *map(str, self.errors)])


@dataclass(frozen=True, slots=True)
class RuleSource:
    """A rule file: its text, the index of each value and key, and of each character of its string values.

    `values`, `keys` and `scalars` cover the whole document; paths given to the methods are relative to `base`
    (the node this source stands for: `("rules", 2)` for the third rule of a pack, `()` for the file).
    """

    path: str
    text: str = field(repr=False)
    lines: Sequence[int] = field(repr=False)  # index where each line starts, shared by every rule of one file
    values: Mapping[PathKey, int] = field(repr=False)
    keys: Mapping[PathKey, int] = field(repr=False)
    # per string value: the index of each of its characters, and one past its end
    scalars: Mapping[PathKey, tuple[int, ...]] | None = field(default=None, repr=False)
    base: PathKey = ()

    def at(self, base: PathKey) -> RuleSource:
        """The same file seen from the node at `base` (a path from the document root)."""
        return dataclasses.replace(self, base=base)

    def location(self, index: int) -> Location:
        line = bisect.bisect_right(self.lines, index)
        return Location(self.path, line, index - self.lines[line - 1] + 1)

    def index(self, path: PathKey, *, key: bool = False) -> int:
        """Index of the deepest known node on `path` (the key itself when `key` and it is known)."""
        full = (*self.base, *path)
        for n in range(len(full), -1, -1):
            if key and full[:n] in self.keys:
                return self.keys[full[:n]]
            if full[:n] in self.values:
                return self.values[full[:n]]
        return 0

    def char_index(self, path: PathKey, offset: int) -> int | None:
        """Index in the file of character `offset` of the string at `path`; None when it is not mapped."""
        chars = (self.scalars or {}).get((*self.base, *path))
        return None if chars is None else chars[max(0, min(offset, len(chars) - 1))]

    def error(self, path: PathKey, message: str, *, key: bool = True, hint: str | None = None) -> RuleError:
        """A RuleError at a field (its key when `key`), with the file line and a caret."""
        i = self.index(path, key=key)
        return RuleError(message, location=self.location(i), excerpt=excerpt(self.text, i), hint=hint)


@dataclass(frozen=True)
class SourceText:
    """One condition-bearing string and where it is written: `path` in `source`, or `origin` when built in Python."""

    label: str  # what errors name: "rule 'r'", "rule 'r': exception 'e'", "macro 'm'"
    text: str
    source: RuleSource | None
    path: PathKey
    origin: str  # shown instead of a file when there is no source, e.g. "<rule r>"

    def _index(self, offset: int) -> int | None:
        return None if self.source is None else self.source.char_index(self.path, offset)

    def location(self, offset: int) -> Location:
        """File, line and column of character `offset` (the field's start when the string is not mapped)."""
        if self.source is None:
            return Location(self.origin, *line_column(self.text, offset))
        i = self._index(offset)
        return self.source.location(self.source.index(self.path) if i is None else i)

    def excerpt(self, offset: int) -> str:
        """The source line around character `offset`, with a caret under it."""
        i = self._index(offset)
        return excerpt(self.text, offset) if i is None else excerpt(self.source.text, i)

    def error(self, message: str, offset: int = 0, hint: str | None = None) -> RuleError:
        """A RuleError at character `offset` of this string."""
        return RuleError(f"{self.label}: {message}", location=self.location(offset), excerpt=self.excerpt(offset),
                         hint=hint)
