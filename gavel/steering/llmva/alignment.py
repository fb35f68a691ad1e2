"""LLM-VA vector alignment (arXiv 2601.19487): the math of aligning the answer direction with the benign one.

Per sublayer (an attention or MLP output, read at the last prompt token), two linear SVMs without intercept give
unit directions: `v_b` separates benign from toxic prompts, `v_a` answered from refused ones, each with the standard
deviation `sigma` of the training projections and an accuracy on a held-out split. The sublayers whose directions
agree most with those of the final residual stream, weighted by accuracy, are selected; there the answer component
is replaced by the rescaled benign component, o' = o - (o.v_a) v_a + (sigma_a/sigma_b)(o.v_b) v_a, so the model
answers in proportion to how benign the prompt reads. The same map folds into the sublayer's output weight as a
closed-form, rank-one, minimum-norm delta. Nothing here hooks a model; it fits directions and computes edits.

Row convention: W [in, out] with o = x W; the edit D = ((sigma_a/sigma_b) W v_b - W v_a) v_a^T is the least-norm D
with x (W + D) v_a = (sigma_a/sigma_b) x W v_b for all x. Hugging Face stores `weight` as [out, in] (o = x W_hf^T),
so `weight_delta` takes and returns that layout: D_hf = D^T. The weight edit equals the runtime projection exactly
for a bias-free output projection (Llama's o_proj and down_proj). With a bias c the edit leaves c untouched: the
edited layer gives project(x W) + c, the runtime projection project(x W + c), and they differ by
c - project(c) = ((c.v_a) - (sigma_a/sigma_b)(c.v_b)) v_a, the bias's own components.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted

SVM_MAX_ITER = 10_000


def _labels(y: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Bool labels [n] from bool or signed (+1/-1, 1/0) labels: positive means the first-named class."""
    y = torch.as_tensor(y)
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{what} labels have shape {tuple(y.shape)}, expected [{n}] (one per prompt)")
    return y if y.dtype == torch.bool else y > 0


def _features(X: torch.Tensor, what: str) -> torch.Tensor:
    X = torch.as_tensor(X)
    if X.dim() != 2:
        raise DataError(f"{what}: activations have shape {tuple(X.shape)}, expected [N, d]")
    if not torch.isfinite(X).all():
        raise DataError(f"{what}: activations contain NaN or inf")
    return X.detach().cpu().double()


def _fit_svm(X: torch.Tensor, y: torch.Tensor, C: float, random_state: int, what: str) -> torch.Tensor:
    """The unit float64 weight of a linear SVM without intercept; the positive class lies along +v."""
    from sklearn.svm import LinearSVC

    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise DataError(f"{what}: only one class present ({n_pos} positive of {len(y)}); the SVM needs both")
    svm = LinearSVC(C=C, fit_intercept=False, random_state=random_state, max_iter=SVM_MAX_ITER, dual="auto")
    svm.fit(X.numpy(), y.numpy().astype(np.int64))       # classes_ = [0, 1]: decision X w > 0 is the positive class
    w = torch.from_numpy(svm.coef_[0].astype(np.float64))
    norm = w.norm()
    if not norm > 0:
        raise DataError(f"{what}: the SVM weight is zero; the classes are not linearly told apart")
    return w / norm


def _sigma(X: torch.Tensor, v: torch.Tensor) -> float:
    """Population standard deviation (numpy's ddof=0) of the projections X @ v."""
    return float((X @ v).std(correction=0))


def svm_direction(X: torch.Tensor, y: torch.Tensor, *, C: float = 1.0,
                  random_state: int = 0) -> tuple[torch.Tensor, float]:
    """Unit float32 direction [d] of a no-intercept linear SVM (positive class along +v) and the population std of
    the projections X @ v; y is bool, or signed (> 0 positive)."""
    X = _features(X, "svm_direction")
    y = _labels(y, len(X), "svm_direction")
    v = _fit_svm(X, y, C, random_state, "svm_direction")
    v32 = v.float()
    return v32, _sigma(X, v32.double())


def _unit_pair(v_a: torch.Tensor, v_b: torch.Tensor, sigma_a: float, sigma_b: float,
               dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    sigma_a, sigma_b = float(sigma_a), float(sigma_b)
    if not (sigma_b > 0 and np.isfinite(sigma_a) and np.isfinite(sigma_b)):
        raise DataError(f"sigmas must be finite with sigma_b > 0 (got sigma_a={sigma_a}, sigma_b={sigma_b})")
    v_a = torch.as_tensor(v_a).to(device, dtype)
    v_b = torch.as_tensor(v_b).to(device, dtype)
    if v_a.dim() != 1 or v_a.shape != v_b.shape:
        raise DataError(f"v_a and v_b must be vectors of one size, got {tuple(v_a.shape)} and {tuple(v_b.shape)}")
    if not (v_a.norm() > 0 and v_b.norm() > 0):
        raise DataError("v_a and v_b must be non-zero")
    return v_a / v_a.norm(), v_b / v_b.norm(), sigma_a / sigma_b


def weight_delta(weight_hf: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor,
                 sigma_a: float, sigma_b: float) -> torch.Tensor:
    """Rank-one minimum-norm delta [out, in] for a Hugging Face output weight [out, in]: D_hf = v_a u^T with
    u = W_hf^T ((sigma_a/sigma_b) v_b - v_a). Directions are normalised first; computed in float32 (float64 for a
    float64 weight) and returned in the weight's dtype and device (add it in float32, then cast, for bf16 weights)."""
    if weight_hf.dim() != 2:
        raise DataError(f"weight must be [out, in], got shape {tuple(weight_hf.shape)}")
    compute = torch.promote_types(weight_hf.dtype, torch.float32)
    v_a, v_b, ratio = _unit_pair(v_a, v_b, sigma_a, sigma_b, compute, weight_hf.device)
    if len(v_a) != weight_hf.shape[0]:
        raise DataError(f"directions have size {len(v_a)} but the weight's output size is {weight_hf.shape[0]}")
    u = (ratio * v_b - v_a) @ weight_hf.to(compute)                # [in]: W_hf^T (r v_b - v_a)
    return torch.outer(v_a, u).to(weight_hf.dtype)


def project_answer(o: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor,
                   sigma_a: float, sigma_b: float) -> torch.Tensor:
    """o - (o.v_a) v_a + (sigma_a/sigma_b)(o.v_b) v_a over the last axis; float32 compute (float64 stays float64),
    returned in o's dtype."""
    compute = torch.promote_types(o.dtype, torch.float32)
    v_a, v_b, ratio = _unit_pair(v_a, v_b, sigma_a, sigma_b, compute, o.device)
    if o.shape[-1] != len(v_a):
        raise DataError(f"output has last size {o.shape[-1]} but the directions have size {len(v_a)}")
    x = o.to(compute)
    coeff = x @ (ratio * v_b - v_a)                                  # [...]: new minus old answer component
    return (x + coeff.unsqueeze(-1) * v_a).to(o.dtype)


class VectorAlignment(Estimator):
    """Per-sublayer answer and benign directions, their agreement with the final residual stream, the top
    `l_select` sublayers, and the projection or weight delta that aligns answering with benignness there."""

    def __init__(self, l_select: int = 8, C: float = 1.0, validation_fraction: float = 0.2,
                 random_state: int = 0) -> None:
        self.l_select = l_select
        self.C = C
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, features: Mapping[str, torch.Tensor], benign: torch.Tensor, answered: torch.Tensor,
            final: str) -> VectorAlignment:
        """features {sublayer: [N, d]} at the last prompt token, including key `final` (the final residual
        stream); benign and answered are bool [N] (or signed, > 0 for benign / answered). Returns self."""
        if int(self.l_select) < 1:
            raise DataError(f"l_select must be at least 1, not {self.l_select}")
        if not 0 < float(self.validation_fraction) < 1:
            raise DataError(f"validation_fraction must lie in (0, 1), not {self.validation_fraction}")
        if final not in features:
            raise DataError(f"final key {final!r} is not among the features ({', '.join(map(str, features))})")
        sublayers = [k for k in features if k != final]
        if not sublayers:
            raise DataError("features hold only the final key; at least one sublayer is needed")
        X = {k: _features(features[k], k) for k in features}
        n, d = X[final].shape
        for k, x in X.items():
            if x.shape != (n, d):
                raise DataError(f"{k}: activations have shape {tuple(x.shape)}, but {final} has {(n, d)}; every "
                                "sublayer needs the same prompts (N) and the same model width (d)")
        b = _labels(benign, n, "benign")
        a = _labels(answered, n, "answered")
        for name, y in (("benign", b), ("answered", a)):
            if int(y.sum()) in (0, n):
                raise DataError(f"{name} labels hold one class only ({int(y.sum())} of {n} positive)")
        train, val = self._split(b, a)

        def directions(x: torch.Tensor, what: str) -> tuple[list[torch.Tensor], list[float], list[float]]:
            vs, sigmas, accs = [], [], []
            for task, y in (("answered", a), ("benign", b)):
                v = _fit_svm(x[train], y[train], self.C, self.random_state, f"{what} ({task})").float()
                proj = x @ v.double()
                vs.append(v)
                sigmas.append(float(proj[train].std(correction=0)))
                accs.append(float(((proj[val] > 0) == y[val]).double().mean()))
            return vs, sigmas, accs

        (self.v_a_fin_, self.v_b_fin_), _, _ = directions(X[final], final)
        fitted = [directions(X[k], k) for k in sublayers]
        self.final_ = final
        self.sublayers_ = sublayers
        self.v_a_ = torch.stack([f[0][0] for f in fitted])
        self.v_b_ = torch.stack([f[0][1] for f in fitted])
        self.sigma_a_ = torch.tensor([f[1][0] for f in fitted], dtype=torch.float32)
        self.sigma_b_ = torch.tensor([f[1][1] for f in fitted], dtype=torch.float32)
        self.acc_a_ = torch.tensor([f[2][0] for f in fitted], dtype=torch.float32)
        self.acc_b_ = torch.tensor([f[2][1] for f in fitted], dtype=torch.float32)
        self.scores_ = ((self.v_a_.double() @ self.v_a_fin_.double()) * self.acc_a_.double()
                        + (self.v_b_.double() @ self.v_b_fin_.double()) * self.acc_b_.double()).float()
        order = sorted(range(len(sublayers)), key=lambda i: -float(self.scores_[i]))   # stable: ties keep order
        self.selected_ = [sublayers[i] for i in order[: int(self.l_select)]]
        return self

    def _split(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and validation indices: a seeded permutation within each (benign, answered) group, so both splits
        keep the class mix; every group keeps at least one training prompt."""
        g = torch.Generator().manual_seed(int(self.random_state))
        group = b.long() * 2 + a.long()
        train, val = [], []
        for k in range(4):
            idx = torch.nonzero(group == k).flatten()
            if len(idx) == 0:
                continue
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_val = min(round(float(self.validation_fraction) * len(idx)), len(idx) - 1)
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        train_idx, val_idx = torch.cat(train).sort().values, torch.cat(val).sort().values
        if len(val_idx) == 0:
            raise DataError(f"the validation split is empty ({len(b)} prompts, validation_fraction="
                            f"{self.validation_fraction})", hint="add prompts or raise validation_fraction")
        return train_idx, val_idx

    def _index(self, name: str) -> int:
        check_is_fitted(self, ("selected_", "v_a_"))
        if name not in self.selected_:
            raise DataError(f"{name!r} is not a selected sublayer (selected: {', '.join(self.selected_)})")
        return self.sublayers_.index(name)

    def project(self, name: str, o: torch.Tensor) -> torch.Tensor:
        """The runtime projection of a selected sublayer's output o [..., d] (see `project_answer`)."""
        i = self._index(name)
        return project_answer(o, self.v_a_[i], self.v_b_[i], float(self.sigma_a_[i]), float(self.sigma_b_[i]))

    def delta(self, name: str, weight_hf: torch.Tensor) -> torch.Tensor:
        """The delta [out, in] for a selected sublayer's Hugging Face output weight (see `weight_delta`)."""
        i = self._index(name)
        return weight_delta(weight_hf, self.v_a_[i], self.v_b_[i], float(self.sigma_a_[i]), float(self.sigma_b_[i]))
