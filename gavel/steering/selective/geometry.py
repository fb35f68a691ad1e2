"""The math of steering interventions: closed-form edits of activations, with no hooks or models.

Selective Steering (arXiv 2601.19375) rotates activations inside the plane of two orthonormal directions
(b1, b2), an orthogonal map that keeps norms and inner products; Angular Steering (arXiv 2510.26243) sets
the in-plane component to an absolute angle instead. Activation addition and directional ablation are the
one-direction edits. The plane is built from per-site difference-of-means candidates, and a site is worth
steering when the two classes project onto b1 with opposite signs.

Dtype policy: edits compute in float32 (float64 stays float64) and return the input dtype, so bf16/fp16
activations are not edited at low precision; calibration results (directions, plane, projection means)
come back in that compute dtype. Angles are in degrees; every edit works on any leading shape [..., d].
"""
from __future__ import annotations

import math

import torch

from gavel.errors import DataError

PerRow = float | torch.Tensor  # a float, or a tensor broadcasting over the activations' leading dims


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"steering math needs floating-point tensors, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _degenerate_tolerance(dtype: torch.dtype) -> float:
    """Below this (relative) size a vector is numerically zero for direction-finding: sqrt(eps)."""
    return torch.finfo(dtype).eps ** 0.5


def _as_compute(h: torch.Tensor) -> torch.Tensor:
    """h as [..., d] in its compute dtype."""
    if h.ndim == 0:
        raise ValueError("activations must have a feature dimension: shape [..., d], got a scalar")
    return h.to(_compute_dtype(h.dtype))


def _with_basis(h: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h in its compute dtype and basis [d, 2] moved to match it."""
    x = _as_compute(h)
    if basis.shape != (x.shape[-1], 2):
        raise ValueError(f"basis must be [d, 2] = [{x.shape[-1]}, 2] with columns (b1, b2), "
                         f"got {list(basis.shape)}")
    return x, basis.to(device=x.device, dtype=x.dtype)


def _vector_for(vector: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A [d] vector matching the feature dimension, dtype and device of x."""
    if vector.shape != (x.shape[-1],):
        raise ValueError(f"{name} must be [d] = [{x.shape[-1]}], got {list(vector.shape)}")
    return vector.to(device=x.device, dtype=x.dtype)


def _per_row(value: PerRow, x: torch.Tensor, name: str) -> PerRow:
    """A float, or a tensor checked to broadcast over x's leading dims (x.shape[:-1]) without growing them."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    leading = x.shape[:-1]
    try:
        fits = torch.broadcast_shapes(value.shape, leading) == leading
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {list(value.shape)} does not broadcast over the leading dims "
                         f"{list(leading)} of the activations")
    return value.to(x.device)


def _unit_rows(rows: torch.Tensor, label: str) -> torch.Tensor:
    """rows [K, d] scaled to unit length; a zero or non-finite row is a DataError naming it (label may use {k})."""
    norms = rows.norm(dim=-1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero()
    if len(bad):
        k = int(bad[0])
        problem = "is zero" if norms[k] == 0 else "is not finite"
        raise DataError(f"{label.format(k=k)} {problem}")
    return rows / norms[:, None]


def _apply_2x2(rotation: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """rotation [..., 2, 2] applied to coords [..., 2], elementwise so no TF32 matmul rounds the coordinates."""
    return (rotation * coords.unsqueeze(-2)).sum(-1)


def rotation_2d(theta_degrees: PerRow, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """R_theta = [[cos, -sin], [sin, cos]], counter-clockwise, theta in degrees: [2, 2], or [..., 2, 2] for
    a tensor of angles. Angles are reduced modulo 360 first, so large angles keep their precision."""
    if isinstance(theta_degrees, torch.Tensor):
        radians = torch.deg2rad(torch.remainder(theta_degrees.to(device=device, dtype=dtype), 360.0))
        cos, sin = radians.cos(), radians.sin()
    else:
        angle = math.radians(float(theta_degrees) % 360.0)
        cos, sin = (torch.tensor(value, dtype=dtype, device=device) for value in (math.cos(angle),
                                                                                   math.sin(angle)))
    return torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)


def rotate_in_plane(h: torch.Tensor, basis: torch.Tensor, theta_degrees: PerRow) -> torch.Tensor:
    """Selective Steering: h' = (I - P) h + [b1 b2] R_theta [b1 b2]^T h for basis [d, 2] with orthonormal
    columns (b1, b2), not re-checked here. theta: a float or a tensor broadcasting over h.shape[:-1]."""
    x, basis = _with_basis(h, basis)
    rotation = rotation_2d(_per_row(theta_degrees, x, "theta_degrees"), dtype=x.dtype, device=x.device)
    coords = x @ basis                                     # [..., 2]: (<h, b1>, <h, b2>)
    # h + B (R - I) B^T h is the same map; it leaves the out-of-plane part bit-exact and theta = 0 the identity.
    return (x + (_apply_2x2(rotation, coords) - coords) @ basis.T).to(h.dtype)


def angular_steer(h: torch.Tensor, basis: torch.Tensor, theta_degrees: PerRow,
                  adaptive: bool = False) -> torch.Tensor:
    """Angular Steering: h' = h - P h + |P h| (cos theta b1 + sin theta b2), the in-plane part set to the absolute
    angle theta (so not the identity at theta = 0). adaptive: only rows with <h, b1> > 0 change."""
    x, basis = _with_basis(h, basis)
    rotation = rotation_2d(_per_row(theta_degrees, x, "theta_degrees"), dtype=x.dtype, device=x.device)
    coords = x @ basis
    target = coords.norm(dim=-1, keepdim=True) * rotation[..., :, 0]   # R_theta e1 = (cos theta, sin theta)
    steered = (x + (target - coords) @ basis.T).to(h.dtype)
    return torch.where(coords[..., :1] > 0, steered, h) if adaptive else steered


def add_direction(h: torch.Tensor, vector: torch.Tensor, coefficient: PerRow) -> torch.Tensor:
    """Activation addition: h' = h + coefficient * vector (vector used as given, not normalised); coefficient is
    a float or a tensor broadcasting over h.shape[:-1]."""
    x = _as_compute(h)
    coefficient = _per_row(coefficient, x, "coefficient")
    if isinstance(coefficient, torch.Tensor):
        coefficient = coefficient.to(x.dtype).unsqueeze(-1)
    return (x + coefficient * _vector_for(vector, x, "vector")).to(h.dtype)


def ablate_direction(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Directional ablation: h' = h - <h, d> d with d = direction / |direction| (a zero direction is an error)."""
    x = _as_compute(h)
    return project_out(h, _unit_rows(_vector_for(direction, x, "direction")[None], "direction")[0])


def project_out(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """h - <h, u> u for a unit vector u, not re-checked: the per-forward path (checking the norm would make the
    host wait for the device at every hook call)."""
    x = _as_compute(h)
    unit = _vector_for(unit, x, "unit")
    return (x - (x @ unit).unsqueeze(-1) * unit).to(h.dtype)


def candidate_directions(mean_pos: torch.Tensor, mean_neg: torch.Tensor) -> torch.Tensor:
    """Per site k, d_k = normalize(mean_pos_k - mean_neg_k), from class means [K, d] to unit rows [K, d]."""
    if mean_pos.ndim != 2 or mean_pos.shape != mean_neg.shape:
        raise ValueError(f"mean_pos and mean_neg must both be [K, d], got {list(mean_pos.shape)} "
                         f"and {list(mean_neg.shape)}")
    dtype = _compute_dtype(torch.promote_types(mean_pos.dtype, mean_neg.dtype))
    difference = mean_pos.to(dtype) - mean_neg.to(device=mean_pos.device, dtype=dtype)
    return _unit_rows(difference, "candidate direction {k} is undefined: mean_pos[{k}] - mean_neg[{k}]")


def orthonormal_basis(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """[d, 2] with columns b1/|b1| and b2 Gram-Schmidt-orthogonalised against it, normalised (b2's side kept).
    A b2 (nearly) parallel to b1, sine of their angle below sqrt(eps), is a DataError: they span no plane."""
    if b1.ndim != 1 or b1.shape != b2.shape:
        raise ValueError(f"b1 and b2 must both be [d], got {list(b1.shape)} and {list(b2.shape)}")
    dtype = _compute_dtype(torch.promote_types(b1.dtype, b2.dtype))
    u1 = _unit_rows(b1.to(dtype)[None], "b1")[0]
    u2 = _unit_rows(b2.to(device=b1.device, dtype=dtype)[None], "b2")[0]
    residual = u2 - (u2 @ u1) * u1
    sine = residual.norm()
    if sine < _degenerate_tolerance(dtype):
        raise DataError(f"b2 is parallel to b1 (sine of their angle {float(sine):.1e}), so they span no plane")
    residual = residual - (residual @ u1) * u1             # second pass: "twice is enough" for orthogonality
    return torch.stack([u1, residual / residual.norm()], dim=1)


def steering_plane(candidates: torch.Tensor) -> torch.Tensor:
    """The steering plane [d, 2] from candidates [K >= 2, d] (rows normalised first): b1 = the candidate with the
    highest mean cosine to the others; b2 = their first principal component, Gram-Schmidt'ed against b1.

    The PCA centres the stacked candidates, as scikit-learn's PCA in the papers' code does, and fixes the
    component's sign the same way (largest-magnitude entry positive), so b2 does not flip with the SVD backend.
    """
    if candidates.ndim != 2 or candidates.shape[0] < 2:
        raise ValueError(f"steering_plane needs candidates [K, d] with K >= 2, got {list(candidates.shape)}")
    units = _unit_rows(candidates.to(_compute_dtype(candidates.dtype)), "candidates[{k}]")
    count = units.shape[0]
    mean_cosine_to_others = (units @ units.T).fill_diagonal_(0).sum(dim=1) / (count - 1)
    b1 = units[mean_cosine_to_others.argmax()]
    _, singular_values, right_vectors = torch.linalg.svd(units - units.mean(dim=0), full_matrices=False)
    if singular_values[0] < _degenerate_tolerance(units.dtype) * math.sqrt(count):
        raise DataError("degenerate steering plane: the candidate directions are all the same, so they have "
                        "no principal component")
    component = right_vectors[0]
    component = component * component[component.abs().argmax()].sign()
    try:
        return orthonormal_basis(b1, component)
    except DataError as error:
        raise DataError(f"degenerate steering plane: the candidates' first principal component lies along b1 "
                        f"({error})") from error


def _mean_cosine(h: torch.Tensor, unit: torch.Tensor, name: str) -> torch.Tensor:
    """Mean over the second-to-last dim of <h/|h|, unit>; a zero or non-finite activation is a DataError."""
    norms = h.norm(dim=-1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero()
    if len(bad):
        index = tuple(bad[0].tolist())
        raise DataError(f"{name}{list(index)} has {'zero' if norms[index] == 0 else 'non-finite'} norm, "
                        f"so its cosine to b1 is undefined")
    return ((h @ unit) / norms).mean(dim=-1)


def projection_means(h_pos: torch.Tensor, h_neg: torch.Tensor,
                     b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu_pos, mu_neg): each class's mean of <h/|h|, b1> (b1 normalised), per site: h_pos [..., N, d] and
    h_neg [..., M, d] with the same leading site dims give two tensors of shape [...]."""
    if h_pos.ndim < 2 or h_neg.ndim < 2 or h_pos.shape[:-2] != h_neg.shape[:-2] \
            or h_pos.shape[-1] != h_neg.shape[-1] or b1.shape != (h_pos.shape[-1],):
        raise ValueError(f"projection_means needs h_pos [..., N, d], h_neg [..., M, d] with the same leading dims "
                         f"and b1 [d], got {list(h_pos.shape)}, {list(h_neg.shape)} and {list(b1.shape)}")
    if h_pos.shape[-2] == 0 or h_neg.shape[-2] == 0:
        raise DataError(f"projection_means needs at least one activation per class, got {h_pos.shape[-2]} "
                        f"positive and {h_neg.shape[-2]} negative")
    dtype = _compute_dtype(torch.promote_types(h_pos.dtype, h_neg.dtype))
    unit = _unit_rows(b1.to(device=h_pos.device, dtype=dtype)[None], "b1")[0]
    return (_mean_cosine(h_pos.to(dtype), unit, "h_pos"),
            _mean_cosine(h_neg.to(device=h_pos.device, dtype=dtype), unit, "h_neg"))


def discriminative(mu_pos: torch.Tensor, mu_neg: torch.Tensor) -> torch.Tensor:
    """Sites whose classes project onto b1 with opposite signs (mu_pos * mu_neg < 0), as a bool tensor.
    Compared by sign, so a product that underflows to zero still counts."""
    return torch.sign(mu_pos) * torch.sign(mu_neg) < 0
