"""Steering calibration data: activations at the last prompt token of chat-templated prompts.

Selective Steering reads every site at the position where the model is about to answer (the end of the generation
prompt), one vector per prompt and site; left padding puts that position in the last column of every row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gavel.errors import DataError
from gavel.io.conversations import Conversation
from gavel.models.generation import prompt_batch
from gavel.models.handle import ModelHandle
from gavel.models.sites import site_name


def read_prompt_file(path: str) -> list[Conversation]:
    """Conversations without their replies, from a JSONL/JSON file (as `gavel audit --data` reads)."""
    from gavel.io.conversations import read_audit_data

    return [[m for m in item.conversation if m["role"] != "assistant"] for item in read_audit_data(path)]


def norm_sites(n_layers: int) -> list[str]:
    """The normalisation outputs of every block (input and post-attention norms), the paper's steering sites."""
    return [site_name(kind, layer) for layer in range(n_layers) for kind in ("ln1.hook_normalized",
                                                                              "ln2.hook_normalized")]


@torch.no_grad()
def last_prompt_activations(handle: ModelHandle, conversations: Sequence[Conversation], sites: Sequence[str], *,
                            batch_size: int = 16, progress: Callable[[int], None] | None = None
                            ) -> dict[str, torch.Tensor]:
    """Per site, float32 [N, d] activations at the last prompt token of each conversation (generation prompt
    appended), on the host."""
    if not conversations:
        raise DataError("no prompts to read steering activations from")
    captured: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

    def keep(site: str):
        def hook(act: torch.Tensor) -> None:
            captured[site].append(act[:, -1].to("cpu", torch.float32))
        return hook

    with handle.hooks([(s, keep(s)) for s in sites]):
        for start in range(0, len(conversations), batch_size):
            batch = prompt_batch(handle, conversations[start:start + batch_size])
            handle.forward(batch.input_ids, batch.attention_mask)
            if progress:
                progress(len(batch.encoded))
    return {s: torch.cat(parts) for s, parts in captured.items()}
