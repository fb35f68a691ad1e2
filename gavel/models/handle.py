"""One handle over a loaded model, whatever its backend: sites, hooks, tokenizer, fingerprint."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from gavel.artifacts import ModelFingerprint
from gavel.models.fingerprint import weights_digest
from gavel.models.hooks import HookFn, attach
from gavel.models.sites import HookTarget, d_model, n_layers, resolve_site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Backend = Literal["hf", "lens"]


@dataclass(slots=True)
class ModelHandle:
    """A model ready for gavel: `model` is what runs (HF model or TransformerBridge), `hf_model` its weights."""

    model: torch.nn.Module
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    family: str
    backend: Backend = "hf"

    @property
    def n_layers(self) -> int:
        return n_layers(self.hf_model)

    @property
    def d_model(self) -> int:
        return d_model(self.hf_model)

    @property
    def device(self) -> torch.device:
        """Where inputs go and rule state lives: the input embeddings' device (the first of a device_map)."""
        first = next(self.hf_model.parameters()).device
        embeddings = getattr(self.hf_model, "get_input_embeddings", lambda: None)()
        return first if embeddings is None else execution_device(self.hf_model, embeddings, first)

    @property
    def max_positions(self) -> int | None:
        """The most tokens one forward pass takes (None: no known limit): the smallest of the config's
        `max_position_embeddings` / `n_positions` and the tokenizer's `model_max_length` (transformers' huge
        placeholder for "unset" is not a limit)."""
        config = self.hf_model.config
        known = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None),
                 getattr(self.tokenizer, "model_max_length", None)]
        limits = [n for n in known if isinstance(n, int) and 0 < n < 10**9]
        return min(limits) if limits else None

    @property
    def is_causal(self) -> bool:
        return self.family != "bert"

    @property
    def end_token_ids(self) -> list[int]:
        """The ids that end a reply: the generation config's end-of-sequence ids, else the tokenizer's; none for an
        encoder."""
        if not self.is_causal:
            return []
        ids = self.hf_model.generation_config.eos_token_id
        ids = self.tokenizer.eos_token_id if ids is None else ids
        return [i for i in ([ids] if isinstance(ids, int) else list(ids or [])) if i is not None]

    def resolve(self, model: torch.nn.Module, site: str) -> HookTarget:
        """Where a canonical site lives in this backend's module tree."""
        if self.backend == "lens":
            from gavel.models.lens import resolve_bridge_site

            return resolve_bridge_site(model, site)
        return resolve_site(model, site)

    @contextmanager
    def hooks(self, hooks: Sequence[tuple[str, HookFn]]):
        """Attach hooks at canonical sites for the duration of the block; always removed after."""
        with attach(self.model, hooks, resolve=self.resolve):
            yield

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """One forward pass through whichever backend runs this handle."""
        if self.backend == "lens":
            return self.model(input_ids, attention_mask=attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def site_device(self, site: str) -> torch.device:
        """The device a site's activations are on: where its module runs, under a `device_map` too."""
        return execution_device(self.hf_model, resolve_site(self.hf_model, site).module, self.device)

    def fingerprint(self) -> ModelFingerprint:
        arch = (getattr(self.hf_model.config, "architectures", None) or [type(self.hf_model).__name__])[0]
        return ModelFingerprint(name=self.name, architecture=arch, d_model=self.d_model,
                                n_layers=self.n_layers, weights_sha256=weights_digest(self.hf_model))


def execution_device(model: torch.nn.Module, module: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Where `module` of `model` computes: the device of its first real parameter, else (weights offloaded to
    "meta" under a `device_map`, or none) accelerate's dispatch hook on it or its closest ancestor, else `fallback`."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    for name, candidate in model.named_modules():
        if candidate is module:
            parts = name.split(".") if name else []
            for depth in range(len(parts), -1, -1):
                hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
                device = getattr(hook, "execution_device", None)
                if device is not None:
                    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            break
    return fallback
