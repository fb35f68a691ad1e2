"""Selective Steering's plane, fitted like a scikit-learn estimator from two classes of prompt activations.

`fit(positive, negative)` takes per-site activations at the last prompt token ({site: [N, d]}) of, say, harmful and
harmless prompts; it keeps each site's candidate direction (difference of class means), the one plane (b1, b2)
shared by all layers, and which blocks to steer: those all of whose sites the two classes project onto b1 with
opposite signs. Saved as one artifact (`Estimator.save(dir, fingerprint=...)`) with the fingerprint of the model it
was fitted on.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted
from gavel.models.sites import parse_site
from gavel.steering.selective.geometry import candidate_directions, discriminative, projection_means, steering_plane


class SteeringPlane(Estimator):
    """Candidates, plane and discriminative blocks. `layers="auto"` selects blocks by the sign test, `"all"` keeps
    every block the sites cover (the ablation the paper compares with)."""

    artifact_hint = "fit one with `gavel steer fit --pos FILE --neg FILE --out DIR`"

    def __init__(self, layers: str = "auto") -> None:
        self.layers = layers

    def fit(self, positive: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor]) -> SteeringPlane:
        if self.layers not in ("auto", "all"):
            raise DataError(f"layers must be 'auto' or 'all', not {self.layers!r}")
        if list(positive) != list(negative) or not positive:
            raise DataError("positive and negative activations must cover the same sites, in the same order")
        sites = list(positive)
        for site in sites:
            if len(positive[site]) == 0 or len(negative[site]) == 0:
                raise DataError(f"site {site}: a class has no prompts")
        pos = torch.stack([positive[s].double() for s in sites])     # [K, N, d]
        neg = torch.stack([negative[s].double() for s in sites])     # [K, M, d]
        self.sites_ = sites
        mean_pos, mean_neg = pos.mean(1), neg.mean(1)
        self.mean_pos_, self.mean_neg_ = mean_pos.float(), mean_neg.float()
        # a site that reads the same vector for every prompt (the first block's input norm at the last template
        # token is the token's embedding) has no direction: it takes no part in the plane and is never steered
        scale = torch.cat([pos, neg], 1).norm(dim=-1).mean(1)
        self.informative_ = (mean_pos - mean_neg).norm(dim=-1) > 1e-6 * scale
        if int(self.informative_.sum()) < 2:
            raise DataError(f"only {int(self.informative_.sum())} of {len(sites)} sites tell the two classes apart; "
                            "a plane needs two", hint="check the prompts of the two classes differ, or add sites")
        self.candidates_ = torch.zeros_like(self.mean_pos_)
        self.candidates_[self.informative_] = candidate_directions(mean_pos[self.informative_],
                                                                   mean_neg[self.informative_]).float()
        self.plane_ = steering_plane(self.candidates_[self.informative_])
        mu_pos, mu_neg = projection_means(pos, neg, self.plane_[:, 0].double())
        self.mu_pos_, self.mu_neg_ = mu_pos.float(), mu_neg.float()
        self.passes_ = discriminative(self.mu_pos_, self.mu_neg_) & self.informative_
        return self

    @property
    def selected_layers(self) -> list[int]:
        """Blocks to steer: every site of the block passes the sign test (`layers="auto"`), or all of them."""
        check_is_fitted(self, ("passes_",))
        by_layer: dict[int, list[bool]] = {}
        for site, ok in zip(self.sites_, self.passes_.tolist()):
            by_layer.setdefault(_layer(site), []).append(ok)
        return sorted(layer for layer, oks in by_layer.items() if self.layers == "all" or all(oks))

    def sites_in(self, layers: str) -> list[str]:
        """The fitted sites in the blocks `layers` names: "auto" (the selected blocks), "all", "L" or "L-M"; a
        DataError when there are none."""
        check_is_fitted(self, ("sites_",))
        if layers == "auto":
            chosen = self.selected_sites
        elif layers == "all":
            chosen = list(self.sites_)
        else:
            low, _, high = layers.partition("-")
            span = range(int(low), int(high or low) + 1)
            chosen = [s for s in self.sites_ if _layer(s) in span]
        if not chosen:
            fitted = sorted({_layer(s) for s in self.sites_})
            raise DataError(f"the steering plane has no sites in layers {layers!r} (selected blocks: "
                            f"{self.selected_layers or 'none'}; fitted on blocks {fitted})")
        return chosen

    @property
    def selected_sites(self) -> list[str]:
        """The sites of the selected blocks, in fitting order."""
        chosen = set(self.selected_layers)
        return [s for s in self.sites_ if _layer(s) in chosen]

def _layer(site: str) -> int:
    layer = parse_site(site).layer
    if layer is None:
        raise DataError(f"site {site} belongs to no block; steering sites are per-block sites")
    return layer
