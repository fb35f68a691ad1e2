"""Tensor kernels of the rule evaluator: past-time window operators over chunks of tokens, with carried state.

Every kernel takes a chunk `[batch, T, K]` (K operator instances side by side), a view mask `[batch, T]` (the
tokens the operators see) and the state left by the previous chunk, and returns `(out, new state)`; the state's
size depends on the windows only, never on how many tokens came before. Windowed kernels work on the view's
tokens packed to the left ("compacted"), preceded by the last N values seen, so a chunk of T tokens costs
O(T) (counts) or O(T log N) (max/min) whatever the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from gavel.plugins.functions import ScoreFunction

COMPARISONS = (">", ">=", "<", "<=", "==", "!=")
# per comparison: does it hold when x > t, x == t, x < t
_TRUTH = {">": (1, 0, 0), ">=": (1, 1, 0), "<": (0, 0, 1), "<=": (0, 1, 1), "==": (0, 1, 0), "!=": (1, 0, 1)}


def comparison_table(ops: list[str]) -> Tensor:
    """bool [3, K]: rows say whether each column's comparison holds above, at, below its threshold."""
    return torch.tensor([_TRUTH[op] for op in ops], dtype=torch.bool).reshape(len(ops), 3).T.contiguous()


def compare(x: Tensor, table: Tensor, threshold: Tensor) -> Tensor:
    """`x op threshold` column-wise over the last dim, each column with its own comparison."""
    return ((x > threshold) & table[0]) | ((x == threshold) & table[1]) | ((x < threshold) & table[2])


_OPS = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le, "==": torch.eq, "!=": torch.ne}


def float32_bounds(op: str, thresholds: Tensor) -> Tensor:
    """float32 thresholds t' with `x op t' == x op t` for every float32 x (t float64): the float32 just below t
    for `>` and `<=`, just above for `>=` and `<`; NaN for `==` / `!=` with a t no float32 equals."""
    near = thresholds.float()
    if op in ("==", "!="):
        return torch.where(near.double() == thresholds, near, torch.nan)
    below = torch.where(near.double() > thresholds, torch.nextafter(near, torch.tensor(-torch.inf)), near)
    above = torch.where(near.double() < thresholds, torch.nextafter(near, torch.tensor(torch.inf)), near)
    if op in (">", "<="):
        return below
    return above


def at_least(scores: Tensor, bound: Tensor, bound32: Tensor) -> Tensor:
    """scores >= bound (per CE, the last dim), exact for float32 scores through `bound32`."""
    return scores >= bound if scores.dtype == torch.float64 else scores.float() >= bound32


@dataclass(frozen=True, slots=True)
class Comparisons:
    """Scores compared with constants by one operator, every CE at once: layer l holds each CE's l-th threshold
    (a never-holding pad where it has fewer), so no column gather over the whole chunk is needed."""

    op: str
    threshold: Tensor    # float64 [L, C]
    threshold32: Tensor  # float32 [L, C], exact for float32 scores (see float32_bounds)
    columns: Tensor      # long [n]: the (layer * C + ce) of each comparison atom, in atom order

    @staticmethod
    def build(op: str, ces: list[int], values: list[float], n_ces: int) -> Comparisons:
        pad = {">": torch.inf, ">=": torch.inf, "<": -torch.inf, "<=": -torch.inf}.get(op, torch.nan)
        layer_of: dict[int, int] = {}
        columns = []
        for ce in ces:
            layer_of[ce] = layer_of.get(ce, -1) + 1
            columns.append(layer_of[ce] * n_ces + ce)
        threshold = torch.full((max(layer_of.values()) + 1, n_ces), pad, dtype=torch.float64)
        threshold.view(-1)[torch.tensor(columns)] = torch.tensor(values, dtype=torch.float64)
        return Comparisons(op, threshold, float32_bounds(op, threshold.view(-1)).view_as(threshold),
                           torch.tensor(columns, dtype=torch.long))

    def __call__(self, scores: Tensor) -> list[Tensor]:
        """Each layer's comparison, bool [..., C] (concatenated, `columns` selects the atoms)."""
        exact = scores.dtype == torch.float64
        x, threshold = (scores, self.threshold) if exact else (scores.float(), self.threshold32)
        return [_OPS[self.op](x, layer) for layer in threshold]


@dataclass(frozen=True, slots=True)
class Packing:
    """Where the view's tokens go when packed to the left of a chunk, and how to unpack."""

    order: Tensor  # long [B, T]: source token of each packed position (view tokens first, in order)
    rank: Tensor   # long [B, T]: packed position of each token (meaningful where the view holds)
    count: Tensor  # long [B]: view tokens in the chunk

    @staticmethod
    def of(view: Tensor) -> Packing:
        order = torch.argsort((~view).to(torch.uint8), dim=1, stable=True)
        rank = (view.long().cumsum(1) - 1).clamp(min=0)
        return Packing(order, rank, view.long().sum(1))

    def pack(self, x: Tensor) -> Tensor:
        return x.gather(1, self.order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def unpack(self, x: Tensor, view: Tensor) -> Tensor:
        return x.gather(1, self.rank.unsqueeze(-1).expand(-1, -1, x.shape[-1])) & view.unsqueeze(-1)

    def last(self, seq: Tensor, n: int) -> Tensor:
        """The `n` entries of `seq` [B, n + T, K] (history then packed chunk) that end at each row's last token."""
        index = self.count.unsqueeze(1) + torch.arange(n, device=seq.device)
        return seq.gather(1, index.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))


def windowed_count(x: Tensor, history: Tensor, window: Tensor, exclude: Tensor, table: Tensor,
                   threshold: Tensor, view: Tensor, packing: Packing | None) -> tuple[Tensor, Tensor]:
    """Count where x held over each column's last `window` view tokens (ending before the current one where
    `exclude`) and compare.

    x: bool [B, T, K]; history: bool [B, Nmax, K] (most recent last); window, exclude, threshold: [K];
    view: bool [B, T]; packing: the view's packing, None when every token of the chunk is in view.
    Returns (bool [B, T, K], new history).
    """
    batch, length, _ = x.shape
    longest = history.shape[1]
    packed = x if packing is None else packing.pack(x)
    seq = torch.cat([history, packed], dim=1)
    sums = F.pad(seq.to(torch.int32).cumsum(1), (0, 0, 1, 0))
    hi = longest + 1 + torch.arange(length, device=x.device).unsqueeze(1) - exclude.long().unsqueeze(0)
    lo = hi - window.unsqueeze(0)
    hi, lo = hi.unsqueeze(0).expand(batch, -1, -1), lo.unsqueeze(0).expand(batch, -1, -1)
    counts = sums.gather(1, hi) - sums.gather(1, lo)
    out = compare(counts, table, threshold)
    if packing is None:
        return out, seq[:, length:]
    return packing.unpack(out, view), packing.last(seq, longest)


def running_count(x: Tensor, view: Tensor, total: Tensor, exclude: Tensor, table: Tensor,
                  threshold: Tensor, latch: bool = False) -> tuple[Tensor, Tensor]:
    """`windowed_count` without a window: over every view token so far. view: bool [B, T] or per column
    [B, T, K]; total: long [B, K], the count so far; `latch`: every column is `count >= 1` (once)."""
    inside = view if view.dim() == 3 else view.unsqueeze(-1)
    seen = (x & inside).to(torch.int32)
    if x.shape[1] == 1:   # a decoding step
        through = total.unsqueeze(1).to(torch.int32) + seen
    else:
        through = total.unsqueeze(1) + seen.cumsum(1, dtype=torch.int32)
    if latch:
        out = (through > 0) & inside
    else:
        counts = torch.where(exclude, through - seen, through)
        out = compare(counts, table, threshold) & inside
    return out, through[:, -1].to(total.dtype) if x.shape[1] else total


def windowed_scores(x: Tensor, function: str, window: int, history: Tensor, seen: Tensor, table: Tensor,
                    threshold: Tensor, view: Tensor, packing: Packing | None,
                    reducer: ScoreFunction | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """max / min / mean (or a plugin's `reducer`) of each column's scores over the last `window` view tokens
    (fewer at the start), compared.

    x: float [B, T, K]; history: [B, window, K] (float64, padded with the function's identity, NaN for a plugin);
    seen: long [B], view tokens so far. Returns (bool [B, T, K], new history, new seen).
    """
    length = x.shape[1]
    packed = x if packing is None else packing.pack(x)
    seq = torch.cat([history, packed.to(history.dtype)], dim=1)
    if reducer is not None:
        value = reduced(reducer, seq, window)
    elif function == "mean":
        sums = F.pad(seq.cumsum(1), (0, 0, 1, 0))
        total = sums[:, window + 1:] - sums[:, 1:1 + length]
        size = (seen.unsqueeze(1) + 1 + torch.arange(length, device=x.device)).clamp(max=window)
        value = total / size.unsqueeze(-1)
    else:
        sign = 1.0 if function == "max" else -1.0
        value = sign * sliding_max(sign * seq, window)[:, window:]
    out = compare(value, table, threshold)
    if packing is None:
        return out, seq[:, length:], seen + length
    return packing.unpack(out, view), packing.last(seq, window), seen + packing.count


def reduced(reducer: ScoreFunction, seq: Tensor, window: int) -> Tensor:
    """A plugin's value for each new token of `seq` ([B, window + T, K]: history, then the packed chunk) over the
    `window` entries ending at it: [B, T, K]. NaN entries (the padding before a sequence's first view token) are
    passed as 0 with `valid` False, so a plugin never sees a NaN."""
    windows = seq.unfold(1, window, 1)[:, 1:]   # [B, T, K, window], oldest first
    valid = ~windows.isnan()
    value = reducer.reduce(torch.where(valid, windows, 0.0), valid)
    if value.shape != windows.shape[:-1]:
        raise ValueError(f"score function {reducer.name!r} returned shape {tuple(value.shape)} for windows of shape "
                         f"{tuple(windows.shape)}; it must reduce the last dimension")
    return value


def running_scores(x: Tensor, function: str, view: Tensor, total: Tensor, seen: Tensor, table: Tensor,
                   threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`windowed_scores` without a window: max / min / mean over every view token so far."""
    inside = view.unsqueeze(-1)
    if function == "mean":
        sums = total.unsqueeze(1) + torch.where(inside, x.to(total.dtype), 0).cumsum(1)
        counts = seen.unsqueeze(1) + view.long().cumsum(1)
        value = sums / counts.clamp(min=1).unsqueeze(-1)
        last = sums[:, -1] if x.shape[1] else total
    else:
        fill = -torch.inf if function == "max" else torch.inf
        masked = torch.where(inside, x.to(total.dtype), fill)
        both = torch.cat([total.unsqueeze(1), masked], dim=1)
        value = (both.cummax(1) if function == "max" else both.cummin(1)).values[:, 1:]
        last = value[:, -1] if x.shape[1] else total
    out = compare(value, table, threshold) & inside
    return out, last, seen + view.long().sum(1)


def sliding_max(seq: Tensor, window: int) -> Tensor:
    """r[:, i] = max(seq[:, i - window + 1 : i + 1]) along dim 1 (fewer at the start), in O(T log window)."""
    level, span = seq, 1
    while span * 2 <= window:
        level = torch.maximum(level, _shift(level, span))
        span *= 2
    return level if span == window else torch.maximum(level, _shift(level, window - span))


def _shift(x: Tensor, by: int) -> Tensor:
    """x delayed by `by` steps along dim 1, the front filled with -inf."""
    return F.pad(x, (0, 0, by, 0), value=-torch.inf)[:, :x.shape[1]]



@dataclass(frozen=True, slots=True)
class Segments:
    """A chunk's view tokens as runs over which every input is constant (the CPU's sparse path).

    Run i belongs to sequence `sequence[i]`, covers view positions [start[i], start[i] + length[i]) of that
    sequence in this chunk, and begins at flat row `row[i]`; `count[b]` is sequence b's view tokens.
    """

    sequence: Tensor
    start: Tensor
    length: Tensor
    row: Tensor
    count: Tensor

    def row_at(self, sequence: Tensor, position: Tensor) -> Tensor:
        """The flat row of each (sequence, view position)."""
        span = int(self.count.max()) + 1 if self.count.numel() else 1
        i = torch.searchsorted(self.sequence * span + self.start, sequence * span + position, right=True) - 1
        return self.row[i] + (position - self.start[i])


@dataclass(frozen=True, slots=True)
class WindowChanges:
    """Where windowed counts take a value: (sequence, view position, column) -> value; a column keeps its value
    until its next change."""

    sequence: Tensor
    position: Tensor
    column: Tensor
    value: Tensor

    def fill(self, at: Tensor, rows: int, columns: int) -> Tensor:
        """bool [rows, columns] over evaluated rows, given each change's evaluated row `at` (rows in order, the
        first of each sequence holding a change of every column)."""
        value = torch.zeros(rows, columns, dtype=torch.bool, device=at.device)
        setter = torch.full((rows, columns), -1, dtype=torch.int32, device=at.device)
        value[at, self.column] = self.value
        setter[at, self.column] = at.to(torch.int32)
        return value.gather(0, setter.cummax(0).values.clamp(min=0).long())


def sparse_windowed_count(x: Tensor, segments: Segments, history: Tensor, window: Tensor, exclude: Tensor,
                          table: Tensor, threshold: Tensor) -> tuple[WindowChanges, Tensor]:
    """`windowed_count` over runs: work grows with the number of times inputs change, not with tokens.

    x: bool [n_runs, K] (each run's input). A count can only change when a change of its input enters or
    leaves the window, so each column is evaluated at its input's changes and the `window + exclude` tokens
    after each. Returns (where each column's value is set: at each sequence's first view token and wherever
    it changes; the new history).
    """
    batch, longest, k = history.shape
    device = x.device
    span = longest + int(segments.count.max()) + 2 if segments.count.numel() else longest + 2
    # change events per (column, sequence): every history change (the oldest slot always), every run change;
    # a (sequence, column) whose input is the same value throughout history and chunk is "still": its count is
    # constant and needs no events
    h_change = torch.ones_like(history)
    h_change[:, 1:] = history[:, 1:] != history[:, :-1]
    first_run = torch.ones_like(segments.sequence, dtype=torch.bool)
    first_run[1:] = segments.sequence[1:] != segments.sequence[:-1]
    before = torch.where(first_run.unsqueeze(1), history[segments.sequence, -1], x.roll(1, 0))
    ri, rk = (x != before).nonzero(as_tuple=True)
    moving = h_change[:, 1:].any(1)
    moving[segments.sequence[ri], rk] = True
    h_change &= moving.unsqueeze(1)
    hb, hj, hk = h_change.nonzero(as_tuple=True)
    ev_b = torch.cat([hb, segments.sequence[ri]])
    ev_k = torch.cat([hk, rk])
    ev_pos = torch.cat([hj - longest, segments.start[ri]])
    ev_val = torch.cat([history[hb, hj, hk], x[ri, rk]])
    group = ev_k * batch + ev_b
    key = group * span + ev_pos + longest
    key, order = key.sort()
    group, ev_b, ev_k, ev_pos, ev_val = group[order], ev_b[order], ev_k[order], ev_pos[order], ev_val[order]
    # true tokens in each group strictly before each event
    same_next = torch.zeros_like(group, dtype=torch.bool)
    same_next[:-1] = group[1:] == group[:-1]
    end = torch.where(same_next, ev_pos.roll(-1), segments.count[ev_b])
    trues = ev_val.long() * (end - ev_pos)
    through = trues.cumsum(0)
    starts = torch.ones_like(same_next)
    starts[1:] = ~same_next[:-1]
    first_index = torch.where(starts, torch.arange(len(group), device=device), 0).cummax(0).values
    prior = through - trues - (through - trues)[first_index]

    def cumulative(g: Tensor, u: Tensor) -> Tensor:
        """True tokens of group g at view positions <= u (history included)."""
        i = (torch.searchsorted(key, g * span + (u + longest).clamp(min=0), right=True) - 1).clamp(min=0)
        c = prior[i] + ev_val[i].long() * (u - ev_pos[i] + 1)
        return torch.where(u >= -longest, c, 0)

    # evaluation steps: each sequence's first position, and after each event until its effect settles
    reach = window + exclude.long()
    keep = ev_pos + reach[ev_k] >= 0                       # events whose effect reaches this chunk
    spread = (reach[ev_k] + 1)[keep]
    total = int(spread.sum())
    first = spread.cumsum(0) - spread
    offsets = torch.arange(total, device=device) - first.repeat_interleave(spread, output_size=total)
    spawn_pos = ev_pos[keep].repeat_interleave(spread, output_size=total) + offsets
    spawn_b = ev_b[keep].repeat_interleave(spread, output_size=total)
    spawn_k = ev_k[keep].repeat_interleave(spread, output_size=total)
    live = (spawn_pos >= 0) & (spawn_pos < segments.count[spawn_b])
    init_b, init_k = moving.T.nonzero(as_tuple=True)[::-1]     # (sequence, column), column-major
    step_b = torch.cat([init_b, spawn_b[live]])
    step_k = torch.cat([init_k, spawn_k[live]])
    step_pos = torch.cat([torch.zeros_like(init_b), spawn_pos[live]])
    step_group = step_k * batch + step_b
    _, order = (step_group * span + step_pos + longest).sort()
    step_b, step_k, step_pos, step_group = step_b[order], step_k[order], step_pos[order], step_group[order]
    hi = step_pos - exclude[step_k].long()
    counts = cumulative(step_group, hi) - cumulative(step_group, hi - window[step_k])
    inside = step_pos < segments.count[step_b]
    value = compare(counts, table[:, step_k], threshold[step_k]) & inside
    # the steps that set a value: each group's first, then wherever the value changes; still groups hold the
    # count of a constant input over a full window from the first view token on
    changed = torch.ones_like(value)
    changed[1:] = (value[1:] != value[:-1]) | (step_group[1:] != step_group[:-1])
    changed &= inside
    still_k, still_b = (~moving).T.nonzero(as_tuple=True)
    still_count = history[still_b, 0, still_k].long() * window[still_k]
    still_value = compare(still_count, table[:, still_k], threshold[still_k])
    still_inside = segments.count[still_b] > 0
    # new history: the input at the last `longest` view positions of each sequence (older ones: the old history)
    tail = segments.count.unsqueeze(1) - longest + torch.arange(longest, device=device)   # [B, Nmax]
    older = history.gather(1, (tail + longest).clamp(0, longest - 1).unsqueeze(-1).expand(-1, -1, k))
    if x.shape[0]:
        run_span = span
        run = torch.searchsorted(segments.sequence * run_span + segments.start,
                                 (torch.arange(batch, device=device).unsqueeze(1) * run_span
                                  + tail.clamp(min=0)).reshape(-1), right=True) - 1
        newer = x.index_select(0, run.clamp(min=0)).view(batch, longest, k)
        new_history = torch.where((tail >= 0).unsqueeze(-1), newer, older)
    else:
        new_history = older
    return (WindowChanges(torch.cat([step_b[changed], still_b[still_inside]]),
                          torch.cat([step_pos[changed], torch.zeros_like(still_b[still_inside])]),
                          torch.cat([step_k[changed], still_k[still_inside]]),
                          torch.cat([value[changed], still_value[still_inside]])), new_history)
