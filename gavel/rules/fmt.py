"""`gavel rules fmt`: rewrite each condition in canonical form, leaving every other byte of its file unchanged.

The canonical form is the AST's text: single spaces, lowercase keywords, no redundant parentheses,
nested `and`s (`or`s) flattened. Only plain and quoted single-line scalars are rewritten in place.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from gavel.errors import Location, RuleError
from gavel.rules.parser import parse_condition
from gavel.rules.spec import RuleSpec, collect_rules


@dataclass(frozen=True, slots=True)
class Edit:
    """A condition whose text is not canonical; `reason` says why it was left as is (None: rewritten)."""

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


def format_text(text: str, rules: Sequence[RuleSpec]) -> tuple[str, list[Edit]]:
    """Rewrite the conditions of `rules` (all loaded from `text`) in canonical form, last first."""
    edits, spans = [], []
    for rule in rules:
        after = canonical(rule.condition)
        if rule.source is None or rule.condition.strip() == after:
            continue
        start = rule.source.index(("condition",))
        where = rule.source.location(start)
        found = _span(text, start, rule.condition, after)
        if isinstance(found, str):
            edits.append(Edit(rule.name, where, rule.condition, after, found))
            continue
        edits.append(Edit(rule.name, where, rule.condition, after))
        spans.append((*found, after))
    for start, end, after in sorted(spans, reverse=True):
        text = text[:start] + after + text[end:]
    return text, sorted(edits, key=lambda e: (e.location.line or 0, e.location.column or 0))


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def format_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[FileFormat], list[RuleError]]:
    """Plan formatting of the rule files under `paths` (nothing is written).

    Returns the files with edits, and the load errors: a file with any error is left alone, and rules a
    ruleset reaches in another file are formatted only when that file is under `paths` too.
    """
    items = list(paths)
    roots = [Path(p).resolve() for p in items]
    rules, errors = collect_rules(items)
    broken = {Path(e.location.path).resolve() for e in errors if e.location and e.location.path}
    by_file: dict[Path, list[RuleSpec]] = {}
    for rule in rules:
        if rule.source is not None:
            by_file.setdefault(Path(rule.source.path), []).append(rule)
    out = []
    for path, file_rules in by_file.items():
        if path.resolve() in broken or not _within(path.resolve(), roots):
            continue
        with open(path, encoding="utf-8", newline="") as f:
            raw = f.read()
        text = file_rules[0].source.text
        crlf = raw != text
        if crlf and raw.replace("\r\n", "\n") != text:
            errors.append(RuleError("mixed or bare carriage-return line endings; not formatted",
                                    location=Location(str(path))))
            continue
        after, edits = format_text(text, file_rules)
        if edits:
            out.append(FileFormat(path, raw, after.replace("\n", "\r\n") if crlf else after, tuple(edits)))
    return out, errors
