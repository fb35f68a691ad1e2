"""Rules that intervene: each steering rule's method (from the `gavel.interventions` registry), its artifact and its
intervention, and per batch which sequences each one acts on.

`rule_interventions` resolves each rule whose action is an intervention method: its artifact is an object the
monitor was given (`artifacts={name: obj}`), a folder the monitor was given by name, or a folder relative to the
rule's file; the method builds the intervention on the model's device. The monitor knows nothing about any method:
`rotate`, `align` and a plugin's own action are all resolved here the same way. A `Steerer` holds, per batch, which
sequences each rule steers (bool tensors the hooks read, updated in place after every forward), so the other
sequences of the batch are untouched.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gavel.errors import ArtifactError, GavelError, RuleError
from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn
from gavel.plugins.actions import Action
from gavel.plugins.interventions import Intervention, InterventionMethod, PromptIntervention
from gavel.plugins.registry import registry
from gavel.rules.source import RuleErrors

Artifacts = Mapping[str, object]
"""Artifact name (as rules write it) -> a fitted artifact object, or a folder (str or PathLike) holding one."""


@dataclass(frozen=True)
class RuleIntervention:
    """Rule `index` (in the monitor's reported rules) acts through `intervention`: on the prompt of the sequences it
    holds on while the prompt is read (`reads_prompt`), or from the forward after it fires, for `duration` forwards
    or to the end of the generation."""

    index: int
    intervention: Intervention
    duration: int | None
    reads_prompt: bool


def rule_interventions(rules: Sequence, actions: Sequence[type[Action]], handle: ModelHandle,
                       artifacts: Artifacts | None = None) -> list[RuleIntervention]:
    """The rules whose action is an intervention method, each with its intervention on the handle's device; every
    artifact that cannot be found, loaded or used is a RuleError located at its rule's action (all at once)."""
    methods = registry().interventions
    found: list[RuleIntervention] = []
    errors: list[RuleError] = []
    cache: dict[tuple[object, Path], object] = {}
    for index, (rule, action) in enumerate(zip(rules, actions)):
        method = methods.get(rule.action_call.name)
        if method is None or method is not action:
            continue
        args = method.params.model_validate(dict(rule.action_call.args))
        try:
            artifact = _artifact(method, str(getattr(args, method.artifact)), rule, handle, artifacts or {}, cache)
            intervention = method.build(artifact, args, handle)
        except GavelError as e:
            errors.append(rule.action_error(f"rule '{rule.name}': {e.message}", 0, hint=e.hint))
            continue
        if method.reads_prompt and not isinstance(intervention, PromptIntervention):
            errors.append(rule.action_error(f"rule '{rule.name}': '{method.name}' reads the prompt, but its "
                                            f"{type(intervention).__name__} has no for_prompt(mask)", 0))
            continue
        found.append(RuleIntervention(index, intervention, getattr(args, "duration", None), method.reads_prompt))
    if errors:
        raise RuleErrors(errors)
    return found


def _artifact(method: type[InterventionMethod], name: str, rule, handle: ModelHandle, artifacts: Artifacts,
              cache: dict[tuple[object, Path], object]) -> object:
    """An artifact object the monitor was given, else a folder (given by name, or relative to the rule's file, or to
    the working directory) loaded by the method once per monitor."""
    given = artifacts.get(name)
    if given is not None and not isinstance(given, (str, os.PathLike)):
        if not method.accepts(given):
            raise ArtifactError(f"artifact {name!r} given to the monitor is a {type(given).__name__}, which "
                                f"'{method.name}' cannot use")
        return given
    path = Path(given if given is not None else name)
    if given is None and not path.is_absolute() and rule.source is not None:
        path = Path(rule.source.path).parent / path
    loader = getattr(method.load, "__func__", method.load)   # methods sharing a loader share what it loaded
    if (loader, path) not in cache:
        if not path.is_dir():
            known = f"; artifacts given: {', '.join(sorted(artifacts))}" if artifacts else ""
            raise ArtifactError(f"steering artifact {name!r} is neither a name the monitor was given nor a "
                                f"directory ({path} does not exist){known}",
                                hint="fit one (gavel steer fit, align fit, neurons find, decon train), or pass "
                                     "Monitor(..., artifacts={name: path})")
        cache[(loader, path)] = method.load(path, handle)
    return cache[(loader, path)]


class Steerer:
    """Per batch: which sequences each steering rule steers. The hooks read `active[i]`, a view updated in place.

    A rule that fired while the prompt was read (`start_in_prompt`, decided by the monitor's detection forward)
    steers its sequence from the firing token on: in a forward fed from position 0 (the prompt, or a whole prefix
    fed again without a KV cache, `from_start`), the positions before the firing token keep their activations."""

    def __init__(self, rules: Sequence[RuleIntervention], batch_size: int, device: torch.device) -> None:
        self.rules = list(rules)
        self.active = torch.zeros(len(self.rules), batch_size, dtype=torch.bool, device=device)
        self.left = torch.zeros(len(self.rules), batch_size, dtype=torch.long, device=device)
        self.held = torch.zeros(len(self.rules), batch_size, dtype=torch.bool, device=device)  # at the last token
        self.limits = torch.tensor([r.duration or 0 for r in self.rules], dtype=torch.long, device=device)
        self.limited = self.limits > 0
        self.start = torch.zeros(len(self.rules), batch_size, dtype=torch.long, device=device)  # first steered token
        self.started = torch.zeros(len(self.rules), batch_size, dtype=torch.bool, device=device)  # in the prompt
        self.gated = False       # some rule fired in a prompt: forwards from position 0 gate by `start`
        self.from_start = False  # this forward is fed from position 0 (set by the session before each forward)
        self.prompt_pass = False  # this forward is the prompt's (likewise)

    def start_in_prompt(self, start: torch.Tensor) -> None:
        """Rules fired while the prompts were read: `start` [R, B] is each rule's firing token per sequence (at
        least the prompt's width where it did not fire); those sequences are steered from that token on."""
        fired = start < torch.iinfo(torch.long).max
        self.active |= fired
        self.left.copy_(torch.where(fired, self.limits[:, None], self.left))
        self.start.copy_(torch.where(fired, start, 0))
        self.started.copy_(fired)
        self.gated = bool(fired.any())    # once per batch, before the prompt's forward

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(site, self._from_start_token(i, fn)) for i, rule in enumerate(self.rules)
                for site, fn in rule.intervention.hooks(self.active[i])]

    def _from_start_token(self, i: int, fn: HookFn) -> HookFn:
        """`fn`, except that in a forward fed from position 0 each sequence's tokens before rule i's firing token
        keep their activations (`fn` runs on a copy: it may change its input in place)."""
        def hook(act: torch.Tensor) -> torch.Tensor | None:
            if not (self.gated and self.from_start):
                return fn(act)
            copy = act.clone()
            new = fn(copy)
            new = copy if new is None else new
            positions = torch.arange(act.shape[1], device=act.device)
            keep = (positions[None, :] >= self.start[i].to(act.device)[:, None]).view(*act.shape[:2],
                                                                                     *([1] * (act.ndim - 2)))
            return torch.where(keep, new, act)
        return hook

    def update(self, holds: torch.Tensor) -> None:
        """After a forward (holds: bool [B, T, R]): a rule that starts to hold at one of its tokens steers that
        sequence from the next forward on (a limited rule for `duration` forwards from its latest start; a rule
        latched by conversation mode starts once); limited ones count down."""
        if not self.rules:
            return
        now = holds[..., [r.index for r in self.rules]].permute(2, 0, 1)      # [R_s, B, T]
        before = torch.cat([self.held.unsqueeze(-1), now[..., :-1]], dim=-1)
        edges = now & ~before
        if self.gated and self.prompt_pass:   # the firing that started a rule in the prompt is not a new start
            positions = torch.arange(now.shape[-1], device=now.device)
            edges &= ~(self.started[..., None] & (positions <= self.start[..., None]))
        fired = edges.any(-1)
        if now.shape[-1]:
            self.held.copy_(now[..., -1])
        self.left.sub_(self.active.long()).clamp_(min=0)
        self.left.copy_(torch.where(fired, self.limits[:, None], self.left))
        self.active.copy_(torch.where(self.limited[:, None], self.left > 0, self.active | fired))
