"""The plane-based steering actions, as intervention plugins: `rotate` (Selective Steering), `add` (activation
addition) and `ablate` (directional ablation), each built from a fitted `SteeringPlane` at the blocks `layers` names.

    rotate(plane="refusal", angle=60, layers="2-5", duration=8)
    add(vector="refusal", strength=0.8)
    ablate(direction="refusal")

(torch is imported only when one is built: rules that name these actions are parsed and linted without it.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from gavel.plugins.interventions import Duration, SteeringMethod

if TYPE_CHECKING:

    from pydantic import BaseModel

    from gavel.models.handle import ModelHandle
    from gavel.steering.selective.intervene import Method, PlaneIntervention


class PlaneArgs(Duration):
    """Where a plane-based action acts: the plane's selected blocks (`layers="auto"`), all of its blocks (`"all"`)
    or a range (`"2-5"`, `"3"`)."""

    layers: str = Field(default="auto", pattern=r"^(auto|all|\d+(-\d+)?)$")


class RotateArgs(PlaneArgs):
    plane: str = Field(description="the steering plane (a name the monitor was given, or a directory)")
    angle: float = Field(description="degrees")


class AddArgs(PlaneArgs):
    vector: str = Field(description="the steering plane whose per-site difference of class means is added")
    strength: float


class AblateArgs(PlaneArgs):
    direction: str = Field(description="the steering plane whose first axis (b1) is projected out")


class PlaneMethod(SteeringMethod):
    """A steering action applied with a `SteeringPlane`: `method` is the `PlaneIntervention` method, `strength` the
    argument that holds its strength (None: it has none)."""

    name: ClassVar[str]                  # set by each method (see `SteeringMethod`)
    params: ClassVar[type[BaseModel]]
    artifact: ClassVar[str]
    artifact_type: ClassVar[str] = "gavel.steering.selective.plane:SteeringPlane"
    method: ClassVar[Method]
    strength: ClassVar[str | None] = None

    @classmethod
    def build(cls, artifact: object, args: BaseModel, handle: ModelHandle) -> PlaneIntervention:
        from gavel.steering.selective.intervene import PlaneIntervention
        from gavel.steering.selective.plane import SteeringPlane

        if not isinstance(artifact, SteeringPlane) or not isinstance(args, PlaneArgs):
            raise TypeError(f"{cls.name} is built from a SteeringPlane and {cls.params.__name__}")
        strength = float(getattr(args, cls.strength)) if cls.strength else 0.0
        return PlaneIntervention.from_plane(artifact, cls.method, strength,
                                            artifact.sites_in(args.layers)).to(handle.device)


class RotateMethod(PlaneMethod):
    """`rotate(plane=..., angle=...)`: rotate the activations in the plane by `angle` degrees (Selective Steering)."""

    name: ClassVar[str] = "rotate"
    params: ClassVar[type[BaseModel]] = RotateArgs
    artifact: ClassVar[str] = "plane"
    method: ClassVar[Method] = "rotate"
    strength: ClassVar[str | None] = "angle"


class AddMethod(PlaneMethod):
    """`add(vector=..., strength=...)`: add `strength` times the plane's per-site difference of class means."""

    name: ClassVar[str] = "add"
    params: ClassVar[type[BaseModel]] = AddArgs
    artifact: ClassVar[str] = "vector"
    method: ClassVar[Method] = "add"
    strength: ClassVar[str | None] = "strength"


class AblateMethod(PlaneMethod):
    """`ablate(direction=...)`: project the plane's first axis out of the activations."""

    name: ClassVar[str] = "ablate"
    params: ClassVar[type[BaseModel]] = AblateArgs
    artifact: ClassVar[str] = "direction"
    method: ClassVar[Method] = "ablate"

