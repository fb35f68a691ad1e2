"""GAVEL rule lints: each check is a small validator returning Issue dataclasses with a class-level severity."""
from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from gavel.errors import Location, did_you_mean
from gavel.rules.ast import AllOf, KOf, Name, walk
from gavel.rules.spec import RuleSpec


class Severity(enum.IntEnum):
    """HIGH: the rule cannot mean what it says; MEDIUM: GAVEL rejects it; LOW: harmless but sloppy."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3


@dataclass(frozen=True, kw_only=True)
class Issue:
    """One finding about one rule, at a place in its source."""

    description: ClassVar[str] = "rule issue"
    severity: ClassVar[Severity] = Severity.MEDIUM
    rule: str
    location: Location

    @property
    def message(self) -> str:
        return self.description

    def __str__(self) -> str:
        return f"{self.location}: {self.severity.name.lower()}: rule '{self.rule}': {self.message}"


def _suggest(word: str, choices: Iterable[str]) -> str:
    guess = did_you_mean(word, sorted(choices))
    return f" (did you mean '{guess}'?)" if guess else ""


@dataclass(frozen=True, kw_only=True)
class UnusedGroupIssue(Issue):
    description: ClassVar[str] = "group is never used by the condition"
    severity: ClassVar[Severity] = Severity.MEDIUM
    group: str

    @property
    def message(self) -> str:
        return f"group '{self.group}' is never used by the condition"


@dataclass(frozen=True, kw_only=True)
class PositionalGroupNameIssue(Issue):
    description: ClassVar[str] = "group has a positional name; name it after what it means"
    severity: ClassVar[Severity] = Severity.MEDIUM
    group: str

    @property
    def message(self) -> str:
        return f"group '{self.group}' has a positional name; name it after what its CEs mean together"


@dataclass(frozen=True, kw_only=True)
class KOutOfRangeIssue(Issue):
    description: ClassVar[str] = "`k of G` needs 1 <= k <= the number of CEs in G"
    severity: ClassVar[Severity] = Severity.HIGH
    group: str
    k: int
    size: int

    @property
    def message(self) -> str:
        return f"`{self.k} of {self.group}` needs 1 <= k <= {self.size} (the CEs in '{self.group}')"


@dataclass(frozen=True, kw_only=True)
class UndefinedGroupIssue(Issue):
    description: ClassVar[str] = "a selector names a group the rule does not define"
    severity: ClassVar[Severity] = Severity.HIGH
    group: str
    suggestion: str = ""

    @property
    def message(self) -> str:
        return f"undefined group '{self.group}'{self.suggestion}"


@dataclass(frozen=True, kw_only=True)
class UnknownCEIssue(Issue):
    description: ClassVar[str] = "rule uses a CE that is not in the known CE list"
    severity: ClassVar[Severity] = Severity.HIGH
    ce: str
    suggestion: str = ""

    @property
    def message(self) -> str:
        return f"unknown CE '{self.ce}'{self.suggestion}"


@dataclass(frozen=True, kw_only=True)
class DuplicateMemberIssue(Issue):
    description: ClassVar[str] = "a group lists the same CE twice"
    severity: ClassVar[Severity] = Severity.LOW
    group: str
    ce: str

    @property
    def message(self) -> str:
        return f"group '{self.group}' lists CE '{self.ce}' more than once"


@dataclass(frozen=True, kw_only=True)
class DuplicateRuleIssue(Issue):
    description: ClassVar[str] = "two rules share a name or public_id"
    severity: ClassVar[Severity] = Severity.HIGH
    field: str
    value: str

    @property
    def message(self) -> str:
        return f"{self.field} '{self.value}' is used by more than one rule"


class Validator(ABC):
    """One check: `validate` looks at a rule, `finalize` at everything seen (for checks across rules)."""

    @abstractmethod
    def validate(self, rule: RuleSpec) -> list[Issue]:
        """The issues this check finds in one rule."""

    def finalize(self) -> list[Issue]:
        return []


class UnusedGroupValidator(Validator):
    def validate(self, rule: RuleSpec) -> list[Issue]:
        nodes = [n for n in walk(rule.expr) if isinstance(n, (Name, AllOf, KOf))]
        used = {n.name if isinstance(n, Name) else n.group for n in nodes}
        return [UnusedGroupIssue(rule=rule.name, location=rule.field_location("groups", g, key=True), group=g)
                for g in rule.groups if g not in used]


class PositionalGroupNameValidator(Validator):
    POSITIONAL: ClassVar[re.Pattern[str]] = re.compile(r"^(g|grp|group|sel|selection|set)_?\d+$", re.IGNORECASE)

    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [PositionalGroupNameIssue(rule=rule.name, location=rule.field_location("groups", g, key=True), group=g)
                for g in rule.groups if self.POSITIONAL.match(g)]


class KOfRangeValidator(Validator):
    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [KOutOfRangeIssue(rule=rule.name, location=rule.condition_location(n.span.start), group=n.group,
                                 k=n.k, size=len(set(rule.groups[n.group])))
                for n in walk(rule.expr)
                if isinstance(n, KOf) and n.group in rule.groups and not 1 <= n.k <= len(set(rule.groups[n.group]))]


class UndefinedGroupValidator(Validator):
    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [UndefinedGroupIssue(rule=rule.name, location=rule.condition_location(n.span.start), group=n.group,
                                    suggestion=_suggest(n.group, rule.groups))
                for n in walk(rule.expr) if isinstance(n, (AllOf, KOf)) and n.group not in rule.groups]


class UnknownCEValidator(Validator):
    """Needs the known CE names (a CE bank's, or a GAVEL library's `ces/`)."""

    def __init__(self, ces: Sequence[str]) -> None:
        self.ces = ces

    def validate(self, rule: RuleSpec) -> list[Issue]:
        known = set(self.ces)
        issues: list[Issue] = [
            UnknownCEIssue(rule=rule.name, location=rule.field_location("groups", g, i), ce=ce,
                           suggestion=_suggest(ce, known))
            for g, members in rule.groups.items() for i, ce in enumerate(members) if ce not in known]
        issues += [UnknownCEIssue(rule=rule.name, location=rule.condition_location(n.span.start), ce=n.name,
                                  suggestion=_suggest(n.name, known | set(rule.groups)))
                   for n in walk(rule.expr)
                   if isinstance(n, Name) and n.name not in rule.groups and n.name not in known]
        return issues


class DuplicateMemberValidator(Validator):
    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [DuplicateMemberIssue(rule=rule.name, location=rule.field_location("groups", g, i), group=g, ce=ce)
                for g, members in rule.groups.items() for i, ce in enumerate(members) if ce in members[:i]]


class DuplicateRuleValidator(Validator):
    """Names and public ids must be unique across the rules linted together."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[RuleSpec]] = {}

    def validate(self, rule: RuleSpec) -> list[Issue]:
        self.seen.setdefault(("name", rule.name), []).append(rule)
        if rule.public_id:
            self.seen.setdefault(("public_id", rule.public_id), []).append(rule)
        return []

    def finalize(self) -> list[Issue]:
        return [DuplicateRuleIssue(rule=r.name, location=r.field_location(f), field=f, value=v)
                for (f, v), rules in self.seen.items() if len(rules) > 1 for r in rules[1:]]


def default_validators(ces: Sequence[str] | None = None) -> list[Validator]:
    """Every built-in check; the unknown-CE check only when the CE names are known."""
    checks: list[Validator] = [UnusedGroupValidator(), PositionalGroupNameValidator(), KOfRangeValidator(),
                               UndefinedGroupValidator(), DuplicateMemberValidator(), DuplicateRuleValidator()]
    return checks + ([UnknownCEValidator(ces)] if ces is not None else [])


def lint(rules: Iterable[RuleSpec], *, ces: Sequence[str] | None = None,
         validators: Sequence[Validator] | None = None) -> list[Issue]:
    """Run the validators (default: `default_validators(ces)`) over the rules; issues in rule order."""
    checks = list(validators) if validators is not None else default_validators(ces)
    issues = [issue for rule in rules for check in checks for issue in check.validate(rule)]
    return issues + [issue for check in checks for issue in check.finalize()]
