"""Thresholds of a fitted CE bank set again, without refitting, at a target false-positive rate on benign text.

A threshold chosen on calibration sequences that include hard negatives of every CE is far stricter than benign
traffic needs (and rules that combine CEs cut false positives further): `threshold_on_benign` lets each CE fire in
at most `target_fpr` of the neutral conversations given (those that carry no CE), which is the rate a deployment
sees on everyday text. The bank's probes, calibration and metrics are kept; its provenance says where the
thresholds came from.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gavel.errors import DataError
from gavel.models.handle import ModelHandle
from gavel.probes.bank import BankManifest, CEBank
from gavel.probes.data.dataset import CEDataset
from gavel.probes.fit import BATCH_TOKENS, score_examples
from gavel.probes.metrics import threshold_at_sequence_fpr


def neutral_examples(dataset: CEDataset) -> CEDataset:
    """The examples of `dataset` that carry none of its CEs."""
    return CEDataset(dataset.ces, tuple(e for e in dataset.examples if not e.labels.any()))


def threshold_on_benign(handle: ModelHandle, bank: CEBank, dataset: CEDataset, *, target_fpr: float = 0.01,
                        per_ce: Mapping[str, float] | None = None, source: str = "", batch_size: int = 16,
                        batch_tokens: int = BATCH_TOKENS,
                        progress: Callable[[int], None] | None = None) -> CEBank:
    """A copy of `bank` whose every threshold lets at most `target_fpr` (or the CE's rate in `per_ce`) of the
    neutral conversations of `dataset` fire that CE (a CE latches: a conversation fires when any token passes).
    A CE that rules only use together with others may take a higher rate: the rule fires less often than either."""
    rates = {name: float((per_ce or {}).get(name, target_fpr)) for name in bank.names}
    for name in per_ce or {}:
        bank.index(name)   # an unknown CE is an error, with did-you-mean
    for name, rate in rates.items():
        if not 0 <= rate < 1:
            raise DataError(f"the target FPR of {name!r} must be in [0, 1), not {rate}")
    neutral = neutral_examples(dataset)
    if len(neutral) < 2:
        raise DataError(f"need neutral conversations (carrying no CE) to set thresholds on, found {len(neutral)}",
                        hint="pass benign conversations, e.g. labelled records without spans or labels")
    (probs,), _, sequence = score_examples(handle, neutral.examples, [bank], batch_size=batch_size,
                                           batch_tokens=batch_tokens, progress=progress)
    no_labels = torch.zeros(len(probs), dtype=torch.bool)
    ces = [spec.model_copy(update={"threshold": threshold_at_sequence_fpr(probs[:, j], no_labels, sequence,
                                                                          rates[spec.name])})
           for j, spec in enumerate(bank.manifest.ces)]
    others = ", ".join(f"{name} {rate:g}" for name, rate in (per_ce or {}).items())
    provenance = {**bank.manifest.provenance, "calibration": "fpr on benign",
                  "thresholds_from": f"{len(neutral)} neutral conversations{f' of {source}' if source else ''}, "
                                     f"at most {target_fpr:g} of them firing each CE"
                                     + (f" ({others})" if others else "")}
    manifest = BankManifest.model_validate({**bank.manifest.model_dump(), "ces": [c.model_dump() for c in ces],
                                            "provenance": provenance, "tensors": {}})
    return CEBank(manifest, bank.heads)
