"""Causal trailing-mean pooling of CE scores: a token's score is the mean over it and the `width - 1` tokens before it.

A single token's probe score is noisy, so a CE read per token fires on stray tokens of benign text; the mean over a
short trailing window keeps the evidence of a phrase and drops the outliers. Pooling is causal (only past tokens),
so the monitor applies it while the model generates. For a linear head, the mean of its scores is the head applied
to the mean of the activations, so a probe fitted on pooled activations is scored exactly by pooling its scores.
"""
from __future__ import annotations

import torch

from gavel.errors import DataError


def check_width(width: object) -> int:
    """`width` as a pooling width (a positive integer); DataError otherwise."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise DataError(f"a pooling width is a positive integer (1: no pooling), not {width!r}")
    return width


def pool_rows(x: torch.Tensor, example: torch.Tensor, width: int) -> torch.Tensor:
    """Trailing mean [N, ...] of rows `x` [N, ...] within each example; rows come in example order, each example's
    rows contiguous and in position order (as `iter_activations` yields them)."""
    if check_width(width) == 1 or len(x) == 0:
        return x
    first = torch.ones(len(example), dtype=torch.bool, device=example.device)
    first[1:] = example[1:] != example[:-1]
    index = torch.arange(len(example), device=example.device)
    start = torch.cummax(torch.where(first, index, 0), 0).values     # first row of each row's example
    total = x.double().clone()
    count = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for lag in range(1, width):
        ok = index - lag >= start
        rows = index[ok]
        total[rows] += x[rows - lag].double()
        count[rows] += 1
    return (total / count.view(-1, *([1] * (x.ndim - 1)))).to(x.dtype)


class TrailingMean:
    """The same pooling over a stream of forwards [B, T, k] (a prompt, then generated tokens): keeps each
    sequence's last `width - 1` scores between calls. Padding (`valid` False) counts for nothing."""

    def __init__(self, width: int) -> None:
        self.width = check_width(width)
        self.values: torch.Tensor | None = None    # [B, width - 1, k] the last scores (0 where not valid)
        self.weights: torch.Tensor | None = None   # [B, width - 1, 1] 1 where they were valid

    def reset(self) -> None:
        """Forget the past: the next call starts new sequences (a window of a long conversation)."""
        self.values = self.weights = None

    def __call__(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.width == 1:
            return x
        b, _, k = x.shape
        weight = valid[..., None].to(x.dtype)
        value = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.values is None or self.weights is None:
            past_v = x.new_zeros(b, self.width - 1, k)
            past_w = x.new_zeros(b, self.width - 1, 1)
        else:
            past_v, past_w = self.values, self.weights
        value, weight = torch.cat([past_v, value], 1), torch.cat([past_w, weight], 1)
        total = value.unfold(1, self.width, 1).sum(-1)       # [B, t, k]: each new token's window
        count = weight.unfold(1, self.width, 1).sum(-1)
        self.values, self.weights = value[:, -(self.width - 1):], weight[:, -(self.width - 1):]
        return torch.where(valid[..., None], total / count.clamp(min=1), x)
