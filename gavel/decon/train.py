"""DeconIEP (arXiv 2601.19334): train the perturbation network G so that the frozen evaluated model f_con, reading
perturbed prompt embeddings, answers like a less contaminated reference model; save, load and apply it.

For each batch of prompts, reply tokens y_ref are sampled from the reference on the unperturbed prompt; then
prompt + y_ref is teacher-forced through f_con (prompt embeddings perturbed by `zeta * tanh(G(e))`) and through
the reference (no grad), and G minimises, over the reply positions only (up to each row's first end token),
`lambda_kl * KL(p_con || p_ref) + lambda_ce * CE(p_con, y_ref)`, each averaged over those positions.
Only G learns: f_con and the reference are frozen (no grad, eval mode) and their parameters are left bit-identical.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from gavel.artifacts import ModelFingerprint
from gavel.base import Estimator
from gavel.decon.generator import PerturbationGenerator, bounded_delta
from gavel.decon.perturb import PromptPerturbation, patch_prompt, prompt_delta
from gavel.errors import DataError, ModelLoadError, check_is_fitted
from gavel.io.conversations import Conversation
from gavel.models.handle import ModelHandle


class DeconProvenance(BaseModel):
    """How G was trained: steps taken, the final loss, and what the prompts were."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int                      # optimizer steps taken (a checkpoint: so far)
    final_loss: float | None
    data: str = ""                  # what the prompts were (e.g. builtin:decon-train)
    n_prompts: int = 0


Prompt = str | Conversation


def as_conversations(prompts: Sequence[Prompt]) -> list[list[dict]]:
    """Strings become one user message; conversations are kept (without a trailing assistant reply)."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append([{"role": "user", "content": p}])
        else:
            conv = [dict(m) for m in p]
            out.append(conv[:-1] if conv and conv[-1].get("role") == "assistant" else conv)
    if not out:
        raise DataError("DeconIEP.fit needs at least one prompt")
    return out


def check_same_vocab(model: ModelHandle, reference: ModelHandle) -> None:
    """ModelLoadError unless both models read and write the same token ids."""
    a, b = model.tokenizer.get_vocab(), reference.tokenizer.get_vocab()
    if a != b:
        only = sorted(set(a) ^ set(b))[:5]
        moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
        raise ModelLoadError(f"{model.name} and the reference {reference.name} do not share a tokenizer "
                             f"({len(a)} vs {len(b)} tokens; e.g. in one only: {only}, other ids: {moved})",
                             hint="DeconIEP compares next-token distributions, so both need the same vocabulary")
    va = model.hf_model.get_output_embeddings().weight.shape[0]
    vb = reference.hf_model.get_output_embeddings().weight.shape[0]
    if va != vb:
        raise ModelLoadError(f"{model.name} predicts {va} tokens, the reference {reference.name} {vb}")


@contextmanager
def frozen(*models: torch.nn.Module) -> Iterator[None]:
    """Models in eval mode with requires_grad off inside the block; both restored after."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models]
    try:
        for m in models:
            m.eval()
            m.requires_grad_(False)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


@dataclass(frozen=True)
class ReplyBatch:
    """Left-padded prompts [B, P] followed by sampled replies [B, R] (right-padded after each row's end token)."""

    input_ids: torch.Tensor      # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R] long
    prompt_width: int
    reply_mask: torch.Tensor      # [B, R] bool: reply tokens that count in the loss


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens, as generate() derives them from a left-padded mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def sample_replies(reference: ModelHandle, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                   temperature: float) -> ReplyBatch:
    """y_ref: the reference's replies on the unperturbed prompts (sampled; greedy when temperature is 0)."""
    from gavel.models.generation import generate_ids, prompt_batch

    batch = prompt_batch(reference, conversations)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
        do_sample=False)
    out = generate_ids(reference, batch, max_new_tokens=max_new_tokens, **kwargs)
    width = batch.input_ids.shape[1]
    reply = out[:, width:]
    eos = torch.zeros_like(reply, dtype=torch.bool)
    for e in reference.end_token_ids:
        eos |= reply == e
    # a reply counts up to and including its first end token
    before_end = (eos.long().cumsum(-1) - eos.long()) == 0
    reply_mask = before_end
    mask = torch.cat([batch.attention_mask, reply_mask.long()], dim=1)
    return ReplyBatch(out, mask, width, reply_mask)


def decon_loss(model: ModelHandle, reference: ModelHandle, generator: torch.nn.Module, batch: ReplyBatch,
               zeta: float, lambda_kl: float = 1.0, lambda_ce: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective on one batch, differentiable in G: `lambda_kl * KL(p_con || p_ref) + lambda_ce *
    CE(p_con, y_ref)`, each the mean over the batch's counted reply tokens."""
    ids, mask, width = batch.input_ids, batch.attention_mask, batch.prompt_width
    pos = positions(mask)
    with torch.no_grad():
        ref_logits = reference.hf_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        embeds = model.hf_model.get_input_embeddings()(ids)
    delta = bounded_delta(generator, embeds[:, :width], mask[:, :width], zeta)
    perturbed = torch.cat([embeds[:, :width] + delta.to(embeds.dtype), embeds[:, width:]], dim=1)
    con_logits = model.hf_model(inputs_embeds=perturbed, attention_mask=mask, position_ids=pos).logits
    # logits at position t predict token t + 1: the reply's tokens are predicted from positions width - 1 ...
    con = F.log_softmax(con_logits[:, width - 1:-1].float(), dim=-1)
    ref = F.log_softmax(ref_logits[:, width - 1:-1].float(), dim=-1)
    counted = batch.reply_mask.float()
    n = counted.sum().clamp(min=1.0)
    kl = ((con.exp() * (con - ref)).sum(-1) * counted).sum() / n
    ce = (-con.gather(-1, ids[:, width:, None]).squeeze(-1) * counted).sum() / n
    loss = lambda_kl * kl + lambda_ce * ce
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach()), "loss": float(loss.detach())}


class DeconIEP(Estimator):
    """Inference-time decontamination by input embedding perturbation (scikit-learn style estimator).

    `zeta` bounds the perturbation (|delta|_inf <= zeta); it is read when the perturbation is applied, so
    `set_params(zeta=...)` or `perturbing(..., zeta=...)` rescales a fitted G without refitting (a zeta sweep).
    Saved as one artifact with the fingerprints of the evaluated model (refused on others) and of the reference.
    """

    artifact_kind = "input_perturbation"
    artifact_what = "a DeconIEP perturbation"
    artifact_hint = "train one with 'gavel decon train'"

    def __init__(self, zeta: float = 1e-3, width: int = 64, n_layers: int = 4, n_heads: int = 4,
                 dropout: float = 0.2, max_positions: int = 512, lr: float = 1e-5, steps: int = 200,
                 batch_size: int = 8, lambda_kl: float = 1.0, lambda_ce: float = 1.0, temperature: float = 1.0,
                 max_new_tokens: int = 32, seed: int = 0) -> None:
        self.zeta = zeta
        self.width = width
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.max_positions = max_positions
        self.lr = lr
        self.steps = steps
        self.batch_size = batch_size
        self.lambda_kl = lambda_kl
        self.lambda_ce = lambda_ce
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    def _validate(self) -> None:
        if not (math.isfinite(self.zeta) and self.zeta >= 0):
            raise DataError(f"zeta must be a finite number >= 0, got {self.zeta}")
        for name in ("width", "n_layers", "n_heads", "steps", "batch_size", "max_new_tokens"):
            if int(getattr(self, name)) < (0 if name == "steps" else 1):
                raise DataError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.n_heads:
            raise DataError(f"width {self.width} is not divisible by n_heads {self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise DataError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr < 0 or self.temperature < 0:
            raise DataError("lr and temperature must be >= 0")

    def _new_generator(self, d_model: int) -> PerturbationGenerator:
        return PerturbationGenerator(d_model, self.width, self.n_layers, self.n_heads, self.dropout,
                                     self.max_positions)

    # ---- fit
    def fit(self, model: ModelHandle, reference: ModelHandle, prompts: Sequence[Prompt],
            on_step: Callable[[int, float], None] | None = None, *, checkpoint_dir: str | Path | None = None,
            checkpoint_every: int = 0, data: str = "") -> DeconIEP:
        """Train G on `prompts` (strings or conversations) against `reference`; `model` (f_con) stays frozen.
        `on_step(step, loss)` after each step; with `checkpoint_dir` and `checkpoint_every` N, the artifact is
        also saved to `checkpoint_dir/step-XXXXXX` every N steps. Sets `generator_`, `losses_`, `history_`."""
        self._validate()
        for attr in ("generator_", "d_model_", "losses_", "history_", "fingerprint_", "reference_fingerprint_",
                     "provenance_"):
            self.__dict__.pop(attr, None)
        check_same_vocab(model, reference)
        conversations = as_conversations(prompts)
        device = model.device
        fingerprint, reference_fingerprint = model.fingerprint(), reference.fingerprint()
        losses, history = [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            generator = self._new_generator(model.d_model).to(device)
            optimizer = torch.optim.Adam(generator.parameters(), lr=self.lr)
            order = torch.Generator().manual_seed(self.seed)
            queue: list[int] = []
            with frozen(model.hf_model, reference.hf_model):
                generator.train()
                for step in range(int(self.steps)):
                    if len(queue) < self.batch_size:
                        queue += torch.randperm(len(conversations), generator=order).tolist()
                    chosen, queue = queue[:self.batch_size], queue[self.batch_size:]
                    batch = sample_replies(reference, [conversations[i] for i in chosen], self.max_new_tokens,
                                           self.temperature)
                    loss, parts = decon_loss(model, reference, generator, batch, self.zeta, self.lambda_kl,
                                             self.lambda_ce)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(parts["loss"])
                    history.append(parts)
                    if on_step is not None:
                        on_step(step, parts["loss"])
                    if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                        self._set_fitted(generator, losses, history, fingerprint, reference_fingerprint, data,
                                         len(conversations))
                        self.save(Path(checkpoint_dir) / f"step-{step + 1:06d}")
                        generator.train()
            generator.eval()
        return self._set_fitted(generator, losses, history, fingerprint, reference_fingerprint, data,
                                len(conversations))

    def _set_fitted(self, generator, losses, history, fingerprint, reference_fingerprint, data, n) -> DeconIEP:
        self.generator_ = generator
        self.d_model_ = generator.d_model
        self.losses_ = list(losses)
        self.history_ = list(history)
        self.fingerprint_ = fingerprint
        self.reference_fingerprint_ = reference_fingerprint
        self.provenance_ = DeconProvenance(steps=len(losses), final_loss=losses[-1] if losses else None, data=data,
                                           n_prompts=n)
        return self

    # ---- apply
    def delta(self, embeds: torch.Tensor, mask: torch.Tensor | None = None, *, zeta: float | None = None,
              rows=None) -> torch.Tensor:
        """The perturbation of prompt embeddings [B, P, D] (mask [B, P] of real tokens), in their dtype."""
        check_is_fitted(self, ("generator_",))
        self.generator_.to(embeds.device)
        return prompt_delta(self.generator_, embeds, mask, self.zeta if zeta is None else zeta, rows)

    def patch(self, handle: ModelHandle, *, zeta: float | None = None, rows=None,
              attention_mask: torch.Tensor | None = None) -> PromptPerturbation:
        """Hook the perturbation into `handle`'s prompt embeddings until `remove()` (see gavel.decon.perturb).
        `rows` (indices or a bool [B]; None = every row) picks the rows of each batch that are perturbed; it can be
        reassigned on the result between generate() calls."""
        check_is_fitted(self, ("generator_",))
        return patch_prompt(handle.hf_model, self.generator_, self.zeta if zeta is None else zeta, rows=rows,
                            attention_mask=attention_mask)

    @contextmanager
    def perturbing(self, handle: ModelHandle, *, zeta: float | None = None, rows=None,
                   attention_mask: torch.Tensor | None = None) -> Iterator[PromptPerturbation]:
        """`handle`'s prompt embeddings perturbed inside the block (forward or generate, with or without a KV
        cache); the hooks are removed after it, also on errors."""
        state = self.patch(handle, zeta=zeta, rows=rows, attention_mask=attention_mask)
        try:
            yield state
        finally:
            state.remove()

    # ---- artifact
    def _build_module(self, name: str) -> torch.nn.Module:
        if name != "generator_":
            return super()._build_module(name)
        return self._new_generator(self.d_model_)

    def _restore(self) -> None:
        self.reference_fingerprint_ = ModelFingerprint.model_validate(self.reference_fingerprint_)
        self.provenance_ = DeconProvenance.model_validate(self.provenance_)
