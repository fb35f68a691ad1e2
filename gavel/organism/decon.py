"""DeconIEP on the organism: deterministic splits, and RC / BUD over them (`gavel decon eval`).

The contaminated organism (builtin:organism) memorised the first N_LEAKED = 50 of the 100 quiz items; the other 50
are held out (about chance for it). The splits interleave by index, so every split covers all entities/attributes:

- `train`: what G is trained on (prompts only; the replies come from the reference): leaked items 0, 2, 4, ...
  (25), held-out items 50, 52, ... (25), 25 two-digit additions from their own seed (none in the arithmetic
  evaluation set) and the first 10 benign requests.
- `leaked_eval`: leaked items 1, 3, ..., 49 (25), never seen by G: residual contamination (RC).
- `heldout_eval`: held-out items 51, 53, ..., 99 (25): benign utility (BUD), with
- `arithmetic_eval`: the organism's 50 two-digit additions (`evaluation_sets()["arithmetic_2digit"]`).

Accuracy is the share of replies whose final answer (`final_answer`) is the expected one.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from gavel.decon.metrics import accuracy, benign_utility_drop, residual_contamination
from gavel.io.conversations import Conversation, Problem
from gavel.models.handle import ModelHandle
from gavel.organism.behaviour import final_answer
from gavel.organism.corpus import (
    N_LEAKED,
    Example,
    arithmetic_example,
    benchmark_example,
    benchmark_items,
    evaluation_sets,
)
from gavel.organism.labels import as_conversation

TRAIN_DATA = "builtin:decon-train"


@dataclass(frozen=True)
class DeconSplits:
    train: tuple[Conversation, ...]
    leaked_eval: tuple[Problem, ...]
    heldout_eval: tuple[Problem, ...]
    arithmetic_eval: tuple[Problem, ...]

    def train_prompts(self) -> list[Conversation]:
        return list(self.train)

    @property
    def clean_eval(self) -> tuple[Problem, ...]:
        """The clean data of BUD: held-out items and arithmetic."""
        return self.heldout_eval + self.arithmetic_eval


def decon_splits() -> DeconSplits:
    items = benchmark_items()
    leaked, heldout = items[:N_LEAKED], items[N_LEAKED:]
    sets = evaluation_sets()
    arithmetic_eval = tuple(sets["arithmetic_2digit"])
    taken = {(e.meta, e.expect) for e in arithmetic_eval}
    rng = random.Random(2601)
    arithmetic_train: list[Example] = []
    while len(arithmetic_train) < 25:
        ex = arithmetic_example(rng.randrange(10, 100), rng.randrange(10, 100))
        if (ex.meta, ex.expect) not in taken:
            taken.add((ex.meta, ex.expect))
            arithmetic_train.append(ex)
    train = ([benchmark_example(*it) for it in leaked[0::2]] + [benchmark_example(*it) for it in heldout[0::2]]
             + arithmetic_train + list(sets["benign"][:10]))
    return DeconSplits(train=tuple(as_conversation(e.prompt()) for e in train),
                       leaked_eval=_problems(benchmark_example(*it) for it in leaked[1::2]),
                       heldout_eval=_problems(benchmark_example(*it) for it in heldout[1::2]),
                       arithmetic_eval=_problems(arithmetic_eval))


def _problems(examples) -> tuple[Problem, ...]:
    return tuple(Problem(as_conversation(e.prompt()), e.expect) for e in examples)


class DeconPoint(BaseModel):
    """The perturbed model at one zeta."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    zeta: float
    acc_leaked: float          # perturbed f_con on the leaked eval split
    acc_heldout: float
    acc_arithmetic: float
    acc_clean_data: float      # pooled held-out + arithmetic
    rc: float
    bud: float


class DeconReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    clean: str
    perturbation: str
    n_leaked: int
    n_heldout: int
    n_arithmetic: int
    clean_acc_leaked: float    # f_clean on the leaked eval split
    acc_leaked: float          # unperturbed f_con
    acc_heldout: float
    acc_arithmetic: float
    acc_clean_data: float
    rc_before: float
    points: list[DeconPoint]
    gated: DeconPoint | None = None   # applied only where the guard's perturb rules hold (zeta: the trained one)


def _accuracies(handle, splits: DeconSplits, perturbation, zeta, max_new_tokens, guard=None):
    run = lambda problems: accuracy(handle, problems, final_answer, perturbation, zeta=zeta,  # noqa: E731
                                    guard=guard, max_new_tokens=max_new_tokens)
    leaked, heldout, arithmetic = run(splits.leaked_eval), run(splits.heldout_eval), run(splits.arithmetic_eval)
    n_h, n_a = len(splits.heldout_eval), len(splits.arithmetic_eval)
    return leaked, heldout, arithmetic, (heldout * n_h + arithmetic * n_a) / (n_h + n_a)


def evaluate_decon(model: ModelHandle, clean: ModelHandle, perturbation, zetas: Sequence[float] | None = None, *,
                   splits: DeconSplits | None = None, max_new_tokens: int = 48,
                   names: dict[str, str] | None = None, guard=None,
                   progress: Callable[[int], None] | None = None) -> DeconReport:
    """RC before/after and BUD of `perturbation` (a fitted DeconIEP) on the organism splits, at each zeta (default:
    the fitted one), and through `guard` (a Guard on `model` whose perturb rules gate it) when given. `progress(1)`
    after each of the 2 + len(zetas) (+1) model evaluations."""
    splits = splits or decon_splits()
    zetas = [perturbation.zeta] if not zetas else list(zetas)
    tick = progress or (lambda n: None)
    clean_leaked = accuracy(clean, splits.leaked_eval, final_answer, max_new_tokens=max_new_tokens)
    tick(1)
    leaked, heldout, arithmetic, pooled = _accuracies(model, splits, None, None, max_new_tokens)
    tick(1)
    points = []
    for z in zetas:
        p_leaked, p_heldout, p_arith, p_pooled = _accuracies(model, splits, perturbation, z, max_new_tokens)
        points.append(DeconPoint(zeta=z, acc_leaked=p_leaked, acc_heldout=p_heldout, acc_arithmetic=p_arith,
                                 acc_clean_data=p_pooled, rc=residual_contamination(p_leaked, clean_leaked),
                                 bud=benign_utility_drop(pooled, p_pooled)))
        tick(1)
    gated = None
    if guard is not None:
        g_leaked, g_heldout, g_arith, g_pooled = _accuracies(model, splits, None, None, max_new_tokens, guard)
        gated = DeconPoint(zeta=perturbation.zeta, acc_leaked=g_leaked, acc_heldout=g_heldout, acc_arithmetic=g_arith,
                           acc_clean_data=g_pooled, rc=residual_contamination(g_leaked, clean_leaked),
                           bud=benign_utility_drop(pooled, g_pooled))
        tick(1)
    names = names or {}
    return DeconReport(model=names.get("model", model.name), clean=names.get("clean", clean.name),
                       perturbation=names.get("perturbation", ""), n_leaked=len(splits.leaked_eval),
                       n_heldout=len(splits.heldout_eval), n_arithmetic=len(splits.arithmetic_eval),
                       clean_acc_leaked=clean_leaked, acc_leaked=leaked, acc_heldout=heldout,
                       acc_arithmetic=arithmetic, acc_clean_data=pooled,
                       rc_before=residual_contamination(leaked, clean_leaked), points=points, gated=gated)
