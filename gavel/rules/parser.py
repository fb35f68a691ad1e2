"""Parse GAVEL condition strings into the AST, with friendly, located syntax errors."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from lark import Lark, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from gavel.errors import Location, RuleError
from gavel.rules.ast import AllOf, And, Expr, KOf, Name, Or, Span, depth

_GRAMMAR = Path(__file__).with_name("grammar.lark")

MAX_DEPTH = 64  # and/or nesting levels; keeps every tree walk far from Python's recursion limit
RESERVED = frozenset({"and", "or", "of", "all", "not"})
NEGATION = "negation (`not`) is not supported in GAVEL conditions"

KNOWN_MISTAKES: dict[str, tuple[str, ...]] = {
    NEGATION: ("not", "a and not", "a not b", "!a"),
    "use `and` instead of `&&`": ("a && b", "a & b"),
    "use `or` instead of `||`": ("a || b", "a | b"),
    "two conditions need `and` or `or` between them": ("a b", "all of g h", "(a) (b)", "a (b)"),
    "operators are lowercase: `and`, `or`": ("a AND b", "a OR b"),
    "a selector is `all of G` or `k of G`, with G a group name": (
        "all", "all g", "2", "2 g", "all of", "2 of", "all of (g)", "2 of 3", "all of all"),
    "only `all of G` and `k of G` are selectors; a bare group name already means any of its CEs": (
        "any of g",),
    "`and` and `or` need a condition on both sides": (
        "a and", "a or", "and a", "or a", "a and or b", "a or and b", "a and )"),
    "a `(` is never closed": ("(a", "(a and b", "((a) or b"),
    "a `)` has no matching `(`": (")", "a)", "(a))"),
    "empty parentheses": ("()",),
    "the condition is empty": ("",),
    "names contain only letters, digits and `_`": ("making-threat",),
}

_WORDS = {
    "NAME": "a group or CE name", "INT": "a number", "ALL": "`all`", "_OF": "`of`",
    "_LPAR": "`(`", "_RPAR": "`)`", "_AND": "`and`", "_OR": "`or`", "$END": "end of condition",
}


class ConditionSyntaxError(RuleError):
    """A condition that does not parse; `offset` is the character index in `condition`."""

    def __init__(self, message: str, *, condition: str, offset: int, hint: str | None = None) -> None:
        line, column = line_column(condition, offset)
        super().__init__(message, location=Location(None, line, column),
                         excerpt=excerpt(condition, offset), hint=hint)
        self.condition = condition
        self.offset = offset


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def excerpt(text: str, offset: int, width: int = 80) -> str:
    """The source line holding `offset`, with a caret under it (long lines are cut around it)."""
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    line = text[start:end if end >= 0 else len(text)]
    col = offset - start
    cut = max(0, col - width // 2)
    shown = line[cut:cut + width]
    return f"{shown}\n{' ' * (col - cut)}^"


def _cache_option() -> str | bool:
    """A cache file in a private, writable user directory, or False (Lark's /tmp cache is a shared pickle)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(root) / "gavel"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError:
        return False
    private = not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)
    if not (private and os.access(folder, os.W_OK | os.X_OK)):
        return False
    digest = hashlib.sha256(_GRAMMAR.read_bytes()).hexdigest()[:16]
    return str(folder / f"grammar-{digest}.lark-cache")


@functools.cache
def _lark() -> Lark:
    """The condition parser, built once (strict when interegular is installed: Lark needs it)."""
    return Lark.open(str(_GRAMMAR.name), rel_to=__file__, parser="lalr", lexer="basic",
                     strict=importlib.util.find_spec("interegular") is not None,
                     propagate_positions=True, cache=_cache_option())


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> frozen AST nodes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def or_expr(self, meta, terms) -> Or:
        return Or(tuple(terms), Span(meta.start_pos, meta.end_pos))

    def and_expr(self, meta, terms) -> And:
        return And(tuple(terms), Span(meta.start_pos, meta.end_pos))

    def all_of(self, meta, children) -> AllOf:
        return AllOf(str(children[1]), Span(meta.start_pos, meta.end_pos))

    def k_of(self, meta, children) -> KOf:
        return KOf(int(children[0]), str(children[1]), Span(meta.start_pos, meta.end_pos))

    def name(self, meta, children) -> Name:
        return Name(str(children[0]), Span(meta.start_pos, meta.end_pos))

    def negation(self, meta, children) -> Expr:
        raise ConditionSyntaxError("`not` is a reserved word", condition=self._text,
                                   offset=meta.start_pos, hint=NEGATION)


def _signature(err: UnexpectedInput) -> tuple[object, ...]:
    """What identifies an error for the known-mistakes table: the bad character, or parser state and token."""
    if isinstance(err, UnexpectedCharacters):
        return ("char", err.char)
    assert isinstance(err, UnexpectedToken)
    return ("token", err.state.position, err.token.type)


@functools.cache
def _mistakes() -> dict[tuple[object, ...], str]:
    """Known-mistake signatures -> hint; the first label listing a signature wins, exact token values first."""
    table: dict[tuple[object, ...], str] = {}
    for label, examples in KNOWN_MISTAKES.items():
        for example in examples:
            try:
                _lark().parse(example)
            except UnexpectedInput as err:
                sig = _signature(err)
                table.setdefault(sig, label)
                if isinstance(err, UnexpectedToken):
                    table.setdefault((*sig, str(err.token)), label)
    return table


def _expected(text: str, err: UnexpectedInput) -> set[str]:
    """The terminals the parser would have accepted where the error is."""
    if isinstance(err, UnexpectedToken):
        return set(err.accepts or err.expected)
    interactive = _lark().parse_interactive(text[:err.pos_in_stream])
    interactive.exhaust_lexer()
    return set(interactive.accepts())


def _syntax_error(text: str, err: UnexpectedInput) -> ConditionSyntaxError:
    """Turn a Lark error into a located ConditionSyntaxError saying what was found and expected."""
    if isinstance(err, UnexpectedToken) and err.token.type == "$END":
        offset, found = len(text.rstrip()), "end of condition"
    elif isinstance(err, UnexpectedToken):
        offset, found = err.token.start_pos, f"`{err.token}`"
    else:
        offset, found = err.pos_in_stream, f"`{err.char}`"
    accepted = _expected(text, err)
    words = ["a group name"] if accepted == {"NAME"} else [w for t, w in _WORDS.items() if t in accepted]
    expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    sig = _signature(err)
    token = [str(err.token)] if isinstance(err, UnexpectedToken) else []
    hint = _mistakes().get((*sig, *token)) or _mistakes().get(sig)
    return ConditionSyntaxError(f"unexpected {found}; expected {expected}",
                                condition=text, offset=offset, hint=hint)


@functools.lru_cache(maxsize=4096)
def parse_condition(text: str) -> Expr:
    """Parse one condition; raises ConditionSyntaxError (a RuleError) with condition-relative positions."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(text, err) from None
    try:
        expr = _ToAst(text).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, RuleError):
            raise err.orig_exc from None
        raise _too_deep(text) from None
    except RecursionError:
        raise _too_deep(text) from None
    if depth(expr) > MAX_DEPTH:
        raise _too_deep(text)
    return expr


def _too_deep(text: str) -> ConditionSyntaxError:
    return ConditionSyntaxError(f"the condition nests more than {MAX_DEPTH} levels deep", condition=text, offset=0,
                                hint="split it into several rules")
