"""Steering with a fitted plane: a method applied to the activations at the plane's sites, as an intervention.

A `PlaneIntervention` is pure data (method, sites, tensors, strength) following the intervention contract
(`gavel.plugins.interventions`): `hooks(active)` turns it into hook functions for `ModelHandle.hooks`, steering only
the rows where `active` is True. The math lives in `geometry`; this module only moves tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from gavel.errors import DataError, one_of
from gavel.models.hooks import HookFn
from gavel.steering.intervention import gated_hooks
from gavel.steering.selective.geometry import add_direction, angular_steer, project_out, rotate_in_plane
from gavel.steering.selective.plane import SteeringPlane

Method = Literal["rotate", "angular", "angular_adaptive", "add", "ablate"]
METHODS: tuple[Method, ...] = ("rotate", "angular", "angular_adaptive", "add", "ablate")


def steering_method(name: str) -> Method:
    """`name` as a steering method; DataError for an unknown one."""
    return one_of(name, METHODS, "steering method")


@dataclass(frozen=True)
class PlaneIntervention:
    """`rotate` / `angular` / `angular_adaptive` by `strength` degrees in the plane, `add` `strength` times each
    site's difference of class means, or `ablate` the plane's first axis (b1), at `sites`."""

    method: Method
    sites: tuple[str, ...]
    strength: float
    plane: torch.Tensor                 # [d, 2]: b1, b2
    vectors: torch.Tensor               # [n_sites, d]: per-site mean_pos - mean_neg (for `add`)

    @classmethod
    def from_plane(cls, plane: SteeringPlane, method: Method, strength: float = 0.0,
                   sites: Sequence[str] | None = None) -> PlaneIntervention:
        """An intervention at the plane's selected sites (or the given ones, which it must have been fitted on)."""
        method = steering_method(method)
        chosen = list(plane.selected_sites if sites is None else sites)
        unknown = [s for s in chosen if s not in plane.sites_]
        if unknown:
            raise DataError(f"the plane was not fitted on site(s) {', '.join(unknown)}",
                            hint=f"its sites: {', '.join(plane.sites_)}")
        rows = [plane.sites_.index(s) for s in chosen]
        vectors = (plane.mean_pos_ - plane.mean_neg_)[rows] if rows else plane.mean_pos_[:0]
        return cls(method, tuple(chosen), float(strength), plane.plane_, vectors)

    def to(self, device: torch.device | str) -> PlaneIntervention:
        return replace(self, plane=self.plane.to(device), vectors=self.vectors.to(device))

    def apply(self, act: torch.Tensor, site: str) -> torch.Tensor:
        """The steered activation [..., d] at one of the intervention's sites (on a model spread over devices, the
        tensors follow the activation; a no-op on one device)."""
        plane = self.plane.to(act.device)
        if self.method == "rotate":
            return rotate_in_plane(act, plane, self.strength)
        if self.method in ("angular", "angular_adaptive"):
            return angular_steer(act, plane, self.strength, adaptive=self.method == "angular_adaptive")
        if self.method == "add":
            return add_direction(act, self.vectors[self.sites.index(site)].to(act.device), self.strength)
        return project_out(act, plane[:, 0])      # the plane's columns are unit vectors

    def hooks(self, active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
        """(site, hook) pairs; with `active` (bool [batch]), rows where it is False pass through unchanged."""
        return gated_hooks(self.sites, self.apply, active)
