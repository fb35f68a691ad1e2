"""The intervention contract, and interventions as plugins (entry-point group `gavel.interventions`).

An intervention changes a model's activations. It has two halves:

- `Intervention`, the runtime object built from an artifact: `to(device)` gives a copy on a device, and
  `hooks(active)` gives the (site, hook) pairs that change the activations of the rows where `active` (bool [batch],
  read at every call, so the caller may update it in place between forwards) is True, every row without it.
- `InterventionMethod`, the plugin a rule's action names (`rotate(plane=..., angle=...)`): its arguments (`params`,
  a pydantic model; `artifact` names the argument that names the artifact), how to load that artifact from a folder
  (`load`) or recognise one given in Python (`accepts`), and `build`, which makes the `Intervention`.

Every registered method is also a rule action of kind "steer" (`SteeringMethod` declares the action's fields), so
adding a method is one module and one entry point; the monitor finds it in the registry and knows nothing else about
it. A method with `reads_prompt` acts on the prompt's own tokens (DeconIEP's perturbation of prompt embeddings): the
monitor reads the prompts once to find the rows whose rule holds, then hands `hooks(rows)` of
`intervention.for_prompt(mask)` to the real forward passes; any other method acts from the forward after its rule
fires. (Nothing here imports torch: the registry loads these declarations when rules are only parsed or linted.)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor

    from gavel.models.handle import ModelHandle

HookPairs = list[tuple[str, Callable[["Tensor"], "Tensor | None"]]]


@runtime_checkable
class Intervention(Protocol):
    """A change to activations, built from an artifact; immutable (`to` returns a new one)."""

    def to(self, device: Any) -> Intervention:
        """The same intervention with its tensors on `device`."""
        ...

    def hooks(self, active: Tensor | None = None) -> HookPairs:
        """(site, hook) pairs for `ModelHandle.hooks`; with `active` (bool [batch]) only those rows change."""
        ...


@runtime_checkable
class PromptIntervention(Intervention, Protocol):
    """What a `reads_prompt` method builds: an intervention on the prompt's own tokens, which `for_prompt(mask)` tells
    a batch's real prompt tokens (bool [B, P]) before its hooks are taken."""

    def for_prompt(self, mask: Tensor) -> Intervention:
        """The same intervention for a batch whose prompts' real tokens are `mask`."""
        ...


@runtime_checkable
class InterventionMethod(Protocol):
    """What a `gavel.interventions` plugin provides (see the module docstring). The registry holds the class and the
    runtime calls `load`, `accepts` and `build` on it: they are class methods."""

    name: ClassVar[str]                   # the action's name in rules
    params: ClassVar[type[BaseModel]]     # its arguments
    artifact: ClassVar[str]               # the argument that names the artifact
    reads_prompt: ClassVar[bool]          # acts on the prompt's tokens (see the module docstring)

    @classmethod
    def load(cls, path: Path, handle: ModelHandle) -> object:
        """The artifact in folder `path`, checked against the model (ArtifactError when it is not one)."""
        ...

    @classmethod
    def accepts(cls, artifact: object) -> bool:
        """Whether an object given in Python (`Monitor(artifacts={name: obj})`) is this method's artifact."""
        ...

    @classmethod
    def build(cls, artifact: object, args: BaseModel, handle: ModelHandle) -> Intervention:
        """The intervention for one rule, on the model's device; a GavelError says what does not fit."""
        ...


METHODS = ("load", "accepts", "build")   # what an InterventionMethod must be able to call


class Arguments(BaseModel):
    """Arguments of an action: exactly these names, numbers as numbers (strict), finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Duration(Arguments):
    """How long a steering action acts: from the forward after its rule fires to the end of the generation, or for
    `duration` tokens (forward passes)."""

    duration: int | None = Field(default=None, ge=1, description="tokens to steer for (default: to the end)")


class SteeringMethod:
    """Base of intervention plugins: the rule-action fields every one of them shares (kind "steer", no text, does
    not stop generation), and `load` / `accepts` for an artifact class named by `artifact_type` ("module:Class",
    imported on first use, whose `load(path, fingerprint)` follows the artifact contract). Subclasses set `name`,
    `params`, `artifact` and `artifact_type`, and implement `build`."""

    kind: ClassVar[str] = "steer"
    stops_generation: ClassVar[bool] = False
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = True
    reads_prompt: ClassVar[bool] = False
    artifact_type: ClassVar[str]

    @classmethod
    def artifact_class(cls) -> type[Any]:
        """The class `artifact_type` names."""
        module, _, name = cls.artifact_type.partition(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def load(cls, path: Path, handle: ModelHandle) -> object:
        """The artifact in folder `path`, refused when it was made for another model."""
        return cls.artifact_class().load(path, handle.fingerprint())

    @classmethod
    def accepts(cls, artifact: object) -> bool:
        return isinstance(artifact, cls.artifact_class())
