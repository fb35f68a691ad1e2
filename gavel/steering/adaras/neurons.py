"""AdaRAS reasoning-critical neurons (arXiv 2601.19847): score MLP neurons by how correct and incorrect traces differ.

A neuron is one MLP intermediate activation (the input of the down projection) of a layer. Each pair k holds a
correct and an incorrect trace of the same problem; mu(a_i, p) is neuron i's mean over a trace's tokens. The score
S(l, i) = mean_k [mu(a_i, p_k+) - mu(a_i, p_k-)] says how much more the neuron fires when the model reasons right.
The polarity filter keeps only neurons whose mean over the correct traces and mean over the incorrect traces have
strictly opposite signs (a zero mean has no sign and is rejected): a neuron that merely fires harder on correct
traces is not taken as reasoning-critical. Of the neurons that pass, the global top k by |S| across all layers are
kept; the steering vector of layer l is S'_l = S(l, i) at its kept neurons and 0 elsewhere, added as h + alpha S'_l
to that layer's MLP intermediate activations h [..., m]. Nothing here hooks a model: it scores tensors and shifts
them, so collecting the trace means and installing `steer` as a hook is the caller's business.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted


def trace_means(traces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-trace token means [J, m] (float64) of traces [T_j, m]; every trace needs a token and the same width."""
    if len(traces) == 0:
        raise DataError("no traces to average")
    rows = []
    width = None
    for j, t in enumerate(traces):
        t = torch.as_tensor(t)
        if t.dim() != 2:
            raise DataError(f"trace {j} has shape {tuple(t.shape)}, expected [T, m] (tokens, neurons)")
        if t.shape[0] == 0:
            raise DataError(f"trace {j} is empty (no tokens); its mean activation is undefined")
        if width is None:
            width = t.shape[1]
        elif t.shape[1] != width:
            raise DataError(f"trace {j} has {t.shape[1]} neurons, trace 0 has {width}")
        rows.append(t.detach().to(torch.float64).mean(0))
    return torch.stack(rows)


def neuron_scores(correct: torch.Tensor, incorrect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores S [L, m] (float64, mean over pairs of correct minus incorrect trace means) and the polarity mask
    [L, m]: the means over pairs of the two sides have strictly opposite signs. Inputs are trace means [P, L, m]."""
    correct, incorrect = torch.as_tensor(correct), torch.as_tensor(incorrect)
    for name, x in (("correct", correct), ("incorrect", incorrect)):
        if x.dim() != 3:
            raise DataError(f"{name} trace means have shape {tuple(x.shape)}, expected [P, L, m] "
                            "(pairs, layers, neurons)")
        if x.shape[0] == 0:
            raise DataError(f"{name} trace means hold no pairs")
    if correct.shape != incorrect.shape:
        raise DataError(f"correct trace means {tuple(correct.shape)} and incorrect {tuple(incorrect.shape)} differ "
                        "in shape; row p of each must be the two traces of pair p")
    pos, neg = correct.detach().double(), incorrect.detach().double()
    scores = (pos - neg).mean(0)
    polarity_ok = torch.sign(pos.mean(0)) * torch.sign(neg.mean(0)) < 0
    return scores, polarity_ok


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """The global top k eligible entries of `scores` by |score|; ties go to the lower flat (layer-major) index."""
    flat = scores.abs().flatten().double()
    ok = eligible.flatten()
    key = torch.where(ok, flat, torch.full_like(flat, -1.0))      # ineligible entries sort after every |S| >= 0
    order = torch.sort(key, descending=True, stable=True).indices
    n = min(int(k), int(ok.sum()))
    mask = torch.zeros_like(ok)
    mask[order[:n]] = True
    return mask.view(eligible.shape)


class ReasoningNeurons(Estimator):
    """The k reasoning-critical neurons across the fitted sites and their per-site steering vectors. With
    `polarity=False` the sign filter is skipped and the top k by |S| are taken among all neurons (the ablation)."""

    artifact_kind = "reasoning_neuron_set"
    artifact_hint = "make one with `gavel neurons find ... --out DIR`"

    def __init__(self, k: int = 50, polarity: bool = True) -> None:
        self.k = k
        self.polarity = polarity

    def fit(self, correct: Mapping[str, torch.Tensor], incorrect: Mapping[str, torch.Tensor]) -> ReasoningNeurons:
        """Fit from per-pair trace means {site: [P, m]} of the correct and the incorrect traces (row p is pair p)."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise DataError(f"k must be a positive int, not {self.k!r}")
        if not isinstance(self.polarity, bool):
            raise DataError(f"polarity must be True or False, not {self.polarity!r}")
        if not correct:
            raise DataError("no sites to score")
        sites = list(correct)
        if set(sites) != set(incorrect) or len(incorrect) != len(sites):
            only_c = sorted(set(sites) - set(incorrect))
            only_i = sorted(set(incorrect) - set(sites))
            raise DataError(f"correct and incorrect trace means must cover the same sites (only in correct: "
                            f"{only_c}, only in incorrect: {only_i})")
        shape = None
        for site in sites:
            for name, side in (("correct", correct), ("incorrect", incorrect)):
                x = torch.as_tensor(side[site])
                if x.dim() != 2:
                    raise DataError(f"site {site}: {name} trace means have shape {tuple(x.shape)}, expected [P, m] "
                                    "(pairs, neurons)")
                if x.shape[0] == 0:
                    raise DataError(f"site {site}: {name} trace means hold no pairs")
                if shape is None:
                    shape = tuple(x.shape)
                elif x.shape[0] != shape[0]:
                    raise DataError(f"site {site}: {name} trace means hold {x.shape[0]} pairs, {sites[0]} holds "
                                    f"{shape[0]}; every site and side needs the same pairs")
                elif x.shape[1] != shape[1]:
                    raise DataError(f"site {site}: {name} trace means have {x.shape[1]} neurons, {sites[0]} has "
                                    f"{shape[1]}; all sites must share one MLP width")
                if not torch.isfinite(x).all():
                    raise DataError(f"site {site}: {name} trace means contain NaN or inf")
        pos = torch.stack([torch.as_tensor(correct[s]).detach().cpu().double() for s in sites], 1)    # [P, L, m]
        neg = torch.stack([torch.as_tensor(incorrect[s]).detach().cpu().double() for s in sites], 1)
        scores, polarity_ok = neuron_scores(pos, neg)
        eligible = polarity_ok if self.polarity else torch.ones_like(polarity_ok)
        kept = top_k_mask(scores, eligible, self.k)
        self.sites_ = sites
        self.scores_ = scores.float()
        self.polarity_ = polarity_ok
        self.kept_ = kept
        self.vectors_ = torch.where(kept, scores, torch.zeros_like(scores)).float()
        self.control_seed_: int | None = None
        return self

    def _index(self, site: str) -> int:
        check_is_fitted(self, ("sites_", "vectors_"))
        if site not in self.sites_:
            raise DataError(f"{site!r} is not a fitted site (fitted: {', '.join(self.sites_)})")
        return self.sites_.index(site)

    def vector(self, site: str) -> torch.Tensor:
        """The steering vector S' [m] (float32) of one site: its kept neurons' scores, 0 elsewhere."""
        i = self._index(site)                 # first, so an unfitted estimator raises NotFittedError
        return self.vectors_[i]

    def steer(self, h: torch.Tensor, site: str, alpha: float) -> torch.Tensor:
        """h + alpha * S' for MLP intermediate activations h [..., m], computed in float32, returned in h's dtype.
        Only shapes are checked, never values, so it never waits on the device."""
        v = self.vector(site)
        if h.shape[-1] != v.shape[0]:
            raise DataError(f"site {site}: activations have {h.shape[-1]} neurons, the vector has {v.shape[0]}")
        v = v.to(device=h.device, dtype=torch.float32, non_blocking=True)
        return (h.float() + float(alpha) * v).to(h.dtype)

    def random_control(self, seed: int) -> ReasoningNeurons:
        """The random-neuron control: same number of kept neurons per site, at random positions, with the kept |S|.

        Recipe (torch.Generator seeded with `seed`, CPU): for each site in order, `randperm(m)[:n_l]` picks the
        n_l = kept_[l].sum() positions; then the kept |S| values, taken in flat (site-major) order, are shuffled by
        one `randperm(K)` over all K kept neurons and dealt to the new positions in flat order, each multiplied by an
        independent random sign (`randint(0, 2) * 2 - 1`). So the control moves the same number of neurons per layer
        with the same multiset of magnitudes, but at random neurons with random signs. `scores_` and `polarity_`
        stay the fitted ones; `kept_` and `vectors_` are the control's, and `control_seed_` records the seed.
        """
        check_is_fitted(self, ("kept_", "vectors_"))
        g = torch.Generator().manual_seed(int(seed))
        kept = torch.zeros_like(self.kept_)
        m = kept.shape[1]
        for layer, n in enumerate(self.kept_.sum(1).tolist()):
            kept[layer, torch.randperm(m, generator=g)[:n]] = True
        mags = self.scores_[self.kept_].abs()                         # flat (site-major) order
        mags = mags[torch.randperm(len(mags), generator=g)]
        signs = torch.randint(0, 2, (len(mags),), generator=g).float() * 2 - 1
        vectors = torch.zeros_like(self.vectors_)
        vectors[kept] = mags * signs
        control = copy.deepcopy(self)
        control.kept_, control.vectors_, control.control_seed_ = kept, vectors, int(seed)
        return control
