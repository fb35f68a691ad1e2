"""The Python guardrail: a model with a CE bank and rules. `generate`, `stream` and `check` conversations, or
`watch` your own `model.generate(...)` calls; every result carries its events and a verdict, and can go to an
append-only audit log."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import overload

import torch

from gavel.errors import GavelError
from gavel.io.conversations import Conversation
from gavel.models.chat import decode_text
from gavel.models.generation import PromptBatch, prompt_batch
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.runtime.audit_log import AuditLog
from gavel.runtime.events import Event, Result, verdict
from gavel.runtime.interventions import Artifacts
from gavel.runtime.monitor import Monitor, Policy
from gavel.runtime.session import Session


@dataclass(frozen=True, slots=True)
class GuardResult:
    """One guarded conversation: what the user gets, what fired, and the verdict (the strongest action taken)."""

    text: str                   # the reply, or the blocking rule's reply
    generated: str              # what the model produced (up to the blocking token)
    verdict: str                # clean | log | alert | steer | block
    events: tuple[Event, ...]
    blocked: bool
    failed: bool                # the monitor failed on this sequence (see the failure policy)
    record: Result = field(repr=False)   # per-token tokens, scores and roles

    def to_dict(self) -> dict:
        """A JSON-ready summary (what the audit log stores)."""
        return {"verdict": self.verdict, "blocked": self.blocked, "failed": self.failed, "text": self.text,
                "generated": self.generated, "tokens": len(self.record.tokens),
                "prompt_tokens": self.record.prompt_length,
                "events": [e.to_dict() for e in self.events]}


@dataclass(frozen=True, slots=True)
class StreamStep:
    """One streamed token, after the rules have seen it: the rules that first held there; the last step of a
    stream has `result` set (and `blocked` when a rule stopped the reply at this token, which is withheld)."""

    token: str
    token_id: int
    index: int
    fired: tuple[str, ...]
    blocked: bool = False
    result: GuardResult | None = None


class Guard:
    """Wrap a model (a `ModelHandle`, or a Hugging Face model with its tokenizer) with a CE bank and rules."""

    def __init__(self, model, bank: CEBank | str | os.PathLike[str], rules, *, tokenizer=None,
                 policy: Policy = "fail_open", audit: AuditLog | str | os.PathLike[str] | None = None,
                 artifacts: Artifacts | None = None) -> None:
        """`artifacts`: the steering artifacts the rules' steering actions name (see `Monitor`)."""
        from gavel.models.loading import wrap_model
        from gavel.rules import load_rules

        handle = model if isinstance(model, ModelHandle) else wrap_model(model, _needs(tokenizer))
        if not isinstance(bank, CEBank):
            bank = CEBank.load(bank, fingerprint=handle.fingerprint())
        if isinstance(rules, (str, os.PathLike)) or (isinstance(rules, Sequence) and rules
                                                      and isinstance(rules[0], (str, os.PathLike))):
            rules = load_rules(rules)
        self.monitor = Monitor(handle, bank, rules, policy=policy, artifacts=artifacts)
        self.audit = AuditLog(audit) if isinstance(audit, (str, os.PathLike, Path)) else audit

    @property
    def handle(self) -> ModelHandle:
        return self.monitor.handle

    @overload
    def generate(self, conversations: Conversation, max_new_tokens: int = 64, **generate_kwargs) -> GuardResult: ...

    @overload
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 64,
                 **generate_kwargs) -> list[GuardResult]: ...

    def generate(self, conversations: Conversation | Sequence[Conversation], max_new_tokens: int = 64,
                 **generate_kwargs) -> GuardResult | list[GuardResult]:
        """Guarded generation (greedy unless told otherwise); one conversation gives one result."""
        single, batch = _as_batch(conversations)
        generate_kwargs.setdefault("do_sample", False)
        results = self._finish(self.monitor.generate(batch, max_new_tokens=max_new_tokens, **generate_kwargs))
        return results[0] if single else results

    @overload
    def check(self, conversations: Conversation, batch_size: int = 16) -> GuardResult: ...

    @overload
    def check(self, conversations: Sequence[Conversation], batch_size: int = 16) -> list[GuardResult]: ...

    def check(self, conversations: Conversation | Sequence[Conversation], batch_size: int = 16
              ) -> GuardResult | list[GuardResult]:
        """Detection only, on existing conversations (the final assistant message is the response)."""
        single, batch = _as_batch(conversations)
        results = self._finish(self.monitor.scan(batch, batch_size=batch_size))
        return results[0] if single else results

    @torch.no_grad()
    def stream(self, conversation: Conversation, max_new_tokens: int = 64, *, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> Iterator[StreamStep]:
        """Generate token by token, yielding each token once the rules have seen it (greedy, or sampled at
        `temperature`); a blocked reply ends at the blocking token, which is not shown."""
        handle, monitor = self.handle, self.monitor
        batch = prompt_batch(handle, [conversation])
        ids, mask = batch.input_ids, batch.attention_mask
        max_new_tokens = monitor.reply_room(ids.shape[1], max_new_tokens)
        with self.monitor.prompt_session(batch) as (session, early):
            out = handle.hf_model(input_ids=ids, attention_mask=mask, use_cache=True)
            reported = set(self._newly_fired(session, set()))
            index = ids.shape[1]
            for _ in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator)
                else:
                    token = logits.argmax(-1, keepdim=True)
                if len(monitor.eos_ids) and bool(torch.isin(token[0, 0], monitor.eos_ids)):
                    break
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                ids = torch.cat([ids, token], dim=1)
                if handle.backend == "lens":   # the bridge loses the KV cache (see Monitor.generate): whole prefix
                    out = handle.hf_model(input_ids=ids, attention_mask=mask, use_cache=False)
                else:
                    out = handle.hf_model(input_ids=token, attention_mask=mask, use_cache=True, **_cache_of(out))
                fired = self._newly_fired(session, reported)
                reported |= set(fired)
                step = StreamStep(decode_text(handle.tokenizer, token[0]), int(token[0, 0]), index, tuple(fired))
                index += 1
                if bool(session.blocked[0]):
                    yield replace(step, blocked=True)
                    break
                yield step
        result = self._finish(self.monitor.generation_results(session, batch, early=early))[0]
        yield StreamStep("", -1, index, (), blocked=result.blocked, result=result)

    @contextmanager
    def watch(self, conversations: Sequence[Conversation]) -> Iterator[Watch]:
        """Guard your own `model.generate(**watch.inputs, stopping_criteria=watch.stopping_criteria, ...)` call;
        then `watch.results(output_ids)` gives the guard results. `perturb` rules perturb the prompts of that call."""
        batch = prompt_batch(self.handle, list(conversations))
        with self.monitor.prompt_session(batch) as (session, early):
            yield Watch(self, batch, session, early)

    # ---- internals
    def _newly_fired(self, session: Session, reported: set[str]) -> list[str]:
        """Rules that hold for the first time in the session's last forward (one sequence)."""
        holds = session.holds[-1][0].any(0).tolist()
        return [r.name for r, h in zip(self.monitor.rules, holds) if h and r.name not in reported]

    def _finish(self, results: Sequence[Result]) -> list[GuardResult]:
        out = [GuardResult(text=r.reply, generated=r.generated, verdict=verdict(r.events), events=tuple(r.events),
                           blocked=r.blocked, failed=r.failed, record=r) for r in results]
        if self.audit is not None:
            now = time.time()
            self.audit.write([{"time": now, "model": self.handle.name, **g.to_dict()} for g in out])
        return out


@dataclass
class Watch:
    """A guarded batch of your own `generate()` call: its inputs, its stopping criteria, then its results."""

    guard: Guard
    batch: PromptBatch
    session: Session
    early: list = field(default_factory=list)   # events of prompt-time rules from the detection pass

    @property
    def inputs(self) -> dict:
        return {"input_ids": self.batch.input_ids, "attention_mask": self.batch.attention_mask}

    @property
    def stopping_criteria(self):
        from transformers import StoppingCriteriaList

        return StoppingCriteriaList([self.session.stopping_criterion()])

    def results(self, output_ids: torch.Tensor) -> list[GuardResult]:
        return self.guard._finish(self.guard.monitor.generation_results(self.session, self.batch, output_ids,
                                                                        early=self.early))


def _as_batch(conversations) -> tuple[bool, list[Conversation]]:
    single = isinstance(conversations, str) or (isinstance(conversations, Sequence) and bool(conversations)
                                                and isinstance(conversations[0], dict))
    batch = [conversations] if single else list(conversations)
    return single, [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in batch]


def _needs(tokenizer):
    if tokenizer is None:
        raise GavelError("a Hugging Face model needs its tokenizer: Guard(model, bank, rules, tokenizer=...)")
    return tokenizer


def _cache_of(output) -> dict:
    """The KV cache of a forward's output, as the next forward takes it (`cache` in transformers 5)."""
    if "cache" in output:
        return {"cache": output["cache"]}
    return {"past_key_values": output["past_key_values"]}
