"""Rule lints: each check is a small validator returning located Issue dataclasses with a class-level severity.

Checks look at each rule (`validate`), and at what the rules share once all are seen (`finalize`): the
packs' lists, macros and parameters, names across rules. `prepare` gives a check every rule first.
"""
from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from gavel.errors import Location, did_you_mean
from gavel.plugins.registry import Registry
from gavel.plugins.registry import registry as default_registry
from gavel.rules.action_checks import check_actions
from gavel.rules.ast import Expr, Select, params, walk
from gavel.rules.names import Kind, references, resolve, wildcard_matches
from gavel.rules.parser import parse_condition
from gavel.rules.spec import Pack, RuleSpec


class Severity(enum.IntEnum):
    """HIGH: the rule cannot mean what it says; MEDIUM: GAVEL rejects it or it is likely a mistake;
    LOW: harmless but sloppy."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3


@dataclass(frozen=True, kw_only=True)
class Issue:
    """One finding about one rule, at a place in its source."""

    description: ClassVar[str] = "rule issue"
    severity: ClassVar[Severity] = Severity.MEDIUM
    rule: str | None   # None only for a pack's own definitions (PackIssue)
    location: Location
    hint: str | None = None

    @property
    def message(self) -> str:
        return self.description

    @property
    def subject(self) -> str:
        """What the finding is about: "rule 'r'", or "pack 'p'" for a pack's own definitions."""
        return f"rule '{self.rule}'"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity.name.lower()}: {self.subject}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class PackIssue(Issue):
    """A finding about a pack's own definitions (lists, macros, params, requires)."""

    rule: str | None = None
    pack: str  # the pack's label, e.g. "pack 'guardrail'"

    @property
    def subject(self) -> str:
        return self.pack


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
class UnusedDefinitionIssue(PackIssue):
    description: ClassVar[str] = "a pack's list, macro or parameter is never used by its rules"
    severity: ClassVar[Severity] = Severity.MEDIUM
    kind: str  # "list", "macro" or "parameter"
    name: str

    @property
    def message(self) -> str:
        return f"{self.kind} '{self.name}' is never used by the pack's rules"


@dataclass(frozen=True, kw_only=True)
class UnusedPrivateRuleIssue(Issue):
    description: ClassVar[str] = "a private (helper) rule that no rule uses: it is never reported"
    severity: ClassVar[Severity] = Severity.MEDIUM

    @property
    def message(self) -> str:
        return "private rule is never used by another rule, and private rules are never reported"


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
    description: ClassVar[str] = "`k of G` needs 1 <= k <= the number of CEs (or items) in G"
    severity: ClassVar[Severity] = Severity.HIGH
    group: str
    k: int
    size: int

    @property
    def message(self) -> str:
        what = "items" if self.group.startswith("(") else f"CEs in '{self.group}'"
        return f"`{self.k} of {self.group}` needs 1 <= k <= {self.size} (the {what})"


@dataclass(frozen=True, kw_only=True)
class UndefinedGroupIssue(Issue):
    description: ClassVar[str] = "a selector names a group or list that is not defined"
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
class PackUnknownCEIssue(PackIssue, UnknownCEIssue):
    """An unknown CE in a pack's list or macro."""

    where: str  # "list 'l'" or "macro 'm'"

    @property
    def message(self) -> str:
        return f"{self.where}: unknown CE '{self.ce}'{self.suggestion}"


@dataclass(frozen=True, kw_only=True)
class WildcardMatchesNothingIssue(Issue):
    description: ClassVar[str] = "a wildcard matches no known CE"
    severity: ClassVar[Severity] = Severity.HIGH
    pattern: str

    @property
    def message(self) -> str:
        return f"wildcard '{self.pattern}' matches no CE"


@dataclass(frozen=True, kw_only=True)
class ShadowedNameIssue(Issue):
    description: ClassVar[str] = "a definition hides another name: names resolve group, list, macro, rule, CE"
    severity: ClassVar[Severity] = Severity.MEDIUM
    kind: Kind
    name: str
    hidden: Kind

    @property
    def message(self) -> str:
        hidden = "CE" if self.hidden == "ce" else self.hidden
        return (f"{self.kind} '{self.name}' hides the {hidden} '{self.name}' (names resolve in the order "
                "group, list, macro, rule, CE): rename one")


@dataclass(frozen=True, kw_only=True)
class PackShadowedNameIssue(PackIssue, ShadowedNameIssue):
    """A pack's list or macro hiding a macro, rule or CE."""


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


@dataclass(frozen=True, kw_only=True)
class ActionIssue(Issue):
    description: ClassVar[str] = "the action is unknown, or its arguments or text are wrong"
    severity: ClassVar[Severity] = Severity.HIGH
    text: str

    @property
    def message(self) -> str:
        return self.text


@dataclass(frozen=True, kw_only=True)
class MissingRequiredCEIssue(Issue):
    description: ClassVar[str] = "`requires.ces` names a CE the bank lacks"
    severity: ClassVar[Severity] = Severity.HIGH
    ce: str

    @property
    def message(self) -> str:
        return f"requires CE '{self.ce}', which the bank lacks"


@dataclass(frozen=True, kw_only=True)
class PackMissingRequiredCEIssue(PackIssue, MissingRequiredCEIssue):
    """A pack-level `requires.ces` CE the bank lacks."""


@dataclass(frozen=True, kw_only=True)
class UselessExceptionIssue(Issue):
    description: ClassVar[str] = "an exception that cannot matter, or that silences the rule entirely"
    severity: ClassVar[Severity] = Severity.HIGH
    exception: str
    reason: str

    @property
    def message(self) -> str:
        return f"exception '{self.exception}' {self.reason}"


# --- what rules read --------------------------------------------------------------------------------------------

Locate = Callable[[int], Location]


def _conditions(rule: RuleSpec) -> list[tuple[Expr, Locate]]:
    """The rule's condition and its exceptions' conditions, each with where its characters are."""
    return [(rule.expr, rule.condition_location), *((e.expr, e.location) for e in rule.exceptions)]


def _macro_conditions(pack: Pack) -> list[tuple[Expr, Locate]]:
    return [(m.expr, m.location) for m in pack.macros.values()]


def _reads(rule: RuleSpec, rule_names: Collection[str]) -> set[tuple[Kind, str]]:
    """Every (kind, name) the rule's condition and exceptions read, through the macros they expand."""
    seen: set[tuple[Kind, str]] = set()
    stack = [expr for expr, _ in _conditions(rule)]
    while stack:
        for name, _, _ in references(stack.pop()):
            kind = resolve(name, groups=rule.groups, lists=rule.lists, macros=rule.macros, rules=rule_names)
            if (kind, name) not in seen:
                seen.add((kind, name))
                if kind == "macro":
                    stack.append(rule.macros[name].expr)
    return seen


def _packs(rules: Iterable[RuleSpec]) -> list[Pack]:
    """The packs the rules came from, each once, in order."""
    return list({id(r.pack): r.pack for r in rules if r.pack is not None}.values())


class Validator(ABC):
    """One check: `validate` looks at a rule, `finalize` at everything seen (for checks across rules)."""

    def prepare(self, rules: Sequence[RuleSpec]) -> None:  # noqa: B027 - optional, not abstract
        """See every rule before the first `validate` (checks that resolve names across rules need them)."""

    @abstractmethod
    def validate(self, rule: RuleSpec) -> list[Issue]:
        """The issues this check finds in one rule."""

    def finalize(self) -> list[Issue]:
        return []


class _AcrossRules(Validator):
    """A check that needs every rule's name and the packs the rules came from."""

    rules: Sequence[RuleSpec] = ()
    rule_names: frozenset[str] = frozenset()
    packs: Sequence[Pack] = ()

    def prepare(self, rules: Sequence[RuleSpec]) -> None:
        self.rules = list(rules)
        self.rule_names = frozenset(r.name for r in rules)
        self.packs = _packs(rules)


class UnusedDefinitionValidator(_AcrossRules):
    """Groups no condition reads; a pack's lists, macros and parameters no rule uses; private rules no rule names."""

    def validate(self, rule: RuleSpec) -> list[Issue]:
        used = {name for kind, name in _reads(rule, self.rule_names) if kind == "group"}
        return [UnusedGroupIssue(rule=rule.name, location=rule.field_location("groups", g, key=True), group=g)
                for g in rule.groups if g not in used]

    def finalize(self) -> list[Issue]:
        reads = {r.name: _reads(r, self.rule_names) for r in self.rules}
        named = {name for user, found in reads.items() for kind, name in found if kind == "rule" and name != user}
        issues: list[Issue] = [UnusedPrivateRuleIssue(rule=r.name, location=r.field_location("private", key=True))
                               for r in self.rules if r.private and r.name not in named]
        for pack in self.packs:
            mine = [r for r in self.rules if r.pack is pack]
            used = {(kind, name) for r in mine for kind, name in reads[r.name]}
            used_params = {p for r in mine for p in r.param_names}
            used_params |= {p.name for m in pack.macros.values() for p in params(parse_condition(m.condition))}
            unused = [("list", n) for n in pack.lists if ("list", n) not in used]
            unused += [("macro", n) for n in pack.macros if ("macro", n) not in used]
            unused += [("parameter", n) for n in pack.spec.params if n not in used_params]
            fields = {"list": "lists", "macro": "macros", "parameter": "params"}
            issues += [UnusedDefinitionIssue(pack=pack.label, location=pack.field_location(fields[k], n, key=True),
                                             kind=k, name=n) for k, n in unused]
        return issues


class PositionalGroupNameValidator(Validator):
    POSITIONAL: ClassVar[re.Pattern[str]] = re.compile(r"^(g|grp|group|sel|selection|set)_?\d+$", re.IGNORECASE)

    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [PositionalGroupNameIssue(rule=rule.name, location=rule.field_location("groups", g, key=True), group=g)
                for g in rule.groups if self.POSITIONAL.match(g)]


class KOfRangeValidator(_AcrossRules):
    """`k of G` with k outside 1..|G|, for groups, the pack's lists, lists `(a, b, ...)` and wildcards."""

    def __init__(self, ces: Sequence[str] | None = None) -> None:
        self.ces = ces

    def _size(self, node: Select, groups: Mapping[str, tuple[str, ...]], lists: Mapping[str, tuple[str, ...]]
              ) -> tuple[str, int] | None:
        if node.group is None:
            return str(node)[str(node).index("("):], len(node.items)
        members: Sequence[str] | None = groups.get(node.group) or lists.get(node.group)
        if members is None and "*" in node.group and self.ces is not None:
            members = wildcard_matches(node.group, self.ces) or None
        return None if members is None else (node.group, len(set(members)))

    def _check(self, subject: dict[str, str], exprs: list[tuple[Expr, Locate]], groups: Mapping[str, tuple[str, ...]],
               lists: Mapping[str, tuple[str, ...]]) -> list[Issue]:
        issues: list[Issue] = []
        for expr, locate in exprs:
            for node in walk(expr):
                if not (isinstance(node, Select) and isinstance(node.quantifier, int)):
                    continue
                sized = self._size(node, groups, lists)
                if sized is not None and not 1 <= node.quantifier <= sized[1]:
                    kind = KOutOfRangeIssue if "rule" in subject else _PackKOutOfRangeIssue
                    issues.append(kind(**subject, location=locate(node.span.start), group=sized[0],
                                       k=node.quantifier, size=sized[1]))
        return issues

    def validate(self, rule: RuleSpec) -> list[Issue]:
        return self._check({"rule": rule.name}, _conditions(rule), rule.groups, rule.lists)

    def finalize(self) -> list[Issue]:
        return [i for pack in self.packs
                for i in self._check({"pack": pack.label}, _macro_conditions(pack), {}, pack.lists)]


@dataclass(frozen=True, kw_only=True)
class _PackKOutOfRangeIssue(PackIssue, KOutOfRangeIssue):
    """`k of G` out of range inside a macro."""


class UndefinedGroupValidator(Validator):
    """A selector's target must be a group, a pack list, or a wildcard."""

    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [UndefinedGroupIssue(rule=rule.name, location=locate(n.span.start), group=n.group,
                                    suggestion=_suggest(n.group, [*rule.groups, *rule.lists]))
                for expr, locate in _conditions(rule) for n in walk(expr)
                if isinstance(n, Select) and n.group is not None and n.group not in rule.groups
                and n.group not in rule.lists and "*" not in n.group]


class UnknownCEValidator(_AcrossRules):
    """Names that resolve to a CE must be known CEs (a CE bank's, or a GAVEL library's `ces/`); wildcards must
    match one."""

    def __init__(self, ces: Sequence[str]) -> None:
        self.ces = ces

    def _names(self, exprs: list[tuple[Expr, Locate]], groups, lists, macros) -> Iterator[tuple[str, Location]]:
        """The CE names and wildcards the conditions read directly, where they are read."""
        for expr, locate in exprs:
            for name, offset, selector in references(expr):
                kind = resolve(name, groups=groups, lists=lists, macros=macros, rules=self.rule_names)
                if kind == "wildcard" or (kind == "ce" and not selector):
                    yield name, locate(offset)

    def _issues(self, subject: dict, names: Iterable[tuple[str, Location]], context: set[str],
                unknown=UnknownCEIssue, wildcard=WildcardMatchesNothingIssue, **extra) -> list[Issue]:
        known = set(self.ces)
        issues: list[Issue] = []
        for name, where in names:
            if "*" in name and not wildcard_matches(name, self.ces):
                issues.append(wildcard(**subject, **extra, location=where, pattern=name))
            elif "*" not in name and name not in known:
                issues.append(unknown(**subject, **extra, location=where, ce=name,
                                      suggestion=_suggest(name, known | context)))
        return issues

    def validate(self, rule: RuleSpec) -> list[Issue]:
        subject = {"rule": rule.name}
        members = ((ce, rule.field_location("groups", g, i)) for g, ces in rule.groups.items()
                   for i, ce in enumerate(ces))
        issues = self._issues(subject, members, set())
        reads = self._names(_conditions(rule), rule.groups, rule.lists, rule.macros)
        return issues + self._issues(subject, reads, {*rule.groups, *rule.lists, *rule.macros})

    def finalize(self) -> list[Issue]:
        issues: list[Issue] = []
        for pack in self.packs:
            subject = {"pack": pack.label}
            groups = {g for r in self.rules if r.pack is pack for g in r.groups}  # a macro may read its user's groups
            for name, ces in pack.lists.items():
                members = ((ce, pack.field_location("lists", name, i)) for i, ce in enumerate(ces))
                issues += self._issues(subject, members, set(), unknown=PackUnknownCEIssue,
                                       wildcard=_PackWildcardIssue, where=f"list '{name}'")
            for macro in pack.macros.values():
                reads = self._names([(macro.expr, macro.location)], groups, pack.lists, pack.macros)
                issues += self._issues(subject, reads, {*pack.lists, *pack.macros}, unknown=PackUnknownCEIssue,
                                       wildcard=_PackWildcardIssue, where=f"macro '{macro.name}'")
        return issues


@dataclass(frozen=True, kw_only=True)
class _PackWildcardIssue(PackIssue, WildcardMatchesNothingIssue):
    """A wildcard in a macro that matches no CE."""

    where: str

    @property
    def message(self) -> str:
        return f"{self.where}: wildcard '{self.pattern}' matches no CE"


class ShadowedNameValidator(_AcrossRules):
    """A group, list, macro or rule with the name of something it hides (a rule's own name excepted: a rule
    cannot read itself)."""

    def __init__(self, ces: Sequence[str] | None = None) -> None:
        self.ces = set(ces or ())

    def _hidden(self, name: str, below: tuple[tuple[Kind, Iterable[str]], ...]) -> Kind | None:
        return next((kind for kind, names in (*below, ("ce", self.ces)) if name in names), None)

    def validate(self, rule: RuleSpec) -> list[Issue]:
        others = self.rule_names - {rule.name}
        issues: list[Issue] = []
        for g in rule.groups:
            hidden = self._hidden(g, (("list", rule.lists), ("macro", rule.macros), ("rule", others)))
            if hidden is not None:
                issues.append(ShadowedNameIssue(rule=rule.name, location=rule.field_location("groups", g, key=True),
                                                kind="group", name=g, hidden=hidden))
        if rule.name in self.ces:
            issues.append(ShadowedNameIssue(rule=rule.name, location=rule.field_location("name"), kind="rule",
                                            name=rule.name, hidden="ce"))
        return issues

    def finalize(self) -> list[Issue]:
        issues: list[Issue] = []
        for pack in self.packs:
            definitions: tuple[tuple[Kind, str, Iterable[str], tuple[tuple[Kind, Iterable[str]], ...]], ...] = (
                ("list", "lists", pack.lists, (("macro", pack.macros), ("rule", self.rule_names))),
                ("macro", "macros", pack.macros, (("rule", self.rule_names),)))
            for kind, field, names, below in definitions:
                for name in names:
                    hidden = self._hidden(name, below)
                    if hidden is not None:
                        issues.append(PackShadowedNameIssue(pack=pack.label, kind=kind, name=name, hidden=hidden,
                                                            location=pack.field_location(field, name, key=True)))
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


class ActionValidator(Validator):
    """Unknown actions, bad arguments, text where none is taken, unknown alert placeholders (`check_actions`)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or default_registry()

    def validate(self, rule: RuleSpec) -> list[Issue]:
        return [ActionIssue(rule=rule.name, location=e.location or rule.field_location("action"),
                            text=e.message.removeprefix(f"rule '{rule.name}': "), hint=e.hint)
                for e in check_actions([rule], self.registry)]


class RequiredCEValidator(_AcrossRules):
    """`requires.ces` (a rule's or its pack's) must be CEs of the bank."""

    def __init__(self, ces: Sequence[str]) -> None:
        self.ces = set(ces)

    def validate(self, rule: RuleSpec) -> list[Issue]:
        own = rule.requires.ces if rule.requires else ()
        return [MissingRequiredCEIssue(rule=rule.name, location=rule.field_location("requires", "ces", i), ce=ce)
                for i, ce in enumerate(own) if ce not in self.ces]

    def finalize(self) -> list[Issue]:
        return [PackMissingRequiredCEIssue(pack=p.label, location=p.field_location("requires", "ces", i), ce=ce)
                for p in self.packs if p.requires for i, ce in enumerate(p.requires.ces) if ce not in self.ces]


class ExceptionValidator(Validator):
    """Exceptions that silence the rule (the condition itself) or repeat an earlier exception."""

    def validate(self, rule: RuleSpec) -> list[Issue]:
        condition = str(rule.expr)
        seen: dict[str, str] = {}
        issues: list[Issue] = []
        for i, e in enumerate(rule.exceptions):
            text = str(e.expr)
            where = rule.field_location("exceptions", i, "condition")
            if text == condition:
                issues.append(UselessExceptionIssue(rule=rule.name, location=where, exception=e.name,
                                                    reason="is the rule's condition: the rule can never fire"))
            elif text in seen:
                issues.append(UselessExceptionIssue(rule=rule.name, location=where, exception=e.name,
                                                    reason=f"repeats exception '{seen[text]}'"))
            seen.setdefault(text, e.name)
        return issues


def default_validators(ces: Sequence[str] | None = None, *, registry: Registry | None = None) -> list[Validator]:
    """Every built-in check; those about CE names only when the CE names are known."""
    checks: list[Validator] = [
        UnusedDefinitionValidator(), PositionalGroupNameValidator(), KOfRangeValidator(ces), UndefinedGroupValidator(),
        ShadowedNameValidator(ces), DuplicateMemberValidator(), DuplicateRuleValidator(), ActionValidator(registry),
        ExceptionValidator()]
    return checks + ([UnknownCEValidator(ces), RequiredCEValidator(ces)] if ces is not None else [])


def lint(rules: Iterable[RuleSpec], *, ces: Sequence[str] | None = None,
         validators: Sequence[Validator] | None = None, registry: Registry | None = None) -> list[Issue]:
    """Run the validators (default: `default_validators(ces, registry=registry)`) over the rules; issues in rule
    order, then the checks across rules."""
    rules = list(rules)
    checks = list(validators) if validators is not None else default_validators(ces, registry=registry)
    for check in checks:
        check.prepare(rules)
    issues = [issue for rule in rules for check in checks for issue in check.validate(rule)]
    return issues + [issue for check in checks for issue in check.finalize()]

