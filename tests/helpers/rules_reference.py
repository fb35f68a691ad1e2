"""A naive reference evaluator for the rule language, written from its semantics, independently of the compiler.

It follows the semantics literally: every expression is evaluated at every token of a whole trace under a *view*
(a set of token indices); temporal operators look at the history H(V, t) spelled out as a list; `conversation`
rules are evaluated through the leaf-by-leaf `once(...)` rewrite; rule references evaluate the referenced rule
(its own mode and exceptions) under the referencing view. Plain Python, slow on purpose, memoised only so that
random property tests stay fast.

Arithmetic: `mean` is computed exactly with `fractions.Fraction` (a sum of the exact binary values of the scores
divided by the count, compared with the exact value of the constant), so the reference never depends on the
order of float additions; `max`/`min` and score comparisons compare the given floats directly.

Plugin score functions are given as plain Python functions of the scores in the window (the view tokens it holds,
oldest first; fewer than N at the start), `functions={"median": statistics.median_low}`.
"""
from __future__ import annotations

import fnmatch
import operator
from fractions import Fraction

from gavel.rules.ast import Aggregate, And, Compare, Name, Not, Once, Or, Scoped, Select, Sustained, Then

COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
           "!=": operator.ne}

# token class k = role + 4 * response; role 0 none / 1 system / 2 user / 3 assistant
SCOPES = {
    "prompt": lambda k: k & 4 == 0,
    "response": lambda k: k & 4 == 4,
    "system": lambda k: k & 3 == 1,
    "user": lambda k: k & 3 == 2,
    "assistant": lambda k: k & 3 == 3,
    "conversation": lambda k: True,
}


class Unevaluable(ValueError):
    """A rule the reference cannot evaluate (an unknown name, a cycle, a missing input)."""


class _Sequence:
    """One sequence of a batch, with its rules; `holds(rule)` is the rule's value at each token."""

    def __init__(self, rules, ce_names, fired, scores, roles, valid, functions):
        self.rules = {r.name: r for r in rules}
        self.functions = functions
        self.ce = {name: i for i, name in enumerate(ce_names)}
        self.ce_names = list(ce_names)
        self.fired, self.scores, self.roles = fired, scores, roles
        self.n = len(valid)
        self.view = frozenset(t for t in range(self.n) if valid[t])
        self.memo: dict = {}
        self.active: list[str] = []  # rules and macros being expanded, to report cycles

    # --- names ------------------------------------------------------------------------------

    def resolve(self, name: str, rule):
        """('members', CE indices) | ('macro', m) | ('rule', r) | ('ce', i), in the semantics' lookup order."""
        groups = getattr(rule, "groups", {}) or {}
        lists = getattr(rule, "lists", {}) or {}
        macros = getattr(rule, "macros", {}) or {}
        if name in groups:
            return "members", self.members_of(groups[name])
        if name in lists:
            return "members", self.members_of(lists[name])
        if name in macros:
            return "macro", macros[name]
        if name in self.rules:
            return "rule", self.rules[name]
        if name in self.ce:
            return "ce", self.ce[name]
        if "*" in name:
            found = [i for i, ce in enumerate(self.ce_names) if fnmatch.fnmatchcase(ce, name)]
            if found:
                return "members", tuple(found)
        raise Unevaluable(f"unknown name {name!r}")

    def members_of(self, names) -> tuple[int, ...]:
        """Distinct CE indices of a group or list, in first-listed order."""
        out: dict[int, None] = {}
        for name in names:
            if name not in self.ce:
                raise Unevaluable(f"unknown CE {name!r}")
            out[self.ce[name]] = None
        return tuple(out)

    def score_members(self, name: str, rule) -> tuple[int, ...]:
        """The CEs a comparison or a score aggregate reads: one CE, or every member of a group/list/wildcard."""
        kind, target = self.resolve(name, rule)
        if kind == "ce":
            return (target,)
        if kind == "members":
            return target
        raise Unevaluable(f"{name!r} has no score")

    def selector_members(self, name: str, rule) -> tuple[int, ...]:
        kind, target = self.resolve(name, rule)
        if kind != "members":
            raise Unevaluable(f"`of {name}` needs a group, list or wildcard")
        return target

    # --- views and histories ----------------------------------------------------------------

    def history(self, view: frozenset, t: int) -> list[int]:
        """H(V, t): the tokens of the view up to t, in order."""
        return [s for s in range(t + 1) if s in view]

    def in_scope(self, scope: str) -> frozenset:
        if scope == "conversation":
            return frozenset(range(self.n))
        if self.roles is None:
            raise Unevaluable(f"scope {scope!r} needs roles")
        return frozenset(t for t in range(self.n) if SCOPES[scope](self.roles[t]))

    def score(self, t: int, c: int) -> float:
        if self.scores is None:
            raise Unevaluable("score comparisons and aggregates need scores")
        return self.scores[t][c]

    def once(self, values: list[bool], view: frozenset, window=None) -> list[bool]:
        """`once` over a per-token series: it held at one of the last `window` tokens of H(V, t) (all: None)."""
        return [t in view and any(values[s] for s in _last(self.history(view, t), window)) for t in range(self.n)]

    # --- rules ------------------------------------------------------------------------------

    def holds(self, rule, view: frozenset | None = None) -> list[bool]:
        """The rule's value at each token under `view` (default: the valid tokens): condition and no exception."""
        view = self.view if view is None else view
        key = ("rule", rule.name, view)
        if key not in self.memo:
            if rule.name in self.active:
                raise Unevaluable(f"rule {rule.name!r} refers to itself")
            self.active.append(rule.name)
            evaluate = self.conversation if getattr(rule, "match", "conversation") == "conversation" else self.token
            value = evaluate(rule.expr, view, rule)
            for exception in getattr(rule, "exceptions", ()) or ():
                excluded = evaluate(exception.expr, view, rule)
                value = [v and not x for v, x in zip(value, excluded)]
            self.active.pop()
            self.memo[key] = value
        return self.memo[key]

    def macro(self, macro, view: frozenset, rule, evaluate) -> list[bool]:
        """A macro expanded in place: its condition evaluated in the using rule's context and mode."""
        tag = f"macro {macro.name}"
        if tag in self.active:
            raise Unevaluable(f"macro {macro.name!r} refers to itself")
        self.active.append(tag)
        value = evaluate(macro.expr, view, rule)
        self.active.pop()
        return value

    # --- token mode: each operator as the semantics states it ---------------------------------

    def token(self, expr, view: frozenset, rule) -> list[bool]:
        key = ("token", id(expr), view, rule.name)
        if key not in self.memo:
            self.memo[key] = self._token(expr, view, rule)
        return self.memo[key]

    def _token(self, expr, view, rule) -> list[bool]:
        n, at = self.n, sorted(view)
        out = [False] * n
        if isinstance(expr, Name):
            kind, target = self.resolve(expr.name, rule)
            if kind == "macro":
                return self.macro(target, view, rule, self.token)
            if kind == "rule":
                return self.holds(target, view)
            members = (target,) if kind == "ce" else target
            for t in at:
                out[t] = any(self.fired[t][c] for c in members)
        elif isinstance(expr, Compare):
            members = self.score_members(expr.name, rule)
            for t in at:
                out[t] = any(COMPARE[expr.op](self.score(t, c), expr.value) for c in members)
        elif isinstance(expr, Select):
            if expr.group is not None:
                members = self.selector_members(expr.group, rule)
                counts = [sum(bool(self.fired[t][c]) for c in members) for t in range(n)]
                size = len(members)
            else:
                items = [self.token(item, view, rule) for item in expr.items]
                counts = [sum(item[t] for item in items) for t in range(n)]
                size = len(items)
            for t in at:
                out[t] = _quantified(expr.quantifier, counts[t], size)
        elif isinstance(expr, Not):
            inner = self.token(expr.term, view, rule)
            for t in at:
                out[t] = not inner[t]
        elif isinstance(expr, (And, Or)):
            terms = [self.token(term, view, rule) for term in expr.terms]
            combine = all if isinstance(expr, And) else any
            for t in at:
                out[t] = combine(term[t] for term in terms)
        elif isinstance(expr, Once):
            return self.once(self.token(expr.term, view, rule), view, expr.window)
        elif isinstance(expr, Then):
            first, second = self.token(expr.first, view, rule), self.token(expr.second, view, rule)
            for t in at:
                before = self.history(view, t)[:-1]
                out[t] = second[t] and any(first[s] for s in _last(before, expr.window))
        elif isinstance(expr, Sustained):
            inner = self.token(expr.term, view, rule)
            for t in at:
                h = self.history(view, t)
                out[t] = len(h) >= expr.window and all(inner[s] for s in _last(h, expr.window))
        elif isinstance(expr, Aggregate):
            for t in at:
                out[t] = self.aggregate(expr, view, rule, _last(self.history(view, t), expr.window))
        elif isinstance(expr, Scoped):
            inner_view = view & self.in_scope(expr.scope)
            inner = self.token(expr.term, inner_view, rule)
            for t in at:
                out[t] = t in inner_view and inner[t]
        else:
            raise Unevaluable(f"unknown node {expr!r}")
        return out

    def aggregate(self, expr: Aggregate, view, rule, tokens: list[int]) -> bool:
        """count / max / min / mean / a plugin function over `tokens` (a non-empty tail of the history), compared."""
        compare = COMPARE[expr.op]
        if expr.function == "count":
            inner = self.token(expr.arg, view, rule)
            return compare(sum(inner[s] for s in tokens), expr.value)
        if not isinstance(expr.arg, Name):
            raise Unevaluable(f"{expr.function} takes a name")
        for c in self.score_members(expr.arg.name, rule):
            values = [self.score(s, c) for s in tokens]
            if expr.function == "max":
                hit = compare(max(values), expr.value)
            elif expr.function == "min":
                hit = compare(min(values), expr.value)
            elif expr.function == "mean":
                hit = compare(sum(map(Fraction, values)) / len(values), Fraction(expr.value))
            elif expr.function in self.functions and expr.window is not None:
                hit = compare(self.functions[expr.function](values), expr.value)
            else:
                raise Unevaluable(f"unknown function {expr.function!r} (or no window)")
            if hit:
                return True
        return False

    # --- conversation mode: the leaf rewrite, evaluated without building a new tree ---------------

    def conversation(self, expr, view: frozenset, rule) -> list[bool]:
        key = ("conversation", id(expr), view, rule.name)
        if key not in self.memo:
            self.memo[key] = self._conversation(expr, view, rule)
        return self.memo[key]

    def _conversation(self, expr, view, rule) -> list[bool]:
        n, at = self.n, sorted(view)
        out = [False] * n
        if isinstance(expr, Name):
            kind, target = self.resolve(expr.name, rule)
            if kind == "macro":
                return self.macro(target, view, rule, self.conversation)
            if kind == "rule":
                return self.once(self.holds(target, view), view)
            members = (target,) if kind == "ce" else target  # a group: each member CE is its own leaf
            onces = [self.once([bool(self.fired[t][c]) for t in range(n)], view) for c in members]
            return [any(o[t] for o in onces) for t in range(n)]
        if isinstance(expr, Select):
            if expr.group is not None:
                members = self.selector_members(expr.group, rule)
                items = [self.once([bool(self.fired[t][c]) for t in range(n)], view) for c in members]
            else:
                items = [self.conversation(item, view, rule) for item in expr.items]
            for t in at:
                out[t] = _quantified(expr.quantifier, sum(item[t] for item in items), len(items))
            return out
        if isinstance(expr, Not):
            inner = self.conversation(expr.term, view, rule)
            for t in at:
                out[t] = not inner[t]
            return out
        if isinstance(expr, (And, Or)):
            terms = [self.conversation(term, view, rule) for term in expr.terms]
            combine = all if isinstance(expr, And) else any
            for t in at:
                out[t] = combine(term[t] for term in terms)
            return out
        if isinstance(expr, Scoped):  # once((rewritten e) in S)
            inner_view = view & self.in_scope(expr.scope)
            inner = self.conversation(expr.term, inner_view, rule)
            return self.once([t in inner_view and inner[t] for t in range(n)], view)
        # a leaf: a comparison, an aggregate, or a once / then / for form
        return self.once(self.token(expr, view, rule), view)


def _last(history: list[int], window) -> list[int]:
    """The last `window` elements of a history (all of it when there is no window)."""
    return history if window is None else history[max(0, len(history) - int(window)):]


def _quantified(quantifier, count: int, size: int) -> bool:
    if quantifier == "all":
        return count == size
    if quantifier == "any":
        return count >= 1
    return count >= quantifier


def run(rules, ce_names, fired, mask=None, *, scores=None, roles=None, functions=None) -> list[list[list[bool]]]:
    """holds[b][t][r] for the public rules, in order.

    rules: RuleSpec-like objects (.name, .expr, .groups, .match and, when present, .lists, .macros, .exceptions,
    .private); fired[b][t][c] bools; scores[b][t][c] floats; roles[b][t] token classes; mask[b][t] bools;
    functions: plugin score functions by name, each a function of the window's scores (a list) to a number.
    """
    public = [r for r in rules if not getattr(r, "private", False)]
    out = []
    for b, sequence in enumerate(fired):
        valid = [True] * len(sequence) if mask is None else [bool(v) for v in mask[b]]
        seq = _Sequence(rules, ce_names, sequence, None if scores is None else scores[b],
                        None if roles is None else [int(k) for k in roles[b]], valid, functions or {})
        values = [seq.holds(rule) for rule in public]
        out.append([[v[t] for v in values] for t in range(len(sequence))])
    return out
