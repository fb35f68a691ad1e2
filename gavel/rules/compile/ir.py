"""The compiler's intermediate representation: one graph of nodes that every compiled rule shares.

A node's value is a bool per token. Nodes name the nodes they read (`inputs`) by id, their index in the `Graph`;
asking the graph for a node it holds returns that node's id, so identical sub-conditions of different rules are
computed once. Scopes are bits over the 8 token classes (role + RESPONSE for response tokens): a node's `view`
is the set of tokens its window or aggregate sees.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

RESPONSE = 4  # added to a token's role code (0 none, 1 system, 2 user, 3 assistant) for response tokens
EVERY = 0xFF  # scope bits: token class k = role + RESPONSE * response is in a scope when bit k is set
SCOPE_BITS = {"prompt": 0x0F, "response": 0xF0, "system": 0x22, "user": 0x44, "assistant": 0x88,
              "conversation": EVERY}


# ---- token atoms: the current token's inputs alone ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fired:
    """CE `ce` fired at this token."""

    ce: int
    inputs: ClassVar[tuple[int, ...]] = ()


@dataclass(frozen=True, slots=True)
class Compared:
    """CE `ce`'s score at this token `op` `value`."""

    ce: int
    op: str
    value: float
    inputs: ClassVar[tuple[int, ...]] = ()


@dataclass(frozen=True, slots=True)
class Scope:
    """This token's class is one of `bits`."""

    bits: int
    inputs: ClassVar[tuple[int, ...]] = ()


# ---- gates over nodes, and windows over past tokens --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Gate:
    """sum(weight * input) >= threshold over (input id, weight) `terms`: and, or, not and k of are gates."""

    terms: tuple[tuple[int, int], ...]   # sorted by input id, no zero weight
    threshold: int

    @property
    def inputs(self) -> tuple[int, ...]:
        return tuple(ref for ref, _ in self.terms)

    @property
    def negated(self) -> int | None:
        """The input this gate is `not` of (its one term weighs -1, the threshold is 0); None for other gates."""
        if self.threshold == 0 and len(self.terms) == 1 and self.terms[0][1] == -1:
            return self.terms[0][0]
        return None


@dataclass(frozen=True, slots=True)
class Count:
    """(tokens of `view` where node `term` held) `op` `k`, over the last `window` tokens of the view (all so far:
    None), ending before this token when `exclude`: once, then, for and count are counts."""

    view: int
    window: int | None
    term: int
    exclude: bool
    op: str
    k: int

    @property
    def inputs(self) -> tuple[int, ...]:
        return (self.term,)

    @property
    def latch(self) -> bool:
        """An unbounded `once`: the term held at some token of the view so far."""
        return self.window is None and not self.exclude and self.op == ">=" and self.k == 1


@dataclass(frozen=True, slots=True)
class Score:
    """`function` (mean, max, min or a plugin score function) of CE `ce`'s scores over the last `window` tokens of
    `view` (all so far: None), `op` `value`. Max and min against a bound are counts of `Compared` instead."""

    view: int
    function: str
    window: int | None
    ce: int
    op: str
    value: float
    inputs: ClassVar[tuple[int, ...]] = ()


Node = Fired | Compared | Scope | Gate | Count | Score


class Graph:
    """The nodes of a set of rules, each distinct node once, with its depth (1 + its deepest input's; atoms and
    scores are 0): the program evaluates one depth after another."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.depth: list[int] = []
        self._ids: dict[tuple, int] = {}

    def add(self, kind: type[Node], *fields: Any) -> int:
        """The id of the node `kind(*fields)`, made and added unless the graph holds it (the key is a plain tuple:
        most nodes a lowering asks for are already there, and a tuple is much cheaper to build and hash)."""
        key = (kind, *fields)
        ref = self._ids.get(key)
        if ref is None:
            node = kind(*fields)
            ref = self._ids[key] = len(self.nodes)
            self.nodes.append(node)
            self.depth.append(1 + max((self.depth[i] for i in node.inputs), default=-1))
        return ref

    def reachable(self, roots: Sequence[int]) -> list[int]:
        """The ids of the nodes `roots` depend on (themselves included), by depth, then id."""
        live: set[int] = set()
        stack = list(roots)
        while stack:
            ref = stack.pop()
            if ref in live:
                continue
            live.add(ref)
            stack.extend(self.nodes[ref].inputs)
        return sorted(live, key=lambda r: (self.depth[r], r))
