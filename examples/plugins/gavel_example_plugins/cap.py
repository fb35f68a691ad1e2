"""`cap(plane=..., limit=...)`: activation capping, an intervention added from outside gavel.

Where its rule fires, the activations of that sequence are capped along the first axis b of a fitted steering plane
(`gavel steer fit`): h' = h - max(0, h . b - limit) b, so the component along b never exceeds `limit` while
everything orthogonal to b is untouched. Registered in the `gavel.interventions` entry-point group, it is a rule
action like `rotate`: the monitor finds it in the registry, loads its artifact, and gates it to the rows that fired.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from gavel.plugins.interventions import Duration, SteeringMethod
from gavel.steering.intervention import gated_hooks
from gavel.steering.selective.plane import SteeringPlane


class CapArgs(Duration):
    plane: str = Field(description="a steering plane whose first axis is capped (a name or a directory)")
    limit: float = Field(description="the largest component along the axis the activations may keep")
    layers: str = Field(default="auto", pattern=r"^(auto|all|\d+(-\d+)?)$")


@dataclass(frozen=True)
class Cap:
    """The intervention: cap the component along `axis` at `limit` at `sites`."""

    sites: tuple[str, ...]
    axis: torch.Tensor          # [d], unit
    limit: float

    def to(self, device) -> Cap:
        return replace(self, axis=self.axis.to(device))

    def apply(self, act: torch.Tensor, site: str) -> torch.Tensor:
        axis = self.axis.to(act.device, act.dtype)
        excess = (act @ axis - self.limit).clamp(min=0)
        return act - excess.unsqueeze(-1) * axis

    def hooks(self, active: torch.Tensor | None = None):
        return gated_hooks(self.sites, self.apply, active)


class CapMethod(SteeringMethod):
    """`cap(plane=..., limit=...)`: activation capping along a steering plane's first axis."""

    name: ClassVar[str] = "cap"
    params: ClassVar[type[BaseModel]] = CapArgs
    artifact: ClassVar[str] = "plane"                 # the argument that names the artifact
    artifact_type: ClassVar[str] = "gavel.steering.selective.plane:SteeringPlane"   # gives `load` and `accepts`

    @classmethod
    def build(cls, artifact: SteeringPlane, args: CapArgs, handle) -> Cap:
        return Cap(tuple(artifact.sites_in(args.layers)), artifact.plane_[:, 0].float(), args.limit).to(handle.device)
