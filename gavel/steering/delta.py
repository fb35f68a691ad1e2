"""Weight deltas: additive edits of named parameters, saved as safetensors with the model's fingerprint, applied to a
model and removed again bit for bit (the originals are kept while applied, since (w + d) - d need not equal w in
floating point). LLM-VA's closed-form edits of o_proj / down_proj are such deltas.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gavel.artifacts import FittedOn, Manifest, ModelFingerprint, read_artifact, tensor_sha256, write_artifact
from gavel.errors import ArtifactError, SiteError
from gavel.models.sites import parse_site, resolve_site


class DeltaManifest(Manifest):
    """A weight delta: the model it edits and each edited parameter's digest before the edit."""

    kind: Literal["weight_delta"] = "weight_delta"
    fingerprint: ModelFingerprint
    base_sha256: dict[str, str]


def output_projection(model: torch.nn.Module, site: str) -> torch.nn.Module:
    """The linear map whose output is a block's `hook_attn_out` / `hook_mlp_out` (o_proj / down_proj and the like):
    an edit of its weight changes exactly that sublayer output. Refused where a norm sits after the projection."""
    parsed = parse_site(site)
    inner = {"hook_attn_out": "attn.hook_z", "hook_mlp_out": "mlp.hook_post"}.get(parsed.kind)
    if inner is None:
        raise SiteError(f"{site}: weight edits apply to hook_attn_out and hook_mlp_out sites")
    projection = resolve_site(model, f"blocks.{parsed.layer}.{inner}").module
    target = resolve_site(model, site).module
    if not (target is projection or any(m is projection for m in target.children())):
        raise SiteError(f"{site} is read after {type(target).__name__}, not at the output of "
                        f"{type(projection).__name__}: a weight edit of the projection cannot reproduce it")
    return projection


@dataclass
class WeightDelta:
    """Parameter name -> additive delta (in the parameter's own layout), for the model of `fingerprint`."""

    deltas: dict[str, torch.Tensor]
    fingerprint: ModelFingerprint
    base_sha256: dict[str, str]
    provenance: dict[str, str] = field(default_factory=dict)
    fitted_on: FittedOn | None = None    # the data it was fitted on (what evaluations check they do not reuse)

    @classmethod
    def for_model(cls, model: torch.nn.Module, fingerprint: ModelFingerprint, deltas: Mapping[str, torch.Tensor],
                  provenance: Mapping[str, str] | None = None) -> WeightDelta:
        """A delta for these parameters of `model`, recording their current bytes (what `apply` will check)."""
        params = dict(model.named_parameters())
        missing = [name for name in deltas if name not in params]
        if missing:
            raise ArtifactError(f"the model has no parameter(s) {', '.join(missing)}")
        return cls({k: v.detach().to("cpu").contiguous() for k, v in deltas.items()}, fingerprint,
                   {name: tensor_sha256(params[name]) for name in deltas}, dict(provenance or {}))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """One artifact: the deltas as tensors (named by parameter), the fingerprint and the base digests."""
        manifest = DeltaManifest(fingerprint=self.fingerprint, base_sha256=self.base_sha256,
                                 provenance=self.provenance, fitted_on=self.fitted_on)
        return write_artifact(directory, manifest, self.deltas)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], fingerprint: ModelFingerprint | None = None,
             force: bool = False) -> WeightDelta:
        """A saved delta; with the live model's fingerprint, one made for another model is refused unless `force`."""
        manifest, deltas = read_artifact(directory, DeltaManifest, fingerprint=fingerprint, force=force,
                                         hint="make one with `gavel align fit ... --out DIR` (its delta/ folder)")
        if set(deltas) != set(manifest.base_sha256):
            raise ArtifactError(f"{directory}: the deltas and the base digests name different parameters")
        return cls(deltas, manifest.fingerprint, manifest.base_sha256, manifest.provenance, manifest.fitted_on)

    def apply(self, model: torch.nn.Module, force: bool = False) -> AppliedDelta:
        """Add the deltas to the model's parameters in place; `remove()` on the result restores them bit for bit.
        Parameters whose current bytes differ from those the delta was made on are refused unless `force`."""
        params = dict(model.named_parameters())
        for name, delta in self.deltas.items():
            if name not in params:
                raise ArtifactError(f"the model has no parameter {name}")
            if tuple(params[name].shape) != tuple(delta.shape):
                raise ArtifactError(f"{name}: the delta is {tuple(delta.shape)}, the parameter "
                                    f"{tuple(params[name].shape)}")
            if not force and tensor_sha256(params[name]) != self.base_sha256[name]:
                raise ArtifactError(f"{name} is not the weight this delta was made for (already edited, or another "
                                    "checkpoint)", hint="remove the earlier edit first, or pass force=True")
        originals = {name: params[name].detach().clone() for name in self.deltas}
        with torch.no_grad():
            for name, delta in self.deltas.items():
                p = params[name]
                p.copy_((p.double() + delta.to(p.device, torch.float64)).to(p.dtype))
        return AppliedDelta(params, originals)

    @contextmanager
    def applied(self, model: torch.nn.Module, force: bool = False) -> Iterator[AppliedDelta]:
        """The model edited inside the block, restored bit for bit after it (also on errors)."""
        edit = self.apply(model, force=force)
        try:
            yield edit
        finally:
            edit.remove()


@dataclass
class AppliedDelta:
    """An applied edit: `remove()` copies the original parameters back."""

    params: dict[str, torch.nn.Parameter]
    originals: dict[str, torch.Tensor]

    def remove(self) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.params[name].copy_(original)
        self.originals = {}
