"""Compile rules to a tensor program over latched CE detections.

Every node is a threshold gate `sum(inputs) >= t`: `k of G` is t=k over G's CEs, `all of G` t=|G|, a bare
group t=1, `and` t=#terms, `or` t=1. Gates over CEs only (the selectors) are one matmul of the detected CEs
with a membership matrix; the and/or gates above them are grouped by depth and each level is one gather and
sum. Gates are shared across rules; nothing loops in Python over rules or tokens, and nothing syncs the host.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gavel.errors import RuleError, did_you_mean
from gavel.rules.ast import AllOf, And, Expr, Name, Or
from gavel.rules.spec import RuleErrors, RuleSpec

_BLOCK = 256  # tokens per block when `run` looks for each CE's first firing


@dataclass(frozen=True, slots=True)
class RuleState:
    """Per-sequence rule state: which needed CEs (`RuleProgram.ce_indices` order) are detected so far."""

    detected: Tensor  # bool [batch, n_needed]


@dataclass(frozen=True, slots=True)
class _Gates:
    """One depth level of and/or gates: each sums the value columns in its row of `inputs` (0 pads)."""

    inputs: Tensor  # long [n_gates, max_arity]
    threshold: Tensor  # float32 [n_gates]


@dataclass(frozen=True, slots=True)
class RuleProgram:
    """Compiled rules. Value columns: a constant 0, the needed CEs, the selector gates, then each and/or level."""

    rule_names: tuple[str, ...]
    ce_names: tuple[str, ...]
    ce_indices: tuple[int, ...]
    gather: Tensor  # long [n_needed]: ce_indices as a tensor
    membership: Tensor  # float32 0/1 [n_needed, n_selectors]
    selector_threshold: Tensor  # float32 [n_selectors]
    levels: tuple[_Gates, ...]
    outputs: Tensor  # long [n_rules]: the value column holding each rule's condition

    def to(self, device: torch.device | str) -> RuleProgram:
        """A copy on `device` (call once; stepping with tensors elsewhere copies the program every step)."""
        return dataclasses.replace(
            self, gather=self.gather.to(device), membership=self.membership.to(device),
            selector_threshold=self.selector_threshold.to(device), outputs=self.outputs.to(device),
            levels=tuple(_Gates(g.inputs.to(device), g.threshold.to(device)) for g in self.levels))

    def init_state(self, batch: int, device: torch.device | str | None = None) -> RuleState:
        """Nothing detected yet, for `batch` sequences."""
        return RuleState(torch.zeros(batch, len(self.ce_indices), dtype=torch.bool, device=device))

    def evaluate(self, detected: Tensor) -> Tensor:
        """Rule conditions over detected sets: bool [rows, n_needed] -> bool [rows, n_rules]."""
        device = detected.device
        if self.membership.device != device:
            return self.to(device).evaluate(detected)
        n_ce, n_sel = self.membership.shape
        width = 1 + n_ce + n_sel + sum(g.threshold.shape[0] for g in self.levels)
        values = torch.zeros(detected.shape[0], width, dtype=torch.float32, device=device)
        values[:, 1:1 + n_ce] = detected
        counts = values[:, 1:1 + n_ce] @ self.membership
        values[:, 1 + n_ce:1 + n_ce + n_sel] = counts >= self.selector_threshold
        start = 1 + n_ce + n_sel
        for gates in self.levels:
            n = gates.threshold.shape[0]
            total = values[:, gates.inputs].sum(dim=-1)
            values[:, start:start + n] = total >= gates.threshold
            start += n
        return values[:, self.outputs] > 0.5

    def _needed(self, fired: Tensor) -> Tensor:
        """The needed CEs' columns of `fired` (the program's index moved only if it lives elsewhere)."""
        gather = self.gather if self.gather.device == fired.device else self.gather.to(fired.device)
        return _check_fired(fired).index_select(-1, gather)

    def step(self, fired: Tensor, state: RuleState, active: Tensor | None = None) -> tuple[Tensor, RuleState]:
        """One token: `fired` bool [batch, len(ce_names)]; rows where `active` is False keep their state.

        Returns (holds bool [batch, n_rules], new state).
        """
        new = self._needed(fired)
        if active is not None:
            new = new & active.bool().unsqueeze(-1)
        detected = state.detected | new
        return self.evaluate(detected), RuleState(detected)

    def advance(self, fired: Tensor, state: RuleState, mask: Tensor | None = None) -> tuple[Tensor, RuleState]:
        """Several tokens from `state` at once (a prefill): `fired` bool [batch, T, len(ce_names)], `mask`
        bool [batch, T] -> (holds [batch, T, n_rules], state after the last token). Same as T `step`s."""
        new = self._needed(fired)
        if mask is not None:
            new = new & mask.bool().unsqueeze(-1)
        batch, length, n = new.shape
        if length == 0:
            return torch.zeros(batch, 0, len(self.rule_names), dtype=torch.bool, device=fired.device), state
        if length == 1:  # a decoding step
            detected = state.detected | new[:, 0]
            return self.evaluate(detected).unsqueeze(1), RuleState(detected)
        detected = state.detected.unsqueeze(1) | (new.cumsum(dim=1) > 0)
        holds = self.evaluate(detected.reshape(batch * length, n)).reshape(batch, length, -1)
        return holds, RuleState(detected[:, -1])

    def run(self, fired: Tensor, mask: Tensor | None = None) -> Tensor:
        """A whole trace: `fired` bool [batch, T, len(ce_names)], `mask` bool [batch, T] -> holds [batch, T, n_rules].

        Same result as stepping token by token from `init_state` with `active=mask[:, t]`. Detected sets only
        grow, so with each CE's first firing known, a sequence passes through at most n_needed + 1 sets: each
        is evaluated once and looked up per token, so the cost of the conditions does not grow with T.
        """
        x = _check_fired(fired)
        if mask is not None:
            x = x & mask.bool().unsqueeze(-1)
        batch, length = x.shape[:2]
        first = _first_true(x).index_select(-1, self.gather.to(x.device))  # [batch, n_needed], T if never
        times = first.sort(dim=-1).values
        after = first.unsqueeze(1) <= times.unsqueeze(-1)  # [batch, k, n_needed]: detected once k+1 CEs are
        width = first.shape[-1]
        sets = torch.cat([after.new_zeros(batch, 1, width), after], dim=1)
        holds = self.evaluate(sets.reshape(batch * (width + 1), width)).reshape(batch, width + 1, len(self.rule_names))
        tokens = torch.arange(length, device=x.device).expand(batch, length).contiguous()
        count = torch.searchsorted(times, tokens, right=True)  # CEs detected at each token
        return holds.gather(1, count.unsqueeze(-1).expand(-1, -1, holds.shape[-1]))


def _check_fired(fired: Tensor) -> Tensor:
    if fired.dtype != torch.bool:
        raise TypeError(f"`fired` must be a bool tensor (CE scores compared with their thresholds), not {fired.dtype}")
    return fired


def _first_true(x: Tensor) -> Tensor:
    """Index of the first True along dim 1 of bool [batch, T, C] (T where none): a max per block, then one block."""
    batch, length, n = x.shape
    if length == 0:
        return torch.zeros(batch, n, dtype=torch.long, device=x.device)
    blocks = -(-length // _BLOCK)
    u = x.view(torch.uint8)
    if blocks * _BLOCK != length:
        u = torch.nn.functional.pad(u, (0, 0, 0, blocks * _BLOCK - length))
    u = u.reshape(batch, blocks, _BLOCK, n)
    hit = u.amax(dim=2)  # [batch, blocks, C]
    block = hit.argmax(dim=1)  # first block with a hit (0 if none)
    inside = u[torch.arange(batch, device=x.device).unsqueeze(1), block, :, torch.arange(n, device=x.device)]
    index = block * _BLOCK + inside.argmax(dim=-1)
    return torch.where(hit.amax(dim=1) > 0, index, torch.full_like(index, length))


def first_firing(holds: Tensor) -> Tensor:
    """First token index where each rule holds: bool [batch, T, n_rules] -> long [batch, n_rules], -1 where never."""
    first = _first_true(holds.bool())
    return torch.where(first < holds.shape[1], first, torch.full_like(first, -1))


class _Builder:
    """Resolves names and hash-conses gates `(inputs, threshold)`; value ids are CE indices or gate numbers."""

    def __init__(self, ce_names: Sequence[str]) -> None:
        self.ce_index = {name: i for i, name in enumerate(ce_names)}
        self.ce_names = ce_names
        self.gates: dict[tuple[frozenset[tuple[str, int]], int], int] = {}
        self.depth: dict[tuple[str, int], int] = {}
        self.errors: list[RuleError] = []
        self._checked: set[tuple[str, str]] = set()

    def _gate(self, inputs: frozenset[tuple[str, int]], threshold: int) -> tuple[str, int]:
        if len(inputs) == 1 and threshold == 1:
            return next(iter(inputs))
        key = (inputs, threshold)
        ref = ("gate", self.gates.setdefault(key, len(self.gates)))
        self.depth[ref] = 1 + max(self.depth.get(i, 0) for i in inputs)
        return ref

    def _members(self, rule: RuleSpec, group: str, offset: int) -> frozenset[tuple[str, int]] | None:
        if group not in rule.groups:
            guess = did_you_mean(group, list(rule.groups))
            self.errors.append(rule.error(f"undefined group '{group}'", offset,
                                          hint=f"did you mean '{guess}'?" if guess else None))
            return None
        refs = set()
        first_use = (rule.name, group) not in self._checked
        self._checked.add((rule.name, group))
        for i, ce in enumerate(rule.groups[group]):
            if ce not in self.ce_index and first_use:
                guess = did_you_mean(ce, list(self.ce_names))
                self.errors.append(RuleError(f"rule '{rule.name}': group '{group}' uses unknown CE '{ce}'",
                                             location=rule.field_location("groups", group, i),
                                             hint=f"did you mean '{guess}'?" if guess else None))
            elif ce in self.ce_index:
                refs.add(("ce", self.ce_index[ce]))
        return frozenset(refs) if len(refs) == len(set(rule.groups[group])) else None

    def build(self, rule: RuleSpec, expr: Expr) -> tuple[str, int] | None:
        """The value computing `expr`, or None after recording errors."""
        at = expr.span.start
        if isinstance(expr, (And, Or)):
            terms = [t for e in expr.terms for t in (e.terms if type(e) is type(expr) else (e,))]
            refs = [self.build(rule, t) for t in terms]
            if any(r is None for r in refs):
                return None
            inputs = frozenset(refs)
            return self._gate(inputs, len(inputs) if isinstance(expr, And) else 1)
        if isinstance(expr, Name) and expr.name not in rule.groups:
            if expr.name in self.ce_index:
                return ("ce", self.ce_index[expr.name])
            guess = did_you_mean(expr.name, [*rule.groups, *self.ce_names])
            self.errors.append(rule.error(f"'{expr.name}' is neither a group of this rule nor a known CE", at,
                                          hint=f"did you mean '{guess}'?" if guess else None))
            return None
        group = expr.name if isinstance(expr, Name) else expr.group
        members = self._members(rule, group, at)
        if members is None:
            return None
        k = 1 if isinstance(expr, Name) else len(members) if isinstance(expr, AllOf) else expr.k
        if not 1 <= k <= len(members):
            self.errors.append(rule.error(f"`{expr}` needs 1 <= k <= {len(members)} (the CEs in '{group}')", at))
            return None
        return self._gate(members, k)


def compile_rules(rules: Sequence[RuleSpec], ce_names: Sequence[str]) -> RuleProgram:
    """Compile rules over `ce_names` (the columns of `fired`); raises RuleErrors listing every problem."""
    errors = [RuleError(f"CE '{n}' appears more than once in ce_names") for n, c in Counter(ce_names).items() if c > 1]
    names = [r.name for r in rules]
    errors += [RuleError(f"rule name '{n}' is used more than once") for n, c in Counter(names).items() if c > 1]
    builder = _Builder(ce_names)
    roots = [builder.build(rule, rule.expr) for rule in rules]
    errors += builder.errors
    if errors:
        raise RuleErrors(errors)
    return _assemble(tuple(names), tuple(ce_names), builder, roots)


def _assemble(rule_names: tuple[str, ...], ce_names: tuple[str, ...], builder: _Builder,
              roots: list[tuple[str, int]]) -> RuleProgram:
    """Number the value columns (0, needed CEs, selectors, and/or levels) and build the gate tensors."""
    inputs = {("gate", g): sorted(ins) for (ins, _), g in builder.gates.items()}
    threshold = {("gate", g): float(t) for (_, t), g in builder.gates.items()}
    needed = sorted({i for ins in inputs.values() for kind, i in ins if kind == "ce"}
                    | {i for kind, i in roots if kind == "ce"})
    column: dict[tuple[str, int], int] = {("ce", c): 1 + j for j, c in enumerate(needed)}
    by_depth: dict[int, list[tuple[str, int]]] = {}
    for ref in inputs:
        by_depth.setdefault(builder.depth[ref], []).append(ref)
    selectors = by_depth.pop(1, [])
    membership = torch.zeros(len(needed), len(selectors))
    for j, ref in enumerate(selectors):
        membership[[column[i] - 1 for i in inputs[ref]], j] = 1.0
        column[ref] = 1 + len(needed) + j
    levels = []
    for depth in sorted(by_depth):
        refs = by_depth[depth]
        arity = max(len(inputs[r]) for r in refs)
        index = torch.zeros(len(refs), arity, dtype=torch.long)
        for j, ref in enumerate(refs):
            index[j, :len(inputs[ref])] = torch.tensor([column[i] for i in inputs[ref]])
        start = 1 + len(column)
        for j, ref in enumerate(refs):
            column[ref] = start + j
        levels.append(_Gates(index, torch.tensor([threshold[r] for r in refs])))
    return RuleProgram(rule_names=rule_names, ce_names=ce_names, ce_indices=tuple(needed),
                       gather=torch.tensor(needed, dtype=torch.long), membership=membership,
                       selector_threshold=torch.tensor([threshold[r] for r in selectors]), levels=tuple(levels),
                       outputs=torch.tensor([column[r] for r in roots], dtype=torch.long))
