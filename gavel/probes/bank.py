"""The CE bank: calibrated linear CE detectors grouped by site, saved as safetensors + a JSON manifest."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gavel.errors import ArtifactError, did_you_mean
from gavel.models.fingerprint import ModelFingerprint
from gavel.probes.linear import LinearProbe

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "bank.safetensors"


class CESpec(BaseModel):
    """One cognitive element: where it is read, how, and the threshold above which it fires."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    site: str
    extractor: Literal["linear_probe"] = "linear_probe"
    threshold: float = Field(description="fires when the probability is above this")
    auroc: float | None = None
    support: int | None = None


class BankManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    kind: Literal["ce_bank"] = "ce_bank"
    ces: list[CESpec]
    fingerprint: ModelFingerprint
    provenance: dict[str, str] = {}


class CEBank:
    """All CEs of a model; per site one [d, k] weight matrix, so scoring a site is one matmul."""

    def __init__(self, manifest: BankManifest, weights: dict[str, torch.Tensor]) -> None:
        self.manifest = manifest
        self.names: list[str] = [c.name for c in manifest.ces]
        if len(set(self.names)) != len(self.names):
            raise ArtifactError("CE names in a bank must be unique")
        self.sites: list[str] = list(dict.fromkeys(c.site for c in manifest.ces))
        self.columns: dict[str, list[int]] = {s: [i for i, c in enumerate(manifest.ces) if c.site == s]
                                              for s in self.sites}
        for s in self.sites:
            k = len(self.columns[s])
            if weights[f"{s}/weight"].shape[1] != k or weights[f"{s}/bias"].shape != (k,):
                raise ArtifactError(f"bank tensors for site {s!r} do not match its {k} CEs")
        self.weights = weights
        self.thresholds = torch.tensor([c.threshold for c in manifest.ces], dtype=torch.float32)

    @classmethod
    def from_probes(cls, probes: Sequence[LinearProbe], thresholds: Sequence[Sequence[float]],
                    fingerprint: ModelFingerprint, aurocs: Sequence[Sequence[float]] | None = None,
                    provenance: dict[str, str] | None = None) -> "CEBank":
        """A bank from fitted probes (one per site) and each probe's per-CE thresholds."""
        ces, weights = [], {}
        for i, probe in enumerate(probes):
            for j, name in enumerate(probe.ce_names_):
                a = None if aurocs is None else float(aurocs[i][j])
                ces.append(CESpec(name=name, site=probe.site, threshold=float(thresholds[i][j]), auroc=a))
            weights[f"{probe.site}/weight"] = probe.coef_.detach().cpu().float().contiguous()
            weights[f"{probe.site}/bias"] = probe.intercept_.detach().cpu().float().contiguous()
        return cls(BankManifest(ces=ces, fingerprint=fingerprint, provenance=provenance or {}), weights)

    def index(self, name: str) -> int:
        if name not in self.names:
            hint = did_you_mean(name, self.names)
            raise ArtifactError(f"CE {name!r} is not in this bank", hint=f"did you mean {hint!r}?" if hint else None)
        return self.names.index(name)

    def site_params(self, site: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [d, k_site], bias [k_site]) on `device`, columns in `self.columns[site]` order."""
        return self.weights[f"{site}/weight"].to(device), self.weights[f"{site}/bias"].to(device)

    def score(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probabilities [..., n_ce] in bank order from activations at every bank site."""
        first = acts[self.sites[0]]
        out = torch.empty(*first.shape[:-1], len(self.names), dtype=torch.float32, device=first.device)
        for s in self.sites:
            w, b = self.site_params(s, first.device)
            out[..., self.columns[s]] = torch.sigmoid(acts[s].float() @ w + b)
        return out

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, d / TENSORS)
        (d / MANIFEST).write_text(self.manifest.model_dump_json(indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, fingerprint: ModelFingerprint | None = None,
             force: bool = False) -> "CEBank":
        """Load a bank; with the live model's fingerprint, refuse a bank made for another model."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / MANIFEST).exists() or not (d / TENSORS).exists():
            raise ArtifactError(f"{d} is not a CE bank (needs {MANIFEST} and {TENSORS})")
        try:
            manifest = BankManifest.model_validate(json.loads((d / MANIFEST).read_text()))
        except (ValidationError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{d / MANIFEST}: invalid bank manifest: {_first_error(e)}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ArtifactError(f"{d / MANIFEST}: format_version {manifest.format_version} is not supported "
                                f"(this gavel reads {FORMAT_VERSION})")
        if fingerprint is not None and not force:
            manifest.fingerprint.check(fingerprint, what=f"CE bank {d}")
        return cls(manifest, load_file(d / TENSORS))


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"field {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(e)
