"""Soft rule scores: the fuzzy truth of each rule's condition per token, over calibrated CE probabilities, so a rule
ranks conversations (ROC-AUC) instead of only firing.

The compiled graph (gavel.rules.compile.ir) is evaluated with values in [0, 1] instead of bools: a CE atom is its
probability; a gate `sum(w * x) >= k` (and, or, not, `k of G`) is the k-th largest of its inputs, a negated input
entering as 1 - x (so and = min, or = max, `all of G` = min, `k of G` = the k-th largest member, not x = 1 - x); a
count `count(x) >= k` over a window (once, then, for, count) is the k-th largest x in the window (`> k`: the
(k+1)-th; `<`, `<=`, `==`, `!=` by negation). Comparisons with constants (`c > 0.8`), scopes and `max`/`min`/`mean`
aggregates stay crisp (0 or 1): they already name their threshold. Not defined: plugin score functions; a rule
reading one gets no soft score (None). With probabilities exactly 0 or 1 every value equals the boolean program's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gavel.rules.compile import kernels
from gavel.rules.compile.ir import EVERY, Compared, Count, Fired, Gate, Scope, Score
from gavel.rules.compile.lower import Lowering, all_built
from gavel.rules.load import RuleErrors, RuleSpec

__all__ = ["SoftRules"]


class SoftRules:
    """The soft value of every public rule of `rules` over CE columns `ce_names`; raises RuleErrors like
    `compile_rules` for rules that do not compile."""

    def __init__(self, rules: Sequence[RuleSpec], ce_names: Sequence[str]) -> None:
        lowering = Lowering(rules, ce_names)
        values = {r.name: lowering.rule_value(r, EVERY) for r in rules}
        if lowering.errors:
            raise RuleErrors(lowering.errors)
        self.rule_names = tuple(r.name for r in rules if not r.private)
        roots = [values[n] for n in self.rule_names]
        assert all_built(roots), "no errors: every rule was built"
        self.roots = roots
        self.nodes = lowering.graph.nodes
        self.order = lowering.graph.reachable(roots)
        undefined: set[int] = set()
        for ref in self.order:   # inputs come first
            node = self.nodes[ref]
            if (isinstance(node, Score) and node.function not in _REDUCE) or any(i in undefined for i in node.inputs):
                undefined.add(ref)
        self.undefined = undefined
        self.needs_classes = any(isinstance(self.nodes[r], Scope) or getattr(self.nodes[r], "view", EVERY) != EVERY
                                 for r in self.order)

    @property
    def defined(self) -> list[bool]:
        """Per public rule: whether it has a soft value (it reads no plugin score function)."""
        return [r not in self.undefined for r in self.roots]

    def values(self, scores: Tensor, classes: Tensor | None = None) -> Tensor:
        """Soft value of each rule at each token: float64 [T, n_rules] (NaN for rules without one). `scores` [T, C]
        are the CE probabilities as the rules see them (0 at template tokens), `classes` [T] the token class codes
        (role + RESPONSE for response tokens), needed when the rules use scopes."""
        if self.needs_classes and classes is None:
            raise ValueError("these rules use scopes (prompt, response, user, ...): pass the token classes")
        scores = scores.double()
        length = scores.shape[0]
        at: dict[int, Tensor] = {}
        for ref in self.order:
            if ref not in self.undefined:
                at[ref] = self._node(ref, scores, classes, at, length)
        nan = torch.full((length,), torch.nan, dtype=torch.float64)
        columns = [at.get(r, nan) for r in self.roots]
        return torch.stack(columns, 1) if columns else torch.zeros(length, 0, dtype=torch.float64)

    def scores(self, scores: Tensor, classes: Tensor | None = None) -> list[float | None]:
        """Each rule's soft score over a conversation: its highest soft value at any token (None: not defined)."""
        values = self.values(scores, classes)
        if values.shape[0] == 0:
            return [0.0 if d else None for d in self.defined]
        top = values.max(0).values
        return [float(v) if d else None for v, d in zip(top, self.defined)]

    def _node(self, ref: int, scores: Tensor, classes: Tensor | None, at: dict[int, Tensor], length: int) -> Tensor:
        node = self.nodes[ref]
        if isinstance(node, Fired):
            return scores[:, node.ce]
        if isinstance(node, Compared):
            return _crisp(scores[:, node.ce], node.op, node.value)
        if isinstance(node, Scope):
            return _in_view(node.bits, classes, length).double()
        if isinstance(node, Gate):
            items = [at[i] if w > 0 else 1 - at[i] for i, w in node.terms for _ in range(abs(w))]
            k = node.threshold + sum(-w for _, w in node.terms if w < 0)
            # (terms that cancel out, `a and not a` for one, leave a constant gate without inputs)
            return _kth(torch.stack(items, 1) if items else torch.zeros(length, 0, dtype=torch.float64), k)
        view = _in_view(node.view, classes, length)
        out = torch.zeros(length, dtype=torch.float64)
        if isinstance(node, Count):
            out[view] = _soft_count(at[node.term][view], node.window, node.exclude, node.op, node.k)
        else:
            assert isinstance(node, Score)
            out[view] = _crisp(_REDUCE[node.function](scores[view, node.ce], node.window), node.op, node.value)
        return out


def _in_view(bits: int, classes: Tensor | None, length: int) -> Tensor:
    if bits == EVERY or classes is None:
        return torch.ones(length, dtype=torch.bool)
    return ((bits >> classes.long()) & 1).bool()


def _crisp(x: Tensor, op: str, value: float) -> Tensor:
    table = kernels.comparison_table([op])
    return kernels.compare(x.unsqueeze(-1), table, torch.tensor([value], dtype=x.dtype))[:, 0].double()


def _kth(items: Tensor, k: int) -> Tensor:
    """The k-th largest of each row of `items` [T, n]: 1 when k <= 0 (always at least 0 hold), 0 when k > n."""
    if k <= 0:
        return torch.ones(items.shape[0], dtype=torch.float64)
    if k > items.shape[1]:
        return torch.zeros(items.shape[0], dtype=torch.float64)
    return items.topk(k, dim=1).values[:, -1]


def _windows(x: Tensor, window: int | None) -> Tensor:
    """[T, W]: the last W values of `x` up to each position (zeros before the start); W = T without a window."""
    size = window if window is not None else max(1, x.shape[0])
    padded = torch.cat([torch.zeros(size, dtype=x.dtype), x])
    return padded.unfold(0, size, 1)[1:]


def _soft_count(x: Tensor, window: int | None, exclude: bool, op: str, k: int) -> Tensor:
    """Soft `count(x) op k` over the last `window` values (all so far: None), before each one when `exclude`."""
    if exclude:
        x = torch.cat([x.new_zeros(1), x[:-1]])
    needed = {">=": (k,), ">": (k + 1,), "<": (k,), "<=": (k + 1,), "==": (k, k + 1), "!=": (k, k + 1)}[op]
    if window is None and needed == (1,):   # once: the running max
        kth = {1: x.cummax(0).values if len(x) else x}
    else:
        windows = _windows(x, window)
        kth = {n: _kth(windows, n) for n in needed}
    if op in (">=", ">"):
        return kth[needed[0]]
    if op in ("<", "<="):
        return 1 - kth[needed[0]]
    low, high = kth[k], kth[k + 1]
    return torch.minimum(low, 1 - high) if op == "==" else torch.maximum(1 - low, high)


def _reduce(function: str):
    def run(x: Tensor, window: int | None) -> Tensor:
        if window is None:
            if function == "mean":
                return x.cumsum(0) / torch.arange(1, len(x) + 1, dtype=x.dtype)
            return (x.cummax(0) if function == "max" else x.cummin(0)).values if len(x) else x
        padded = torch.cat([torch.full((window,), torch.nan, dtype=x.dtype), x]).unfold(0, window, 1)[1:]
        present = ~padded.isnan()
        if function == "mean":
            return torch.where(present, padded, 0).sum(1) / present.sum(1).clamp(min=1)
        fill = -torch.inf if function == "max" else torch.inf
        filled = torch.where(present, padded, fill)
        return filled.amax(1) if function == "max" else filled.amin(1)
    return run


_REDUCE = {f: _reduce(f) for f in ("max", "min", "mean")}
