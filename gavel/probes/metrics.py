"""Detection metrics on scores: AUROC and Youden's-J thresholds (pure tensor math, no model)."""
from __future__ import annotations

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum identity, ties counted half; nan with one class only."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.double().argsort()
    ranks = torch.empty_like(order, dtype=torch.float64)
    sorted_scores = scores.double()[order]
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(sorted_scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(sums[inverse]))
    ranks[order] = (sums / counts)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def youden_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold t maximising TPR - FPR for the rule `score > t` (midpoint between distinct scores)."""
    labels = labels.bool()
    s, order = scores.double().sort(descending=True)
    y = labels[order].double()
    tpr = y.cumsum(0) / max(float(y.sum()), 1.0)
    fpr = (1 - y).cumsum(0) / max(float((1 - y).sum()), 1.0)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[:-1] != s[1:]
    j = torch.where(last_of_tie, tpr - fpr, torch.full_like(tpr, -2.0))
    i = int(j.argmax())
    below = s[i + 1] if i + 1 < len(s) else s[i] - 1.0
    return float((s[i] + below) / 2)


def sequence_maxima(scores: torch.Tensor, labels: torch.Tensor,
                    sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the highest token score, and whether any token is positive.

    A latched CE fires for a whole sequence once any token passes its threshold, so sequence-level
    rates are what thresholds must control.
    """
    seq_ids, inverse = torch.unique(sequence, return_inverse=True)
    maxima = torch.full((len(seq_ids),), -float("inf"), dtype=torch.float64)
    maxima = maxima.scatter_reduce(0, inverse, scores.double(), reduce="amax")
    positive = torch.zeros(len(seq_ids), dtype=torch.bool).index_fill_(0, inverse[labels.bool()], True)
    return maxima, positive


def sequence_youden_threshold(scores: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor) -> float:
    """Youden's J over sequences (the GAVEL paper's calibration): max TPR - FPR of `any token > t`."""
    return youden_threshold(*sequence_maxima(scores, labels, sequence))


def threshold_at_sequence_fpr(scores: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor,
                              max_fpr: float = 0.01) -> float:
    """The lowest threshold at which at most `max_fpr` of negative sequences ever exceed it."""
    maxima, positive = sequence_maxima(scores, labels, sequence)
    negatives = maxima[~positive].sort(descending=True).values
    if len(negatives) == 0:
        return float(scores.min()) - 1.0
    allowed = int(max_fpr * len(negatives))          # this many negative sequences may exceed it
    return float(negatives[allowed]) if allowed < len(negatives) else float(negatives[-1]) - 1e-6


def auprc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision (area under the precision-recall curve, step-wise); nan without positives."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    s, order = scores.double().sort(descending=True)
    y = labels[order].double()
    tp = y.cumsum(0)
    precision = tp / torch.arange(1, len(y) + 1, dtype=torch.float64)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[:-1] != s[1:]
    recall_step = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), (tp / n_pos)[last_of_tie]]))
    return float((precision[last_of_tie] * recall_step).sum())


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, max_fpr: float = 0.01) -> float:
    """The highest true-positive rate of `score > t` over thresholds whose false-positive rate is <= max_fpr."""
    labels = labels.bool()
    neg = scores[~labels].double().sort(descending=True).values
    if len(neg) == 0 or not labels.any():
        return float("nan")
    allowed = int(max_fpr * len(neg))
    threshold = neg[allowed] if allowed < len(neg) else neg[-1] - 1.0
    return float((scores[labels].double() > threshold).double().mean())
