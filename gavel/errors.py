"""One error root for everything a user can cause, each carrying where it happened, and the helpers that say
where: line and column of an offset, the source line with a caret under it."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

C = TypeVar("C", bound=str)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a problem sits: a file (or other source name), line and column, 1-based."""

    path: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.path or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def excerpt(text: str, offset: int, width: int = 80) -> str:
    """The source line holding `offset`, with a caret under it (long lines are cut around it)."""
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    line = text[start:end if end >= 0 else len(text)]
    col = offset - start
    cut = max(0, col - width // 2)
    shown = line[cut:cut + width]
    return f"{shown}\n{' ' * (col - cut)}^"


class GavelError(ValueError):
    """Root of every error gavel raises for bad input, configs, artifacts or models.

    The CLI prints these as one line and exits 2; nothing else should reach a user.
    """

    def __init__(self, message: str, *, location: Location | None = None,
                 excerpt: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.excerpt = excerpt
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.location}: {self.message}" if self.location else self.message
        if self.excerpt:
            text += "\n" + self.excerpt.rstrip("\n")
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class SiteError(GavelError):
    """A hook site name that does not exist or cannot be resolved on this model."""


class ModelLoadError(GavelError):
    """A model spec that cannot be loaded (missing directory, unknown architecture)."""


class ArtifactError(GavelError):
    """A CE bank or other artifact that is malformed or belongs to another model."""


class RuleError(GavelError):
    """A rule that cannot be parsed, validated or compiled."""


class DataError(GavelError):
    """A malformed dataset, conversation or labelled-span file."""


class NotFittedError(GavelError, AttributeError):
    """An estimator used before `fit`."""

    def __init__(self, estimator: object) -> None:
        name = type(estimator).__name__
        super().__init__(f"This {name} instance is not fitted yet; call 'fit' first.")


def check_is_fitted(estimator: object, attributes: tuple[str, ...]) -> None:
    """Raise NotFittedError unless every learned attribute is present."""
    if not all(getattr(estimator, a, None) is not None for a in attributes):
        raise NotFittedError(estimator)


def one_of(value: str, choices: tuple[C, ...], what: str, error: type[GavelError] | None = None) -> C:
    """`value` as one of `choices` (typically a Literal's values), or an error (`error`, default DataError) naming
    `what` and the choices, with a suggestion."""
    for choice in choices:
        if value == choice:
            return choice
    guess = did_you_mean(value, choices)
    raise (error or DataError)(f"unknown {what} {value!r}; known: {', '.join(choices)}",
                               hint=f"did you mean {guess!r}?" if guess else None)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest known name to a misspelt one, or None."""
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None
