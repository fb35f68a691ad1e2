"""Rules and traces written as strings, the compiled program checked three ways (run, step, advance over chunks),
and random condition ASTs and traces: shared by the rule evaluator's tests (rules/compile/test_temporal.py,
test_functions.py)."""
from __future__ import annotations

import functools
import itertools
import random
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import strategies as st

from gavel.rules import RuleSpec, load_rules
from gavel.rules.ast import SCOPES, Aggregate, And, Compare, Name, Not, Once, Or, Scoped, Select, Span, Sustained, Then

CES = ["a", "b", "c", "harm_x", "harm_y"]
SCORE = {".": 0.0, "x": 1.0, "0": 0.0, "1": 0.25, "2": 0.5, "3": 0.75, "4": 1.0}
ROLE = {c: i for i, c in enumerate("nsuaNSUA")}  # token class: lower case prompt, upper case response


# --- rules and traces written as strings ------------------------------------------------------

def rule(condition: str, name: str = "r", *, match: str = "token", groups=None, exceptions=(),
         private=False) -> RuleSpec:
    """A rule built in Python (token mode by default: these tests check each operator as it is)."""
    return RuleSpec(name=name, condition=condition, match=match, groups=groups or {}, private=private,
                    exceptions=[{"name": f"except{i}", "condition": e} for i, e in enumerate(exceptions)])


def pack(rules: list[RuleSpec], *, lists=None, macros=None) -> list[RuleSpec]:
    """The rules read back from a pack file with these lists and macros, as the compiler gets them from a pack."""
    data = {"lists": lists or {}, "macros": macros or {},
            "rules": [r.model_dump(mode="json", exclude_defaults=True) for r in rules]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pack.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_rules(path)


def trace(length: int, roles: str | None, mask: str | None, ces: dict[str, str], names=CES):
    """One sequence from strings, one character a token: scores ('.'=0, 'x'=1, '0'..'4' quarters; fired when
    above 0.5), roles (n s u a: none/system/user/assistant, upper case in the response), mask ('1' valid)."""
    scores = [[SCORE[ces[c][t]] if c in ces else 0.0 for c in names] for t in range(length)]
    fired = [[s > 0.5 for s in row] for row in scores]
    return ([fired], [scores], None if roles is None else [[ROLE[r] for r in roles]],
            None if mask is None else [[m == "1" for m in mask]])


# --- the compiled program, three ways ---------------------------------------------------------

def tensors(fired, scores, roles, mask, n_ce):
    batch, length = len(fired), len(fired[0]) if fired else 0
    return (torch.tensor(fired, dtype=torch.bool).reshape(batch, length, n_ce),
            torch.tensor(scores, dtype=torch.float32).reshape(batch, length, n_ce),
            None if roles is None else torch.tensor(roles, dtype=torch.uint8).reshape(batch, length),
            None if mask is None else torch.tensor(mask, dtype=torch.bool).reshape(batch, length))


def assert_compiled(program, fired, scores, roles, mask, expected, rng: random.Random | None = None) -> None:
    """program.run, program.step token by token, and program.advance over chunks all give `expected`."""
    fired, scores, roles, mask = tensors(fired, scores, roles, mask, len(program.ce_names))
    batch, length = fired.shape[:2]
    inputs = {"scores": scores if program.needs_scores else None, "roles": roles if program.needs_roles else None}

    def at(index):  # the scores and roles of a token or a slice of tokens
        return {k: None if v is None else v[:, index] for k, v in inputs.items()}

    assert program.run(fired, mask, **inputs).tolist() == expected, "run"

    state, stepped = program.init_state(batch), []
    for t in range(length):
        out, state = program.step(fired[:, t], state, None if mask is None else mask[:, t], **at(t))
        stepped.append(out.tolist())
    assert [[stepped[t][b] for t in range(length)] for b in range(batch)] == expected, "step"

    if rng is None:  # in one go, then every split in two
        cuts = [[0, length]] + [[0, c, length] for c in range(1, length)]
    else:  # random chunks, some of them empty
        cuts = [[0, *sorted(rng.choices(range(length + 1), k=3)), length]]
    for cut in cuts:
        state, chunks = program.init_state(batch), []
        for lo, hi in itertools.pairwise(cut):
            out, state = program.advance(fired[:, lo:hi], state, None if mask is None else mask[:, lo:hi],
                                         **at(slice(lo, hi)))
            chunks.append(out)
        assert torch.cat(chunks, dim=1).tolist() == expected, f"advance over chunks {cut}"


# --- random rules and traces -------------------------------------------------------------------

P_CES = ["p1", "p2", "q1", "q2"]
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
OPS = (">", ">=", "<", "<=", "==", "!=")
NO_SPAN = Span(0, 0)
SIZES = {"g1": 2, "g2": 3, "lst": 2, "p*": 2}  # distinct CEs in each group, the list and the wildcard


@functools.cache
def conditions(references: tuple[str, ...] = ()) -> st.SearchStrategy:
    """Random condition ASTs over the CEs, the groups, the list and the wildcard, and `references` (the macro,
    earlier rules)."""
    window, maybe_window = st.integers(1, 5), st.none() | st.integers(1, 5)
    ops, value = st.sampled_from(OPS), st.sampled_from(GRID)
    scored = st.sampled_from([*P_CES, *SIZES])

    def quantifier(size: int) -> st.SearchStrategy:
        return st.sampled_from(["all", "any"]) | st.integers(1, size)

    leaf = st.one_of(
        st.sampled_from([*P_CES, *SIZES]).map(lambda n: Name(n, NO_SPAN)),
        *([st.sampled_from(references).map(lambda n: Name(n, NO_SPAN))] if references else []),
        st.builds(Compare, scored, ops, value, st.just(NO_SPAN)),
        st.one_of([quantifier(size).map(lambda q, g=g: Select(q, g, (), NO_SPAN)) for g, size in SIZES.items()]),
        st.builds(lambda f, n, w, o, v: Aggregate(f, Name(n, NO_SPAN), w, o, v, NO_SPAN),
                  st.sampled_from(["max", "min", "mean"]), scored, maybe_window, ops, value))

    def extend(inner: st.SearchStrategy) -> st.SearchStrategy:
        items = st.lists(inner, min_size=1, max_size=3).map(tuple)
        return st.one_of(
            st.builds(Not, inner, st.just(NO_SPAN)),
            st.builds(And, st.lists(inner, min_size=2, max_size=3).map(tuple), st.just(NO_SPAN)),
            st.builds(Or, st.lists(inner, min_size=2, max_size=3).map(tuple), st.just(NO_SPAN)),
            st.builds(Once, inner, maybe_window, st.just(NO_SPAN)),
            st.builds(Then, inner, inner, maybe_window, st.just(NO_SPAN)),
            st.builds(Sustained, inner, window, st.just(NO_SPAN)),
            st.builds(lambda e, w, o, k: Aggregate("count", e, w, o, k, NO_SPAN), inner, maybe_window, ops,
                      st.integers(0, 4)),
            st.builds(Scoped, inner, st.sampled_from(SCOPES), st.just(NO_SPAN)),
            items.flatmap(lambda xs: quantifier(len(xs)).map(lambda q: Select(q, None, xs, NO_SPAN))))

    return st.recursive(leaf, extend, max_leaves=6)


@st.composite
def members(draw, size: int) -> tuple[str, ...]:
    """`size` distinct CEs, sometimes one of them twice, in random order."""
    distinct = draw(st.permutations(P_CES))[:size]
    return tuple(draw(st.permutations(distinct + draw(st.lists(st.sampled_from(distinct), max_size=1)))))


def random_trace(rng: random.Random, ce_names: list[str]):
    """batch 1..3, length 0..12, grid scores, fired above a per-CE grid threshold, roles 0..7, maybe a mask; a
    token often repeats the one before (runs of equal tokens are where an evaluator may skip work)."""
    batch, length = rng.randint(1, 3), rng.randint(0, 12)
    thresholds = [rng.choice(GRID) for _ in ce_names]
    valid, repeat, masked = rng.random(), rng.choice((0.0, 0.5, 0.9)), rng.random() < 0.75
    scores, roles, mask = [], [], []
    for _ in range(batch):
        tokens = []
        for t in range(length):
            fresh = ([rng.choice(GRID) for _ in ce_names], rng.randrange(8), rng.random() < valid)
            tokens.append(tokens[-1] if t and rng.random() < repeat else fresh)
        scores.append([s for s, _, _ in tokens])
        roles.append([r for _, r, _ in tokens])
        mask.append([m for _, _, m in tokens])
    fired = [[[s > th for s, th in zip(row, thresholds)] for row in seq] for seq in scores]
    return fired, scores, roles, mask if masked else None
