"""LLM-VA on a model: the sublayer sites it reads, its weight edit as a `WeightDelta`, and the equivalent runtime
projection as hooks (optionally per sequence, for a rule that aligns only the sequence that fired)."""
from __future__ import annotations

import torch

from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn
from gavel.steering.alignment import VectorAlignment
from gavel.steering.delta import WeightDelta, output_projection


def sublayer_sites(n_layers: int) -> list[str]:
    """Every block's attention and MLP output (before the residual add): LLM-VA's 2N candidate sublayers."""
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in ("hook_attn_out", "hook_mlp_out")]


def final_site(n_layers: int) -> str:
    """The final residual stream (the last block's output, before the final norm)."""
    return f"blocks.{n_layers - 1}.hook_resid_post"


def alignment_delta(handle: ModelHandle, alignment: VectorAlignment,
                    provenance: dict[str, str] | None = None) -> WeightDelta:
    """The closed-form edit of each selected sublayer's output projection, as a delta of its weight parameter
    (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out], transposed accordingly)."""
    model = handle.hf_model
    names = {id(p): n for n, p in model.named_parameters()}
    deltas = {}
    for site in alignment.selected_:
        projection = output_projection(model, site)
        conv1d = type(projection).__name__ == "Conv1D"      # transformers' GPT-2 layer: weight [in, out]
        weight = projection.weight.T if conv1d else projection.weight
        delta = alignment.delta(site, weight)
        deltas[names[id(projection.weight)]] = delta.T if conv1d else delta
    return WeightDelta.for_model(model, handle.fingerprint(), deltas, provenance)


def alignment_hooks(alignment: VectorAlignment, active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
    """Runtime projection at the selected sublayers (the same map as the weight edit for bias-free projections);
    with `active` (bool [batch]) only those rows are changed."""
    def hook_for(site: str) -> HookFn:
        def hook(act: torch.Tensor) -> torch.Tensor:
            projected = alignment.project(site, act)
            if active is None:
                return projected
            return torch.where(active.view(-1, *([1] * (act.ndim - 1))), projected, act)
        return hook
    return [(site, hook_for(site)) for site in alignment.selected_]
