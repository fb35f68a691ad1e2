"""The rule and pack models (pydantic): GAVEL's `rule.yaml` fields read unchanged, plus Sigma-style metadata,
exceptions, helper rules, parameters, lists, macros and actions.

A `RuleSpec` validates its own fields; what it shares with its pack (lists, macros, parameter values, requires)
comes from the `Pack` the loader attaches, and so do file positions (`RuleSource`). Built in Python, a rule has
no pack and reports places as `<rule NAME>`.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StringConstraints,
    model_validator,
)

from gavel.errors import Location, RuleError
from gavel.identifiers import RESERVED
from gavel.io.gavel_format import DEFAULT_NAMESPACE, NAME, Namespace, Provenance, RulePublicId, RulesetPublicId
from gavel.io.yamlsource import PathKey
from gavel.rules.ast import Action, Expr, params
from gavel.rules.names import references, resolve
from gavel.rules.params import action_params, bind_action, bind_condition
from gavel.rules.parser import parse_action, parse_condition
from gavel.rules.source import RuleSource, SourceText


def _not_reserved(name: str) -> str:
    if name in RESERVED:
        raise ValueError(f"'{name}' is a reserved word of the condition language")
    return name


def _parses(condition: str) -> str:
    parse_condition(condition)
    return condition


def _parses_action(action: str) -> str:
    parse_action(action)
    return action


Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), AfterValidator(_not_reserved)]
Group = Annotated[tuple[Identifier, ...], Field(min_length=1)]
Condition = Annotated[str, AfterValidator(_parses)]
ActionText = Annotated[str, AfterValidator(_parses_action)]


def _number(value: object) -> int | float:
    """A parameter's value: an int or a float as written (YAML's true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a parameter's value is a number, not {value!r}")
    return value


ParamValue = Annotated[int | float, PlainValidator(_number)]
SeverityName = Literal["low", "medium", "high", "critical"]
LevelName = Literal["informational", "low", "medium", "high", "critical"]  # Sigma's; informational is severity low


class FieldError(ValueError):
    """A validation problem that belongs to one field (`path`) though a model validator found it."""

    def __init__(self, path: PathKey, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.path, self.message, self.hint = path, message, hint


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Requires(_Spec):
    """What a rule needs to run: a CE bank, a model, CEs (at pack level too; a pack's rules inherit it)."""

    bank: str | None = None
    model: str | None = None
    ces: tuple[Identifier, ...] = ()

    def under(self, outer: Requires | None) -> Requires:
        """These requirements inside `outer` (a pack's): own bank and model first, CEs from both."""
        if outer is None:
            return self
        return Requires(bank=self.bank or outer.bank, model=self.model or outer.model,
                        ces=tuple(dict.fromkeys((*outer.ces, *self.ces))))


class RuleException(_Spec):
    """A named condition under which the rule does not fire (`reason` says why it is not a finding)."""

    name: Identifier
    condition: Condition
    reason: str | None = None
    _text: SourceText | None = PrivateAttr(default=None)
    _values: Mapping[str, float] = PrivateAttr(default_factory=dict)

    @property
    def expr(self) -> Expr:
        """The parsed condition with its parameters bound (raises RuleErrors, located, for unset ones)."""
        return bind_condition(parse_condition(self.condition), self._values, self.error)

    def _source_text(self) -> SourceText:
        """Where the condition is written: set by the rule the exception belongs to (`RuleSpec.attach`)."""
        if self._text is None:
            raise RuleError(f"exception '{self.name}' belongs to no rule: give it in a RuleSpec's `exceptions`")
        return self._text

    def location(self, offset: int) -> Location:
        return self._source_text().location(offset)

    def error(self, message: str, offset: int, hint: str | None = None) -> RuleError:
        """A RuleError at a character of this exception's condition."""
        return self._source_text().error(message, offset, hint)


@dataclass(frozen=True, eq=False)
class Macro:
    """A pack's named condition, expanded in place where a rule names it."""

    name: str
    condition: str
    expr: Expr  # parameters bound
    text: SourceText = field(repr=False)

    def location(self, offset: int) -> Location:
        return self.text.location(offset)

    def error(self, message: str, offset: int, hint: str | None = None) -> RuleError:
        return self.text.error(message, offset, hint)


class PackSpec(_Spec):
    """A pack's own fields; its `rules` are validated one by one, so one bad rule never hides another."""

    pack: str | None = None
    description: str = ""
    requires: Requires | None = None
    params: dict[Identifier, ParamValue] = Field(default_factory=dict)
    lists: dict[Identifier, Group] = Field(default_factory=dict)
    macros: dict[Identifier, Condition] = Field(default_factory=dict)
    tests: Any = None  # read by the rule-test runner


@dataclass(frozen=True, eq=False)
class Pack:
    """A loaded pack: its fields, the parameter values in force, bound macros and where it was read from."""

    spec: PackSpec
    values: Mapping[str, float]  # the pack's params, overridden by the caller's
    macros: Mapping[str, Macro] = field(repr=False)
    rule_names: tuple[str, ...]
    source: RuleSource | None = None

    @property
    def name(self) -> str | None:
        return self.spec.pack

    @property
    def label(self) -> str:
        """How messages name the pack: by its `pack:` name, else by its file."""
        if self.name:
            return f"pack '{self.name}'"
        return f"pack {Path(self.source.path).name}" if self.source else "pack"

    @property
    def lists(self) -> Mapping[str, tuple[str, ...]]:
        return self.spec.lists

    @property
    def requires(self) -> Requires | None:
        return self.spec.requires

    def field_location(self, *path: str | int, key: bool = False) -> Location:
        if self.source is None:
            return Location(f"<{self.label}>")
        return self.source.location(self.source.index(path, key=key))


@dataclass
class _Context:
    """What a rule shares with its file and pack, and what it has bound so far (`cache`, not compared)."""

    source: RuleSource | None = None
    pack: Pack | None = None  # compared by identity
    values: Mapping[str, float] = field(default_factory=dict)
    cache: dict[str, object] = field(default_factory=dict, compare=False)


class RuleSpec(_Spec):
    """One rule: the GAVEL `rule.yaml` fields read unchanged, Sigma-style metadata, and gavel's additions."""

    # GAVEL
    name: Identifier
    title: str | None = None
    public_id: RulePublicId | None = None
    schema_version: Literal[1] = 1
    categories: tuple[str, ...] = ()
    definition: str = ""
    groups: dict[Identifier, Group] = Field(default_factory=dict)
    condition: Condition
    provenance: Provenance | None = None
    namespace: Namespace | None = None  # the file's own; else its library's (`gavel.yaml`)
    # Sigma-style metadata
    description: str = ""
    severity: SeverityName = "medium"
    level: LevelName | None = None  # Sigma's name for severity
    status: Literal["experimental", "test", "stable", "deprecated"] | None = None
    author: str | None = None
    tags: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    falsepositives: tuple[str, ...] = ()
    # gavel
    requires: Requires | None = None
    match: Literal["conversation", "token"] = "conversation"
    exceptions: tuple[RuleException, ...] = ()
    private: StrictBool = False  # a helper rule: other rules name it; it is never reported
    action: ActionText = "log"   # `log`, `alert "text"`, `block "reply"`, `name(key=value, ...)`
    message: str | None = None   # older spelling of alert's text
    reply: str | None = None     # older spelling of block's text
    _context: _Context = PrivateAttr(default_factory=_Context)
    _unknown: Mapping[str, Any] = PrivateAttr(default_factory=dict)
    _library_namespace: str = PrivateAttr(default=DEFAULT_NAMESPACE)

    @model_validator(mode="before")
    @classmethod
    def _level_is_severity(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("level") is not None:
            if "severity" in data:
                raise FieldError(("level",), "give `severity` or Sigma's `level`, not both")
            if data["level"] in typing.get_args(LevelName):
                data = {**data, "severity": "low" if data["level"] == "informational" else data["level"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RuleSpec:
        call = parse_action(self.action)
        if self.reply is not None and call.name != "block":
            raise FieldError(("reply",), "`reply` is only used by action `block`",
                             hint="or write the reply in the action: `action: block \"...\"`")
        for old in ("message", "reply"):
            if getattr(self, old) is not None and (call.text is not None or call.args):
                raise FieldError((old,), f"the action already says what it does: drop `{old}`, or write "
                                         f"`action: {call.name}` and keep `{old}`")
        names = [e.name for e in self.exceptions]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldError(("exceptions", i, "name"), f"two exceptions are named '{name}'")
        return self

    def model_post_init(self, context: Any) -> None:
        self.attach(None, None, {})

    def attach(self, source: RuleSource | None, pack: Pack | None, values: Mapping[str, float]) -> None:
        """Set where the rule was read from, its pack and the parameter values in force (the loader calls this)."""
        self._context = _Context(source, pack, values)
        for i, exception in enumerate(self.exceptions):
            exception._text = self._string(("exceptions", i, "condition"), exception.condition,
                                         f"rule '{self.name}': exception '{exception.name}'")
            exception._values = values

    def keep(self, unknown: Mapping[str, Any], library_namespace: str) -> None:
        """What the loader read around a library rule: its file's unknown keys (kept, by dotted path) and the
        namespace of its library."""
        self._unknown, self._library_namespace = dict(unknown), library_namespace

    @property
    def unknown_fields(self) -> Mapping[str, Any]:
        """Keys of the rule's GAVEL file that gavel does not read, by dotted path (`provenance.license`), as
        written; reported as warnings when loaded."""
        return self._unknown

    @property
    def resolved_namespace(self) -> str:
        """The rule's namespace: its own `namespace:`, else its library's, else `local`."""
        return self.namespace or self._library_namespace

    def _string(self, path: PathKey, text: str, label: str | None = None) -> SourceText:
        return SourceText(label or f"rule '{self.name}'", text, self._context.source, path, f"<rule {self.name}>")

    def _cached(self, key: str, make: typing.Callable[[], object]) -> Any:
        cache = self._context.cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    # --- what the compiler reads ---------------------------------------------------------------------------------

    @property
    def expr(self) -> Expr:
        """The parsed condition, with its parameters bound (raises RuleErrors, located, for unset ones)."""
        return self._cached("expr", lambda: bind_condition(parse_condition(self.condition), self._context.values,
                                                           self.error))

    @property
    def pack(self) -> Pack | None:
        """The pack the rule was loaded from, if any."""
        return self._context.pack

    @property
    def lists(self) -> Mapping[str, tuple[str, ...]]:
        """The pack's named CE lists (empty outside a pack)."""
        return self.pack.lists if self.pack else {}

    @property
    def macros(self) -> Mapping[str, Macro]:
        """The pack's macros, parameters bound (empty outside a pack)."""
        return self.pack.macros if self.pack else {}

    @property
    def requirements(self) -> Requires:
        """`requires`, inherited from the pack: own bank and model first, CEs from both."""
        own = self.requires or Requires()
        return own.under(self.pack.requires if self.pack else None)

    @property
    def action_call(self) -> Action:
        """The parsed action, parameters bound, with the older `message` (alert) / `reply` (block) folded in."""
        def make() -> Action:
            call = bind_action(parse_action(self.action), self._context.values, self.action_error)
            folded = {"alert": self.message, "block": self.reply}.get(call.name)
            return dataclasses.replace(call, text=folded) if call.text is None and folded is not None else call
        return self._cached("action", make)

    @property
    def param_names(self) -> set[str]:
        """The `${...}` parameters the condition, exceptions and action use."""
        exprs = [parse_condition(self.condition), *(parse_condition(e.condition) for e in self.exceptions)]
        return {p.name for e in exprs for p in params(e)} | {p.name for p in action_params(parse_action(self.action))}

    @property
    def ce_names(self) -> tuple[str, ...]:
        """The CEs the condition and exceptions read: members of the groups and lists they use, through macros;
        names that are neither (nor rules of the pack) are CE names. Wildcards are left out."""
        found: dict[str, None] = {}
        rules = self.pack.rule_names if self.pack else ()
        seen_macros: set[str] = set()

        def visit(expr: Expr) -> None:
            for name, _, _ in references(expr):
                kind = resolve(name, groups=self.groups, lists=self.lists, macros=self.macros, rules=rules)
                if kind == "group":
                    found.update(dict.fromkeys(self.groups[name]))
                elif kind == "list":
                    found.update(dict.fromkeys(self.lists[name]))
                elif kind == "macro" and name not in seen_macros:
                    seen_macros.add(name)
                    visit(self.macros[name].expr)
                elif kind == "ce":
                    found[name] = None

        for expr in (self.expr, *(e.expr for e in self.exceptions)):
            visit(expr)
        return tuple(found)

    # --- where things are ----------------------------------------------------------------------------------------

    @property
    def source(self) -> RuleSource | None:
        """The file the rule was loaded from, if any (seen from the rule's node)."""
        return self._context.source

    def field_location(self, *path: str | int, key: bool = False) -> Location:
        """Location of a field (e.g. `"groups", "tax"`): in the file, or the rule name when built in Python."""
        if self.source is None:
            return Location(f"<rule {self.name}>")
        return self.source.location(self.source.index(path, key=key))

    def condition_location(self, offset: int) -> Location:
        """Location of a character of the condition, mapped back into the file when there is one."""
        return self._string(("condition",), self.condition).location(offset)

    def condition_excerpt(self, offset: int) -> str:
        """The source line around a condition character, with a caret under it."""
        return self._string(("condition",), self.condition).excerpt(offset)

    def error(self, message: str, offset: int, hint: str | None = None) -> RuleError:
        """A RuleError pointing at a character of this rule's condition."""
        return self._string(("condition",), self.condition).error(message, offset, hint)

    def action_error(self, message: str, offset: int = 0, hint: str | None = None) -> RuleError:
        """A RuleError at a character of the `action` string (its field when the action is the default)."""
        return self._string(("action",), self.action).error(message, offset, hint)

    def action_text_error(self, message: str, offset: int, hint: str | None = None) -> RuleError:
        """A RuleError at a character of the action's text: inside the action's quotes, or in `message`/`reply`."""
        written = parse_action(self.action)
        if written.text is None:
            old = "message" if written.name == "alert" else "reply"
            return self._string((old,), getattr(self, old) or "").error(message, offset, hint)
        return self.action_error(message, _raw_offset(self.action, offset), hint)


def _raw_offset(action: str, offset: int) -> int:
    """Where character `offset` of an action's unquoted text is in the action string (escapes take two)."""
    i = action.index('"') + 1
    for _ in range(offset):
        i += 2 if action[i] == "\\" else 1
    return i



class RulesetSpec(_Spec):
    """A ruleset file's fields: GAVEL's `rulesets/<name>.yaml`, or gavel's `{ruleset: name, library: folder}`.
    `rules` are references (`name`, `namespace/name`, `namespace/rule/name`), resolved by the loader."""

    name: Annotated[str, StringConstraints(pattern=NAME)] | None = None
    ruleset: str | None = None  # gavel's spelling of the name
    title: str | None = None
    public_id: RulesetPublicId | None = None
    schema_version: Literal[1] = 1
    description: str = ""
    categories: tuple[str, ...] = ()  # GAVEL derives them from the rules; kept as written
    provenance: Provenance | None = None
    namespace: Namespace | None = None
    library: str | None = None
    rules: tuple[str, ...]
