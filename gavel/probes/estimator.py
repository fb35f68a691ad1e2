"""The estimator contract every fitted CE extractor follows (scikit-learn's): parameters, save, load.

`__init__` only stores its keyword arguments under the same names; learned state ends in `_` and only
`fit` sets it. `save(dir)` writes learned tensors to safetensors and everything else to JSON (never
pickle); `load(dir)` rebuilds the estimator, refusing a file written by another class.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from gavel.errors import ArtifactError, check_is_fitted

STATE = "estimator.safetensors"
META = "estimator.json"


class Estimator:
    """Mixin: `get_params`, `save` and `load` from the constructor signature and the `_` attributes."""

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, read back from the attributes of the same names."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def _learned(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        learned = self._learned()
        if not learned:
            check_is_fitted(self, ("__never__",))
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in learned.items() if isinstance(v, torch.Tensor)}
        modules = [k for k, v in learned.items() if isinstance(v, torch.nn.Module)]
        for name in modules:  # learned networks are saved as their state dicts
            tensors.update({f"{name}/{k}": v.detach().cpu().contiguous() for k, v in learned[name].state_dict().items()})
        rest = {k: v for k, v in learned.items() if not isinstance(v, (torch.Tensor, torch.nn.Module))}
        save_file(tensors, d / STATE)
        (d / META).write_text(json.dumps({"class": type(self).__name__, "params": self.get_params(),
                                          "learned": rest, "modules": modules}, indent=2) + "\n")
        return d

    def _build_module(self, name: str) -> torch.nn.Module:
        """An untrained network for learned attribute `name` (estimators that learn networks override it)."""
        raise ArtifactError(f"{type(self).__name__} cannot rebuild a learned network {name!r}")

    @classmethod
    def load(cls, directory: str | Path):
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / META).exists() or not (d / STATE).exists():
            raise ArtifactError(f"{d} holds no saved estimator (needs {META} and {STATE})")
        meta = json.loads((d / META).read_text())
        if meta.get("class") != cls.__name__:
            raise ArtifactError(f"{d / META} holds a {meta.get('class')!r}, not a {cls.__name__}")
        est = cls(**meta["params"])
        tensors = load_file(d / STATE)
        for k, v in meta["learned"].items():
            setattr(est, k, v)
        for k, v in tensors.items():
            if "/" not in k:
                setattr(est, k, v)
        for name in meta.get("modules", []):
            net = est._build_module(name)
            net.load_state_dict({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")})
            setattr(est, name, net.eval())
        return est
