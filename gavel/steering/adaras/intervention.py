"""AdaRAS on a model: reasoning-critical neurons fitted from sampled traces, saved with the model's fingerprint, and
the intervention that adds alpha * S' to the MLP intermediate activations at every forward pass."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gavel.models.hooks import HookFn
from gavel.steering.adaras.neurons import ReasoningNeurons
from gavel.steering.adaras.traces import Problem
from gavel.steering.intervention import gated_hooks


@dataclass(frozen=True)
class NeuronIntervention:
    """h + alpha * S'_l at each layer's MLP intermediate activations (the layers with kept neurons)."""

    sites: tuple[str, ...]
    vectors: torch.Tensor        # [L, m]: S' of those layers
    alpha: float

    @classmethod
    def from_neurons(cls, neurons: ReasoningNeurons, alpha: float) -> NeuronIntervention:
        rows = [i for i in range(len(neurons.sites_)) if bool(neurons.kept_[i].any())]
        return cls(tuple(neurons.sites_[i] for i in rows), neurons.vectors_[rows].float(), float(alpha))

    def to(self, device: torch.device | str) -> NeuronIntervention:
        return NeuronIntervention(self.sites, self.vectors.to(device), self.alpha)

    def apply(self, act: torch.Tensor, site: str) -> torch.Tensor:
        x = act.to(torch.promote_types(act.dtype, torch.float32))
        return (x + self.alpha * self.vectors[self.sites.index(site)].to(x.device, x.dtype)).to(act.dtype)

    def hooks(self, active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
        return gated_hooks(self.sites, self.apply, active)


def accuracy(handle, problems: Sequence[Problem], checker, max_new_tokens: int = 96) -> float:
    """Greedy accuracy of the model as it is now (hooks included) on the problems."""
    from gavel.models.generation import generate_replies

    replies = generate_replies(handle, [p.conversation for p in problems], max_new_tokens)
    return round(sum(checker(r, p.expected) for r, p in zip(replies, problems)) / len(problems), 4)


def gated_accuracy(handle, problems: Sequence[Problem], checker, intervention: NeuronIntervention, steer: torch.Tensor,
                   max_new_tokens: int = 96) -> float:
    """Greedy accuracy when only the problems with `steer` (bool [P], e.g. the gate's prediction) are steered."""
    chosen = [p for p, s in zip(problems, steer.tolist()) if s]
    rest = [p for p, s in zip(problems, steer.tolist()) if not s]
    correct = 0.0
    if chosen:
        with handle.hooks(intervention.to(handle.device).hooks()):
            correct += accuracy(handle, chosen, checker, max_new_tokens) * len(chosen)
    if rest:
        correct += accuracy(handle, rest, checker, max_new_tokens) * len(rest)
    return round(correct / len(problems), 4)
