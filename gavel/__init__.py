"""gavel: cognitive-element probes, a rule language and a real-time monitor around LLM forward passes.

The public API is imported lazily so that `import gavel` (and `gavel --help`) stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "gavel.models.loading",
    "ModelHandle": "gavel.models.handle",
    "encode_conversation": "gavel.models.chat",
    "collect_activations": "gavel.models.collect",
    "LinearProbe": "gavel.probes.linear",
    "CEBank": "gavel.probes.bank",
    "fit_bank": "gavel.probes.fit",
    "evaluate_bank": "gavel.probes.evaluate",
    "load_dataset": "gavel.organism.datasets",
    "CEDataset": "gavel.probes.data",
    "load_rules": "gavel.rules",
    "RuleSpec": "gavel.rules",
    "compile_rules": "gavel.rules",
    "Monitor": "gavel.runtime.monitor",
    "Guard": "gavel.runtime.guard",
    "GuardResult": "gavel.runtime.guard",
    "AuditLog": "gavel.runtime.audit_log",
    "Event": "gavel.runtime.monitor",
    "GavelError": "gavel.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gavel' has no attribute {name!r}")
