"""Padding variable-length token sequences into one batch, on either side."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Side = Literal["left", "right"]


def pad_sequences(seqs: Sequence[torch.Tensor], pad_value: int | float,
                  side: Side = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D (or [T, ...]) tensors into [B, T_max, ...] and a bool attention mask [B, T_max]."""
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    length = max(len(s) for s in seqs)
    first = seqs[0]
    out = torch.full((len(seqs), length, *first.shape[1:]), pad_value, dtype=first.dtype)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        out[i, sl] = s
        mask[i, sl] = True
    return out, mask
