"""Bind `${name}` / `${name:default}` parameters in conditions and action arguments, with located errors.

A parameter takes the value the pack (or the caller) sets, else its default. Windows, `k` and `count`'s
value must come out whole numbers; a whole value binds as an int so the compiler sees what a literal gives.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from gavel.errors import RuleError
from gavel.rules.ast import Action, Aggregate, Expr, Once, Param, Select, Sustained, Then, bind_params, params, walk
from gavel.rules.source import RuleErrors

Value = int | float


class ErrorAt(Protocol):
    """Builds a located error at a character of the text a parameter sits in (a rule's, macro's `.error`)."""

    def __call__(self, message: str, offset: int, hint: str | None = None) -> RuleError: ...


def _whole_uses(expr: Expr) -> Iterator[tuple[Param, str, int]]:
    """Parameters that must be whole numbers: (param, what it is, its least value)."""
    for node in walk(expr):
        if isinstance(node, (Once, Then, Sustained, Aggregate)) and isinstance(node.window, Param):
            yield node.window, "a window", 1
        if isinstance(node, Select) and isinstance(node.quantifier, Param):
            yield node.quantifier, "the `k` of `k of`", 0
        if isinstance(node, Aggregate) and node.function == "count" and isinstance(node.value, Param):
            yield node.value, "what `count` compares with", 0


def _resolve(found: Iterable[Param], values: Mapping[str, Value], error: ErrorAt,
             errors: list[RuleError]) -> dict[str, Value]:
    """One value per parameter name: the given one, else the default; unset names and clashing defaults go to
    `errors`."""
    out: dict[str, Value] = {}
    for p in found:
        value = values.get(p.name, p.default)
        if value is None:
            if p.name not in out:
                errors.append(error(f"parameter '{p.name}' has no value", p.span.start,
                                    hint=f"set it in the pack's `params:`, give a default as in `${{{p.name}:5}}`, "
                                         "or pass params={...} when loading"))
            out.setdefault(p.name, 0)
            continue
        value = int(value) if float(value).is_integer() else float(value)
        if p.name in out and out[p.name] != value:
            errors.append(error(f"parameter '{p.name}' has two different defaults here", p.span.start,
                                hint=f"set '{p.name}' in the pack's `params:`"))
        out.setdefault(p.name, value)
    return out


def bind_condition(expr: Expr, values: Mapping[str, Value], error: ErrorAt) -> Expr:
    """`expr` with every parameter bound; raises RuleErrors (each located) for unset or ill-typed ones."""
    found = list(params(expr))
    if not found:
        return expr
    errors: list[RuleError] = []
    resolved = _resolve(found, values, error, errors)
    for p, what, least in _whole_uses(expr):
        value = resolved[p.name]
        if p.name in values or p.default is not None:
            if not isinstance(value, int) or value < least:
                errors.append(error(f"parameter '{p.name}' is {what}: it needs a whole number >= {least}, not "
                                    f"{value}", p.span.start))
    if errors:
        raise RuleErrors(errors)
    return bind_params(expr, resolved)


def bind_action(action: Action, values: Mapping[str, Value], error: ErrorAt) -> Action:
    """`action` with the parameters of its arguments bound; raises RuleErrors for unset ones."""
    found = [v for _, v in action.args if isinstance(v, Param)]
    if not found:
        return action
    errors: list[RuleError] = []
    resolved = _resolve(found, values, error, errors)
    if errors:
        raise RuleErrors(errors)
    args = tuple((k, resolved[v.name] if isinstance(v, Param) else v) for k, v in action.args)
    return dataclasses.replace(action, args=args)


def action_params(action: Action) -> Iterator[Param]:
    """Every `${...}` parameter an action's arguments use."""
    return (v for _, v in action.args if isinstance(v, Param))
