"""`steer_neurons(neurons=..., strength=...)` as an intervention plugin: AdaRAS's h + alpha * S' at the MLP neurons
of a `gavel neurons find` set, for the sequence whose rule fired."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from gavel.plugins.interventions import Duration, SteeringMethod

if TYPE_CHECKING:

    from pydantic import BaseModel

    from gavel.models.handle import ModelHandle
    from gavel.steering.adaras.intervention import NeuronIntervention


class SteerNeuronsArgs(Duration):
    neurons: str = Field(description="a neuron set (`gavel neurons find` output: a name or a directory)")
    strength: float = Field(description="alpha: the multiple of S' added to the MLP neurons")


class SteerNeuronsMethod(SteeringMethod):
    """`steer_neurons(neurons=..., strength=...)`: add alpha times AdaRAS's S' to the reasoning-critical neurons."""

    name: ClassVar[str] = "steer_neurons"
    params: ClassVar[type[BaseModel]] = SteerNeuronsArgs
    artifact: ClassVar[str] = "neurons"
    artifact_type: ClassVar[str] = "gavel.steering.adaras.neurons:ReasoningNeurons"

    @classmethod
    def build(cls, artifact: object, args: BaseModel, handle: ModelHandle) -> NeuronIntervention:
        from gavel.steering.adaras.intervention import NeuronIntervention
        from gavel.steering.adaras.neurons import ReasoningNeurons

        if not isinstance(artifact, ReasoningNeurons) or not isinstance(args, SteerNeuronsArgs):
            raise TypeError("steer_neurons is built from ReasoningNeurons and SteerNeuronsArgs")
        return NeuronIntervention.from_neurons(artifact, args.strength).to(handle.device)
