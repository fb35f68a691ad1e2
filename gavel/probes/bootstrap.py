"""Bootstrap intervals for detection metrics: resampling whole units (conversations) within strata, and AUROC with
per-row weights, so one sort serves every resample.

A resample is a count per unit (how often it was drawn); a metric over rows (tokens) weights each row by the count of
its unit. Strata (say, positive and negative conversations) keep their sizes, so no resample lacks a class.
"""
from __future__ import annotations

import torch


def resample_counts(strata: torch.Tensor, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """How often each unit is drawn [n_resamples, n]: per resample, each stratum (units sharing a `strata` value)
    is drawn with replacement to its own size; seeded, so a report regenerates the same intervals."""
    strata = torch.as_tensor(strata)
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n_resamples, len(strata), dtype=torch.float64)
    for value in torch.unique(strata):
        members = (strata == value).nonzero().squeeze(1)
        drawn = members[torch.randint(len(members), (n_resamples, len(members)), generator=generator)]
        counts.scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
    return counts


def weighted_auroc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC of `scores` [n] against `labels` [n] with row weights [..., n] (one AUROC per leading index): each row
    counts `weight` times, ties count half, as `gavel.probes.metrics.auroc` on the rows repeated; nan where a class
    has no weight."""
    labels = labels.bool()
    uniq, inverse = torch.unique(scores.double(), return_inverse=True)    # ascending distinct scores
    w = weights.double()
    shape = (*w.shape[:-1], len(uniq))
    pos = torch.zeros(shape, dtype=torch.float64).index_add_(-1, inverse, w * labels)
    neg = torch.zeros(shape, dtype=torch.float64).index_add_(-1, inverse, w * ~labels)
    below = neg.cumsum(-1) - neg                                           # negative weight strictly below
    wins = (pos * (below + neg / 2)).sum(-1)
    total = pos.sum(-1) * neg.sum(-1)
    return torch.where(total > 0, wins / total.clamp_min(1e-300), torch.full_like(total, torch.nan))


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (nan ones left out; nan, nan if all are)."""
    values = values.double()
    values = values[~values.isnan()]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)
