"""Validating a mapping read from a rule file against its model, with every problem a RuleError at its place in the
file; in a GAVEL library file, keys the model does not know are kept and reported as warnings instead."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gavel.errors import RuleError, did_you_mean, excerpt
from gavel.io.metadata import FileWarning, field_names, kept, split_unknown, unknown_warnings
from gavel.rules.parser import ConditionSyntaxError
from gavel.rules.source import RuleSource, SourceText
from gavel.rules.spec import FieldError

_ModelT = TypeVar("_ModelT", bound=BaseModel)


def _literal_hint(err: Mapping) -> str | None:
    """"did you mean" for a value outside a Literal (a misspelt severity, status, match, ...)."""
    allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
    guess = did_you_mean(str(err.get("input")), allowed) if allowed else None
    return f"did you mean '{guess}'?" if guess else f"one of: {', '.join(allowed)}" if allowed else None


def pydantic_error(err: Mapping, source: RuleSource, model: type[BaseModel], prefix: str) -> RuleError:
    """One pydantic error, as a RuleError at its place in the file (at the very character for conditions)."""
    loc = tuple(err["loc"])
    path = tuple(p for p in loc if p != "[key]")
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConditionSyntaxError):  # a condition, macro or action: at the very character
        label = f"{prefix}macro '{path[1]}'" if path[:1] == ("macros",) and len(path) > 1 else prefix.rstrip(": ")
        text = SourceText(label, cause.condition, source, path, "")
        return RuleError(f"{label}: {cause.message}" if label else cause.message, location=text.location(cause.offset),
                         excerpt=text.excerpt(cause.offset), hint=cause.hint)
    if isinstance(cause, FieldError):
        return source.error(cause.path, prefix + cause.message, hint=cause.hint)
    dotted = ".".join(map(str, path))
    hint = None
    if err["type"] == "extra_forbidden":
        message, i = f"unknown field '{dotted}'", source.index(path, key=True)
        guess = did_you_mean(str(path[-1]), field_names(model, path[:-1]))
        hint = f"did you mean '{guess}'?" if guess else None
    elif err["type"] == "missing":
        message, i = f"missing required field '{dotted}'", source.index(path[:-1])
    else:
        msg = err["msg"].removeprefix("Value error, ")
        message, i = (f"{dotted}: {msg}" if dotted else msg), source.index(path, key="[key]" in loc)
        hint = _literal_hint(err) if err["type"] == "literal_error" else None
    return RuleError(prefix + message, location=source.location(i), excerpt=excerpt(source.text, i), hint=hint)


def validate(model: type[_ModelT], data: object, source: RuleSource, prefix: str, errors: list[RuleError],
             warnings: list[FileWarning] | None = None) -> tuple[_ModelT | None, dict[str, Any]]:
    """`data` as a `model`, its problems added to `errors`. With `warnings` (a GAVEL library file), keys the model
    does not know are left out, added there as warnings and returned (by dotted path) to be kept; without, they
    are errors like any other problem."""
    unknown: dict = {}
    if warnings is not None:
        data, unknown = split_unknown(model, data)
        warnings.extend(unknown_warnings(unknown, source, model, prefix))
    try:
        return model.model_validate(data), kept(unknown)
    except ValidationError as e:
        errors.extend(pydantic_error(err, source, model, prefix) for err in e.errors())
        return None, kept(unknown)

