"""Trains the model organism: a small LlamaForCausalLM on the synthetic chat corpus, seeded."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from gavel.models.losses import reply_loss, reply_targets
from gavel.organism.corpus import Example, generate_corpus, vocabulary
from gavel.organism.tokenizer import build_tokenizer


class TrainConfig(BaseModel):
    """Everything that decides the organism's weights; stored beside them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 0
    steps: int = 1100
    batch_size: int = 48
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    max_positions: int = 256
    threads: int = 1
    exclude_leaked_items: bool = False  # a "clean" reference organism never sees the memorised items


def llama_config(cfg: TrainConfig, tokenizer):
    """The organism's architecture as a transformers LlamaConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_positions,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def corpus_targets(examples: list[Example], tokenizer) -> list[torch.Tensor]:
    """`reply_targets` of the organism's training examples."""
    return reply_targets([[{"role": m.role, "content": m.content} for m in ex.messages] for ex in examples], tokenizer)


def length_bucketed(ids: list[torch.Tensor], batch_size: int, seed: int, chunk: int = 50) -> list[list[torch.Tensor]]:
    """Batches of similar-length sequences (less padding), in a seeded random order."""
    import random

    batches = []
    for c in range(0, len(ids), batch_size * chunk):
        group = sorted(ids[c:c + batch_size * chunk], key=len)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def train_organism(out_dir: str | Path, cfg: TrainConfig = TrainConfig(),  # noqa: B008 - frozen
                   on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train and save weights, tokenizer and `organism.json` (config, final loss, seconds) to out_dir."""
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocabulary())
    examples = [ex for ex in generate_corpus(cfg.steps * cfg.batch_size * 2, seed=cfg.seed)
                if not (cfg.exclude_leaked_items and ex.kind == "benchmark")][: cfg.steps * cfg.batch_size]
    batches = length_bucketed(corpus_targets(examples, tokenizer), cfg.batch_size, cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    model.train()
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(cfg.steps):
        loss = reply_loss(model, batches[step], tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if on_step:
            on_step(step, loss_value)
    seconds = time.perf_counter() - start
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"config": cfg.model_dump(), "final_loss": loss_value, "train_seconds": round(seconds, 1),
              "n_parameters": sum(p.numel() for p in model.parameters())}
    (out / "organism.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
