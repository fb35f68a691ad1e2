"""AdaRAS reasoning-critical neurons: scores and trace means equal naive loops, the polarity filter keeps planted
sign-flipping neurons and rejects same-sign ones with a larger difference, the top k is global across layers with
deterministic ties, steering adds exactly alpha S' at kept neurons, the random control keeps per-layer counts, and
the estimator round-trips through save/load."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import DataError, NotFittedError
from gavel.steering.adaras.neurons import ReasoningNeurons, neuron_scores, top_k_mask, trace_means

SITES = [f"blocks.{i}.mlp.hook_post" for i in range(3)]


def planted(seed: int = 0, pairs: int = 40, m: int = 16, noise: float = 0.1):
    """Per-site trace means {site: [P, m]}: flip neurons (+1 correct, -1 incorrect: S = 2) and same-sign neurons
    (+4 vs +1: S = 3, a larger difference) planted on top of zero-mean noise."""
    g = torch.Generator().manual_seed(seed)
    flip = {SITES[0]: [2, 5], SITES[1]: [7], SITES[2]: [0, 11]}
    same = {SITES[0]: [9], SITES[1]: [3, 4], SITES[2]: [6]}
    pos, neg = {}, {}
    for site in SITES:
        c = noise * torch.randn(pairs, m, generator=g)
        i = noise * torch.randn(pairs, m, generator=g)
        c[:, flip[site]] += 1.0
        i[:, flip[site]] -= 1.0
        c[:, same[site]] += 4.0
        i[:, same[site]] += 1.0
        pos[site], neg[site] = c, i
    return pos, neg, flip, same


def as_set(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(ix) for ix in mask.nonzero().tolist()}


def cells(plan: dict[str, list[int]]) -> set[tuple[int, int]]:
    return {(SITES.index(s), i) for s, ix in plan.items() for i in ix}


def test_polarity_keeps_flipping_neurons_and_rejects_same_sign():
    pos, neg, flip, same = planted()
    est = ReasoningNeurons(k=5).fit(pos, neg)
    assert as_set(est.kept_) == cells(flip)
    assert as_set(est.polarity_) >= cells(flip) and not (as_set(est.polarity_) & cells(same))
    assert all(abs(float(est.scores_[c]) - 2.0) < 0.2 for c in cells(flip))
    assert all(abs(float(est.scores_[c]) - 3.0) < 0.2 for c in cells(same))   # larger |S|, still rejected
    on = ReasoningNeurons(k=3).fit(pos, neg)
    assert as_set(on.kept_) < cells(flip) and int(on.kept_.sum()) == 3


def test_polarity_false_keeps_same_sign_neurons_ranked_by_abs_score():
    pos, neg, flip, same = planted()
    top = ReasoningNeurons(k=len(cells(same)), polarity=False).fit(pos, neg)
    assert as_set(top.kept_) == cells(same)
    both = ReasoningNeurons(k=len(cells(same)) + len(cells(flip)), polarity=False).fit(pos, neg)
    assert as_set(both.kept_) == cells(same) | cells(flip)
    assert top.polarity_.equal(ReasoningNeurons(k=1).fit(pos, neg).polarity_)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), P=st.integers(1, 6), L=st.integers(1, 4), m=st.integers(1, 7))
def test_scores_equal_naive_loop(seed, P, L, m):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(P, L, m, generator=g, dtype=torch.float64)
    i = torch.randn(P, L, m, generator=g, dtype=torch.float64)
    S, ok = neuron_scores(c, i)
    for layer in range(L):
        for n in range(m):
            diffs = [float(c[p, layer, n]) - float(i[p, layer, n]) for p in range(P)]
            assert abs(float(S[layer, n]) - sum(diffs) / P) < 1e-12
            mc = sum(float(c[p, layer, n]) for p in range(P)) / P
            mi = sum(float(i[p, layer, n]) for p in range(P)) / P
            assert bool(ok[layer, n]) == ((mc > 0 and mi < 0) or (mc < 0 and mi > 0))


def test_zero_mean_has_no_sign():
    c = torch.tensor([[[1.0, 0.0, -2.0, 1.0]]])
    i = torch.tensor([[[0.0, -1.0, 3.0, 2.0]]])
    S, ok = neuron_scores(c, i)
    assert ok.tolist() == [[False, False, True, False]]
    assert S.tolist() == [[1.0, 1.0, -5.0, -1.0]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), m=st.integers(1, 5))
def test_trace_means_equal_per_trace_loop(seed, lengths, m):
    g = torch.Generator().manual_seed(seed)
    traces = [torch.randn(t, m, generator=g).to(torch.bfloat16) for t in lengths]
    got = trace_means(traces)
    assert got.shape == (len(lengths), m) and got.dtype == torch.float64
    for j, t in enumerate(traces):
        for n in range(m):
            want = sum(float(t[r, n]) for r in range(t.shape[0])) / t.shape[0]
            assert abs(float(got[j, n]) - want) < 1e-12


def test_trace_means_errors_name_the_trace():
    with pytest.raises(DataError, match="trace 1 is empty"):
        trace_means([torch.ones(2, 3), torch.ones(0, 3)])
    with pytest.raises(DataError, match="trace 0 has shape"):
        trace_means([torch.ones(3)])
    with pytest.raises(DataError, match="trace 1 has 4 neurons"):
        trace_means([torch.ones(2, 3), torch.ones(2, 4)])
    with pytest.raises(DataError, match="no traces"):
        trace_means([])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), L=st.integers(1, 4), m=st.integers(1, 6), k=st.integers(1, 30),
       polarity=st.booleans(), ties=st.booleans())
def test_top_k_is_global_and_matches_naive_sort(seed, L, m, k, polarity, ties):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(3, L, m, generator=g)
    i = torch.randn(3, L, m, generator=g)
    if ties:                                                             # few distinct |S|: many exact ties
        c, i = c.round(), i.round()
    est = ReasoningNeurons(k=k, polarity=polarity).fit({f"blocks.{j}.mlp.hook_post": c[:, j] for j in range(L)},
                                                       {f"blocks.{j}.mlp.hook_post": i[:, j] for j in range(L)})
    S, ok = neuron_scores(c.double(), i.double())
    eligible = [(j, n) for j in range(L) for n in range(m) if ok[j, n] or not polarity]
    ranked = sorted(eligible, key=lambda ln: (-abs(float(S[ln].float())), ln))   # ties: lower (layer, neuron)
    assert as_set(est.kept_) == set(ranked[:k])
    assert int(est.kept_.sum()) == min(k, len(eligible))
    assert est.vectors_.equal(torch.where(est.kept_, est.scores_, torch.zeros_like(est.scores_)))
    assert est.scores_.dtype == torch.float32 and est.kept_.dtype == torch.bool


def test_ties_are_deterministic():
    scores = torch.tensor([[1.0, -2.0, 2.0], [2.0, -1.0, 0.5]])
    mask = top_k_mask(scores, torch.ones(2, 3, dtype=torch.bool), 2)
    assert as_set(mask) == {(0, 1), (0, 2)}                              # three tie at 2: lowest flat indices win
    assert top_k_mask(scores, torch.ones(2, 3, dtype=torch.bool), 2).equal(mask)


def test_k_larger_than_eligible_keeps_all_eligible():
    pos, neg, flip, _ = planted()
    est = ReasoningNeurons(k=10_000).fit(pos, neg)
    assert est.kept_.equal(est.polarity_)
    assert as_set(est.kept_) >= cells(flip)


def test_steer_adds_alpha_times_vector_at_kept_neurons_only():
    pos, neg, flip, _ = planted()
    est = ReasoningNeurons(k=5).fit(pos, neg)
    g = torch.Generator().manual_seed(1)
    for site in SITES:
        h = torch.randn(2, 3, 16, generator=g)
        out = est.steer(h, site, 0.25)
        delta = out - h
        layer = SITES.index(site)
        kept = est.kept_[layer]
        assert delta[..., ~kept].abs().max() == 0
        torch.testing.assert_close(delta[..., kept], (0.25 * est.scores_[layer, kept]).expand(2, 3, -1))
        assert set(kept.nonzero().flatten().tolist()) == set(flip[site])
        assert est.vector(site).equal(est.vectors_[layer])
    hb = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    out = est.steer(hb, SITES[0], 0.4)
    assert out.dtype == torch.bfloat16
    want = (hb.float() + 0.4 * est.vector(SITES[0])).to(torch.bfloat16)
    assert out.equal(want)
    with pytest.raises(DataError, match="not a fitted site"):
        est.steer(h, "blocks.9.mlp.hook_post", 0.1)
    with pytest.raises(DataError, match="neurons"):
        est.steer(torch.zeros(2, 15), SITES[0], 0.1)


def test_random_control_keeps_counts_and_magnitudes_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    pos = {s: torch.randn(10, 64, generator=g) for s in SITES}
    neg = {s: torch.randn(10, 64, generator=g) for s in SITES}
    est = ReasoningNeurons(k=12, polarity=False).fit(pos, neg)
    ctl = est.random_control(7)
    assert ctl.kept_.sum(1).equal(est.kept_.sum(1))
    assert not ctl.kept_.equal(est.kept_)
    assert ((ctl.vectors_ != 0) == ctl.kept_).all()
    assert sorted(ctl.vectors_[ctl.kept_].abs().tolist()) == sorted(est.scores_[est.kept_].abs().tolist())
    assert ctl.scores_.equal(est.scores_) and ctl.control_seed_ == 7 and est.control_seed_ is None
    again = est.random_control(7)
    assert again.kept_.equal(ctl.kept_) and again.vectors_.equal(ctl.vectors_)
    other = est.random_control(8)
    assert not (other.kept_.equal(ctl.kept_) and other.vectors_.equal(ctl.vectors_))
    assert est.kept_.equal(ReasoningNeurons(k=12, polarity=False).fit(pos, neg).kept_)   # original untouched
    signs = torch.sign(torch.cat([est.random_control(s).vectors_[est.random_control(s).kept_] for s in range(5)]))
    assert (signs > 0).any() and (signs < 0).any()


def test_save_load_round_trip(tmp_path):
    pos, neg, _, _ = planted()
    est = ReasoningNeurons(k=4, polarity=False).fit(pos, neg)
    back = ReasoningNeurons.load(est.save(tmp_path / "n"))
    assert back.get_params() == {"k": 4, "polarity": False}
    assert back.sites_ == est.sites_ and back.control_seed_ is None
    for name in ("scores_", "polarity_", "kept_", "vectors_"):
        assert getattr(back, name).equal(getattr(est, name)), name
    ctl = ReasoningNeurons.load(est.random_control(5).save(tmp_path / "c"))
    assert ctl.control_seed_ == 5 and ctl.vectors_.equal(est.random_control(5).vectors_)
    h = torch.randn(3, 16)
    assert back.steer(h, SITES[1], 0.3).equal(est.steer(h, SITES[1], 0.3))


def test_fit_errors():
    pos, neg, _, _ = planted()
    bad = dict(neg)
    bad[SITES[1]] = neg[SITES[1]][:-1]
    with pytest.raises(DataError, match="pairs"):
        ReasoningNeurons().fit(pos, bad)
    bad = dict(pos)
    bad[SITES[2]] = pos[SITES[2]][:-2]
    with pytest.raises(DataError, match="pairs"):
        ReasoningNeurons().fit(bad, neg)
    with pytest.raises(DataError, match=r"expected \[P, m\]"):
        ReasoningNeurons().fit({**pos, SITES[0]: pos[SITES[0]][None]}, neg)
    with pytest.raises(DataError, match=r"expected \[P, m\]"):
        ReasoningNeurons().fit(pos, {**neg, SITES[0]: neg[SITES[0]][0]})
    with pytest.raises(DataError, match="share one MLP width"):
        ReasoningNeurons().fit({**pos, SITES[1]: pos[SITES[1]][:, :8]}, {**neg, SITES[1]: neg[SITES[1]][:, :8]})
    with pytest.raises(DataError, match="same sites"):
        ReasoningNeurons().fit(pos, {s: neg[s] for s in SITES[:2]})
    with pytest.raises(DataError, match="NaN"):
        ReasoningNeurons().fit({**pos, SITES[0]: pos[SITES[0]] * float("nan")}, neg)
    with pytest.raises(DataError, match="positive int"):
        ReasoningNeurons(k=0).fit(pos, neg)
    with pytest.raises(DataError, match=r"expected \[P, L, m\]"):
        neuron_scores(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(DataError, match="differ"):
        neuron_scores(torch.zeros(2, 1, 3), torch.zeros(3, 1, 3))
    with pytest.raises(NotFittedError):
        ReasoningNeurons().vector(SITES[0])
    with pytest.raises(NotFittedError):
        ReasoningNeurons().random_control(0)
