"""Residual contamination (RC) and benign utility drop (BUD) of a DeconIEP perturbation, by greedy generation.

- Acc(f, S): share of items of S whose reply's final answer (`final_answer`) is the expected one.
- RC before = |Acc(f_con, leaked) - Acc(f_clean, leaked)|; RC after = |Acc(perturbed f_con, leaked) -
  Acc(f_clean, leaked)| on the leaked items G never saw.
- BUD = Acc(f_con, clean) - Acc(perturbed f_con, clean), clean = held-out items + 2-digit arithmetic (pooled).
- Rule-gated: the same with the perturbation applied only where a guard's `perturb` rule holds on the prompt (e.g.
  a benchmark-style question), so unflagged prompts are generated exactly as without it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from gavel.decon.data import DeconSplits, decon_splits
from gavel.models.handle import ModelHandle
from gavel.organism.corpus import Example


def accuracy(handle: ModelHandle, examples: Sequence[Example], perturbation=None, *, zeta: float | None = None,
             guard=None, max_new_tokens: int = 48, batch_size: int = 32) -> float:
    """Greedy accuracy on quiz/arithmetic examples, optionally under a fitted DeconIEP (at `zeta` if given) or
    through a `Guard` (its rules decide which prompts to perturb; the reply is what the model generated)."""
    from contextlib import nullcontext

    from gavel.models.generation import generate_replies
    from gavel.organism.behaviour import final_answer
    from gavel.organism.labels import as_conversation

    if not examples:
        return float("nan")
    conversations = [as_conversation(e.prompt()) for e in examples]
    if guard is not None:
        replies = [r.generated for start in range(0, len(conversations), batch_size)
                   for r in guard.generate(conversations[start:start + batch_size], max_new_tokens=max_new_tokens)]
    else:
        context = nullcontext() if perturbation is None else perturbation.perturbing(handle, zeta=zeta)
        with context:
            replies = generate_replies(handle, conversations, max_new_tokens, batch_size=batch_size)
    return sum(final_answer(r) == e.expect for e, r in zip(examples, replies)) / len(examples)


def residual_contamination(acc_model: float, acc_clean: float) -> float:
    return abs(acc_model - acc_clean)


def benign_utility_drop(acc_before: float, acc_after: float) -> float:
    return acc_before - acc_after


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
    run = lambda examples: accuracy(handle, examples, perturbation, zeta=zeta, guard=guard,  # noqa: E731
                                    max_new_tokens=max_new_tokens)
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
    clean_leaked = accuracy(clean, splits.leaked_eval, max_new_tokens=max_new_tokens)
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
