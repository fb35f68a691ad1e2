"""The plugin registry: entry-point groups `gavel.*`; a broken plugin is reported and skipped."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from pydantic import BaseModel

from gavel.errors import GavelError, did_you_mean
from gavel.plugins.actions import BUILTIN_ACTIONS, PRECEDENCE, Action
from gavel.plugins.functions import BUILTIN_FUNCTIONS, ScoreFunction
from gavel.plugins.interventions import METHODS as INTERVENTION_METHODS
from gavel.plugins.interventions import InterventionMethod

GROUPS = ("actions", "interventions", "functions")
PROTOCOLS = {"actions": Action, "interventions": InterventionMethod, "functions": ScoreFunction}
# what a protocol's plugins must be able to call (its annotations list the rest)
METHODS = {"functions": ("reduce",), "interventions": INTERVENTION_METHODS}


@dataclass
class Registry:
    """Plugins by group and name; `problems` lists the ones that failed to load or check."""

    plugins: dict[str, dict[str, object]] = field(default_factory=lambda: {g: {} for g in GROUPS})
    problems: list[str] = field(default_factory=list)
    origins: dict[tuple[str, str], str] = field(default_factory=dict)   # (group, name) -> where it came from

    def add(self, group: str, name: str, obj: object, origin: str) -> None:
        """Register `obj`; an intervention also becomes the rule action of its name (kind "steer")."""
        problem = _problem(group, obj) or _shadows_builtin(group, name)
        if group == "interventions" and problem is None:
            problem = _problem("actions", obj)
            if problem is None and getattr(obj, "name", None) != name:
                problem = f"is named {getattr(obj, 'name', None)!r} but registered as {name!r}"
            if problem is None and name in self.plugins["actions"]:
                problem = f"has the name of the action {name!r} from {self.origins.get(('actions', name), '?')}"
        if problem is not None:
            self.problems.append(f"{origin}: {group} plugin {name!r} {problem}")
            return
        if name in self.plugins[group]:
            warnings.warn(f"duplicate {group} plugin {name!r} from {origin}; keeping the first", stacklevel=2)
            return
        self.plugins[group][name] = obj
        self.origins[(group, name)] = origin
        if group == "interventions":
            self.plugins["actions"][name] = obj
            self.origins[("actions", name)] = origin

    @property
    def actions(self) -> Mapping[str, type[Action]]:
        """The action plugins by name (`plugins["actions"]`, typed: `add` checked each against `Action`)."""
        return cast("Mapping[str, type[Action]]", self.plugins["actions"])

    @property
    def interventions(self) -> Mapping[str, type[InterventionMethod]]:
        """The intervention plugins by name (`plugins["interventions"]`, typed: `add` checked each against
        `InterventionMethod`)."""
        return cast("Mapping[str, type[InterventionMethod]]", self.plugins["interventions"])

    @property
    def functions(self) -> Mapping[str, type[ScoreFunction]]:
        """The score function plugins by name (`plugins["functions"]`, typed: `add` checked each against
        `ScoreFunction`)."""
        return cast("Mapping[str, type[ScoreFunction]]", self.plugins["functions"])

    def get(self, group: str, name: str) -> object:
        found = self.plugins[group].get(name)
        if found is None:
            hint = did_you_mean(name, sorted(self.plugins[group]))
            raise GavelError(f"unknown {group[:-1]} {name!r}; known: {', '.join(sorted(self.plugins[group]))}",
                             hint=f"did you mean {hint!r}?" if hint else None)
        return found


def _problem(group: str, obj: object) -> str | None:
    """Why `obj` cannot be a plugin of `group`, or None."""
    protocol = PROTOCOLS.get(group)
    if protocol is None:
        return None
    if not isinstance(obj, type):
        return f"does not implement {protocol.__name__} (it is not a class)"
    missing = [attr for attr in getattr(protocol, "__annotations__", {}) if not hasattr(obj, attr)]
    missing += [method for method in METHODS.get(group, ()) if not callable(getattr(obj, method, None))]
    if missing:
        return f"does not implement {protocol.__name__} (it lacks {', '.join(missing)})"
    if group == "actions":   # both present (checked above), of any type until checked here
        kind, params = getattr(obj, "kind", None), getattr(obj, "params", None)
        if kind not in PRECEDENCE:
            return f"has kind {kind!r}; an action's kind is one of {', '.join(PRECEDENCE)}"
        if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
            return "has `params` that is not a pydantic model class"
    return None


def _shadows_builtin(group: str, name: str) -> str | None:
    """Why a score function's name is unusable: rules mean the built-in aggregate by `count`, `max`, `min`, `mean`."""
    if group != "functions":
        return None
    return (f"is named like the built-in function {name!r}; rules would never reach it" if name in BUILTIN_FUNCTIONS
            else None)


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    return load_registry()


def load_registry() -> Registry:
    """Read every `gavel.*` entry point; built-ins come first so a plugin cannot shadow them."""
    from importlib.metadata import entry_points

    reg = Registry()
    for action in BUILTIN_ACTIONS:
        reg.add("actions", action.name, action, "gavel (built-in)")
    for group in GROUPS:
        found = sorted(entry_points(group=f"gavel.{group}"), key=lambda ep: not ep.value.startswith("gavel."))
        for ep in found:   # gavel's own first
            if ep.name in reg.plugins[group] and ep.value.startswith("gavel."):
                continue  # our own built-ins, already registered above
            try:
                reg.add(group, ep.name, ep.load(), ep.value)
            except Exception as e:  # a broken plugin never crashes the host
                reg.problems.append(f"{ep.value}: failed to load {group} plugin {ep.name!r}: {e}")
    for p in reg.problems:
        warnings.warn(p, stacklevel=2)
    return reg
