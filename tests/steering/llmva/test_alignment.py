"""LLM-VA vector alignment: the weight edit equals the runtime projection and is the least-norm solution (checked
against a pseudo-inverse), the projection swaps only the answer component, SVMs recover planted directions, and
layer selection keeps the sublayers that agree with the final residual stream."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import DataError, NotFittedError
from gavel.steering.llmva.alignment import VectorAlignment, project_answer, svm_direction, weight_delta


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def random_edit(seed: int, d_out: int, d_in: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    v_a = unit(torch.randn(d_out, generator=g, dtype=torch.float64))
    v_b = unit(torch.randn(d_out, generator=g, dtype=torch.float64))
    x = torch.randn(5, d_in, generator=g, dtype=torch.float64)
    return W.to(dtype), v_a.to(dtype), v_b.to(dtype), x.to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(2, 12), d_in=st.integers(1, 12),
       sigma_a=st.floats(0.1, 10.0), sigma_b=st.floats(0.1, 10.0))
def test_weight_edit_equals_runtime_projection(seed, d_out, d_in, sigma_a, sigma_b):
    W, v_a, v_b, x = random_edit(seed, d_out, d_in)
    D = weight_delta(W, v_a, v_b, sigma_a, sigma_b)
    assert D.shape == W.shape and D.dtype == torch.float32
    close(x @ (W + D).T, project_answer(x @ W.T, v_a, v_b, sigma_a, sigma_b), 1e-4)
    # the defining equation in row convention: x (W + D) v_a == (sigma_a/sigma_b) x W v_b, with W = W_hf^T
    close(x @ (W + D).T @ v_a, sigma_a / sigma_b * (x @ W.T @ v_b), 1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(2, 8), d_in=st.integers(1, 8),
       sigma_a=st.floats(0.1, 10.0), sigma_b=st.floats(0.1, 10.0))
def test_weight_edit_is_rank_one_and_least_norm(seed, d_out, d_in, sigma_a, sigma_b):
    W, v_a, v_b, _ = random_edit(seed, d_out, d_in, torch.float64)
    D = weight_delta(W, v_a, v_b, sigma_a, sigma_b)
    assert D.dtype == torch.float64
    # columns along v_a: D_hf = v_a u^T
    torch.testing.assert_close(D - torch.outer(v_a, v_a @ D), torch.zeros_like(D), atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(D) <= 1
    # independent reference: the least-norm solution of the linear system D_hf^T v_a = t by pseudo-inverse
    t = sigma_a / sigma_b * (W.T @ v_b) - W.T @ v_a                              # [in]
    A = torch.zeros(d_in, d_out * d_in, dtype=torch.float64)                     # A @ D_hf.flatten() = D_hf^T v_a
    for j in range(d_in):
        A[j, torch.arange(d_out) * d_in + j] = v_a
    torch.testing.assert_close(D.flatten(), torch.linalg.pinv(A) @ t, atol=1e-9, rtol=1e-9)
    # any other solution D + E (E v_a = 0 in row convention) still solves it, with a larger norm
    g = torch.Generator().manual_seed(seed + 1)
    M = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    E = M - torch.outer(v_a, v_a @ M)
    torch.testing.assert_close((W + D + E).T @ v_a, sigma_a / sigma_b * (W.T @ v_b), atol=1e-9, rtol=1e-9)
    assert (D + E).norm() > D.norm()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(2, 16), sigma_a=st.floats(0.1, 10.0),
       sigma_b=st.floats(0.1, 10.0))
def test_projection_replaces_only_the_answer_component(seed, d, sigma_a, sigma_b):
    g = torch.Generator().manual_seed(seed)
    v_a, v_b = unit(torch.randn(d, generator=g)), unit(torch.randn(d, generator=g))
    o = torch.randn(3, 4, d, generator=g) * 5
    out = project_answer(o, v_a, v_b, sigma_a, sigma_b)
    assert out.shape == o.shape
    close(out @ v_a, sigma_a / sigma_b * (o @ v_b), 1e-4)
    perp = torch.eye(d) - torch.outer(v_a, v_a)
    close(out @ perp, o @ perp, 1e-4)


def test_projection_keeps_dtype_and_non_unit_directions_are_normalised():
    g = torch.Generator().manual_seed(0)
    v_a, v_b = unit(torch.randn(8, generator=g)), unit(torch.randn(8, generator=g))
    o = torch.randn(4, 8, generator=g)
    assert project_answer(o.bfloat16(), v_a, v_b, 1.0, 2.0).dtype == torch.bfloat16
    torch.testing.assert_close(project_answer(o, 3 * v_a, 0.5 * v_b, 1.0, 2.0), project_answer(o, v_a, v_b, 1.0, 2.0))
    W = torch.randn(8, 6, generator=g).bfloat16()
    assert weight_delta(W, v_a, v_b, 1.0, 2.0).dtype == torch.bfloat16
    with pytest.raises(DataError, match="sigma_b"):
        project_answer(o, v_a, v_b, 1.0, 0.0)
    with pytest.raises(DataError, match="output size"):
        weight_delta(torch.randn(6, 8), v_a, v_b, 1.0, 2.0)


def test_with_a_bias_edit_and_projection_differ_by_the_bias_components():
    W, v_a, v_b, x = random_edit(3, 8, 6, torch.float64)
    c = torch.randn(8, dtype=torch.float64)
    edited = x @ (W + weight_delta(W, v_a, v_b, 2.0, 3.0)).T + c
    runtime = project_answer(x @ W.T + c, v_a, v_b, 2.0, 3.0)
    expected = ((c @ v_a) - 2.0 / 3.0 * (c @ v_b)) * v_a
    torch.testing.assert_close(edited - runtime, expected.expand_as(edited), atol=1e-10, rtol=0)


def planted_classes(n: int, d: int, u: torch.Tensor, margin: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.5
    X = torch.where(y, 1.0, -1.0)[:, None] * margin * u + torch.randn(n, d, generator=g)
    return X, y


def test_svm_recovers_a_planted_direction():
    u = unit(torch.randn(32, generator=torch.Generator().manual_seed(7)))
    X, y = planted_classes(1000, 32, u, 3.0, seed=1)
    v, sigma = svm_direction(X, y, C=0.01, random_state=0)       # soft margin: separable data, C=1 overfits noise
    assert v.dtype == torch.float32 and v.shape == (32,)
    assert abs(float(v.norm()) - 1) < 1e-6
    assert float(v @ u) > 0.95                                     # positive class along +v
    assert sigma == pytest.approx(float(np.std(X.double().numpy() @ v.double().numpy())), rel=1e-9)
    X_test, y_test = planted_classes(1000, 32, u, 3.0, seed=2)
    assert float(((X_test @ v > 0) == y_test).float().mean()) > 0.99
    v_signed, _ = svm_direction(X, torch.where(y, 1, -1), C=0.01)          # signed labels work too
    torch.testing.assert_close(v_signed, v)
    v_flip, _ = svm_direction(X, ~y, C=0.01)
    assert float(v_flip @ u) < -0.95
    assert torch.equal(svm_direction(X, y, C=0.01, random_state=0)[0], v)  # deterministic


def test_svm_refuses_one_class_and_mismatched_labels():
    X = torch.randn(10, 4)
    with pytest.raises(DataError, match="one class"):
        svm_direction(X, torch.ones(10, dtype=torch.bool))
    with pytest.raises(DataError, match=r"expected \[10\]"):
        svm_direction(X, torch.ones(9, dtype=torch.bool))


D_MODEL, N = 32, 400
FINAL = "blocks.5.hook_resid_post"
PLANTED = ["blocks.1.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.4.hook_attn_out"]
PARTIAL = "blocks.3.hook_attn_out"


def layered(seed: int = 0):
    """Final stream: answered along e0, benign along e1. Planted sublayers carry the same directions; PARTIAL carries
    them tilted 45 degrees away; one carries orthogonal directions (accurate, unaligned), one anti-aligned ones, one
    pure noise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, generator=g) < 0.5
    b = torch.rand(N, generator=g) < 0.6
    e = torch.eye(D_MODEL)
    sa, sb = torch.where(a, 1.0, -1.0)[:, None], torch.where(b, 1.0, -1.0)[:, None]

    def site(dir_a, dir_b, margin=3.0):
        return margin * (sa * dir_a + sb * dir_b) + torch.randn(N, D_MODEL, generator=g)

    feats = {
        "blocks.0.hook_attn_out": site(e[2], e[3]),
        "blocks.0.hook_mlp_out": torch.randn(N, D_MODEL, generator=g) * 2,
        PLANTED[0]: site(e[0], e[1]),
        "blocks.1.hook_mlp_out": site(-e[0], -e[1]),
        PLANTED[1]: site(e[0], e[1], 4.0),
        PARTIAL: site(unit(e[0] + e[4]), unit(e[1] + e[5])),
        PLANTED[2]: site(e[0], e[1], 2.5),
        FINAL: site(e[0], e[1]),
    }
    return feats, b, a


def test_layer_selection_keeps_the_planted_sublayers():
    feats, benign, answered = layered()
    va = VectorAlignment(l_select=3, C=0.01).fit(feats, benign, answered, final=FINAL)
    assert va.sublayers_ == [k for k in feats if k != FINAL]
    K = len(va.sublayers_)
    assert va.v_a_.shape == va.v_b_.shape == (K, D_MODEL) and va.v_a_.dtype == torch.float32
    for t in (va.sigma_a_, va.sigma_b_, va.acc_a_, va.acc_b_, va.scores_):
        assert t.shape == (K,) and t.dtype == torch.float32
    assert sorted(va.selected_) == sorted(PLANTED)
    assert float(va.v_a_fin_[0]) > 0.94 and float(va.v_b_fin_[1]) > 0.94
    # scores follow the formula, recomputed naively from the learned attributes
    for i in range(K):
        naive = (float(np.dot(va.v_a_fin_.numpy(), va.v_a_[i].numpy())) * float(va.acc_a_[i])
                 + float(np.dot(va.v_b_fin_.numpy(), va.v_b_[i].numpy())) * float(va.acc_b_[i]))
        assert float(va.scores_[i]) == pytest.approx(naive, abs=1e-5)
    ranked = sorted(range(K), key=lambda i: -float(va.scores_[i]))
    assert va.selected_ == [va.sublayers_[i] for i in ranked[:3]]   # in score order
    by_name = dict(zip(va.sublayers_, va.scores_.tolist()))
    assert all(by_name[p] > 1.7 for p in PLANTED)
    assert 1.0 < by_name[PARTIAL] < 1.6
    assert abs(by_name["blocks.0.hook_attn_out"]) < 0.3 and by_name["blocks.1.hook_mlp_out"] < -1.7
    acc = dict(zip(va.sublayers_, zip(va.acc_a_.tolist(), va.acc_b_.tolist())))
    assert min(acc[PLANTED[0]]) > 0.95 and max(acc["blocks.0.hook_mlp_out"]) < 0.75
    assert VectorAlignment(l_select=4, C=0.01).fit(feats, benign, answered, final=FINAL).selected_[3] == PARTIAL
    assert sorted(VectorAlignment(l_select=3).fit(feats, benign, answered, final=FINAL).selected_) == sorted(PLANTED)
    assert len(VectorAlignment(l_select=100).fit(feats, benign, answered, final=FINAL).selected_) == K


def test_estimator_project_and_delta_agree_and_refuse_unselected():
    feats, benign, answered = layered(1)
    va = VectorAlignment(l_select=3).fit(feats, benign, answered, final=FINAL)
    name = va.selected_[0]
    W = torch.randn(D_MODEL, 48, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 48)
    close(x @ (W + va.delta(name, W)).T, va.project(name, x @ W.T), 1e-4)
    with pytest.raises(DataError, match="not a selected sublayer"):
        va.project("blocks.0.hook_mlp_out", x @ W.T)
    with pytest.raises(NotFittedError):
        VectorAlignment().project(name, x @ W.T)


def test_save_load_round_trip(tmp_path):
    feats, benign, answered = layered(2)
    va = VectorAlignment(l_select=2, C=0.5, validation_fraction=0.25, random_state=3)
    va.fit(feats, benign, answered, final=FINAL)
    back = VectorAlignment.load(va.save(tmp_path / "va"))
    assert back.get_params() == va.get_params()
    learned = {k: v for k, v in vars(va).items() if k.endswith("_")}
    assert set(learned) == {k for k in vars(back) if k.endswith("_")}
    for k, v in learned.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(getattr(back, k), v), k
        else:
            assert getattr(back, k) == v, k
    o = torch.randn(5, D_MODEL)
    assert torch.equal(back.project(va.selected_[1], o), va.project(va.selected_[1], o))


def test_fit_is_deterministic():
    feats, benign, answered = layered(4)
    one = VectorAlignment(l_select=3, random_state=5).fit(feats, benign, answered, final=FINAL)
    two = VectorAlignment(l_select=3, random_state=5).fit(feats, benign, answered, final=FINAL)
    assert torch.equal(one.v_a_, two.v_a_) and torch.equal(one.acc_b_, two.acc_b_) and one.selected_ == two.selected_


def test_fit_refuses_bad_data():
    feats, benign, answered = layered()
    with pytest.raises(DataError, match="benign labels hold one class"):
        VectorAlignment().fit(feats, torch.ones(N, dtype=torch.bool), answered, final=FINAL)
    with pytest.raises(DataError, match="answered labels hold one class"):
        VectorAlignment().fit(feats, benign, torch.zeros(N, dtype=torch.bool), final=FINAL)
    with pytest.raises(DataError, match=r"expected \[400\]"):
        VectorAlignment().fit(feats, benign[:-1], answered, final=FINAL)
    short = dict(feats, **{PLANTED[0]: feats[PLANTED[0]][:-1]})
    with pytest.raises(DataError, match="same prompts"):
        VectorAlignment().fit(short, benign, answered, final=FINAL)
    narrow = dict(feats, **{PLANTED[0]: feats[PLANTED[0]][:, :-1]})
    with pytest.raises(DataError, match="model width"):
        VectorAlignment().fit(narrow, benign, answered, final=FINAL)
    with pytest.raises(DataError, match="final key"):
        VectorAlignment().fit(feats, benign, answered, final="blocks.9.hook_resid_post")
    with pytest.raises(DataError, match="only the final key"):
        VectorAlignment().fit({FINAL: feats[FINAL]}, benign, answered, final=FINAL)
    with pytest.raises(DataError, match="validation_fraction"):
        VectorAlignment(validation_fraction=0.0).fit(feats, benign, answered, final=FINAL)
    with pytest.raises(DataError, match="l_select"):
        VectorAlignment(l_select=0).fit(feats, benign, answered, final=FINAL)
    tiny = {k: v[:4] for k, v in feats.items()}
    with pytest.raises(DataError, match="validation split is empty"):
        VectorAlignment(validation_fraction=0.1).fit(tiny, torch.tensor([True, True, False, False]),
                                                     torch.tensor([True, False, True, False]), final=FINAL)
