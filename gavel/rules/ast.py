"""Typed, frozen condition AST built by the parser; what the linter and compiler walk."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class Span:
    """Character offsets [start, end) of a node inside its condition text."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Name:
    """A bare group or CE name: any CE of the group (or that CE) detected."""

    name: str
    span: Span

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class AllOf:
    """`all of G`: every CE of group G detected."""

    group: str
    span: Span

    def __str__(self) -> str:
        return f"all of {self.group}"


@dataclass(frozen=True, slots=True)
class KOf:
    """`k of G`: at least k distinct CEs of group G detected."""

    k: int
    group: str
    span: Span

    def __str__(self) -> str:
        return f"{self.k} of {self.group}"


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


Expr = Union[Name, AllOf, KOf, And, Or]
Selector = Union[AllOf, KOf]


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of `expr`, parents before children, left to right."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (And, Or)):
            stack.extend(reversed(node.terms))


def depth(expr: Expr) -> int:
    """Levels of and/or nesting above the deepest selector or name (a bare name is depth 1)."""
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, (And, Or)):
            stack.extend((term, level + 1) for term in node.terms)
    return deepest
