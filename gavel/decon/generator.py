"""The perturbation network G of DeconIEP and its bounded output `delta = zeta * tanh(G(e(x)))` (pure torch).

G is a small decoder-only (causal) transformer over a prompt's input embeddings: an in-projection d_model -> width,
`n_layers` pre-norm blocks (causal self-attention and an MLP, dropout), a final norm and an out-projection
width -> d_model that starts at zero, so an untrained G perturbs nothing. Causal attention makes the delta at a
position depend on the prompt up to that position only; left padding is masked out of every attention, and padded
positions get delta 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each with dropout on its residual branch."""

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, w // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                              dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, w)))
        return x + self.drop(self.mlp(self.ln2(x)))


class PerturbationGenerator(nn.Module):
    """G: embeddings [B, T, d_model] (and a mask [B, T] of real tokens) -> unbounded raw output [B, T, d_model]."""

    def __init__(self, d_model: int, width: int = 64, n_layers: int = 4, n_heads: int = 4, dropout: float = 0.2,
                 max_positions: int = 512) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.d_model, self.max_positions = d_model, max_positions
        self.inp = nn.Linear(d_model, width)
        self.pos = nn.Embedding(max_positions, width) if max_positions else None
        self.blocks = nn.ModuleList(_Block(width, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_model)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = embeds.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        x = self.inp(torch.nan_to_num(embeds.float()).clamp(-1e4, 1e4))
        if self.pos is not None:   # positions count real tokens, so left padding does not shift them
            positions = (mask.long().cumsum(-1) - 1).clamp(0, self.max_positions - 1)
            x = x + self.pos(positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        # a real query reads real keys at or before it; a padded one reads only itself (never all -inf)
        allowed = (causal & mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=embeds.device)
        for block in self.blocks:
            x = block(x, allowed)
        return self.out(self.ln(x))


def bounded_delta(generator: nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None, zeta: float) -> torch.Tensor:
    """`zeta * tanh(G(e))` in float32, zero at padded positions: |delta|_inf <= zeta (as a float32) for any input.
    A NaN or infinite raw output is mapped to a finite one first, so the bound holds whatever G's weights are."""
    raw = torch.nan_to_num(generator(embeds.float(), mask).float(), nan=0.0)
    delta = torch.tanh(raw) * torch.tensor(float(zeta), dtype=torch.float32, device=raw.device)
    if mask is not None:
        delta = delta * mask.to(delta.device, torch.float32)[..., None]
    return delta
