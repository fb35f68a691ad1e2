"""Scoring heads: how a CE bank turns activations at its sites into raw CE scores.

A head scores several CEs that read the same sites the same way, so the monitor scores them in one
go: a LinearHead is one matmul over one site (or several, concatenated). Heads hold tensors only;
calibration (raw score -> probability) and thresholds live in the bank.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from gavel.errors import ArtifactError


@runtime_checkable
class Head(Protocol):
    """A group of CEs scored together from activations at `sites`."""

    kind: ClassVar[str]

    @property
    def sites(self) -> tuple[str, ...]: ...

    @property
    def n_ces(self) -> int: ...

    def score(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw scores [..., n_ces] from activations [..., d_site] at every site of the head."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the bank saves (safetensors); `from_tensors(sites, tensors)` restores the head."""

    @classmethod
    def from_tensors(cls, sites: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> Head:
        """The head `tensors()` saved, reading `sites`."""

    def to(self, device: torch.device | str) -> Head: ...

    def select(self, columns: Sequence[int]) -> Head:
        """A head scoring only these of its CEs, in this order."""


def flat(site: str, act: torch.Tensor) -> torch.Tensor:
    """One feature vector per token: per-head readouts [..., n_heads, d_head] become [..., n_heads * d_head]."""
    return act.flatten(-2) if site.endswith("attn.hook_z") else act


def site_features(acts: Mapping[str, torch.Tensor], sites: tuple[str, ...]) -> torch.Tensor:
    """The activations of `sites` as one feature vector per token (concatenated in order)."""
    missing = [s for s in sites if s not in acts]
    if missing:
        raise ArtifactError(f"no activations for site(s) {', '.join(missing)}")
    parts = [flat(s, acts[s]) for s in sites]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class LinearHead:
    """Linear CEs (probes, difference-of-means directions): raw = features @ weight + bias."""

    kind: ClassVar[str] = "linear"
    sites: tuple[str, ...]
    weight: torch.Tensor  # [sum of the sites' widths, n_ces]
    bias: torch.Tensor    # [n_ces]

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[1],):
            raise ArtifactError(f"linear head on {self.sites}: weight {tuple(self.weight.shape)} "
                                f"and bias {tuple(self.bias.shape)} do not fit together")

    @property
    def n_ces(self) -> int:
        return self.weight.shape[1]

    def score(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = site_features(acts, self.sites)
        if x.shape[-1] != self.weight.shape[0]:
            raise ArtifactError(f"linear head on {self.sites} expects width {self.weight.shape[0]}, "
                                f"the activations have {x.shape[-1]}")
        return x.to(self.weight.dtype) @ self.weight + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_tensors(cls, sites: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> LinearHead:
        return cls(tuple(sites), tensors["weight"], tensors["bias"])

    def to(self, device: torch.device | str) -> LinearHead:
        return dataclasses.replace(self, weight=self.weight.to(device), bias=self.bias.to(device))

    def select(self, columns: Sequence[int]) -> LinearHead:
        cols = list(columns)
        return LinearHead(self.sites, self.weight[:, cols].contiguous(), self.bias[cols].contiguous())


HEAD_KINDS: dict[str, str] = {"linear": "gavel.probes.heads:LinearHead", "sae": "gavel.probes.sae:SAEHead"}


def head_class(kind: str) -> type[Head]:
    """The head class for a manifest's `kind` (imported on demand: SAE heads need no sae-lens to score)."""
    import importlib

    if kind not in HEAD_KINDS:
        raise ArtifactError(f"unknown head kind {kind!r}; known: {', '.join(HEAD_KINDS)}")
    module, name = HEAD_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)
