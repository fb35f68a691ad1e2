"""Compile rules to one tensor program that evaluates them token by token, with state of fixed size.

The rules are lowered (gavel.rules.compile.lower) to one shared graph (gavel.rules.compile.ir) of token atoms,
threshold gates, windowed counts and score aggregates. The program evaluates the graph stage by stage, every stage
batched over all its nodes, on the device of the inputs. On an accelerator every token is evaluated and the host is
never synced; on the CPU only the tokens where some input changes are (gavel.rules.compile.rowsets), with window
kernels that work on the changes (kernels.sparse_windowed_count).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gavel.errors import RuleError
from gavel.plugins.functions import ScoreFunction
from gavel.plugins.registry import registry
from gavel.rules.action_checks import check_actions
from gavel.rules.compile import kernels
from gavel.rules.compile.ir import EVERY, RESPONSE, SCOPE_BITS, Compared, Count, Fired, Gate, Graph, Scope, Score
from gavel.rules.compile.lower import Lowering, all_built
from gavel.rules.compile.rowsets import RowSet, any_last
from gavel.rules.load import RuleErrors, RuleSpec

# the compiler's API (the token-class constants are defined with the IR, whose scope bits they give)
__all__ = ["EVERY", "RESPONSE", "SCOPE_BITS", "RuleProgram", "RuleState", "compile_rules", "first_firing"]

_CHUNK = 1 << 23  # value-matrix elements per chunk: long traces are evaluated in chunks of bounded memory


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


_Part = _Gates | _Counts | _Scores   # what a stage evaluates, batched

_IDENTITY = {"max": -torch.inf, "min": torch.inf, "mean": 0.0}   # plugin functions' histories start as NaN


@dataclass(frozen=True, slots=True)
class RuleProgram:
    """Compiled rules: `run` a whole trace, `advance` a chunk of tokens, or `step` one token at a time."""

    rule_names: tuple[str, ...]
    ce_names: tuple[str, ...]
    ce_indices: tuple[int, ...]        # the CEs the rules read
    width: int                         # value columns
    atoms: _Atoms
    stages: tuple[tuple[_Part, ...], ...]
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
        parts = [fired, *self._scopes(roles)]
        if self.atoms.compared and rows.sparse:
            assert scores is not None   # the rules compare scores: `advance` checked they were given
            # comparisons are evaluated at the evaluated rows only; a CE's comparisons can only change where its
            # score is at or above its lowest compared constant, at that token or the one before
            near = any_last(kernels.at_least(scores, self.atoms.lowest, self.atoms.lowest32))
            rows.note(near | F.pad(near, (1, 0))[:, :-1])
        for grid in parts + ([] if mask is None else [mask.unsqueeze(-1)]):
            rows.note_changes(grid)
        taken = [rows.take_grid(parts[0]).index_select(1, self.atoms.fired)]
        if self.atoms.compared:
            assert scores is not None
            at_rows = rows.take_grid(scores)
            taken += [torch.cat(group(at_rows), dim=1).index_select(1, group.columns)
                      for group in self.atoms.compared]
        taken += [rows.take_grid(p) for p in parts[1:]]
        values = _Values(self.width, taken[0].shape[0], fired.device)
        values.set(1, torch.cat(taken, dim=1))
        views = _Views(mask, roles, batch, length, fired.device)
        tensors = list(state.tensors)
        for stage in self.stages:
            updates: list[tuple[int, Tensor]] = []
            for part in stage:
                if isinstance(part, _Counts) and part.latch and rows.sparse:
                    self._latches(part, values, rows, views, tensors)
                elif isinstance(part, _Counts) and part.windowed and rows.sparse:
                    self._sparse_windows(part, values, rows, views, tensors)
                elif isinstance(part, _Counts):
                    updates.append((part.start, self._counts(part, values, rows, views, tensors)))
                elif isinstance(part, _Scores):
                    assert scores is not None   # the rules aggregate scores: `advance` checked they were given
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
        assert roles is not None   # the rules use scopes: `advance` checked roles were given
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
                assert self.roles is not None   # the rules use scopes: `advance` checked roles were given
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
    lowering = Lowering(rules, ce_names)
    values = {r.name: lowering.rule_value(r, EVERY) for r in rules}
    errors += lowering.errors
    if errors:
        raise RuleErrors(errors)
    public = [r.name for r in rules if not r.private]
    roots = [values[n] for n in public]
    if not all_built(roots):   # only a cycle of macros leaves a rule unbuilt without an error (the loader finds them)
        raise RuleErrors([RuleError(f"rule '{n}' cannot be compiled: its macros refer to each other in a cycle")
                          for n in public if values[n] is None])
    return _assemble(lowering.graph, lowering.reducers, tuple(public), roots, tuple(ce_names))


def _assemble(graph: Graph, reducers: dict[str, ScoreFunction], rule_names: tuple[str, ...], roots: list[int],
              ce_names: tuple[str, ...]) -> RuleProgram:
    """Lay the nodes the roots need out as value columns, stage by stage, and build the batched stage tensors."""
    order = graph.reachable(roots)
    live = [graph.nodes[r] for r in order]
    fired = [(r, n) for r, n in zip(order, live) if isinstance(n, Fired)]
    compared = sorted([(r, n) for r, n in zip(order, live) if isinstance(n, Compared)],
                      key=lambda atom: kernels.COMPARISONS.index(atom[1].op))   # grouped by operator
    scoped = [(r, n) for r, n in zip(order, live) if isinstance(n, Scope)]
    column: dict[int, int] = {}
    width = 1
    for atoms_of_kind in (fired, compared, scoped):
        width = _place(atoms_of_kind, column, width)
    comparisons = [n for _, n in compared]
    groups = []
    for op in kernels.COMPARISONS:
        same = [c for c in comparisons if c.op == op]
        if same:
            groups.append(kernels.Comparisons.build(op, [c.ce for c in same], [c.value for c in same],
                                                    len(ce_names)))
    lowest = torch.full((len(ce_names),), torch.inf, dtype=torch.float64)
    for c in comparisons:
        lowest[c.ce] = min(float(lowest[c.ce]), c.value)
    atoms = _Atoms(fired=torch.tensor([n.ce for _, n in fired], dtype=torch.long), compared=tuple(groups),
                   scopes=torch.tensor([n.bits for _, n in scoped], dtype=torch.long),
                   lowest=lowest, lowest32=kernels.float32_bounds(">=", lowest))
    shapes: list[tuple[str, tuple[int, ...], torch.dtype, float]] = []
    stages: list[tuple[_Part, ...]] = []
    by_depth: dict[int, list[int]] = {}
    for r, node in zip(order, live):
        if isinstance(node, (Gate, Count, Score)):
            by_depth.setdefault(graph.depth[r], []).append(r)
    for depth in sorted(by_depth):
        at_depth = by_depth[depth]
        parts: list[_Part] = []
        counts: dict[tuple[int, bool], list[tuple[int, Count]]] = {}
        scores: dict[tuple[int, str, int | None], list[tuple[int, Score]]] = {}   # depth 0, where no count is
        for r in at_depth:
            node = graph.nodes[r]
            if isinstance(node, Count):
                windowed = node.window is not None   # windows pack their view's tokens; running counts mix views
                counts.setdefault((node.view if windowed else -1, windowed), []).append((r, node))
            elif isinstance(node, Score):
                scores.setdefault((node.view, node.function, node.window), []).append((r, node))
        for (view, windowed), counted in counts.items():
            parts.append(_counts([n for _, n in counted], column, width, view, windowed, shapes))
            width = _place(counted, column, width)
        for (view, function, window), aggregated in scores.items():
            parts.append(_scores([n for _, n in aggregated], reducers, width, view, function, window, shapes))
            width = _place(aggregated, column, width)
        gates = [(r, n) for r in at_depth if isinstance(n := graph.nodes[r], Gate)]
        if gates:
            terms = [n.terms for _, n in gates]
            arity = max(len(t) for t in terms)
            inputs = torch.tensor([[column[ref] for ref, _ in t] + [0] * (arity - len(t)) for t in terms],
                                  dtype=torch.long).view(len(gates), arity)
            weights = torch.tensor([[float(w) for _, w in t] + [0.0] * (arity - len(t)) for t in terms]
                                   ).view(len(gates), arity)
            parts.append(_Gates(width, inputs, weights, torch.tensor([float(n.threshold) for _, n in gates])))
            width = _place(gates, column, width)
        stages.append(tuple(parts))
    scored = [n for n in live if isinstance(n, Score)]
    read = {n.ce for _, n in fired} | {c.ce for c in comparisons} | {n.ce for n in scored}
    return RuleProgram(
        rule_names=rule_names, ce_names=ce_names, ce_indices=tuple(sorted(read)), width=width, atoms=atoms,
        stages=tuple(stages), outputs=torch.tensor([column[r] for r in roots], dtype=torch.long),
        state_shapes=tuple(shapes), needs_scores=bool(comparisons or scored),
        needs_roles=bool(scoped) or any(isinstance(n, (Count, Score)) and n.view != EVERY for n in live))


def _place(nodes: Sequence[tuple[int, object]], column: dict[int, int], start: int) -> int:
    """Give the (id, node) `nodes` the value columns from `start` on, in order; returns the next free column."""
    for offset, (ref, _) in enumerate(nodes):
        column[ref] = start + offset
    return start + len(nodes)


def _counts(counts: list[Count], column: dict[int, int], start: int, view: int, windowed: bool,
            shapes: list) -> _Counts:
    longest = max(c.window or 0 for c in counts)   # 0: running counts
    slot = len(shapes)
    shapes.append(("history", (longest, len(counts)), torch.bool, False) if windowed else
                  ("count", (len(counts),), torch.long, 0))
    return _Counts(start=start, view=view, views=torch.tensor([c.view for c in counts], dtype=torch.long),
                   windowed=windowed, latch=all(c.latch for c in counts), slot=slot,
                   x=torch.tensor([column[c.term] for c in counts], dtype=torch.long),
                   window=torch.tensor([c.window or 0 for c in counts], dtype=torch.long),
                   exclude=torch.tensor([c.exclude for c in counts], dtype=torch.bool),
                   table=kernels.comparison_table([c.op for c in counts]),
                   threshold=torch.tensor([c.k for c in counts], dtype=torch.long))


def _scores(scores: list[Score], reducers: dict[str, ScoreFunction], start: int, view: int, function: str,
            window: int | None, shapes: list) -> _Scores:
    reducer = reducers.get(function)
    assert reducer is None or window is not None   # the parser gives every plugin function a window
    fill = torch.nan if reducer is not None else _IDENTITY[function]
    slot = len(shapes)
    shapes.append(("history", (window, len(scores)), torch.float64, fill) if window is not None else
                  ("running", (len(scores),), torch.float64, fill))
    shapes.append(("seen", (), torch.long, 0))
    return _Scores(start=start, view=view, function=function, window=window, slot=slot,
                   ces=torch.tensor([s.ce for s in scores], dtype=torch.long),
                   table=kernels.comparison_table([s.op for s in scores]),
                   threshold=torch.tensor([s.value for s in scores], dtype=torch.float64), reducer=reducer)
