"""Loading rules: GAVEL rule.yaml files, packs (YAML or .gvl), rulesets and folders, with located errors.

Every error names the file, line and column, and one bad rule never hides the others: `collect_rules` returns
the rules that loaded and every error found on the way.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

from gavel.errors import Location, RuleError, did_you_mean, excerpt
from gavel.io.yamlsource import PathKey, index_document, line_starts, read_yaml
from gavel.rules.ast import params
from gavel.rules.names import macro_cycles
from gavel.rules.params import bind_condition
from gavel.rules.parser import ConditionSyntaxError, parse_condition
from gavel.rules.source import RuleErrors, RuleSource, SourceText
from gavel.rules.spec import (
    FieldError,
    Group,
    Identifier,
    Macro,
    Pack,
    PackSpec,
    ParamValue,
    Requires,
    RuleException,
    RuleSpec,
    field_names,
)

__all__ = ["Group", "Identifier", "Macro", "Pack", "PackSpec", "ParamValue", "Requires", "RuleErrors", "RuleException",
           "RuleSource", "RuleSpec", "collect_rules", "load_rule_file", "load_rules"]

StrPath = Union[str, "os.PathLike[str]"]
_ModelT = TypeVar("_ModelT", bound=BaseModel)
_RULESET_KEYS = ("ruleset", "description", "library", "rules")


@dataclass
class _Load:
    """One `collect_rules` call: the library rulesets resolve against, the caller's parameters, what went wrong."""

    library: Path | None
    params: Mapping[str, float]
    errors: list[RuleError] = field(default_factory=list)
    used_params: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Document:
    """A parsed rule file: its text and data, and where every value, key and string character sits."""

    text: str
    data: object
    values: Mapping[PathKey, int]
    keys: Mapping[PathKey, int]
    scalars: Mapping[PathKey, tuple[int, ...]]
    duplicates: tuple[tuple[str, int], ...] = ()  # mapping keys given twice, and where


# --- reading files ----------------------------------------------------------------------------------------------

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


class _YamlScalars(Mapping):
    """Per string value of a YAML document (by path): the index of each of its characters, where they align;
    computed on first use, since only errors and `fmt` need them."""

    def __init__(self, text: str, node: yaml.Node | None) -> None:
        self.text = text
        self.nodes: dict[PathKey, yaml.ScalarNode] = {}
        self._found: dict[PathKey, tuple[int, ...] | None] = {}
        self._collect(node, ())

    def _collect(self, node: yaml.Node | None, path: PathKey) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            self.nodes[path] = node
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self._collect(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._collect(item, (*path, i))

    def _chars(self, path: PathKey) -> tuple[int, ...] | None:
        if path not in self._found:
            node = self.nodes.get(path)
            self._found[path] = None if node is None else _char_indices(self.text, node, node.value)
        return self._found[path]

    def __getitem__(self, path: PathKey) -> tuple[int, ...]:
        chars = self._chars(path)
        if chars is None:
            raise KeyError(path)
        return chars

    def __iter__(self):
        return (path for path in self.nodes if self._chars(path) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _read(path: Path, errors: list[RuleError]) -> _Document | None:
    """A YAML or .gvl rule file, or None with its errors recorded."""
    try:
        if path.suffix == ".gvl":
            from gavel.rules.gvl import read_gvl

            gvl = read_gvl(path)
            return _Document(gvl.text, gvl.data, gvl.values, gvl.keys, gvl.scalars)
        text, node, data = read_yaml(path, RuleError)
    except RuleErrors as e:
        errors.extend(e.errors)
        return None
    except RuleError as e:
        errors.append(e)
        return None
    values, keys, duplicates = index_document(node)
    return _Document(text, data, values, keys, _YamlScalars(text, node), tuple(duplicates))


# --- validation errors, located ---------------------------------------------------------------------------------

def _literal_hint(err: Mapping) -> str | None:
    """"did you mean" for a value outside a Literal (a misspelt severity, status, match, ...)."""
    allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
    guess = did_you_mean(str(err.get("input")), allowed) if allowed else None
    return f"did you mean '{guess}'?" if guess else f"one of: {', '.join(allowed)}" if allowed else None


def _pydantic_error(err: Mapping, source: RuleSource, model: type[BaseModel], prefix: str) -> RuleError:
    """One pydantic error, as a RuleError at its place in the file (at the very character for conditions)."""
    loc = tuple(err["loc"])
    path = tuple(p for p in loc if p != "[key]")
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConditionSyntaxError):  # a condition, macro or action: at the very character
        label = f"{prefix}macro '{path[1]}'" if path[:1] == ("macros",) and len(path) > 1 else prefix.rstrip(": ")
        text = SourceText(label, cause.condition, source, path, "")
        return RuleError(f"{label}: {cause.message}" if label else cause.message, location=text.location(cause.offset),
                         excerpt=text.excerpt(cause.offset), hint=cause.hint)
    if isinstance(cause, FieldError):
        return source.error(cause.path, prefix + cause.message, hint=cause.hint)
    dotted = ".".join(map(str, path))
    hint = None
    if err["type"] == "extra_forbidden":
        message, i = f"unknown field '{dotted}'", source.index(path, key=True)
        guess = did_you_mean(str(path[-1]), field_names(model, path[:-1]))
        hint = f"did you mean '{guess}'?" if guess else None
    elif err["type"] == "missing":
        message, i = f"missing required field '{dotted}'", source.index(path[:-1])
    else:
        msg = err["msg"].removeprefix("Value error, ")
        message, i = (f"{dotted}: {msg}" if dotted else msg), source.index(path, key="[key]" in loc)
        hint = _literal_hint(err) if err["type"] == "literal_error" else None
    return RuleError(prefix + message, location=source.location(i), excerpt=excerpt(source.text, i), hint=hint)


def _validate(model: type[_ModelT], data: object, source: RuleSource, prefix: str,
              errors: list[RuleError]) -> _ModelT | None:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors.extend(_pydantic_error(err, source, model, prefix) for err in e.errors())
        return None


# --- rules and packs --------------------------------------------------------------------------------------------

def _bound(make, errors: list[RuleError]) -> bool:
    """Run `make` (a binding); record its RuleErrors; True when it worked."""
    try:
        make()
    except RuleErrors as e:
        errors.extend(e.errors)
        return False
    except RuleError as e:
        errors.append(e)
        return False
    return True


def _rule(source: RuleSource, data: object, pack: Pack | None, load: _Load, *, bind: bool = True) -> RuleSpec | None:
    """Validate one rule mapping (at `source.base`) and, with `bind`, its parameters; errors go to `load.errors`."""
    name = data.get("name") if isinstance(data, dict) else None
    spec = _validate(RuleSpec, data, source, f"rule '{name}': " if isinstance(name, str) else "", load.errors)
    if spec is None or not bind:
        return spec
    spec.attach(source, pack, pack.values if pack else load.params)
    load.used_params |= spec.param_names
    checks = [lambda: spec.expr, *(lambda e=e: e.expr for e in spec.exceptions), lambda: spec.action_call]
    return spec if all([_bound(check, load.errors) for check in checks]) else None


def _pack(top: RuleSource, data: dict, load: _Load) -> tuple[Pack | None, bool]:
    """The pack's own fields, macros bound and checked for cycles, and whether all is well (errors recorded).
    The pack is None when its fields are wrong; a macro's problem leaves it usable for checking its rules."""
    header = {k: v for k, v in data.items() if k != "rules"}
    spec = _validate(PackSpec, header, top, "", load.errors)
    if spec is None:
        return None, False
    values = {**spec.params, **load.params}
    load.used_params |= set(spec.params)
    macros: dict[str, Macro] = {}
    ok = True
    for name, condition in spec.macros.items():
        text = SourceText(f"macro '{name}'", condition, top, ("macros", name), f"<macro {name}>")
        expr = parse_condition(condition)
        load.used_params |= {p.name for p in params(expr)}
        ok = _bound(lambda name=name, condition=condition, expr=expr, text=text: macros.setdefault(
            name, Macro(name, condition, bind_condition(expr, values, text.error), text)), load.errors) and ok
    for cycle, offset in macro_cycles({n: m.expr for n, m in macros.items()}, spec.lists):
        message = "refers to itself" if len(cycle) == 2 else f"is in a cycle of macros: {' -> '.join(cycle)}"
        load.errors.append(macros[cycle[-2]].error(message, offset, hint="a macro is expanded in place, so it "
                                                                         "cannot contain itself"))
        ok = False
    rules = data["rules"] if isinstance(data.get("rules"), list) else []
    names = tuple(r["name"] for r in rules if isinstance(r, dict) and isinstance(r.get("name"), str))
    return Pack(spec, values, macros, names, top), ok


def _load_file(path: Path, load: _Load, *, rulesets: bool = True) -> list[RuleSpec]:
    """Every rule a file holds: one rule, a pack `{rules: [...]}` (YAML or .gvl), or a ruleset of library rules."""
    doc = _read(path, load.errors)
    if doc is None:
        return []
    top = RuleSource(str(path), doc.text, line_starts(doc.text), doc.values, doc.keys, doc.scalars)
    load.errors.extend(RuleError(f"duplicate key '{k}' (YAML would silently keep the last one)",
                                 location=top.location(i), excerpt=excerpt(doc.text, i)) for k, i in doc.duplicates)
    data = doc.data
    if data is None:
        load.errors.append(top.error((), "empty rule file"))
        return []
    if isinstance(data, list) or (isinstance(data, dict) and "ruleset" in data):
        if rulesets:
            return _load_ruleset(path, data, load, top)
        load.errors.append(top.error((), "a ruleset cannot be used as a library rule"))
        return []
    if not (isinstance(data, dict) and "rules" in data and "condition" not in data):
        spec = _rule(top, data, None, load)
        return [spec] if spec else []
    pack, ok = _pack(top, data, load)
    if not isinstance(data["rules"], list):
        load.errors.append(top.error(("rules",), "a pack's `rules` must be a list of rules", key=False))
        return []
    # a pack whose own fields are wrong still has its rules' errors reported; their parameters are unknown
    specs = [_rule(top.at(("rules", i)), item, pack, load, bind=pack is not None)
             for i, item in enumerate(data["rules"])]
    return [spec for spec in specs if spec is not None] if ok else []


def _unknown_keys(data: dict, allowed: tuple[str, ...], kind: str, top: RuleSource) -> list[RuleError]:
    guesses = {key: did_you_mean(str(key), list(allowed)) for key in data if key not in allowed}
    return [top.error((key,), f"unknown {kind} field '{key}'", hint=f"did you mean '{guess}'?" if guess else None)
            for key, guess in guesses.items()]


def _library_rules(library: Path) -> dict[str, Path]:
    """GAVEL library rules by directory name: `<library>/rules/<name>/rule.yaml` (or `<library>/<name>/rule.yaml`)."""
    root = library / "rules" if (library / "rules").is_dir() else library
    return {p.parent.name: p for p in sorted(root.glob("*/rule.yaml"))}


def _find_library(start: Path) -> Path | None:
    return next((d for d in (start, *start.parents) if (d / "rules").is_dir()), None)


def _load_ruleset(path: Path, data: object, load: _Load, top: RuleSource) -> list[RuleSpec]:
    """The library rules a ruleset names, in its order."""
    base: PathKey = ()
    library = load.library
    if isinstance(data, dict):
        load.errors.extend(_unknown_keys(data, _RULESET_KEYS, "ruleset", top))
        if library is None and isinstance(data.get("library"), str):
            library = path.parent / data["library"]
        base, data = ("rules",), data.get("rules")
    if not isinstance(data, list):
        load.errors.append(top.error(base, "a ruleset's `rules` must be a list of rule names", key=False))
        return []
    library = library or _find_library(path.parent)
    known = _library_rules(library) if library is not None and library.is_dir() else {}
    if not known:
        looked = library or "the parent folders"
        load.errors.append(top.error((), f"no rule library found for this ruleset (looked in {looked})", key=False,
                                     hint="pass library= or add `library: <folder>` to the ruleset"))
        return []
    out = []
    for i, name in enumerate(data):
        if not isinstance(name, str) or name not in known:
            guess = did_you_mean(str(name), list(known))
            load.errors.append(top.error((*base, i), f"ruleset names unknown rule '{name}'", key=False,
                                         hint=f"did you mean '{guess}'?" if guess else None))
            continue
        out += _load_file(known[name], load, rulesets=False)
    return out


def _expand(path: Path, errors: list[RuleError]) -> list[Path]:
    """The files a path stands for: itself; in a folder every `rule.yaml` below it (else its *.yaml files), and
    its *.gvl files."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob("rule.yaml")) or sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        found += sorted(path.glob("*.gvl"))
        if found:
            return found
        errors.append(RuleError("no rule files in this folder", location=Location(str(path))))
        return []
    errors.append(RuleError("no such rule file or folder", location=Location(str(path))))
    return []


def _same_source(a: RuleSpec, b: RuleSpec) -> bool:
    sa, sb = a.source, b.source
    return (sa is not None and sb is not None and Path(sa.path).resolve() == Path(sb.path).resolve()
            and sa.base == sb.base)


def _check_params(given: Mapping[str, float], used: set[str]) -> list[RuleError]:
    """The caller's parameters must be numbers that some loaded rule, macro or pack uses."""
    errors = []
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(RuleError(f"parameter '{name}' must be a number, not {value!r}"))
        elif name not in used:
            guess = did_you_mean(name, sorted(used))
            errors.append(RuleError(f"parameter '{name}' is set, but no loaded rule or pack uses it",
                                    hint=f"did you mean '{guess}'?" if guess else None))
    return errors


def collect_rules(paths: StrPath | Iterable[StrPath], *, library: StrPath | None = None,
                  params: Mapping[str, float] | None = None) -> tuple[list[RuleSpec], list[RuleError]]:
    """Load every rule under `paths` and every error, so one bad rule never hides another.

    A path is a `rule.yaml`, a pack `{rules: [...]}` (YAML, or a .gvl file), a ruleset (a list of names, or
    `{ruleset: name, rules: [names]}`) resolved against `library` (default: the nearest folder above the
    ruleset with a `rules/` folder), or a folder of any of these. `params` set `${name}` parameters, over the
    values packs give.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    load = _Load(Path(library) if library is not None else None, dict(params or {}))
    rules: dict[str, RuleSpec] = {}
    for item in items:
        for file in _expand(Path(item), load.errors):
            for spec in _load_file(file, load):
                first = rules.get(spec.name)
                if first is None:
                    rules[spec.name] = spec
                elif not _same_source(first, spec):
                    message = f"duplicate rule name '{spec.name}' (first defined at {first.field_location()})"
                    load.errors.append(RuleError(message, location=spec.field_location("name")))
    return list(rules.values()), load.errors + _check_params(load.params, load.used_params)


def load_rules(paths: StrPath | Iterable[StrPath], *, library: StrPath | None = None,
               params: Mapping[str, float] | None = None) -> list[RuleSpec]:
    """Like `collect_rules`, but raise one RuleErrors listing every error if there is any."""
    rules, errors = collect_rules(paths, library=library, params=params)
    if errors:
        raise RuleErrors(errors)
    return rules


def load_rule_file(path: StrPath, *, library: StrPath | None = None,
                   params: Mapping[str, float] | None = None) -> list[RuleSpec]:
    """The rules of one file (a rule, a pack or a ruleset); raises RuleErrors."""
    return load_rules([path], library=library, params=params)
