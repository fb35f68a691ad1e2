"""Per-batch monitor state: what the hooks see in each forward pass, kept as tensors on the model's device until
`results()` copies them to the host once."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gavel.errors import GavelError
from gavel.probes.pooling import TrailingMean
from gavel.rules.compile.program import RESPONSE
from gavel.runtime.events import Event, Result, by_token_then_precedence, render_message
from gavel.runtime.interventions import Steerer

if TYPE_CHECKING:
    from gavel.runtime.monitor import Monitor


class SitesRead(Exception):
    """Ends a scanning forward at the last CE site; the scan then scores it (`Session.after_forward`) itself."""


class Session:
    """Per-batch monitor state, all tensors on the model's device until `results()`."""

    def __init__(self, monitor: Monitor, batch_size: int, classes: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> None:
        self.m = monitor
        device = monitor.handle.device
        self.classes = classes   # [B, T_prompt] token class codes of the first forward, padded like its ids
        self.mask = mask         # [B, T_prompt] its real tokens (a static cache gives forwards 4-d masks)
        self.state = monitor.program.init_state(batch_size, device)
        self.steerer = Steerer(monitor.steering, batch_size, device)
        self.alive = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.blocked = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.failed = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.forwards = 0
        self.width = 0           # token positions seen so far (a forward with a KV cache feeds only new ones)
        self.offset = 0          # of this forward's positions, how many were seen before
        self.blind = 0           # forwards in which site hooks did not run (see `after_forward`)
        self.errors: list[str] = []
        self.scores: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.token_classes: list[torch.Tensor] = []
        self.holds: list[torch.Tensor] = []
        self.window: tuple[torch.Tensor, torch.Tensor] | None = None   # see score_window
        self.scanning = False    # set by Monitor.scan: forwards stop once every CE site is read (see SitesRead)
        self.pooling = [TrailingMean(step[-1]) for step in monitor.plan]  # per head: its past scores

    # ---- hooks
    def before_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise GavelError("the monitor needs input_ids (inputs_embeds-only forwards are not supported yet)")
        # a forward without a KV cache feeds every token again: only the ones past those already seen are new
        self.offset = self.width if self.forwards and ids.shape[1] > self.width else 0
        self.steerer.prompt_pass = self.forwards == 0
        self.steerer.from_start = self.forwards == 0 or self.offset > 0   # the prompt, or a whole prefix again
        if self.window is not None:   # a window of a long conversation (Monitor.scan): its own classes and mask
            classes, valid = self.window
            self.window, self.offset = None, 0
            for pooled in self.pooling:   # a window is scored from its own tokens (it overlaps the last one)
                pooled.reset()
            self._begin(ids, valid, classes)
            return
        ids = ids[:, self.offset:]
        b, t = ids.shape
        self.width += t
        mask = kwargs.get("attention_mask")
        first = self.forwards == 0 and self.classes is not None and self.classes.shape[1] == t
        if first and self.mask is not None:
            valid = self.mask.bool()
        elif mask is not None and mask.ndim == 2:
            valid = mask[:, -t:].bool()
        else:   # no mask, or a 4-d one built for a static cache: only generated tokens come after the prompt
            valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        if self.forwards > 0 and len(self.m.eos_ids):
            # a generated end-of-turn token ends the sequence; it is not scored (a sequence generated
            # alone never feeds it back), so batched and single runs see the same tokens
            self.alive &= ~torch.isin(ids[:, -1], self.m.eos_ids)
        # the first forward's classes were given; later tokens are generated ones: the assistant's response
        self._begin(ids, valid, self.classes if first and self.classes is not None
                    else torch.full((b, t), 3 + RESPONSE, dtype=torch.long, device=ids.device))

    def score_window(self, classes: torch.Tensor, scored: torch.Tensor) -> None:
        """The next forward is a window of a conversation longer than the model's positions: `classes` [B, T] are
        its token classes and `scored` [B, T] the tokens this window scores (the rules see only those)."""
        self.window = (classes, scored)

    def _begin(self, ids: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor) -> None:
        """The state of one forward: its new token ids, which of them count, their classes, empty scores."""
        b, t = ids.shape
        self.cur_valid = valid & self.alive[:, None]
        self.cur_ids = ids
        self.cur_classes = classes
        self.cur = torch.full((b, t, len(self.m.bank.names)), -torch.inf, device=self.alive.device)  # logits
        self.cur_bad = torch.zeros(b, t, dtype=torch.bool, device=self.alive.device)
        self.stash: dict[str, torch.Tensor] = {}

    def site_hook(self, site: str):
        def hook(act: torch.Tensor) -> None:
            self.stash[site] = act
            if self.scanning and len(self.stash) == len(self.m.sites):
                raise SitesRead   # a scan needs no layer above the last CE site, nor the logits
        return hook

    def after_forward(self, module, args, kwargs, output):
        missing = [s for s in self.m.sites if s not in self.stash]
        if missing:   # a compiled graph traced before these hooks existed runs without them: never silently
            self.blind += 1
            self.errors.append(f"forward {self.forwards}: the hooks on {', '.join(missing)} did not run")
        acts = {site: act[:, self.offset:] for site, act in self.stash.items()} if self.offset else self.stash
        for (head, columns, scale, shift, gather, _), pooled in zip(self.m.plan, self.pooling) if not missing else ():
            try:
                read = {s: acts[s].to(gather) for s in head.sites} if gather is not None else acts
                logits = (head.score(read).float() * scale + shift).to(self.cur.device, non_blocking=True)
                self.cur_bad |= ~torch.isfinite(logits).all(-1)  # NaN/inf activations make the scores non-finite
                self.cur[..., columns] = pooled(logits, self.cur_valid)
            except Exception as e:  # the policy decides: every sequence of the batch is marked failed
                self.errors.append(f"head on {', '.join(head.sites)}: {type(e).__name__}: {e}")
                self.cur_bad |= True
        self.stash.clear()
        valid = self.cur_valid
        bad = (self.cur_bad & valid).any(1) | bool(missing)
        self.failed |= bad
        if self.m.policy == "fail_closed":
            self.blocked |= bad
        content = valid & ~torch.isin(self.cur_ids, self.m.special_ids)   # template tokens never fire CEs
        fired = (self.cur > self.m.logit_thresholds) & content[..., None]
        program = self.m.program
        scores = torch.sigmoid(self.cur) * content[..., None] if program.needs_scores else None
        holds, self.state = program.advance(fired, self.state, valid, scores=scores,
                                            roles=self.cur_classes if program.needs_roles else None)
        holds = holds & valid[..., None]
        self.steerer.update(holds)
        if self.m.can_block:
            self.blocked |= (holds & self.m.stops).any(-1).any(-1)
        self.alive &= ~self.blocked
        self.scores.append(self.cur)
        self.valid.append(valid)
        self.ids.append(self.cur_ids)
        self.token_classes.append(self.cur_classes)
        self.holds.append(holds)
        self.forwards += 1

    def stopping_criterion(self):
        """A generate() stopping criterion that ends blocked sequences (reads a device tensor, no sync)."""
        from transformers import StoppingCriteria

        session = self

        class _Blocked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if session.blind:   # nothing more to learn from this generation: stop every sequence
                    return torch.ones_like(session.blocked)
                return session.blocked.clone()
        return _Blocked()

    # ---- results, one host copy per batch
    def results(self, prompt_lengths: Sequence[int], prompt_roles: Sequence[torch.Tensor],
                first_sequence: int = 0) -> list[Result]:
        """Per-sequence results; the last token of a generation is absent (generate() never runs it)."""
        if self.blind:
            warnings.warn(f"the monitor's site hooks did not run in {self.blind} of {self.forwards} forwards, so "
                          "every sequence is marked failed: a compiled graph traced before the hooks were attached "
                          "runs without them; attach the guard before the first compiled generate(), or call "
                          "torch._dynamo.reset() first", stacklevel=3)
        valid = torch.cat(self.valid, 1).cpu()
        scores = torch.sigmoid(torch.cat(self.scores, 1)).cpu()
        ids = torch.cat(self.ids, 1).cpu()
        classes = torch.cat(self.token_classes, 1).cpu()
        response = classes >= RESPONSE
        special = self.m.special_ids.cpu()
        holds = torch.cat(self.holds, 1).cpu()
        blocked, failed = self.blocked.cpu(), self.failed.cpu()
        tok = self.m.handle.tokenizer
        names, rules = self.m.bank.names, self.m.rules
        thresholds = self.m.thresholds.cpu()
        out = []
        for i in range(valid.shape[0]):
            v = valid[i]
            h = holds[i][v]                                     # [T_i, R]
            row_scores = scores[i][v]
            row_ids = ids[i][v]
            row_response = response[i][v]
            content = ~torch.isin(row_ids, special)
            seen = row_scores * content.unsqueeze(-1)   # as the rules saw them
            tokens = tok.convert_ids_to_tokens(row_ids.tolist())
            assert isinstance(tokens, list), "a list of ids converts to a list of tokens"
            roles = torch.full((len(tokens),), 3, dtype=torch.uint8)
            roles[: prompt_lengths[i]] = prompt_roles[i][: len(tokens)]
            events = []
            for r, rule in enumerate(rules):
                hits = h[:, r].nonzero()
                if len(hits) == 0:
                    continue
                t = int(hits[0])
                ces = {n: round(float(seen[t, j]), 4) for n in self.m.event_ces[r]
                       if seen[t, j := names.index(n)] > thresholds[j]}
                event = Event(rule=rule.name, title=getattr(rule, "title", None) or rule.name,
                              severity=getattr(rule, "severity", "medium"), action=self.m.action_names[r],
                              kind=self.m.action_kinds[r], sequence=first_sequence + i, token_index=t,
                              token=tokens[t], where="reply" if row_response[t] else "prompt", ces=ces)
                text = self.m.calls[r].text if self.m.action_names[r] != "block" else None
                text = text if text is not None else rule.message   # a note kept with any action's events
                if text is not None:
                    scores_now = {n: round(float(seen[t, j]), 4) for j, n in enumerate(names)}
                    event = dataclasses.replace(event, message=render_message(text, event, scores_now))
                events.append(event)
            events.sort(key=by_token_then_precedence)
            out.append(Result(tokens=tokens, token_ids=row_ids, scores=row_scores, roles=roles, events=events,
                              blocked=bool(blocked[i]), failed=bool(failed[i]), prompt_length=prompt_lengths[i],
                              classes=classes[i][v], content=content))
        return out
