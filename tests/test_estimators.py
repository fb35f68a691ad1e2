"""One conformance suite over every Estimator in gavel (scikit-learn's estimator contract over the artifact contract).

The classes are found by importing every module under gavel/ and walking `Estimator.__subclasses__()`; a new
subclass without a case in `estimator_cases.CASES` fails here. Per class: parameters are the constructor's and
`__init__` learns nothing; use before `fit` is a NotFittedError naming the class; `fit` returns self and a refit
forgets the earlier fit (it equals a fresh fit); `clone` / `set_params`; save -> load reproduces the parameters,
the learned state and the outputs, records the model fingerprint and refuses another model unless forced; another
class refuses the folder; a changed tensor byte is refused.
"""
import copy
import inspect

import pytest
import torch
from helpers.estimator_cases import CASES, Case, discover

from gavel.artifacts import MANIFEST, TENSORS, ModelFingerprint, read_manifest
from gavel.base import Estimator, EstimatorManifest, clone
from gavel.errors import ArtifactError, GavelError, NotFittedError
from gavel.probes.linear import LinearProbe
from gavel.steering.selective.plane import SteeringPlane

DISCOVERED, IMPORT_FAILURES = discover()
CLASSES = sorted(set(DISCOVERED) | set(CASES), key=lambda c: c.__name__)
BY_CLASS = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)

FINGERPRINT = ModelFingerprint(name="tiny-model", architecture="LlamaForCausalLM", d_model=16, n_layers=1,
                               weights_sha256="ab" * 32)


def case_for(cls: type[Estimator]) -> Case:
    if cls not in CASES:
        pytest.fail(f"{cls.__module__}.{cls.__name__} has no conformance case: "
                    "add one to tests/helpers/estimator_cases.py")
    return CASES[cls]


_FITTED: dict[type, Estimator] = {}


def fitted(cls: type[Estimator]) -> Estimator:
    """The estimator fitted on seed 0, shared by the tests that only read it (fits are deterministic)."""
    if cls not in _FITTED:
        case = case_for(cls)
        _FITTED[cls] = case.fit(case.make(), 0)
    return _FITTED[cls]


def fingerprint_of(est: Estimator) -> ModelFingerprint:
    return est.fingerprint_ if case_for(type(est)).own_fingerprint else FINGERPRINT


def learned(est: Estimator) -> dict:
    return {k: v for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}


def assert_same_learned(actual: Estimator, expected: Estimator) -> None:
    """Every learned attribute equal: tensors bit for bit (dtype too), networks by type and weights, the rest by ==."""
    a, b = learned(actual), learned(expected)
    assert sorted(a) == sorted(b)
    for name, want in b.items():
        got = a[name]
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        elif isinstance(want, torch.nn.Module):
            assert type(got) is type(want) and not got.training, name
            torch.testing.assert_close(got.state_dict(), want.state_dict(), rtol=0, atol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert got == want, name


def differs(a, b) -> bool:
    try:
        torch.testing.assert_close(a, b)
    except AssertionError:
        return True
    return False


def flip_tensor_byte(path, where: float) -> None:
    """XOR one byte of the tensor data (after the u64 header length and the JSON header) of a safetensors file."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    assert start < len(raw), "no tensor data"
    raw[start + int(where * (len(raw) - 1 - start))] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- coverage
def test_every_estimator_in_gavel_has_a_case():
    assert not IMPORT_FAILURES, f"modules under gavel/ that do not import: {IMPORT_FAILURES}"
    names = {c.__name__ for c in DISCOVERED}
    assert {"LinearProbe", "DeconIEP", "SteeringPlane", "FailureGate"} <= names   # discovery reaches subpackages
    missing = [f"{c.__module__}.{c.__name__}" for c in DISCOVERED if c not in CASES]
    stale = [c.__name__ for c in CASES if c not in DISCOVERED]
    assert not missing, ("Estimator subclasses without a conformance case in tests/helpers/estimator_cases.py: "
                         f"{missing}")
    assert not stale, f"cases for classes that are no longer Estimators in gavel: {stale}"


# ---------------------------------------------------------------- the contract, per class
@BY_CLASS
def test_parameters_are_the_constructors_and_init_learns_nothing(cls):
    case = case_for(cls)
    est = case.make()
    signature = inspect.signature(cls.__init__).parameters
    names = [n for n in signature if n != "self"]
    assert list(est.get_params()) == names
    defaults = {n: signature[n].default for n in names}
    assert est.get_params() == {**defaults, **case.params}
    assert all(v != defaults[k] for k, v in case.params.items()), "the case must use non-default values"
    assert set(vars(est)) == set(names), "__init__ stores its arguments under the same names, nothing else"
    assert not any(k.endswith("_") for k in vars(est)), "__init__ must not set learned state"


@BY_CLASS
def test_use_before_fit_is_a_not_fitted_error_naming_the_class(cls, tmp_path):
    case = case_for(cls)
    with pytest.raises(NotFittedError, match=rf"\b{cls.__name__}\b"):
        case.use(case.make())
    with pytest.raises(NotFittedError, match=rf"\b{cls.__name__}\b"):
        case.make().save(tmp_path / "unfitted")
    assert not (tmp_path / "unfitted" / MANIFEST).exists()


@BY_CLASS
def test_fit_returns_self_and_a_refit_forgets_the_earlier_fit(cls):
    case = case_for(cls)
    est = case.make()
    assert case.fit(est, 0) is est
    assert learned(est), "fit sets learned state"
    first = case.outputs(est)
    assert case.fit(est, 1) is est
    second = case.outputs(est)
    assert differs(first, second), "a fit on other data must change the outputs"
    fresh = case.fit(case.make(), 1)
    torch.testing.assert_close(second, case.outputs(fresh), rtol=0, atol=0)
    assert_same_learned(est, fresh)
    assert est.get_params() == case.make().get_params(), "fit must not change parameters"


@BY_CLASS
def test_clone_and_set_params(cls):
    case = case_for(cls)
    est = copy.deepcopy(fitted(cls))
    before = case.outputs(est)
    twin = clone(est)
    assert type(twin) is cls and twin is not est
    assert twin.get_params() == est.get_params() and not learned(twin)
    with pytest.raises(NotFittedError, match=cls.__name__):
        case.use(twin)
    torch.testing.assert_close(case.outputs(est), before, rtol=0, atol=0)   # cloning leaves the original alone
    with pytest.raises(GavelError, match="no parameter 'no_such_parameter'"):
        est.set_params(no_such_parameter=1)
    name, value = case.set_param
    expected = {**est.get_params(), name: value}
    assert est.set_params(**{name: value}) is est
    assert est.get_params() == expected
    assert clone(est).get_params() == expected


@BY_CLASS
def test_save_load_round_trip_records_the_model_fingerprint(cls, tmp_path):
    case = case_for(cls)
    est = fitted(cls)
    fp = fingerprint_of(est)
    other = fp.model_copy(update={"weights_sha256": "0" * 64})
    kwargs = {} if case.own_fingerprint else {"fingerprint": fp}
    saved = est.save(tmp_path / "est", provenance={"data": "synthetic"}, **kwargs)
    manifest = read_manifest(saved, EstimatorManifest, kind=cls.artifact_kind)
    assert manifest.estimator == cls.__name__ and manifest.fingerprint == fp
    assert manifest.provenance == {"data": "synthetic"}
    expected = case.outputs(est)
    for loaded in (cls.load(saved, fingerprint=fp), cls.load(saved),
                   cls.load(saved, fingerprint=other, force=True)):
        assert type(loaded) is cls
        assert loaded.get_params() == est.get_params() == case.make().get_params()
        assert loaded.fingerprint_ == fp
        if not case.own_fingerprint:
            del loaded.fingerprint_   # set by load, not by fit; everything else is what fit learned
        assert_same_learned(loaded, est)
        torch.testing.assert_close(case.outputs(loaded), expected, rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        cls.load(saved, fingerprint=other)
    with pytest.raises(ArtifactError, match="n_layers"):
        cls.load(saved, fingerprint=fp.model_copy(update={"n_layers": fp.n_layers + 1}))
    if not case.own_fingerprint:   # saved without a fingerprint: cannot be checked against a live model
        bare = est.save(tmp_path / "bare")
        assert read_manifest(bare, EstimatorManifest, kind=cls.artifact_kind).fingerprint is None
        with pytest.raises(ArtifactError, match="records no model fingerprint"):
            cls.load(bare, fingerprint=fp)
        torch.testing.assert_close(case.outputs(cls.load(bare, fingerprint=fp, force=True)), expected,
                                   rtol=0, atol=0)


@BY_CLASS
def test_another_estimator_class_refuses_the_artifact(cls, tmp_path):
    saved = fitted(cls).save(tmp_path / "est", fingerprint=FINGERPRINT)
    others = [c for c in CLASSES if c is not cls]
    other = others[CLASSES.index(cls) % len(others)]
    with pytest.raises(ArtifactError, match=rf"holds {'an' if cls.artifact_kind[0] in 'aeiou' else 'a'} "
                                            rf"{cls.artifact_kind.replace('_', ' ')}"):
        other.load(saved)
    with pytest.raises(ArtifactError, match="holds"):
        other.load(saved, fingerprint=FINGERPRINT, force=True)


@BY_CLASS
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["first", "middle", "last"])
def test_a_changed_tensor_byte_is_refused(cls, where, tmp_path):
    saved = fitted(cls).save(tmp_path / "est", fingerprint=FINGERPRINT)
    cls.load(saved)
    flip_tensor_byte(saved / TENSORS, where)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        cls.load(saved)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        cls.load(saved, fingerprint=FINGERPRINT, force=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_refit_after_load_forgets_the_loaded_artifact(cls, tmp_path):
    case = case_for(cls)
    fp = fingerprint_of(fitted(cls))
    loaded = cls.load(fitted(cls).save(tmp_path / "est", fingerprint=fp), fingerprint=fp)
    assert case.fit(loaded, 1) is loaded
    fresh = case.fit(case.make(), 1)
    torch.testing.assert_close(case.outputs(loaded), case.outputs(fresh), rtol=0, atol=0)
    assert getattr(loaded, "fingerprint_", None) == getattr(fresh, "fingerprint_", None), \
        "the refit estimator still claims the loaded artifact's model"
    assert_same_learned(loaded, fresh)
    again = read_manifest(loaded.save(tmp_path / "again"), EstimatorManifest, kind=cls.artifact_kind)
    assert again.fingerprint == read_manifest(fresh.save(tmp_path / "fresh"), EstimatorManifest,
                                              kind=cls.artifact_kind).fingerprint


@pytest.mark.parametrize("layers", ["all", "1-2"])
def test_every_steering_plane_query_before_fit_is_a_not_fitted_error(layers):
    with pytest.raises(NotFittedError, match="SteeringPlane"):
        SteeringPlane().sites_in("auto")
    with pytest.raises(NotFittedError, match="SteeringPlane"):
        SteeringPlane().sites_in(layers)


def test_saving_an_unfitted_estimator_fails(tmp_path):
    with pytest.raises(NotFittedError):
        LinearProbe().save(tmp_path)
