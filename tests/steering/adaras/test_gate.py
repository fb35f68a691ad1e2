"""AdaRAS's failure gate: planted prompt signals are found and generalise, padding is ignored, save/load round trips."""
from __future__ import annotations

import pytest
import torch

from gavel.errors import DataError, NotFittedError
from gavel.steering.adaras.gate import FailureGate, _GateNet

F, SIGNAL = 64, 17


def planted(seed: int, n: int = 80) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n prompts [T_j in 3..9, F] of N(0,1); a failing prompt has one token whose feature 17 is +4."""
    g = torch.Generator().manual_seed(seed)
    fails = torch.arange(n) % 2 == 1
    fails = fails[torch.randperm(n, generator=g)]
    prompts = []
    for fail in fails.tolist():
        t = int(torch.randint(3, 10, (), generator=g))
        p = torch.randn(t, F, generator=g)
        if fail:
            p[int(torch.randint(0, t, (), generator=g)), SIGNAL] = 4.0
        prompts.append(p)
    return prompts, fails


def small(**kw) -> FailureGate:
    params = dict(k_features=8, hidden=32, epochs=300, lr=1e-2, weight_decay=1e-2, random_state=0)
    params.update(kw)
    return FailureGate(**params)


@pytest.fixture(scope="module")
def fitted() -> FailureGate:
    return small().fit(*planted(0))


def accuracy(gate: FailureGate, prompts, fails) -> float:
    return float((gate.predict(prompts) == fails).float().mean())


def test_planted_feature_selected_and_generalises(fitted):
    assert fitted.features_.dtype == torch.long and fitted.features_.shape == (8,)
    assert SIGNAL in fitted.features_.tolist()
    assert fitted.mean_.dtype == torch.float32 and fitted.std_.shape == (8,)
    assert (fitted.std_ > 0).all()
    assert fitted.train_accuracy_ > 0.9
    test_prompts, test_fails = planted(1, n=200)
    assert accuracy(fitted, test_prompts, test_fails) > 0.9


def test_shuffled_labels_stay_near_chance():
    prompts, fails = planted(0)
    shuffled = fails[torch.randperm(len(fails), generator=torch.Generator().manual_seed(123))]
    gate = small().fit(prompts, shuffled)
    test_prompts, test_fails = planted(1, n=200)
    assert accuracy(gate, test_prompts, test_fails) < 0.75


def test_mean_std_standardise_selected_features_over_tokens(fitted):
    prompts, _ = planted(0)
    tokens = torch.cat(prompts)[:, fitted.features_].double()
    torch.testing.assert_close(fitted.mean_, tokens.mean(0).float())
    torch.testing.assert_close(fitted.std_, tokens.std(0, unbiased=False).float())


def test_k_features_capped_at_width():
    prompts, fails = planted(0, n=20)
    gate = FailureGate(k_features=1000, hidden=4, epochs=2).fit([p[:, :5] for p in prompts], fails)
    assert sorted(gate.features_.tolist()) == [0, 1, 2, 3, 4]


def test_padding_is_ignored(fitted):
    prompts, _ = planted(2, n=10)
    short = torch.randn(3, F, generator=torch.Generator().manual_seed(5))
    long1, long2 = torch.randn(12, F), torch.randn(20, F)
    alone = fitted.predict_proba([short])
    batch = fitted.predict_proba([long1, short, long2, *prompts])
    assert alone.dtype == torch.float32 and alone.shape == (1,)
    assert abs(float(alone[0]) - float(batch[1])) < 1e-6
    logit_alone = fitted.net_(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    padded = torch.full((1, 7, 8), 1e3)                   # huge padding values must get zero weight
    padded[0, :3] = 0
    mask = torch.arange(7)[None] < 3
    assert torch.allclose(fitted.net_(padded, mask), logit_alone, atol=1e-6)


def test_predict_threshold(fitted):
    prompts, _ = planted(1, n=10)
    p = fitted.predict_proba(prompts)
    assert torch.equal(fitted.predict(prompts), p >= 0.5)
    assert torch.equal(fitted.predict(prompts, threshold=0.0), torch.ones(10, dtype=torch.bool))
    assert fitted.predict(prompts).dtype == torch.bool


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "gate")
    loaded = FailureGate.load(tmp_path / "gate")
    assert loaded.get_params() == fitted.get_params()
    assert isinstance(loaded.net_, _GateNet) and not loaded.net_.training
    assert torch.equal(loaded.features_, fitted.features_)
    assert loaded.train_accuracy_ == fitted.train_accuracy_
    prompts, _ = planted(1, n=20)
    assert torch.equal(loaded.predict_proba(prompts), fitted.predict_proba(prompts))


def test_fit_is_deterministic_and_leaves_global_rng_alone(fitted):
    prompts, fails = planted(0)
    torch.manual_seed(999)
    before = torch.get_rng_state()
    again = small().fit(prompts, fails)
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in zip(fitted.net_.state_dict().values(), again.net_.state_dict().values()):
        assert torch.equal(a, b)
    test_prompts, _ = planted(1, n=20)
    assert torch.equal(again.predict_proba(test_prompts), fitted.predict_proba(test_prompts))
    other = small(random_state=1, epochs=5).fit(prompts, fails)
    assert not torch.equal(other.net_.mlp[0].weight, small(epochs=5).fit(prompts, fails).net_.mlp[0].weight)


def test_unfitted_raises():
    with pytest.raises(NotFittedError):
        FailureGate().predict_proba([torch.randn(3, F)])


@pytest.mark.parametrize("prompts, fails, match", [
    ([torch.randn(3, 4), torch.randn(4, 4)], torch.tensor([True, True]), "both failing and passing"),
    ([torch.randn(3, 4), torch.randn(4, 4)], torch.tensor([False, False]), "both failing and passing"),
    ([torch.randn(3, 4), torch.randn(4, 4)], torch.tensor([True, False, True]), "2 prompts but 3"),
    ([torch.randn(3, 4), torch.randn(4)], torch.tensor([True, False]), "prompt 1 has shape"),
    ([torch.randn(3, 4), torch.randn(2, 3, 4)], torch.tensor([True, False]), "expected \\[T, F\\]"),
    ([torch.randn(3, 4), torch.randn(0, 4)], torch.tensor([True, False]), "prompt 1 is empty"),
    ([torch.randn(3, 4), torch.randn(4, 5)], torch.tensor([True, False]), "prompt 1 has 5 features, expected 4"),
    ([], torch.tensor([], dtype=torch.bool), "no prompts"),
    ([torch.randn(3, 4), torch.full((2, 4), float("nan"))], torch.tensor([True, False]), "NaN"),
    ([torch.randn(3, 4), torch.randn(2, 4)], torch.tensor([0.5, 1.0]), "bool"),
])
def test_fit_data_errors(prompts, fails, match):
    with pytest.raises(DataError, match=match):
        small(epochs=1).fit(prompts, fails)


def test_predict_data_errors(fitted):
    with pytest.raises(DataError, match="has 5 features, expected 64"):
        fitted.predict_proba([torch.randn(3, F), torch.randn(3, 5)])
    with pytest.raises(DataError, match="empty"):
        fitted.predict([torch.randn(0, F)])
    with pytest.raises(DataError, match="one tensor"):
        fitted.predict_proba(torch.randn(2, 3, F))


@pytest.mark.parametrize("param, value", [("k_features", 0), ("hidden", -1), ("epochs", 1.5), ("lr", 0.0),
                                          ("weight_decay", -1e-3), ("k_features", True)])
def test_bad_params(param, value):
    prompts, fails = planted(0, n=10)
    with pytest.raises(DataError, match=param):
        small(**{param: value}).fit(prompts, fails)
