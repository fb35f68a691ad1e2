"""Where rule text lives: the file position of every field, and of every character of condition-bearing strings.

A `RuleSource` is one rule file (YAML or .gvl) seen from one node (a rule of a pack, or the pack itself); a
`SourceText` is one string of it (a condition, an exception's or a macro's condition, an action) whose
offsets map back to file line and column, so every error can point at the exact character.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gavel.errors import GavelError, Location, RuleError, excerpt, line_column
from gavel.io.yamlsource import PathKey, YamlSource


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


class RuleSource(YamlSource):
    """A rule file seen from one node (a rule of a pack, or the pack itself); its errors are RuleErrors."""

    error_type: ClassVar[type[GavelError]] = RuleError

    def error(self, path: PathKey, message: str, *, key: bool = True, hint: str | None = None) -> RuleError:
        err = super().error(path, message, key=key, hint=hint)
        assert isinstance(err, RuleError)
        return err


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
        return excerpt(self.text, offset) if i is None or self.source is None else excerpt(self.source.text, i)

    def error(self, message: str, offset: int = 0, hint: str | None = None) -> RuleError:
        """A RuleError at character `offset` of this string."""
        return RuleError(f"{self.label}: {message}", location=self.location(offset), excerpt=self.excerpt(offset),
                         hint=hint)
