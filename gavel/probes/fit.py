"""Fitting a CE bank from a labelled dataset: collect once, split by example, fit, calibrate, measure.

Examples are split three ways (train / calibration / test) by whole example. Extractors are fitted on
train; each CE is read from the candidate site (or concatenation) where it scores best on
calibration data; Platt scaling and thresholds are fitted on calibration data; every metric in the
bank is measured on test data the CE never saw.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from gavel.errors import DataError, one_of
from gavel.models.collect import Activations, collect_activations
from gavel.models.handle import ModelHandle
from gavel.probes.bank import BankManifest, CEBank, CESpec, HeadSpec
from gavel.probes.calibration import PlattScaling
from gavel.probes.diffmeans import DiffMeansDirection
from gavel.probes.heads import Head, LinearHead, site_features
from gavel.probes.linear import LinearProbe
from gavel.probes.metrics import (
    auprc,
    auroc,
    sequence_maxima,
    sequence_youden_threshold,
    threshold_at_sequence_fpr,
    tpr_at_fpr,
)

EXTRACTORS = ("linear", "diff_means", "sae")
Calibration = Literal["youden", "fpr"]
CALIBRATIONS: tuple[Calibration, ...] = ("youden", "fpr")


def calibration_method(name: str) -> Calibration:
    """`name` as a threshold calibration; DataError for an unknown one."""
    return one_of(name, CALIBRATIONS, "calibration")


def fit_head(extractor: str, sites: tuple[str, ...], X: torch.Tensor, Y: torch.Tensor, names: Sequence[str],
             params: dict, sae=None) -> Head:
    """One head scoring every CE from features X [N, width] of `sites` (concatenated)."""
    if extractor == "sae":
        from gavel.probes.sae import SAELatentSelector, build_head, encode_all

        if sae is None or len(sites) != 1:
            raise DataError("the sae extractor needs an SAE (--sae DIR) and exactly one site: the SAE's hook")
        selector = SAELatentSelector(**params).fit(encode_all(sae, X), Y, names)
        return build_head(sae, selector, sites[0])
    est = (LinearProbe if extractor == "linear" else DiffMeansDirection)(**params).fit(X, Y, names)
    return LinearHead(sites, est.coef_, est.intercept_)


def split_examples(n: int, fractions: Sequence[float], seed: int) -> torch.Tensor:
    """Part index [n] of each example: a seeded shuffle cut by `fractions` (which must sum to 1)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise DataError(f"split fractions must be three positive numbers summing to 1, got {list(fractions)}")
    if n < 3:
        raise DataError(f"need at least 3 examples to split into train, calibration and test, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut1 = max(1, round(n * fractions[0]))
    cut2 = min(n - 1, max(cut1 + 1, round(n * (fractions[0] + fractions[1]))))
    part = torch.empty(n, dtype=torch.long)
    for rank, i in enumerate(order):
        part[i] = 0 if rank < cut1 else 1 if rank < cut2 else 2
    return part


def content_rows(handle: ModelHandle, acts: Activations) -> torch.Tensor:
    """Rows that are not special tokens: the monitor never lets template scaffolding fire a CE."""
    return ~torch.isin(acts.token, torch.tensor(handle.tokenizer.all_special_ids, dtype=torch.long))


def ce_metrics(probs: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor, threshold: float) -> dict[str, float]:
    """Token-level AUROC, AUPRC, TPR at 1% FPR, and sequence-level TPR / FPR of the latched CE."""
    maxima, positive = sequence_maxima(probs, labels, sequence)
    fired = maxima > threshold
    return {"auroc": auroc(probs, labels), "auprc": auprc(probs, labels), "tpr_at_1pct_fpr": tpr_at_fpr(probs, labels),
            "sequence_tpr": float(fired[positive].double().mean()) if positive.any() else float("nan"),
            "sequence_fpr": float(fired[~positive].double().mean()) if (~positive).any() else float("nan")}


def fit_bank(handle: ModelHandle, dataset, sites: Sequence[str], *, extractor: str = "linear",
             concat: bool = False, params: dict | None = None, split: Sequence[float] = (0.6, 0.2, 0.2),
             calibration: Calibration = "youden", target_fpr: float = 0.01, seed: int = 0,
             batch_size: int = 64, sae=None, progress: Callable[[int], None] | None = None,
             provenance: dict[str, str] | None = None) -> CEBank:
    """A calibrated CE bank for every CE of `dataset` (a gavel.probes.data.CEDataset).

    `sites` are the candidates: each CE is read from the one that scores best on calibration data
    (or from their concatenation with `concat=True`). Thresholds: "youden" maximises TPR - FPR over
    calibration sequences (GAVEL's calibration); "fpr" lets at most `target_fpr` of calibration
    sequences without the CE fire it. Extractors: "linear" (logistic probes), "diff_means", and "sae"
    (SAE latents selected per CE; pass the sae-lens SAE as `sae` and its hook as the only site).
    """
    if extractor not in EXTRACTORS:
        raise DataError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    calibration = calibration_method(calibration)
    if not sites:
        raise DataError("fit_bank needs at least one candidate site")
    names = list(dataset.names)
    part_of_example = split_examples(len(dataset.examples), split, seed)
    acts = collect_activations(handle, [e.encoded for e in dataset.examples], list(sites), batch_size=batch_size,
                               progress=progress)
    labels = torch.cat([e.labels for e in dataset.examples])
    keep = content_rows(handle, acts)
    acts, labels = acts.select(keep), labels[keep]
    part = part_of_example[acts.example]
    for p, what in enumerate(("training", "calibration", "test")):
        for j, name in enumerate(names):
            column = labels[part == p, j]
            if not column.any() or column.all():
                raise DataError(f"CE {name!r} has no {'positive' if not column.any() else 'negative'} tokens in "
                                f"the {what} split; add examples or change the split")
    groups = [tuple(sites)] if concat else [(s,) for s in sites]
    fitted, calib_auroc = [], []
    for group in groups:
        X = site_features(acts.sites, group)
        head = fit_head(extractor, group, X[part == 0], labels[part == 0], names, params or {}, sae)
        raw = head.score({s: acts.sites[s][part == 1] for s in group}).cpu()
        fitted.append(head)
        calib_auroc.append([auroc(raw[:, j], labels[part == 1][:, j]) for j in range(len(names))])
    best = torch.tensor(calib_auroc).nan_to_num(-1.0).argmax(0)           # [n_ce]: the group each CE reads
    heads: list[Head] = []
    head_specs: list[HeadSpec] = []
    ce_specs: list[tuple[int, CESpec]] = []
    info = {c.name: c for c in dataset.ces}
    for g in sorted(set(best.tolist())):
        cols = [j for j in range(len(names)) if best[j] == g]
        head = fitted[g].select(cols)
        raw_calib = head.score({s: acts.sites[s][part == 1] for s in groups[g]})
        platt = PlattScaling().fit(raw_calib, labels[part == 1][:, cols])
        probs_calib = platt.transform(raw_calib)
        probs_test = platt.transform(head.score({s: acts.sites[s][part == 2] for s in groups[g]}))
        seq_calib, seq_test = acts.example[part == 1], acts.example[part == 2]
        for k, j in enumerate(cols):
            y_calib, y_test = labels[part == 1][:, j], labels[part == 2][:, j]
            threshold = (sequence_youden_threshold(probs_calib[:, k], y_calib, seq_calib) if calibration == "youden"
                         else threshold_at_sequence_fpr(probs_calib[:, k], y_calib, seq_calib, target_fpr))
            metrics = ce_metrics(probs_test[:, k], y_test, seq_test, threshold)
            metrics["calibration_auroc"] = calib_auroc[g][j]
            c = info[names[j]]
            ce_specs.append((j, CESpec(
                name=c.name, title=c.title, role=c.role, definition=c.definition, head=len(heads),
                extractor=extractor, threshold=threshold, scale=float(platt.scale_[k]), shift=float(platt.shift_[k]),
                metrics={m: round(v, 6) for m, v in metrics.items()},
                support={"train_tokens": int(labels[part == 0][:, j].sum()), "test_tokens": int(y_test.sum()),
                         "test_sequences": int(torch.unique(seq_test[y_test]).numel())})))
        heads.append(head)
        head_specs.append(HeadSpec(kind=head.kind, sites=list(groups[g]),
                                   hyperparameters={"extractor": extractor, **(params or {})}))
    manifest = BankManifest(ces=[spec for _, spec in sorted(ce_specs, key=lambda x: x[0])], heads=head_specs,
                            fingerprint=handle.fingerprint(), data_digest=dataset.digest(),
                            provenance={"split": ",".join(map(str, split)), "seed": str(seed),
                                        "calibration": calibration, **(provenance or {})})
    return CEBank(manifest, heads)
