"""Difference-of-means directions: the simplest linear CE, and the basis of steering vectors."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from gavel.base import Estimator
from gavel.errors import check_is_fitted
from gavel.probes.linear import mean_auroc, validate_labelled


class DiffMeansDirection(Estimator):
    """Per CE, direction = mean(positive tokens) - mean(negative tokens); the raw score is the
    projection onto it minus the projection of the classes' midpoint (so 0 separates them)."""

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def fit(self, X: torch.Tensor, Y: torch.Tensor, ce_names: Sequence[str] | None = None) -> DiffMeansDirection:
        X, Y, names = validate_labelled(X, Y, ce_names)
        X = X.double()
        Yf = Y.double()
        mean_pos = (Yf.T @ X) / Yf.sum(0)[:, None]                  # [k, d]
        mean_neg = ((1 - Yf).T @ X) / (1 - Yf).sum(0)[:, None]
        direction = mean_pos - mean_neg
        if self.normalize:
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.direction_ = direction.float()                          # [k, d]
        self.coef_ = self.direction_.T.contiguous()                  # [d, k], as LinearProbe
        self.intercept_ = (-(direction * (mean_pos + mean_neg) / 2).sum(1)).float()
        self.ce_names_ = names
        return self

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self, ("coef_",))
        return X.to(self.coef_.device, self.coef_.dtype) @ self.coef_ + self.intercept_

    def score(self, X: torch.Tensor, Y: torch.Tensor) -> float:
        return mean_auroc(self.decision_function(X), Y)
