"""LLM-VA on a model: the sublayer sites it reads, its weight edit as a `WeightDelta`, and the equivalent runtime
projection as an intervention (optionally per sequence, for a rule that aligns only the sequence that fired)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn
from gavel.steering.delta import WeightDelta, output_projection
from gavel.steering.intervention import gated_hooks
from gavel.steering.llmva.alignment import VectorAlignment


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
        parameter = projection.get_parameter("weight")
        delta = alignment.delta(site, parameter.T if conv1d else parameter)
        deltas[names[id(parameter)]] = delta.T if conv1d else delta
    return WeightDelta.for_model(model, handle.fingerprint(), deltas, provenance)


@dataclass(frozen=True)
class AlignmentIntervention:
    """LLM-VA's runtime projection at the selected sublayers, o' = o + (o . w) v_a with w = (sigma_a/sigma_b) v_b
    - v_a (the weight edit's map), as an intervention: what the `align` rule action runs, for one sequence."""

    sites: tuple[str, ...]
    v_a: torch.Tensor           # [K, d], unit
    w: torch.Tensor             # [K, d]

    @classmethod
    def from_alignment(cls, alignment: VectorAlignment) -> AlignmentIntervention:
        rows = [alignment.sublayers_.index(s) for s in alignment.selected_]
        v_a = torch.nn.functional.normalize(alignment.v_a_[rows].float(), dim=-1)
        v_b = torch.nn.functional.normalize(alignment.v_b_[rows].float(), dim=-1)
        ratio = (alignment.sigma_a_[rows] / alignment.sigma_b_[rows]).float()[:, None]
        return cls(tuple(alignment.selected_), v_a, ratio * v_b - v_a)

    def to(self, device: torch.device | str) -> AlignmentIntervention:
        return AlignmentIntervention(self.sites, self.v_a.to(device), self.w.to(device))

    def apply(self, act: torch.Tensor, site: str) -> torch.Tensor:
        """The projected output of one selected sublayer (float32 compute, no host synchronisation)."""
        i = self.sites.index(site)
        x = act.to(torch.promote_types(act.dtype, torch.float32))
        w, v_a = self.w[i].to(x.device, x.dtype), self.v_a[i].to(x.device, x.dtype)   # follows a device_map
        return (x + (x @ w).unsqueeze(-1) * v_a).to(act.dtype)

    def hooks(self, active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
        return gated_hooks(self.sites, self.apply, active)
