"""Hooks for interventions (the contract is `gavel.plugins.interventions.Intervention`): row-gated replacement hooks
that most interventions are made of, and a context manager that runs forwards through one intervention."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn
from gavel.plugins.interventions import Intervention


def gated_hooks(sites: Sequence[str], apply: Callable[[torch.Tensor, str], torch.Tensor],
                active: torch.Tensor | None = None) -> list[tuple[str, HookFn]]:
    """Hooks that replace each site's activation by `apply(act, site)`, only in the rows where `active` (bool
    [batch], read at every call, so the caller may update it in place) is True; every row without it."""
    def hook_for(site: str) -> HookFn:
        def hook(act: torch.Tensor) -> torch.Tensor:
            changed = apply(act, site)
            if active is None:
                return changed
            return torch.where(active.to(act.device).view(-1, *([1] * (act.ndim - 1))), changed, act)
        return hook
    return [(site, hook_for(site)) for site in sites]


@contextmanager
def steering(handle: ModelHandle, intervention: Intervention, active: torch.Tensor | None = None) -> Iterator[None]:
    """Every forward pass inside the block goes through `intervention` (the hooks are always removed after)."""
    with handle.hooks(intervention.to(handle.device).hooks(active)):
        yield
