"""Steering as a rule action: `rotate(plane=..., angle=...)`, `add(vector=..., strength=...)`, `ablate(direction=...)`
steer the sequence that fired, from the next forward pass on, for the rest of the generation or `duration` tokens.

`steering_rules` resolves each steering rule's artifact (a name the monitor was given, or a directory, relative to
the rule's file) into an `Intervention` at its blocks; a `Steerer` holds, per batch, which sequences each rule steers
(bool tensors the hooks read, updated in place after every forward) so other sequences of the batch are untouched.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gavel.decon.train import DeconIEP
from gavel.errors import ArtifactError, GavelError, RuleError
from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn
from gavel.models.sites import parse_site
from gavel.steering.adaras.intervention import NeuronIntervention
from gavel.steering.llmva.edit import AlignmentIntervention
from gavel.steering.llmva.alignment import VectorAlignment
from gavel.steering.selective.intervene import Intervention
from gavel.steering.neuron_sets import load_neurons
from gavel.steering.adaras.neurons import ReasoningNeurons
from gavel.steering.selective.plane import SteeringPlane

Artifacts = Mapping[str, "SteeringPlane | VectorAlignment | ReasoningNeurons | DeconIEP | str | os.PathLike[str]"]
_ARTIFACT_ARGUMENT = {"rotate": "plane", "add": "vector", "ablate": "direction", "align": "alignment",
                      "steer_neurons": "neurons", "perturb": "perturbation"}
_STRENGTH_ARGUMENT = {"rotate": "angle", "add": "strength"}


@dataclass(frozen=True)
class SteeringRule:
    """Rule `index` (in the monitor's reported rules) steers with `intervention` (a plane's `Intervention`, an
    `AlignmentIntervention` or a `NeuronIntervention`), for `duration` forwards or to the end of the generation."""

    index: int
    intervention: Intervention | AlignmentIntervention | NeuronIntervention
    duration: int | None


@dataclass(frozen=True)
class PerturbationRule:
    """Rule `index` (in the monitor's reported rules) has the sequences it holds on while the prompt is read
    generated from prompt embeddings perturbed by `perturbation` (bounded by `zeta`, None: the trained bound)."""

    index: int
    perturbation: DeconIEP
    zeta: float | None


def steering_rules(rules: Sequence, actions: Sequence[type], handle: ModelHandle,
                   artifacts: Artifacts | None = None) -> list[SteeringRule | PerturbationRule]:
    """The rules whose action steers, each with its intervention on the handle's device (or, for `perturb`, its
    input perturbation); RuleErrors (located at the action) for artifacts that cannot be found or loaded, or blocks
    the artifact does not cover."""
    found, errors, cache = [], [], {}
    for index, (rule, action) in enumerate(zip(rules, actions)):
        if getattr(action, "kind", None) != "steer":
            continue
        args = action.params.model_validate(dict(rule.action_call.args))
        name = getattr(args, _ARTIFACT_ARGUMENT[action.method])
        try:
            if action.method == "perturb":
                perturbation = _artifact(name, rule, handle, artifacts or {}, cache, kind="perturbation")
                found.append(PerturbationRule(index, perturbation, args.zeta))
                continue
            if action.method == "align":
                alignment = _artifact(name, rule, handle, artifacts or {}, cache, kind="alignment")
                intervention = AlignmentIntervention.from_alignment(alignment).to(handle.device)
            elif action.method == "steer_neurons":
                neurons = _artifact(name, rule, handle, artifacts or {}, cache, kind="neurons")
                intervention = NeuronIntervention.from_neurons(neurons, args.strength).to(handle.device)
            else:
                plane = _artifact(name, rule, handle, artifacts or {}, cache)
                sites = _sites(plane, args.layers)
                strength = getattr(args, _STRENGTH_ARGUMENT.get(action.method, ""), 0.0)
                intervention = Intervention.from_plane(plane, action.method, strength, sites).to(handle.device)
        except GavelError as e:
            errors.append(rule.action_error(f"rule '{rule.name}': {e.message}", 0, hint=e.hint))
            continue
        found.append(SteeringRule(index, intervention, args.duration))
    if errors:
        from gavel.rules.source import RuleErrors

        raise RuleErrors(errors)
    return found


def _artifact(name: str, rule, handle: ModelHandle, artifacts: Artifacts, cache: dict, kind: str = "plane"):
    """A named artifact the monitor was given (a fitted plane or alignment, or a directory), else a directory
    relative to the rule's file (or the working directory); loaded once, refused when fitted on another model."""
    given = artifacts.get(name)
    if isinstance(given, (SteeringPlane, VectorAlignment, ReasoningNeurons, DeconIEP)):
        return given
    path = Path(given if given is not None else name)
    if given is None and not path.is_absolute() and rule.source is not None:
        path = Path(rule.source.path).parent / path
    if path not in cache:
        if not path.is_dir():
            known = f"; artifacts given: {', '.join(sorted(artifacts))}" if artifacts else ""
            raise ArtifactError(f"steering artifact {name!r} is neither a name the monitor was given nor a "
                                f"directory ({path} does not exist){known}",
                                hint="fit one with `gavel steer fit`, or pass Monitor(..., artifacts={name: path})")
        loaders = {"alignment": lambda: _load_alignment(path, handle),
                   "neurons": lambda: load_neurons(path, handle.fingerprint()),
                   "perturbation": lambda: DeconIEP.load(path, handle.fingerprint()),
                   "plane": lambda: SteeringPlane.load_artifact(path, handle.fingerprint())[0]}
        cache[path] = loaders[kind]()
    return cache[path]


def _load_alignment(path: Path, handle: ModelHandle) -> VectorAlignment:
    """A `gavel align fit` folder: its alignment, after its delta's fingerprint says it was fitted on this model."""
    from gavel.steering.delta import WeightDelta

    if not (path / "alignment").is_dir() or not (path / "delta").is_dir():
        raise ArtifactError(f"{path} is not an LLM-VA folder (needs alignment/ and delta/ from `gavel align fit`)")
    WeightDelta.load(path / "delta", handle.fingerprint())
    return VectorAlignment.load(path / "alignment")


def _sites(plane: SteeringPlane, layers: str) -> list[str]:
    """The artifact's sites in the blocks `layers` names: "auto" (its selected blocks), "all", "L" or "L-M"."""
    if layers == "auto":
        chosen = plane.selected_sites
    elif layers == "all":
        chosen = list(plane.sites_)
    else:
        low, _, high = layers.partition("-")
        span = range(int(low), int(high or low) + 1)
        chosen = [s for s in plane.sites_ if parse_site(s).layer in span]
    if not chosen:
        fitted = sorted({parse_site(s).layer for s in plane.sites_})
        raise RuleError(f"the steering artifact has no sites in layers {layers!r} (selected blocks: "
                        f"{plane.selected_layers or 'none'}; fitted on blocks {fitted})")
    return chosen


class Steerer:
    """Per batch: which sequences each steering rule steers. The hooks read `active[i]`, a view updated in place."""

    def __init__(self, rules: Sequence[SteeringRule], batch_size: int, device: torch.device) -> None:
        self.rules = list(rules)
        self.active = torch.zeros(len(self.rules), batch_size, dtype=torch.bool, device=device)
        self.left = torch.zeros(len(self.rules), batch_size, dtype=torch.long, device=device)
        self.held = torch.zeros(len(self.rules), batch_size, dtype=torch.bool, device=device)  # at the last token
        self.limits = torch.tensor([r.duration or 0 for r in self.rules], dtype=torch.long, device=device)
        self.limited = self.limits > 0

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [pair for i, rule in enumerate(self.rules) for pair in rule.intervention.hooks(self.active[i])]

    def update(self, holds: torch.Tensor) -> None:
        """After a forward (holds: bool [B, T, R]): a rule that starts to hold at one of its tokens steers that
        sequence from the next forward on (a limited rule for `duration` forwards from its latest start; a rule
        latched by conversation mode starts once); limited ones count down."""
        if not self.rules:
            return
        now = holds[..., [r.index for r in self.rules]].permute(2, 0, 1)      # [R_s, B, T]
        before = torch.cat([self.held.unsqueeze(-1), now[..., :-1]], dim=-1)
        fired = (now & ~before).any(-1)
        if now.shape[-1]:
            self.held.copy_(now[..., -1])
        self.left.sub_(self.active.long()).clamp_(min=0)
        self.left.copy_(torch.where(fired, self.limits[:, None], self.left))
        self.active.copy_(torch.where(self.limited[:, None], self.left > 0, self.active | fired))
