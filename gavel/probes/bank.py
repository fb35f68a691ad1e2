"""The CE bank: calibrated CE detectors grouped into scoring heads, saved as safetensors + a JSON manifest.

Per CE the bank keeps which head scores it, the Platt calibration (raw score -> probability), the
threshold above which it fires, its metadata (title, GAVEL role, definition), its held-out metrics
and support; the manifest also records the model fingerprint and a digest of the training data.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gavel.artifacts import Manifest, ModelFingerprint, read_artifact, write_artifact
from gavel.errors import ArtifactError, did_you_mean
from gavel.probes.heads import Head, head_class
from gavel.probes.pooling import pool_rows


class CESpec(BaseModel):
    """One cognitive element: the head that scores it, its calibration, threshold and metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")
    name: str
    title: str = ""
    role: str | None = None
    definition: str = ""
    head: int
    extractor: str
    threshold: float
    scale: float = 1.0
    shift: float = 0.0
    metrics: dict[str, float] = {}
    support: dict[str, int] = {}


class HeadSpec(BaseModel):
    """A scoring head: its kind, the sites it reads, the extractor's hyperparameters, and the trailing window its
    scores are averaged over (1: each token alone; see gavel.probes.pooling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    sites: list[str]
    hyperparameters: dict[str, Any] = {}
    pool: int = Field(default=1, ge=1)


class BankManifest(Manifest):
    """A CE bank: its CEs and scoring heads, the model it reads, a digest of the data it was fitted on."""

    kind: Literal["ce_bank"] = "ce_bank"
    fingerprint: ModelFingerprint
    ces: list[CESpec]
    heads: list[HeadSpec]
    data_digest: str | None = None


class CEBank:
    """All CEs of a model. `score_rows(acts, example)` gives calibrated probabilities [N, n_ce] in bank order;
    `score(acts)` gives them token by token, for banks whose heads do not pool."""

    def __init__(self, manifest: BankManifest, heads: Sequence[Head]) -> None:
        if manifest.kind != "ce_bank":
            raise ArtifactError(f"expected a ce_bank artifact, got {manifest.kind!r}")
        self.manifest = manifest
        self.heads = list(heads)
        self.names: list[str] = [c.name for c in manifest.ces]
        if len(set(self.names)) != len(self.names):
            raise ArtifactError("CE names in a bank must be unique")
        if len(self.heads) != len(manifest.heads):
            raise ArtifactError(f"manifest lists {len(manifest.heads)} heads, {len(self.heads)} given")
        self.columns: list[list[int]] = [[i for i, c in enumerate(manifest.ces) if c.head == h]
                                         for h in range(len(self.heads))]
        for h, (head, cols) in enumerate(zip(self.heads, self.columns)):
            if head.n_ces != len(cols):
                raise ArtifactError(f"head {h} scores {head.n_ces} CEs but the manifest assigns it {len(cols)}")
        self.sites: list[str] = list(dict.fromkeys(s for head in self.heads for s in head.sites))
        self.pools: list[int] = [spec.pool for spec in manifest.heads]
        self.thresholds = torch.tensor([c.threshold for c in manifest.ces], dtype=torch.float32)
        self.scale = torch.tensor([c.scale for c in manifest.ces], dtype=torch.float32)
        self.shift = torch.tensor([c.shift for c in manifest.ces], dtype=torch.float32)

    def index(self, name: str) -> int:
        if name not in self.names:
            hint = did_you_mean(name, self.names)
            raise ArtifactError(f"CE {name!r} is not in this bank", hint=f"did you mean {hint!r}?" if hint else None)
        return self.names.index(name)

    def spec(self, name: str) -> CESpec:
        return self.manifest.ces[self.index(name)]

    def read_at(self, head: int) -> str:
        """Where a head reads, for people: its sites, and the trailing window it averages over when it pools."""
        sites, pool = "+".join(self.heads[head].sites), self.pools[head]
        return f"{sites} (mean of {pool})" if pool > 1 else sites

    def to(self, device: torch.device | str) -> CEBank:
        """A copy whose heads and calibration tensors live on `device`."""
        bank = CEBank(self.manifest, [h.to(device) for h in self.heads])
        bank.thresholds, bank.scale, bank.shift = (t.to(device) for t in (self.thresholds, self.scale, self.shift))
        return bank

    def heads_for(self, ce_indices: Sequence[int]) -> list[int]:
        """The heads that score any of the given CEs (the monitor hooks only their sites)."""
        wanted = set(ce_indices)
        return [h for h, cols in enumerate(self.columns) if wanted.intersection(cols)]

    def score(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Calibrated probabilities [..., n_ce] in bank order from activations at every bank site, each token alone;
        a bank with pooled heads needs to know the sequences: use `score_rows`."""
        if any(p > 1 for p in self.pools):
            raise ArtifactError("this bank pools scores over trailing tokens: score it with score_rows(acts, example) "
                                "or through the Monitor")
        return self._score(acts, None)

    def score_rows(self, acts: Mapping[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities [N, n_ce] of N token rows, `example` [N] saying which sequence each row is from
        (rows of an example contiguous, in position order): pooled heads average over each example's past rows."""
        return self._score(acts, example)

    def _score(self, acts: Mapping[str, torch.Tensor], example: torch.Tensor | None) -> torch.Tensor:
        first = acts[self.sites[0]]
        out = torch.empty(*first.shape[:-1], len(self.names), dtype=torch.float32, device=first.device)
        for h, cols in enumerate(self.columns):
            logits = self.heads[h].score(acts).float() * self.scale[cols] + self.shift[cols]
            if example is not None:
                logits = pool_rows(logits, example, self.pools[h])
            out[..., cols] = torch.sigmoid(logits)
        return out

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """One artifact: the manifest, and every head's tensors under `head{h}/`."""
        tensors = {f"head{h}/{k}": v for h, head in enumerate(self.heads) for k, v in head.tensors().items()}
        return write_artifact(directory, self.manifest, tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], fingerprint: ModelFingerprint | None = None,
             force: bool = False) -> CEBank:
        """Load a bank; with the live model's fingerprint, refuse a bank made for another model."""
        manifest, tensors = read_artifact(directory, BankManifest, fingerprint=fingerprint, force=force,
                                          hint="fit one with `gavel ce fit`, or save one with `gavel demo --save-bank`")
        heads = []
        for h, spec in enumerate(manifest.heads):
            prefix = f"head{h}/"
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            heads.append(head_class(spec.kind).from_tensors(tuple(spec.sites), part))
        return cls(manifest, heads)
