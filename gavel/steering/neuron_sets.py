"""Neuron sets on disk: a fitted neuron estimator (AdaRAS's reasoning neurons, or the few neurons behind a
behaviour) with a manifest naming its kind and the model it was fitted on."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gavel.errors import ArtifactError
from gavel.models.fingerprint import ModelFingerprint, read_manifest
from gavel.finetune.behaviour_neurons import BehaviourNeurons
from gavel.steering.adaras.neurons import ReasoningNeurons

MANIFEST = "neurons.json"
FORMAT_VERSION = 1
KINDS = {"reasoning_neurons": ReasoningNeurons, "behaviour_neurons": BehaviourNeurons}
MADE_BY = {"reasoning_neurons": "gavel neurons find", "behaviour_neurons": "gavel neurons select"}


class NeuronManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    kind: str = "reasoning_neurons"
    fingerprint: ModelFingerprint
    sites: list[str]
    kept: int
    counts: dict[str, int] = {}
    provenance: dict[str, str] = {}


def save_neurons(neurons: ReasoningNeurons | BehaviourNeurons, directory: str | Path, fingerprint: ModelFingerprint,
                 counts: Mapping[str, int] | None = None, provenance: Mapping[str, str] | None = None) -> Path:
    """The estimator's tensors and parameters plus a manifest naming its kind and the model it came from."""
    kind = next(k for k, cls in KINDS.items() if isinstance(neurons, cls))
    d = neurons.save(directory)
    manifest = NeuronManifest(kind=kind, fingerprint=fingerprint, sites=list(neurons.sites_),
                              kept=int(neurons.kept_.sum()), counts=dict(counts or {}),
                              provenance=dict(provenance or {}))
    (d / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return d


def load_neurons(directory: str | Path, fingerprint: ModelFingerprint | None = None, force: bool = False,
                 kind: str = "reasoning_neurons"):
    """A saved neuron set of `kind`; one fitted on another model is refused (the differing field named) unless
    `force`, and one of another kind always."""
    d = Path(directory)
    manifest = read_manifest(d / MANIFEST, NeuronManifest, "neuron set", fingerprint=fingerprint, force=force,
                             hint=f"make one with `{MADE_BY[kind]} ... --out DIR`")
    if manifest.kind != kind:
        raise ArtifactError(f"{d} holds {manifest.kind.replace('_', ' ')}, not {kind.replace('_', ' ')}",
                            hint=f"make one with `{MADE_BY[kind]} ... --out DIR`")
    return KINDS[kind].load(d)
