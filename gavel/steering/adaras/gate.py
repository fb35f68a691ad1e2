"""AdaRAS's adaptive gate (arXiv 2601.19847): predict from the prompt alone whether the model will fail.

Steering every prompt can hurt the ones the model already gets right, so AdaRAS steers only when a small classifier
over the MLP neuron activations of the PROMPT tokens says the model is likely to fail. A prompt is [T_j, F]: one row
per token, F = all neurons of the chosen layers concatenated. The gate keeps the top `k_features` neurons by the
ANOVA F statistic (sklearn `f_classif`) of the per-prompt mean activations against the fail label, standardises them
with their mean and std over all training tokens, pools each prompt's tokens by attention with one learned query
(weights = softmax over the prompt's real tokens of x_sel @ q; padding never gets weight), and maps the pooled vector
through an MLP k -> hidden -> hidden -> 1 (ReLU) to the logit of "the model will fail". Training is full batch (prompts
are few) with BCE-with-logits and Adam for a fixed number of epochs, on CPU, seeded, so a fit is reproducible.
Nothing here hooks a model: collecting prompt activations and acting on the gate's answer is the caller's business.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted

STD_FLOOR = 1e-6  # standard deviations are clamped to at least this, so constant features do not divide by 0


class _GateNet(nn.Module):
    """Attention pooling over a prompt's tokens with one learned query, then an MLP k -> hidden -> hidden -> 1."""

    def __init__(self, k: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(k))           # zero: training starts from plain mean pooling
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [J] of padded prompts x [J, T, k] whose real tokens are `mask` [J, T] (each row has one)."""
        scores = (x @ self.query).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)              # exactly 0 on padding
        pooled = (weights.unsqueeze(-1) * x).sum(1)
        return self.mlp(pooled).squeeze(-1)


def _check_prompts(prompts: Sequence[torch.Tensor], width: int | None = None) -> list[torch.Tensor]:
    """The prompts as float32 CPU tensors [T_j, F]; each needs a token, finite values and the same F (`width`)."""
    if isinstance(prompts, torch.Tensor) or len(prompts) == 0:
        if isinstance(prompts, torch.Tensor):
            raise DataError("prompts must be a sequence of [T, F] tensors (one per prompt), not one tensor")
        raise DataError("no prompts")
    out = []
    for j, p in enumerate(prompts):
        p = torch.as_tensor(p)
        if p.dim() != 2:
            raise DataError(f"prompt {j} has shape {tuple(p.shape)}, expected [T, F] (tokens, features)")
        if p.shape[0] == 0:
            raise DataError(f"prompt {j} is empty (no tokens); the gate needs at least one prompt token")
        if width is None:
            width = p.shape[1]
        elif p.shape[1] != width:
            raise DataError(f"prompt {j} has {p.shape[1]} features, expected {width}; every prompt needs the same "
                            "neurons of the same layers")
        p = p.detach().to("cpu", torch.float32)
        if not torch.isfinite(p).all():
            raise DataError(f"prompt {j} contains NaN or inf")
        out.append(p)
    return out


def _check_param(name: str, value, *, positive: bool, integer: bool) -> None:
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok_type or (value <= 0 if positive else value < 0):
        kind = ("positive" if positive else "non-negative") + (" int" if integer else " number")
        raise DataError(f"{name} must be a {kind}, not {value!r}")


class FailureGate(Estimator):
    """Predicts from a prompt's per-token neuron activations whether the model will fail on it (AdaRAS's gate)."""

    def __init__(self, k_features: int = 256, hidden: int = 256, epochs: int = 200, lr: float = 1e-3,
                 weight_decay: float = 0.0, random_state: int = 0) -> None:
        self.k_features = k_features
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def fit(self, prompts: Sequence[torch.Tensor], fails: torch.Tensor) -> FailureGate:
        """Fit from prompts [T_j, F] and fails [J] (bool: the model failed on prompt j); returns self."""
        from sklearn.feature_selection import f_classif

        _check_param("k_features", self.k_features, positive=True, integer=True)
        _check_param("hidden", self.hidden, positive=True, integer=True)
        _check_param("epochs", self.epochs, positive=False, integer=True)
        _check_param("lr", self.lr, positive=True, integer=False)
        _check_param("weight_decay", self.weight_decay, positive=False, integer=False)
        _check_param("random_state", self.random_state, positive=False, integer=True)
        prompts = _check_prompts(prompts)
        y = torch.as_tensor(fails).detach().cpu()
        if y.dim() != 1:
            raise DataError(f"fails has shape {tuple(y.shape)}, expected [J] (one label per prompt)")
        if len(y) != len(prompts):
            raise DataError(f"{len(prompts)} prompts but {len(y)} fail labels")
        if y.dtype != torch.bool:
            if y.is_floating_point() or not ((y == 0) | (y == 1)).all():
                raise DataError(f"fails must be bool (or 0/1 integers), got {y.dtype}")
            y = y.bool()
        n_fail = int(y.sum())
        if n_fail in (0, len(y)):
            raise DataError(f"all {len(y)} prompts are labelled {'failing' if n_fail else 'passing'}; the gate needs "
                            "both failing and passing prompts")
        width = prompts[0].shape[1]
        means = torch.stack([p.double().mean(0) for p in prompts])                        # [J, F]
        with warnings.catch_warnings():                      # constant features warn and get NaN; they rank last
            warnings.simplefilter("ignore")
            f_stat, _ = f_classif(means.numpy(), y.numpy())
        f_stat = torch.nan_to_num(torch.as_tensor(f_stat, dtype=torch.float64), nan=-1.0)
        k = min(self.k_features, width)
        features = torch.sort(f_stat, descending=True, stable=True).indices[:k]            # ties: lower index first
        tokens = torch.cat([p[:, features] for p in prompts]).double()
        mean = tokens.mean(0).float()
        std = tokens.std(0, unbiased=False).clamp_min(STD_FLOOR).float()
        self.features_, self.mean_, self.std_, self.n_features_in_ = features, mean, std, int(width)
        x, mask = self._padded(prompts)
        target = y.float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            net = _GateNet(k, self.hidden)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        net.train()
        for _ in range(self.epochs):
            opt.zero_grad()
            loss_fn(net(x, mask), target).backward()
            opt.step()
        self.net_ = net.eval()
        with torch.no_grad():
            self.train_accuracy_ = float(((net(x, mask) >= 0) == y).float().mean())
        return self

    def _build_module(self, name: str) -> nn.Module:
        if name != "net_":
            return super()._build_module(name)
        return _GateNet(len(self.features_), self.hidden)

    def _padded(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised selected features [J, T_max, k], zero after each prompt's end, and the token mask [J, T_max]."""
        lengths = torch.tensor([len(p) for p in prompts])
        x = torch.zeros(len(prompts), int(lengths.max()), len(self.features_))
        for j, p in enumerate(prompts):
            x[j, :len(p)] = (p[:, self.features_] - self.mean_) / self.std_
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        return x, mask

    @torch.no_grad()
    def predict_proba(self, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """P(the model fails) [J] (float32) for prompts [T_j, F]."""
        check_is_fitted(self, ("features_", "mean_", "std_", "net_"))
        x, mask = self._padded(_check_prompts(prompts, self.n_features_in_))
        self.net_.eval()
        return torch.sigmoid(self.net_(x, mask)).float()

    def predict(self, prompts: Sequence[torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
        """Whether the model will fail [J] (bool): P(fail) >= threshold."""
        return self.predict_proba(prompts) >= threshold
