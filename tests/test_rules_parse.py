"""Condition grammar: AST shapes, precedence, spans, friendly located errors, and robustness to junk."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import RuleError
from gavel.rules import KNOWN_MISTAKES, AllOf, And, ConditionSyntaxError, KOf, Name, Or, Span, parse_condition, walk
from gavel.rules import parser as parser_module


def test_atoms():
    assert parse_condition("tax_threat") == Name("tax_threat", Span(0, 10))
    assert parse_condition("all of g") == AllOf("g", Span(0, 8))
    assert parse_condition("  12 of grp") == KOf(12, "grp", Span(2, 11))


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
    text = "android or order and allx and ofs and nota"
    assert str(parse_condition(text)) == text
    for word in ("and", "or", "of", "all"):
        with pytest.raises(ConditionSyntaxError):
            parse_condition(word)


@pytest.mark.parametrize("text", ["not x", "a and not b", "(not (a))", "x or\n  not y"])
def test_not_is_rejected_with_location(text):
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(text)
    err = info.value
    assert "negation" in str(err) and "not supported" in str(err)
    assert text[err.offset:err.offset + 3] == "not"
    line, column = err.location.line, err.location.column
    assert text.splitlines()[line - 1][column - 1:column + 2] == "not"


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
    assert err.message == "unexpected `&`; expected a group or CE name, a number, `all` or `(`"
    assert err.excerpt == "tax and && threat\n        ^"
    assert err.hint == "use `and` instead of `&&`"


def test_error_at_end_of_a_multiline_condition():
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("a and\n  2 of   \n")
    err = info.value
    assert (err.location.line, err.location.column) == (2, 7)
    assert "expected a group name" in err.message


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
        assert parser_module._lark().parse("a and b")
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


_TOKENS = ["a", "b", "grp", "and", "or", "not", "all", "of", "2", "0", "(", ")", "&&", "||", "!", "-", " ", "\n",
           "AND", "é", "\t", "1.5", ",", "\"", "'"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map(" ".join) | st.text(max_size=30))
def test_junk_only_ever_raises_rule_error(text):
    try:
        parse_condition(text)
    except RuleError as err:
        assert err.location is not None and err.location.line >= 1 and err.location.column >= 1
        assert "^" in (err.excerpt or "")


_VALID = ["a or b and c", "(all of g or 2 of h) and x", "k and (a or (b and c))", "3 of grp_1 or all of g"]


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
