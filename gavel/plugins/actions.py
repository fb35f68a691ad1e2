"""Rule actions (entry-point group `gavel.actions`): the protocol, and the built-in log, alert and block.

An action declares what a rule may write after its name: `params`, a pydantic model of its `name(key=value)`
arguments (None: it takes none), and `takes_text`, whether `name "text"` is allowed (alert's message, block's
reply). Steering actions (rotate, add, ablate, align, steer_neurons, perturb) are interventions
(`gavel.plugins.interventions`), registered as actions of kind "steer". A plugin may declare an action with
`implemented = False`: rules naming it load and lint, and a monitor refuses it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeGuard, runtime_checkable

from pydantic import BaseModel

# Higher wins when several rules fire on one token: block > steer > alert > log.
PRECEDENCE = {"log": 0, "alert": 1, "steer": 2, "block": 3}


@runtime_checkable
class Action(Protocol):
    """What a rule does when it fires. `stops_generation` actions end the sequence that fired. An action class may
    also define `handle(self, events, arguments)`: the monitor makes one instance and calls it on the host once
    per batch with the batch's events of each rule naming the action and that rule's validated `params`."""

    name: ClassVar[str]
    kind: ClassVar[str]            # one of PRECEDENCE's keys
    stops_generation: ClassVar[bool]
    params: ClassVar[type[BaseModel] | None]  # the arguments of `name(key=value, ...)`; None: no arguments
    takes_text: ClassVar[bool]     # whether `name "text"` is allowed
    implemented: ClassVar[bool]    # False for a declaration whose effect arrives later


class HandlesEvents(Action, Protocol):
    """An action plugin that also takes its rules' events: `handle(events, arguments)` on the host, once per batch,
    with the batch's `gavel.runtime.events.Event`s of each rule naming it and that rule's validated `params`."""

    def handle(self, events: Sequence[Any], arguments: BaseModel | None) -> object: ...


def handles_events(action: type[Action]) -> TypeGuard[type[HandlesEvents]]:
    """Whether an action plugin defines `handle(events, arguments)`."""
    return callable(getattr(action, "handle", None))


@dataclass(frozen=True)
class LogAction:
    """Record the event in the audit trail only."""

    name: ClassVar[str] = "log"
    kind: ClassVar[str] = "log"
    stops_generation: ClassVar[bool] = False
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = True


@dataclass(frozen=True)
class AlertAction:
    """Record the event and surface it to the user with the rule's message (`alert "text {placeholders}"`)."""

    name: ClassVar[str] = "alert"
    kind: ClassVar[str] = "alert"
    stops_generation: ClassVar[bool] = False
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = True
    implemented: ClassVar[bool] = True


@dataclass(frozen=True)
class BlockAction:
    """Stop generating for the sequence that fired; the user gets its text (`block "reply"`)."""

    name: ClassVar[str] = "block"
    kind: ClassVar[str] = "block"
    stops_generation: ClassVar[bool] = True
    params: ClassVar[type[BaseModel] | None] = None
    takes_text: ClassVar[bool] = True
    implemented: ClassVar[bool] = True


BUILTIN_ACTIONS = (LogAction, AlertAction, BlockAction)
