"""How a name in a condition resolves: the rule's groups -> the pack's lists -> its macros -> other rules -> an
exact CE name -> a wildcard (semantics.md, "Names")."""
from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterator, Mapping
from typing import Literal

from gavel.rules.ast import Compare, Expr, Name, Select, walk

Kind = Literal["group", "list", "macro", "rule", "ce", "wildcard"]


def references(expr: Expr) -> Iterator[tuple[str, int, bool]]:
    """Every name a condition reads, with its character offset and whether it is a selector's target (`k of G`)."""
    for node in walk(expr):
        if isinstance(node, (Name, Compare)):
            yield node.name, node.span.start, False
        elif isinstance(node, Select) and node.group is not None:
            yield node.group, node.span.start, True


def resolve(name: str, *, groups: Collection[str] = (), lists: Collection[str] = (), macros: Collection[str] = (),
            rules: Collection[str] = ()) -> Kind:
    """What `name` stands for, in resolution order."""
    order: tuple[tuple[Kind, Collection[str]], ...] = (("group", groups), ("list", lists), ("macro", macros),
                                                        ("rule", rules))
    for kind, names in order:
        if name in names:
            return kind
    return "wildcard" if "*" in name else "ce"


def wildcard_matches(pattern: str, ces: Collection[str]) -> list[str]:
    """The CE names a wildcard like `harm_*` stands for, in the given order."""
    return [ce for ce in ces if fnmatch.fnmatchcase(ce, pattern)]


def macro_cycles(macros: Mapping[str, Expr], lists: Collection[str] = ()) -> list[tuple[list[str], int]]:
    """Each cycle of macros referring to each other, once: (the names around it, ending where it started; the
    offset, in the last macro's text, of the reference that closes it)."""
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[tuple[list[str], int]] = []
    seen: set[frozenset[str]] = set()

    def visit(name: str) -> None:
        colour[name] = 1
        path.append(name)
        for ref, offset, selector in references(macros[name]):
            if selector or ref in lists or ref not in macros:
                continue
            if colour.get(ref) == 1:
                cycle = [*path[path.index(ref):], ref]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append((cycle, offset))
            elif ref not in colour:
                visit(ref)
        path.pop()
        colour[name] = 2

    for name in macros:
        if name not in colour:
            visit(name)
    return found
