"""Surgical fine-tuning of a few MLP neurons ("A Few Bad Neurons", arXiv 2601.18939): only the selected neurons'
parameters change (their rows of the gate/up projections and their column of the down projection); every other
parameter stays bit-identical, because its gradient is masked to zero and the optimiser (Adam without weight decay)
then adds exactly zero to it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from gavel.errors import DataError
from gavel.models.sites import resolve_site

Neurons = Mapping[int, torch.Tensor]
"""Layer -> indices of the selected MLP neurons (positions in the MLP's intermediate width)."""


def _mlp_of(model: torch.nn.Module, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the MLP block, its down projection) of a layer: the module whose input is the neurons' activations."""
    down = resolve_site(model, f"blocks.{layer}.mlp.hook_post").module
    return next(m for m in model.modules() if any(c is down for c in m.children())), down


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"   # transformers' GPT-2 layer: weight [in, out], nn.Linear's [out, in]


def down_projection(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """A layer's down-projection weight as [d_model, m]: column i is what neuron i writes into the residual."""
    _, down = _mlp_of(model, layer)
    weight = down.get_parameter("weight")
    return weight.T if _is_conv1d(down) else weight


def neuron_masks(model: torch.nn.Module, neurons: Neurons) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the entries that belong to the selected neurons: rows of every linear map
    that writes the MLP's intermediate activations (gate/up) and columns of the one that reads them (down),
    transposed for Conv1D layers."""
    names = {id(p): n for n, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for layer, index in neurons.items():
        mlp, down = _mlp_of(model, layer)
        width = down_projection(model, layer).shape[1]
        index = torch.as_tensor(index, dtype=torch.long)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= width):
            raise DataError(f"layer {layer}: neuron indices must lie in [0, {width}), got {index.tolist()}")
        for child in mlp.children():
            weight = getattr(child, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
                continue
            out_axis = 1 if _is_conv1d(child) else 0
            axis = 1 - out_axis if child is down else out_axis
            if child is not down and weight.shape[axis] != width:
                continue
            mask = torch.zeros_like(weight, dtype=torch.bool)
            mask.index_fill_(axis, index, True)
            masks[names[id(weight)]] = mask
            bias = getattr(child, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and child is not down:
                bias_mask = torch.zeros_like(bias, dtype=torch.bool)
                bias_mask[index] = True
                masks[names[id(bias)]] = bias_mask
    return masks


def all_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Masks that select every parameter: full fine-tuning through the same loop, the baseline to compare with."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def masked_finetune(model: torch.nn.Module, masks: Mapping[str, torch.Tensor], batches: Iterable,
                    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor], *, lr: float = 1e-3,
                    steps: int | None = None) -> list[float]:
    """Train only the masked entries (Adam, no weight decay; everything else frozen or gradient-masked); returns
    the loss per step. The model's other parameters are left exactly as they were."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise DataError(f"the model has no parameter(s) {', '.join(unknown)}")
    frozen = {n: p.requires_grad for n, p in params.items()}
    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(name in masks)
        for name in masks:
            mask = masks[name].to(params[name].device)
            handles.append(params[name].register_hook(lambda g, mask=mask: g * mask))
        optimiser = torch.optim.Adam([params[n] for n in masks], lr=lr, weight_decay=0.0)
        losses = []
        model.train()
        for step, batch in enumerate(batches):
            if steps is not None and step >= steps:
                break
            optimiser.zero_grad(set_to_none=False)
            loss = loss_fn(model, batch)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return losses
    finally:
        model.eval()
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.requires_grad_(frozen[name])
