"""The built-in rule actions: log, alert, block, and the steering actions (rotate, add, ablate, align, steer_neurons,
perturb).

An action declares what a rule may write after its name: `params`, a pydantic model of its `name(key=value)`
arguments (None: it takes none), and `takes_text`, whether `name "text"` is allowed (alert's message, block's
reply). `rotate`, `add`, `ablate`, `align` and `steer_neurons` steer the sequence that fired (gavel.steering);
`perturb` regenerates it from a perturbed prompt (gavel.decon). A plugin may declare an action with
`implemented = False`: rules naming it load and lint, and a monitor refuses it.
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


# --- steering ------------------------------------------------------------------------------------------------

class _Args(BaseModel):
    """Arguments of an action: exactly these names, numbers as numbers (strict), finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _SteeringArgs(_Args):
    """Where and how long a steering action acts: the artifact's selected blocks (`layers="auto"`), all of its
    blocks (`"all"`) or a range (`"2-5"`, `"3"`); from the forward after the rule fires to the end of the
    generation, or for `duration` tokens (forward passes)."""

    layers: str = Field(default="auto", pattern=r"^(auto|all|\d+(-\d+)?)$")
    duration: int | None = Field(default=None, ge=1, description="tokens to steer for (default: to the end)")


class RotateArgs(_SteeringArgs):
    plane: str = Field(description="the steering artifact (a name the monitor was given, or a directory)")
    angle: float = Field(description="degrees")


class AddArgs(_SteeringArgs):
    vector: str = Field(description="the steering artifact whose per-site difference of class means is added")
    strength: float


class AblateArgs(_SteeringArgs):
    direction: str = Field(description="the steering artifact whose first plane axis (b1) is projected out")


class AlignArgs(_Args):
    alignment: str = Field(description="an LLM-VA alignment (`gavel align fit` output: a name or a directory)")
    duration: int | None = Field(default=None, ge=1, description="tokens to align for (default: to the end)")


class SteerNeuronsArgs(_Args):
    neurons: str = Field(description="a neuron set (`gavel neurons find` output: a name or a directory)")
    strength: float = Field(description="alpha: the multiple of S' added to the MLP neurons")
    duration: int | None = Field(default=None, ge=1, description="tokens to steer for (default: to the end)")


class PerturbArgs(_Args):
    perturbation: str = Field(description="a DeconIEP input perturbation (`gavel decon train` output: a name or a "
                                          "directory)")
    zeta: float | None = Field(default=None, ge=0, description="the bound |delta|_inf (default: the trained one)")


@dataclass(frozen=True)
class _Steering:
    """A steering action: changes the activations of the sequence that fired and keeps generating."""

    kind: ClassVar[str] = "steer"
    stops_generation: ClassVar[bool] = False
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = True
    method: ClassVar[str]       # the gavel.steering.selective.intervene method it applies


class RotateAction(_Steering):
    """`rotate(plane=..., angle=...)`: rotate the activations in the artifact's plane by `angle` degrees
    (Selective Steering), at its selected blocks."""

    name: ClassVar[str] = "rotate"
    method: ClassVar[str] = "rotate"
    params: ClassVar[type[BaseModel] | None] = RotateArgs


class AddAction(_Steering):
    """`add(vector=..., strength=...)`: add `strength` times the artifact's difference of class means."""

    name: ClassVar[str] = "add"
    method: ClassVar[str] = "add"
    params: ClassVar[type[BaseModel] | None] = AddArgs


class AblateAction(_Steering):
    """`ablate(direction=...)`: project the artifact's first plane axis out of the activations."""

    name: ClassVar[str] = "ablate"
    method: ClassVar[str] = "ablate"
    params: ClassVar[type[BaseModel] | None] = AblateArgs


class AlignAction(_Steering):
    """`align(alignment=...)`: LLM-VA's runtime projection at its selected sublayers, so the sequence that fired
    answers only as far as it reads as benign (the weight edit, for one sequence)."""

    name: ClassVar[str] = "align"
    method: ClassVar[str] = "align"
    params: ClassVar[type[BaseModel] | None] = AlignArgs


class SteerNeuronsAction(_Steering):
    """`steer_neurons(neurons=..., strength=...)`: add alpha times AdaRAS's S' to the reasoning-critical MLP
    neurons of the sequence that fired."""

    name: ClassVar[str] = "steer_neurons"
    method: ClassVar[str] = "steer_neurons"
    params: ClassVar[type[BaseModel] | None] = SteerNeuronsArgs


class PerturbAction(_Steering):
    """`perturb(perturbation=...)`: DeconIEP. A rule that holds while the prompt is read (a benchmark-style
    question, say) has that sequence generated from its prompt embeddings plus the trained bounded perturbation, so
    a contaminated model answers as a clean one would; the monitor reads the prompts once more to decide."""

    name: ClassVar[str] = "perturb"
    method: ClassVar[str] = "perturb"
    params: ClassVar[type[BaseModel] | None] = PerturbArgs


BUILTIN_ACTIONS = (LogAction, AlertAction, BlockAction, RotateAction, AddAction, AblateAction, AlignAction,
                   SteerNeuronsAction, PerturbAction)
