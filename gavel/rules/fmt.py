"""`gavel rules fmt`: rewrite each condition in canonical form, leaving every other byte of its file unchanged.

The canonical form is the AST's text: single spaces, lowercase keywords, no redundant parentheses,
nested `and`s (`or`s) flattened. In YAML, conditions, exception conditions and macros in plain and quoted
single-line scalars are rewritten in place; in `.gvl` files, every condition, macro, exception condition and
action (`block  "x"` -> `block "x"`) without a comment inside.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from gavel.errors import Location, RuleError
from gavel.io.yamlsource import line_starts
from gavel.rules.gvl import GvlDocument, has_comment, read_gvl
from gavel.rules.load import Pack, RuleSource, RuleSpec, collect_rules
from gavel.rules.parser import parse_action, parse_condition


@dataclass(frozen=True, slots=True)
class Edit:
    """A condition (or .gvl action) whose text is not canonical; `reason` says why it was left as is (None: rewritten).

    `rule` names the rule the text belongs to (`macro NAME` for a pack's macro)."""

    rule: str
    location: Location
    before: str
    after: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class FileFormat:
    """One file's formatting: its text before and after (newlines as in the file) and the edits."""

    path: Path
    before: str
    after: str
    edits: tuple[Edit, ...]

    @property
    def changed(self) -> bool:
        return self.after != self.before

    def write(self) -> None:
        with open(self.path, "w", encoding="utf-8", newline="") as f:
            f.write(self.after)


def canonical(condition: str) -> str:
    """The canonical text of a condition (raises ConditionSyntaxError)."""
    return str(parse_condition(condition))


def _plain_safe(text: str) -> bool:
    """Does `text` read back as this very string when written as a plain YAML scalar (not `null`, `true`, ...)?"""
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _span(text: str, start: int, value: str, after: str) -> tuple[int, int] | str:
    """[start, end) of the condition's characters in `text`, or why they cannot be replaced exactly."""
    head = text[start:start + 1]
    if head in ("|", ">"):
        return "block scalar"
    if head in ("'", '"'):
        end = text.find(head, start + 1)
        if end < 0 or text[start + 1:end] != value:
            return "quoted scalar with escapes or line breaks"
        return start + 1, end
    if text[start:start + len(value)] != value:
        return "has a tag or anchor" if head in ("!", "&") else "spans several lines"
    if not _plain_safe(after):
        return f"`{after}` would not read back as text in YAML; quote the condition"
    return start, start + len(value)


def _rewrite(text: str, path: str | None, found: Iterable[tuple[str, int, str, str]],
             span: Callable[[str, int, str, str], tuple[int, int] | str]) -> tuple[str, list[Edit]]:
    """Apply `(owner, start, before, after)` rewrites whose `span` can be replaced exactly; an Edit for each."""
    edits, spans = [], []
    starts = line_starts(text)
    for owner, start, before, after in found:
        if before.strip() == after:
            continue
        line = bisect.bisect_right(starts, start)
        where = Location(path, line, start - starts[line - 1] + 1)
        replace = span(text, start, before, after)
        edits.append(Edit(owner, where, before, after, replace if isinstance(replace, str) else None))
        if not isinstance(replace, str):
            spans.append((*replace, after))
    for start, end, after in sorted(spans, reverse=True):
        text = text[:start] + after + text[end:]
    return text, sorted(edits, key=lambda e: (e.location.line or 0, e.location.column or 0))


def format_text(text: str, rules: Sequence[RuleSpec]) -> tuple[str, list[Edit]]:
    """Rewrite the conditions, exception conditions and pack macros of `rules` (all loaded from the YAML `text`)
    in canonical form."""
    found = []
    packs: dict[int, tuple[Pack, RuleSource]] = {}   # by identity: (pack, its file)
    for rule in rules:
        if rule.source is None:
            continue
        found.append((rule.name, rule.source.index(("condition",)), rule.condition))
        found += [(rule.name, rule.source.index(("exceptions", i, "condition")), e.condition)
                  for i, e in enumerate(rule.exceptions)]
        if rule.pack is not None and rule.pack.source is not None:
            packs[id(rule.pack)] = (rule.pack, rule.pack.source)
    for pack, source in packs.values():
        found += [(f"macro {name}", source.index(("macros", name)), macro.condition)
                  for name, macro in pack.macros.items()]
    path = rules[0].source.path if rules and rules[0].source is not None else None
    return _rewrite(text, path, [(*item, canonical(item[2])) for item in found], _span)


def format_gvl(doc: GvlDocument, path: str | None = None) -> tuple[str, list[Edit]]:
    """Rewrite every condition, macro, exception condition and action of a `.gvl` file in canonical form.

    Texts with a comment inside are left as they are (the canonical form would drop the comment).
    """
    found = []
    for key, chars in doc.scalars.items():
        before = doc.text[chars[0]:chars[-1]]
        after = str(parse_action(before)) if key[-1] == "action" else canonical(before)
        owner = doc.data["rules"][key[1]]["name"] if key[0] == "rules" else f"macro {key[1]}"
        found.append((owner, chars[0], before, after))
    return _rewrite(doc.text, path, found, _gvl_span)


def _gvl_span(text: str, start: int, before: str, after: str) -> tuple[int, int] | str:
    return "has a comment inside" if has_comment(before) else (start, start + len(before))


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def format_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[FileFormat], list[RuleError]]:
    """Plan formatting of the rule files (YAML and .gvl) under `paths` (nothing is written).

    Returns the files with edits, and the load errors: a file with any error is left alone, and rules a
    ruleset reaches in another file are formatted only when that file is under `paths` too.
    """
    items = list(paths)
    roots = [Path(p).resolve() for p in items]
    rules, errors = collect_rules(items)
    broken = {Path(e.location.path).resolve() for e in errors if e.location and e.location.path}
    by_file: dict[Path, list[RuleSpec]] = {}
    sources: dict[Path, RuleSource] = {}   # the file of the first rule of each
    for rule in rules:
        if rule.source is not None:
            by_file.setdefault(Path(rule.source.path), []).append(rule)
            sources.setdefault(Path(rule.source.path), rule.source)
    out = []
    for path, file_rules in by_file.items():
        if path.resolve() in broken or not _within(path.resolve(), roots):
            continue
        with open(path, encoding="utf-8", newline="") as f:
            raw = f.read()
        if path.suffix == ".gvl":
            doc = read_gvl(path)
            text, (after, edits) = doc.text, format_gvl(doc, str(path))
        else:
            text = sources[path].text
            after, edits = format_text(text, file_rules)
        crlf = raw != text
        if crlf and raw.replace("\r\n", "\n") != text:
            errors.append(RuleError("mixed or bare carriage-return line endings; not formatted",
                                    location=Location(str(path))))
            continue
        if edits:
            out.append(FileFormat(path, raw, after.replace("\n", "\r\n") if crlf else after, tuple(edits)))
    return out, errors
