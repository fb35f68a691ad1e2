"""`slope(ce) over N tokens > t`: a rule score function that holds where a concept is rising.

Its value is the least-squares slope of the CE's scores over the window, per token (a score going 0.2, 0.3, 0.4
has slope 0.1), fitted to the valid slots only (at a sequence's start the window is not full yet); 0 with fewer
than two valid scores, so a rule never fires on its first token.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class Slope:
    """The least-squares slope of a CE's scores over the window, per token: a concept rising."""

    name: ClassVar[str] = "slope"

    def reduce(self, windows: Tensor, valid: Tensor) -> Tensor:
        weight = valid.to(windows.dtype)
        n = weight.sum(-1, keepdim=True)
        position = torch.arange(windows.shape[-1], dtype=windows.dtype, device=windows.device)
        dx = (position - (position * weight).sum(-1, keepdim=True) / n.clamp(min=1)) * weight
        dy = (windows - (windows * weight).sum(-1, keepdim=True) / n.clamp(min=1)) * weight
        spread = (dx * dx).sum(-1)
        fitted = n.squeeze(-1) >= 2
        return torch.where(fitted, (dx * dy).sum(-1) / torch.where(fitted, spread, 1.0), 0.0)
