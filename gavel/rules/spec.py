"""Rule specs (pydantic) and their loading from GAVEL rule.yaml files, packs and rulesets, with located errors."""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError,
                      field_validator, model_validator)

from gavel.errors import Location, RuleError, did_you_mean
from gavel.rules.ast import AllOf, Expr, KOf, Name, walk
from gavel.rules.parser import RESERVED, ConditionSyntaxError, excerpt, line_column, parse_condition
from gavel.yamlsource import PathKey, index_document, index_nodes, line_starts, read_yaml


def _not_reserved(name: str) -> str:
    if name in RESERVED:
        raise ValueError(f"'{name}' is a reserved word of the condition language")
    return name


Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), AfterValidator(_not_reserved)]
Group = Annotated[tuple[Identifier, ...], Field(min_length=1)]
StrPath = Union[str, "os.PathLike[str]"]


class RuleErrors(RuleError):
    """Several rule errors reported together, so one bad rule never hides the others."""

    def __init__(self, errors: Sequence[RuleError]) -> None:
        self.errors = tuple(errors)
        n = len(self.errors)
        super().__init__(f"{n} rule error{'s' if n != 1 else ''}")

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return "\n\n".join([self.message, *map(str, self.errors)])


@dataclass(frozen=True, slots=True)
class RuleSource:
    """Where a rule's YAML lives: file text, the index of each field (and key) and of each condition character."""

    path: str
    text: str
    lines: Sequence[int]  # index where each line starts, shared by the rules of one file
    values: Mapping[PathKey, int]
    keys: Mapping[PathKey, int]
    condition: tuple[int, ...] | None

    def location(self, index: int) -> Location:
        line = bisect.bisect_right(self.lines, index)
        return Location(self.path, line, index - self.lines[line - 1] + 1)

    def index(self, path: PathKey, *, key: bool = False) -> int:
        """Index of the deepest known node on `path` (the key itself when `key` and it is known)."""
        for n in range(len(path), -1, -1):
            if key and path[:n] in self.keys:
                return self.keys[path[:n]]
            if path[:n] in self.values:
                return self.values[path[:n]]
        return 0

    def error(self, path: PathKey, message: str, *, key: bool = True, hint: str | None = None) -> RuleError:
        """A RuleError at a field (its key when `key`), with the file line and a caret."""
        i = self.index(path, key=key)
        return RuleError(message, location=self.location(i), excerpt=excerpt(self.text, i), hint=hint)

    def condition_index(self, offset: int) -> int:
        if self.condition is None:
            return self.index(("condition",))
        return self.condition[min(offset, len(self.condition) - 1)]


class RuleSpec(BaseModel):
    """One rule: the GAVEL `rule.yaml` fields read unchanged, plus gavel's optional action fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    title: str | None = None
    public_id: Annotated[str, StringConstraints(pattern=r"^rule_[0-9a-f]{32}$")] | None = None
    schema_version: Literal[1] = 1
    categories: tuple[str, ...] = ()
    definition: str = ""
    groups: dict[Identifier, Group] = Field(default_factory=dict)
    condition: str
    action: Identifier = "log"  # resolved in the plugin registry (gavel.actions) when a monitor is built
    severity: Literal["low", "medium", "high", "critical"] = "medium"
    message: str | None = None
    reply: str | None = None
    _source: RuleSource | None = PrivateAttr(default=None)

    @field_validator("condition")
    @classmethod
    def _parses(cls, condition: str) -> str:
        parse_condition(condition)
        return condition

    @model_validator(mode="after")
    def _reply_needs_block(self) -> RuleSpec:
        if self.reply is not None and self.action != "block":
            raise ValueError("`reply` is only used by action `block`")
        return self

    @property
    def expr(self) -> Expr:
        """The parsed condition (parsing is cached per condition string)."""
        return parse_condition(self.condition)

    @property
    def ce_names(self) -> tuple[str, ...]:
        """The CEs the condition reads: members of the groups it uses, and bare names that are not groups."""
        found: dict[str, None] = {}
        for node in walk(self.expr):
            if isinstance(node, Name) and node.name not in self.groups:
                found[node.name] = None
            elif isinstance(node, (Name, AllOf, KOf)):
                found.update(dict.fromkeys(self.groups.get(node.name if isinstance(node, Name) else node.group, ())))
        return tuple(found)

    @property
    def source(self) -> RuleSource | None:
        """The YAML file the rule was loaded from, if any."""
        return self._source

    def field_location(self, *path: str | int, key: bool = False) -> Location:
        """Location of a field (e.g. `"groups", "tax"`): in the YAML file, or the rule name when built in Python."""
        if self._source is None:
            return Location(f"<rule {self.name}>")
        return self._source.location(self._source.index(path, key=key))

    def condition_location(self, offset: int) -> Location:
        """Location of a character of the condition, mapped back into the YAML file when there is one."""
        if self._source is None:
            return Location(f"<rule {self.name}>", *line_column(self.condition, offset))
        return self._source.location(self._source.condition_index(offset))

    def condition_excerpt(self, offset: int) -> str:
        """The source line around a condition character, with a caret under it."""
        if self._source is None or self._source.condition is None:
            return excerpt(self.condition, offset)
        return excerpt(self._source.text, self._source.condition_index(offset))

    def error(self, message: str, offset: int, hint: str | None = None) -> RuleError:
        """A RuleError pointing at a character of this rule's condition."""
        return RuleError(f"rule '{self.name}': {message}", location=self.condition_location(offset),
                         excerpt=self.condition_excerpt(offset), hint=hint)


# --- YAML loading ---------------------------------------------------------------------------

_PACK_KEYS = ("pack", "description", "rules")
_RULESET_KEYS = ("ruleset", "description", "library", "rules")


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None


def _char_indices(text: str, node: yaml.Node | None, value: object) -> tuple[int, ...] | None:
    """Index in `text` of each character of a scalar's value (and one past its end), aligning non-blank characters."""
    if not isinstance(node, yaml.ScalarNode) or not isinstance(value, str):
        return None
    i = node.start_mark.index
    if node.style in ("|", ">"):
        i = text.index("\n", i) + 1
    elif node.style in ("'", '"'):
        i += 1
    out = []
    for ch in value:
        if not ch.isspace():
            while i < len(text) and text[i] != ch:
                if not text[i].isspace():
                    return None
                i += 1
            if i == len(text):
                return None
        out.append(i)
        i += 0 if ch.isspace() else 1
    out.append(i)
    return tuple(out)


def _pydantic_error(err: Mapping, source: RuleSource, name: object) -> RuleError:
    """One pydantic error of a rule, as a RuleError at its place in the YAML file."""
    prefix = f"rule '{name}': " if isinstance(name, str) else ""
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConditionSyntaxError):
        if source.condition is None:
            return RuleError(prefix + cause.message, location=source.location(source.index(("condition",))),
                             excerpt=cause.excerpt, hint=cause.hint)
        i = source.condition_index(cause.offset)
        return RuleError(prefix + cause.message, location=source.location(i),
                         excerpt=excerpt(source.text, i), hint=cause.hint)
    loc = tuple(err["loc"])
    path = tuple(p for p in loc if p != "[key]")
    dotted = ".".join(map(str, path))
    hint = None
    if err["type"] == "extra_forbidden":
        message, i = f"unknown field '{dotted}'", source.index(path, key=True)
        guess = did_you_mean(str(path[-1]), list(RuleSpec.model_fields)) if len(path) == 1 else None
        hint = f"did you mean '{guess}'?" if guess else None
    elif err["type"] == "missing":
        message, i = f"missing required field '{dotted}'", source.index(path[:-1])
    else:
        msg = err["msg"].removeprefix("Value error, ")
        message, i = (f"{dotted}: {msg}" if dotted else msg), source.index(path, key="[key]" in loc)
    return RuleError(prefix + message, location=source.location(i), excerpt=excerpt(source.text, i), hint=hint)


def _rule(top: RuleSource, node: yaml.Node, data: object, errors: list[RuleError]) -> RuleSpec | None:
    """Validate one rule mapping of the file `top` describes; its errors go to `errors`."""
    values: dict[PathKey, int] = {}
    keys: dict[PathKey, int] = {}
    index_nodes(node, (), values, keys, [])
    condition = data.get("condition") if isinstance(data, dict) else None
    source = RuleSource(top.path, top.text, top.lines, values, keys,
                        _char_indices(top.text, _child(node, "condition"), condition))
    try:
        spec = RuleSpec.model_validate(data)
    except ValidationError as e:
        name = data.get("name") if isinstance(data, dict) else None
        errors.extend(_pydantic_error(err, source, name) for err in e.errors())
        return None
    spec._source = source
    return spec


def _unknown_keys(data: dict, allowed: Sequence[str], kind: str, top: RuleSource) -> list[RuleError]:
    guesses = {key: did_you_mean(str(key), list(allowed)) for key in data if key not in allowed}
    return [top.error((key,), f"unknown {kind} field '{key}'", hint=f"did you mean '{guess}'?" if guess else None)
            for key, guess in guesses.items()]


def _library_rules(library: Path) -> dict[str, Path]:
    """GAVEL library rules by directory name: `<library>/rules/<name>/rule.yaml` (or `<library>/<name>/rule.yaml`)."""
    root = library / "rules" if (library / "rules").is_dir() else library
    return {p.parent.name: p for p in sorted(root.glob("*/rule.yaml"))}


def _find_library(start: Path) -> Path | None:
    return next((d for d in (start, *start.parents) if (d / "rules").is_dir()), None)


def _load_file(path: Path, library: Path | None, errors: list[RuleError], *, rulesets: bool = True) -> list[RuleSpec]:
    """Every rule a YAML file holds: one rule, a pack `{rules: [...]}`, or a ruleset resolved against a library."""
    try:
        text, node, data = read_yaml(path, RuleError)
    except RuleError as e:
        errors.append(e)
        return []
    values, keys, duplicates = index_document(node)
    top = RuleSource(str(path), text, line_starts(text), values, keys, None)
    errors.extend(RuleError(f"duplicate key '{k}' (YAML would silently keep the last one)", location=top.location(i),
                            excerpt=excerpt(text, i)) for k, i in duplicates)
    if node is None:
        errors.append(top.error((), "empty rule file"))
        return []
    if isinstance(data, list) or (isinstance(data, dict) and "ruleset" in data):
        if rulesets:
            return _load_ruleset(path, data, library, errors, top)
        errors.append(top.error((), "a ruleset cannot be used as a library rule"))
        return []
    if not (isinstance(data, dict) and "rules" in data and "condition" not in data):
        spec = _rule(top, node, data, errors)
        return [spec] if spec else []
    errors.extend(_unknown_keys(data, _PACK_KEYS, "pack", top))
    if not isinstance(data["rules"], list):
        errors.append(top.error(("rules",), "a pack's `rules` must be a list of rules", key=False))
        return []
    specs = [_rule(top, _child(_child(node, "rules"), i), item, errors) for i, item in enumerate(data["rules"])]
    return [spec for spec in specs if spec is not None]


def _load_ruleset(path: Path, data: object, library: Path | None, errors: list[RuleError],
                  top: RuleSource) -> list[RuleSpec]:
    """The library rules a ruleset names, in its order."""
    base: PathKey = ()
    if isinstance(data, dict):
        errors.extend(_unknown_keys(data, _RULESET_KEYS, "ruleset", top))
        if library is None and isinstance(data.get("library"), str):
            library = path.parent / data["library"]
        base, data = ("rules",), data.get("rules")
    if not isinstance(data, list):
        errors.append(top.error(base, "a ruleset's `rules` must be a list of rule names", key=False))
        return []
    library = library or _find_library(path.parent)
    known = _library_rules(library) if library is not None and library.is_dir() else {}
    if not known:
        looked = library or "the parent folders"
        errors.append(top.error((), f"no rule library found for this ruleset (looked in {looked})", key=False,
                                hint="pass library= or add `library: <folder>` to the ruleset"))
        return []
    out = []
    for i, name in enumerate(data):
        if not isinstance(name, str) or name not in known:
            guess = did_you_mean(str(name), list(known))
            errors.append(top.error((*base, i), f"ruleset names unknown rule '{name}'", key=False,
                                    hint=f"did you mean '{guess}'?" if guess else None))
            continue
        out += _load_file(known[name], library, errors, rulesets=False)
    return out


def _expand(path: Path, errors: list[RuleError]) -> list[Path]:
    """The YAML files a path stands for: itself, every `rule.yaml` under a folder, else the folder's *.yaml files."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob("rule.yaml")) or sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if found:
            return found
        errors.append(RuleError("no rule files in this folder", location=Location(str(path))))
        return []
    errors.append(RuleError("no such rule file or folder", location=Location(str(path))))
    return []


def _same_source(a: RuleSpec, b: RuleSpec) -> bool:
    sa, sb = a.source, b.source
    return (sa is not None and sb is not None and Path(sa.path).resolve() == Path(sb.path).resolve()
            and sa.values.get(()) == sb.values.get(()))


def collect_rules(paths: StrPath | Iterable[StrPath], *, library: StrPath | None = None
                  ) -> tuple[list[RuleSpec], list[RuleError]]:
    """Load every rule under `paths` and every error, so one bad rule never hides another.

    A path is a `rule.yaml`, a pack `{rules: [...]}`, a ruleset (a list of names, or
    `{ruleset: name, rules: [names]}`) resolved against `library` (default: the nearest
    folder above the ruleset with a `rules/` folder), or a folder of any of these.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    lib = Path(library) if library is not None else None
    rules: dict[str, RuleSpec] = {}
    errors: list[RuleError] = []
    for item in items:
        for file in _expand(Path(item), errors):
            for spec in _load_file(file, lib, errors):
                first = rules.get(spec.name)
                if first is None:
                    rules[spec.name] = spec
                elif not _same_source(first, spec):
                    message = f"duplicate rule name '{spec.name}' (first defined at {first.field_location()})"
                    errors.append(RuleError(message, location=spec.field_location("name")))
    return list(rules.values()), errors


def load_rules(paths: StrPath | Iterable[StrPath], *, library: StrPath | None = None) -> list[RuleSpec]:
    """Like `collect_rules`, but raise one RuleErrors listing every error if there is any."""
    rules, errors = collect_rules(paths, library=library)
    if errors:
        raise RuleErrors(errors)
    return rules


def load_rule_file(path: StrPath, *, library: StrPath | None = None) -> list[RuleSpec]:
    """The rules of one YAML file (a rule, a pack or a ruleset); raises RuleErrors."""
    return load_rules([path], library=library)
