"""gavel: cognitive-element probes, a rule language and a real-time monitor around LLM forward passes.

The public API is imported lazily so that `import gavel` (and `gavel --help`) stays fast; type checkers and
`dir(gavel)` see every name with its real type.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gavel.artifacts import ModelFingerprint
    from gavel.base import Estimator, clone
    from gavel.errors import GavelError
    from gavel.io.conversations import Conversation
    from gavel.models.chat import encode_conversation
    from gavel.models.collect import collect_activations
    from gavel.models.handle import ModelHandle
    from gavel.models.loading import load_model
    from gavel.organism.datasets import load_dataset
    from gavel.plugins.interventions import Intervention, InterventionMethod
    from gavel.probes.bank import CEBank
    from gavel.probes.data import CEDataset
    from gavel.probes.evaluate import evaluate_bank
    from gavel.probes.fit import fit_bank
    from gavel.probes.linear import LinearProbe
    from gavel.rules import RuleSpec, compile_rules, load_rules
    from gavel.runtime.audit_log import AuditLog
    from gavel.runtime.events import Event, Result
    from gavel.runtime.guard import Guard, GuardResult
    from gavel.runtime.monitor import Monitor

_EXPORTS = {
    "load_model": "gavel.models.loading",
    "ModelHandle": "gavel.models.handle",
    "ModelFingerprint": "gavel.artifacts",
    "Conversation": "gavel.io.conversations",
    "encode_conversation": "gavel.models.chat",
    "collect_activations": "gavel.models.collect",
    "Estimator": "gavel.base",
    "clone": "gavel.base",
    "LinearProbe": "gavel.probes.linear",
    "CEBank": "gavel.probes.bank",
    "fit_bank": "gavel.probes.fit",
    "evaluate_bank": "gavel.probes.evaluate",
    "load_dataset": "gavel.organism.datasets",
    "CEDataset": "gavel.probes.data",
    "load_rules": "gavel.rules",
    "RuleSpec": "gavel.rules",
    "compile_rules": "gavel.rules",
    "Intervention": "gavel.plugins.interventions",
    "InterventionMethod": "gavel.plugins.interventions",
    "Monitor": "gavel.runtime.monitor",
    "Event": "gavel.runtime.events",
    "Result": "gavel.runtime.events",
    "Guard": "gavel.runtime.guard",
    "GuardResult": "gavel.runtime.guard",
    "AuditLog": "gavel.runtime.audit_log",
    "GavelError": "gavel.errors",
}
__all__ = ["AuditLog", "CEBank", "CEDataset", "Conversation", "Estimator", "Event", "GavelError", "Guard",
           "GuardResult", "Intervention", "InterventionMethod", "LinearProbe", "ModelFingerprint", "ModelHandle",
           "Monitor", "Result", "RuleSpec", "clone", "collect_activations", "compile_rules", "encode_conversation",
           "evaluate_bank", "fit_bank", "load_dataset", "load_model", "load_rules"]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gavel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
