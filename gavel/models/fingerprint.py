"""The weights part of a model's fingerprint (`gavel.artifacts.ModelFingerprint`), which artifacts store so they refuse
to load on another model."""
from __future__ import annotations

import hashlib

import torch


def weights_digest(model: torch.nn.Module, n_tensors: int = 4, n_values: int = 4096) -> str:
    """SHA-256 over the first values of the first and last few parameter tensors (fast on any size)."""
    params = list(model.parameters())
    chosen = params[:n_tensors // 2] + params[-(n_tensors - n_tensors // 2):]
    h = hashlib.sha256()
    for p in chosen:
        flat = p.detach().reshape(-1)[:n_values].to("cpu", torch.float32).contiguous()
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()
