"""The .gvl rule-pack syntax: the same pack as YAML, exact positions, located errors with hints, several errors
at once, robustness to junk and mutations, and `gavel rules fmt` on .gvl files."""
import re
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark import Lark
from typer.testing import CliRunner

import gavel.rules.gvl as gvl_module
from gavel.cli.rules import rules_app
from gavel.errors import RuleError
from gavel.rules import load_rules, parse_condition
from gavel.rules.fmt import canonical, format_paths
from gavel.rules.gvl import parse_gvl, read_gvl
from gavel.rules.parser import parse_action
from gavel.rules.source import RuleErrors

EXAMPLES = paths.REPO / "examples" / "rules"


def gvl(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors_of(text: str) -> list[RuleError]:
    with pytest.raises(RuleErrors) as info:
        parse_gvl(text, "pack.gvl")
    return list(info.value.errors)


def at(text: str, needle: str, nth: int = 0) -> int:
    """Index of the nth occurrence of `needle` in `text`."""
    i = -1
    for _ in range(nth + 1):
        i = text.index(needle, i + 1)
    return i


# --- the same pack as YAML ----------------------------------------------------------------------------------------

def test_the_example_pack_reads_as_its_yaml_twin():
    doc = read_gvl(EXAMPLES / "safety.gvl")
    assert doc.data == yaml.safe_load((EXAMPLES / "yaml" / "safety.yaml").read_text())
    assert doc.data["rules"][1]["exceptions"] == [
        {"name": "refused", "condition": "refusal in response", "reason": "the model already refused"}]
    assert doc.data["params"] == {"harm_threshold": 0.8, "burst": 3} and isinstance(doc.data["params"]["burst"], int)


def test_the_example_packs_load_to_equal_rules():
    from_gvl, from_yaml = load_rules(EXAMPLES / "safety.gvl"), load_rules(EXAMPLES / "yaml" / "safety.yaml")
    assert [r.name for r in from_gvl] == ["stop_harmful_answer", "roleplay_jailbreak", "pressure", "alarming_burst"]
    assert [r.model_dump() for r in from_gvl] == [r.model_dump() for r in from_yaml]
    assert from_gvl[0].pack.spec == from_yaml[0].pack.spec
    assert [str(r.expr) for r in from_gvl] == [str(r.expr) for r in from_yaml]  # params bound alike
    assert str(from_gvl[3].expr) == "pressure and not harmful"


def test_the_module_docstring_example_parses():
    example = re.search(r"\n\n(    pack .*\n    }\n)", gvl_module.__doc__, re.S).group(1)
    data = parse_gvl(textwrap.dedent(example)).data
    assert data["rules"][0]["exceptions"][0] == {"name": "fiction", "condition": "fiction_context",
                                                  "reason": "a story, not a request"}
    assert data["rules"][1] == {"name": "helper_x", "private": True,
                                "condition": "count(urgency) >= 3 within 20 tokens"}
    assert data["tests"][0]["expect"] == {"weapons_help": {"fires": True}}


def test_every_field_and_statement():
    text = gvl('''
        pack p
        requires bank "b-1"
        requires model "m"
        requires ces [a, b,]
        param neg = -2.5
        list l = []
        rule r {
            title "T \\"q\\" \\\\ \\n"
            description "D"
            author "A"
            definition "Def"
            public_id "rule_0123456789abcdef0123456789abcdef"
            level informational
            status "test"
            match token
            tags [x, "y.z"]
            references ["https://example.org"]
            falsepositives []
            categories ["Security & Defense"]
            requires ces [a]
            requires bank "rb"
            when a
            unless e1: b
            unless e2: c "why"
            action rotate(plane="refusal", angle=-30)
        }
        test t { name2 "x" n -1 b false c [true, {k: "v", "q r": 1.5}] }
        ''')
    data = parse_gvl(text).data
    assert data == {
        "pack": "p", "requires": {"bank": "b-1", "model": "m", "ces": ["a", "b"]}, "params": {"neg": -2.5},
        "lists": {"l": []},
        "rules": [{"name": "r", "title": 'T "q" \\ \n', "description": "D", "author": "A", "definition": "Def",
                   "public_id": "rule_0123456789abcdef0123456789abcdef", "level": "informational", "status": "test",
                   "match": "token", "tags": ["x", "y.z"], "references": ["https://example.org"],
                   "falsepositives": [], "categories": ["Security & Defense"],
                   "requires": {"ces": ["a"], "bank": "rb"}, "condition": "a",
                   "exceptions": [{"name": "e1", "condition": "b"}, {"name": "e2", "condition": "c", "reason": "why"}],
                   "action": 'rotate(plane="refusal", angle=-30)'}],
        "tests": [{"name": "t", "name2": "x", "n": -1, "b": False, "c": [True, {"k": "v", "q r": 1.5}]}]}


def test_file_keywords_stay_names_inside_conditions():
    text = gvl('''
        macro m = title or model or rule
        rule r {
            when title and list and model
            match token
            unless test: action or pack
        }
        ''')
    data = parse_gvl(text).data
    assert data["macros"] == {"m": "title or model or rule"}
    assert data["rules"][0]["condition"] == "title and list and model"
    assert data["rules"][0]["match"] == "token"
    assert data["rules"][0]["exceptions"] == [{"name": "test", "condition": "action or pack"}]


def test_the_grammar_is_conflict_free_under_strict_lalr():
    Lark.open("grammar.lark", rel_to=gvl_module.__file__, parser="lalr", lexer="contextual", start="gvl", strict=True)
    Lark.open("grammar.lark", rel_to=gvl_module.__file__, parser="lalr", lexer="basic", start=["start", "action"],
              strict=True)


# --- positions ----------------------------------------------------------------------------------------------------

POSITIONS = gvl('''
    pack p  # comment
    param t = 0.5
    rule r {
        title "T"
        group g = [a, b]
        when (g > ${t}   # a comment inside
              and c)
        unless x: d "because"
        action block "no"
    }
    ''')


def test_values_and_keys_point_at_each_field():
    doc = parse_gvl(POSITIONS)
    expect_values = {("pack",): "p  #", ("params", "t"): "0.5", ("rules", 0): "rule r", ("rules", 0, "name"): "r {",
                     ("rules", 0, "title"): '"T"', ("rules", 0, "groups", "g"): "[a, b]",
                     ("rules", 0, "groups", "g", 1): "b]", ("rules", 0, "condition"): "(g >",
                     ("rules", 0, "exceptions", 0, "reason"): '"because"', ("rules", 0, "action"): 'block "no"'}
    for path, starts in expect_values.items():
        assert POSITIONS[doc.values[path]:].startswith(starts), path
    expect_keys = {("pack",): "pack p", ("params", "t"): "t =", ("rules", 0, "title"): 'title "T"',
                   ("rules", 0, "groups", "g"): "g = [", ("rules", 0, "condition"): "when (",
                   ("rules", 0, "exceptions", 0, "name"): "x: d"}
    for path, starts in expect_keys.items():
        assert POSITIONS[doc.keys[path]:].startswith(starts), path


def test_scalars_map_every_character_of_conditions_and_actions():
    doc = parse_gvl(POSITIONS)
    assert set(doc.scalars) == {("rules", 0, "condition"), ("rules", 0, "exceptions", 0, "condition"),
                                ("rules", 0, "action")}
    condition = doc.data["rules"][0]["condition"]
    assert condition == "(g > ${t}   # a comment inside\n          and c)"
    for path, chars in doc.scalars.items():
        value = doc.data["rules"][0]["action"] if path[-1] == "action" else (
            doc.data["rules"][0]["condition"] if len(path) == 3 else doc.data["rules"][0]["exceptions"][0]["condition"])
        assert len(chars) == len(value) + 1
        assert "".join(POSITIONS[i] for i in chars[:-1]) == value


def test_errors_found_after_loading_point_into_the_gvl_file(tmp_path):
    path = tmp_path / "pack.gvl"
    path.write_text(POSITIONS)
    (rule,) = load_rules(path, params={"t": 0.25})
    offset = rule.condition.index("and c") + 4  # the `c` on the condition's second line
    location = rule.condition_location(offset)
    assert (location.path, location.line, location.column) == (str(path), 7, 15)
    assert rule.condition_excerpt(offset) == "          and c)\n              ^"
    assert rule.exceptions[0].location(0).line == 8 and rule.exceptions[0].location(0).column == 15
    assert str(rule.expr) == "g > 0.25 and c"


def test_a_condition_error_is_reported_at_its_character(tmp_path):
    path = tmp_path / "pack.gvl"
    text = "rule r {\n    when a and\n         count(b) > 1 in usr\n}\n"
    path.write_text(text)
    with pytest.raises(RuleErrors) as info:
        load_rules(path)
    (error,) = info.value.errors
    assert (error.location.line, error.location.column) == (3, len("         count(b) > 1 in ") + 1)
    assert error.message == "rule 'r': unknown scope 'usr'" and error.hint == "did you mean 'user'?"


# --- syntax errors ------------------------------------------------------------------------------------------------

ERRORS = [  # source, (line, column), start of the message, hint (None: none)
    ('rule a {\n    titel "x"\n    when b\n}\n', (2, 5), "unexpected `titel`; expected a rule field",
     "did you mean `title`?"),
    ("rul a { when b }\n", (1, 1), "unexpected `rul`; expected a statement", "did you mean `rule`?"),
    ("rule a {\n    when b and || c\n}\n", (2, 16), "unexpected `|`; expected a name", "use `or` instead of `||`"),
    ("rule a { when b c }\n", (1, 17), "unexpected `c`; expected `then`, `for`, `in`",
     "two conditions need `and` or `or` between them"),
    ("rule a { when b and }\n", (1, 21), "unexpected `}`", "`and` and `or` need a condition on both sides"),
    ("rule a {\n    when b\nrule c { when d }\n", (3, 1), "unexpected `rule`; expected a rule field",
     "the `rule` block above is not closed: add `}` before this statement"),
    ('rule a {\n    when b and\n    title "x"\n}\n', (3, 11), 'unexpected `"x"`; expected a rule field',
     "the condition before `title` is unfinished, so `title` was read as a name in it"),
    ("when b\n", (1, 1), "unexpected `when`", "`when` is a rule field: it goes inside `rule name { ... }`"),
    ('rule a { requires bnak "x" when b }', (1, 19), "unexpected `bnak`; expected `bank`, `ces` or `model`",
     "did you mean `bank`?"),
    ("rule a { title Weapons when b }", (1, 16), 'unexpected `Weapons`; expected a "quoted string"',
     'text is "quoted"'),
    ("rule a { unless b when c }", (1, 19), "unexpected `when`; expected `:`", "an exception is `unless name:"),
    ('rule a {\n  title "abc\n  when b\n}', (2, 9), 'unexpected `"`', "a string ends on the line it starts on"),
    ("macro m = a and", (1, 16), "unexpected end of file", "`and` and `or` need a condition on both sides"),
    ("macro m = any of\nrule r { when m }\n", (2, 1), "unexpected `rule`; expected a name or `(`",
     "a selector is `all of G`"),
    ("param p = x", (1, 11), "unexpected `x`; expected a number or `-`", None),
    ("rule a { when (b }", (1, 18), "unexpected `}`; expected `)`", "a `(` is never closed"),
    ('rule a { when b action block "x" "y" }', (1, 34), 'unexpected `"y"`', None),
    ("rule a { when b\n\x00 }", (2, 1), "unexpected character '\\x00'", None),
    ("rule a { when b }\nrule a2 {\n  when count(x) > 2 in usr\n}", (3, 24), "rule 'a2': unknown scope 'usr'",
     "did you mean 'user'?"),
    ('rule a { when b action blok "x" }', None, None, None),  # action names are checked when a monitor is built
    ('rule a { title "x" }', (1, 6), "rule 'a' has no `when` condition", "add a line `when <condition>`"),
    ('rule a { title "x" title "y" when b }', (1, 20), "`title` of rule 'a' is given twice (first on line 1)", None),
    ("rule a { group g = [a] group g = [c] when g }", (1, 30), "group 'g' of rule 'a' is given twice", None),
    ("pack p\npack q\n", (2, 1), "`pack` is given twice", None),
    ("param p = 1\nparam p = 2\n", (2, 7), "param 'p' is given twice", None),
    ("test t { x 1 x 2 }", (1, 14), "`x` of test 't' is given twice", None),
    ("test t { x " + "[" * 40 + "]" * 40 + " }", (1, 44), "values nest more than 32 levels deep", None),
    ("rule a { when " + "not " * 80 + "b }", (1, 15), "rule 'a': the condition nests more than 64",
     "split it into several rules"),
]


@pytest.mark.parametrize("source, where, message, hint", ERRORS)
def test_syntax_errors_are_located_with_a_hint(source, where, message, hint):
    if where is None:
        parse_gvl(source)
        return
    (error,) = errors_of(source)
    assert (error.location.path, error.location.line, error.location.column) == ("pack.gvl", *where)
    assert error.message.startswith(message), error.message
    assert (error.hint is None) if hint is None else error.hint.startswith(hint), error.hint
    shown, caret = error.excerpt.split("\n")
    line = source.splitlines()[where[0] - 1]
    cut = line.index(shown)  # long lines are shown around the caret
    assert caret == " " * (where[1] - 1 - cut) + "^"


def test_several_errors_are_reported_together():
    source = gvl('''
        pack safety
        macro risky = harmful or any of

        rule a {
            titel "Weapons help"
            when x
        }

        rule b {
            when a and || b
        }

        rul c { when x }

        rule d {
            when a
            severity high
            severity low
        }
        when x
        rule e { when count(x) > 3 in usr }
        ''')
    found = [(e.location.line, e.location.column, e.hint) for e in errors_of(source)]
    assert found == [
        (4, 1, "a selector is `all of G`, `any of G` or `k of G`, with G a group or a list `(a, b, ...)`"),
        (5, 5, "did you mean `title`?"),
        (10, 16, "use `or` instead of `||`"),
        (13, 1, "did you mean `rule`?"),
        (18, 5, None),
        (20, 1, "`when` is a rule field: it goes inside `rule name { ... }`"),
        (21, 31, "did you mean 'user'?"),
    ]


def test_an_unreadable_file_is_a_rule_error(tmp_path):
    with pytest.raises(RuleErrors, match=r"cannot read missing.gvl"):
        read_gvl(tmp_path / "missing.gvl")
    (tmp_path / "latin1.gvl").write_bytes(b'pack p "\xe9"\n')
    with pytest.raises(RuleErrors, match=r"cannot read latin1.gvl"):
        read_gvl(tmp_path / "latin1.gvl")


# --- robustness ---------------------------------------------------------------------------------------------------

EXAMPLE = (EXAMPLES / "safety.gvl").read_text()
PIECES = ["rule", "private", "macro", "param", "list", "pack", "test", "requires", "when", "unless", "action",
          "title", "group", "match", "token", "and", "or", "not", "all of", "2 of", "once", "then", "within", "in",
          "count(", "max(", "${p}", "{", "}", "[", "]", "(", ")", ",", ":", "=", ">", "-", '"', '"x"', "#", "\n", " ",
          "a", "b_1", "0.5", "3", "\\", "\x00", "é"]


def parses_or_rule_error(text: str) -> None:
    try:
        doc = parse_gvl(text)
    except RuleErrors as e:
        assert e.errors and all(isinstance(x, RuleError) and x.location.line >= 1 for x in e.errors)
        return
    for path, chars in doc.scalars.items():  # what parsed is a valid condition or action, mapped exactly
        value = text[chars[0]:chars[-1]]
        (parse_action if path[-1] == "action" else parse_condition)(value)
        assert len(chars) == len(value) + 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_only_rule_errors(text):
    parses_or_rule_error(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60).map(" ".join))
def test_random_token_soup_gives_only_rule_errors(text):
    parses_or_rule_error(text)


@st.composite
def mutations(draw) -> str:
    text = EXAMPLE
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 30)))
        text = text[:i] + draw(st.sampled_from(["", *PIECES])) + text[j:]
    return text


@settings(max_examples=200, deadline=None)
@given(mutations())
def test_mutated_packs_give_only_rule_errors(text):
    parses_or_rule_error(text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_packs_load_or_give_only_rule_errors(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pack.gvl"
        path.write_text(text, encoding="utf-8")
        try:
            load_rules(path)
        except RuleError:
            pass


# --- fmt ----------------------------------------------------------------------------------------------------------

MESSY = gvl('''
    # formatting rewrites conditions and actions; every other byte stays
    macro m = (a)   or   ((b))
    rule r {
        title   "keep   me"
        when a  and   x and (b and c)   # a comment after the condition stays
        unless e: ever  x "reason"
        action block   "no"
    }
    rule s {
        when a and  # a comment inside: left as is
             (b)
        action alert  "x  #1"
    }
    rule t {
        when a and
             (b)
    }
    ''')


def test_fmt_rewrites_conditions_and_actions_only(tmp_path):
    path = tmp_path / "pack.gvl"
    path.write_text(MESSY)
    (file,), errors = format_paths([path])
    assert errors == []
    assert [(e.rule, e.location.line, e.reason) for e in file.edits] == [
        ("macro m", 2, None), ("r", 5, None), ("r", 6, None), ("r", 7, None), ("s", 10, "has a comment inside"),
        ("s", 12, None), ("t", 15, None)]
    assert file.after == MESSY.replace("(a)   or   ((b))", "a or b").replace("a  and   x and (b and c)",
                                                                                "a and x and b and c") \
        .replace("ever  x", "once x").replace('block   "no"', 'block "no"').replace('alert  "x  #1"', 'alert "x  #1"') \
        .replace("when a and\n         (b)\n}", "when a and b\n}")
    file.write()
    files, errors = format_paths([path])  # idempotent: only the condition with a comment is left to rewrite
    assert errors == [] and not any(f.changed for f in files)
    assert [(e.rule, e.reason) for f in files for e in f.edits] == [("s", "has a comment inside")]


def test_fmt_rewrites_macros_and_exceptions_of_yaml_packs_too(tmp_path):
    path = tmp_path / "pack.yaml"
    path.write_text(gvl('''
        macros:
          m: (a)  or  b   # kept
        rules:
          - name: r
            condition: m and (c)
            exceptions:
              - {name: e, condition: ever  d, reason: why}
        '''))
    (file,), errors = format_paths([path])
    assert errors == [] and [(e.rule, e.location.line) for e in file.edits] == [("macro m", 2), ("r", 5), ("r", 7)]
    assert file.after == gvl('''
        macros:
          m: a or b   # kept
        rules:
          - name: r
            condition: m and c
            exceptions:
              - {name: e, condition: once d, reason: why}
        ''')


def test_fmt_cli_checks_and_writes_gvl(tmp_path):
    path = tmp_path / "pack.gvl"
    path.write_text("rule r { when (a) }\n")
    runner = CliRunner()
    result = runner.invoke(rules_app, ["fmt", str(path), "--check"])
    assert result.exit_code == 1 and f"would reformat {path}" in result.output
    assert runner.invoke(rules_app, ["fmt", str(path)]).exit_code == 0
    assert path.read_text() == "rule r { when a }\n"
    assert runner.invoke(rules_app, ["fmt", str(path), "--check"]).exit_code == 0


def test_fmt_leaves_broken_gvl_files_alone(tmp_path):
    path = tmp_path / "pack.gvl"
    path.write_text("rule r { when (a) }\nrule s { when b and }\n")
    files, errors = format_paths([path])
    assert files == [] and errors[0].location.line == 2
    assert path.read_text() == "rule r { when (a) }\nrule s { when b and }\n"


_LEAF = st.sampled_from(["a", "b_1", "title", "all of g", "2 of g", "c > 0.5", "once d", "e in user"])
_TREE = st.recursive(_LEAF, lambda kids: st.tuples(st.sampled_from(["and", "or", "not"]),
                                                   st.lists(kids, min_size=2, max_size=3)), max_leaves=8)


def render(tree, draw) -> str:
    """Condition text for `tree` with random blanks (line breaks too) and redundant parentheses."""
    gap = lambda: draw(st.sampled_from([" ", "  ", "\n      ", "\t"]))  # noqa: E731
    if isinstance(tree, str):
        text = tree.replace(" ", gap())
    elif tree[0] == "not":
        text = f"not{gap()}({render(tree[1][0], draw)})"
    else:
        text = f"{gap()}{tree[0]}{gap()}".join(f"({render(t, draw)})" for t in tree[1])
    return f"({gap()}{text}{gap()})" if draw(st.booleans()) else text


@settings(max_examples=40, deadline=None)
@given(st.lists(_TREE, min_size=1, max_size=3), st.data())
def test_fmt_of_gvl_is_idempotent_and_keeps_meaning(trees, data):
    conditions = [render(tree, data.draw) for tree in trees]
    text = "# keep\nlist g = [a, b, c]\n" + "".join(
        f"rule r{i} {{  # keep {i}\n    when {c}\n    action  alert\n}}\n" for i, c in enumerate(conditions))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pack.gvl"
        path.write_text(text)
        for file in format_paths([path])[0]:
            file.write()
        once = path.read_text()
        assert format_paths([path]) == ([], [])
        doc = read_gvl(path)
        assert [r["condition"] for r in doc.data["rules"]] == [canonical(c) for c in conditions]
        assert [r["action"] for r in doc.data["rules"]] == ["alert"] * len(conditions)
        assert re.sub(r"when [^\n]*|action [^\n]*", "", once) == re.sub(r"when (.|\n)*?(?=\n    action )|action [^\n]*",
                                                                        "", text)
