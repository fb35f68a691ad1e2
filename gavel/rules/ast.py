"""Typed, frozen condition AST built by the parser; what the linter and compiler walk.

Numbers that a pack may parameterise (thresholds, windows, k) are `Param` nodes until `bind_params` replaces
them; `str()` of any node is its canonical source text (what `gavel rules fmt` writes).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Union

from gavel.plugins.functions import BUILTIN_FUNCTIONS

Comparison = Literal[">", ">=", "<", "<=", "==", "!="]
SCOPES = ("prompt", "response", "user", "assistant", "system", "conversation")
FUNCTIONS = BUILTIN_FUNCTIONS


@dataclass(frozen=True, slots=True)
class Span:
    """Character offsets [start, end) of a node inside its condition text."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Param:
    """`${name}` or `${name:default}`: a number the pack (or the caller) sets when rules are loaded."""

    name: str
    default: float | None
    span: Span

    def __str__(self) -> str:
        return "${" + self.name + ("" if self.default is None else f":{_num(self.default)}") + "}"


Number = Union[float, int, Param]


def _num(value: Number) -> str:
    if isinstance(value, Param):
        return str(value)
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _window(n: Number) -> str:
    return f"{_num(n)} token" + ("" if n == 1 else "s")


@dataclass(frozen=True, slots=True)
class Name:
    """A bare name: a CE, a group (any of its CEs), a macro, another rule, or a CE wildcard like `harm_*`."""

    name: str
    span: Span

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Compare:
    """`ce > 0.8`: the CE's score at this token compared with a constant (a group: any of its CEs)."""

    name: str
    op: Comparison
    value: Number
    span: Span

    def __str__(self) -> str:
        return f"{self.name} {self.op} {_num(self.value)}"


@dataclass(frozen=True, slots=True)
class Select:
    """`all of G`, `any of G`, `k of G`, or the same over a list `k of (a, b > 0.9, once c)`."""

    quantifier: Literal["all", "any"] | Number
    group: str | None
    items: tuple[Expr, ...]
    span: Span

    def __str__(self) -> str:
        q = self.quantifier if self.quantifier == "all" or self.quantifier == "any" else _num(self.quantifier)
        target = self.group if self.group is not None else "(" + ", ".join(map(str, self.items)) + ")"
        return f"{q} of {target}"


@dataclass(frozen=True, slots=True)
class Aggregate:
    """`count(expr) >= k within N tokens`, `max(ce) over N tokens > t` (also min, mean, and the score functions
    plugins add, which always have a window); no window: so far."""

    function: str          # one of FUNCTIONS, or a plugin score function's name
    arg: Expr
    window: Number | None
    op: Comparison
    value: Number
    span: Span

    def __str__(self) -> str:
        text = f"{self.function}({self.arg})"
        if self.function == "count":
            return f"{text} {self.op} {_num(self.value)}" + ("" if self.window is None else
                                                           f" within {_window(self.window)}")
        over = "" if self.window is None else f" over {_window(self.window)}"
        return f"{text}{over} {self.op} {_num(self.value)}"


@dataclass(frozen=True, slots=True)
class Not:
    """`not x`: x does not hold at this token."""

    term: Expr
    span: Span

    def __str__(self) -> str:
        return f"not {_wrap(self.term, _UNARY_OK)}"


@dataclass(frozen=True, slots=True)
class And:
    """Every term holds."""

    terms: tuple[Expr, ...]
    span: Span

    def __str__(self) -> str:
        return " and ".join(f"({t})" if isinstance(t, Or) else str(t) for t in self.terms)


@dataclass(frozen=True, slots=True)
class Or:
    """At least one term holds."""

    terms: tuple[Expr, ...]
    span: Span

    def __str__(self) -> str:
        return " or ".join(str(t) for t in self.terms)


@dataclass(frozen=True, slots=True)
class Once:
    """`once x` (or `ever x`): x held at some token so far; `once x within N tokens`: at one of the last N."""

    term: Expr
    window: Number | None
    span: Span

    def __str__(self) -> str:
        within = "" if self.window is None else f" within {_window(self.window)}"
        return f"once {_wrap(self.term, _OPERAND_OK)}{within}"


@dataclass(frozen=True, slots=True)
class Then:
    """`a then b within N tokens`: b holds now and a held at one of the N tokens before (no window: any before)."""

    first: Expr
    second: Expr
    window: Number | None
    span: Span

    def __str__(self) -> str:
        within = "" if self.window is None else f" within {_window(self.window)}"
        return f"{_wrap(self.first, _OPERAND_OK)} then {_wrap(self.second, _OPERAND_OK)}{within}"


@dataclass(frozen=True, slots=True)
class Sustained:
    """`x for N tokens`: x held at each of the last N tokens (this one included)."""

    term: Expr
    window: Number
    span: Span

    def __str__(self) -> str:
        return f"{_wrap(self.term, _OPERAND_OK)} for {_window(self.window)}"


@dataclass(frozen=True, slots=True)
class Scoped:
    """`x in user`: x evaluated over only the tokens of a scope, and false outside it."""

    term: Expr
    scope: str
    span: Span

    def __str__(self) -> str:
        return f"{_wrap(self.term, _PRIMARY)} in {self.scope}"


Expr = Union[Name, Compare, Select, Aggregate, Not, And, Or, Once, Then, Sustained, Scoped]
_PRIMARY = (Name, Compare, Select)
_OPERAND_OK = (*_PRIMARY, Scoped)               # what `once`, `then`, `for` take without parentheses
_UNARY_OK = (*_OPERAND_OK, Not, Once, Then, Sustained, Aggregate)


def _wrap(expr: Expr, bare: tuple[type, ...]) -> str:
    return str(expr) if isinstance(expr, bare) else f"({expr})"


def children(expr: Expr) -> tuple[Expr, ...]:
    """The sub-expressions of a node, left to right."""
    if isinstance(expr, (And, Or)):
        return expr.terms
    if isinstance(expr, Select):
        return expr.items
    if isinstance(expr, Then):
        return (expr.first, expr.second)
    if isinstance(expr, Aggregate):
        return (expr.arg,)
    if isinstance(expr, (Not, Once, Sustained, Scoped)):
        return (expr.term,)
    return ()


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of `expr`, parents before children, left to right."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def depth(expr: Expr) -> int:
    """Levels of nesting above the deepest leaf (a bare name is depth 1)."""
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children(node))
    return deepest


def params(expr: Expr) -> Iterator[Param]:
    """Every `${...}` parameter the expression uses, in source order."""
    found = [getattr(node, f.name) for node in walk(expr) for f in fields(node)
             if isinstance(getattr(node, f.name), Param)]
    yield from sorted(found, key=lambda p: p.span.start)


def bind_params(expr: Expr, values: Mapping[str, float]) -> Expr:
    """`expr` with every parameter replaced by `values[name]`, else its default; KeyError names one unset."""
    def bind(value: object) -> object:
        if not isinstance(value, Param):
            return value
        if value.name in values:
            return values[value.name]
        if value.default is None:
            raise KeyError(value.name)
        return value.default

    def rebuild(node: Expr) -> Expr:
        # new values of fields of several types (numbers, sub-expressions, tuples of them), for `replace` on
        # whichever node class this is: only Any fits every class's fields at once
        changes: dict[str, Any] = {f.name: bind(getattr(node, f.name)) for f in fields(node)
                                   if isinstance(getattr(node, f.name), Param)}
        if isinstance(node, (And, Or)):
            changes["terms"] = tuple(rebuild(t) for t in node.terms)
        elif isinstance(node, Select):
            changes["items"] = tuple(rebuild(t) for t in node.items)
        elif isinstance(node, Then):
            changes.update(first=rebuild(node.first), second=rebuild(node.second))
        elif isinstance(node, Aggregate):
            changes["arg"] = rebuild(node.arg)
        elif isinstance(node, (Not, Once, Sustained, Scoped)):
            changes["term"] = rebuild(node.term)
        return replace(node, **changes) if changes else node

    return rebuild(expr)


@dataclass(frozen=True, slots=True)
class Action:
    """What a rule does when it fires: `alert "text"`, `block "reply"`, `rotate(plane="refusal", angle=30)`."""

    name: str
    text: str | None = None
    args: tuple[tuple[str, str | float | int | Param], ...] = ()
    span: Span = Span(0, 0)

    def __str__(self) -> str:
        if self.args:
            def lit(v: str | Number) -> str:
                return _quote(v) if isinstance(v, str) else _num(v)
            return f"{self.name}(" + ", ".join(f"{k}={lit(v)}" for k, v in self.args) + ")"
        return self.name if self.text is None else f"{self.name} {_quote(self.text)}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
