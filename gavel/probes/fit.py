"""Fitting a CE bank from a labelled dataset: split by example, fit, calibrate, measure, in two streamed passes.

Examples are split three ways (train / calibration / test) by whole example, or, given a separate
calibration set (GAVEL's `calibration.json` conversations), two ways (train / test). Extractors are fitted
on train; each CE is read from the candidate site (or concatenation) where it scores best on calibration
data; Platt scaling and thresholds are fitted on calibration data; every metric in the bank is measured on
test data the CE never saw.

Memory stays bounded whatever the data size: pass 1 runs the model over the training examples and keeps a
bounded row sample (`RowSample`, at most `max_rows` rows per site); pass 2 runs it over the calibration and
test examples and keeps only every fitted head's scores ([tokens, n_ce] per candidate), never activations.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from gavel.errors import DataError, one_of
from gavel.models.collect import Activations, iter_activations
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
from gavel.probes.pooling import check_width, pool_rows
from gavel.probes.rowsample import RowSample

EXTRACTORS = ("linear", "diff_means", "sae")
Calibration = Literal["youden", "fpr"]
CALIBRATIONS: tuple[Calibration, ...] = ("youden", "fpr")
MAX_ROWS = 20_000  # default training rows kept per site (float32): see docs/probes.md, "Memory"
BATCH_TOKENS = 4096  # padded tokens per forward: bounds the model's own activations and attention scores


def calibration_method(name: str) -> Calibration:
    """`name` as a threshold calibration; DataError for an unknown one."""
    return one_of(name, CALIBRATIONS, "calibration")


def fit_head(extractor: str, sites: tuple[str, ...], X: torch.Tensor, Y: torch.Tensor, names: Sequence[str],
             params: dict, sae=None) -> Head:
    """One head scoring every CE from features X [N, width] of `sites` (concatenated); for the sae extractor, X
    holds the SAE's latents [N, d_sae] (see `sae_encoder`)."""
    if extractor == "sae":
        from gavel.probes.sae import SAELatentSelector, build_head

        if sae is None or len(sites) != 1:
            raise DataError("the sae extractor needs an SAE (--sae DIR) and exactly one site: the SAE's hook")
        return build_head(sae, SAELatentSelector(**params).fit(X, Y, names), sites[0])
    est = (LinearProbe if extractor == "linear" else DiffMeansDirection)(**params).fit(X, Y, names)
    return LinearHead(sites, est.coef_, est.intercept_)


def sae_encoder(sae, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of `site`'s activations to the SAE's latents [N, d_sae]: the sae extractor pools latents, not
    activations, since an SAE head's score is linear in its latents but not in the activations."""
    from gavel.probes.sae import encode_all

    return lambda a: encode_all(sae, site_features({site: a}, (site,)))


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
    return ~torch.isin(acts.token, _special_ids(handle))


def _special_ids(handle: ModelHandle) -> torch.Tensor:
    return torch.tensor(handle.tokenizer.all_special_ids, dtype=torch.long)


def ce_metrics(probs: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor, threshold: float) -> dict[str, float]:
    """Token-level AUROC, AUPRC, TPR at 1% FPR, and sequence-level TPR / FPR of the latched CE."""
    maxima, positive = sequence_maxima(probs, labels, sequence)
    fired = maxima > threshold
    return {"auroc": auroc(probs, labels), "auprc": auprc(probs, labels), "tpr_at_1pct_fpr": tpr_at_fpr(probs, labels),
            "sequence_tpr": float(fired[positive].double().mean()) if positive.any() else float("nan"),
            "sequence_fpr": float(fired[~positive].double().mean()) if (~positive).any() else float("nan")}


def _content_labels(examples: Sequence, special: torch.Tensor) -> list[torch.Tensor]:
    """Each example's labels at its content tokens (the rows `content_rows` keeps), read without the model."""
    return [e.labels[~torch.isin(e.encoded.input_ids, special)] for e in examples]


def _check_both_classes(labels: torch.Tensor, names: Sequence[str], what: str) -> None:
    """DataError unless every CE has positive and negative tokens in this part (checked before any forward)."""
    for j, name in enumerate(names):
        column = labels[:, j]
        if not column.any() or column.all():
            raise DataError(f"CE {name!r} has no {'positive' if not column.any() else 'negative'} tokens in "
                            f"the {what}; add examples or change the split")


def sample_training_rows(handle: ModelHandle, examples: Sequence, sites: Sequence[str], max_rows: int, *,
                         pools: Sequence[int] = (1,), seed: int = 0, batch_size: int = 64,
                         batch_tokens: int = BATCH_TOKENS, progress: Callable[[int], None] | None = None,
                         encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RowSample:
    """Pass 1: run the model over the training `examples`, offering every content token to a RowSample, one
    feature set per site and pooling width (keyed by `feature_key`); `encode` maps each site's activation rows to
    the features pooled and kept (default: the activations)."""
    special = _special_ids(handle)
    labels = _content_labels(examples, special)
    ce_positives = torch.cat(labels).sum(0) if labels else torch.zeros(0)
    sample = RowSample(max_rows, ce_positives, seed)
    for batch in iter_activations(handle, [e.encoded for e in examples], list(sites), batch_size=batch_size,
                                  max_batch_tokens=batch_tokens, progress=progress):
        keep = content_rows(handle, batch)
        first, last = int(batch.example[0]), int(batch.example[-1])
        encoded = {s: a if encode is None else encode(a) for s, a in batch.sites.items()}
        features = {feature_key(s, w): pool_rows(a, batch.example, w)[keep]
                    for s, a in encoded.items() for w in pools}
        sample.add(features, torch.cat(labels[first:last + 1]))
    return sample


def feature_key(site: str, width: int) -> str:
    """The row sample's name for `site`'s activations pooled over `width` tokens."""
    return site if width == 1 else f"{site}#mean{width}"


@dataclass(frozen=True)
class PooledHead:
    """A fitted candidate head with the pooling width its features were averaged over."""

    head: Head
    pool: int

    @property
    def sites(self) -> tuple[str, ...]:
        return self.head.sites

    def score_rows(self, acts: Mapping[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor:
        return pool_rows(self.head.score(acts), example, self.pool)


class Scorer(Protocol):
    """What pass 2 scores with: a pooled head, or a whole CE bank."""

    @property
    def sites(self) -> Sequence[str]: ...

    def score_rows(self, acts: Mapping[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor: ...


def score_examples(handle: ModelHandle, examples: Sequence, heads: Sequence[Scorer], *, batch_size: int = 64,
                   batch_tokens: int = BATCH_TOKENS, progress: Callable[[int], None] | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pass 2: every head's raw scores [content tokens, n_ce] over `examples`, with their labels and example index;
    activations are scored batch by batch (pooled heads over every token of the example) and dropped."""
    sites = sorted({s for h in heads for s in h.sites})
    scores: list[list[torch.Tensor]] = [[] for _ in heads]
    sequence = []
    for batch in iter_activations(handle, [e.encoded for e in examples], sites, batch_size=batch_size,
                                  max_batch_tokens=batch_tokens, progress=progress):
        keep = content_rows(handle, batch)
        for out, head in zip(scores, heads):
            out.append(head.score_rows({s: batch.sites[s] for s in head.sites}, batch.example)[keep].cpu())
        sequence.append(batch.example[keep])
    labels = torch.cat(_content_labels(examples, _special_ids(handle)))
    return [torch.cat(s) for s in scores], labels, torch.cat(sequence)


def fit_bank(handle: ModelHandle, dataset, sites: Sequence[str], *, extractor: str = "linear",
             concat: bool = False, pools: Sequence[int] = (1,), params: dict | None = None,
             split: Sequence[float] = (0.6, 0.2, 0.2),
             calibration: Calibration = "youden", target_fpr: float = 0.01, seed: int = 0,
             calibration_data=None, max_rows: int = MAX_ROWS, batch_size: int = 64,
             batch_tokens: int = BATCH_TOKENS, sae=None,
             progress: Callable[[int], None] | None = None, provenance: dict[str, str] | None = None) -> CEBank:
    """A calibrated CE bank for every CE of `dataset` (a gavel.probes.data.CEDataset).

    `sites` are the candidates: each CE is read from the one that scores best on calibration data
    (or from their concatenation with `concat=True`). Calibration data is `calibration_data` when given
    (a CEDataset labelling every CE of `dataset`, e.g. GAVEL's calibration conversations; the split's
    calibration share then joins training), else the split's calibration part. Thresholds: "youden"
    maximises TPR - FPR over calibration sequences (GAVEL's calibration); "fpr" lets at most
    `target_fpr` of calibration sequences without the CE fire it. Extractors: "linear" (logistic probes),
    "diff_means", and "sae" (SAE latents selected per CE; pass the sae-lens SAE as `sae` and its hook as
    the only site). `pools` are candidate pooling widths (gavel.probes.pooling): a linear head is fitted on
    activations averaged over each width's trailing tokens (an SAE head on its latents so averaged), and each CE
    reads the (site, width) that scores best on calibration data, like its site. Heads are fitted on at most
    `max_rows` training tokens (see RowSample); a forward runs at most `batch_size` examples and `batch_tokens`
    padded tokens; `progress(n)` counts examples run through the model (those of `dataset`, then those of
    `calibration_data`).
    """
    if extractor not in EXTRACTORS:
        raise DataError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    calibration = calibration_method(calibration)
    if not sites:
        raise DataError("fit_bank needs at least one candidate site")
    if max_rows < 2:
        raise DataError(f"max_rows must be at least 2, not {max_rows}")
    pools = list(dict.fromkeys(check_width(w) for w in pools))
    if not pools:
        raise DataError("fit_bank needs at least one pooling width (1: no pooling)")
    if extractor == "sae" and (sae is None or len(sites) != 1 or concat):
        raise DataError("the sae extractor needs an SAE (--sae DIR) and exactly one site: the SAE's hook")
    names = list(dataset.names)
    part = split_examples(len(dataset.examples), split, seed)
    if calibration_data is not None:
        part[part == 1] = 0
        calib_examples = list(calibration_data.select(names).examples)
        if not calib_examples:
            raise DataError("the calibration data has no examples")
    else:
        calib_examples = [e for e, p in zip(dataset.examples, part.tolist()) if p == 1]
    train = [e for e, p in zip(dataset.examples, part.tolist()) if p == 0]
    test = [e for e, p in zip(dataset.examples, part.tolist()) if p == 2]
    special = _special_ids(handle)
    calib_what = "calibration data" if calibration_data is not None else "calibration split"
    content = [torch.cat(_content_labels(examples, special)) for examples in (train, calib_examples, test)]
    for labels_of_part, what in zip(content, ("training split", calib_what, "test split")):
        _check_both_classes(labels_of_part, names, what)

    groups = [(group, w) for group in ([tuple(sites)] if concat else [(s,) for s in sites]) for w in pools]
    sample = sample_training_rows(handle, train, sites, max_rows, pools=pools, seed=seed, batch_size=batch_size,
                                  batch_tokens=batch_tokens, progress=progress,
                                  encode=sae_encoder(sae, sites[0]) if extractor == "sae" else None)
    y_train = sample.labels()
    fitted = []
    for group, w in groups:
        X = site_features({s: sample.site(feature_key(s, w)) for s in group}, group)
        fitted.append(PooledHead(fit_head(extractor, group, X, y_train, names, params or {}, sae), w))
        del X
    del sample
    raw, labels, sequence = score_examples(handle, calib_examples + test, fitted, batch_size=batch_size,
                                           batch_tokens=batch_tokens, progress=progress)
    is_calib = sequence < len(calib_examples)
    y_calib, y_test = labels[is_calib], labels[~is_calib]
    seq_calib, seq_test = sequence[is_calib], sequence[~is_calib]
    calib_auroc = [[auroc(r[is_calib][:, j], y_calib[:, j]) for j in range(len(names))] for r in raw]
    best = torch.tensor(calib_auroc).nan_to_num(-1.0).argmax(0)           # [n_ce]: the group each CE reads
    heads: list[Head] = []
    head_specs: list[HeadSpec] = []
    ce_specs: list[tuple[int, CESpec]] = []
    info = {c.name: c for c in dataset.ces}
    for g in sorted(set(best.tolist())):
        cols = [j for j in range(len(names)) if best[j] == g]
        head = fitted[g].head.select(cols)
        platt = PlattScaling().fit(raw[g][is_calib][:, cols], y_calib[:, cols])
        probs_calib = platt.transform(raw[g][is_calib][:, cols])
        probs_test = platt.transform(raw[g][~is_calib][:, cols])
        for k, j in enumerate(cols):
            threshold = (sequence_youden_threshold(probs_calib[:, k], y_calib[:, j], seq_calib)
                         if calibration == "youden"
                         else threshold_at_sequence_fpr(probs_calib[:, k], y_calib[:, j], seq_calib, target_fpr))
            metrics = ce_metrics(probs_test[:, k], y_test[:, j], seq_test, threshold)
            metrics["calibration_auroc"] = calib_auroc[g][j]
            c = info[names[j]]
            ce_specs.append((j, CESpec(
                name=c.name, title=c.title, role=c.role, definition=c.definition, head=len(heads),
                extractor=extractor, threshold=threshold, scale=float(platt.scale_[k]), shift=float(platt.shift_[k]),
                metrics={m: round(v, 6) for m, v in metrics.items()},
                support={"train_tokens": int(content[0][:, j].sum()),
                         "train_tokens_fitted": int(y_train[:, j].sum()), "test_tokens": int(y_test[:, j].sum()),
                         "test_sequences": int(torch.unique(seq_test[y_test[:, j]]).numel())})))
        heads.append(head)
        head_specs.append(HeadSpec(kind=head.kind, sites=list(groups[g][0]), pool=groups[g][1],
                                   hyperparameters={"extractor": extractor, **(params or {})}))
    thresholds_from = (f"calibration data: {len(calib_examples)} examples" if calibration_data is not None
                       else f"calibration split: {len(calib_examples)} of {len(dataset.examples)} examples")
    manifest = BankManifest(ces=[spec for _, spec in sorted(ce_specs, key=lambda x: x[0])], heads=head_specs,
                            fingerprint=handle.fingerprint(), data_digest=dataset.digest(),
                            provenance={"split": ",".join(map(str, split)), "seed": str(seed),
                                        "calibration": calibration, "thresholds_from": thresholds_from,
                                        "max_rows": str(max_rows), "pools": ",".join(map(str, pools)),
                                        **(provenance or {})})
    return CEBank(manifest, heads)
