"""Measuring a CE bank on labelled data: the same metrics `fit_bank` stores, on any dataset, streamed (only
the bank's scores are kept, never activations)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from gavel.errors import DataError
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.probes.fit import BATCH_TOKENS, ce_metrics, score_examples


def evaluate_bank(handle: ModelHandle, bank: CEBank, dataset, batch_size: int = 64,
                  batch_tokens: int = BATCH_TOKENS,
                  progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Per CE present in both the bank and `dataset`: AUROC, AUPRC, TPR at 1% FPR, sequence TPR/FPR
    at the bank's threshold, and support (positive tokens and sequences)."""
    shared = [n for n in bank.names if n in dataset.names]
    if not shared:
        raise DataError(f"the data labels none of the bank's CEs ({', '.join(bank.names)})")
    (probs,), labels, sequence = score_examples(handle, dataset.examples, [bank], batch_size=batch_size,
                                                batch_tokens=batch_tokens, progress=progress)
    out = {}
    for name in shared:
        j, y = bank.index(name), labels[:, list(dataset.names).index(name)]
        metrics = ce_metrics(probs[:, j], y, sequence, float(bank.thresholds[j]))
        metrics.update(threshold=float(bank.thresholds[j]), positive_tokens=int(y.sum()),
                       positive_sequences=int(torch.unique(sequence[y]).numel()))
        out[name] = metrics
    return out
