"""Training a sparse autoencoder on one site's activations with sae-lens's own trainer (`SAETrainer`).

The model runs once over the training examples into activation shards on disk (`collect_activations`); each
epoch then reads the shards in a seeded order through a shuffled buffer of rows, so memory holds a buffer and
a shard, never the corpus. The SAE reads the tokens CEs read, content tokens: special tokens are left out
(template scaffolding, and BOS-like first tokens, attention sinks whose norm can be 100x the rest). A held-out
share of the examples measures the result: fraction of variance unexplained, L0, dead latents, and the model's
next-token loss with the reconstruction spliced in at the site, against the clean and the zero-ablated loss.
sae-lens is slow to import, so it is imported inside functions only.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gavel.errors import DataError
from gavel.models.batching import pad_sequences
from gavel.models.chat import Encoded
from gavel.models.collect import ShardedActivations, collect_activations
from gavel.models.handle import ModelHandle
from gavel.probes.data import CEDataset
from gavel.probes.fit import BATCH_TOKENS

if TYPE_CHECKING:
    from sae_lens import TrainingSAE
    from sae_lens.saes.sae import TrainStepOutput

Architecture = Literal["standard", "jumprelu"]
Stop = Literal["tokens", "budget", "data"]  # what ended training: the step count, the wall clock, the batches
Advance = Callable[[int], None]
Progress = Callable[[str, int], AbstractContextManager[Advance]]
"""`progress(description, total)` opens one stage's progress and yields its `advance(n)` (the CLI's progress_bar)."""
REPORT_FILE = "training_report.json"


class SAETrainConfig(BaseModel):
    """What to train: the SAE's width, architecture and sparsity penalty, and the training run's size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_sae: int = Field(gt=0, description="latents")
    architecture: Architecture = Field(default="standard", description="standard (ReLU + L1) or jumprelu (L0 "
                                       "penalty); both stay sliceable for SAE CEs")
    sparsity: float = Field(default=5.0, gt=0, description="coefficient of the sparsity penalty: L1 (standard) "
                            "or L0 (jumprelu), on activations scaled to mean norm sqrt(d_model)")
    tokens: int = Field(default=1_000_000, gt=0, description="training rows to see; epochs repeat the examples")
    batch_size: int = Field(default=4096, gt=0, description="rows per training step")
    lr: float = Field(default=3e-4, gt=0, description="Adam's learning rate, constant")
    sparsity_warmup: int | None = Field(default=None, ge=0, description="steps over which the sparsity "
                                        "coefficient rises linearly from 0 (fewer dead latents); None: 5% of them")
    seed: int = 0
    holdout: float = Field(default=0.1, gt=0, lt=1, description="share of the examples held out for the report")
    budget_s: float | None = Field(default=None, gt=0, description="wall-clock seconds for collecting and "
                                   "training; training stops there (evaluation comes after)")
    buffer_batches: int = Field(default=8, ge=2, description="rows shuffled together, in training batches")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


class TrainPoint(BaseModel):
    """Training-batch figures at one step (before the step's update): recorded at about 20 evenly spaced steps of
    the planned ones, at powers of two, and at the last step taken."""

    model_config = ConfigDict(extra="forbid")

    step: int
    fvu: float
    l0: float


class HeldOutReport(BaseModel):
    """The SAE on held-out examples' content tokens."""

    model_config = ConfigDict(extra="forbid")

    examples: int
    tokens: int
    fvu: float = Field(description="fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean x|^2")
    l0: float = Field(description="mean active latents per token")
    dead_fraction: float = Field(description="share of latents active on no held-out token")
    loss_clean: float = Field(description="next-token loss (nats) of the model as it is")
    loss_spliced: float = Field(description="... with the site's content-token activations replaced by the "
                                "SAE's reconstruction")
    loss_zero: float = Field(description="... with them replaced by zeros")
    loss_recovered: float = Field(description="(zero - spliced) / (zero - clean): 1 = the reconstruction loses "
                                  "nothing the model uses")


class SAETrainReport(BaseModel):
    """What was trained, on what, for how long, and how good it is on held-out data."""

    model_config = ConfigDict(extra="forbid")

    model: str
    site: str
    d_in: int
    config: SAETrainConfig
    train_examples: int
    train_tokens: int = Field(description="content tokens of the training examples (one epoch)")
    steps: int
    tokens_seen: int
    epochs: float
    stopped: Stop
    seconds_collect: float
    seconds_train: float
    seconds_eval: float
    history: list[TrainPoint]
    held_out: HeldOutReport


def _no_progress(description: str, total: int) -> AbstractContextManager[Advance]:
    return contextlib.nullcontext(lambda n: None)


def train_sae(handle: ModelHandle, dataset: CEDataset, site: str, config: SAETrainConfig, *,
              progress: Progress = _no_progress, work_dir: str | Path | None = None,
              batch_size: int = 16) -> tuple[TrainingSAE, SAETrainReport]:
    """Train an SAE on `site` over `dataset`'s examples (labels unused) and report on the held-out share.

    Activation shards go to `work_dir` (a temporary folder by default, removed after); `batch_size` is examples
    per model forward. The SAE is deterministic for a seed on the CPU; save it with `save_trained`.
    """
    if site.endswith("attn.hook_z"):
        raise DataError(f"SAE training reads one vector per token; {site} holds one per head",
                        hint="train on hook_resid_*, hook_attn_out or hook_mlp_out")
    train, held_out = dataset.split([1 - config.holdout, config.holdout], seed=config.seed)
    if not train.examples or not held_out.examples:
        raise DataError(f"{len(dataset)} example(s) cannot be split into training and held-out parts "
                        f"(holdout {config.holdout}); add examples")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gavel-sae-"))
        shards = _collect(handle, [e.encoded for e in train.examples], site, config, Path(work_dir), progress,
                          batch_size)
        seconds_collect = time.monotonic() - started
        special = _special_ids(handle)
        rows = _content_rows(shards, special, torch.Generator().manual_seed(config.seed))
        train_tokens = sum(int((~torch.isin(p.token, special)).sum()) for p in shards)
        if train_tokens == 0:
            raise DataError("the training examples have no content tokens")
        deadline = None if config.budget_s is None else started + config.budget_s
        sae, run = fit_sae(_shuffled_batches(rows, config), handle.d_model, config, progress=progress,
                           deadline=deadline)
    seconds_train = time.monotonic() - started - seconds_collect
    sae.cfg.metadata.hook_name = site
    sae.cfg.metadata.model_name = handle.name
    eval_started = time.monotonic()
    report = evaluate_sae(handle, sae, [e.encoded for e in held_out.examples], site, progress=progress,
                          batch_size=batch_size)
    return sae, SAETrainReport(
        model=handle.name, site=site, d_in=handle.d_model, config=config, train_examples=len(train.examples),
        train_tokens=train_tokens, steps=run.steps, tokens_seen=run.steps * config.batch_size,
        epochs=run.steps * config.batch_size / train_tokens, stopped=run.stopped,
        seconds_collect=seconds_collect, seconds_train=seconds_train,
        seconds_eval=time.monotonic() - eval_started, history=run.history, held_out=report)


def _special_ids(handle: ModelHandle) -> torch.Tensor:
    """Template scaffolding and BOS-like tokens, which CEs never read (`gavel.probes.fit.content_rows`)."""
    return torch.tensor(handle.tokenizer.all_special_ids, dtype=torch.long)


def _collect(handle: ModelHandle, examples: Sequence[Encoded], site: str, config: SAETrainConfig, directory: Path,
             progress: Progress, batch_size: int) -> ShardedActivations:
    """The training examples' activations at `site`, in shards of about two training batches each."""
    with progress("collecting activations", len(examples)) as advance:
        shards = collect_activations(handle, examples, [site], batch_size=batch_size, progress=advance,
                                     shard_dir=directory / "shards", shard_tokens=2 * config.batch_size,
                                     max_batch_tokens=BATCH_TOKENS)
    assert isinstance(shards, ShardedActivations)
    return shards


def _content_rows(shards: ShardedActivations, special: torch.Tensor, generator: torch.Generator
                  ) -> Iterator[torch.Tensor]:
    """Endless epochs over the shards' content rows [n, d], the shards in a fresh seeded order each epoch."""
    from safetensors.torch import load_file

    site = shards.index["sites"][0]
    names = list(shards.index["shards"])
    while True:
        order = torch.randperm(len(names), generator=generator).tolist()
        for i in order:
            part = load_file(shards.directory / names[i])
            keep = ~torch.isin(part["token"], special)
            if keep.any():
                yield part[f"site/{site}"][keep].float()


def _shuffled_batches(rows: Iterator[torch.Tensor], config: SAETrainConfig) -> Iterator[torch.Tensor]:
    """Training batches from a buffer of `buffer_batches` batches of rows: whenever it is full, it is shuffled
    and half of it goes out (sae-lens's mixing scheme), so rows of different shards and epochs mix."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    size = config.buffer_batches * config.batch_size
    buffer = torch.empty(0)
    for part in rows:
        buffer = part if buffer.numel() == 0 else torch.cat([buffer, part])
        if len(buffer) < size:
            continue
        buffer = buffer[torch.randperm(len(buffer), generator=generator)]
        half = len(buffer) // 2 // config.batch_size * config.batch_size
        out, buffer = buffer[:half], buffer[half:]
        yield from out.split(config.batch_size)


@dataclass(frozen=True)
class TrainingRun:
    """How a `fit_sae` run went: steps taken, what stopped it, and the training batches' figures."""

    steps: int
    stopped: Stop
    history: list[TrainPoint]


def new_training_sae(d_in: int, config: SAETrainConfig, device: str | torch.device = "cpu") -> TrainingSAE:
    """A freshly initialised sae-lens training SAE (seeded), trained on activations scaled to mean norm
    sqrt(d_in): the scale is folded into the weights after training, so the saved SAE reads raw activations."""
    from sae_lens import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )

    common: dict[str, Any] = dict(d_in=d_in, d_sae=config.d_sae, device=str(device),
                                  normalize_activations="expected_average_only_in")
    warmup = config.steps // 20 if config.sparsity_warmup is None else config.sparsity_warmup
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.architecture == "jumprelu":
            return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                l0_coefficient=config.sparsity, l0_warm_up_steps=warmup, **common))
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=config.sparsity, l1_warm_up_steps=warmup, **common))


def fit_sae(batches: Iterator[torch.Tensor], d_in: int, config: SAETrainConfig, *, progress: Progress = _no_progress,
            deadline: float | None = None, history_points: int = 20) -> tuple[TrainingSAE, TrainingRun]:
    """Train a new SAE with sae-lens's SAETrainer on `batches` (raw activations [batch_size, d_in]) for
    `config.steps` steps, until `deadline` (time.monotonic(); one step at least) or until the batches run out. The
    activation scale is estimated on the first batch and folded into the weights at the end; the decoder bias starts
    at the first batch's mean."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    first = next(batches, None)
    if first is None:
        raise DataError(f"too few training tokens for one batch of {config.batch_size}; lower --batch-size")
    sae = new_training_sae(d_in, config, first.device)
    trainer: SAETrainer = SAETrainer(SAETrainerConfig(
        total_training_samples=config.steps * config.batch_size, train_batch_size_samples=config.batch_size,
        lr=config.lr, lr_end=config.lr, device=str(first.device)), sae, data_provider=iter(()))
    scale = d_in ** 0.5 / float(first.norm(dim=-1).mean())
    trainer.activation_scaler.scaling_factor = scale
    with torch.no_grad():  # b_dec starts at the mean activation: from zero, Adam's small steps take long to get there
        sae.b_dec.copy_(first.mean(0) * scale)
    every = max(1, config.steps // history_points)
    history: list[TrainPoint] = []
    stopped: Stop = "tokens"
    batch: torch.Tensor | None = first
    with progress("training SAE", config.steps) as advance:
        while trainer.n_training_steps < config.steps:
            if deadline is not None and trainer.n_training_steps > 0 and time.monotonic() >= deadline:
                stopped = "budget"
                break
            batch = batch if batch is not None else next(batches, None)
            if batch is None:
                stopped = "data"
                break
            trainer.maybe_reset_sparsity()
            out = trainer.step(batch)
            step = trainer.n_training_steps
            last = (step, out)
            if step % every == 0 or step & (step - 1) == 0:       # evenly spaced, and at powers of two
                history.append(_point(step, out))
            trainer.n_training_steps += 1
            batch = None
            advance(1)
    if history[-1].step != last[0]:
        history.append(_point(*last))
    trainer.set_final_sae_metadata()
    sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    sae.eval()
    return sae, TrainingRun(steps=trainer.n_training_steps, stopped=stopped, history=history)


@torch.no_grad()
def _point(step: int, out: TrainStepOutput) -> TrainPoint:
    x, x_hat = out.sae_in.double(), out.sae_out.double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    return TrainPoint(step=step, fvu=fvu, l0=float((out.feature_acts > 0).sum(-1).float().mean()))


class _Tally:
    """Running sums for the held-out figures (float64), one batch of content rows at a time."""

    def __init__(self, d_sae: int) -> None:
        self.n = self.active = 0
        self.error = self.square = 0.0
        self.total = torch.zeros(0, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.nll = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.predictions = 0

    def add_rows(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        x = x.double()
        self.n += len(x)
        self.error += float((x - x_hat.double()).pow(2).sum())
        self.square += float(x.pow(2).sum())
        self.total = x.sum(0) if self.total.numel() == 0 else self.total + x.sum(0)
        active = acts > 0
        self.active += int(active.sum())
        self.fired |= active.any(0).cpu()

    def fvu(self) -> float:
        """sum |x - x_hat|^2 over sum |x - mean|^2, where sum |x - mean|^2 = sum |x|^2 - |sum x|^2 / n."""
        variance = self.square - float(self.total.pow(2).sum()) / self.n
        return self.error / max(variance, 1e-12)


@torch.no_grad()
def evaluate_sae(handle: ModelHandle, sae: Any, examples: Sequence[Encoded], site: str, *,
                 progress: Progress = _no_progress, batch_size: int = 16) -> HeldOutReport:
    """FVU, L0, dead latents and spliced-in next-token loss of `sae` (any sae-lens SAE reading `site`) over the
    content tokens of `examples`; the loss counts the predictions made at content tokens."""
    if not examples:
        raise DataError("no held-out examples to evaluate the SAE on")
    special = _special_ids(handle)
    tally = _Tally(sae.cfg.d_sae)
    pad_id = handle.tokenizer.pad_token_id or 0
    with progress("evaluating SAE", len(examples)) as advance:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            ids, mask = pad_sequences([e.input_ids for e in chunk], pad_id, "right")
            content = mask & ~torch.isin(ids, special)
            _evaluate_batch(handle, sae, site, ids, mask, content, tally)
            advance(len(chunk))
    if tally.n == 0:
        raise DataError("the held-out examples have no content tokens")
    clean, spliced, zero = (tally.nll[k] / max(tally.predictions, 1) for k in ("clean", "spliced", "zero"))
    return HeldOutReport(examples=len(examples), tokens=tally.n, fvu=tally.fvu(), l0=tally.active / tally.n,
                         dead_fraction=float((~tally.fired).double().mean()), loss_clean=clean,
                         loss_spliced=spliced, loss_zero=zero,
                         loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else math.nan)


def _evaluate_batch(handle: ModelHandle, sae: Any, site: str, ids: torch.Tensor, mask: torch.Tensor,
                    content: torch.Tensor, tally: _Tally) -> None:
    """Three forwards of one padded batch: clean (keeping the site's activation), spliced, zero-ablated."""
    device = handle.device
    seen: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor) -> None:
        seen["act"] = act

    def replace_with(new: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda act: torch.where(content.to(act.device)[..., None], new.to(act.device, act.dtype), act)

    with handle.hooks([(site, keep)]):
        clean = _logits(handle.forward(ids.to(device), mask.long().to(device)))
    act = seen["act"]
    rows = content.to(act.device)
    sae_device = sae.W_enc.device
    acts = sae.encode(act[rows].to(sae_device))
    x_hat = sae.decode(acts)
    tally.add_rows(act[rows].to(sae_device), x_hat, acts)
    spliced_act = act.clone()
    spliced_act[rows] = x_hat.to(act.device, act.dtype)
    outputs = {"clean": clean}
    for name, new in (("spliced", spliced_act), ("zero", torch.zeros_like(act))):
        with handle.hooks([(site, replace_with(new))]):
            outputs[name] = _logits(handle.forward(ids.to(device), mask.long().to(device)))
    # the prediction at token t (a content token) of token t+1 (a real token)
    predicts = (content[:, :-1] & mask[:, 1:]).to(clean.device)
    targets = ids[:, 1:].to(clean.device)[predicts]
    for name, logits in outputs.items():
        tally.nll[name] += float(torch.nn.functional.cross_entropy(
            logits[:, :-1][predicts].float(), targets, reduction="sum"))
    tally.predictions += int(predicts.sum())


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def save_trained(sae: TrainingSAE, report: SAETrainReport, directory: str | Path, *, half: bool = False) -> Path:
    """The SAE in sae-lens's inference format (cfg.json + sae_weights.safetensors: `load_sae` reads it), with
    the report as `training_report.json` beside it. `half` stores the weights in float16 (half the size); the
    config keeps float32, and sae-lens casts the weights to it on loading."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    weights, _ = sae.save_inference_model(directory)
    if half:
        save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    (directory / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
    return directory
