"""Measuring a CE bank on labelled data: the same metrics `fit_bank` stores, on any dataset."""
from __future__ import annotations

from collections.abc import Callable

import torch

from gavel.errors import DataError
from gavel.models.collect import collect_activations
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.probes.fit import ce_metrics, content_rows


def evaluate_bank(handle: ModelHandle, bank: CEBank, dataset, batch_size: int = 64,
                  progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Per CE present in both the bank and `dataset`: AUROC, AUPRC, TPR at 1% FPR, sequence TPR/FPR
    at the bank's threshold, and support (positive tokens and sequences)."""
    shared = [n for n in bank.names if n in dataset.names]
    if not shared:
        raise DataError(f"the data labels none of the bank's CEs ({', '.join(bank.names)})")
    acts = collect_activations(handle, [e.encoded for e in dataset.examples], bank.sites, batch_size=batch_size,
                               progress=progress)
    labels = torch.cat([e.labels for e in dataset.examples])
    keep = content_rows(handle, acts)
    acts, labels = acts.select(keep), labels[keep]
    probs = bank.score(acts.sites)
    out = {}
    for name in shared:
        j, y = bank.index(name), labels[:, list(dataset.names).index(name)]
        metrics = ce_metrics(probs[:, j], y, acts.example, float(bank.thresholds[j]))
        metrics.update(threshold=float(bank.thresholds[j]), positive_tokens=int(y.sum()),
                       positive_sequences=int(torch.unique(acts.example[y]).numel()))
        out[name] = metrics
    return out
