"""Steering geometry checked against closed forms: orthogonality, group laws, Givens rotations in a completed
frame, scikit-learn's PCA, naive loops over candidates, and planted planes and classes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from gavel.errors import DataError
from gavel.steering.selective.geometry import (
    ablate_direction,
    add_direction,
    angular_steer,
    candidate_directions,
    discriminative,
    orthonormal_basis,
    project_out,
    projection_means,
    rotate_in_plane,
    rotation_2d,
    steering_plane,
)

dims = st.integers(2, 24)
seeds = st.integers(0, 2**31 - 1)
angles = st.floats(-720, 720, allow_nan=False, allow_infinity=False)
property_settings = settings(max_examples=40, deadline=None)


def random_plane(d, generator, dtype=torch.float32):
    """A random [d, 2] basis with orthonormal columns (QR of a Gaussian matrix)."""
    return torch.linalg.qr(torch.randn(d, 2, generator=generator, dtype=torch.float64)).Q.to(dtype)


def givens_reference(basis, theta_degrees):
    """The [d, d] rotation by theta in the plane of basis, built independently: complete (b1, b2) to an
    orthonormal frame Q of R^d and rotate the first two frame coordinates, Q diag(R_theta, I) Q^T (float64)."""
    basis = basis.double()
    d = basis.shape[0]
    frame = torch.linalg.qr(torch.cat([basis, torch.randn(d, d, dtype=torch.float64)], dim=1)).Q[:, :d].clone()
    frame[:, :2] = basis                      # QR may flip the first columns' signs; they span the same plane
    radians = math.radians(theta_degrees)
    block = torch.eye(d, dtype=torch.float64)
    block[:2, :2] = torch.tensor([[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]],
                                 dtype=torch.float64)
    return frame @ block @ frame.T


def out_of_plane(h, basis):
    """(I - P) h for an orthonormal basis, computed in float64."""
    h, basis = h.double(), basis.double()
    return h - (h @ basis) @ basis.T


def principal_cosines(a, b):
    """Cosines of the principal angles between the column spans of two orthonormal [d, 2] bases."""
    return torch.linalg.svdvals(a.double().T @ b.double())


# ---- rotation (Selective Steering) ----


def test_rotation_2d_is_counter_clockwise_in_degrees():
    assert torch.allclose(rotation_2d(90.0), torch.tensor([[0.0, -1.0], [1.0, 0.0]]), atol=1e-7)
    assert torch.allclose(rotation_2d(30.0, dtype=torch.float64) @ torch.tensor([1.0, 0.0], dtype=torch.float64),
                          torch.tensor([math.sqrt(3) / 2, 0.5], dtype=torch.float64), atol=1e-15)
    batch = rotation_2d(torch.tensor([[0.0, 90.0], [180.0, 270.0]]))
    assert batch.shape == (2, 2, 2, 2)
    assert torch.allclose(batch[1, 1], torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), atol=1e-6)
    assert torch.equal(rotation_2d(0.0), torch.eye(2)) and torch.equal(rotation_2d(torch.tensor(360.0)), torch.eye(2))


@property_settings
@given(d=dims, seed=seeds, theta=angles)
def test_rotation_preserves_inner_products_and_norms(d, seed, theta):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(5, d, generator=g) * torch.rand(5, 1, generator=g) * 10
    out = rotate_in_plane(h, random_plane(d, g), theta)
    norms = h.double().norm(dim=1)
    scale = norms[:, None] * norms[None, :]
    assert ((out.double() @ out.double().T - h.double() @ h.double().T).abs() <= 1e-5 * scale).all()
    assert torch.allclose(out.double().norm(dim=1), norms, rtol=1e-5, atol=0)


@property_settings
@given(d=dims, seed=seeds, theta=angles)
def test_rotation_matches_givens_rotation_in_a_completed_frame(d, seed, theta):
    g = torch.Generator().manual_seed(seed)
    basis = random_plane(d, g, torch.float64)
    h = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    assert torch.allclose(rotate_in_plane(h, basis, theta), h @ givens_reference(basis, theta).T,
                          rtol=0, atol=1e-12)


def test_rotation_by_zero_is_exactly_identity():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 7, 16, generator=g)
    assert torch.equal(rotate_in_plane(h, random_plane(16, g), 0.0), h)
    assert torch.equal(rotate_in_plane(h.bfloat16(), random_plane(16, g), 0.0), h.bfloat16())
    assert torch.allclose(rotate_in_plane(h, random_plane(16, g), 360.0), h, atol=1e-6)


@property_settings
@given(d=dims, seed=seeds, a=angles, b=angles)
def test_rotation_inverse_and_composition(d, seed, a, b):
    g = torch.Generator().manual_seed(seed)
    basis = random_plane(d, g)
    h = torch.randn(6, d, generator=g)
    atol = 1e-5 * h.norm(dim=1, keepdim=True)
    assert ((rotate_in_plane(rotate_in_plane(h, basis, a), basis, -a) - h).abs() <= atol).all()
    assert ((rotate_in_plane(rotate_in_plane(h, basis, a), basis, b) - rotate_in_plane(h, basis, a + b)).abs()
            <= atol).all()


def test_rotation_takes_b1_to_b2_at_90_and_to_minus_b1_at_180():
    basis = random_plane(12, torch.Generator().manual_seed(2), torch.float64)
    b1, b2 = basis.T
    assert torch.allclose(rotate_in_plane(b1, basis, 90.0), b2, atol=1e-15)
    assert torch.allclose(rotate_in_plane(b1, basis, 180.0), -b1, atol=1e-15)
    assert torch.allclose(rotate_in_plane(b2, basis, 90.0), -b1, atol=1e-15)
    assert torch.allclose(rotate_in_plane(b1, basis, 40.0),
                          math.cos(math.radians(40)) * b1 + math.sin(math.radians(40)) * b2, atol=1e-15)


@property_settings
@given(d=dims, seed=seeds, theta=angles)
def test_rotation_leaves_out_of_plane_component_untouched(d, seed, theta):
    g = torch.Generator().manual_seed(seed)
    basis = random_plane(d, g)
    h = torch.randn(8, d, generator=g)
    out = rotate_in_plane(h, basis, theta)
    assert torch.allclose(out_of_plane(out, basis), out_of_plane(h, basis), atol=1e-5)
    in_plane = h.double() @ basis.double()
    assert torch.allclose((out.double() @ basis.double()).norm(dim=1), in_plane.norm(dim=1), atol=1e-5)


def test_per_sequence_and_per_token_theta_match_separate_calls():
    g = torch.Generator().manual_seed(3)
    basis = random_plane(10, g)
    h = torch.randn(3, 5, 10, generator=g)
    per_sequence = torch.tensor([[0.0], [45.0], [-200.0]])
    out = rotate_in_plane(h, basis, per_sequence)
    for b in range(3):
        assert torch.allclose(out[b], rotate_in_plane(h[b], basis, float(per_sequence[b, 0])), atol=1e-6)
    per_token = torch.rand(3, 5, generator=g) * 360
    out = rotate_in_plane(h, basis, per_token)
    for b in range(3):
        for t in range(5):
            assert torch.allclose(out[b, t], rotate_in_plane(h[b, t], basis, float(per_token[b, t])), atol=1e-5)
    assert torch.allclose(rotate_in_plane(h, basis, torch.tensor(30.0)), rotate_in_plane(h, basis, 30.0), atol=1e-6)


def test_bad_theta_and_basis_shapes_are_rejected():
    h = torch.randn(3, 5, 10)
    basis = random_plane(10, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"theta_degrees of shape \[3\] does not broadcast"):
        rotate_in_plane(h, basis, torch.zeros(3))
    with pytest.raises(ValueError, match="does not broadcast"):
        angular_steer(h, basis, torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match=r"basis must be \[d, 2\] = \[10, 2\]"):
        rotate_in_plane(h, basis.T, 10.0)
    with pytest.raises(TypeError, match="floating-point"):
        rotate_in_plane(h.long(), basis, 10.0)


# ---- dtype policy ----


def exactly_representable_plane(generator):
    """An orthonormal [64, 2] basis exact in bf16 and fp16: b1 = all 1/8, b2 = +-1/8 with 32 of each sign."""
    signs = torch.ones(64)
    signs[torch.randperm(64, generator=generator)[:32]] = -1
    return torch.stack([torch.ones(64), signs], dim=1) / 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rotation_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(5)
    theta = 37.0
    basis = exactly_representable_plane(g).to(dtype)
    h = (torch.randn(32, 64, generator=g) * 4).to(dtype)
    out = rotate_in_plane(h, basis, theta)
    assert out.dtype == dtype
    exact = h.double() @ givens_reference(basis, theta).T
    # One rounding to `dtype` plus float32 noise (~1e-7 of the scale); `dtype` arithmetic errs by ~1e-3 of it.
    tolerance = torch.finfo(dtype).eps / 2 * exact.abs() + 1e-5 * h.double().abs().max()
    assert ((out.double() - exact).abs() <= tolerance).all()
    # The bound has teeth: the same closed form evaluated in `dtype` itself misses it.
    coords = h @ basis
    cos, sin = (torch.tensor(f(math.radians(theta)), dtype=dtype) for f in (math.cos, math.sin))
    rotated = torch.stack([cos * coords[:, 0] - sin * coords[:, 1], sin * coords[:, 0] + cos * coords[:, 1]], dim=1)
    naive = h + (rotated - coords) @ basis.T
    assert not ((naive.double() - exact).abs() <= tolerance).all()


def test_float64_stays_float64():
    g = torch.Generator().manual_seed(6)
    basis = random_plane(20, g, torch.float64)
    h = torch.randn(4, 20, generator=g, dtype=torch.float64)
    out = rotate_in_plane(h, basis, 123.0)
    assert out.dtype == torch.float64
    assert torch.allclose(out, h @ givens_reference(basis, 123.0).T, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("edit", ["rotate", "angular", "adaptive", "add", "ablate"])
def test_edits_return_the_input_dtype(dtype, edit):
    g = torch.Generator().manual_seed(7)
    basis = random_plane(8, g)
    h = torch.randn(2, 3, 8, generator=g).to(dtype)
    out = {
        "rotate": lambda: rotate_in_plane(h, basis, 20.0),
        "angular": lambda: angular_steer(h, basis, 20.0),
        "adaptive": lambda: angular_steer(h, basis, 20.0, adaptive=True),
        "add": lambda: add_direction(h, basis[:, 0], 2.0),
        "ablate": lambda: ablate_direction(h, basis[:, 0]),
    }[edit]()
    assert out.dtype == dtype and out.shape == h.shape


# ---- Angular Steering ----


@property_settings
@given(d=dims, seed=seeds, theta=angles)
def test_angular_steer_sets_absolute_angle_and_keeps_in_plane_norm(d, seed, theta):
    g = torch.Generator().manual_seed(seed)
    basis = random_plane(d, g, torch.float64)
    h = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    out = angular_steer(h, basis, theta)
    in_norm = (h @ basis).norm(dim=-1)
    radians = math.radians(theta)
    expected = in_norm[..., None] * torch.tensor([math.cos(radians), math.sin(radians)], dtype=torch.float64)
    assert torch.allclose(out @ basis, expected, atol=1e-12)
    assert torch.allclose(out_of_plane(out, basis), out_of_plane(h, basis), atol=1e-12)


def test_angular_steer_is_not_the_identity_at_zero():
    """Unlike the rotation, theta = 0 moves every in-plane component onto b1 (the standard variant by design)."""
    basis = random_plane(6, torch.Generator().manual_seed(8), torch.float64)
    b1, b2 = basis.T
    h = 2.0 * (math.cos(math.radians(60)) * b1 + math.sin(math.radians(60)) * b2)
    assert torch.allclose(angular_steer(h, basis, 0.0), 2.0 * b1, atol=1e-14)
    assert not torch.allclose(angular_steer(h, basis, 0.0), h, atol=1e-3)
    assert torch.allclose(angular_steer(h, basis, 60.0), h, atol=1e-14)


def test_adaptive_angular_steer_leaves_non_positive_b1_rows_unchanged():
    g = torch.Generator().manual_seed(9)
    basis = random_plane(12, g)
    h = torch.randn(40, 12, generator=g)
    out = angular_steer(h, basis, 75.0, adaptive=True)
    positive = (h.double() @ basis[:, 0].double()) > 0
    assert 0 < positive.sum() < len(h)
    assert torch.equal(out[~positive], h[~positive])
    assert torch.allclose(out[positive], angular_steer(h[positive], basis, 75.0), atol=1e-6)
    axes = torch.eye(12)[:, [3, 7]]                         # <h, b1> = h[3] exactly: test the boundary itself
    h[:2, 3] = torch.tensor([0.0, -0.0])
    assert torch.equal(angular_steer(h[:2], axes, 75.0, adaptive=True), h[:2])


# ---- activation addition and directional ablation ----


@property_settings
@given(d=dims, seed=seeds, scale=st.floats(1e-3, 1e3))
def test_ablation_removes_the_component_idempotently_and_spares_orthogonal_vectors(d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g) * scale
    unit = direction.double() / direction.double().norm()
    h = torch.randn(3, 4, d, generator=g)
    once = ablate_direction(h, direction)
    assert ((once.double() @ unit).abs() <= 1e-5 * h.double().norm(dim=-1)).all()
    assert torch.allclose(ablate_direction(once, direction), once, atol=1e-5)
    assert torch.allclose(ablate_direction(h, -direction), once, atol=1e-6)
    orthogonal = out_of_plane(h, unit[:, None]).float()
    assert torch.allclose(ablate_direction(orthogonal, direction), orthogonal, atol=1e-5)


def test_ablation_rejects_a_zero_direction():
    with pytest.raises(DataError, match="direction is zero"):
        ablate_direction(torch.randn(2, 4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"direction must be \[d\] = \[4\]"):
        ablate_direction(torch.randn(2, 4), torch.ones(5))


def test_addition_adds_exactly():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 4        # dyadic values: sums are exact
    vector = torch.tensor([1.0, -0.5, 0.25, 2.0])
    assert torch.equal(add_direction(h, vector, 3.0), h + torch.tensor([3.0, -1.5, 0.75, 6.0]))
    per_sequence = torch.tensor([[2.0], [-1.0]])
    out = add_direction(h, vector, per_sequence)
    assert torch.equal(out[0], h[0] + 2 * vector) and torch.equal(out[1], h[1] - vector)
    assert torch.equal(add_direction(h.bfloat16(), vector, 3.0), (h + 3 * vector).bfloat16())


# ---- candidates, plane and discriminative sites ----


def test_candidate_directions_are_unit_class_mean_differences():
    g = torch.Generator().manual_seed(10)
    mean_pos, mean_neg = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    candidates = candidate_directions(mean_pos, mean_neg)
    assert candidates.shape == (5, 9) and candidates.dtype == torch.float32
    assert torch.allclose(candidates.norm(dim=1), torch.ones(5), atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(candidates, mean_pos - mean_neg, dim=1)
    assert torch.allclose(cosine, torch.ones(5), atol=1e-6)
    assert candidate_directions(mean_pos.double(), mean_neg.double()).dtype == torch.float64


def test_candidate_directions_name_the_degenerate_row():
    mean_pos, mean_neg = torch.randn(4, 6), torch.randn(4, 6)
    mean_neg[2] = mean_pos[2]
    with pytest.raises(DataError, match=r"candidate direction 2 is undefined: mean_pos\[2\] - mean_neg\[2\] is zero"):
        candidate_directions(mean_pos, mean_neg)
    mean_neg[2, 0] = float("nan")
    with pytest.raises(DataError, match=r"candidate direction 2 .* is not finite"):
        candidate_directions(mean_pos, mean_neg)
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        candidate_directions(mean_pos, mean_neg[:3])


@property_settings
@given(k=st.integers(2, 9), d=st.integers(3, 16), seed=seeds)
def test_steering_plane_b1_is_the_most_central_candidate(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    candidates = torch.randn(k, d, generator=g, dtype=torch.float64) + torch.randn(d, generator=g,
                                                                                   dtype=torch.float64)
    plane = steering_plane(candidates)
    mean_cosines = []
    for i in range(k):
        others = [torch.nn.functional.cosine_similarity(candidates[i], candidates[j], dim=0)
                  for j in range(k) if j != i]
        mean_cosines.append(sum(others) / len(others))
    best = max(range(k), key=lambda i: mean_cosines[i])
    chosen = [i for i in range(k) if torch.allclose(plane[:, 0], candidates[i] / candidates[i].norm(), atol=1e-12)]
    assert len(chosen) == 1 and mean_cosines[chosen[0]] >= mean_cosines[best] - 1e-12
    assert torch.allclose(plane.T @ plane, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_steering_plane_matches_sklearn_pca_gram_schmidt():
    """b2 is sklearn's (centred, sign-fixed) first component, Gram-Schmidt'ed against b1: sign included."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        candidates = torch.randn(7, 11, generator=g, dtype=torch.float64)
        units = candidates / candidates.norm(dim=1, keepdim=True)
        plane = steering_plane(candidates)
        b1 = plane[:, 0]
        component = torch.from_numpy(PCA(n_components=1).fit(units.numpy()).components_[0])
        residual = component - (component @ b1) * b1
        assert torch.allclose(plane[:, 1], residual / residual.norm(), atol=1e-10)


def test_steering_plane_recovers_a_planted_plane():
    g = torch.Generator().manual_seed(11)
    d, k = 64, 24
    planted = random_plane(d, g, torch.float64)
    spread = torch.deg2rad(torch.linspace(-10.0, 110.0, k, dtype=torch.float64))
    in_plane = torch.stack([spread.cos(), spread.sin()], dim=1) @ planted.T
    candidates = in_plane + 1e-3 * torch.randn(k, d, generator=g, dtype=torch.float64)   # |noise| ~ 0.008
    plane = steering_plane(candidates.float())
    assert plane.shape == (d, 2) and plane.dtype == torch.float32
    assert torch.allclose(plane.T @ plane, torch.eye(2), atol=1e-6)
    principal_angles = torch.rad2deg(torch.arccos(principal_cosines(plane, planted).clamp(max=1)))
    assert (principal_angles < 1.0).all()


@pytest.mark.parametrize("case", ["one", "flat", "identical", "parallel", "zero_row"])
def test_steering_plane_rejects_too_few_or_degenerate_candidates(case):
    e = torch.eye(5)
    if case in ("one", "flat"):
        with pytest.raises(ValueError, match="K >= 2"):
            steering_plane(e[:1] if case == "one" else e[0])
    elif case == "identical":
        with pytest.raises(DataError, match="all the same"):
            steering_plane(torch.stack([e[1]] * 4) * torch.tensor([[1.0], [2.0], [3.0], [0.5]]))
    elif case == "parallel":                  # the centred candidates vary only along b1
        with pytest.raises(DataError, match="first principal component lies along b1"):
            steering_plane(torch.stack([e[0], e[0], -e[0]]))
    else:
        with pytest.raises(DataError, match=r"candidates\[1\] is zero"):
            steering_plane(torch.stack([e[0], torch.zeros(5), e[2]]))


def test_orthonormal_basis_is_gram_schmidt_keeping_b2_side():
    b1 = torch.tensor([2.0, 0.0, 0.0])
    basis = orthonormal_basis(b1, torch.tensor([3.0, -4.0, 0.0]))
    assert torch.allclose(basis, torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))
    g = torch.Generator().manual_seed(13)
    for _ in range(20):                  # float32, sine ~1e-3: one Gram-Schmidt pass leaves |<b1, b2>| ~ 1e-4
        u = torch.randn(256, generator=g)
        nearly_parallel = orthonormal_basis(u, u / u.norm() + 6e-5 * torch.randn(256, generator=g))
        assert torch.allclose(nearly_parallel.T @ nearly_parallel, torch.eye(2), atol=1e-6)
    with pytest.raises(DataError, match="b2 is parallel to b1"):
        orthonormal_basis(b1, torch.tensor([-1.0, 1e-6, 0.0]))
    with pytest.raises(DataError, match="b1 is zero"):
        orthonormal_basis(torch.zeros(3), b1)


def planted_classes(site_signs, n=30, d=16, seed=12):
    """Per site, positives and negatives offset along b1 by the given signs, plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    b1 = random_plane(d, g)[:, 0]
    signs = torch.tensor(site_signs, dtype=torch.float32)             # [K, 2]: (positive class, negative class)
    h_pos = 3 * signs[:, 0, None, None] * b1 + torch.randn(len(signs), n, d, generator=g)
    h_neg = 3 * signs[:, 1, None, None] * b1 + torch.randn(len(signs), n + 7, d, generator=g)
    return h_pos, h_neg, b1


def test_projection_means_are_class_means_of_cosines_per_site():
    h_pos, h_neg, b1 = planted_classes([(1, -1), (1, 1)])
    mu_pos, mu_neg = projection_means(h_pos, h_neg, 5 * b1)
    assert mu_pos.shape == mu_neg.shape == (2,)
    for site in range(2):
        for h, mu in ((h_pos[site], mu_pos[site]), (h_neg[site], mu_neg[site])):
            naive = sum(float(row @ b1 / row.norm()) for row in h) / len(h)
            assert abs(float(mu) - naive) < 1e-5
    single_pos, single_neg = projection_means(h_pos[0], h_neg[0], b1)
    assert single_pos.shape == () and torch.allclose(single_pos, mu_pos[0]) and torch.allclose(single_neg, mu_neg[0])


def test_discriminative_selects_only_opposite_sign_sites():
    h_pos, h_neg, b1 = planted_classes([(1, -1), (1, 1), (-1, 1), (-1, -1)])
    selected = discriminative(*projection_means(h_pos, h_neg, b1))
    assert selected.dtype == torch.bool and selected.tolist() == [True, False, True, False]
    assert discriminative(torch.tensor([1e-30, 0.0]), torch.tensor([-1e-30, -1.0])).tolist() == [True, False]


def test_projection_means_reject_bad_activations():
    h_pos, h_neg, b1 = planted_classes([(1, -1)])
    h_neg[0, 4] = 0
    with pytest.raises(DataError, match=r"h_neg\[0, 4\] has zero norm"):
        projection_means(h_pos, h_neg, b1)
    with pytest.raises(ValueError, match="same leading dims"):
        projection_means(h_pos, h_neg[0], b1)


def test_project_out_is_ablation_along_a_unit_vector():
    """The unchecked per-forward form equals the checked one for a unit direction, in every dtype it serves."""
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(24, generator=g)
    unit = direction / direction.norm()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        h = torch.randn(3, 7, 24, generator=g).to(dtype)
        assert project_out(h, unit).dtype == dtype
        torch.testing.assert_close(project_out(h, unit), ablate_direction(h, direction))
