"""How a name in a condition resolves: the rule's groups -> the pack's lists -> its macros -> other rules -> an
exact CE name -> a wildcard (semantics.md, "Names"); and how GAVEL files write names of other files: `name`,
`namespace/name` or `namespace/kind/name`."""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
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


_PART = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Reference:
    """A name as a GAVEL file writes it: bare (`trust_seeding`), namespaced (`gavel/trust_seeding`) or fully
    qualified (`gavel/ce/trust_seeding`); the kind comes from the field (`groups:` CEs, `rules:` rules)."""

    name: str
    namespace: str | None = None

    def __str__(self) -> str:
        return self.name if self.namespace is None else f"{self.namespace}/{self.name}"


def parse_reference(text: str, kind: Literal["ce", "rule"]) -> Reference:
    """The reference `text` in a field that lists `kind`s; ValueError saying what is wrong with it."""
    parts = text.split("/")
    if len(parts) > 3 or not all(_PART.fullmatch(p) for p in parts):
        raise ValueError(f"'{text}' is not a {kind} name, `namespace/name` or `namespace/{kind}/name`")
    if len(parts) == 3 and parts[1] != kind:
        raise ValueError(f"'{text}' names a {parts[1]}, but this field lists {kind}s")
    return Reference(parts[-1], parts[0] if len(parts) > 1 else None)
