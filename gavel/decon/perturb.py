"""Applying a trained perturbation to a model's prompt embeddings, through a forward hook on its input embedding
module (`hf_model.get_input_embeddings()`), during `forward()` or `generate()` with or without a KV cache.

PyTorch hooks are global state of the module: `patch_prompt` returns a handle whose `remove()` takes off exactly
the hooks it added, and `perturbing()` removes them in `finally`, also after an error.

How positions are told apart. A forward pre-hook on the model reads each call's 2-d `attention_mask` (or, without
one, the length of its KV cache): a call feeding T tokens with a mask of width W starts at absolute position W - T.
The first call starting at position 0 is the prompt: its width P, ids, mask and delta are kept. A later call at
position 0 (generate without a cache re-reads the whole prefix each step) whose first P ids and mask are the
prompt's gets the *same* delta at positions < P; generated positions (>= P, or any call starting later, as with a
KV cache) never get one. A call at position 0 with other ids starts a new prompt (the next generate() batch).
Padded positions get delta 0, and left padding does not change a row's delta. A forward that passes
`inputs_embeds` instead of `input_ids` never runs the embedding module, so it is not perturbed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gavel.decon.generator import bounded_delta
from gavel.errors import ArtifactError, ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _row_mask(rows, batch: int, device: torch.device) -> torch.Tensor | None:
    """None (every row), or a bool [B] from a bool mask or a sequence of row indices."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype == torch.bool:
        if rows.shape != (batch,):
            raise ValueError(f"rows is a mask of shape {tuple(rows.shape)}, the batch has {batch} rows")
        return rows
    chosen = torch.zeros(batch, dtype=torch.bool, device=device)
    chosen[rows.long()] = True
    return chosen


@torch.no_grad()
def prompt_delta(generator: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None, zeta: float,
                 rows=None) -> torch.Tensor:
    """The delta for prompt embeddings [B, P, D] (mask [B, P] of real tokens), in the embeddings' dtype: computed
    in float32 by G (in eval mode), zero at padded positions and in rows outside `rows` (indices or bool [B])."""
    was_training = generator.training
    generator.eval()
    try:
        delta = bounded_delta(generator, embeds, mask, zeta)
    finally:
        generator.train(was_training)
    chosen = _row_mask(rows, embeds.shape[0], delta.device)
    if chosen is not None:
        delta = delta * chosen[:, None, None].to(delta.dtype)
    return delta.to(embeds.dtype)


@dataclass
class PromptPerturbation:
    """The hooks' state: which rows are perturbed (`rows`, settable between forwards: None = all, else indices or
    a bool [B]), the bound `zeta`, and the current prompt's width, ids, mask and delta."""

    generator: torch.nn.Module
    zeta: float
    rows: object = None
    attention_mask: torch.Tensor | None = None   # the prompt's mask, when the caller knows it better
    handles: list = field(default_factory=list)
    calls: int = 0                                # forwards that got a delta (for tests and logs)
    _start: int = 0
    _mask: torch.Tensor | None = None
    _prompt_ids: torch.Tensor | None = None
    _prompt_mask: torch.Tensor | None = None
    _delta: torch.Tensor | None = None
    _delta_rows: object = None

    def before_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        width = ids.shape[1] if ids is not None else 0
        if mask is not None and mask.ndim == 2:
            self._start, self._mask = mask.shape[1] - width, mask
        else:
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            self._start, self._mask = int(past), None

    def after_embedding(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        start, self._start = self._start, 0   # an embedding call outside a model forward starts at 0
        mask, self._mask = self._mask, None
        if start != 0:
            return None   # a KV-cache step: only generated positions
        ids = args[0]
        b, t = ids.shape
        prompt, prompt_mask = self._prompt_ids, self._prompt_mask   # both None before the first prompt
        if not (prompt is not None and prompt_mask is not None and prompt.shape[0] == b and prompt.shape[1] <= t
                and torch.equal(ids[:, :prompt.shape[1]], prompt)
                and (mask is None or torch.equal(mask[:, :prompt.shape[1]].bool(), prompt_mask))):
            # a new prompt: all of this call
            if self.attention_mask is not None and tuple(self.attention_mask.shape) == (b, t):
                prompt_mask = self.attention_mask.to(ids.device).bool()
            else:
                prompt_mask = mask[:, :t].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            prompt = ids.clone()
            self._prompt_ids, self._prompt_mask, self._delta = prompt, prompt_mask, None
        width = prompt.shape[1]
        delta = self._delta
        if delta is None or self._delta_rows is not self.rows:
            delta = self._delta = prompt_delta(self.generator, output[:, :width], prompt_mask, self.zeta, self.rows)
            self._delta_rows = self.rows
        self.calls += 1
        out = output.clone()
        out[:, :width] = output[:, :width] + delta
        return out

    def remove(self) -> None:
        """Take off the hooks this perturbation added (idempotent)."""
        for h in reversed(self.handles):
            h.remove()
        self.handles = []


def patch_prompt(hf_model: PreTrainedModel, generator: torch.nn.Module, zeta: float, *, rows=None,
                 attention_mask: torch.Tensor | None = None) -> PromptPerturbation:
    """Hook `generator`'s bounded delta into `hf_model`'s prompt embeddings; `remove()` on the result undoes it."""
    embedding = hf_model.get_input_embeddings()
    weight = embedding.weight
    if not isinstance(weight, torch.Tensor):
        raise ModelLoadError(f"cannot perturb the prompts of {type(hf_model).__name__}: its input embeddings "
                             f"({type(embedding).__name__}) have no weight matrix")
    d_model = getattr(generator, "d_model", None)
    if d_model is not None and weight.shape[1] != d_model:
        raise ArtifactError(f"the perturbation is for d_model {d_model}, the model's embeddings have "
                            f"{weight.shape[1]}")
    if zeta < 0:
        raise ValueError(f"zeta must be >= 0, got {zeta}")
    generator.to(weight.device)
    state = PromptPerturbation(generator, float(zeta), rows, attention_mask)
    try:
        state.handles.append(hf_model.register_forward_pre_hook(state.before_forward, with_kwargs=True))
        state.handles.append(embedding.register_forward_hook(state.after_embedding))
    except BaseException:
        state.remove()
        raise
    return state


@contextmanager
def perturbing(hf_model: PreTrainedModel, generator: torch.nn.Module, zeta: float, *, rows=None,
               attention_mask: torch.Tensor | None = None) -> Iterator[PromptPerturbation]:
    """The prompt embeddings of `hf_model` perturbed inside the block (see the module docstring); hooks removed
    after it, also on errors."""
    state = patch_prompt(hf_model, generator, zeta, rows=rows, attention_mask=attention_mask)
    try:
        yield state
    finally:
        state.remove()


__all__: Sequence[str] = ["PromptPerturbation", "patch_prompt", "perturbing", "prompt_delta"]
