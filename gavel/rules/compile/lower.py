"""Lowering: rule conditions (gavel.rules.ast) to nodes of one shared `Graph` (gavel.rules.compile.ir).

Conversation-mode rules wrap their leaves in `once` (see docs/rules.md); `max`/`min` against a bound become counts
of comparisons. Every error of every rule is collected, located in the rule, list or macro that has it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeGuard

from gavel.errors import RuleError, did_you_mean
from gavel.plugins.functions import SCORE_FUNCTIONS, ScoreFunction
from gavel.plugins.registry import registry
from gavel.rules.ast import (
    Aggregate,
    And,
    Compare,
    Expr,
    Name,
    Not,
    Number,
    Once,
    Or,
    Param,
    Scoped,
    Select,
    Sustained,
    Then,
)
from gavel.rules.compile.ir import EVERY, SCOPE_BITS, Compared, Count, Fired, Gate, Graph, Scope, Score
from gavel.rules.load import RuleSpec
from gavel.rules.names import resolve, wildcard_matches


def all_built(refs: list[int | None]) -> TypeGuard[list[int]]:
    """Whether every node was built (None: its expression had an error, already recorded)."""
    return None not in refs


class Lowering:
    """Builds one graph for a set of rules (`rule_value`: a rule's node), collecting every error."""

    def __init__(self, rules: Sequence[RuleSpec], ce_names: Sequence[str]) -> None:
        self.ce_names = list(ce_names)
        self.ce_index = {n: i for i, n in enumerate(ce_names)}
        self.rules = {r.name: r for r in rules}
        self.graph = Graph()
        self.errors: list[RuleError] = []
        self.rule_values: dict[tuple[str, int], int | None] = {}
        self.stack: list[str] = []  # rules and macros being expanded, for cycle errors
        self._reported: set[tuple[str, str]] = set()
        self.namespaces: dict[str, tuple] = {}
        self.reducers: dict[str, ScoreFunction] = {}   # the plugin score functions the rules use, one instance each

    # -- gates
    def gate(self, inputs: Sequence[tuple[int, int]], threshold: int) -> int:
        """sum(w * x) >= threshold, with negations folded in and repeated inputs merged."""
        weights: dict[int, int] = {}
        for ref, w in inputs:
            node = self.graph.nodes[ref]
            if isinstance(node, Gate) and node.negated is not None:
                ref, threshold, w = node.negated, threshold - w, -w  # w * not(x) = w - w * x
            weights[ref] = weights.get(ref, 0) + w
        terms = tuple(sorted((r, w) for r, w in weights.items() if w))
        if len(terms) == 1 and terms[0][1] == 1 and threshold == 1:
            return terms[0][0]
        return self.graph.add(Gate, terms, threshold)

    def all_of(self, refs: Sequence[int]) -> int:
        return self.gate([(r, 1) for r in refs], len(refs))

    def any_of(self, refs: Sequence[int]) -> int:
        return self.gate([(r, 1) for r in refs], 1)

    def negate(self, ref: int) -> int:
        return self.gate([(ref, -1)], 0)

    def once(self, ref: int, view: int) -> int:
        node = self.graph.nodes[ref]
        if isinstance(node, Count) and node.view == view and node.latch:
            return ref  # already latched over this view
        return self.count(view, None, ref, False, ">=", 1)

    def count(self, view: int, window: int | None, x: int, exclude: bool, op: str, k: int) -> int:
        """(tokens of `view` where x held) op k, over a window ending before this token when `exclude` (ir.Count)."""
        return self.graph.add(Count, view, window, x, exclude, op, k)

    # -- rules
    def rule_value(self, rule: RuleSpec, view: int) -> int | None:
        """The node holding where `rule` holds (its mode and exceptions applied), seen through `view`."""
        key = (rule.name, view)
        if key in self.rule_values:
            return self.rule_values[key]
        if rule.name in self.stack:
            self.errors.append(RuleError(f"rule '{rule.name}' refers to itself through "
                                         + " -> ".join([*self.stack[self.stack.index(rule.name):], rule.name]),
                                         location=rule.field_location("condition")))
            return None
        self.stack.append(rule.name)
        latch = rule.match == "conversation"
        condition = self.build(rule, rule, rule.expr, view, latch)
        exceptions = [self.build(e, rule, e.expr, view, latch) for e in rule.exceptions]
        self.stack.pop()
        value = None
        if condition is not None and all_built(exceptions):
            value = condition if not exceptions else self.all_of([condition, self.negate(self.any_of(exceptions))])
        self.rule_values[key] = value
        return value

    def build(self, owner, rule: RuleSpec, expr: Expr, view: int, latch: bool) -> int | None:
        """The node computing `expr` for `rule` (names resolve in its namespace); errors are located by `owner`."""
        if isinstance(expr, (And, Or)):
            refs = [self.build(owner, rule, t, view, latch) for t in expr.terms]
            if not all_built(refs):
                return None
            return self.all_of(refs) if isinstance(expr, And) else self.any_of(refs)
        if isinstance(expr, Not):
            ref = self.build(owner, rule, expr.term, view, latch)
            return None if ref is None else self.negate(ref)
        if isinstance(expr, Name):
            return self._name(owner, rule, expr, view, latch)
        if isinstance(expr, Select):
            return self._select(owner, rule, expr, view, latch)
        if isinstance(expr, Scoped):
            bits = view & SCOPE_BITS[expr.scope]
            inner = self.build(owner, rule, expr.term, bits, latch)
            if inner is None:
                return None
            ref = inner if SCOPE_BITS[expr.scope] == EVERY else self.all_of([inner, self.graph.add(Scope, bits)])
            return self.once(ref, view) if latch else ref
        ref = self._temporal(owner, rule, expr, view)
        return None if ref is None else self.once(ref, view) if latch else ref

    def _temporal(self, owner, rule: RuleSpec, expr: Expr, view: int) -> int | None:
        """A leaf evaluated per token: a comparison, an aggregate, once / then / for."""
        if isinstance(expr, Compare):
            ces = self._ces(owner, rule, expr.name, expr.span.start)
            value = self._number(owner, expr.value, expr.span.start)
            if ces is None or value is None:
                return None
            return self.any_of([self.graph.add(Compared, c, expr.op, float(value)) for c in ces])
        window = self._window(owner, getattr(expr, "window", None), expr.span.start)
        if window is False:
            return None
        if isinstance(expr, Aggregate):
            return self._aggregate(owner, rule, expr, view, window)
        if isinstance(expr, Once):
            x = self.build(owner, rule, expr.term, view, False)
            return None if x is None else self.count(view, window, x, False, ">=", 1)
        if isinstance(expr, Then):
            a, b = self.build(owner, rule, expr.first, view, False), self.build(owner, rule, expr.second, view, False)
            return None if a is None or b is None else self.all_of([b, self.count(view, window, a, True, ">=", 1)])
        assert isinstance(expr, Sustained)
        assert window is not None   # `for N tokens` always has its window
        x = self.build(owner, rule, expr.term, view, False)
        return None if x is None else self.count(view, window, x, False, ">=", window)

    def _aggregate(self, owner, rule: RuleSpec, expr: Aggregate, view: int, window: int | None) -> int | None:
        value = self._number(owner, expr.value, expr.span.start)
        if expr.function == "count":
            x = self.build(owner, rule, expr.arg, view, False)
            if x is None or value is None:
                return None
            return self.count(view, window, x, False, expr.op, int(value))
        assert isinstance(expr.arg, Name)
        ces = self._ces(owner, rule, expr.arg.name, expr.arg.span.start)
        if ces is None or value is None or not (expr.function in SCORE_FUNCTIONS or self._reducer(owner, expr)):
            return None
        return self.any_of([self._score_aggregate(view, expr.function, window, c, expr.op, float(value))
                            for c in ces])

    def _reducer(self, owner, expr: Aggregate) -> bool:
        """Make the plugin score function `expr` names, once per program (which holds the instance); False after
        an error (the registry lost it since the condition was parsed, or it failed to start)."""
        if expr.function in self.reducers:
            return True
        found = registry().functions.get(expr.function)
        if found is None:
            self.errors.append(owner.error(f"unknown function '{expr.function}'", expr.span.start,
                                           hint="`gavel plugins list` shows the registered score functions"))
            return False
        try:
            self.reducers[expr.function] = found()
        except Exception as e:  # a plugin that cannot start is a compile error, never a crash
            self.errors.append(owner.error(f"score function '{expr.function}' failed to start: {e}",
                                           expr.span.start))
            return False
        return True

    def _score_aggregate(self, view: int, function: str, window: int | None, ce: int, op: str, value: float) -> int:
        """max / min against a bound is a count of per-token comparisons (`max(c) > t`: some token has c > t;
        `max(c) < t`: none has c >= t), which the sparse count kernels evaluate; mean and plugin functions need
        the scores."""
        flipped = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}
        if function not in ("max", "min") or op in ("==", "!="):
            return self.graph.add(Score, view, function, window, ce, op, value)
        exists = (function == "max") == (op in (">", ">="))   # max > t, min < t: some token beyond t
        atom = self.graph.add(Compared, ce, op if exists else flipped[op], value)
        return self.count(view, window, atom, False, ">=" if exists else "==", 1 if exists else 0)

    def _select(self, owner, rule: RuleSpec, expr: Select, view: int, latch: bool) -> int | None:
        at = expr.span.start
        if expr.group is not None:
            ces = self._members(owner, rule, expr.group, at)
            if ces is None:
                return None
            refs = [self.graph.add(Fired, c) for c in ces]
            refs = [self.once(r, view) for r in refs] if latch else refs
            what = f"the CEs in '{expr.group}'"
        else:
            items = [self.build(owner, rule, item, view, latch) for item in expr.items]
            if not all_built(items):
                return None
            refs = items
            what = "the items of the list"
        k = len(refs) if expr.quantifier == "all" else 1 if expr.quantifier == "any" else \
            self._number(owner, expr.quantifier, at)
        if k is None:
            return None
        if not 1 <= k <= len(refs):
            self.errors.append(owner.error(f"`{expr}` needs 1 <= k <= {len(refs)} ({what})", at))
            return None
        return self.gate([(r, 1) for r in refs], int(k))

    # -- names
    def _kind(self, rule: RuleSpec, name: str) -> str:
        """What a name stands for in `rule`'s namespace (gavel.rules.names.resolve; never the rule itself)."""
        if rule.name not in self.namespaces:   # the pack's lists and macros, read once per rule
            self.namespaces[rule.name] = (rule.lists, rule.macros)
        lists, macros = self.namespaces[rule.name]
        kind = resolve(name, groups=rule.groups, lists=lists, macros=macros, rules=self.rules)
        return resolve(name) if kind == "rule" and name == rule.name else kind

    def _name(self, owner, rule: RuleSpec, expr: Name, view: int, latch: bool) -> int | None:
        kind = self._kind(rule, expr.name)
        if kind == "macro":
            return self._macro(rule, self.namespaces[rule.name][1][expr.name], view, latch)
        if kind == "rule":
            ref = self.rule_value(self.rules[expr.name], view)
            return None if ref is None else self.once(ref, view) if latch else ref
        ces = self._ces(owner, rule, expr.name, expr.span.start)
        if ces is None:
            return None
        refs = [self.graph.add(Fired, c) for c in ces]
        return self.any_of([self.once(r, view) for r in refs] if latch else refs)

    def _macro(self, rule: RuleSpec, macro, view: int, latch: bool) -> int | None:
        label = f"macro {macro.name}"
        if label in self.stack:
            return None  # the spec loader reports macro cycles, located in the macros
        self.stack.append(label)
        try:
            return self.build(macro, rule, macro.expr, view, latch)
        finally:
            self.stack.pop()

    def _ces(self, owner, rule: RuleSpec, name: str, at: int) -> list[int] | None:
        """CE indices a name stands for (a group, a list, a wildcard or a CE), or None after an error."""
        kind = self._kind(rule, name)
        if kind in ("group", "list", "wildcard"):
            return self._members(owner, rule, name, at)
        if kind == "ce" and name in self.ce_index:
            return [self.ce_index[name]]
        if kind in ("macro", "rule"):
            self.errors.append(owner.error(f"'{name}' is a {kind}; this needs a CE, a group, a list or a wildcard",
                                           at))
            return None
        known = [*rule.groups, *rule.lists, *rule.macros, *self.rules, *self.ce_names]
        guess = did_you_mean(name, known)
        self.errors.append(owner.error(f"'{name}' is not a group, list, macro, rule or known CE", at,
                                       hint=f"did you mean '{guess}'?" if guess else None))
        return None

    def _members(self, owner, rule: RuleSpec, group: str, at: int) -> list[int] | None:
        """The distinct CEs of a group, list or wildcard, in CE order; None after an error."""
        kind = self._kind(rule, group)
        if kind in ("group", "list"):
            members = rule.groups[group] if kind == "group" else rule.lists[group]
            unknown = [(i, ce) for i, ce in enumerate(members) if ce not in self.ce_index]
            if (rule.name, group) not in self._reported:
                self._reported.add((rule.name, group))
                for i, ce in unknown:
                    guess = did_you_mean(ce, self.ce_names)
                    hint = f"did you mean '{guess}'?" if guess else None
                    if kind == "group":
                        self.errors.append(RuleError(f"rule '{rule.name}': group '{group}' uses unknown CE '{ce}'",
                                                     location=rule.field_location("groups", group, i), hint=hint))
                    else:
                        self.errors.append(owner.error(f"list '{group}' uses unknown CE '{ce}'", at, hint=hint))
            return None if unknown else sorted({self.ce_index[c] for c in members})
        if kind == "wildcard":
            found = [self.ce_index[c] for c in wildcard_matches(group, self.ce_names)]
            if not found:
                self.errors.append(owner.error(f"the wildcard '{group}' matches no CE", at))
            return found or None
        hint = "a selector takes a group, a list, a wildcard like `harm_*`, or `(a, b, ...)`"
        if group not in self.ce_index:
            guess = did_you_mean(group, [*rule.groups, *rule.lists])
            hint = f"did you mean '{guess}'?" if guess else hint
        self.errors.append(owner.error(f"undefined group '{group}'", at, hint=hint))
        return None

    def _number(self, owner, value: Number, at: int) -> float | int | None:
        if isinstance(value, Param):
            self.errors.append(owner.error(f"parameter `{value}` has no value", value.span.start,
                                           hint="set it in the pack's `params:` or give a default: ${name:0.5}"))
            return None
        return value

    def _window(self, owner, window: Number | None, at: int) -> int | Literal[False] | None:
        """The window as an int, None for none, False after an error."""
        if window is None:
            return None
        value = self._number(owner, window, at)
        if value is None:
            return False
        if value != int(value) or value < 1:
            self.errors.append(owner.error(f"a window is a whole number of tokens >= 1, not {value}", at))
            return False
        return int(value)
