"""Multi-label logistic probes on one site, stored as one weight matrix for a single-matmul score."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted
from gavel.probes.metrics import auroc


class LinearProbe(Estimator):
    """Per-token logistic probes for k CEs: p = sigmoid(h @ coef_ + intercept_).

    L2-regularised (sklearn's C convention), class-balanced, fitted full-batch with L-BFGS in torch on
    standardised features; the scaling is folded back so scoring needs raw activations only.
    """

    def __init__(self, C: float = 1.0, class_weight: str | None = "balanced",
                 max_iter: int = 100, device: str = "cpu") -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.device = device

    def fit(self, X: torch.Tensor, Y: torch.Tensor, ce_names: Sequence[str] | None = None) -> LinearProbe:
        """X [N, d] activations, Y [N, k] bool labels (or [N] for one CE); returns self."""
        X, Y, names = validate_labelled(X, Y, ce_names)
        pos = Y.sum(0)
        X = X.to(self.device, torch.float32)
        Yf = Y.to(self.device, torch.float32)
        mean, std = X.mean(0), X.std(0).clamp_min(1e-6)
        Z = (X - mean) / std
        if self.class_weight == "balanced":
            n = float(len(Y))
            w_pos, w_neg = n / (2 * pos.to(self.device)), n / (2 * (n - pos.to(self.device)))
            weights = Yf * w_pos + (1 - Yf) * w_neg
        elif self.class_weight is None:
            weights = torch.ones_like(Yf)
        else:
            raise DataError(f"class_weight must be 'balanced' or None, not {self.class_weight!r}")
        W = torch.zeros(Z.shape[1], Y.shape[1], device=self.device, requires_grad=True)
        b = torch.zeros(Y.shape[1], device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")
        penalty = 1.0 / (2.0 * self.C * len(Y))

        def closure():
            opt.zero_grad()
            logits = Z @ W + b
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, Yf, reduction="none")
                    * weights).mean(0).sum() + penalty * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            self.coef_ = (W / std[:, None]).detach()
            self.intercept_ = (b - (mean / std) @ W).detach()
        self.ce_names_ = names
        return self

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits [..., k]."""
        check_is_fitted(self, ("coef_",))
        return X.to(self.coef_.device, self.coef_.dtype) @ self.coef_ + self.intercept_

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decision_function(X))

    def score(self, X: torch.Tensor, Y: torch.Tensor) -> float:
        return mean_auroc(self.decision_function(X), Y)


def mean_auroc(scores: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean AUROC over CEs (the metric CE detection cares about): every extractor's `score`."""
    Y = Y[:, None] if Y.ndim == 1 else Y
    s = scores.cpu()
    return float(torch.tensor([auroc(s[:, j], Y[:, j]) for j in range(Y.shape[1])]).nanmean())


def validate_labelled(X: torch.Tensor, Y: torch.Tensor, ce_names=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Checked activations [N, d], bool labels [N, k] and k CE names; DataError naming what is wrong."""
    X, Y = _validate(X, Y)
    names = list(ce_names) if ce_names is not None else [f"ce{i}" for i in range(Y.shape[1])]
    if len(names) != Y.shape[1]:
        raise DataError(f"{len(names)} CE names for {Y.shape[1]} label columns")
    for name, p in zip(names, Y.sum(0).tolist()):
        if p == 0 or p == len(Y):
            raise DataError(f"CE {name!r} has only {'negative' if p == 0 else 'positive'} examples; "
                            "an extractor needs both")
    return X, Y, names


def _validate(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2:
        raise DataError(f"activations must be [tokens, d_model], got shape {tuple(X.shape)}")
    if len(X) != len(Y):
        raise DataError(f"{len(X)} activation rows but {len(Y)} label rows")
    if len(X) == 0:
        raise DataError("no tokens to fit on")
    if not torch.isfinite(X).all():
        raise DataError("activations contain NaN or inf")
    return X, Y.bool()
