"""GAVEL rule files: specs, the library/pack/ruleset loaders, located errors and the lints."""
import json
import textwrap
from pathlib import Path

import pytest
from helpers import paths
from pydantic import ValidationError

from gavel.errors import RuleError
from gavel.rules import RuleErrors, RuleSpec, Severity, collect_rules, lint, load_rule_file, load_rules
from gavel.rules.lint import DuplicateMemberIssue, KOutOfRangeIssue, PositionalGroupNameValidator, UnknownCEIssue

LIBRARY = paths.FIXTURES / "gavel_library"
LIBRARY_CES = sorted(p.name for p in (LIBRARY / "ces").iterdir())


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_gavel_library_loads_unchanged_and_lints_clean():
    rules = load_rules(LIBRARY)
    assert [r.name for r in rules] == ["authority_impersonation", "payment_pressure", "roleplay_weapons",
                                       "romance_baiting", "tax_scam"]
    tax = rules[-1]
    assert tax.title == "Tax Scam" and tax.schema_version == 1 and tax.categories == ("Security & Defense",)
    assert tax.provenance.created_by == "gavel" and tax.provenance.published_at == "2026-05-07T09:28:15Z"
    assert tax.unknown_fields == {} and tax.resolved_namespace == "gavel"
    assert tax.public_id.startswith("rule_") and len(tax.public_id) == 37
    assert tax.groups == {"tax_threat": ("tax", "making_threat")}
    assert (tax.action, tax.severity, tax.message, tax.reply) == ("log", "medium", None, None)
    assert lint(rules, ces=LIBRARY_CES) == []
    from gavel.rules import compile_rules

    compile_rules(rules, LIBRARY_CES)


def test_library_rule_tests_are_readable():
    for kind in ("positive", "negative"):
        data = json.loads((LIBRARY / "rules" / "tax_scam" / "tests" / f"{kind}.json").read_text())
        assert all({"role", "content"} <= set(turn) for conv in data["conversations"] for turn in conv)


def test_rulesets_resolve_against_the_library():
    assert [r.name for r in load_rules(LIBRARY / "rulesets" / "fraud.yaml")] == [
        "tax_scam", "payment_pressure", "authority_impersonation"]
    assert len(load_rule_file(LIBRARY / "rulesets" / "everything.yaml")) == 4
    # a rule reached twice from the same file is loaded once
    assert len(load_rules([LIBRARY, LIBRARY / "rulesets" / "fraud.yaml"])) == 5


def test_ruleset_elsewhere_needs_a_library(tmp_path):
    path = write(tmp_path, "mine.yaml", "{ruleset: mine, rules: [tax_scam, tax_scma]}")
    with pytest.raises(RuleErrors, match="no rule library found"):
        load_rules(path)
    rules, errors = collect_rules(path, library=LIBRARY)
    assert [r.name for r in rules] == ["tax_scam"]
    assert len(errors) == 1 and "unknown rule 'tax_scma'" in str(errors[0])
    assert errors[0].hint == "did you mean 'tax_scam'?"
    assert (errors[0].location.line, errors[0].location.column) == (1, 35)


def test_ruleset_can_name_its_library(tmp_path):
    path = write(tmp_path, "sets/mine.yaml", f"ruleset: mine\nlibrary: {LIBRARY}\nrules: [payment_pressure]\n")
    assert [r.name for r in load_rules(path)] == ["payment_pressure"]
    bad = write(tmp_path, "sets/bad.yaml", f"ruleset: bad\nlibary: {LIBRARY}\nrules: [payment_pressure]\n")
    errors = collect_rules(bad)[1]
    assert [e.hint for e in errors][:1] == ["did you mean 'library'?"] and errors[0].location.line == 2


def test_pack_with_actions():
    rules = load_rule_file(LIBRARY / "packs" / "guardrail.yaml")
    block, alert = rules
    assert (block.action, block.severity, block.reply) == ("block", "critical", "I can't help with that.")
    assert (alert.action, alert.message) == ("alert", "Payment demanded under pressure.")
    assert lint(rules, ces=LIBRARY_CES) == []


def test_spec_validation():
    with pytest.raises(ValidationError, match=r"extra_forbidden|Extra inputs"):
        RuleSpec(name="r", condition="a", colour="red")
    for bad in ({"name": "r", "condition": "a", "public_id": "rule_123"},
                {"name": "r", "condition": "a", "schema_version": 2},
                {"name": "r", "condition": "a", "action": "block it"},
                {"name": "r", "condition": "a", "reply": "no"},
                {"name": "r", "condition": "a", "groups": {"g": []}},
                {"name": "r", "condition": "a", "groups": {"and": ["x"]}},
                {"name": "bad name", "condition": "a"},
                {"name": "r", "condition": "a &&"}):
        with pytest.raises(ValidationError):
            RuleSpec(**bad)
    rule = RuleSpec(name="r", condition="a", action="block", reply="Sorry.")
    with pytest.raises(ValidationError):
        rule.name = "other"


def test_condition_error_is_located_in_the_yaml_file(tmp_path):
    path = write(tmp_path, "rules/scam/rule.yaml", """
        name: scam
        groups:
          tax_threat: [tax, making_threat]
        condition: tax_threat and || making_threat
        """)
    with pytest.raises(RuleErrors) as info:
        load_rules(tmp_path)
    (err,) = info.value.errors
    assert err.location.path == str(path)
    assert (err.location.line, err.location.column) == (4, 27)
    assert err.excerpt == "condition: tax_threat and || making_threat\n                          ^"
    assert err.hint == "use `or` instead of `||`"
    assert str(err).startswith(f"{path}:4:27: rule 'scam': unexpected `|`")


@pytest.mark.parametrize(("style", "line", "column"), [
    ('condition: "a and (b or || c)"', 1, 25),
    ("condition: 'a and (b or || c)'", 1, 25),
    ("condition: |\n  a and\n  (b or || c)", 3, 9),
    ("condition: >-\n    a and\n    (b or\n     || c)", 4, 6),
    ("condition: a and\n  (b or\n   || c)", 3, 4),
])
def test_condition_positions_in_every_scalar_style(tmp_path, style, line, column):
    path = write(tmp_path, "r.yaml", f"{style}\nname: r\n")
    with pytest.raises(RuleErrors) as info:
        load_rule_file(path)
    (err,) = info.value.errors
    assert "unexpected `|`" in err.message and err.hint == "use `or` instead of `||`"
    assert (err.location.line, err.location.column) == (line, column)
    assert path.read_text().splitlines()[line - 1][column - 1:column + 1] == "||"


def test_one_bad_rule_never_hides_the_others(tmp_path):
    path = write(tmp_path, "pack.yaml", """
        rules:
          - name: good
            condition: tax
          - name: typo
            condtion: tax
          - name: bad_action
            condition: tax
            action: block it
          - name: bad_condition
            condition: tax and
          - name: good
            condition: threat
        """)
    rules, errors = collect_rules(path)
    assert [r.name for r in rules] == ["good"]
    messages = [(e.location.line, e.message) for e in errors]
    assert messages == [
        (4, "rule 'typo': missing required field 'condition'"),
        (5, "rule 'typo': unknown field 'condtion'"),
        (8, "rule 'bad_action': action 'block' takes its text in double quotes"),
        (10, "rule 'bad_condition': unexpected end of condition; expected a name, a number, a `${parameter}`, `all`, "
             "`any`, `not`, `once`, `ever` or `(`"),
        (11, "duplicate rule name 'good' (first defined at " + str(path) + ":2:5)"),
    ]
    assert errors[1].hint == "did you mean 'condition'?"
    assert errors[2].location.column == 19  # the word after the action's name
    with pytest.raises(RuleErrors, match="5 rule errors"):
        load_rules(path)


def test_yaml_problems_are_located(tmp_path):
    broken = write(tmp_path, "a/broken.yaml", "name: x\ncondition: [tax\n")
    dup = write(tmp_path, "b/dup.yaml", "name: x\ncondition: tax\ncondition: threat\n")
    errors = collect_rules([broken, dup, tmp_path / "missing.yaml", tmp_path / "a"])[1]
    assert "invalid YAML" in errors[0].message and errors[0].location.line == 3
    assert "duplicate key 'condition'" in errors[1].message and errors[1].location.line == 3
    assert "no such rule file" in errors[2].message
    assert len(errors) == 3  # the folder's YAML file is the broken one, read once: its problem is said once
    assert all(isinstance(e, RuleError) for e in errors)


def test_lints(tmp_path):
    path = write(tmp_path, "pack.yaml", """
        rules:
          - name: sloppy
            groups:
              g1: [tax, making_threat]
              unused: [tax]
              money: [payment_tool, payment_tools, payment_tools]
            condition: all of g1 or 4 of money or 2 of nothing or taxx
          - name: sloppy
            condition: tax
        """)
    rules, errors = collect_rules(path)
    assert errors == [] or all("duplicate rule name" in e.message for e in errors)
    rules = [*rules, RuleSpec(name="sloppy", condition="tax")]
    issues = lint(rules, ces=LIBRARY_CES)
    found = {(type(i).__name__, i.location.line) for i in issues}
    assert found == {
        ("PositionalGroupNameIssue", 4), ("UnusedGroupIssue", 5), ("DuplicateMemberIssue", 6),
        ("KOutOfRangeIssue", 7), ("UndefinedGroupIssue", 7), ("UnknownCEIssue", 6), ("UnknownCEIssue", 7),
        ("DuplicateRuleIssue", None),
    }
    unknown = [i for i in issues if isinstance(i, UnknownCEIssue)]
    assert {i.message for i in unknown} == {"unknown CE 'payment_tool' (did you mean 'payment_tools'?)",
                                            "unknown CE 'taxx' (did you mean 'tax'?)"}
    k_issue = next(i for i in issues if isinstance(i, KOutOfRangeIssue))
    assert (k_issue.k, k_issue.size, k_issue.location.column) == (4, 2, 29)
    assert k_issue.severity is Severity.HIGH and DuplicateMemberIssue.severity is Severity.LOW
    assert str(k_issue).startswith(f"{path}:7:29: high: rule 'sloppy': `4 of money` needs 1 <= k <= 2")
    without_ces = {type(i).__name__ for i in lint(rules)}
    assert "UnknownCEIssue" not in without_ces and "UndefinedGroupIssue" in without_ces


def test_a_single_validator_can_run_alone():
    rule = RuleSpec(name="r", groups={"group2": ["a"]}, condition="a")
    issues = lint([rule], validators=[PositionalGroupNameValidator()])
    assert [type(i).__name__ for i in issues] == ["PositionalGroupNameIssue"]
    assert str(issues[0].location) == "<rule r>"


def test_a_rule_lists_the_ces_its_condition_reads():
    rule = RuleSpec(name="r", groups={"g": ["a", "b"], "h": ["c"], "unused": ["z"]}, condition="all of g or (h and d)")
    assert rule.ce_names == ("a", "b", "c", "d")
