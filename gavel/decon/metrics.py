"""Residual contamination (RC) and benign utility drop (BUD) of a DeconIEP perturbation, by greedy generation.

- Acc(f, S): share of problems of S whose reply's answer (`answer_of`) is the expected one.
- RC before = |Acc(f_con, leaked) - Acc(f_clean, leaked)|; RC after = |Acc(perturbed f_con, leaked) -
  Acc(f_clean, leaked)| on the leaked items G never saw.
- BUD = Acc(f_con, clean) - Acc(perturbed f_con, clean), clean = held-out items + 2-digit arithmetic (pooled).
- Rule-gated: the same with the perturbation applied only where a guard's `perturb` rule holds on the prompt (e.g.
  a benchmark-style question), so unflagged prompts are generated exactly as without it.

The organism's splits and its RC/BUD report are in `gavel.organism.decon`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

from gavel.io.conversations import Problem
from gavel.models.generation import generate_replies
from gavel.models.handle import ModelHandle


def accuracy(handle: ModelHandle, problems: Sequence[Problem], answer_of: Callable[[str], str | None],
             perturbation=None, *, zeta: float | None = None, guard=None, max_new_tokens: int = 48,
             batch_size: int = 32) -> float:
    """Greedy accuracy on problems (`answer_of(reply) == expected`), optionally under a fitted DeconIEP (at `zeta`
    if given) or through a `Guard` (its rules decide which prompts to perturb; the reply is what the model
    generated)."""
    if not problems:
        return float("nan")
    conversations = [p.conversation for p in problems]
    if guard is not None:
        replies = [r.generated for start in range(0, len(conversations), batch_size)
                   for r in guard.generate(conversations[start:start + batch_size], max_new_tokens=max_new_tokens)]
    else:
        context = nullcontext() if perturbation is None else perturbation.perturbing(handle, zeta=zeta)
        with context:
            replies = generate_replies(handle, conversations, max_new_tokens, batch_size=batch_size)
    return sum(answer_of(r) == p.expected for p, r in zip(problems, replies)) / len(problems)


def residual_contamination(acc_model: float, acc_clean: float) -> float:
    return abs(acc_model - acc_clean)


def benign_utility_drop(acc_before: float, acc_after: float) -> float:
    return acc_before - acc_after
