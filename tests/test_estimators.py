"""One conformance suite over every fitted CE extractor (scikit-learn's estimator contract)."""
import inspect

import pytest
import torch

from gavel.errors import ArtifactError, NotFittedError
from gavel.probes.calibration import PlattScaling
from gavel.probes.diffmeans import DiffMeansDirection
from gavel.probes.linear import LinearProbe
from gavel.probes.sae import SAELatentSelector


def data(seed, n=400, d=12, k=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(n, d, generator=g))
    Y = (X[:, :k] + 0.3 * torch.randn(n, k, generator=g)) > 0.6
    return X, Y


# (estimator with non-default parameters, how it scores); Platt scaling reads one raw score per CE
ESTIMATORS = [
    (LinearProbe(C=0.5, max_iter=50), "decision_function"),
    (DiffMeansDirection(normalize=False), "decision_function"),
    (PlattScaling(max_iter=50, l2=1e-3), "transform"),
    (SAELatentSelector(top_k=2, method="mean_diff"), "decision_function"),
]


def inputs(est, seed):
    X, Y = data(seed)
    return (X[:, :Y.shape[1]] if isinstance(est, PlattScaling) else X), Y


@pytest.mark.parametrize("est,method", ESTIMATORS, ids=lambda e: type(e).__name__ if not isinstance(e, str) else e)
def test_estimator_contract(est, method, tmp_path):
    params = est.get_params()
    signature = inspect.signature(type(est).__init__).parameters
    assert set(params) == set(signature) - {"self"}
    assert not any(k.endswith("_") for k in vars(est)), "__init__ must not set learned state"
    X, Y = inputs(est, 0)
    with pytest.raises(NotFittedError, match=type(est).__name__):
        getattr(est, method)(X)
    assert est.fit(X, Y) is est
    first = getattr(est, method)(X)
    X2, Y2 = inputs(est, 1)
    est.fit(X2, ~Y2)
    assert not torch.allclose(getattr(est, method)(X), first), "fit must forget the earlier fit"
    loaded = type(est).load(est.save(tmp_path / "est"))
    assert loaded.get_params() == params
    torch.testing.assert_close(getattr(loaded, method)(X), getattr(est, method)(X))
    other = next(e for e, _ in ESTIMATORS if type(e) is not type(est))
    with pytest.raises(ArtifactError, match="holds a"):
        type(other).load(tmp_path / "est")


def test_saving_an_unfitted_estimator_fails(tmp_path):
    with pytest.raises(NotFittedError):
        LinearProbe().save(tmp_path)
