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
from typing import Literal, Union

import yaml

from gavel.errors import Location, RuleError, did_you_mean, excerpt
from gavel.io.gavel_format import DEFAULT_NAMESPACE, TAG
from gavel.io.metadata import FileWarning
from gavel.io.yamlsource import PathKey, index_document, line_starts, read_yaml
from gavel.rules.ast import params
from gavel.rules.library import Library, library_root, read_library
from gavel.rules.located import validate
from gavel.rules.names import Reference, macro_cycles, parse_reference
from gavel.rules.params import bind_condition
from gavel.rules.parser import parse_condition
from gavel.rules.source import RuleErrors, RuleSource, SourceText
from gavel.rules.spec import (
    Group,
    Identifier,
    Macro,
    Pack,
    PackSpec,
    ParamValue,
    Requires,
    RuleException,
    RulesetSpec,
    RuleSpec,
)

__all__ = ["Group", "Identifier", "Macro", "Pack", "PackSpec", "ParamValue", "Requires", "RuleErrors", "RuleException",
           "RuleSource", "RuleSpec", "collect_rules", "load_rule_file", "load_rules"]

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class _Foreign:
    """A reference into another namespace, checked once every file is read (it must be loaded too)."""

    reference: Reference
    kind: Literal["ce", "rule"]
    source: RuleSource
    path: PathKey
    label: str


@dataclass
class _Load:
    """One `collect_rules` call: the library rulesets resolve against, the caller's parameters, the libraries
    read, what went wrong, and the warnings about GAVEL files (unknown keys, kept)."""

    library: Path | None
    params: Mapping[str, float]
    errors: list[RuleError] = field(default_factory=list)
    warnings: list[FileWarning] = field(default_factory=list)
    used_params: set[str] = field(default_factory=set)
    libraries: dict[Path, Library] = field(default_factory=dict)  # by resolved root
    namespaces: set[str] = field(default_factory=set)             # of every library and file read
    foreign: list[_Foreign] = field(default_factory=list)
    files: dict[Path, list[RuleSpec]] = field(default_factory=dict)  # read so far, by resolved path

    def library_at(self, root: Path) -> Library:
        """The library at `root`, read once."""
        key = root.resolve()
        if key not in self.libraries:
            self.libraries[key] = read_library(root, self.errors, self.warnings)
            self.namespaces.add(self.libraries[key].namespace)
        return self.libraries[key]

    def library_of(self, path: Path) -> Library | None:
        root = library_root(path)
        return None if root is None else self.library_at(root)

    def by_namespace(self, namespace: str) -> Library | None:
        return next((lib for lib in self.libraries.values() if lib.namespace == namespace), None)


@dataclass(frozen=True)
class _GavelFile:
    """A file of the GAVEL format (not a gavel pack): unknown keys are warnings, names are namespaced."""

    path: Path
    library: Library | None

    def namespace(self, data: object) -> str:
        """The file's namespace: its own `namespace:`, else its library's, else `local`."""
        own = data.get("namespace") if isinstance(data, dict) else None
        if isinstance(own, str):
            return own
        return self.library.namespace if self.library else DEFAULT_NAMESPACE


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


def _rule(source: RuleSource, data: object, pack: Pack | None, load: _Load, *, bind: bool = True,
          gavel: _GavelFile | None = None) -> RuleSpec | None:
    """Validate one rule mapping (at `source.base`) and, with `bind`, its parameters; errors go to `load.errors`.
    In a GAVEL file (`gavel`) unknown keys are kept and warned about, and group members may be namespaced."""
    name = data.get("name") if isinstance(data, dict) else None
    prefix = f"rule '{name}': " if isinstance(name, str) else ""
    if gavel is not None and isinstance(data, dict):
        data = _resolve_groups(source, data, gavel.namespace(data), load, prefix)
    spec, unknown = validate(RuleSpec, data, source, prefix, load.errors,
                             load.warnings if gavel is not None else None)
    if spec is None:
        return None
    if gavel is not None:
        spec.keep(unknown, gavel.library.namespace if gavel.library else DEFAULT_NAMESPACE)
        load.namespaces.add(spec.resolved_namespace)
        load.errors.extend(_library_checks(spec, source, gavel, prefix))
    if not bind:
        return spec
    spec.attach(source, pack, pack.values if pack else load.params)
    load.used_params |= spec.param_names
    checks = [lambda: spec.expr, *(lambda e=e: e.expr for e in spec.exceptions), lambda: spec.action_call]
    return spec if all([_bound(check, load.errors) for check in checks]) else None


def _reference(text: object, kind: Literal["ce", "rule"], own: str, source: RuleSource, path: PathKey, label: str,
               load: _Load) -> Reference | None:
    """A reference read from a GAVEL file; a CE of another namespace is checked once everything is read."""
    try:
        ref = parse_reference(text, kind) if isinstance(text, str) else None
    except ValueError as e:
        load.errors.append(source.error(path, f"{label}{e}", key=False))
        return None
    if ref is not None and ref.namespace not in (None, own) and kind == "ce":
        load.foreign.append(_Foreign(ref, kind, source, path, label))
    return ref


def _resolve_groups(source: RuleSource, data: dict, own: str, load: _Load, label: str) -> dict:
    """The rule with its group members as local CE names: `ns/name` and `ns/ce/name` read as `name`."""
    groups = data.get("groups")
    if not isinstance(groups, dict):
        return data
    resolved = {}
    for group, members in groups.items():
        if not isinstance(members, list):
            resolved[group] = members
            continue
        names = []
        for i, member in enumerate(members):
            if not (isinstance(member, str) and "/" in member):
                names.append(member)
            elif (ref := _reference(member, "ce", own, source, ("groups", group, i), label, load)) is not None:
                names.append(ref.name)
        resolved[group] = names
    return {**data, "groups": resolved}


def _library_checks(spec: RuleSpec | RulesetSpec, source: RuleSource, gavel: _GavelFile,
                    label: str) -> list[RuleError]:
    """What FORMAT.md asks of a library file beyond its fields: the name of its path, categories from the
    library's `categories.yaml`, tags in lowercase dotted words."""
    errors = []
    name = spec.name if isinstance(spec, RuleSpec) else spec.name or spec.ruleset
    path = gavel.path
    in_layout = path.parent.name == "rulesets" or (path.name == "rule.yaml" and path.parent.parent.name == "rules")
    expected = path.parent.name if path.name == "rule.yaml" else path.stem
    if in_layout and name is not None and name != expected:
        field_ = "name" if isinstance(spec, RuleSpec) or spec.name else "ruleset"
        errors.append(source.error((field_,), f"{label}name '{name}' differs from its path's '{expected}'",
                                   key=False, hint="rename one: a library file's name is its path's"))
    if gavel.library is not None:
        errors += [e for i, c in enumerate(spec.categories)
                   if (e := gavel.library.category_error(c, source, ("categories", i), label))]
    for i, tag in enumerate(spec.tags if isinstance(spec, RuleSpec) else ()):
        if not re.fullmatch(TAG, tag):
            errors.append(source.error(("tags", i), f"{label}tag {tag!r} is not lowercase dotted words",
                                       key=False, hint="like `scam.romance` or `owasp.llm01`: [a-z0-9_] words "
                                                       "joined by dots"))
    return errors


def _pack(top: RuleSource, data: dict, load: _Load) -> tuple[Pack | None, bool]:
    """The pack's own fields, macros bound and checked for cycles, and whether all is well (errors recorded).
    The pack is None when its fields are wrong; a macro's problem leaves it usable for checking its rules."""
    header = {k: v for k, v in data.items() if k != "rules"}
    spec = validate(PackSpec, header, top, "", load.errors)[0]
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


def _is_ruleset(path: Path, data: object) -> bool:
    """A list of names, `{ruleset: ...}`, a file in `rulesets/`, or a mapping whose `rules` are all names."""
    if isinstance(data, list) or path.parent.name == "rulesets":
        return True
    rules = data.get("rules") if isinstance(data, dict) else None
    return isinstance(data, dict) and ("ruleset" in data or (bool(rules) and isinstance(rules, list)
                                       and all(isinstance(r, str) for r in rules)))


def _load_file(path: Path, load: _Load, *, rulesets: bool = True) -> list[RuleSpec]:
    """Every rule a file holds: one rule, a pack `{rules: [...]}` (YAML or .gvl), or a ruleset of library rules.
    A file reached again (a library rule named by several rulesets) is read once, and its problems said once."""
    key = path.resolve()
    if key not in load.files:
        load.files[key] = _read_file(path, load, rulesets=rulesets)
    return load.files[key]


def _read_file(path: Path, load: _Load, *, rulesets: bool) -> list[RuleSpec]:
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
    # a GAVEL file: a library rule or ruleset, or any file that declares the format's schema_version
    gavel = (_GavelFile(path, load.library_of(path)) if path.suffix != ".gvl" and (
        path.name == "rule.yaml" or path.parent.name == "rulesets"
        or (isinstance(data, dict) and "schema_version" in data)) else None)
    if _is_ruleset(path, data):
        if rulesets:
            return _load_ruleset(path, data, load, top, gavel)
        load.errors.append(top.error((), "a ruleset cannot be used as a library rule"))
        return []
    if not (isinstance(data, dict) and "rules" in data and "condition" not in data):
        spec = _rule(top, data, None, load, gavel=gavel)
        return [spec] if spec else []
    pack, ok = _pack(top, data, load)
    if not isinstance(data["rules"], list):
        load.errors.append(top.error(("rules",), "a pack's `rules` must be a list of rules", key=False))
        return []
    # a pack whose own fields are wrong still has its rules' errors reported; their parameters are unknown
    specs = [_rule(top.at(("rules", i)), item, pack, load, bind=pack is not None)
             for i, item in enumerate(data["rules"])]
    return [spec for spec in specs if spec is not None] if ok else []


def _ruleset_library(path: Path, spec: RulesetSpec | None, load: _Load) -> Library | None:
    """The library a ruleset's bare names are rules of: `library=`, else its `library:` (relative to the file),
    else its own library, else the nearest folder at or above it with a `rules/` folder."""
    root = load.library
    if root is None and spec is not None and spec.library is not None:
        root = path.parent / spec.library
    if root is None:
        root = library_root(path)
    if root is None:
        root = next((d for d in path.parents if (d / "rules").is_dir()), None)
    return load.library_at(root) if root is not None and root.is_dir() else None


def _load_ruleset(path: Path, data: object, load: _Load, top: RuleSource, gavel: _GavelFile | None
                  ) -> list[RuleSpec]:
    """The library rules a ruleset names, in its order; `ns/name` names a rule of the library of namespace `ns`."""
    base: PathKey = ()
    spec = None
    label = "ruleset: "
    if isinstance(data, dict):
        name = data.get("name") or data.get("ruleset")
        label = f"ruleset '{name}': " if isinstance(name, str) else label
        spec = validate(RulesetSpec, data, top, label, load.errors, load.warnings if gavel is not None else None)[0]
        if spec is None:
            return []
        if gavel is not None:
            load.errors.extend(_library_checks(spec, top, gavel, label))
        base, data = ("rules",), list(spec.rules)
    if not isinstance(data, list):
        load.errors.append(top.error(base, "a ruleset's `rules` must be a list of rule names", key=False))
        return []
    library = _ruleset_library(path, spec, load)
    own = (spec.namespace if spec and spec.namespace else None) or (
        gavel.namespace(None) if gavel is not None else library.namespace if library else DEFAULT_NAMESPACE)
    out: list[RuleSpec] = []
    for i, text in enumerate(data):
        ref = _reference(text, "rule", own, top, (*base, i), label, load)
        if ref is None:
            if not isinstance(text, str):
                load.errors.append(top.error((*base, i), f"{label}{text!r} is not a rule name", key=False))
            continue
        foreign = ref.namespace not in (None, own)
        home = load.by_namespace(str(ref.namespace)) if foreign else library
        if home is None and foreign:
            load.errors.append(_missing(_Foreign(ref, "rule", top, (*base, i), label)))
            continue
        if home is None:
            looked = load.library or "the parent folders"
            load.errors.append(top.error((), f"no rule library found for this ruleset (looked in {looked})",
                                         key=False, hint="pass library= or add `library: <folder>` to the ruleset"))
            return out
        known = home.rules
        if ref.name not in known:
            guess = did_you_mean(ref.name, list(known))
            load.errors.append(top.error((*base, i), f"ruleset names unknown rule '{text}'", key=False,
                                         hint=f"did you mean '{guess}'?" if guess else None))
            continue
        out += _load_file(known[ref.name], load, rulesets=False)
    return out


def _missing(f: _Foreign) -> RuleError:
    """A reference into a namespace nothing loaded together declares: a missing dependency, never ignored."""
    ns = f.reference.namespace
    return f.source.error(f.path, f"{f.label}missing dependency: {f.kind} '{f.reference.name}' of namespace '{ns}', "
                                  "which is not loaded", key=False,
                          hint=f"load the library whose gavel.yaml says `namespace: {ns}` together with this one")


def _expand(path: Path, errors: list[RuleError]) -> list[Path]:
    """The files a path stands for: itself; in a folder every `rule.yaml` below it and its `rulesets/*.yaml`
    (else its *.yaml files), and its *.gvl files."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob("rule.yaml"))
        found = found + sorted((path / "rulesets").glob("*.yaml")) if found else sorted(
            [*path.glob("*.yaml"), *path.glob("*.yml")])
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
                  params: Mapping[str, float] | None = None, warnings: list[FileWarning] | None = None
                  ) -> tuple[list[RuleSpec], list[RuleError]]:
    """Load every rule under `paths` and every error, so one bad rule never hides another.

    A path is a `rule.yaml`, a pack `{rules: [...]}` (YAML, or a .gvl file), a ruleset (a list of names, or
    `{ruleset: name, rules: [names]}`, or GAVEL's `rulesets/<name>.yaml`) resolved against `library` (default:
    the ruleset's `library:`, else its library folder, else the nearest folder above it with a `rules/` folder),
    or a folder of any of these. `params` set `${name}` parameters, over the values packs give. GAVEL files'
    unknown keys are kept on what was read and reported in `warnings`, when given (see docs/rules.md).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    load = _Load(Path(library) if library is not None else None, dict(params or {}))
    expanded = []
    for item in items:
        problems: list[RuleError] = []
        expanded.append((_expand(Path(item), problems), problems))
    if load.library is not None and load.library.is_dir():
        load.library_at(load.library)
    for files, _ in expanded:  # every namespace loaded together is known before the first reference is resolved
        for file in files:
            load.library_of(file)
    rules: dict[str, RuleSpec] = {}
    for files, problems in expanded:
        load.errors.extend(problems)
        for file in files:
            for spec in _load_file(file, load):
                first = rules.get(spec.name)
                if first is None:
                    rules[spec.name] = spec
                elif not _same_source(first, spec):
                    message = f"duplicate rule name '{spec.name}' (first defined at {first.field_location()})"
                    load.errors.append(RuleError(message, location=spec.field_location("name")))
    missing = [_missing(f) for f in load.foreign if f.reference.namespace not in load.namespaces]
    if warnings is not None:
        warnings.extend(load.warnings)
    return list(rules.values()), load.errors + missing + _check_params(load.params, load.used_params)


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
