"""The `.gvl` rule-pack language: one file, read into exactly the dict a YAML pack holds, with every position kept.

A `.gvl` file is a sequence of statements. `#` starts a comment; strings are "double quoted", on one line
(escapes `\\"`, `\\\\`, `\\n`); lists are `[a, b, ...]` (a trailing comma is allowed). Values are typed by their
syntax: a "string", a word (a name), a number, a [list].

    pack safety "What the pack is for"          # pack: safety, description: ... (the string is optional)
    requires bank "organism-bank"               # requires: {bank: ...}; also `model "..."`, `ces [a, b]`
    param thr = 0.85                            # params: {thr: 0.85}; conditions read it as ${thr}
    list weapons = [weapon_request, explosives] # lists: {weapons: [...]}
    macro risky = harmful_request > ${thr} or any of weapons     # macros: {risky: "harmful_request > ..."}

    rule weapons_help {                         # rules: [{name: weapons_help, ...}]
        title "Weapons help"                    # also description, author, definition, public_id: a "string"
        severity high                           # also level, status, match: a word
        tags [weapons, "attack.t1059"]          # also references, falsepositives, categories: words or strings
        match conversation
        group ask = [weapon_request, explosives]               # groups: {ask: [...]}
        requires ces [weapon_request]                          # the rule's own requires
        when risky and not refusal in response                 # condition: "risky and not refusal in response"
        unless fiction: fiction_context "a story, not a request"   # exceptions: [{name, condition, reason}]
        action block "I can't help with that."                 # action: 'block "I can't help with that."'
    }

    private rule helper_x { when count(urgency) >= 3 within 20 tokens }   # private: true

    test "weapons fire" {                       # tests: [{name: "weapons fire", ces: [...], ...}]
        ces [weapon_request, refusal]           # `key value` entries; values are JSON-like:
        trace [[1, 0], [1, 1]]                  # "strings", numbers, true/false, words, [lists], {maps}
        expect {weapons_help: {fires: true}}
    }

A condition (after `when`, `unless name:` or `macro name =`) runs up to the next field, statement or `}`; it and
an action (after `action`) are parsed by the condition language's own grammar rules and kept in the pack dict as
their exact source text (comments and line breaks included), and `scalars` maps each of their characters back to
the file. Field names are keywords only where a field can stand, so `title` or `model` stay usable as CE names
inside conditions. Unknown fields, statements and `requires` keys are errors with a "did you mean".

Syntax errors of several statements are reported together: after an error, each stretch of the file that starts
at a statement keyword, or at a word in the first column, is parsed on its own (fields are indented).
"""
from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from gavel.errors import Location, RuleError, did_you_mean
from gavel.io.yamlsource import PathKey
from gavel.rules.parser import (
    _GRAMMAR,
    _WORDS,
    ConditionSyntaxError,
    _cache_option,
    _char_position,
    _position,
    _to_number,
    _unquote,
    excerpt,
    line_column,
    parse_action,
    parse_condition,
)
from gavel.rules.source import RuleErrors

if TYPE_CHECKING:
    from lark.parsers.lalr_interactive_parser import InteractiveParser

FIELDS = ("title", "description", "author", "definition", "public_id", "severity", "level", "status", "match", "tags",
          "references", "falsepositives", "categories", "group", "requires", "when", "unless", "action")
STATEMENTS = ("pack", "requires", "param", "list", "macro", "private", "rule", "test")
MAX_NESTING = 32  # levels of [lists] and {maps} in a test's values
_RESYNC = re.compile(r"^(?:[ \t]*((?:rule|private|macro|param|list|pack|test)(?=[ \t]))|([A-Za-z_]))",
                     re.MULTILINE)
_BOOLEANS = {"true": True, "false": False}
_FIELD_KEYS = {"when": "condition", "unless": "exceptions", "group": "groups"}  # .gvl field -> pack dict key


@dataclass(frozen=True, slots=True)
class GvlDocument:
    """A parsed `.gvl` file: the pack dict (a YAML pack's shape) and where each of its values sits in `text`.

    `values` / `keys`: character index of each value / mapping key (as `gavel.io.yamlsource.index_document`);
    a field's key is its keyword. `scalars`: for each condition, macro, exception condition and action, the index
    of every character of its text plus one past its end.
    """

    text: str
    data: dict
    values: dict[PathKey, int] = field(default_factory=dict)
    keys: dict[PathKey, int] = field(default_factory=dict)
    scalars: dict[PathKey, tuple[int, ...]] = field(default_factory=dict)


def read_gvl(path: str | Path) -> GvlDocument:
    """Read and parse a `.gvl` file; raises RuleErrors listing every error, each located in the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleErrors([RuleError(f"cannot read {Path(path).name}: {e}", location=Location(str(path)))]) from None
    return parse_gvl(text, str(path))


def parse_gvl(text: str, path: str = "<input>") -> GvlDocument:
    """Parse `.gvl` source; raises RuleErrors listing every syntax error, each with line, column and a caret."""
    statements, errors = _parse(text, path)
    builder = _Builder(text, path)
    for statement in statements:
        builder.statement(statement)
    errors += builder.errors
    if errors:
        raise RuleErrors(sorted(errors, key=_line_column))
    return GvlDocument(text, builder.data, builder.values, builder.keys, builder.scalars)


def _line_column(error: RuleError) -> tuple[int, int]:
    """Where an error is, for sorting (every error here is located)."""
    location = error.location or Location()
    return location.line or 0, location.column or 0


def has_comment(source: str) -> bool:
    """Whether a piece of `.gvl` (or condition) source holds a `#` comment (a `#` inside a "string" is none)."""
    return "#" in source and any(token.type == "COMMENT" for token in _lark().lex(source, dont_ignore=True))


# --- parsing with recovery --------------------------------------------------------------------------------------

@functools.cache
def _lark() -> Lark:
    """The file parser: the condition grammar's `gvl` start, with a contextual lexer (keywords only where they fit)."""
    cache = _cache_option()
    return Lark.open(_GRAMMAR.name, rel_to=__file__, parser="lalr", lexer="contextual", start="gvl",
                     strict=importlib.util.find_spec("interegular") is not None, propagate_positions=True,
                     cache=cache.replace(".lark-cache", "-gvl.lark-cache") if cache else False)


def _statements(tree: Tree[Token]) -> list[Tree[Token]]:
    """The statements of a parsed file (the `gvl` rule's children are all statements)."""
    return [s for s in tree.children if isinstance(s, Tree)]


def _parse(text: str, path: str) -> tuple[list[Tree[Token]], list[RuleError]]:
    """The statements of `text`, or after a syntax error each chunk's first error (see `_chunks`)."""
    try:
        return _statements(_lark().parse(text)), []
    except UnexpectedInput as err:
        first = _syntax_error(text, len(text), err, path)
    statements: list[Tree[Token]] = []
    errors: list[RuleError] = []
    for a, b in _chunks(text):
        try:
            statements += _statements(_lark().parse(" " * a + text[a:b]))
        except UnexpectedInput as err:
            errors.append(_syntax_error(text, b, err, path))
    return statements, errors or [first]


def _chunks(text: str) -> list[tuple[int, int]]:
    """Where statements likely start, so one error cannot hide the next: a line starting with a statement keyword,
    or with a word in its first column (rule fields are indented); [start, end) of the text between them."""
    starts = sorted({0, *(m.start(1) if m.group(1) is not None else m.start(2) for m in _RESYNC.finditer(text))})
    return list(zip(starts, [*starts[1:], len(text)]))


def _literal(name: str) -> str | None:
    """The word a keyword terminal stands for (`K_RULE` -> `rule`), or None for other terminals."""
    pattern = next((t.pattern for t in _lark().terminals if t.name == name), None)
    word = pattern.value if pattern is not None and pattern.type == "str" else ""
    return word if re.fullmatch("[a-z_]+", word) else None


def _term(word: str) -> str:
    return "K_" + word.upper()


_PUNCTUATION = {"_LBRACE": "`{`", "_RBRACE": "`}`", "_LSQB": "`[`", "_RSQB": "`]`", "_COLON": "`:`",
                "$END": "end of file"}


def _phrase(expected: set[str]) -> str:
    """What the parser expected, in words: condition words first, statements and rule fields named as a kind."""
    expected = set(expected)
    kinds = []
    for keywords, kind in ((STATEMENTS, "a statement (`rule`, `macro`, `param`, `list`, ...)"),
                           (FIELDS, "a rule field (`when`, `action`, `title`, ...)")):
        if {_term(w) for w in keywords} <= expected:
            expected -= {_term(w) for w in keywords}
            kinds.append(kind)
    table = {**{t: w for t, w in _WORDS.items() if t != "$END"}, "_TOKEN": "`token`"}
    words = [table[t] for t in table if t in expected]
    words += [f"`{_literal(t)}`" for t in sorted(expected) if t not in table and _literal(t)]
    words += kinds + [w for t, w in _PUNCTUATION.items() if t in expected]
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_error(text: str, stop: int, err: UnexpectedInput, path: str) -> RuleError:
    """A located RuleError for a Lark error in `text[:stop]`, with a did-you-mean or the condition language's hint.

    An unexpected end before the end of the file is reported at the statement that follows (`stop`).
    """
    token = err.token if isinstance(err, UnexpectedToken) else None
    parser = getattr(err, "interactive_parser", None)
    expected = set(parser.accepts() if parser is not None else getattr(err, "allowed", None) or ())
    word: str | None
    if token is not None and token.type == "$END":
        follows = re.match(r"[^\s]+", text[stop:])
        if follows:
            offset, word, is_name = stop, follows.group(), follows.group() not in (*FIELDS, *STATEMENTS)
        else:
            offset, word, is_name = len(text[:stop].rstrip()), None, False
        end = stop
    elif token is not None:
        offset, word, is_name, end = token.start_pos, str(token), token.type == "NAME", token.end_pos
    else:
        assert isinstance(err, UnexpectedCharacters)
        offset, word, is_name, end = _char_position(err), err.char, False, _char_position(err) + 1
    found = "end of file" if word is None else f"`{word}`" if word.isprintable() else f"character {word!r}"
    hint = _keyword_hint(word, is_name, expected) or _swallowed(parser) or _context_hint(text, parser, offset, end)
    return RuleError(f"unexpected {found}; expected {_phrase(expected)}",
                     location=Location(path, *line_column(text, offset)), excerpt=excerpt(text, offset), hint=hint)


def _keyword_hint(word: str | None, is_name: bool, expected: set[str]) -> str | None:
    """Did-you-mean for a misspelt keyword, or where a keyword that does not belong here goes."""
    if expected == {"_COLON"}:
        return 'an exception is `unless name: condition "reason"` (the reason is optional)'
    if word is None:
        return None
    if word == '"':
        return 'a string ends on the line it starts on: close it with `"` (write `\\n` for a line break)'
    if is_name:
        guess = did_you_mean(word, [w for w in map(_literal, expected) if w])
        if guess:
            return f"did you mean `{guess}`?"
        return 'text is "quoted"' if expected == {"STRING"} else None
    if word in FIELDS and _term(word) not in expected and "_RBRACE" not in expected:
        return f"`{word}` is a rule field: it goes inside `rule name {{ ... }}`"
    if word in STATEMENTS and "_RBRACE" in expected:
        return "the `rule` block above is not closed: add `}` before this statement"
    return None


def _swallowed(parser: InteractiveParser | None) -> str | None:
    """When an unfinished condition read the next field's keyword as a CE name, say so."""
    last = parser.parser_state.value_stack[-1] if parser is not None and parser.parser_state.value_stack else None
    while isinstance(last, Tree) and last.children:  # the last token read, inside the statements reduced so far
        last = last.children[-1]
    if isinstance(last, Token) and last.type == "NAME" and str(last) in (*FIELDS, *STATEMENTS):
        return f"the condition before `{last}` is unfinished, so `{last}` was read as a name in it"
    return None


_OPENERS = {"K_WHEN", "K_UNLESS", "K_MACRO", "K_ACTION"}


def _context_hint(text: str, parser: InteractiveParser | None, offset: int, end: int) -> str | None:
    """Inside a condition or action, the condition language's own hint (its table of known mistakes) for the text
    from the condition's start to the unexpected token, with it (else without it, unless that text is blank)."""
    stack = list(parser.parser_state.value_stack) if parser is not None else []
    at = next((i for i in range(len(stack) - 1, -1, -1) if isinstance(stack[i], Token) and stack[i].type in _OPENERS),
              None)
    if at is None or any(isinstance(item, Tree) and item.data in ("condition", "act") for item in stack[at:]):
        return None
    opener, rest = stack[at], stack[at + 1:]
    if opener.type == "K_MACRO" and len(rest) < 2:
        return None
    if opener.type == "K_MACRO" or (opener.type == "K_UNLESS" and len(rest) >= 2 and isinstance(rest[1], Token)
                                    and rest[1].type == "_COLON"):
        start = rest[1].end_pos
    else:
        start = opener.end_pos
    check: Callable[[str], object] = parse_action if opener.type == "K_ACTION" else parse_condition
    for stop in (end, offset) if text[start:offset].strip() else (end,):
        try:
            check(text[start:stop])
        except ConditionSyntaxError as e:
            if e.hint:
                return e.hint
    return None


# --- the pack dict --------------------------------------------------------------------------------------------------

class _Builder:
    """Statement trees -> the pack dict, its positions, and the errors a grammar cannot see (duplicates, ...)."""

    def __init__(self, text: str, path: str) -> None:
        self.text, self.path = text, path
        self.data: dict = {"rules": []}
        self.values: dict[PathKey, int] = {(): 0}
        self.keys: dict[PathKey, int] = {}
        self.scalars: dict[PathKey, tuple[int, ...]] = {}
        self.errors: list[RuleError] = []

    def error(self, message: str, offset: int, hint: str | None = None) -> None:
        self.errors.append(RuleError(message, location=Location(self.path, *line_column(self.text, offset)),
                                     excerpt=excerpt(self.text, offset), hint=hint))

    def statement(self, tree: Tree) -> None:
        getattr(self, f"_{tree.data}")(tree)

    def _place(self, target: dict, path: PathKey, value: object, key_at: int, value_at: int, what: str) -> bool:
        """Set `target[path[-1]] = value` and its positions; a key given twice is an error (False)."""
        if path[-1] in target:
            line = line_column(self.text, self.keys[path])[0]
            self.error(f"{what} is given twice (first on line {line})", key_at)
            return False
        target[path[-1]] = value
        self.keys[path] = key_at
        self.values[path] = value_at
        return True

    def _section(self, target: dict, path: PathKey, at: int) -> dict:
        """The sub-dict `target[path[-1]]` (a `groups`, `params`, ...), created at its first entry."""
        self.keys.setdefault(path, at)
        self.values.setdefault(path, at)
        return target.setdefault(path[-1], {})

    def _pack(self, tree: Tree) -> None:
        keyword, name, *description = tree.children
        self._place(self.data, ("pack",), str(name), _start(keyword), _start(name), "`pack`")
        if description:
            self._place(self.data, ("description",), _unquote(_token(description[0])), _start(description[0]),
                        _start(description[0]), "the pack's description")

    def _requires(self, tree: Tree, target: dict | None = None, base: PathKey = ()) -> None:
        keyword, kind, value = tree.children
        section = self._section(self.data if target is None else target, (*base, "requires"), _start(keyword))
        data = self._names(value, (*base, "requires", str(kind))) if isinstance(value, Tree) else _unquote(value)
        self._place(section, (*base, "requires", str(kind)), data, _start(kind), _start(value),
                    f"`requires {kind}`")

    def _param(self, tree: Tree) -> None:
        _, name, number = tree.children
        section = self._section(self.data, ("params",), tree.meta.start_pos)
        self._place(section, ("params", str(name)), self._signed(number), _start(name), number.meta.start_pos,
                    f"param '{name}'")

    def _list(self, tree: Tree) -> None:
        _, name, names = tree.children
        section = self._section(self.data, ("lists",), tree.meta.start_pos)
        self._place(section, ("lists", str(name)), self._names(names, ("lists", str(name))), _start(name),
                    names.meta.start_pos, f"list '{name}'")

    def _macro(self, tree: Tree) -> None:
        _, name, condition = tree.children
        section = self._section(self.data, ("macros",), tree.meta.start_pos)
        path = ("macros", str(name))
        if self._place(section, path, self._source(condition, path), _start(name), condition.meta.start_pos,
                       f"macro '{name}'"):
            self._check(parse_condition, path, f"macro '{name}'")

    def _rule(self, tree: Tree) -> None:
        private = _token(tree.children[0]).type == "K_PRIVATE"
        keyword, name, *fields = tree.children[private:]
        start = tree.meta.start_pos
        base: PathKey = ("rules", len(self.data["rules"]))
        rule: dict = {"name": str(name)}
        self.data["rules"].append(rule)
        self.keys.setdefault(("rules",), start)
        self.values.setdefault(("rules",), start)
        self.values[base] = start
        self.keys[(*base, "name")], self.values[(*base, "name")] = _start(keyword), _start(name)
        if private:
            rule["private"] = True
            self.keys[(*base, "private")] = self.values[(*base, "private")] = start
        what = f"rule '{name}'"
        for item in fields:
            keyword = item.children[0]
            key = _FIELD_KEYS.get(str(keyword), str(keyword))
            if item.data == "requires":
                self._requires(item, rule, base)
            elif item.data == "group":
                _, group, names = item.children
                section = self._section(rule, (*base, "groups"), _start(keyword))
                self._place(section, (*base, "groups", str(group)), self._names(names, (*base, "groups", str(group))),
                            _start(group), names.meta.start_pos, f"group '{group}' of {what}")
            elif item.data == "unless":
                self._exception(item, rule, base, what)
            else:
                value = item.children[1]
                data = self._value(value, (*base, key))
                if self._place(rule, (*base, key), data, _start(keyword), _start(value), f"`{keyword}` of {what}"):
                    if item.data in ("when", "do"):
                        self._check(parse_condition if item.data == "when" else parse_action, (*base, key), what)
        if "condition" not in rule:
            self.error(f"{what} has no `when` condition", _start(name),
                       hint="add a line `when <condition>` inside its braces")

    def _exception(self, item: Tree, rule: dict, base: PathKey, what: str) -> None:
        keyword, *parts = item.children  # name, condition, reason (optional)
        path = (*base, "exceptions", len(rule.get("exceptions", [])))
        self.keys.setdefault((*base, "exceptions"), _start(keyword))
        self.values.setdefault((*base, "exceptions"), _start(keyword))
        self.values[path] = _start(keyword)
        exception: dict = {}
        for part in parts:
            key = "condition" if isinstance(part, Tree) else "reason" if part.type == "STRING" else "name"
            exception[key] = self._value(part, (*path, key))
            self.keys[(*path, key)] = self.values[(*path, key)] = _start(part)
        rule.setdefault("exceptions", []).append(exception)
        self._check(parse_condition, (*path, "condition"), what)

    def _test(self, tree: Tree) -> None:
        keyword, name, *entries = tree.children
        name = _token(name)   # a NAME or a STRING
        path: PathKey = ("tests", len(self.data.setdefault("tests", [])))
        self.keys.setdefault(("tests",), _start(keyword))
        self.values.setdefault(("tests",), _start(keyword))
        self.values[path] = _start(keyword)
        case: dict = {}
        self._place(case, (*path, "name"), _unquote(name) if name.type == "STRING" else str(name), _start(keyword),
                    _start(name), "the test's name")
        for entry in entries:
            key, value = entry.children
            self._place(case, (*path, str(key)), self._value(value, (*path, str(key))), _start(key), _start(value),
                        f"`{key}` of test '{case['name']}'")
        self.data["tests"].append(case)

    def _value(self, value: Tree | Token, path: PathKey, level: int = 0) -> object:
        """A field or test value: strings unquoted, numbers, true/false, lists and maps (with their positions)."""
        if isinstance(value, Token):
            if value.type == "STRING":
                return _unquote(value)
            return _BOOLEANS.get(str(value), str(value)) if path[0] == "tests" else str(value)
        if value.data in ("condition", "act"):
            return self._source(value, path)
        if value.data == "signed":
            return self._signed(value)
        if level >= MAX_NESTING:
            self.error(f"values nest more than {MAX_NESTING} levels deep", value.meta.start_pos)
            return None
        if value.data == "object":
            out: dict = {}
            for pair in value.children:
                key, item = pair.children
                key = _token(key)   # a NAME or a STRING
                name = _unquote(key) if key.type == "STRING" else str(key)
                self._place(out, (*path, name), self._value(item, (*path, name), level + 1), _start(key),
                            _start(item), f"key '{name}'")
            return out
        return self._items(value, path, level)

    def _items(self, tree: Tree, path: PathKey, level: int = 0) -> list[object]:
        """The values of a `names`, `words` or `array` list, each with its position."""
        for i, item in enumerate(tree.children):
            self.values[(*path, i)] = _start(item)
        return [self._value(item, (*path, i), level + 1) for i, item in enumerate(tree.children)]

    def _names(self, names: Tree, path: PathKey) -> list[object]:
        return self._items(names, path)

    def _signed(self, tree: Tree) -> int | float:
        number = _to_number(_token(tree.children[0]))
        return -number if self.text[tree.meta.start_pos] == "-" else number

    def _source(self, tree: Tree, path: PathKey) -> str:
        """The exact text of a condition or action, with each character's index recorded in `scalars`."""
        start, end = tree.meta.start_pos, tree.meta.end_pos
        self.scalars[path] = tuple(range(start, end + 1))
        return self.text[start:end]

    def _check(self, parse: Callable[[str], object], path: PathKey, what: str) -> None:
        """Parse a condition or action on its own, as the rule loader will, so its errors are found here too."""
        start = self.scalars[path][0]
        try:
            parse(self.text[start:self.scalars[path][-1]])
        except ConditionSyntaxError as e:
            self.error(f"{what}: {e.message}", start + e.offset, e.hint)


def _start(item: Tree | Token) -> int:
    return _position(item) if isinstance(item, Token) else item.meta.start_pos


def _token(item: Tree | Token) -> Token:
    """A child the grammar makes a token (a keyword, a NAME, a STRING, a NUMBER)."""
    assert isinstance(item, Token), item
    return item
