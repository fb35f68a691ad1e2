"""A Few Bad Neurons on a model: read the MLP neurons at the last prompt token of prompts that show a behaviour and
prompts that do not, pick the few that predict it, and fine-tune only them on a corrective set."""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence

import torch

from gavel.errors import DataError
from gavel.finetune.behaviour_neurons import BehaviourNeurons, SAEEvidence
from gavel.finetune.surgical import down_projection, masked_finetune
from gavel.io.conversations import Conversation
from gavel.models.handle import ModelHandle
from gavel.models.sites import layer_of, parse_site
from gavel.steering.activations import last_prompt_activations
from gavel.steering.adaras.traces import mlp_sites

RESIDUAL_KINDS = {"hook_resid_pre": 0, "hook_resid_mid": 0, "hook_resid_post": 1}
"""Residual sites an SAE may read, and whether the layer's own MLP has written there (resid_post) or not."""


def sae_evidence(handle: ModelHandle, sae, positive: Sequence[Conversation], negative: Sequence[Conversation],
                 sites: Sequence[str]) -> SAEEvidence:
    """The SAE's latents on both sides (last prompt token), its encoder, and the down projections of `sites`,
    for an SAE on a residual-stream site (`sae.cfg.metadata.hook_name`)."""
    from gavel.probes.sae import encode_all

    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise DataError("the SAE does not say which hook it reads (cfg.metadata.hook_name)")
    site = parse_site(hook)
    if site.kind not in RESIDUAL_KINDS:
        raise DataError(f"the SAE reads {hook}; neuron attribution needs an SAE on the residual stream "
                        f"({', '.join('blocks.L.' + k for k in RESIDUAL_KINDS)})")
    reads = layer_of(site) + RESIDUAL_KINDS[site.kind]       # MLPs of layers below this one have written there
    latents = [encode_all(sae, last_prompt_activations(handle, side, [hook])[hook]) for side in (positive, negative)]
    return SAEEvidence(positive=latents[0], negative=latents[1], encoder=sae.W_enc.detach().float().cpu(),
                       down={s: down_projection(handle.hf_model, layer_of(s)).detach().float().cpu()
                             for s in sites},
                       upstream={s: layer_of(s) < reads for s in sites})


def select_neurons(handle: ModelHandle, positive: Sequence[Conversation], negative: Sequence[Conversation], *,
                   estimator: BehaviourNeurons | None = None, sae=None) -> BehaviourNeurons:
    """Fit `estimator` (default BehaviourNeurons()) on every layer's MLP neurons at the last prompt token of the
    positive and negative prompts, with SAE attribution when `sae` (a sae-lens SAE) is given."""
    sites = mlp_sites(handle.n_layers)
    pos = last_prompt_activations(handle, positive, sites)
    neg = last_prompt_activations(handle, negative, sites)
    evidence = sae_evidence(handle, sae, positive, negative, sites) if sae is not None else None
    return (estimator or BehaviourNeurons()).fit(pos, neg, evidence)


def _batches(rows: list[torch.Tensor], batch_size: int, seed: int) -> Iterator[list[torch.Tensor]]:
    """Shuffled batches of the rows, epoch after epoch."""
    rng = random.Random(seed)
    for _ in itertools.count():
        order = rng.sample(range(len(rows)), len(rows))
        for start in range(0, len(order), batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]


def finetune(handle: ModelHandle, conversations: Sequence[Conversation], masks: dict[str, torch.Tensor], *,
             steps: int = 40, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
             on_step: Callable[[float], None] | None = None) -> list[float]:
    """Train the masked parameters of the model in place on the conversations' assistant replies (cross-entropy);
    every unmasked parameter stays bit-identical. Returns the loss per step."""
    from gavel.models.losses import reply_loss, reply_targets

    if not conversations:
        raise DataError("no conversations to fine-tune on")
    rows = reply_targets(conversations, handle.tokenizer)
    if not any(bool((r[:, 1] != -100).any()) for r in rows):
        raise DataError("the conversations hold no assistant replies to learn")
    pad = handle.tokenizer.pad_token_id

    def loss(model, batch):
        value = reply_loss(model, batch, pad)
        if on_step:
            on_step(float(value.detach()))
        return value

    torch.manual_seed(seed)
    return masked_finetune(handle.hf_model, masks, _batches(rows, batch_size, seed), loss, lr=lr, steps=steps)


def random_neurons(neurons: dict[int, torch.Tensor], width: int, seed: int) -> dict[int, torch.Tensor]:
    """The control: as many neurons per layer as `neurons`, at random positions."""
    g = torch.Generator().manual_seed(int(seed))
    return {layer: torch.sort(torch.randperm(width, generator=g)[:len(index)]).values
            for layer, index in neurons.items()}
