"""What the monitor reports: events (a rule firing at a token), per-sequence results, verdicts and alert texts."""
from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gavel.plugins.actions import PRECEDENCE


@dataclass(frozen=True, slots=True)
class Event:
    """A rule firing: which rule, where (sequence, token), the CE values that made it fire, the action."""

    rule: str
    title: str
    severity: str
    action: str
    kind: str                     # the action's kind: log, alert, steer or block
    sequence: int
    token_index: int
    token: str
    where: Literal["prompt", "reply"]   # reply: a generated token, or one of a stored final assistant message
    ces: dict[str, float]
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: what the audit log, `gavel audit`, the demo and the server's `gavel` field carry."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(slots=True)
class Result:
    """One monitored sequence: its tokens, per-token CE scores and roles, events and verdict."""

    tokens: list[str]
    token_ids: torch.Tensor       # [T] long
    scores: torch.Tensor          # [T, n_ce] on the host
    roles: torch.Tensor           # [T] role codes (generated tokens are assistant)
    events: list[Event] = field(default_factory=list)
    blocked: bool = False
    failed: bool = False          # non-finite activations or a hook error (see the monitor's policy)
    prompt_length: int = 0
    reply: str = ""               # what the user gets: the rule's reply when blocked
    generated: str = ""           # what the model produced (up to the blocking token)
    classes: torch.Tensor | None = None   # [T] token class codes as the rules saw them (role + 4 in the response)
    content: torch.Tensor | None = None   # [T] bool: not a template token (only content tokens fire CEs)

    @property
    def fired(self) -> list[str]:
        return [e.rule for e in self.events]


def verdict(events: Sequence[Event]) -> str:
    """The strongest kind of action among the events (block > steer > alert > log), or clean."""
    return max((e.kind for e in events), key=PRECEDENCE.__getitem__, default="clean")


def by_token_then_precedence(event: Event) -> tuple[int, int]:
    """Sort key: events in token order, the strongest action first on each token."""
    return event.token_index, -PRECEDENCE[event.kind]


class _Placeholders(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_message(text: str, event: Event, scores: dict[str, float]) -> str:
    """An alert's text with {rule}, {title}, {severity}, {token}, {token_index}, {sequence}, {ces} and
    {<ce name>} (its score at the firing token) filled in; unknown placeholders stay as written."""
    fields = _Placeholders(scores)
    fields.update(rule=event.rule, title=event.title, severity=event.severity, token=event.token,
                  token_index=event.token_index, sequence=event.sequence,
                  ces=", ".join(f"{n}={v:.2f}" for n, v in event.ces.items()))
    try:
        return string.Formatter().vformat(text, (), fields)
    except (ValueError, IndexError, AttributeError):   # braces that are not placeholders: keep the text as written
        return text
