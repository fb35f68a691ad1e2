"""The built-in rule actions: log, alert, block, and the steering actions later issues implement.

An action declares what a rule may write after its name: `params`, a pydantic model of its `name(key=value)`
arguments (None: it takes none), and `takes_text`, whether `name "text"` is allowed (alert's message, block's
reply). The steering actions are declarations only (`implemented = False`): rules naming them load and lint,
and a monitor refuses them until their interventions exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

# Higher wins when several rules fire on one token: block > steer > alert > log.
PRECEDENCE = {"log": 0, "alert": 1, "steer": 2, "block": 3}


@runtime_checkable
class Action(Protocol):
    """What a rule does when it fires. `stops_generation` actions end the sequence that fired. An action class may
    also define `handle(self, events, arguments)`: the monitor makes one instance and calls it on the host once
    per batch with the batch's events of each rule naming the action and that rule's validated `params`."""

    name: ClassVar[str]
    kind: ClassVar[str]            # one of PRECEDENCE's keys
    stops_generation: ClassVar[bool]
    params: ClassVar[type[BaseModel] | None]  # the arguments of `name(key=value, ...)`; None: no arguments
    takes_text: ClassVar[bool]     # whether `name "text"` is allowed
    implemented: ClassVar[bool]    # False for a declaration whose effect arrives later


@dataclass(frozen=True)
class LogAction:
    """Record the event in the audit trail only."""

    name: ClassVar[str] = "log"
    kind: ClassVar[str] = "log"
    stops_generation: ClassVar[bool] = False
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = True


@dataclass(frozen=True)
class AlertAction:
    """Record the event and surface it to the user with the rule's message (`alert "text {placeholders}"`)."""

    name: ClassVar[str] = "alert"
    kind: ClassVar[str] = "alert"
    stops_generation: ClassVar[bool] = False
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = True
    implemented: ClassVar[bool] = True


@dataclass(frozen=True)
class BlockAction:
    """Stop generating for the sequence that fired; the user gets its text (`block "reply"`)."""

    name: ClassVar[str] = "block"
    kind: ClassVar[str] = "block"
    stops_generation: ClassVar[bool] = True
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = True
    implemented: ClassVar[bool] = True


# --- steering: declared now, implemented by later issues --------------------------------------------------------

class _Args(BaseModel):
    """Arguments of an action: exactly these names, numbers as numbers (strict), finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RotateArgs(_Args):
    plane: str = Field(description="the named plane (two directions) to rotate the residual stream in")
    angle: float = Field(description="degrees")


class AddArgs(_Args):
    vector: str = Field(description="the named steering vector to add")
    strength: float


class AblateArgs(_Args):
    direction: str = Field(description="the named direction to project out")


class AlignArgs(_Args):
    model: str = Field(description="the reference model to align the activations with")


class SteerNeuronsArgs(_Args):
    neurons: str = Field(description="the named set of neurons to steer")
    strength: float


class PerturbArgs(_Args):
    method: str = Field(description="the perturbation method")
    budget: float = Field(ge=0, description="how large a perturbation is allowed")


@dataclass(frozen=True)
class _Steering:
    """A steering action: changes the activations and keeps generating; not implemented yet."""

    kind: ClassVar[str] = "steer"
    stops_generation: ClassVar[bool] = False
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = False


class RotateAction(_Steering):
    """`rotate(plane=..., angle=...)`: rotate the residual stream in a plane by `angle` degrees."""

    name: ClassVar[str] = "rotate"
    params: ClassVar[type[BaseModel] | None] = RotateArgs


class AddAction(_Steering):
    """`add(vector=..., strength=...)`: add a steering vector."""

    name: ClassVar[str] = "add"
    params: ClassVar[type[BaseModel] | None] = AddArgs


class AblateAction(_Steering):
    """`ablate(direction=...)`: project a direction out of the residual stream."""

    name: ClassVar[str] = "ablate"
    params: ClassVar[type[BaseModel] | None] = AblateArgs


class AlignAction(_Steering):
    """`align(model=...)`: pull activations towards a reference model's."""

    name: ClassVar[str] = "align"
    params: ClassVar[type[BaseModel] | None] = AlignArgs


class SteerNeuronsAction(_Steering):
    """`steer_neurons(neurons=..., strength=...)`: scale a set of neurons."""

    name: ClassVar[str] = "steer_neurons"
    params: ClassVar[type[BaseModel] | None] = SteerNeuronsArgs


class PerturbAction(_Steering):
    """`perturb(method=..., budget=...)`: perturb the activations within a budget."""

    name: ClassVar[str] = "perturb"
    params: ClassVar[type[BaseModel] | None] = PerturbArgs


BUILTIN_ACTIONS = (LogAction, AlertAction, BlockAction, RotateAction, AddAction, AblateAction, AlignAction,
                   SteerNeuronsAction, PerturbAction)
