"""Compile rules to one tensor program that evaluates them token by token, with state of fixed size.

Lowering turns every rule into a shared graph of four node kinds: token atoms (a CE fired, a score compared, a
token's scope), threshold gates `sum(w * inputs) >= t` (and, or, not, k of), windowed counts (once, then, for,
count; `max`/`min` against a bound become counts of comparisons) and score aggregates (mean, max/min compared
for equality, plugin score functions). Conversation-mode rules wrap their leaves in `once` (see docs/rules.md).
The program evaluates the graph stage by stage, every stage batched over all its nodes, on the device of the
inputs. On an accelerator every token is evaluated and the host is never synced; on the CPU only the tokens where
some input changes are (`RowSet`), with window kernels that work on the changes (kernels.sparse_windowed_count).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gavel.errors import RuleError, did_you_mean
from gavel.plugins.functions import SCORE_FUNCTIONS, ScoreFunction
from gavel.plugins.registry import registry
from gavel.rules.compile import kernels
from gavel.rules.actions import check_actions
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
from gavel.rules.names import resolve, wildcard_matches
from gavel.rules.load import RuleErrors, RuleSpec

RESPONSE = 4  # added to a token's role code (0 none, 1 system, 2 user, 3 assistant) for response tokens
EVERY = 0xFF  # scope bits: token class k = role + RESPONSE * response is in a scope when bit k is set
SCOPE_BITS = {"prompt": 0x0F, "response": 0xF0, "system": 0x22, "user": 0x44, "assistant": 0x88,
              "conversation": EVERY}
_CHUNK = 1 << 23  # value-matrix elements per chunk: long traces are evaluated in chunks of bounded memory


# ---- lowering: AST -> node graph --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Node:
    kind: str      # fired | compare | scope | gate | count | score
    key: tuple
    depth: int


class _Lowering:
    """Builds the hash-consed node graph for a set of rules, collecting every error."""

    def __init__(self, rules: Sequence[RuleSpec], ce_names: Sequence[str]) -> None:
        self.ce_names = list(ce_names)
        self.ce_index = {n: i for i, n in enumerate(ce_names)}
        self.rules = {r.name: r for r in rules}
        self.nodes: list[_Node] = []
        self.ids: dict[tuple, int] = {}
        self.errors: list[RuleError] = []
        self.rule_values: dict[tuple[str, int], int | None] = {}
        self.stack: list[str] = []  # rules and macros being expanded, for cycle errors
        self._reported: set[tuple[str, str]] = set()
        self.namespaces: dict[str, tuple] = {}
        self.reducers: dict[str, ScoreFunction] = {}   # the plugin score functions the rules use, one instance each

    def node(self, kind: str, key: tuple, inputs: Sequence[int] = ()) -> int:
        full = (kind, *key)
        if full not in self.ids:
            self.ids[full] = len(self.nodes)
            self.nodes.append(_Node(kind, key, 1 + max((self.nodes[i].depth for i in inputs), default=-1)))
        return self.ids[full]

    # -- gates
    def gate(self, inputs: Sequence[tuple[int, int]], threshold: int) -> int:
        """sum(w * x) >= threshold, with negations folded in and repeated inputs merged."""
        weights: dict[int, int] = {}
        for ref, w in inputs:
            node = self.nodes[ref]
            if node.kind == "gate" and node.key[1] == 0 and len(node.key[0]) == 1 and node.key[0][0][1] == -1:
                ref, threshold, w = node.key[0][0][0], threshold - w, -w  # w * not(x) = w - w * x
            weights[ref] = weights.get(ref, 0) + w
        terms = tuple(sorted((r, w) for r, w in weights.items() if w))
        if len(terms) == 1 and terms[0][1] == 1 and threshold == 1:
            return terms[0][0]
        return self.node("gate", (terms, threshold), [r for r, _ in terms])

    def all_of(self, refs: Sequence[int]) -> int:
        return self.gate([(r, 1) for r in refs], len(refs))

    def any_of(self, refs: Sequence[int]) -> int:
        return self.gate([(r, 1) for r in refs], 1)

    def negate(self, ref: int) -> int:
        return self.gate([(ref, -1)], 0)

    def once(self, ref: int, view: int) -> int:
        node = self.nodes[ref]
        if node.kind == "count" and node.key[:2] == (view, None) and node.key[3:] == (False, ">=", 1):
            return ref  # already latched over this view
        return self.count(view, None, ref, False, ">=", 1)

    def count(self, view: int, window: int | None, x: int, exclude: bool, op: str, k: int) -> int:
        """Over the last `window` view tokens (all so far: None), ending before this one when `exclude`:
        (tokens where x held) op k."""
        return self.node("count", (view, window, x, exclude, op, k), [x])

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
        if condition is not None and None not in exceptions:
            value = condition if not exceptions else self.all_of([condition, self.negate(self.any_of(exceptions))])
        self.rule_values[key] = value
        return value

    def build(self, owner, rule: RuleSpec, expr: Expr, view: int, latch: bool) -> int | None:
        """The node computing `expr` for `rule` (names resolve in its namespace); errors are located by `owner`."""
        if isinstance(expr, (And, Or)):
            refs = [self.build(owner, rule, t, view, latch) for t in expr.terms]
            if None in refs:
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
            ref = inner if SCOPE_BITS[expr.scope] == EVERY else self.all_of([inner, self.node("scope", (bits,))])
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
            return self.any_of([self.node("compare", (c, expr.op, float(value))) for c in ces])
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
        found = registry().plugins["functions"].get(expr.function)
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
            return self.node("score", (view, function, window, ce, op, value))
        exists = (function == "max") == (op in (">", ">="))   # max > t, min < t: some token beyond t
        atom = self.node("compare", (ce, op if exists else flipped[op], value))
        return self.count(view, window, atom, False, ">=" if exists else "==", 1 if exists else 0)

    def _select(self, owner, rule: RuleSpec, expr: Select, view: int, latch: bool) -> int | None:
        at = expr.span.start
        if expr.group is not None:
            ces = self._members(owner, rule, expr.group, at)
            if ces is None:
                return None
            refs = [self.node("fired", (c,)) for c in ces]
            refs = [self.once(r, view) for r in refs] if latch else refs
            what = f"the CEs in '{expr.group}'"
        else:
            refs = [self.build(owner, rule, item, view, latch) for item in expr.items]
            if None in refs:
                return None
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
        refs = [self.node("fired", (c,)) for c in ces]
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

    def _window(self, owner, window: Number | None, at: int) -> int | None | bool:
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


# ---- the program ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RuleState:
    """Per-sequence state of every windowed operator; its size depends on the rules only."""

    tensors: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class _Atoms:
    """Depth-0 columns: CEs fired, scores compared with constants, token scopes."""

    fired: Tensor          # long [n_f]: CE index of each fired column
    compared: tuple[kernels.Comparisons, ...]   # one group per comparison operator
    scopes: Tensor         # long [n_s]: scope bits of each scope column
    lowest: Tensor         # float64 [C]: each CE's lowest compared constant (+inf: none); below it, no
    lowest32: Tensor       # float32 [C]  comparison of that CE changes (see _chunk)


@dataclass(frozen=True, slots=True)
class _Gates:
    start: int
    inputs: Tensor         # long [n, arity] value columns (0, the zero column, pads)
    weights: Tensor        # float32 [n, arity]
    threshold: Tensor      # float32 [n]


@dataclass(frozen=True, slots=True)
class _Counts:
    start: int
    view: int              # windowed: the view of every column (-1 for running counts, which use `views`)
    views: Tensor          # long [K]: each column's view
    windowed: bool
    latch: bool            # every column is an unbounded `once`
    slot: int              # index of its state tensor
    x: Tensor              # long [K] value columns
    window: Tensor         # long [K] (windowed)
    exclude: Tensor        # bool [K]
    table: Tensor
    threshold: Tensor      # long [K]


@dataclass(frozen=True, slots=True)
class _Scores:
    start: int
    view: int
    function: str
    window: int | None
    slot: int              # its state tensors: slot (history or running value), slot + 1 (tokens seen)
    ces: Tensor            # long [K]
    table: Tensor
    threshold: Tensor      # float64 [K]
    reducer: ScoreFunction | None = None   # a plugin function's instance (always windowed); None: built in


_IDENTITY = {"max": -torch.inf, "min": torch.inf, "mean": 0.0}   # plugin functions' histories start as NaN


@dataclass(frozen=True, slots=True)
class RuleProgram:
    """Compiled rules: `run` a whole trace, `advance` a chunk of tokens, or `step` one token at a time."""

    rule_names: tuple[str, ...]
    ce_names: tuple[str, ...]
    ce_indices: tuple[int, ...]        # the CEs the rules read
    width: int                         # value columns
    atoms: _Atoms
    stages: tuple[tuple[object, ...], ...]
    outputs: Tensor                    # long [n_rules]: value column of each rule
    state_shapes: tuple[tuple[str, tuple[int, ...], torch.dtype, float], ...]  # kind, per-sequence shape, fill
    needs_scores: bool
    needs_roles: bool

    def to(self, device: torch.device | str) -> RuleProgram:
        """A copy with its tensors on `device`."""
        def move(obj):
            changes = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
                       if isinstance(getattr(obj, f.name), Tensor)}
            return dataclasses.replace(obj, **changes)
        atoms = dataclasses.replace(move(self.atoms), compared=tuple(move(c) for c in self.atoms.compared))
        return dataclasses.replace(self, atoms=atoms, outputs=self.outputs.to(device),
                                   stages=tuple(tuple(move(s) for s in stage) for stage in self.stages))

    @property
    def device(self) -> torch.device:
        return self.outputs.device

    def init_state(self, batch: int, device: torch.device | str | None = None) -> RuleState:
        """Nothing seen yet, for `batch` sequences."""
        device = device if device is not None else self.device
        return RuleState(tuple(torch.full((batch, *shape), fill, dtype=dtype, device=device)
                               for _, shape, dtype, fill in self.state_shapes))

    def step(self, fired: Tensor, state: RuleState, active: Tensor | None = None, *, scores: Tensor | None = None,
             roles: Tensor | None = None) -> tuple[Tensor, RuleState]:
        """One token: fired bool [B, C] (scores [B, C], roles [B]); rows where `active` is False keep their
        state and hold nothing. Returns (holds bool [B, n_rules], new state)."""
        holds, state = self.advance(fired.unsqueeze(1), state, None if active is None else active.unsqueeze(1),
                                    scores=None if scores is None else scores.unsqueeze(1),
                                    roles=None if roles is None else roles.unsqueeze(1))
        return holds[:, 0], state

    def run(self, fired: Tensor, mask: Tensor | None = None, *, scores: Tensor | None = None,
            roles: Tensor | None = None) -> Tensor:
        """A whole trace from the start: holds bool [B, T, n_rules]."""
        return self.advance(fired, self.init_state(fired.shape[0], fired.device), mask, scores=scores,
                            roles=roles)[0]

    def advance(self, fired: Tensor, state: RuleState, mask: Tensor | None = None, *, scores: Tensor | None = None,
                roles: Tensor | None = None) -> tuple[Tensor, RuleState]:
        """Several tokens from `state`: fired bool [B, T, C], mask bool [B, T] (False: padding, skipped),
        scores float [B, T, C] (probabilities), roles [B, T] (token class codes). Same as T `step`s."""
        if self.device != fired.device:
            raise ValueError(f"the program is on {self.device} and the inputs on {fired.device}: "
                             f"use program.to(device) once")
        if fired.dtype != torch.bool:
            raise TypeError(f"`fired` must be a bool tensor (CE scores compared with their thresholds), "
                            f"not {fired.dtype}")
        if self.needs_scores and scores is None:
            raise ValueError("these rules compare or aggregate CE scores: pass `scores` (probabilities)")
        if self.needs_roles and roles is None:
            raise ValueError("these rules use scopes (prompt, response, user, ...): pass `roles` "
                             "(role code + 4 for response tokens)")
        batch, length = fired.shape[:2]
        if length == 0:
            return torch.zeros(batch, 0, len(self.rule_names), dtype=torch.bool, device=fired.device), state
        # chunks of at most `limit` tokens (the CPU path keeps only changed rows, so its chunks can be larger):
        # whole sequences when they fit, so each chunk's result is one contiguous block of the output
        limit = _CHUNK // (self.width if fired.device.type != "cpu" else 64)
        out = torch.empty(batch, length, len(self.rule_names), dtype=torch.bool, device=fired.device)
        rows_per = max(1, limit // length)
        step = length if rows_per > 1 or length <= limit else limit
        states = []
        for b0 in range(0, batch, rows_per):
            group = slice(b0, b0 + rows_per)
            sub = RuleState(tuple(t[group] for t in state.tensors))
            for t0 in range(0, length, step):
                part = (group, slice(t0, t0 + step))
                sub = self._chunk(fired[part], sub, None if mask is None else mask[part].bool(),
                                  None if scores is None else scores[part], None if roles is None else roles[part],
                                  out[part])
            states.append(sub.tensors)
        state = RuleState(tuple(torch.cat(ts, dim=0) for ts in zip(*states))) if len(states) > 1 else \
            RuleState(states[0])
        return out, state

    def _chunk(self, fired: Tensor, state: RuleState, mask: Tensor | None, scores: Tensor | None,
               roles: Tensor | None, into: Tensor) -> RuleState:
        """Evaluate one chunk of tokens into `into` (bool [B, T, n_rules]); returns the state after it."""
        batch, length = fired.shape[:2]
        rows = RowSet(batch, length, sparse=length > 1 and fired.device.type == "cpu")
        parts = [fired] + self._scopes(roles)
        if self.atoms.compared and rows.sparse:
            # comparisons are evaluated at the evaluated rows only; a CE's comparisons can only change where its
            # score is at or above its lowest compared constant, at that token or the one before
            near = _any_last(kernels.at_least(scores, self.atoms.lowest, self.atoms.lowest32))
            rows.note(near | F.pad(near, (1, 0))[:, :-1])
        for part in parts + ([] if mask is None else [mask.unsqueeze(-1)]):
            rows.note_changes(part)
        taken = [rows.take_grid(parts[0]).index_select(1, self.atoms.fired)]
        if self.atoms.compared:
            at_rows = rows.take_grid(scores)
            taken += [torch.cat(group(at_rows), dim=1).index_select(1, group.columns)
                      for group in self.atoms.compared]
        taken += [rows.take_grid(p) for p in parts[1:]]
        values = _Values(self.width, taken[0].shape[0], fired.device)
        values.set(1, torch.cat(taken, dim=1))
        views = _Views(mask, roles, batch, length, fired.device)
        tensors = list(state.tensors)
        for stage in self.stages:
            updates = []
            for part in stage:
                if isinstance(part, _Counts) and part.latch and rows.sparse:
                    self._latches(part, values, rows, views, tensors)
                elif isinstance(part, _Counts) and part.windowed and rows.sparse:
                    self._sparse_windows(part, values, rows, views, tensors)
                elif isinstance(part, _Counts):
                    updates.append((part.start, self._counts(part, values, rows, views, tensors)))
                elif isinstance(part, _Scores):
                    updates.append((part.start, self._scores(part, scores, views, tensors)))
            if updates:
                flat = [out.reshape(batch * length, -1) for _, out in updates]
                values.repeat_rows(rows.grow(flat))
                for (start, _), out in zip(updates, flat):
                    values.set(start, rows.take(out))
            for part in stage:
                if isinstance(part, _Gates):
                    values.gates(part)
        holds = values.columns(self.outputs)
        if mask is not None:   # the mask is constant between evaluated rows
            holds &= rows.take_grid(mask.unsqueeze(-1))
        rows.expand_into(holds, into)
        return RuleState(tuple(tensors))

    def _scopes(self, roles: Tensor | None) -> list[Tensor]:
        """The token-scope atoms, bool [B, T, n_s] (none when the rules use no scope)."""
        if not self.atoms.scopes.shape[0]:
            return []
        return [((self.atoms.scopes >> roles.long().unsqueeze(-1)) & 1).bool()]

    def _counts(self, part: _Counts, values: _Values, rows: RowSet, views: _Views, tensors: list[Tensor]) -> Tensor:
        shape = (*views.shape, -1)
        x = rows.full(values.columns(part.x)).view(shape)
        if part.windowed:
            out, tensors[part.slot] = kernels.windowed_count(x, tensors[part.slot], part.window, part.exclude,
                                                             part.table, part.threshold, views.mask(part.view),
                                                             views.packing(part.view))
        else:
            out, tensors[part.slot] = kernels.running_count(x, views.per_column(part.views), tensors[part.slot],
                                                            part.exclude, part.table, part.threshold, part.latch)
        return out

    def _latches(self, part: _Counts, values: _Values, rows: RowSet, views: _Views, tensors: list[Tensor]) -> None:
        """Unbounded `once` on the evaluated rows only: a latch of an input that only changes at evaluated rows
        (its view included) only changes there too."""
        x = values.columns(part.x)
        view = views.per_column(part.views, rows)
        hit = (x & view).to(torch.int32)
        sums = hit.cumsum(0, dtype=torch.int32)
        firsts, lasts = rows.bounds()
        base = sums.index_select(0, firsts) - hit.index_select(0, firsts)
        owner = rows.index // rows.length
        counts = tensors[part.slot].index_select(0, owner) + sums - base.index_select(0, owner)
        values.set(part.start, (counts > 0) & view)
        tensors[part.slot] = counts.index_select(0, lasts).to(tensors[part.slot].dtype)

    def _sparse_windows(self, part: _Counts, values: _Values, rows: RowSet, views: _Views,
                        tensors: list[Tensor]) -> None:
        """Windowed counts evaluated only where their inputs change and the window after (CPU)."""
        view = views.mask(part.view).reshape(-1)
        segments, inside = rows.segments(view)
        x = values.columns(part.x)[inside]
        changes, tensors[part.slot] = kernels.sparse_windowed_count(
            x, segments, tensors[part.slot], part.window, part.exclude, part.table, part.threshold)
        flat_rows = segments.row_at(changes.sequence, changes.position)
        values.repeat_rows(rows.add(flat_rows))
        out = changes.fill(rows.position.index_select(0, flat_rows), values.rows, x.shape[1])
        view_rows = rows.take(view.reshape(-1, 1))
        values.set(part.start, out & view_rows)

    def _scores(self, part: _Scores, scores: Tensor, views: _Views, tensors: list[Tensor]) -> Tensor:
        x = scores.index_select(-1, part.ces)
        view = views.mask(part.view)
        args = (part.table, part.threshold)
        if part.window is not None:
            out, tensors[part.slot], tensors[part.slot + 1] = kernels.windowed_scores(
                x, part.function, part.window, tensors[part.slot], tensors[part.slot + 1], *args, view,
                views.packing(part.view), part.reducer)
        else:
            out, tensors[part.slot], tensors[part.slot + 1] = kernels.running_scores(
                x, part.function, view, tensors[part.slot], tensors[part.slot + 1], *args)
        return out


class RowSet:
    """The rows (batch x token) a chunk evaluates its gates on. Gates are functions of the current token's atoms
    and window outputs, so on the CPU only the rows where one of those changed are evaluated (with the first token
    of each sequence); every other row repeats the row before it. `sparse=False` evaluates every row (no host
    sync: the path for accelerators and single tokens)."""

    def __init__(self, batch: int, length: int, sparse: bool) -> None:
        self.batch, self.length, self.sparse = batch, length, sparse
        self.changed: Tensor | None = None
        self._index: Tensor | None = None
        self._position: Tensor | None = None

    def note_changes(self, columns: Tensor) -> None:
        """Add the rows where any of `columns` ([rows, k] or [B, T, k]) differs from the token before."""
        if not self.sparse:
            return
        grid = _words(columns.reshape(self.batch, self.length, -1))
        changed = torch.ones(self.batch, self.length, dtype=torch.bool, device=columns.device)
        changed[:, 1:] = (grid[:, 1:] != grid[:, :-1]).any(-1)
        self.note(changed)

    def note(self, rows: Tensor) -> None:
        """Add the rows where bool `rows` [B, T] holds."""
        if not self.sparse:
            return
        self.changed = rows.reshape(-1) if self.changed is None else self.changed | rows.reshape(-1)
        self._index = self._position = None

    @property
    def index(self) -> Tensor:
        """long [n]: the evaluated rows."""
        if self._index is None:
            self._index = self.changed.nonzero().squeeze(1)
        return self._index

    @property
    def position(self) -> Tensor:
        """long [rows]: the evaluated row each row repeats."""
        if self._position is None:
            self._position = self.changed.long().cumsum(0) - 1
        return self._position

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Evaluated-row positions of each sequence's first and last token."""
        starts = torch.arange(self.batch, device=self.position.device) * self.length
        return self.position.index_select(0, starts), self.position.index_select(0, starts + self.length - 1)

    def segments(self, view: Tensor) -> tuple[kernels.Segments, Tensor]:
        """The evaluated rows as runs of a view (bool [rows]), and which evaluated rows are in it."""
        index = self.index
        sequence = index // self.length
        following = torch.empty_like(index)
        following[:-1] = index[1:]
        following[-1:] = self.batch * self.length
        length = torch.minimum(following, (sequence + 1) * self.length) - index
        inside = view.index_select(0, index)
        counted = length * inside
        through = counted.cumsum(0)
        before = through - counted
        firsts, lasts = self.bounds()
        base = before.index_select(0, firsts)
        start = before - base.index_select(0, sequence)
        runs = kernels.Segments(sequence[inside], start[inside], length[inside], index[inside],
                                through.index_select(0, lasts) - base)
        return runs, inside

    def add(self, new_rows: Tensor) -> Tensor:
        """Evaluate `new_rows` too; returns, for each evaluated row, the previously evaluated row whose values
        it starts from."""
        before = self.position
        self.changed = self.changed.clone()
        self.changed[new_rows] = True
        self._index = self._position = None
        return before.index_select(0, self.index)

    def take_grid(self, grid: Tensor) -> Tensor:
        """The evaluated rows of a [B, T, k] tensor, as [n, k] (no copy of the whole grid)."""
        if not self.sparse:
            return grid.reshape(self.batch * self.length, -1)
        return grid[self.index // self.length, self.index % self.length]

    def take(self, full: Tensor) -> Tensor:
        """The evaluated rows of a full [rows, k] tensor."""
        return full if not self.sparse else full.index_select(0, self.index)

    def expand_into(self, taken: Tensor, out: Tensor) -> None:
        """Write `full(taken)` into `out` ([B, T, k]; contiguous or not)."""
        flat = out.view(self.batch * self.length, -1) if out.is_contiguous() else None
        if not self.sparse:
            out.copy_(taken.view(out.shape))
        elif flat is not None:
            torch.index_select(taken, 0, self.position, out=flat)
        else:
            out.copy_(taken.index_select(0, self.position).view(out.shape))

    def full(self, taken: Tensor) -> Tensor:
        """A full [rows, k] tensor from its evaluated rows (each row repeats the last evaluated one)."""
        return taken if not self.sparse else taken.index_select(0, self.position)

    def grow(self, new_columns: list[Tensor]) -> Tensor | None:
        """Also evaluate the rows where `new_columns` (full [rows, k]) change; returns what `add` does (None
        when every row is evaluated anyway)."""
        if not self.sparse:
            return None
        before = self.position
        self.note_changes(torch.cat(new_columns, dim=1))
        return before.index_select(0, self.index)


class _Values:
    """The value columns of a chunk at its evaluated rows, stored column-major ([width, rows]: gathering a
    gate's inputs copies whole columns), as 0/1 floats; columns past `filled` are not computed yet."""

    def __init__(self, width: int, rows: int, device: torch.device) -> None:
        self.data = torch.empty(width, rows, dtype=torch.float32, device=device)
        self.data[0] = 0   # the zero column that pads gates' inputs
        self.filled = 1

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    def columns(self, index: Tensor) -> Tensor:
        """bool [rows, k]."""
        return (self.data.index_select(0, index) > 0.5).T.contiguous()

    def set(self, start: int, block: Tensor) -> None:
        """Columns start.. from a [rows, k] block."""
        self.data[start:start + block.shape[1]] = block.T
        self.filled = max(self.filled, start + block.shape[1])

    def gates(self, part: _Gates) -> None:
        n, arity = part.inputs.shape
        gathered = self.data.index_select(0, part.inputs.view(-1)).view(n, arity, self.rows)
        total = torch.bmm(part.weights.unsqueeze(1), gathered).squeeze(1)
        self.data[part.start:part.start + n] = total >= part.threshold.unsqueeze(-1)
        self.filled = max(self.filled, part.start + n)

    def repeat_rows(self, source: Tensor | None) -> None:
        """New evaluated rows, each a copy of row `source[i]` (None: unchanged)."""
        if source is None:
            return
        data = torch.empty(self.data.shape[0], source.shape[0], dtype=self.data.dtype, device=self.data.device)
        data[:self.filled] = self.data[:self.filled].index_select(1, source)
        self.data = data


def _any_last(x: Tensor) -> Tensor:
    """`x.any(-1)` for bool x, a word at a time."""
    words = _words(x)
    return words.any(-1) if words.dtype == torch.bool else (words != 0).any(-1)


def _words(x: Tensor) -> Tensor:
    """A bool/0-1 [..., k] tensor's last dim as few wide integers (cheap to compare for any difference)."""
    if x.dtype != torch.bool:
        x = x != 0
    x = x.contiguous().view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if x.shape[-1] % size == 0:
            return x.view(dtype)
    return x


class _Views:
    """Per chunk: each scope's view mask (valid tokens of the scope) and its packing, computed once."""

    def __init__(self, mask: Tensor | None, roles: Tensor | None, batch: int, length: int,
                 device: torch.device) -> None:
        self.valid, self.roles, self.shape, self.device = mask, roles, (batch, length), device
        self._masks: dict[int, Tensor] = {}
        self._packings: dict[int, kernels.Packing | None] = {}
        self._at: tuple | None = None

    def dense(self, bits: int) -> bool:
        return self.valid is None and bits == EVERY

    def _valid(self) -> Tensor:
        return self.valid if self.valid is not None else torch.ones(self.shape, dtype=torch.bool,
                                                                    device=self.device)

    def mask(self, bits: int) -> Tensor:
        if bits not in self._masks:
            valid = self._valid()
            if bits != EVERY:
                valid = valid & ((bits >> self.roles.long()) & 1).bool()
            self._masks[bits] = valid
        return self._masks[bits]

    def per_column(self, bits: Tensor, rows: RowSet | None = None) -> Tensor:
        """The view of each column (its scope bits): bool [B, T, K], or [n, K] at the evaluated `rows`."""
        key = None if rows is None else rows.index
        if self._at is None or self._at[0] is not key:   # the valid flags and roles of these rows, once
            at = (lambda grid: grid) if rows is None else rows.take_grid
            valid = at(self._valid().unsqueeze(-1))
            roles = None if self.roles is None else at(self.roles.long().unsqueeze(-1))
            self._at = (key, valid, roles)
        _, valid, roles = self._at
        if roles is None:   # no scopes in the rules: every view is every valid token
            return valid.expand(*valid.shape[:-1], bits.shape[0])
        return valid & ((bits >> roles) & 1).bool()

    def packing(self, bits: int) -> kernels.Packing | None:
        if bits not in self._packings:
            self._packings[bits] = None if self.dense(bits) else kernels.Packing.of(self.mask(bits))
        return self._packings[bits]


def first_firing(holds: Tensor) -> Tensor:
    """First token index where each rule holds: bool [batch, T, n_rules] -> long [batch, n_rules], -1 where never."""
    if holds.shape[1] == 0:
        return torch.full((holds.shape[0], holds.shape[2]), -1, dtype=torch.long, device=holds.device)
    first = holds.to(torch.uint8).argmax(dim=1)
    return torch.where(holds.any(dim=1), first, torch.full_like(first, -1))


# ---- compile ----------------------------------------------------------------------------------------------

def compile_rules(rules: Sequence[RuleSpec], ce_names: Sequence[str], *, actions: bool = True) -> RuleProgram:
    """Compile rules over `ce_names` (the columns of `fired` and `scores`); raises RuleErrors listing every
    problem, including (with `actions`) unknown actions and bad action arguments. The program's outputs are the
    public rules (private helper rules are only referenced)."""
    errors = [RuleError(f"CE '{n}' appears more than once in ce_names") for n, c in Counter(ce_names).items() if c > 1]
    names = [r.name for r in rules]
    errors += [RuleError(f"rule name '{n}' is used more than once") for n, c in Counter(names).items() if c > 1]
    errors += check_actions(rules, registry()) if actions else []
    lowering = _Lowering(rules, ce_names)
    values = {r.name: lowering.rule_value(r, EVERY) for r in rules}
    errors += lowering.errors
    if errors:
        raise RuleErrors(errors)
    public = [r.name for r in rules if not r.private]
    return _assemble(lowering, tuple(public), [values[n] for n in public], tuple(ce_names))


def _assemble(low: _Lowering, rule_names: tuple[str, ...], roots: list[int], ce_names: tuple[str, ...]) -> RuleProgram:
    """Lay the reachable nodes out as value columns, stage by stage, and build the batched stage tensors."""
    live: set[int] = set()
    stack = list(roots)
    while stack:
        ref = stack.pop()
        if ref in live:
            continue
        live.add(ref)
        node = low.nodes[ref]
        if node.kind == "gate":
            stack.extend(r for r, _ in node.key[0])
        elif node.kind == "count":
            stack.append(node.key[2])
    order = sorted(live, key=lambda r: (low.nodes[r].depth, r))
    by_kind = {k: [r for r in order if low.nodes[r].kind == k] for k in ("fired", "compare", "scope")}
    by_kind["compare"].sort(key=lambda r: kernels.COMPARISONS.index(low.nodes[r].key[1]))
    column: dict[int, int] = {}
    width = 1
    for kind in ("fired", "compare", "scope"):
        for r in by_kind[kind]:
            column[r] = width
            width += 1
    fired = [low.nodes[r].key[0] for r in by_kind["fired"]]
    compared = [low.nodes[r].key for r in by_kind["compare"]]   # (ce, op, value), grouped by op
    groups = []
    for op in kernels.COMPARISONS:
        keys = [k for k in compared if k[1] == op]
        if keys:
            groups.append(kernels.Comparisons.build(op, [c for c, _, _ in keys], [v for _, _, v in keys],
                                                    len(ce_names)))
    lowest = torch.full((len(ce_names),), torch.inf, dtype=torch.float64)
    for c, _, v in compared:
        lowest[c] = min(float(lowest[c]), v)
    atoms = _Atoms(fired=torch.tensor(fired, dtype=torch.long), compared=tuple(groups),
                   scopes=torch.tensor([low.nodes[r].key[0] for r in by_kind["scope"]], dtype=torch.long),
                   lowest=lowest, lowest32=kernels.float32_bounds(">=", lowest))
    shapes: list[tuple[str, tuple[int, ...], torch.dtype, float]] = []
    stages = []
    by_depth: dict[int, list[int]] = {}
    for r in order:
        if low.nodes[r].kind in ("gate", "count", "score"):
            by_depth.setdefault(low.nodes[r].depth, []).append(r)
    for depth in sorted(by_depth):
        at_depth = by_depth[depth]
        parts: list[object] = []
        groups: dict[tuple, list[int]] = {}
        for r in at_depth:
            node = low.nodes[r]
            if node.kind == "count":
                windowed = node.key[1] is not None   # windows pack their view's tokens; running counts mix views
                groups.setdefault(("count", node.key[0] if windowed else -1, windowed), []).append(r)
            elif node.kind == "score":
                groups.setdefault(("score", *node.key[:3]), []).append(r)
        for group_key, refs in groups.items():
            start = width
            for r in refs:
                column[r] = width
                width += 1
            if group_key[0] == "count":
                parts.append(_counts(low, refs, column, start, group_key[1], group_key[2], shapes))
            else:
                parts.append(_scores(low, refs, start, *group_key[1:], shapes))
        gates = [r for r in at_depth if low.nodes[r].kind == "gate"]
        if gates:
            arity = max(len(low.nodes[r].key[0]) for r in gates)
            terms = [low.nodes[r].key[0] for r in gates]
            inputs = torch.tensor([[column[ref] for ref, _ in t] + [0] * (arity - len(t)) for t in terms],
                                  dtype=torch.long).view(len(gates), arity)
            weights = torch.tensor([[float(w) for _, w in t] + [0.0] * (arity - len(t)) for t in terms]
                                   ).view(len(gates), arity)
            parts.append(_Gates(width, inputs, weights,
                                torch.tensor([float(low.nodes[r].key[1]) for r in gates])))
            for r in gates:
                column[r] = width
                width += 1
        stages.append(tuple(parts))
    read = set(fired) | {c for c, _, _ in compared} | {low.nodes[r].key[3] for r in order
                                                        if low.nodes[r].kind == "score"}
    return RuleProgram(
        rule_names=rule_names, ce_names=ce_names, ce_indices=tuple(sorted(read)), width=width, atoms=atoms,
        stages=tuple(stages), outputs=torch.tensor([column[r] for r in roots], dtype=torch.long),
        state_shapes=tuple(shapes), needs_scores=bool(compared) or any(low.nodes[r].kind == "score" for r in order),
        needs_roles=bool(by_kind["scope"]) or any(low.nodes[r].key[0] != EVERY for r in order
                                                  if low.nodes[r].kind in ("count", "score")))


def _counts(low: _Lowering, refs: list[int], column: dict[int, int], start: int, view: int, windowed: bool,
            shapes: list) -> _Counts:
    keys = [low.nodes[r].key for r in refs]  # (view, window, x, exclude, op, k)
    longest = max(k[1] for k in keys) if windowed else 0
    slot = len(shapes)
    shapes.append(("history", (longest, len(refs)), torch.bool, False) if windowed else
                  ("count", (len(refs),), torch.long, 0))
    latch = not windowed and all(not k[3] and k[4:] == (">=", 1) for k in keys)
    return _Counts(start=start, view=view, views=torch.tensor([k[0] for k in keys], dtype=torch.long),
                   windowed=windowed, latch=latch, slot=slot,
                   x=torch.tensor([column[k[2]] for k in keys], dtype=torch.long),
                   window=torch.tensor([k[1] or 0 for k in keys], dtype=torch.long),
                   exclude=torch.tensor([k[3] for k in keys], dtype=torch.bool),
                   table=kernels.comparison_table([k[4] for k in keys]),
                   threshold=torch.tensor([k[5] for k in keys], dtype=torch.long))


def _scores(low: _Lowering, refs: list[int], start: int, view: int, function: str, window: int | None,
            shapes: list) -> _Scores:
    keys = [low.nodes[r].key for r in refs]  # (view, function, window, ce, op, value)
    reducer = low.reducers.get(function)
    assert reducer is None or window is not None   # the parser gives every plugin function a window
    fill = torch.nan if reducer is not None else _IDENTITY[function]
    slot = len(shapes)
    shapes.append(("history", (window, len(refs)), torch.float64, fill) if window is not None else
                  ("running", (len(refs),), torch.float64, fill))
    shapes.append(("seen", (), torch.long, 0))
    return _Scores(start=start, view=view, function=function, window=window, slot=slot,
                   ces=torch.tensor([k[3] for k in keys], dtype=torch.long),
                   table=kernels.comparison_table([k[4] for k in keys]),
                   threshold=torch.tensor([k[5] for k in keys], dtype=torch.float64), reducer=reducer)
