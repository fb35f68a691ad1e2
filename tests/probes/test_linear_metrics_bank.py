"""Linear probes, metrics and the CE bank, checked against independent references."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from gavel.artifacts import ModelFingerprint
from gavel.errors import ArtifactError, DataError, NotFittedError
from gavel.probes.bank import BankManifest, CEBank, CESpec, HeadSpec
from gavel.probes.calibration import PlattScaling
from gavel.probes.diffmeans import DiffMeansDirection
from gavel.probes.heads import LinearHead
from gavel.probes.linear import LinearProbe
from gavel.probes.metrics import auroc, threshold_at_sequence_fpr, youden_threshold


def planted(n=2000, d=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * 3 + 1
    W = torch.randn(d, k, generator=g)
    Y = (X @ W + 0.3 * torch.randn(n, k, generator=g)) > 0
    return X, Y, W


def test_probe_recovers_planted_directions():
    X, Y, W = planted()
    probe = LinearProbe(C=10.0).fit(X[:1500], Y[:1500])
    assert probe.score(X[1500:], Y[1500:]) > 0.98
    cos = torch.nn.functional.cosine_similarity(probe.coef_, W, dim=0)
    assert (cos > 0.95).all()


def test_probe_api_follows_sklearn_conventions():
    probe = LinearProbe(C=0.5)
    assert probe.C == 0.5 and not hasattr(probe, "coef_")
    with pytest.raises(NotFittedError, match="LinearProbe"):
        probe.predict_proba(torch.zeros(1, 4))
    X, Y, _ = planted(n=300, d=4, k=1)
    assert probe.fit(X, Y) is probe


@pytest.mark.parametrize("bad", ["one_class", "nan", "shape"])
def test_probe_rejects_bad_data(bad):
    X, Y, _ = planted(n=100, d=4, k=2)
    if bad == "one_class":
        Y[:, 1] = False
        with pytest.raises(DataError, match="only negative"):
            LinearProbe().fit(X, Y, ["a", "b"])
    elif bad == "nan":
        X[3, 2] = float("nan")
        with pytest.raises(DataError, match="NaN"):
            LinearProbe().fit(X, Y)
    else:
        with pytest.raises(DataError, match="rows"):
            LinearProbe().fit(X[:50], Y)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=60))
def test_auroc_matches_sklearn(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([y for _, y in pairs])
    if labels.all() or not labels.any():
        assert np.isnan(auroc(scores, labels))
    else:
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=2, max_size=50))
def test_youden_threshold_is_optimal(pairs):
    scores = torch.tensor([s for s, _ in pairs], dtype=torch.float64)
    labels = torch.tensor([y for _, y in pairs])
    if labels.all() or not labels.any():
        return
    t = youden_threshold(scores, labels)

    def j(thr):
        pred = scores > thr
        return (float((pred & labels).sum()) / float(labels.sum())
                - float((pred & ~labels).sum()) / float((~labels).sum()))
    assert j(t) >= max(j(c) for c in torch.cat([scores, scores.min()[None] - 1])) - 1e-12


def test_sequence_fpr_threshold_counts_sequences():
    # 10 negative sequences with maxima 0.1..1.0, one positive sequence
    seq = torch.arange(11).repeat_interleave(2)
    scores = torch.stack([torch.zeros(11), torch.cat([torch.linspace(0.1, 1.0, 10), torch.tensor([2.0])])],
                         1).reshape(-1)
    labels = seq == 10
    t = threshold_at_sequence_fpr(scores, labels, seq, max_fpr=0.2)
    fired_negatives = {int(s) for s, v, y in zip(seq, scores, labels) if v > t and not y}
    assert len(fired_negatives) <= 2 and t == pytest.approx(0.8)


def _fingerprint(**kw):
    base = dict(name="m", architecture="LlamaForCausalLM", d_model=16, n_layers=2, weights_sha256="ab" * 32)
    return ModelFingerprint(**{**base, **kw})


def make_bank(groups, thresholds):
    """A bank from (sites, fitted estimator) pairs; CE j of the whole bank gets thresholds[j]."""
    heads, ces, head_specs = [], [], []
    for h, (sites, est) in enumerate(groups):
        heads.append(LinearHead(sites, est.coef_, est.intercept_))
        head_specs.append(HeadSpec(kind="linear", sites=list(sites)))
        ces += [CESpec(name=n, head=h, extractor="linear", threshold=0.0) for n in est.ce_names_]
    ces = [c.model_copy(update={"threshold": t}) for c, t in zip(ces, thresholds)]
    return CEBank(BankManifest(ces=ces, heads=head_specs, fingerprint=_fingerprint()), heads)


def test_bank_round_trip_and_fingerprint_check(tmp_path):
    X, Y, _ = planted(n=500, d=16, k=3)
    p0 = LinearProbe().fit(X, Y[:, :2], ["a", "b"])
    p1 = LinearProbe().fit(X, Y[:, 2:], ["c"])
    bank = make_bank([(("blocks.0.hook_resid_post",), p0), (("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
                      LinearProbe().fit(torch.cat([X, X], 1), Y[:, 2:], ["c"]))], [0.5, 0.6, 0.7])
    loaded = CEBank.load(bank.save(tmp_path), fingerprint=_fingerprint())
    acts = {"blocks.0.hook_resid_post": X[:7], "blocks.1.hook_resid_post": X[:7]}
    assert torch.equal(bank.score(acts), loaded.score(acts))
    torch.testing.assert_close(loaded.score(acts)[:, :2], p0.predict_proba(X[:7]))
    assert loaded.score(acts)[:, 2].sub(p1.predict_proba(X[:7])[:, 0]).abs().max() < 0.05  # same CE, concatenated sites
    assert loaded.names == ["a", "b", "c"] and loaded.thresholds.tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert loaded.sites == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert loaded.heads_for([2]) == [1]
    with pytest.raises(ArtifactError, match="d_model"):
        CEBank.load(tmp_path, fingerprint=_fingerprint(d_model=32))
    CEBank.load(tmp_path, fingerprint=_fingerprint(d_model=32), force=True)
    with pytest.raises(ArtifactError, match="did you mean 'b'"):
        loaded.index("bb")


def test_bank_manifest_errors_name_the_field(tmp_path):
    X, Y, _ = planted(n=200, d=16, k=1)
    make_bank([(("s",), LinearProbe().fit(X, Y, ["a"]))], [0.5]).save(tmp_path)
    text = (tmp_path / "manifest.json").read_text().replace('"threshold"', '"treshold"')
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=r"ces.0"):
        CEBank.load(tmp_path)


def test_diff_means_recovers_the_planted_direction():
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    y = torch.rand(3000, generator=g) < 0.4
    X = torch.randn(3000, 32, generator=g) + 2.0 * y[:, None] * direction
    est = DiffMeansDirection().fit(X, y, ["c"])
    assert torch.nn.functional.cosine_similarity(est.direction_[0], direction, dim=0) > 0.95
    assert est.score(X, y) > 0.9
    midpoint = X[y].mean(0) / 2 + X[~y].mean(0) / 2
    assert est.decision_function(midpoint[None]).abs().item() < 1e-4  # 0 separates the classes


def test_platt_scaling_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(2)
    y = torch.rand(2000, generator=g) < 0.5
    raw = torch.randn(2000, generator=g) * 3 + y.float() * 4 - 7
    platt = PlattScaling(l2=0.0).fit(raw[:, None], y[:, None])
    ref = LogisticRegression(C=1e6, class_weight="balanced").fit(raw[:, None].numpy(), y.numpy())
    assert float(platt.scale_[0]) == pytest.approx(float(ref.coef_[0, 0]), rel=1e-3)
    assert float(platt.shift_[0]) == pytest.approx(float(ref.intercept_[0]), rel=1e-3, abs=1e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=2, max_size=60))
def test_auprc_matches_sklearn(pairs):
    from sklearn.metrics import average_precision_score

    from gavel.probes.metrics import auprc

    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([y for _, y in pairs])
    if not labels.any():
        assert np.isnan(auprc(scores, labels))
    else:
        assert auprc(scores, labels) == pytest.approx(average_precision_score(labels.numpy(), scores.numpy()))


def test_tpr_at_fpr_against_a_brute_force_sweep():
    from gavel.probes.metrics import tpr_at_fpr

    g = torch.Generator().manual_seed(3)
    labels = torch.rand(500, generator=g) < 0.3
    scores = torch.randn(500, generator=g) + labels.float() * 1.5
    best = 0.0
    for t in torch.cat([scores, scores.min()[None] - 1]):
        pred = scores > t
        if (pred & ~labels).sum() / (~labels).sum() <= 0.05:
            best = max(best, float((pred & labels).sum() / labels.sum()))
    assert tpr_at_fpr(scores, labels, 0.05) == pytest.approx(best)
