"""The estimator contract (scikit-learn's) that everything fitted follows, saved over the artifact contract.

`__init__` only stores its keyword arguments under the same names; learned state ends in `_` and only `fit` sets
it. `get_params` / `set_params` / `clone` work from the constructor's signature. `save(dir)` writes one artifact
(`gavel.artifacts`): learned tensors and learned networks' weights as tensors, every other learned value as JSON in
the manifest, the parameters, the fingerprint of the model it was fitted on and (given) a fingerprint of the data it
was fitted on (`fitted_on`); `load(dir)` rebuilds the
estimator, refusing an artifact of another kind or (with the live model's fingerprint) of another model.
"""
from __future__ import annotations

import copy
import functools
import inspect
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel

from gavel.artifacts import FittedOn, Manifest, ModelFingerprint, read_artifact, write_artifact
from gavel.errors import ArtifactError, GavelError, check_is_fitted, did_you_mean

E = TypeVar("E", bound="Estimator")

_MANIFEST_FIELDS = ("fingerprint_", "fitted_on_")   # learned state kept in the manifest's own fields


class EstimatorManifest(Manifest):
    """A fitted estimator: its class, constructor parameters, JSON-valued learned state and learned networks."""

    kind: str
    estimator: str
    params: dict[str, Any]
    learned: dict[str, Any] = {}
    modules: list[str] = []


class Estimator:
    """Base of every fitted object: parameters from the constructor signature, learned state in `_` attributes,
    one artifact per fitted estimator. `artifact_kind` (default: the class name in snake case) is its manifest kind.
    """

    artifact_kind: ClassVar[str] = "estimator"
    artifact_what: ClassVar[str | None] = None   # how errors name a saved one (default: its kind, "a steering plane")
    artifact_hint: ClassVar[str | None] = None   # how to make one, for the error when a folder holds none
    # declared only (no class attribute): every estimator defines its own `fit`, wrapped in __init_subclass__
    fit: ClassVar[Callable[..., Any]]
    # learned: the model it was fitted on, set by a fit that knows it or by `load` (absent otherwise)
    fingerprint_: ModelFingerprint
    # learned: the data it was fitted on, set by `load` from an artifact that records it (absent otherwise)
    fitted_on_: FittedOn

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "artifact_kind" not in cls.__dict__:
            cls.artifact_kind = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", cls.__name__).lower()
        if "fit" in cls.__dict__:
            cls.fit = _forgetting_the_model(cls.__dict__["fit"])

    # ---- parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters, read back from the attributes of the same names."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self: E, **params: Any) -> E:
        """Change parameters in place (a later `fit` uses them); an unknown name is an error with a suggestion."""
        names = self._param_names()
        for name, value in params.items():
            if name not in names:
                guess = did_you_mean(name, names)
                raise GavelError(f"{type(self).__name__} has no parameter {name!r}; its parameters: "
                                 f"{', '.join(names)}", hint=f"did you mean {guess!r}?" if guess else None)
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = {k: v for k, v in self.get_params().items() if not _same(v, defaults.get(k, inspect.Parameter.empty))}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ---- learned state
    def _learned(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()
                if k.endswith("_") and not k.startswith("_") and k not in _MANIFEST_FIELDS}

    def _build_module(self, name: str) -> Any:
        """An untrained network for learned attribute `name` (estimators that learn networks override it)."""
        raise ArtifactError(f"{type(self).__name__} cannot rebuild a learned network {name!r}")

    def _restore(self) -> None:
        """Turn learned JSON values back into richer objects after `load` (estimators that need it override it)."""

    # ---- artifact
    def save(self, directory: str | os.PathLike[str], *, fingerprint: ModelFingerprint | None = None,
             provenance: Mapping[str, str] | None = None, fitted_on: FittedOn | None = None) -> Path:
        """One artifact: learned tensors and networks, parameters, JSON learned state, the fingerprint of the
        model it was fitted on (`fingerprint`, default the estimator's own `fingerprint_` when it has one) and of the
        data (`fitted_on`, default its own `fitted_on_` when it has one: what evaluations check they do not reuse)."""
        import torch

        learned = self._learned()
        if not learned:
            check_is_fitted(self, ("__never__",))
        tensors: dict[str, torch.Tensor] = {}
        modules, rest = [], {}
        for name, value in learned.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, torch.nn.Module):
                modules.append(name)
                tensors.update({f"{name}/{k}": v for k, v in value.state_dict().items()})
            else:
                rest[name] = _jsonable(value, f"{type(self).__name__}.{name}")
        manifest = EstimatorManifest(
            kind=self.artifact_kind, estimator=type(self).__name__,
            params={k: _jsonable(v, f"{type(self).__name__}({k}=...)") for k, v in self.get_params().items()},
            learned=rest, modules=modules, fingerprint=fingerprint or getattr(self, "fingerprint_", None),
            provenance=dict(provenance or {}), fitted_on=fitted_on or getattr(self, "fitted_on_", None))
        return write_artifact(directory, manifest, tensors)

    @classmethod
    def load(cls: type[E], directory: str | os.PathLike[str], fingerprint: ModelFingerprint | None = None,
             force: bool = False) -> E:
        """A saved estimator of this class; with the live model's fingerprint, one fitted on another model is
        refused (the differing field named) unless `force`."""
        manifest, tensors = read_artifact(directory, EstimatorManifest, kind=cls.artifact_kind,
                                          what=cls.artifact_what, fingerprint=fingerprint, force=force,
                                          hint=cls.artifact_hint)
        try:
            est = cls(**manifest.params)
        except TypeError as e:
            raise ArtifactError(f"{directory}: its parameters do not fit {cls.__name__}: {e}") from None
        for k, v in manifest.learned.items():
            setattr(est, k, v)
        for k, v in tensors.items():
            if "/" not in k:
                setattr(est, k, v)
        for name in manifest.modules:
            net = est._build_module(name)
            state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise ArtifactError(f"{directory}: the weights of {name} do not fit its parameters: {e}") from None
            setattr(est, name, net.eval())
        if manifest.fingerprint is not None:
            est.fingerprint_ = manifest.fingerprint
        if manifest.fitted_on is not None:
            est.fitted_on_ = manifest.fitted_on
        est._restore()
        return est


def _forgetting_the_model(fit: Callable[..., Any]) -> Callable[..., Any]:
    """`fit` that first forgets which model an earlier fit (or `load`) was for: a refit on other activations must not
    keep, and save, the old model's fingerprint (a fit that knows its model sets `fingerprint_` again), nor the old
    data's `fitted_on_`."""
    @functools.wraps(fit)
    def wrapper(self: Estimator, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop("fingerprint_", None)
        self.__dict__.pop("fitted_on_", None)
        return fit(self, *args, **kwargs)
    return wrapper


def clone(estimator: E) -> E:
    """An unfitted estimator with the same parameters (deep copies); refuses a constructor that changed one."""
    params = {k: copy.deepcopy(v) for k, v in estimator.get_params().items()}
    new = type(estimator)(**params)
    for name, value in params.items():
        if getattr(new, name) is not value:
            raise GavelError(f"cannot clone {type(estimator).__name__}: its constructor changes parameter {name!r}; "
                             "__init__ must store its arguments unchanged")
    return new


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:
        return False


def _jsonable(value: Any, where: str) -> Any:
    """`value` as JSON data (pydantic models dumped); a TypeError naming `where` for anything else."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be saved as JSON; learned tensors and networks are "
                    "saved as tensors, everything else must be JSON data")
