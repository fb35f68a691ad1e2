"""The LLM-VA loop on a model: generate, judge answered/refused, fit the directions, edit, repeat.

Each iteration resamples the training prompts, generates greedy replies with the model as edited so far, judges
them, fits a `VectorAlignment` on the sublayer outputs at the last prompt token, and adds its closed-form edit on
top; the iteration with the best validation F1 (TP: benign answered, FP: toxic answered, FN: benign refused) wins.
The result is one `WeightDelta` from the original weights, which the model is restored to at the end.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from gavel.artifacts import ModelFingerprint
from gavel.errors import DataError
from gavel.io.conversations import Conversation
from gavel.models.generation import generate_replies
from gavel.models.handle import ModelHandle
from gavel.steering.activations import last_prompt_activations
from gavel.steering.delta import WeightDelta
from gavel.steering.evaluate import Judge, refusal_phrases
from gavel.steering.llmva.alignment import VectorAlignment
from gavel.steering.llmva.edit import alignment_delta, final_site, sublayer_sites


class AlignmentMetrics(BaseModel):
    """Attack success (toxic answered), over-refusal (benign refused), F1 of answering benign prompts, utility."""

    model_config = ConfigDict(extra="forbid")
    asr: float
    over_refusal: float
    f1: float
    utility: float | None = None


class Iteration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    iteration: int
    selected: list[str]
    train: AlignmentMetrics       # on the iteration's training prompts, before its edit
    validation: AlignmentMetrics  # on the validation prompts, after its edit


def f1_of(benign_answered: Sequence[bool], toxic_answered: Sequence[bool]) -> float:
    """F1 with TP = benign answered, FP = toxic answered, FN = benign refused."""
    tp, fp = sum(benign_answered), sum(toxic_answered)
    fn = len(benign_answered) - tp
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def measure(handle: ModelHandle, benign: Sequence[Conversation], toxic: Sequence[Conversation], *,
            judge: Judge = refusal_phrases, max_new_tokens: int = 48,
            utility: Callable[[ModelHandle], float] | None = None) -> AlignmentMetrics:
    """Greedy replies to both sets, judged; the model as it is now."""
    answered = {}
    for name, prompts in (("benign", benign), ("toxic", toxic)):
        replies = generate_replies(handle, list(prompts), max_new_tokens)
        answered[name] = [not r for r in judge(list(prompts), replies)]
    b, t = answered["benign"], answered["toxic"]
    return AlignmentMetrics(asr=round(sum(t) / len(t), 4), over_refusal=round(1 - sum(b) / len(b), 4),
                            f1=round(f1_of(b, t), 4), utility=None if utility is None else round(utility(handle), 4))


@dataclass
class LLMVAResult:
    alignment: VectorAlignment       # the winning iteration's fit
    delta: WeightDelta               # from the original weights to the winning iteration's
    history: list[Iteration]
    best: int

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Two artifacts in one folder: `alignment/` (what the `align` rule action projects with) and `delta/` (the
        weight edit `gavel align eval | apply` applies), both with the fingerprint of the model they were fitted on
        and the delta's record of the data (`fitted_on`)."""
        d = Path(directory)
        self.alignment.save(d / ALIGNMENT, fingerprint=self.delta.fingerprint, provenance=self.delta.provenance,
                            fitted_on=self.delta.fitted_on)
        self.delta.save(d / DELTA)
        return d


ALIGNMENT, DELTA = "alignment", "delta"   # the folders `LLMVAResult.save` writes


def load_alignment(path: str | os.PathLike[str], fingerprint: ModelFingerprint | None = None,
                   force: bool = False) -> VectorAlignment:
    """The alignment of a `gavel align fit` folder (or an alignment folder itself), checked against the model."""
    found = Path(path)
    return VectorAlignment.load(found / ALIGNMENT if (found / ALIGNMENT).is_dir() else found, fingerprint, force)


def load_delta(path: str | os.PathLike[str], fingerprint: ModelFingerprint | None = None,
               force: bool = False) -> WeightDelta:
    """The weight delta of a `gavel align fit` folder (or a delta folder itself), checked against the model."""
    found = Path(path)
    return WeightDelta.load(found / DELTA if (found / DELTA).is_dir() else found, fingerprint, force)


def fit_llmva(handle: ModelHandle, benign: Sequence[Conversation], toxic: Sequence[Conversation], *,
              iterations: int = 3, sample: int | None = None, validation_fraction: float = 0.3, l_select: int = 8,
              C: float = 0.01, judge: Judge = refusal_phrases, max_new_tokens: int = 48, seed: int = 0,
              log: Callable[[Iteration], None] | None = None) -> LLMVAResult:
    """Run the loop; the model's weights are the original ones again when it returns (also on errors)."""
    rng = random.Random(seed)
    train_b, val_b = _split(list(benign), validation_fraction, rng)
    train_t, val_t = _split(list(toxic), validation_fraction, rng)
    sites = [*sublayer_sites(handle.n_layers), final_site(handle.n_layers)]
    params = dict(handle.hf_model.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    history: list[Iteration] = []
    best: tuple[float, int, VectorAlignment, dict[str, torch.Tensor]] | None = None
    try:
        for i in range(iterations):
            b = rng.sample(train_b, min(sample or len(train_b), len(train_b)))
            t = rng.sample(train_t, min(sample or len(train_t), len(train_t)))
            prompts = b + t
            replies = generate_replies(handle, prompts, max_new_tokens)
            answered = torch.tensor([not r for r in judge(prompts, replies)])
            benign_mask = torch.tensor([True] * len(b) + [False] * len(t))
            before = AlignmentMetrics(asr=round(float(answered[~benign_mask].float().mean()), 4),
                                      over_refusal=round(1 - float(answered[benign_mask].float().mean()), 4),
                                      f1=round(f1_of(answered[benign_mask].tolist(),
                                                     answered[~benign_mask].tolist()), 4))
            features = last_prompt_activations(handle, prompts, sites)
            alignment = VectorAlignment(l_select=l_select, C=C, random_state=seed + i).fit(
                features, benign_mask, answered, final=sites[-1])
            alignment_delta(handle, alignment).apply(handle.hf_model)       # on top of the edits so far
            after = measure(handle, val_b, val_t, judge=judge, max_new_tokens=max_new_tokens)
            step = Iteration(iteration=i, selected=alignment.selected_, train=before, validation=after)
            history.append(step)
            if log:
                log(step)
            if best is None or after.f1 >= best[0]:       # ties: the later, more refined edit
                total = {n: (params[n].detach().double() - original[n].double()).float()
                         for n in params if not torch.equal(params[n].detach(), original[n])}
                best = (after.f1, i, alignment, total)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
    if best is None:
        raise DataError("no iteration ran (iterations must be at least 1)")
    _, index, alignment, total = best
    delta = WeightDelta.for_model(handle.hf_model, handle.fingerprint(), total,
                                  {"method": "LLM-VA", "iterations": str(iterations), "best_iteration": str(index)})
    return LLMVAResult(alignment, delta, history, index)


def _split(items: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """A seeded train / validation split with at least one prompt on each side."""
    if len(items) < 2:
        raise DataError(f"need at least 2 prompts per class, got {len(items)}")
    shuffled = items[:]
    rng.shuffle(shuffled)
    n_val = min(max(1, round(fraction * len(items))), len(items) - 1)
    return shuffled[n_val:], shuffled[:n_val]
