"""The runtime monitor: hooks score CEs per token inside the model's own forward passes and step rules.

Everything per token stays a tensor on the model's device (scores, rule state, the blocked flags that
generate()'s stopping check reads); events are copied to the host once, when a batch is done.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Literal

import torch

from gavel.errors import GavelError, RuleError, did_you_mean, one_of
from gavel.io.conversations import Conversation
from gavel.models.batching import pad_sequences
from gavel.models.chat import Encoded, decode_text, encode_conversation
from gavel.models.generation import PromptBatch, generate_ids, prompt_batch
from gavel.models.handle import ModelHandle
from gavel.plugins.actions import HandlesEvents, handles_events
from gavel.plugins.interventions import PromptIntervention
from gavel.plugins.registry import registry
from gavel.probes.bank import CEBank
from gavel.rules import compile_rules
from gavel.rules.action_checks import check_actions
from gavel.rules.compile.program import RESPONSE
from gavel.rules.compile.soft import SoftRules
from gavel.rules.source import RuleErrors
from gavel.rules.testing.run import Scan, ces_read
from gavel.runtime.compiled import trace_with_hooks
from gavel.runtime.events import Event, Result
from gavel.runtime.interventions import Artifacts, rule_interventions
from gavel.runtime.session import Session, SitesRead

Policy = Literal["fail_open", "fail_closed"]
POLICIES: tuple[Policy, ...] = ("fail_open", "fail_closed")


def failure_policy(name: str) -> Policy:
    """`name` as a failure policy; GavelError for an unknown one."""
    return one_of(name, POLICIES, "failure policy", GavelError)


class Monitor:
    """CE bank + rules over a model. `watch()` attaches hooks; `generate()` and `scan()` use it."""

    def __init__(self, handle: ModelHandle, bank: CEBank, rules: Sequence, *, policy: Policy = "fail_open",
                 score: Literal["rules", "all"] = "rules", artifacts: Artifacts | None = None) -> None:
        """`artifacts` names the steering artifacts rules may steer with (fitted planes or directories); a name
        not given is read as a directory relative to the rule's file."""
        policy = failure_policy(policy)
        self.handle, self.bank, self.policy = handle, bank, policy
        trace_with_hooks()
        rules = list(rules)
        self.program = compile_rules(rules, bank.names).to(handle.device)
        self.all_rules = rules   # private ones too: what the program and the soft scores are built from
        problems = check_actions(rules, registry(), runnable=True) + _missing_requirements(rules, bank.names)
        if problems:
            raise RuleErrors(problems)
        self.rules = [r for r in rules if not r.private]   # what the program reports
        # the CEs an event shows: those its rule reads, also through the rules (private ones too) it refers to
        by_name = {r.name: r for r in rules}
        self.event_ces = [[n for n in dict.fromkeys([*r.ce_names, *sorted(ces_read(r, by_name))]) if n in bank.names]
                          for r in self.rules]
        self.calls = [r.action_call for r in self.rules]
        actions = [registry().actions[c.name] for c in self.calls]   # all known: check_actions above
        device = handle.device
        self.scoring = bank.to(device)
        self.heads = (list(range(len(bank.heads))) if score == "all"
                      else bank.heads_for(self.program.ce_indices))      # only the heads the rules read
        self.sites = list(dict.fromkeys(s for h in self.heads for s in bank.heads[h].sites))
        self.thresholds = self.scoring.thresholds
        # per step the monitor keeps calibrated logits and compares them with logit thresholds: the same
        # decision as sigmoid(logit) > threshold, without a sigmoid per token (probabilities come in results())
        read = set(range(len(bank.names)) if score == "all" else self.program.ce_indices)
        self.plan = [self._scoring_step(h, [c for c in bank.columns[h] if c in read]) for h in self.heads]
        thr = self.thresholds
        self.logit_thresholds = torch.where(thr <= 0, -torch.inf, torch.where(thr >= 1, torch.inf, torch.logit(thr)))
        # action plugins with a `handle(events, arguments)` get each batch's events of their rules on the host
        instances: dict[type[HandlesEvents], HandlesEvents] = {}
        self.handlers = {r: (instances.setdefault(a, a()), a.params.model_validate(dict(c.args)) if a.params else None)
                         for r, (a, c) in enumerate(zip(actions, self.calls)) if handles_events(a)}
        self.stops = torch.tensor([a.stops_generation for a in actions], dtype=torch.bool, device=device)
        self.can_block = any(a.stops_generation for a in actions)
        self.action_names = [a.name for a in actions]
        self.action_kinds = [a.kind for a in actions]
        resolved = rule_interventions(self.rules, actions, handle, artifacts)
        self.steering = [r for r in resolved if not r.reads_prompt]
        self.prompt_interventions = [r for r in resolved if r.reads_prompt]
        self.eos_ids = torch.tensor(handle.end_token_ids, dtype=torch.long, device=device)
        self.special_ids = torch.tensor(handle.tokenizer.all_special_ids, dtype=torch.long, device=device)

    def _scoring_step(self, h: int, columns: list[int]) -> tuple:
        """(head, bank columns, calibration, gather device, pooling width) scoring only `columns` of head h: a head
        with CEs the rules never read is narrowed to the rest (a linear head to their weight columns, an SAE head to
        the latents they use)."""
        head = self.scoring.heads[h]
        if len(columns) < len(self.bank.columns[h]):
            head = head.select([self.bank.columns[h].index(c) for c in columns])
        # a model split across devices (device_map): each head scores where its site's module runs
        device = self.handle.site_device(head.sites[0])
        spread = {self.handle.site_device(s) for s in head.sites} != {device}
        return (head.to(device), _as_index(columns), self.scoring.scale[columns].to(device),
                self.scoring.shift[columns].to(device), device if spread else None, self.bank.pools[h])

    @contextmanager
    def watch(self, batch_size: int, classes: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> Iterator[Session]:
        """Hooks for one batch of sequences; each sequence keeps its own rule state. `classes` [B, T] are the
        token class codes (role + 4 for response tokens) of the first forward's tokens and `mask` [B, T] its
        real (unpadded) tokens; later tokens are generated ones (assistant response)."""
        session = Session(self, batch_size, classes, mask)
        model = self.handle.hf_model   # what every forward goes through: a TransformerBridge runs its HF model
        handles = []
        try:
            # the model-level hooks keep Python state per forward, so torch.compile must not trace them (it
            # would recompile on every step); the site hooks only hand tensors over and run inside the graph
            handles.append(model.register_forward_pre_hook(torch.compiler.disable(session.before_forward),
                                                           with_kwargs=True))
            handles.append(model.register_forward_hook(torch.compiler.disable(session.after_forward),
                                                       with_kwargs=True))
            # steering first: a CE read where a rule steers sees the steered activation
            with self.handle.hooks(session.steerer.hooks() + [(s, session.site_hook(s)) for s in self.sites]):
                yield session
        finally:
            for h in reversed(handles):
                h.remove()

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 64,
                 **generate_kwargs) -> list[Result]:
        """Guarded generation: rules run on the prompt and every new token; `block` stops a sequence."""
        if self.handle.backend == "lens":
            # TransformerLens 3.9's bridge under transformers 5 loses the KV cache and the positions of left-padded
            # rows (its replies diverge after the first token): one sequence at a time, the whole prefix each step
            return [r for i, c in enumerate(conversations)
                    for r in self._generate([c], max_new_tokens, i, {**generate_kwargs, "use_cache": False})]
        return self._generate(conversations, max_new_tokens, 0, generate_kwargs)

    def _generate(self, conversations: Sequence[Conversation], max_new_tokens: int, first_sequence: int,
                  generate_kwargs: dict) -> list[Result]:
        from transformers import StoppingCriteriaList

        batch = prompt_batch(self.handle, conversations)
        max_new_tokens = self.reply_room(batch.input_ids.shape[1], max_new_tokens)
        for attempt in range(2):
            with self.prompt_session(batch) as (session, early):
                out = generate_ids(
                    self.handle, batch, max_new_tokens=max_new_tokens,
                    stopping_criteria=StoppingCriteriaList([session.stopping_criterion()]), **generate_kwargs)
            if not session.blind or attempt:
                break
            # the model's compiled decode step was traced before any monitor existed, without guards on
            # hooks, so it does not notice the hooks added since: retrace with them
            warnings.warn(f"{self.handle.name}: the model's compiled forward was traced without gavel's hooks; "
                          "clearing torch.compile's caches (torch._dynamo.reset()) to retrace it with them",
                          stacklevel=2)
            torch._dynamo.reset()
        return self.generation_results(session, batch, out, first_sequence, early)

    def reply_room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """How many new tokens a reply to a prompt of `prompt_tokens` may have: `max_new_tokens`, fewer (with a
        warning saying why) where the model's positions end first; GavelError when the prompt leaves no room."""
        limit = self.handle.max_positions
        if limit is None or prompt_tokens + max_new_tokens <= limit:
            return max_new_tokens
        if prompt_tokens >= limit:
            raise GavelError(f"the prompt has {prompt_tokens} tokens and {self.handle.name} takes at most {limit} "
                             "positions, which leaves no room for a reply: shorten it, or check the conversation "
                             "without generating (scan, `gavel audit --no-generate`), which scores long ones in "
                             "windows")
        room = limit - prompt_tokens
        warnings.warn(f"replies stop after {room} new tokens, not {max_new_tokens}: the prompt has {prompt_tokens} "
                      f"tokens and {self.handle.name} takes at most {limit} positions", stacklevel=3)
        return room

    @contextmanager
    def prompt_session(self, batch: PromptBatch) -> Iterator[tuple[Session, list[list[Event]]]]:
        """`watch` for a generation from a left-padded prompt batch, with the decisions rules take on the prompts
        taken first, by one detection forward over them (stopped at the last CE site): a `perturb` rule (DeconIEP)
        that holds on a prompt sends that prompt through its intervention (the first such rule of a sequence wins),
        and a steering rule that fires while a prompt is read steers that sequence from its firing token on, the
        rest of the prompt included, so the first reply token is steered too. Yields the session and, per
        sequence, the events of those rules in the detection forward (the changed prompt may no longer make them
        fire; the results keep them)."""
        b = len(batch.encoded)
        if not self.prompt_interventions and not self.steering:
            with self.watch_prompts(batch) as session:
                yield session, [[] for _ in range(b)]
            return
        with torch.no_grad(), self.watch_prompts(batch) as probe:
            self._read_sites(probe, batch.input_ids, batch.attention_mask)
        holds = torch.cat(probe.holds, 1)                                          # [B, P, R]
        decided = {self.rules[rule.index].name for rule in self.prompt_interventions + self.steering}
        early = [[e for e in r.events if e.rule in decided]
                 for r in probe.results([len(e.input_ids) for e in batch.encoded], [e.roles for e in batch.encoded])]
        taken = torch.zeros(b, dtype=torch.bool, device=holds.device)
        hooks = []
        for rule in self.prompt_interventions:
            rows = holds[:, :, rule.index].any(1) & ~taken
            taken |= rows
            intervention = rule.intervention
            assert isinstance(intervention, PromptIntervention), "rule_interventions checked it"
            hooks += intervention.for_prompt(batch.attention_mask).hooks(rows)
        never = torch.iinfo(torch.long).max
        start = torch.stack([torch.where(holds[:, :, r.index].any(1), holds[:, :, r.index].long().argmax(1), never)
                             for r in self.steering]) if self.steering else None             # [R_s, B]
        with self.handle.hooks(hooks), self.watch_prompts(batch) as session:
            if start is not None:
                session.steerer.start_in_prompt(start)
            yield session, early

    @contextmanager
    def watch_prompts(self, batch: PromptBatch) -> Iterator[Session]:
        """`watch` for a left-padded prompt batch (its token classes from the chat encoding)."""
        classes, _ = pad_sequences([e.roles.long() for e in batch.encoded], 0, "left")
        with self.watch(len(batch.encoded), classes.to(self.handle.device), batch.attention_mask) as session:
            yield session

    def generation_results(self, session: Session, batch: PromptBatch, output_ids: torch.Tensor | None = None,
                           first_sequence: int = 0, early: Sequence[Sequence[Event]] = ()) -> list[Result]:
        """Per-sequence results of a generation from `batch`: the generated text is `output_ids` past the
        prompt (default, and always for a blocked sequence: the tokens the monitor saw past each prompt, which end
        at the blocking token; generate() samples one more before it stops), the reply what the user gets; `early`
        (from `prompt_session`) adds the events of prompt-time rules that the changed prompt no longer fires."""
        results = session.results([len(e.input_ids) for e in batch.encoded], [e.roles for e in batch.encoded],
                                  first_sequence)
        width = batch.input_ids.shape[1]
        for i, (r, events) in enumerate(zip(results, early)):
            missing = [dataclasses.replace(e, sequence=first_sequence + i) for e in events if e.rule not in r.fired]
            if missing:
                r.events = sorted(r.events + missing, key=lambda e: e.token_index)
        for i, r in enumerate(results):
            generated = r.token_ids[r.prompt_length:] if output_ids is None or r.blocked else output_ids[i, width:]
            r.generated = decode_text(self.handle.tokenizer, generated, skip_special_tokens=True).strip()
            r.reply = self.reply_for(r)
        self.dispatch(results)
        return results

    @torch.no_grad()
    def scan(self, conversations: Sequence[Conversation], batch_size: int = 16, *, window: int | None = None,
             stride: int | None = None) -> list[Result]:
        """Detection only on existing conversations: one forward pass per batch, no generation. A final assistant
        message is the response: it is each result's `generated`, and its `reply` unless a rule blocked it.

        A conversation longer than `window` tokens (default: the model's positions, `handle.max_positions`) is
        scored alone in overlapping windows `stride` tokens apart (default: half a window), the rules seeing each
        token once, in order (see `scan_windows` and docs/monitor.md)."""
        size = window if window is not None else self.handle.max_positions
        step = window_stride(size, stride)
        results: list[Result] = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            encoded = [encode_conversation(self.handle.tokenizer, c) for c in chunk]
            fits = [i for i, e in enumerate(encoded) if size is None or len(e.input_ids) <= size]
            by_index = dict(zip(fits, self._scan_batch([encoded[i] for i in fits])))
            for i, e in enumerate(encoded):
                if i not in by_index:
                    assert size is not None and step is not None   # only a limit makes a conversation not fit
                    by_index[i] = self._scan_windows(e, size, step)
            batch_results = [by_index[i] for i in range(len(encoded))]
            for i, (conversation, r) in enumerate(zip(chunk, batch_results)):
                r.events = [dataclasses.replace(e, sequence=start + i) for e in r.events]
                last = conversation[-1] if conversation else {}
                r.generated = last.get("content", "") if last.get("role") == "assistant" else ""   # the response
                r.reply = self.reply_for(r)
            self.dispatch(batch_results)
            results += batch_results
        return results

    def _scan_batch(self, encoded: Sequence[Encoded]) -> list[Result]:
        """Conversations that fit the model, right-padded into one forward pass."""
        if not encoded:
            return []
        device = self.handle.device
        ids, mask = pad_sequences([e.input_ids for e in encoded], self.handle.tokenizer.pad_token_id or 0, "right")
        classes, _ = pad_sequences([token_classes(e.roles) for e in encoded], 0, "right")
        with self.watch(len(encoded), classes.to(device), mask.to(device)) as session:
            self._read_sites(session, ids.to(device), mask.long().to(device))
        return session.results([len(e.input_ids) for e in encoded], [e.roles for e in encoded])

    def _scan_windows(self, encoded: Encoded, size: int, stride: int) -> Result:
        """One conversation longer than `size` tokens, one forward per window (see `scan_windows`); the session's
        rule state runs on across the windows."""
        device = self.handle.device
        ids, classes = encoded.input_ids.to(device), token_classes(encoded.roles).to(device)
        with self.watch(1) as session:
            for lo, hi, first in scan_windows(len(ids), size, stride):
                scored = torch.arange(lo, hi, device=device) >= first
                session.score_window(classes[None, lo:hi], scored[None])
                self._read_sites(session, ids[None, lo:hi], torch.ones(1, hi - lo, dtype=torch.long, device=device))
        return session.results([len(ids)], [encoded.roles])[0]

    def _read_sites(self, session: Session, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """One scanning forward, stopped once every CE site is read (the layers above and the logits are not
        needed to score existing text), then scored as the model-level hook would have."""
        session.scanning = bool(self.sites)
        try:
            self.handle.forward(ids, mask)
        except SitesRead:
            session.after_forward(None, (), {}, None)

    @cached_property
    def soft(self) -> SoftRules:
        """The rules' soft scores (results' `rule_scores` in audits), built the first time an audit asks."""
        return SoftRules(self.all_rules, self.bank.names)

    def dispatch(self, results: Sequence[Result]) -> None:
        """Hand a batch's events to the action plugins that handle them; a plugin that raises is reported
        (a warning) and never stops the monitor: the events stay in the results either way."""
        for r, (handler, arguments) in self.handlers.items():
            events = [e for result in results for e in result.events if e.rule == self.rules[r].name]
            if not events:
                continue
            try:
                handler.handle(events, arguments)
            except Exception as e:
                origin = registry().origins.get(("actions", self.action_names[r]), "?")
                warnings.warn(f"action plugin {self.action_names[r]!r} ({origin}) failed on {len(events)} event(s) "
                              f"of rule {self.rules[r].name!r}: {type(e).__name__}: {e}", stacklevel=3)

    def reply_for(self, result: Result) -> str:
        """The generated text, or for a blocked sequence the blocking rule's reply."""
        if not result.blocked:
            return result.generated
        block = next((e for e in result.events if e.action == "block"), None)
        if block is None:
            return "[blocked: the monitor failed on this sequence (policy fail_closed)]"
        r = next(i for i, rule in enumerate(self.rules) if rule.name == block.rule)
        return self.calls[r].text or f"[blocked by rule {block.rule}]"


def soft_scores(soft: SoftRules, result: Result) -> list[float | None]:
    """`soft`'s scores on a monitored result (its scores at template tokens are 0, as the rules saw them)."""
    assert result.content is not None and result.classes is not None, "a monitor's results carry both"
    return soft.scores(result.scores * result.content.unsqueeze(-1), result.classes)


def window_stride(size: int | None, stride: int | None) -> int | None:
    """The stride of `scan_windows` for windows of `size` tokens: `stride`, by default half a window; GavelError
    outside 1..size (None when there is no limit)."""
    if size is None:
        return None
    if size < 1:
        raise GavelError(f"a scan window is at least 1 token, not {size}")
    stride = max(1, size // 2) if stride is None else stride
    if not 1 <= stride <= size:
        raise GavelError(f"the stride between scan windows must be 1..{size} (the window), not {stride}")
    return stride


def scan_windows(length: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over `length` tokens: windows of `size` tokens starting `stride`
    apart, up to the one that reaches the end. Each token is scored by the first window holding it, where it has
    the most left context (at least size - stride tokens, except in the first window): a window scores the tokens
    from where the one before ended."""
    windows = [(0, min(size, length), 0)]
    while windows[-1][1] < length:
        start = windows[-1][0] + stride
        windows.append((start, min(start + size, length), windows[-1][1]))
    return windows


def token_classes(roles: torch.Tensor) -> torch.Tensor:
    """Token class codes of a stored conversation: role codes, + RESPONSE on its final assistant message."""
    classes = roles.long().clone()
    speaking = (classes > 0).nonzero().squeeze(1)
    if len(speaking) and classes[speaking[-1]] == 3:
        others = ((classes == 1) | (classes == 2)).nonzero().squeeze(1)
        start = int(others[-1]) + 1 if len(others) else 0
        classes[start:] += RESPONSE * (classes[start:] == 3)
    return classes


def _missing_requirements(rules: Sequence, ce_names: Sequence[str]) -> list[RuleError]:
    """`requires.ces` (a rule's own, or its pack's) the bank lacks, as located errors: those rules were written for
    CEs this bank cannot score."""
    known = set(ce_names)
    errors: dict[tuple[str, str], RuleError] = {}
    for rule in rules:
        owners = [(rule, rule.requires)] + ([(rule.pack, rule.pack.requires)] if rule.pack else [])
        for owner, requires in owners:
            for i, ce in enumerate(requires.ces if requires else ()):
                if ce not in known:
                    location = owner.field_location("requires", "ces", i)
                    guess = did_you_mean(ce, list(ce_names))
                    errors.setdefault((str(location), ce), RuleError(
                        f"rule '{rule.name}' requires CE '{ce}', which the bank lacks", location=location,
                        hint=f"did you mean '{guess}'?" if guess
                        else "fit it into the bank, or load a bank that has it"))
    return list(errors.values())


def _as_index(columns: list[int]) -> slice | list[int]:
    """A slice when the columns are contiguous (cheap to assign through), else the list."""
    return slice(columns[0], columns[-1] + 1) if columns == list(range(columns[0], columns[-1] + 1)) else columns


def scanner(handle: ModelHandle, bank: CEBank) -> Scan:
    """The scan function rule tests run text cases with: a monitor over `handle` and `bank` for the rules under test,
    scanning each conversation (its final assistant message is the response) and giving each one's firings."""
    from gavel.rules.testing.run import Firing

    def scan(rules: Sequence, conversations: Sequence[Conversation]) -> list[list[Firing]]:
        scanned = Monitor(handle, bank, rules).scan(conversations)
        return [[Firing(e.rule, e.token_index, e.action, e.kind, e.token) for e in r.events] for r in scanned]
    return scan
