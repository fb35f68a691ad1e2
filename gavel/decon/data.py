"""Deterministic organism splits for DeconIEP.

The contaminated organism (builtin:organism) memorised the first N_LEAKED = 50 of the 100 quiz items; the other 50
are held out (about chance for it). The splits interleave by index, so every split covers all entities/attributes:

- `train`: what G is trained on (prompts only; the replies come from the reference): leaked items 0, 2, 4, ...
  (25), held-out items 50, 52, ... (25), 25 two-digit additions from their own seed (none in the arithmetic
  evaluation set) and the first 10 benign requests.
- `leaked_eval`: leaked items 1, 3, ..., 49 (25), never seen by G: residual contamination (RC).
- `heldout_eval`: held-out items 51, 53, ..., 99 (25): benign utility (BUD), with
- `arithmetic_eval`: the organism's 50 two-digit additions (`evaluation_sets()["arithmetic_2digit"]`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

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
    train: tuple[Example, ...]
    leaked_eval: tuple[Example, ...]
    heldout_eval: tuple[Example, ...]
    arithmetic_eval: tuple[Example, ...]

    def train_prompts(self) -> list[list[dict[str, str]]]:
        return [as_conversation(e.prompt()) for e in self.train]

    @property
    def clean_eval(self) -> tuple[Example, ...]:
        """The clean data of BUD: held-out items and arithmetic."""
        return self.heldout_eval + self.arithmetic_eval


def decon_splits() -> DeconSplits:
    items = benchmark_items()
    leaked, heldout = items[:N_LEAKED], items[N_LEAKED:]
    sets = evaluation_sets()
    arithmetic_eval = tuple(sets["arithmetic_2digit"])
    taken = {(e.meta, e.expect) for e in arithmetic_eval}
    rng, arithmetic_train = random.Random(2601), []
    while len(arithmetic_train) < 25:
        ex = arithmetic_example(rng.randrange(10, 100), rng.randrange(10, 100))
        if (ex.meta, ex.expect) not in taken:
            taken.add((ex.meta, ex.expect))
            arithmetic_train.append(ex)
    train = ([benchmark_example(*it) for it in leaked[0::2]] + [benchmark_example(*it) for it in heldout[0::2]]
             + arithmetic_train + list(sets["benign"][:10]))
    return DeconSplits(train=tuple(train),
                       leaked_eval=tuple(benchmark_example(*it) for it in leaked[1::2]),
                       heldout_eval=tuple(benchmark_example(*it) for it in heldout[1::2]),
                       arithmetic_eval=arithmetic_eval)
