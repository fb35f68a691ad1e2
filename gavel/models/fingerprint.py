"""A model fingerprint that artifacts store, so they refuse to load on another model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from gavel.errors import ArtifactError


class ModelFingerprint(BaseModel):
    """Name, architecture, sizes and a hash of a few weights: enough to tell two models apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    architecture: str
    d_model: int
    n_layers: int
    weights_sha256: str

    def check(self, other: "ModelFingerprint", what: str = "artifact") -> None:
        """ArtifactError naming the first field where `other` (the live model) differs."""
        for field in ("architecture", "d_model", "n_layers", "weights_sha256"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise ArtifactError(
                    f"{what} was made for model {self.name!r} but is being used with {other.name!r}: "
                    f"{field} is {mine!r} in the {what}, {theirs!r} in the model",
                    hint="fit it again on this model, or pass --force if you know they are compatible")


def weights_digest(model: torch.nn.Module, n_tensors: int = 4, n_values: int = 4096) -> str:
    """SHA-256 over the first values of the first and last few parameter tensors (fast on any size)."""
    params = list(model.parameters())
    chosen = params[:n_tensors // 2] + params[-(n_tensors - n_tensors // 2):]
    h = hashlib.sha256()
    for p in chosen:
        flat = p.detach().reshape(-1)[:n_values].to("cpu", torch.float32).contiguous()
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


Manifest = TypeVar("Manifest", bound=BaseModel)


def read_manifest(path: Path, model: type[Manifest], what: str, *, fingerprint: ModelFingerprint | None = None,
                  force: bool = False, hint: str | None = None) -> Manifest:
    """An artifact's JSON manifest (with `format_version` and `fingerprint` fields): missing, invalid or of another
    format version is an ArtifactError; with the live model's fingerprint, one made for another model is refused
    (the differing field named) unless `force`."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not a {what} (no {path.name})", hint=hint)
    try:
        manifest = model.model_validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: invalid {what} manifest: {e}") from None
    supported = model.model_fields["format_version"].default
    if manifest.format_version != supported:
        raise ArtifactError(f"{path}: format_version {manifest.format_version} is not supported "
                            f"(this gavel reads {supported})")
    if fingerprint is not None and not force:
        manifest.fingerprint.check(fingerprint, what=f"{what} {path.parent}")
    return manifest
