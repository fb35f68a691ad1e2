"""A Few Bad Neurons (arXiv 2601.18939): the few MLP neurons most predictive of a behaviour.

A neuron is one MLP intermediate activation (the input of the down projection) of a layer. Two pieces of evidence
score it, both from activations at the position where the model decides (the last prompt token) of prompts that
show the behaviour (positive) and prompts that do not (negative):

- probe: an L2 logistic regression on every neuron of every fitted layer at once, on standardised activations;
  a neuron's score is |coefficient|, the change in the behaviour's log-odds per standard deviation of it.
- SAE attribution (when an SAE's latents are given): the k latents whose activations separate the two sides best
  (standardised mean difference) are the behaviour's features; neuron i of layer l writes a_i * W_down[:, i] into
  the residual stream, which moves latent j's pre-activation by a_i * (W_down[:, i] . W_enc[:, j]). Its score is
  |delta_a_i * sum_j w_j (W_down[:, i] . W_enc[:, j])|, with delta_a_i the neuron's mean difference between the sides
  and w_j the latent's signed standardised difference: its direct effect on the behaviour's features, through its
  decoder column. Only layers that write before the SAE's site count.

Each score is divided by its maximum, the two are averaged with `sae_weight`, and the global top `fraction` of
neurons (across all fitted layers) is kept. Nothing here runs a model: collecting the activations is the caller's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted
from gavel.models.sites import layer_of, parse_site
from gavel.steering.adaras.neurons import top_k_mask


@dataclass(frozen=True)
class SAEEvidence:
    """An SAE's view of the same prompts: latent activations of both sides [N, d_sae], its encoder [d, d_sae], each
    fitted site's down-projection weight [d, m], and which fitted sites write before the SAE's site."""

    positive: torch.Tensor
    negative: torch.Tensor
    encoder: torch.Tensor
    down: Mapping[str, torch.Tensor]
    upstream: Mapping[str, bool]


def standardised_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """(mean+ - mean-) / pooled std per column, float64; a column constant on both sides scores 0."""
    pos, neg = positive.double(), negative.double()
    pooled = torch.cat([pos - pos.mean(0), neg - neg.mean(0)]).pow(2).sum(0) / max(len(pos) + len(neg) - 2, 1)
    diff = pos.mean(0) - neg.mean(0)
    std = pooled.sqrt()
    return torch.where(std > 0, diff / std.clamp_min(1e-300), torch.zeros_like(diff))


def probe_scores(positive: torch.Tensor, negative: torch.Tensor, C: float) -> torch.Tensor:
    """|coefficient| [F] (float64) of an L2 logistic regression on standardised features (constant columns get 0)."""
    from sklearn.linear_model import LogisticRegression

    X = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).numpy()
    std = X.std(0, unbiased=False)
    Z = torch.where(std > 0, (X - X.mean(0)) / std.clamp_min(1e-300), torch.zeros_like(X))
    probe = LogisticRegression(C=C, max_iter=5000).fit(Z.numpy(), y)
    return torch.as_tensor(probe.coef_[0], dtype=torch.float64).abs() * (std > 0)


def sae_attribution(mean_difference: torch.Tensor, down: torch.Tensor, encoder: torch.Tensor,
                    latent_weights: torch.Tensor) -> torch.Tensor:
    """|delta_a[l, i] * sum_j w_j (W_down_l[:, i] . W_enc[:, j])| [L, m] (float64), for down [L, d, m],
    encoder [d, k] (the chosen latents' columns) and latent weights w [k]."""
    reach = torch.einsum("ldm,dk,k->lm", down.double(), encoder.double(), latent_weights.double())
    return (mean_difference.double() * reach).abs()


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    top = scores.max()
    return scores / top if top > 0 else scores


class BehaviourNeurons(Estimator):
    """The top `fraction` of MLP neurons by how well they predict a behaviour (probe, optionally with SAE
    attribution): `fit` on {site: [N, m]} activations of positive and negative prompts, `neurons()` per layer."""

    artifact_kind = "behaviour_neuron_set"
    artifact_hint = "make one with `gavel neurons select ... --out DIR`"

    def __init__(self, fraction: float = 0.03, C: float = 0.1, sae_latents: int = 8, sae_weight: float = 0.5) -> None:
        self.fraction = fraction
        self.C = C
        self.sae_latents = sae_latents
        self.sae_weight = sae_weight

    def _check_params(self) -> None:
        if not 0 < self.fraction <= 1:
            raise DataError(f"fraction must lie in (0, 1], not {self.fraction!r}")
        if not self.C > 0:
            raise DataError(f"C must be positive, not {self.C!r}")
        if isinstance(self.sae_latents, bool) or not isinstance(self.sae_latents, int) or self.sae_latents < 1:
            raise DataError(f"sae_latents must be a positive int, not {self.sae_latents!r}")
        if not 0 <= self.sae_weight <= 1:
            raise DataError(f"sae_weight must lie in [0, 1], not {self.sae_weight!r}")

    def fit(self, positive: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor],
            sae: SAEEvidence | None = None) -> BehaviourNeurons:
        """Fit from per-site activations [N+, m] and [N-, m] (the same sites and widths on both sides)."""
        self._check_params()
        sites = list(positive)
        if not sites or set(sites) != set(negative):
            raise DataError(f"positive and negative activations must cover the same non-empty sites "
                            f"(positive: {sorted(positive)}, negative: {sorted(negative)})")
        for site in sites:
            parse_site(site)
        pos = torch.stack([torch.as_tensor(positive[s]).double() for s in sites], 1)     # [N+, L, m]
        neg = torch.stack([torch.as_tensor(negative[s]).double() for s in sites], 1)
        if min(len(pos), len(neg)) < 2:
            raise DataError(f"need at least 2 prompts on each side, got {len(pos)} positive and {len(neg)} negative")
        if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
            raise DataError("the activations contain NaN or inf")
        n_sites, width = pos.shape[1:]
        probe = probe_scores(pos.flatten(1), neg.flatten(1), self.C).view(n_sites, width)
        scores = _normalised(probe)
        self.latents_ = torch.zeros(0, dtype=torch.long)
        self.sae_scores_ = torch.zeros_like(probe)
        if sae is not None:
            self.sae_scores_, self.latents_ = self._attribution(sites, pos, neg, sae)
            scores = (1 - self.sae_weight) * scores + self.sae_weight * _normalised(self.sae_scores_)
        k = max(1, math.ceil(self.fraction * n_sites * width - 1e-9))   # 3% of 2048 is 62; 3/120 of 120 is 3
        self.sites_ = sites
        self.probe_scores_ = probe.float()
        self.sae_scores_ = self.sae_scores_.float()
        self.scores_ = scores.float()
        self.kept_ = top_k_mask(scores, torch.ones_like(scores, dtype=torch.bool), k)
        return self

    def _attribution(self, sites: list[str], pos: torch.Tensor, neg: torch.Tensor,
                     sae: SAEEvidence) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [s for s in sites if s not in sae.down or s not in sae.upstream]
        if missing:
            raise DataError(f"the SAE evidence lacks the down projection or position of {', '.join(missing)}")
        if sae.positive.shape[1] != sae.encoder.shape[1] or sae.negative.shape[1] != sae.encoder.shape[1]:
            raise DataError(f"latent activations have {sae.positive.shape[1]} latents, the encoder "
                            f"{sae.encoder.shape[1]}")
        separation = standardised_difference(sae.positive, sae.negative)
        latents = torch.sort(separation.abs(), descending=True, stable=True).indices[:self.sae_latents]
        down = torch.stack([torch.as_tensor(sae.down[s]).double() * float(sae.upstream[s]) for s in sites])
        if down.shape[1] != sae.encoder.shape[0] or down.shape[2] != pos.shape[2]:
            raise DataError(f"down projections {tuple(down.shape[1:])} do not map {pos.shape[2]} neurons into the "
                            f"SAE's {sae.encoder.shape[0]}-wide input")
        mean_difference = pos.mean(0) - neg.mean(0)                                      # [L, m]
        scores = sae_attribution(mean_difference, down, sae.encoder[:, latents], separation[latents])
        return scores, latents

    def neurons(self) -> dict[int, torch.Tensor]:
        """Layer -> indices of its kept neurons (layers with none are left out): what surgical masks take."""
        check_is_fitted(self, ("sites_", "kept_"))
        out: dict[int, torch.Tensor] = {}
        for site, row in zip(self.sites_, self.kept_):
            index = torch.nonzero(row).flatten()
            if len(index):
                out[layer_of(site)] = index
        return out
