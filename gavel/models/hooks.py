"""One context manager that attaches hook functions to named sites and always takes them off.

PyTorch hooks are global state on the module objects: every handle is kept and removed in
reverse order in ``finally``, also when registration fails halfway or the forward raises.
Hook bodies only reshape and compare shapes (host metadata): no device synchronisation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from gavel.errors import SiteError
from gavel.models.sites import HookTarget, resolve_site

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Receives the canonical activation [batch, pos, d] ([batch, pos, n_heads, d_head] for
attn.hook_z); a returned tensor of the same shape replaces it downstream, None leaves it."""

Resolver = Callable[[Any, str], HookTarget]


def _call(fn: HookFn, act: torch.Tensor, target: HookTarget, site: str) -> torch.Tensor | None:
    """Run fn on the canonical view of act; the flat replacement, or None if it left act alone."""
    view = act.unflatten(-1, target.heads) if target.heads is not None else act
    new = fn(view)
    if new is None or new is view:
        return None
    if not isinstance(new, torch.Tensor) or new.shape != view.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise SiteError(f"hook on {site!r} returned {got}, expected a tensor of shape {tuple(view.shape)}")
    return new.flatten(-2) if target.heads is not None else new


def _output_hook(fn: HookFn, target: HookTarget, site: str) -> Callable[..., Any]:
    """A forward hook; tuple outputs carry the activation first and are rebuilt around it."""
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        act = output[0] if isinstance(output, tuple) else output
        new = _call(fn, act, target, site)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def _input_hook(fn: HookFn, target: HookTarget, site: str) -> Callable[..., Any]:
    """A forward pre-hook (with kwargs); the activation is args[0] or kwargs['hidden_states']."""
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = _call(fn, args[0], target, site)
            return None if new is None else ((new, *args[1:]), kwargs)
        if "hidden_states" in kwargs:
            new = _call(fn, kwargs["hidden_states"], target, site)
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        raise SiteError(f"site {site!r}: {type(module).__name__} was called without hidden states")
    return hook


def _register(target: HookTarget, fn: HookFn, site: str) -> RemovableHandle:
    if target.io == "output":
        return target.module.register_forward_hook(_output_hook(fn, target, site))
    return target.module.register_forward_pre_hook(_input_hook(fn, target, site), with_kwargs=True)


@contextmanager
def attach(model: Any, hooks: Sequence[tuple[str, HookFn]],
           resolve: Resolver = resolve_site) -> Iterator[None]:
    """Attach (site, fn) pairs for the duration of the block; hooks on one site run in order."""
    handles: list[RemovableHandle] = []
    try:
        for site, fn in hooks:
            handles.append(_register(resolve(model, site), fn, site))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


# Permanent hooks libraries install for their own bookkeeping: transformers' output capturing
# (first output_hidden_states call) and the TransformerLens bridge's capture wiring (first forward).
_LIBRARY_HOOKS = ("transformers.utils.output_capturing", "transformer_lens.model_bridge.")


def _is_library_hook(hook: Any) -> bool:
    return getattr(hook, "__module__", "").startswith(_LIBRARY_HOOKS)


def count_hooks(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks over all submodules, not counting library bookkeeping hooks."""
    return sum(
        not _is_library_hook(h)
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )
