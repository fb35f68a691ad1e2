"""The built-in rule actions: log, alert, block. Steering actions arrive through the same protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

# Higher wins when several rules fire on one token: block > steer > alert > log.
PRECEDENCE = {"log": 0, "alert": 1, "steer": 2, "block": 3}


@runtime_checkable
class Action(Protocol):
    """What a rule does when it fires. `stops_generation` actions end the sequence that fired."""

    name: ClassVar[str]
    kind: ClassVar[str]            # one of PRECEDENCE's keys
    stops_generation: ClassVar[bool]


@dataclass(frozen=True)
class LogAction:
    """Record the event in the audit trail only."""

    name: ClassVar[str] = "log"
    kind: ClassVar[str] = "log"
    stops_generation: ClassVar[bool] = False


@dataclass(frozen=True)
class AlertAction:
    """Record the event and surface it to the user with the rule's message."""

    name: ClassVar[str] = "alert"
    kind: ClassVar[str] = "alert"
    stops_generation: ClassVar[bool] = False


@dataclass(frozen=True)
class BlockAction:
    """Stop generating for the sequence that fired; its reply becomes the rule's `reply`."""

    name: ClassVar[str] = "block"
    kind: ClassVar[str] = "block"
    stops_generation: ClassVar[bool] = True


BUILTIN_ACTIONS = (LogAction, AlertAction, BlockAction)
