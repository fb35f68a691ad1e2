"""SAE-feature CEs: cognitive elements read off a few sparse-autoencoder latents.

Selection (offline) may encode with the whole SAE; at run time an SAEHead computes only the latents
its CEs use, from a column slice of the encoder. sae-lens is slow to import, so it is imported only
inside the functions that load SAEs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from gavel.base import Estimator
from gavel.errors import ArtifactError, DataError, check_is_fitted
from gavel.probes.heads import site_features
from gavel.probes.linear import mean_auroc, validate_labelled

if TYPE_CHECKING:
    from sae_lens import SAE

SLICEABLE: tuple[str, ...] = ("standard", "jumprelu")
"""sae-lens architectures whose latents each depend on the input alone (so a slice computes them)."""

_ONE_OF_MANY = "a latent is kept only if it ranks among the k largest of all d_sae pre-activations"
_NOT_SLICEABLE = {  # architecture -> why one latent cannot be computed without the others
    "topk": _ONE_OF_MANY, "abstopk": _ONE_OF_MANY,
    "batchtopk": _ONE_OF_MANY + " in the batch", "matryoshka_batchtopk": _ONE_OF_MANY + " in the batch",
    "matching_pursuit": "latents are picked greedily, each from the residual the earlier picks leave",
    "temporal": "latents attend to the activations of earlier tokens",
}
_NORMALISATION_HINTS = {
    "expected_average_only_in": "the SAE expects inputs scaled by a dataset-wide factor it does not store; "
                                "fold it in first with sae.fold_activation_norm_scaling_factor(factor)",
    "covariance_whitening": "the SAE expects whitened inputs; fold the whitening in first with "
                            "sae.fold_activation_whitening(mean, M, M_inv)",
    "layer_norm": "use an SAE trained on raw activations (normalize_activations='none')",
    "constant_norm_rescale": "use an SAE trained on raw activations (normalize_activations='none')",
}
_TENSORS = ("encoder", "encoder_bias", "input_bias", "threshold", "combination")


@dataclass(frozen=True)
class SAEHead:
    """CEs that are non-negative combinations of a few SAE latents at one site.

    raw = JumpReLU((x - input_bias) @ encoder + encoder_bias; threshold) @ combination, which equals
    sae-lens's `sae.encode(x)[..., latents] @ combination` for ReLU (threshold 0) and JumpReLU SAEs.
    """

    kind: ClassVar[str] = "sae"
    sites: tuple[str, ...]
    encoder: torch.Tensor       # [d, m]: the used columns of W_enc
    encoder_bias: torch.Tensor  # [m]: b_enc of those latents
    input_bias: torch.Tensor    # [d]: b_dec when the SAE subtracts it from its input, else zeros
    threshold: torch.Tensor     # [m]: JumpReLU thresholds; zeros for ReLU SAEs
    combination: torch.Tensor   # [m, n_ces], non-negative

    def __post_init__(self) -> None:
        if len(self.sites) != 1:
            raise ArtifactError(f"an SAE head reads exactly one site, got {list(self.sites)}")
        if self.encoder.ndim != 2 or self.combination.ndim != 2:
            raise ArtifactError(f"SAE head on {self.sites[0]}: encoder and combination must be matrices")
        d, m = self.encoder.shape
        expected = {"encoder_bias": (m,), "input_bias": (d,), "threshold": (m,), "combination": (m, self.n_ces)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ArtifactError(f"SAE head on {self.sites[0]}: {name} has shape "
                                    f"{tuple(getattr(self, name).shape)}, expected {shape} for encoder {(d, m)}")
        if bool((self.combination < 0).any()):
            raise ArtifactError(f"SAE head on {self.sites[0]}: combination weights must be non-negative")

    @property
    def n_ces(self) -> int:
        return self.combination.shape[1]

    def score(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = site_features(acts, self.sites)  # hook_z heads flattened, as sae-lens's hook_z SAEs do
        d = self.encoder.shape[0]
        if x.shape[-1] != d:
            raise ArtifactError(f"SAE head on {self.sites[0]} expects width {d}, the activations have {x.shape[-1]}")
        pre = (x.to(self.encoder.dtype) - self.input_bias) @ self.encoder + self.encoder_bias
        # a product, not torch.where, as sae-lens: NaN activations stay NaN for the monitor to catch
        return (torch.relu(pre) * (pre > self.threshold)) @ self.combination

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSORS}

    @classmethod
    def from_tensors(cls, sites: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> SAEHead:
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ArtifactError(f"SAE head on {tuple(sites)} is missing tensor(s) {', '.join(missing)}")
        return cls(tuple(sites), *(tensors[name] for name in _TENSORS))

    def to(self, device: torch.device | str) -> SAEHead:
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in _TENSORS})

    def select(self, columns: Sequence[int]) -> SAEHead:
        """A head for only these CEs, keeping only the latents they use."""
        combination = self.combination[:, list(columns)]
        used = (combination > 0).any(dim=1)
        return SAEHead(self.sites, self.encoder[:, used].contiguous(), self.encoder_bias[used],
                       self.input_bias, self.threshold[used], combination[used].contiguous())


# ---- loading ------------------------------------------------------------------------------

def _sae_lens_sae() -> type[SAE]:
    """sae-lens's SAE base class (the optional `lens` extra; slow to import, so imported on demand)."""
    try:
        from sae_lens import SAE
    except ImportError as e:
        raise ArtifactError("loading SAEs needs sae-lens", hint="pip install 'gavelkit[lens]'") from e
    return SAE


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """An SAE saved by sae-lens (`save_model`: cfg.json + sae_weights.safetensors) in a local directory."""
    path = Path(path)
    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"{path} is not a saved sae-lens SAE: no {' or '.join(missing)}")
    try:
        return _sae_lens_sae().load_from_disk(path, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"cannot load the SAE in {path}: {e}") from e


def load_sae_release(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """A pretrained SAE by sae-lens release and id (downloaded from the Hugging Face hub, or its cache)."""
    SAE = _sae_lens_sae()
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:
        raise ArtifactError(f"cannot load SAE {sae_id!r} of release {release!r}: {e}",
                            hint="offline? download it where the hub is reachable, save it with "
                                 "sae.save_model(dir) and use load_sae(dir)") from e


def check_sliceable(sae: SAE, site: str) -> None:
    """ArtifactError unless `sae` reads `site` and each latent depends on that activation alone."""
    cfg = sae.cfg
    arch = cfg.architecture()
    if arch in _NOT_SLICEABLE:
        raise ArtifactError(
            f"a {arch} SAE cannot define SAE CEs: {_NOT_SLICEABLE[arch]}, so a latent cannot be computed "
            "from a slice of the encoder without encoding with the whole SAE at every token",
            hint="use a ReLU ('standard') or JumpReLU SAE at this site, or distil the latent into a linear "
                 "probe: LinearProbe().fit(X, encode_all(sae, X)[:, latent] > 0)")
    if arch not in SLICEABLE:
        raise ArtifactError(f"SAE architecture {arch!r} is not supported for SAE CEs; "
                            f"supported: {', '.join(SLICEABLE)}")
    hook = cfg.metadata.hook_name
    if hook != site:
        raise ArtifactError(
            f"the SAE was trained on {hook!r}, not on site {site!r}" if hook else
            f"the SAE does not say which hook it was trained on (cfg.metadata.hook_name), so it cannot be "
            f"checked against site {site!r}",
            hint="SAE CEs must read the same TransformerLens hook as the SAE; pass that site, or set "
                 "sae.cfg.metadata.hook_name if the SAE's metadata is wrong")
    if cfg.metadata.hook_head_index is not None:
        raise ArtifactError(f"the SAE reads only head {cfg.metadata.hook_head_index} of {hook}; "
                            "single-head SAEs are not supported for SAE CEs")
    if cfg.normalize_activations != "none":
        raise ArtifactError(f"the SAE normalises its inputs ({cfg.normalize_activations}), which an SAE head "
                            "scoring raw activations with a slice of the encoder does not reproduce",
                            hint=_NORMALISATION_HINTS.get(cfg.normalize_activations))


@torch.no_grad()
def encode_all(sae: SAE, X: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Every latent's activation [N, d_sae] (float32, on the CPU) for selection, with the full SAE."""
    device = sae.W_enc.device
    parts = [sae.encode(X[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


# ---- selection ----------------------------------------------------------------------------

class SAELatentSelector(Estimator):
    """Picks, per CE, the SAE latents that detect it best, from labelled latent activations.

    `method` ranks latents: "auroc" (the latent's activation as a detector score) or "mean_diff" (class
    means' difference over the latent's standard deviation). `combine`: "single" makes each CE the sum of
    its `top_k` best latents (top_k=1: one latent); "nonneg" weights the `max_latents` best by
    non-negative least squares on class-balanced labels, drops zero weights and scales the rest to sum 1
    (`top_k` is not used there).
    """

    def __init__(self, top_k: int = 1, method: str = "auroc", combine: str = "single",
                 max_latents: int = 8) -> None:
        self.top_k = top_k
        self.method = method
        self.combine = combine
        self.max_latents = max_latents

    def fit(self, latent_acts: torch.Tensor, Y: torch.Tensor,
            ce_names: Sequence[str] | None = None) -> SAELatentSelector:
        """latent_acts [N, d_sae] (see `encode_all`), Y [N, k] bool labels (or [N]); returns self."""
        X, Y, names = validate_labelled(latent_acts, Y, ce_names)
        self._check_params(X.shape[1])
        X = X.float()
        ranking = latent_aurocs(X, Y) if self.method == "auroc" else latent_mean_diffs(X, Y)  # [k, d_sae]
        n = self.top_k if self.combine == "single" else min(self.max_latents, X.shape[1])
        top = ranking.topk(n, dim=1).indices                                                   # [k, n]
        latents, weights = [], []
        for j in range(Y.shape[1]):
            chosen = top[j]
            w = torch.ones(n, dtype=torch.float64)
            if self.combine == "nonneg":
                w = _nonneg_weights(X[:, chosen].double(), Y[:, j])
                chosen, w = chosen[w > 0], w[w > 0]
            latents.append(chosen.tolist())
            weights.append(w)
        self.union_ = torch.tensor(sorted({i for ls in latents for i in ls}), dtype=torch.long)
        position = {int(i): p for p, i in enumerate(self.union_)}
        combination = torch.zeros(len(self.union_), Y.shape[1])
        for j, (ls, w) in enumerate(zip(latents, weights)):
            combination[[position[i] for i in ls], j] = w.float()
        self.latents_ = latents
        self.scores_ = [ranking[j, ls].tolist() for j, ls in enumerate(latents)]
        self.combination_ = combination
        self.ce_names_ = names
        self.n_features_in_ = X.shape[1]
        return self

    def _check_params(self, d_sae: int) -> None:
        if self.method not in ("auroc", "mean_diff"):
            raise DataError(f"method must be 'auroc' or 'mean_diff', not {self.method!r}")
        if self.combine not in ("single", "nonneg"):
            raise DataError(f"combine must be 'single' or 'nonneg', not {self.combine!r}")
        for name, most in (("top_k", d_sae), ("max_latents", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > (most or value):
                raise DataError(f"{name} must be a positive integer" + (f" up to d_sae={most}" if most else "")
                                + f", not {value!r}")

    def decision_function(self, latent_acts: torch.Tensor) -> torch.Tensor:
        """Raw CE scores [N, k] from latent activations [N, d_sae] (what the SAEHead computes)."""
        check_is_fitted(self, ("combination_",))
        return latent_acts[:, self.union_].float() @ self.combination_

    def score(self, latent_acts: torch.Tensor, Y: torch.Tensor) -> float:
        return mean_auroc(self.decision_function(latent_acts), Y)


def latent_aurocs(X: torch.Tensor, Y: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """AUROC [k, d] of every latent (column of X [N, d]) for every CE (column of Y [N, k]), ties half.

    Rank-sum identity with tie-averaged ranks, over chunks of about `max_elements` activations.
    """
    Yf = Y.double()
    n_pos = Yf.sum(0)
    n_neg = len(Y) - n_pos
    sums = torch.empty(Y.shape[1], X.shape[1], dtype=torch.float64)
    step = max(1, max_elements // max(len(X), 1))
    for start in range(0, X.shape[1], step):
        cols = X[:, start:start + step].T.contiguous()                     # [c, N]
        ordered = cols.sort(dim=1).values
        lo = torch.searchsorted(ordered, cols, side="left")
        hi = torch.searchsorted(ordered, cols, side="right")
        ranks = (lo + hi + 1).double() / 2                                  # 1-based, averaged over ties
        sums[:, start:start + step] = (ranks @ Yf).T
    return ((sums - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]).float()


def latent_mean_diffs(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(mean over positives - mean over negatives) / std over all tokens, per CE and latent: [k, d].

    Dividing by the overall std (not the within-class one) bounds the score, so a latent that fires
    on one positive token with no spread cannot win.
    """
    Yf = Y.to(X.dtype)
    mean_pos = (Yf.T @ X) / Yf.sum(0)[:, None]
    mean_neg = ((1 - Yf).T @ X) / (1 - Yf).sum(0)[:, None]
    return (mean_pos - mean_neg) / X.std(0).clamp_min(1e-8)


def _nonneg_weights(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weights [c] summing to 1: non-negative least squares of labels y on columns A [N, c] (ranked best
    first), class-balanced, free intercept; the best column alone if none gets a positive weight."""
    from scipy.optimize import nnls  # type: ignore[import-untyped]  # scipy: no type stubs installed

    n_pos = y.sum()
    w = torch.where(y, 0.5 / n_pos, 0.5 / (len(y) - n_pos)).double()  # balanced, sums to 1
    target = y.double()
    root = w.sqrt()
    centred = (A - w @ A) * root[:, None]                              # centring frees the intercept
    coef = torch.from_numpy(nnls(centred.numpy(), ((target - w @ target) * root).numpy())[0])
    if not bool((coef > 0).any()):
        coef[0] = 1.0
    return coef / coef.sum()


def build_head(sae: SAE, selector: SAELatentSelector, site: str) -> SAEHead:
    """The run-time head for a fitted selector's CEs: only the latents they use, sliced out of `sae`."""
    check_is_fitted(selector, ("combination_",))
    check_sliceable(sae, site)
    if selector.n_features_in_ != sae.cfg.d_sae:
        raise ArtifactError(f"the selector was fitted on {selector.n_features_in_} latents, "
                            f"the SAE has {sae.cfg.d_sae}")
    with torch.no_grad():
        index = selector.union_.to(sae.W_enc.device)
        encoder = sae.W_enc[:, index].detach().clone()
        zeros = torch.zeros(len(index), dtype=encoder.dtype, device=encoder.device)
        input_bias = sae.b_dec.detach().clone() if sae.cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
        threshold = sae.threshold[index].detach().clone() if sae.cfg.architecture() == "jumprelu" else zeros
        return SAEHead((site,), encoder, sae.b_enc[index].detach().clone(), input_bias, threshold,
                       selector.combination_.to(encoder.device, encoder.dtype))
