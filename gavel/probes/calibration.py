"""Platt scaling: raw CE scores to probabilities, fitted on held-out data before thresholds are set.

Probes trained on easy data saturate at 0 and 1, which pins thresholds to the grid's edges; a
per-CE affine map of the raw score, p = sigmoid(scale * raw + shift), spreads them out again.
"""
from __future__ import annotations

import torch

from gavel.base import Estimator
from gavel.errors import check_is_fitted
from gavel.probes.linear import validate_labelled


class PlattScaling(Estimator):
    """Per-CE logistic regression on the raw score (class-balanced, lightly regularised)."""

    def __init__(self, max_iter: int = 100, l2: float = 1e-4) -> None:
        self.max_iter = max_iter
        self.l2 = l2

    def fit(self, raw: torch.Tensor, Y: torch.Tensor) -> PlattScaling:
        raw, Y, _ = validate_labelled(raw.float(), Y)
        Yf = Y.float()
        n = float(len(Y))
        pos = Yf.sum(0)
        weights = Yf * (n / (2 * pos)) + (1 - Yf) * (n / (2 * (n - pos)))
        mu, sd = raw.mean(0), raw.std(0).clamp_min(1e-6)
        z = (raw - mu) / sd
        a = torch.ones(raw.shape[1], requires_grad=True)
        b = torch.zeros(raw.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(z * a + b, Yf, reduction="none")
                    * weights).mean(0).sum() + self.l2 * (a * a).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            self.scale_ = (a / sd).detach()
            self.shift_ = (b - a * mu / sd).detach()
        return self

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """Probabilities [..., k] from raw scores [..., k]."""
        check_is_fitted(self, ("scale_",))
        return torch.sigmoid(raw * self.scale_.to(raw.device) + self.shift_.to(raw.device))
