"""Condition grammar: AST shapes, precedence, spans, friendly located errors, and robustness to junk."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import RuleError
from gavel.rules import (
    KNOWN_MISTAKES,
    Aggregate,
    And,
    Compare,
    ConditionSyntaxError,
    Name,
    Not,
    Once,
    Or,
    Scoped,
    Select,
    Span,
    Sustained,
    Then,
    bind_params,
    parse_condition,
    walk,
)
from gavel.rules import parser as parser_module
from gavel.rules.ast import params
from gavel.rules.parser import parse_action


def test_atoms():
    assert parse_condition("tax_threat") == Name("tax_threat", Span(0, 10))
    assert parse_condition("all of g") == Select("all", "g", (), Span(0, 8))
    assert parse_condition("  12 of grp") == Select(12, "grp", (), Span(2, 11))
    assert parse_condition("harm > 0.8") == Compare("harm", ">", 0.8, Span(0, 10))
    assert parse_condition("any of harm_*") == Select("any", "harm_*", (), Span(0, 13))


def test_every_operator_parses_to_its_node():
    a, b = Name("a", Span(0, 1)), Name("b", Span(0, 1))
    cases = {
        "not a": Not,
        "once a": Once, "ever a": Once, "once a within 5 tokens": Once,
        "a then b within 3 tokens": Then, "a then b": Then,
        "a for 4 tokens": Sustained,
        "count(a or b) >= 2 within 10 tokens": Aggregate, "count(a) over 10 tokens >= 2": Aggregate,
        "max(a) over 8 tokens > 0.9": Aggregate, "mean(a) < 0.2": Aggregate, "min(a) >= 0.1 within 3": Aggregate,
        "a in response": Scoped, "(a and b) in user": Scoped,
        "2 of (a, b > 0.5, once c)": Select,
    }
    for text, kind in cases.items():
        assert type(parse_condition(text)) is kind, text
    then = parse_condition("a then b within 3 tokens")
    assert (str(then.first), str(then.second), then.window) == (str(a), str(b), 3)
    count = parse_condition("count(a) over 10 tokens >= 2")
    assert (count.function, count.window, count.op, count.value) == ("count", 10, ">=", 2)
    scoped = parse_condition("max(a) over 8 tokens > 0.9 in response")
    assert isinstance(scoped, Scoped) and scoped.scope == "response" and scoped.term.window == 8


def test_precedence_of_not_temporal_and_scope():
    assert str(parse_condition("not a and b")) == "not a and b"
    assert isinstance(parse_condition("not a and b"), And)
    assert isinstance(parse_condition("not a then b"), Not)            # not binds the whole `then`
    assert isinstance(parse_condition("once a in user").term, Scoped)  # `in` binds tighter than `once`


def test_parameters_parse_and_bind():
    expr = parse_condition("a > ${thr:0.85} and count(b) >= ${k} within ${n:5} tokens")
    found = list(params(expr))
    assert [(p.name, p.default) for p in found] == [("thr", 0.85), ("k", None), ("n", 5.0)]
    bound = bind_params(expr, {"k": 2})
    assert str(bound) == "a > 0.85 and count(b) >= 2 within 5 tokens"
    with pytest.raises(KeyError, match="k"):
        bind_params(expr, {})


def test_actions_parse():
    assert str(parse_action('block "No."')) == 'block "No."'
    call = parse_action('rotate(plane="refusal", angle=-30)')
    assert (call.name, call.args) == ("rotate", (("plane", "refusal"), ("angle", -30)))
    assert parse_action('alert "a \\"quoted\\" {rule}"').text == 'a "quoted" {rule}'
    for bad in ("alert hi", "rotate(plane=)", "rotate(a=1, a=2)", 'block "x" "y"'):
        with pytest.raises(ConditionSyntaxError):
            parse_action(bad)


@pytest.mark.parametrize(("phrase", "call"), [
    ("rotate refusal by 60", 'rotate(plane="refusal", angle=60)'),
    ("rotate refusal by -30 at layers 2..5 for 8 tokens",
     'rotate(plane="refusal", angle=-30, layers="2-5", duration=8)'),
    ("add refusal by 0.5 at layers auto", 'add(vector="refusal", strength=0.5, layers="auto")'),
    ("ablate refusal at layers 3 for 1 token", 'ablate(direction="refusal", layers="3", duration=1)'),
    ("ablate refusal", 'ablate(direction="refusal")'),
])
def test_steering_actions_read_as_phrases(phrase, call):
    """`ACTION ARTIFACT by AMOUNT at layers L..M for N tokens` is the keyword call, argument for argument."""
    assert parse_action(phrase).args == parse_action(call).args and str(parse_action(phrase)) == call


@pytest.mark.parametrize(("text", "message", "hint"), [
    ("rotate refusal with 60", "expected `by`, not 'with'", "`ACTION ARTIFACT by AMOUNT at layers L..M for N tokens`"),
    ("ablate refusal by 3", "action 'ablate' takes no amount", "write `ablate refusal`"),
    ("rotat refusal by 3", "unknown action 'rotat'", "did you mean 'rotate'?"),
    ("log refusal", "action 'log' has no phrase form", "for actions whose first arguments are an artifact"),
    ("block sorry", "action 'block' takes its text in double quotes", 'write block "sorry ..."'),
])
def test_phrase_mistakes_are_explained(text, message, hint):
    with pytest.raises(ConditionSyntaxError) as caught:
        parse_action(text)
    assert message in caught.value.message and hint in caught.value.hint


@pytest.mark.parametrize(("text", "message", "hint"), [
    ("maxx(a) > 1", "unknown function 'maxx'", "did you mean 'max'?"),
    ("a in usr", "unknown scope 'usr'", "did you mean 'user'?"),
    ("count(a) > 0.5", "whole number", None),
    ("max(a and b) > 1", "takes a CE or group name", "use `count(condition)` to count the tokens where it holds"),
    ("a for 0 tokens", "whole number of tokens >= 1", None),
    ("1.5 of g", "whole number k", None),
    ("count(a) over 3 > 1 within 4", "give the window once", None),
])
def test_semantic_syntax_errors_are_located(text, message, hint):
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(text)
    assert message in info.value.message
    assert info.value.hint == hint or hint is None


def test_and_binds_tighter_than_or():
    expr = parse_condition("a or b and c")
    assert isinstance(expr, Or)
    assert [type(t) for t in expr.terms] == [Name, And]
    assert str(expr) == "a or b and c"


def test_parentheses_override_precedence():
    expr = parse_condition("(a or b) and c")
    assert isinstance(expr, And) and isinstance(expr.terms[0], Or)
    assert str(expr) == "(a or b) and c"


def test_chains_are_n_ary():
    expr = parse_condition("a and b and 2 of g")
    assert isinstance(expr, And) and len(expr.terms) == 3


def test_spans_point_into_the_text():
    text = "x or (all of g and\n  3 of h)"
    for node in walk(parse_condition(text)):
        assert str(parse_condition(text[node.span.start:node.span.end])) == str(node)


def test_keywords_are_reserved_but_prefixes_are_names():
    text = "android or order and allx and ofs and nota and onced and thence and format and inside"
    assert str(parse_condition(text)) == text
    for word in ("and", "or", "of", "all", "any", "not", "once", "then", "within", "for", "in"):
        with pytest.raises(ConditionSyntaxError):
            parse_condition(word)


@pytest.mark.parametrize(("label", "example"), [(label, ex) for label, exs in KNOWN_MISTAKES.items() for ex in exs])
def test_known_mistakes_table(label, example):
    """Every example of the table gets its own hint (the table is unambiguous)."""
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(example)
    assert info.value.hint == label


def test_error_says_what_was_expected_in_words_with_caret():
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("tax and && threat")
    err = info.value
    assert (err.location.line, err.location.column) == (1, 9)
    assert err.message.startswith("unexpected `&`; expected a name, a number")
    assert err.excerpt == "tax and && threat\n        ^"
    assert err.hint == "use `and` instead of `&&`"


def test_error_at_end_of_a_multiline_condition():
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("a and\n  2 of   \n")
    err = info.value
    assert (err.location.line, err.location.column) == (2, 7)
    assert "expected a name" in err.message


def test_unexpected_token_hint_for_other_text():
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("first and (second or) third")
    assert info.value.location.column == 21
    assert "`)`" in info.value.message


def test_nesting_is_bounded():
    def nested(levels: int) -> str:
        return "".join(f"(a{i} {'and' if i % 2 else 'or'} " for i in range(levels)) + "z" + ")" * levels

    assert str(parse_condition(nested(parser_module.MAX_DEPTH - 1))).startswith("a0 or")
    for text in (nested(parser_module.MAX_DEPTH), nested(5000), "not " * 5000 + "a"):
        with pytest.raises(ConditionSyntaxError, match="levels deep"):
            parse_condition(text)


def test_grammar_cache_file_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = parser_module._cache_option()
    assert path.startswith(str(tmp_path / "gavel")) and (tmp_path / "gavel").stat().st_mode & 0o077 == 0
    parser_module._lark.cache_clear()
    parser_module._mistakes.cache_clear()
    try:
        parser_module._lark()
        assert os.path.getsize(path) > 0
        parser_module._lark.cache_clear()
        assert parser_module._lark().parse("a and b", start="start")
    finally:
        parser_module._lark.cache_clear()
        parser_module._mistakes.cache_clear()


@pytest.mark.skipif(os.name != "posix" or os.getuid() == 0, reason="needs POSIX permissions that bind")
def test_grammar_cache_off_when_unwritable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("XDG_CACHE_HOME", str(locked))
    try:
        assert parser_module._cache_option() is False
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_grammar_cache_off_when_others_can_write(tmp_path, monkeypatch):
    (tmp_path / "gavel").mkdir()
    (tmp_path / "gavel").chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parser_module._cache_option() is False


_TOKENS = ["a", "b", "grp", "and", "or", "not", "all", "any", "of", "once", "then", "within", "for", "tokens", "in",
           "user", "count(", "max(", ">", ">=", "${t:0.5}", "${", "2", "0", "(", ")", "&&", "||", "!", "-", " ", "\n",
           "AND", "é", "\t", "1.5", ",", "\"", "'", "*", "#"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map(" ".join) | st.text(max_size=30))
def test_junk_only_ever_raises_rule_error(text):
    try:
        parse_condition(text)
    except RuleError as err:
        assert err.location is not None and err.location.line >= 1 and err.location.column >= 1
        assert "^" in (err.excerpt or "")


_VALID = ["a or b and c", "(all of g or 2 of h) and x", "k and (a or (b and c))", "3 of grp_1 or all of g",
          "not a and once b within 3 tokens", "a then b within 5 tokens", "count(a or b) >= 2 within 10 tokens",
          "max(x) over 8 tokens > ${t:0.9} in response", "2 of (a, b > 0.5, harm_*) and c for 3 tokens"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_VALID))
def test_canonical_text_reparses_to_itself(text):
    canonical = str(parse_condition(text))
    assert str(parse_condition(canonical)) == canonical


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["", *_TOKENS])), max_size=4))
def test_mutated_conditions_only_ever_raise_rule_error(text, edits):
    for pos, insert in edits:
        pos = pos % (len(text) + 1)
        text = text[:pos] + insert + text[pos + (1 if insert == "" or pos % 2 else 0):]
    try:
        parse_condition(text)
    except RuleError:
        pass
