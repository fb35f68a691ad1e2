"""The one global setting gavel changes: torch.compile must guard its graphs on module hooks.

By default `torch.compile` does not guard a traced graph on the hooks of the modules it traced, so a decode step
compiled before a monitor attached its hooks would keep running without them (the monitor would see nothing, and
steering would silently not happen). `trace_with_hooks()` turns those guards on for the process
(`torch._dynamo.config.skip_nnmodule_hook_guards = False`): from then on a change of hooks makes torch.compile
retrace. It is idempotent; every `Monitor` calls it, since monitoring is wrong without it, and nothing else in gavel
touches global torch state. A graph traced before the first monitor existed is still stale: the monitor notices (its
hook-execution count) and resets torch.compile's caches once (see `Monitor.generate`).
"""
from __future__ import annotations

import torch


def trace_with_hooks() -> None:
    """Make torch.compile guard every graph it traces on module hooks (process-wide; see the module docstring)."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
