"""DeconIEP as an intervention: G's bounded perturbation added to a batch's prompt embeddings (`hook_embed`), in the
rows where `active` is True, for a monitor whose `perturb` rule held on those prompts.

One `hooks(active)` serves one batch (the monitor asks for fresh hooks per batch): its first forward is the prompt,
whose delta is computed once (zero at padded positions and in inactive rows); a later forward that reads the prompt
again (generation without a KV cache) gets the same delta on the prompt's positions, and generated tokens never get
one. `for_prompt(mask)` tells it the batch's real prompt tokens, which G's attention must not mix with padding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gavel.decon.perturb import prompt_delta
from gavel.decon.train import DeconIEP
from gavel.errors import check_is_fitted
from gavel.models.hooks import HookFn


@dataclass(frozen=True)
class EmbeddingPerturbation:
    """`zeta * tanh(G(e))` on the prompt embeddings; `prompt_mask` [B, P]: the real tokens of the batch's prompts."""

    generator: torch.nn.Module
    zeta: float
    prompt_mask: torch.Tensor | None = None

    @classmethod
    def from_decon(cls, decon: DeconIEP, zeta: float | None = None) -> EmbeddingPerturbation:
        """A fitted DeconIEP's G, bounded by `zeta` (default: the fitted one)."""
        check_is_fitted(decon, ("generator_",))
        return cls(decon.generator_, float(decon.zeta if zeta is None else zeta))

    def to(self, device: torch.device | str) -> EmbeddingPerturbation:
        """G moved to `device` (in place: the network is shared with the DeconIEP it came from)."""
        self.generator.to(device)
        return replace(self, prompt_mask=None if self.prompt_mask is None else self.prompt_mask.to(device))

    def for_prompt(self, mask: torch.Tensor) -> EmbeddingPerturbation:
        """The same perturbation for a batch whose prompts' real tokens are `mask` [B, P]."""
        return replace(self, prompt_mask=mask)

    def hooks(self, active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
        return [("hook_embed", _PromptHook(self, active))]


class _PromptHook:
    """The hook on one batch's token embeddings: the delta of its first forward (the prompt), kept for re-reads."""

    def __init__(self, perturbation: EmbeddingPerturbation, active: torch.Tensor | None) -> None:
        self.perturbation, self.active = perturbation, active
        self.delta: torch.Tensor | None = None

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor | None:
        p = self.perturbation
        if self.delta is None:
            mask = p.prompt_mask
            if mask is None or tuple(mask.shape) != tuple(embeds.shape[:2]):
                mask = torch.ones(embeds.shape[:2], dtype=torch.bool)   # not this batch's: every token is real
            self.delta = prompt_delta(p.generator, embeds, mask.to(embeds.device).bool(), p.zeta, self.active)
            return embeds + self.delta
        width = self.delta.shape[1]
        if embeds.shape[1] <= width:
            return None          # a generated token (KV cache)
        out = embeds.clone()
        out[:, :width] = embeds[:, :width] + self.delta
        return out
