"""Parse condition strings into the AST, with friendly, located syntax errors."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from gavel.errors import Location, RuleError, did_you_mean, excerpt, line_column
from gavel.rules.ast import (
    FUNCTIONS,
    SCOPES,
    Action,
    Aggregate,
    And,
    Compare,
    Comparison,
    Expr,
    Name,
    Not,
    Number,
    Once,
    Or,
    Param,
    Scoped,
    Select,
    Span,
    Sustained,
    Then,
    depth,
)

_GRAMMAR = Path(__file__).with_name("grammar.lark")

MAX_DEPTH = 64  # nesting levels; keeps every tree walk far from Python's recursion limit

KNOWN_MISTAKES: dict[str, tuple[str, ...]] = {
    "use `and` instead of `&&`": ("a && b", "a & b"),
    "use `or` instead of `||`": ("a || b", "a | b"),
    "use `not` instead of `!`": ("!a", "a and !b"),
    "two conditions need `and` or `or` between them": ("a b", "all of g h", "(a) (b)", "a (b)"),
    "operators are lowercase: `and`, `or`, `not`": ("a AND b", "a OR b"),
    "a selector is `all of G`, `any of G` or `k of G`, with G a group or a list `(a, b, ...)`": (
        "all", "all g", "2", "2 g", "all of", "2 of", "2 of 3", "all of all", "any", "any of"),
    "`and` and `or` need a condition on both sides": (
        "a and", "a or", "and a", "or a", "a and or b", "a or and b", "a and )"),
    "`then`, `once` and `for` take a name, a comparison, a selector or a parenthesised condition: "
    "add parentheses, as in `(a then b within 5) then c within 9`": (
        "a then b then c", "once a then b", "a then once b", "once once a", "a for 3 tokens for 2", "once not a"),
    "a window is a whole number of tokens, as in `within 5 tokens`": (
        "a then b within", "a for", "a for tokens", "once a within", "count(a) > 1 within"),
    "compare a function's value, as in `count(a) >= 2 within 10 tokens` or `max(a) over 8 tokens > 0.9`": (
        "max(a) over 8 tokens", "count(a) within 5 tokens"),
    "a comparison is `name > number`, as in `harmful > 0.8`": ("a >", "a > b", "a => 0.5", "0.5 < a"),
    "`in` takes a scope: prompt, response, user, assistant, system or conversation": ("a in", "a in (b)"),
    "a `(` is never closed": ("(a", "(a and b", "((a) or b"),
    "a `)` has no matching `(`": (")", "a)", "(a))"),
    "empty parentheses": ("()",),
    "the condition is empty": ("",),
    "names contain only letters, digits, `_` and the wildcard `*`": ("making-threat",),
}

_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "PARAM": "a `${parameter}`", "ALL": "`all`", "ANY": "`any`",
    "_OF": "`of`", "_NOT": "`not`", "_ONCE": "`once`", "_EVER": "`ever`", "_THEN": "`then`", "_WITHIN": "`within`",
    "_FOR": "`for`", "_OVER": "`over`", "_IN": "`in`", "_TOKENS": "`tokens`", "CMP": "a comparison (`>`, `>=`, ...)",
    "STRING": "a \"quoted string\"", "_EQ": "`=`", "_MINUS": "`-`", "_LPAR": "`(`", "_RPAR": "`)`", "_COMMA": "`,`",
    "_AND": "`and`", "_OR": "`or`", "$END": "end of condition",
}
class ConditionSyntaxError(RuleError):
    """A condition that does not parse; `offset` is the character index in `condition`."""

    def __init__(self, message: str, *, condition: str, offset: int, hint: str | None = None) -> None:
        line, column = line_column(condition, offset)
        super().__init__(message, location=Location(None, line, column),
                         excerpt=excerpt(condition, offset), hint=hint)
        self.condition = condition
        self.offset = offset


def _cache_option() -> str | Literal[False]:
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
    return Lark.open(str(_GRAMMAR.name), rel_to=__file__, parser="lalr", lexer="basic", start=["start", "action"],
                     strict=importlib.util.find_spec("interegular") is not None,
                     propagate_positions=True, cache=_cache_option())


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> frozen AST nodes; checks what the grammar cannot (function names, scopes, whole numbers)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def _fail(self, message: str, offset: int, hint: str | None = None) -> ConditionSyntaxError:
        return ConditionSyntaxError(message, condition=self._text, offset=offset, hint=hint)

    def or_expr(self, meta, terms) -> Or:
        return Or(tuple(terms), _span(meta))

    def and_expr(self, meta, terms) -> And:
        return And(tuple(terms), _span(meta))

    def negation(self, meta, children) -> Not:
        return Not(children[0], _span(meta))

    def name(self, meta, children) -> Name:
        return Name(str(children[0]), _span(meta))

    def compare(self, meta, children) -> Compare:
        return Compare(str(children[0]), _comparison(children[1]), children[2], _span(meta))

    def number(self, meta, children) -> Number:
        token = children[0]
        if token.type == "NUMBER":
            return _to_number(token)
        name, _, default = str(token)[2:-1].partition(":")
        return Param(name, float(default) if default else None, _span(meta))

    def window(self, meta, children) -> Number:
        n = children[0]
        if not isinstance(n, Param) and (not isinstance(n, int) or n < 1):
            raise self._fail(f"a window is a whole number of tokens >= 1, not {n}", meta.start_pos)
        return n

    def quantifier(self, meta, children) -> str | Number:
        q = children[0]
        if isinstance(q, Token):
            return str(q)
        if not isinstance(q, (int, Param)):
            raise self._fail(f"`k of` needs a whole number k, not {q}", meta.start_pos)
        return q

    def select_group(self, meta, children) -> Select:
        return Select(children[0], str(children[1]), (), _span(meta))

    def select_list(self, meta, children) -> Select:
        return Select(children[0], None, tuple(children[1:]), _span(meta))

    def scoped(self, meta, children) -> Scoped:
        return Scoped(children[0], self._scope(children[1]), _span(meta))

    def _scope(self, token: Token) -> str:
        if token not in SCOPES:
            guess = did_you_mean(str(token), list(SCOPES))
            raise self._fail(f"unknown scope '{token}'", _position(token),
                             hint=f"did you mean '{guess}'?" if guess else f"scopes: {', '.join(SCOPES)}")
        return str(token)

    def once(self, meta, children) -> Once:
        return Once(children[0], children[1] if len(children) > 1 else None, _span(meta))

    def then(self, meta, children) -> Then:
        return Then(children[0], children[1], children[2] if len(children) > 2 else None, _span(meta))

    def sustained(self, meta, children) -> Sustained:
        return Sustained(children[0], children[1], _span(meta))

    def aggregate(self, meta, children) -> Expr:
        function, arg, *rest = children
        cmp = next(i for i, c in enumerate(rest) if isinstance(c, Token) and c.type == "CMP")
        windows = [c for c in rest[:cmp] + rest[cmp + 2:] if not isinstance(c, Token)]
        scope = next((c for c in rest[cmp + 2:] if isinstance(c, Token)), None)
        if function not in FUNCTIONS:
            self._check_plugin(function, arg, windows, rest[cmp], rest[cmp + 1])
        if len(windows) > 1:
            raise self._fail("give the window once: `over N tokens` before the comparison or `within N tokens` "
                             "after it", meta.start_pos)
        if function != "count" and not isinstance(arg, Name):
            raise self._fail(f"`{function}` takes a CE or group name (the score it aggregates), not a condition",
                             arg.span.start, hint="use `count(condition)` to count the tokens where it holds")
        value = rest[cmp + 1]
        if function in FUNCTIONS and isinstance(value, (int, float)) and value < 0:
            what = "a number of tokens" if function == "count" else "CE scores, probabilities in [0, 1]"
            raise self._fail(f"`{function}` reads {what}: a negative threshold ({value}) decides nothing",
                             rest[cmp].start_pos, hint="negative thresholds are for plugin score functions, "
                                                       "such as a slope")
        if function == "count" and not isinstance(value, (int, Param)):
            raise self._fail(f"`count` compares with a whole number, not {value}", meta.start_pos)
        node = Aggregate(str(function), arg, windows[0] if windows else None, _comparison(rest[cmp]), value,
                         _span(meta))
        return Scoped(node, self._scope(scope), _span(meta)) if scope is not None else node

    def _check_plugin(self, function: Token, arg: Expr, windows: list, op: Token, value: Number) -> None:
        """A function that is not built in must be a registered score function, given a window."""
        plugins = _plugin_functions()
        if function not in plugins:
            guess = did_you_mean(str(function), [*FUNCTIONS, *plugins])
            listed = f"functions: {', '.join(FUNCTIONS)}" + (f"; from plugins: {', '.join(plugins)}" if plugins else "")
            raise self._fail(f"unknown function '{function}'", _position(function),
                             hint=f"did you mean '{guess}'?" if guess else listed)
        if not windows:
            raise self._fail(f"`{function}` is a plugin function and needs a window", _position(op),
                             hint=f"plugin functions need a window: `{function}({arg}) over N tokens {op} {value}`")

    def action_text(self, meta, children) -> Action:
        text = _unquote(children[1]) if len(children) > 1 else None
        return Action(str(children[0]), text, (), _span(meta))

    def action_call(self, meta, children) -> Action:
        args = tuple(children[1:])
        keys = [k for k, _ in args]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise self._fail(f"argument '{key}' is given twice", meta.start_pos)
        return Action(str(children[0]), None, args, _span(meta))

    def action_phrase(self, meta, children) -> Action:
        """`rotate refusal by 60 at layers 2..5 for 8 tokens` -> rotate(plane="refusal", angle=60, layers="2-5",
        duration=8): the artifact and the amount go to the action's first two required arguments."""
        name, artifact, *rest = children
        known, plugin = _action_plugin(str(name))
        if getattr(plugin, "takes_text", False):
            raise self._fail(f"action '{name}' takes its text in double quotes", artifact.start_pos,
                             hint=f'write {name} "{artifact} ..."')
        fields = _phrase_fields(plugin)
        if fields is None:
            guess = did_you_mean(str(name), known)
            raise self._fail(f"action '{name}' has no phrase form" if name in known else f"unknown action '{name}'",
                             name.start_pos, hint=f"did you mean '{guess}'?" if guess and name not in known else
                             "the phrase form (`rotate refusal by 60`) is for actions whose first arguments are an "
                             "artifact and an amount; write the others as `name` or `name(key=value, ...)`")
        args: list[tuple[str, str | Number]] = [(fields[0], str(artifact))]
        rest = list(rest)
        if rest and isinstance(rest[0], Token) and rest[0].type == "NAME" and rest[0] != "at":
            word, amount = rest.pop(0), rest.pop(0)
            self._expect(word, "by")
            if len(fields) < 2:
                raise self._fail(f"action '{name}' takes no amount", word.start_pos, hint=f"write `{name} {artifact}`")
            args.append((fields[1], self._amount(meta, amount)))
        if rest and isinstance(rest[0], Token) and rest[0].type == "NAME":
            at, layers, span = rest.pop(0), rest.pop(0), rest.pop(0)
            self._expect(at, "at")
            self._expect(layers, "layers")
            args.append(("layers", span))
        if rest:
            args.append(("duration", int(rest[0])))
        return Action(str(name), None, tuple(args), _span(meta))

    def span(self, meta, children) -> str:
        return "-".join(str(c) for c in children)

    def _expect(self, token: Token, word: str) -> None:
        if str(token) != word:
            raise self._fail(f"expected `{word}`, not '{token}'", _position(token),
                             hint="the phrase form reads `ACTION ARTIFACT by AMOUNT at layers L..M for N tokens`")

    def _amount(self, meta, value) -> Number:
        if isinstance(value, Token):
            return _to_number(value) if value.type == "NUMBER" else self.number(meta, [value])
        return value

    def argument(self, meta, children) -> tuple[str, str | Number]:
        value = children[1]
        if isinstance(value, Token):
            literal: dict[str, Callable[[Token], str | Number]] = {
                "STRING": _unquote, "NUMBER": _to_number, "NAME": str, "PARAM": lambda t: self.number(meta, [t])}
            value = literal[value.type](value)
        return (str(children[0]), value)

    def negative(self, meta, children) -> Number:
        return -_to_number(children[0])


def _plugin_functions() -> list[str]:
    """The score functions plugins register, sorted; the registry (and with it every plugin) is only loaded when a
    condition names a function that is not built in."""
    from gavel.plugins.registry import registry

    return sorted(registry().plugins["functions"])


def _position(token: Token) -> int:
    """Where a token of the parsed text starts (Lark types `start_pos` as optional; its lexers always set it)."""
    assert token.start_pos is not None
    return token.start_pos


def _comparison(token: Token) -> Comparison:
    """The operator a CMP token holds (the grammar admits only the `Comparison`s)."""
    op = next((c for c in get_args(Comparison) if c == token), None)
    if op is None:
        raise ValueError(f"not a comparison operator: {token!r}")
    return op


def _to_number(token: Token) -> int | float:
    return int(token) if token.isdigit() else float(token)


def _unquote(token: Token) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), str(token)[1:-1])


def _action_plugin(action: str) -> tuple[list[str], object | None]:
    """The registered action names and `action`'s plugin (None if unknown); the registry is loaded only when a rule
    writes an action in the phrase form."""
    from gavel.plugins.registry import registry

    actions = registry().plugins["actions"]
    return sorted(actions), actions.get(action)


def _phrase_fields(plugin: object | None) -> list[str] | None:
    """The plugin's required arguments in order when the phrase form fits it: one or two (an artifact, an amount)."""
    params = getattr(plugin, "params", None)
    required = [f for f, info in params.model_fields.items() if info.is_required()] if params is not None else []
    return required if 1 <= len(required) <= 2 else None


def _span(meta) -> Span:
    return Span(meta.start_pos, meta.end_pos)


def _char_position(err: UnexpectedCharacters) -> int:
    """Where the unexpected character is: Lark sets `pos_in_stream` to its int index, but declares it
    `pos_in_stream = None` on UnexpectedInput, so its type is None (a wrong annotation in lark.exceptions)."""
    return err.pos_in_stream  # type: ignore[return-value]


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
                _lark().parse(example, start="start")
            except UnexpectedInput as err:
                sig = _signature(err)
                table.setdefault(sig, label)
                if isinstance(err, UnexpectedToken):
                    table.setdefault((*sig, str(err.token)), label)
    return table


def _expected(text: str, err: UnexpectedInput, start: str) -> set[str]:
    """The terminals the parser would have accepted where the error is."""
    if isinstance(err, UnexpectedToken):
        return set(err.accepts or err.expected)
    interactive = _lark().parse_interactive(text[:err.pos_in_stream], start=start)
    interactive.exhaust_lexer()
    return set(interactive.accepts())


def _syntax_error(text: str, err: UnexpectedInput, start: str = "start") -> ConditionSyntaxError:
    """Turn a Lark error into a located ConditionSyntaxError saying what was found and expected."""
    if isinstance(err, UnexpectedToken) and err.token.type == "$END":
        offset, found = len(text.rstrip()), "end of condition"
    elif isinstance(err, UnexpectedToken):
        offset, found = err.token.start_pos, f"`{err.token}`"
    else:
        assert isinstance(err, UnexpectedCharacters)   # the basic lexer's; the parser's are UnexpectedTokens
        offset, found = _char_position(err), f"`{err.char}`"
    accepted = _expected(text, err, start)
    words = ["a group or CE name"] if accepted == {"NAME"} else [w for t, w in _WORDS.items() if t in accepted]
    expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    sig = _signature(err)
    token = [str(err.token)] if isinstance(err, UnexpectedToken) else []
    hint = (_mistakes().get((*sig, *token)) or _mistakes().get(sig)) if start == "start" else None
    return ConditionSyntaxError(f"unexpected {found}; expected {expected}",
                                condition=text, offset=offset, hint=hint)


@functools.lru_cache(maxsize=4096)
def parse_condition(text: str) -> Expr:
    """Parse one condition; raises ConditionSyntaxError (a RuleError) with condition-relative positions."""
    try:
        tree = _lark().parse(text, start="start")
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


@functools.lru_cache(maxsize=1024)
def parse_action(text: str) -> Action:
    """Parse an action (`block "reply"`, `rotate(plane="refusal", angle=30)`); raises ConditionSyntaxError."""
    try:
        tree = _lark().parse(text, start="action")
    except UnexpectedInput as err:
        raise _syntax_error(text, err, start="action") from None
    try:
        return _ToAst(text).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, RuleError):
            raise err.orig_exc from None
        raise


def _too_deep(text: str) -> ConditionSyntaxError:
    return ConditionSyntaxError(f"the condition nests more than {MAX_DEPTH} levels deep", condition=text, offset=0,
                                hint="split it into several rules")
