"""Fitting a linear CE bank from token-labelled examples: collect, split by example, fit, calibrate."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from gavel.errors import DataError
from gavel.models.chat import Encoded
from gavel.models.collect import collect_activations
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.probes.linear import LinearProbe
from gavel.probes.metrics import auroc, sequence_youden_threshold, threshold_at_sequence_fpr


def fit_linear_bank(handle: ModelHandle, data: Sequence[tuple[Encoded, torch.Tensor]], ce_names: Sequence[str],
                    site: str, *, holdout_fraction: float = 0.2, seed: int = 0, C: float = 1.0,
                    calibration: Literal["youden", "fpr"] = "youden", max_sequence_fpr: float = 0.01,
                    progress: Callable[[int], None] | None = None,
                    provenance: dict[str, str] | None = None) -> tuple[CEBank, dict[str, float]]:
    """Fit one probe per CE at `site` on whole held-in examples; AUROC and thresholds on held-out ones.

    `data` pairs each encoded example with labels [T, len(ce_names)]. Special tokens (chat-template
    scaffolding) are left out, as the monitor never lets them fire a CE. Thresholds are set on held-out
    sequences, as a latched CE fires for a whole sequence: "youden" maximises TPR - FPR over sequences
    (as the GAVEL paper), "fpr" keeps the share of sequences without the CE where it fires at or below
    `max_sequence_fpr`.
    """
    if calibration not in ("youden", "fpr"):
        raise DataError(f"calibration must be 'youden' or 'fpr', not {calibration!r}")
    if not 0 < holdout_fraction < 1:
        raise DataError("holdout_fraction must be between 0 and 1")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_out = max(1, int(len(data) * holdout_fraction))
    held_out = torch.zeros(len(data), dtype=torch.bool)
    held_out[order[:n_out]] = True
    acts = collect_activations(handle, [e for e, _ in data], [site], progress=progress)
    labels = torch.cat([y for _, y in data])
    if labels.shape[1] != len(ce_names):
        raise DataError(f"labels have {labels.shape[1]} columns for {len(ce_names)} CE names")
    content = ~torch.isin(acts.token, torch.tensor(handle.tokenizer.all_special_ids, dtype=torch.long))
    acts, labels = acts.select(content), labels[content]
    test = held_out[acts.example]
    X = acts.sites[site]
    probe = LinearProbe(site, C=C).fit(X[~test], labels[~test], ce_names)
    probs = probe.predict_proba(X[test]).cpu()
    aurocs = [auroc(probs[:, j], labels[test][:, j]) for j in range(len(ce_names))]
    def threshold(j: int) -> float:
        if calibration == "youden":
            return sequence_youden_threshold(probs[:, j], labels[test][:, j], acts.example[test])
        return threshold_at_sequence_fpr(probs[:, j], labels[test][:, j], acts.example[test], max_sequence_fpr)

    thresholds = [threshold(j) for j in range(len(ce_names))]
    bank = CEBank.from_probes([probe], [thresholds], handle.fingerprint(), [aurocs], provenance)
    return bank, dict(zip(ce_names, aurocs))
