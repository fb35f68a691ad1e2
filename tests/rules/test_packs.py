"""Rule packs: Sigma-style fields, params, lists, macros, exceptions, helper rules, actions, the .gvl dispatch,
lints and `gavel rules check`, with every error located at its file, line and column."""
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import paths
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gavel.cli.rules import rules_app
from gavel.errors import RuleError
from gavel.plugins.registry import load_registry
from gavel.rules import RuleErrors, RuleSpec, collect_rules, lint, load_rules
from gavel.rules.action_checks import check_actions
from gavel.rules.ast import Action, Once
from gavel.rules.lint import (
    ActionIssue,
    KOutOfRangeIssue,
    MissingRequiredCEIssue,
    ShadowedNameIssue,
    UnknownCEIssue,
    UnusedDefinitionIssue,
    UnusedGroupIssue,
    UnusedPrivateRuleIssue,
    UselessExceptionIssue,
    WildcardMatchesNothingIssue,
)

RULES = paths.FIXTURES / "rules"
FRAUD, SLOPPY, FRAUD_GVL = RULES / "fraud.yaml", RULES / "sloppy.yaml", RULES / "gvl" / "fraud.gvl"
CES = ["tax", "making_threat", "urgency", "payment_tools", "role_playing", "impersonation"]
REGISTRY = load_registry()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def spot(path: Path, line_with: str, token: str, nth: int = 0) -> tuple[int, int]:
    """(line, column), 1-based, of the `nth` `token` on the first line of `path` containing `line_with`."""
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line_with in line)
    col = -1
    for _ in range(nth + 1):
        col = lines[n].index(token, col + 1)
    return n + 1, col + 1


def at(err) -> tuple[int, int]:
    return err.location.line, err.location.column


def errors_of(path: Path, **kwargs) -> list[RuleError]:
    _rules, errors = collect_rules(path, **kwargs)
    assert errors, "expected load errors"
    return errors


# --- the full pack ----------------------------------------------------------------------------------------------

def test_a_pack_with_every_field_loads():
    rules = load_rules(FRAUD)
    helper, scam, stop, steer = rules
    assert [r.name for r in rules] == ["tax_threat", "tax_scam", "stop_payment", "steer_away"]
    # params bound from the pack (window=12 wins over the default 8), else the default (k=2, angle=30)
    assert str(helper.expr) == "tax then making_threat within 12 tokens"
    assert str(stop.expr) == "count(cash) >= 2 within 12 tokens and 2 of money"
    assert steer.action_call == Action("rotate", None, (("plane", "refusal"), ("angle", 30)), steer.action_call.span)
    # Sigma metadata; `level: high` is the severity
    assert (scam.severity, scam.level, scam.status, scam.author) == ("high", "high", "experimental", "gavel team")
    assert (scam.tags, scam.references, scam.falsepositives) == (
        ("attack.fraud",), ("https://example.org/tax-scams",), ("Tax advice that mentions penalties",))
    assert scam.description.startswith("Tax content") and scam.definition == ""
    # what the compiler reads
    assert (helper.private, scam.private, stop.match, scam.match) == (True, False, "token", "conversation")
    assert dict(scam.lists) == {"pressure": ("urgency", "making_threat"), "money": ("tax", "payment_tools")}
    assert {n: str(m.expr) for n, m in scam.macros.items()} == {
        "pressured": "any of pressure", "demands_money": "money > 0.8 and pressured"}
    assert [(e.name, str(e.expr), e.reason) for e in scam.exceptions] == [
        ("roleplay", "role_playing in user", "Fiction the user asked for.")]
    # requires: the pack's bank and CEs, the rule's model and CEs added
    assert scam.requirements.model_dump() == {"bank": "fraud-bank", "model": "tiny-model",
                                              "ces": ("tax", "making_threat", "payment_tools")}
    assert stop.requirements.model_dump() == {"bank": "fraud-bank", "model": None, "ces": ("tax", "making_threat")}
    # the CEs read: through the macros, the lists and the exception (a rule reference is not a CE)
    assert scam.ce_names == ("tax", "payment_tools", "urgency", "making_threat", "role_playing")
    assert stop.ce_names == ("payment_tools", "tax")
    assert scam.action_call.text == "{rule} at token {token_index}: {tax}"
    assert stop.action_call == Action("block", "I can't help with that.", (), stop.action_call.span)
    assert scam.pack is stop.pack and scam.pack.name == "fraud" and scam.pack.spec.tests[0]["name"]
    assert lint(rules, ces=CES) == []
    assert check_actions(rules, REGISTRY) == []


class QuarantineAction:
    """A plugin's declaration of an action it does not implement yet."""

    name, kind, stops_generation, params, takes_text, implemented = "quarantine", "steer", False, None, False, False


def test_declared_actions_are_refused_when_a_monitor_must_run_them(tmp_path):
    assert check_actions(load_rules(FRAUD), REGISTRY, runnable=True) == []     # rotate is implemented
    registry = load_registry()
    registry.add("actions", "quarantine", QuarantineAction, "a test plugin")
    pack = tmp_path / "declared.yaml"
    pack.write_text("rules:\n  - name: x\n    condition: tax\n    action: quarantine\n")
    assert check_actions(load_rules(pack), registry) == []                      # it loads and lints
    (err,) = check_actions(load_rules(pack), registry, runnable=True)
    assert "action 'quarantine' is declared but not implemented yet" in err.message
    assert at(err) == spot(pack, "action: quarantine", "quarantine")


def test_the_gvl_surface_loads_to_the_same_rules():
    yaml_rules, gvl_rules = load_rules(FRAUD), load_rules(RULES / "gvl")  # a folder collects its *.gvl files
    assert [r.model_dump() for r in yaml_rules] == [r.model_dump() for r in gvl_rules]
    assert [str(r.expr) for r in yaml_rules] == [str(r.expr) for r in gvl_rules]
    assert yaml_rules[0].pack.spec == gvl_rules[0].pack.spec
    assert [r.field_location("name").path for r in gvl_rules] == [str(FRAUD_GVL)] * 4
    # lints locate inside the .gvl file, at the very character
    issues = lint(gvl_rules, ces=[c for c in CES if c != "role_playing"])
    (unknown,) = [i for i in issues if isinstance(i, UnknownCEIssue)]
    assert (unknown.location.path, unknown.location.line, unknown.location.column) == (
        str(FRAUD_GVL), *spot(FRAUD_GVL, "unless roleplay", "role_playing"))


def test_gvl_errors_are_located_in_the_gvl_file(tmp_path):
    path = write(tmp_path / "p.gvl", """
        pack p
        macro loop = tax or loop
        rule r {
            when tax and once urgency within ${w} tokens
        }
        """)
    errors = errors_of(path)
    assert [(e.message, at(e)) for e in errors] == [
        ("macro 'loop': refers to itself", spot(path, "macro loop", "loop", 1)),
        ("rule 'r': parameter 'w' has no value", spot(path, "when", "${w}")),
    ]
    path = write(tmp_path / "q.gvl", """
        pack q
        rule r {
            when tax
            action rotate(plane="x", angel=3)
        }
        """)
    missing, unknown = check_actions(load_rules(path), REGISTRY)
    assert at(missing) == spot(path, "action", "rotate") and at(unknown) == spot(path, "action", "angel")
    assert unknown.location.path == str(path)


def test_params_from_the_caller_override_the_pack():
    rules = load_rules(FRAUD, params={"threshold": 0.5, "window": 4, "k": 1, "angle": 45.5})
    helper, scam, stop, steer = rules
    assert str(helper.expr) == "tax then making_threat within 4 tokens"
    assert str(scam.macros["demands_money"].expr) == "money > 0.5 and pressured"
    assert str(stop.expr) == "count(cash) >= 2 within 4 tokens and 1 of money"
    assert dict(steer.action_call.args) == {"plane": "refusal", "angle": 45.5}
    assert isinstance(stop.expr.terms[0].window, int)  # a whole value binds as an int, like a literal


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(1, 10_000), st.floats(0.01, 10_000).filter(lambda x: not x.is_integer())))
def test_a_window_parameter_binds_only_to_a_whole_number(tmp_path_factory, value):
    path = write(tmp_path_factory.mktemp("p") / "p.yaml", """
        params: {w: 5}
        rules:
          - name: r
            condition: a and once b within ${w} tokens
        """)
    rules, errors = collect_rules(path, params={"w": value})
    if isinstance(value, int):
        once = rules[0].expr.terms[1]
        assert errors == [] and isinstance(once, Once) and once.window == value and type(once.window) is int
    else:
        (err,) = errors
        assert f"parameter 'w' is a window: it needs a whole number >= 1, not {value}" in err.message
        assert at(err) == spot(path, "condition", "${w}")


def test_parameter_errors_are_located(tmp_path):
    path = write(tmp_path / "p.yaml", """
        params:
          thr: 0.9
          flag: true
        rules:
          - name: r
            condition: a > ${thr} and ${k} of (a, b)
        """)
    (flag,) = errors_of(path)
    assert flag.message == "params.flag: a parameter's value is a number, not True" and at(flag) == (3, 9)
    path = write(tmp_path / "q.yaml", """
        params: {thr: 0.9}
        rules:
          - name: r
            condition: |
              a > ${thr} and
                ${k} of (a, b) and once c within ${n:2.5} tokens
        """)
    unset, half, unused, not_number = errors_of(path, params={"thr": 0.5, "thres": 1, "x": "y"})[:4]
    assert unset.message == "rule 'r': parameter 'k' has no value" and at(unset) == spot(path, "of (a, b)", "${k}")
    assert "`params:`" in unset.hint and unset.excerpt.splitlines()[1].index("^") == at(unset)[1] - 1
    assert half.message == "rule 'r': parameter 'n' is a window: it needs a whole number >= 1, not 2.5"
    assert at(half) == spot(path, "of (a, b)", "${n:2.5}")
    assert unused.message == "parameter 'thres' is set, but no loaded rule or pack uses it"
    assert unused.hint == "did you mean 'thr'?"
    assert not_number.message == "parameter 'x' must be a number, not 'y'"


def test_macro_cycles_are_located(tmp_path):
    path = write(tmp_path / "p.yaml", """
        lists: {loop: [a]}
        macros:
          first: a and second
          second: b or (first and c)
          own: once own
          loop_ok: loop and first_list
          first_list: a
        rules:
          - {name: r, condition: first or own}
        """)
    errors = errors_of(path)
    assert [(e.message, at(e)) for e in errors] == [
        ("macro 'second': is in a cycle of macros: first -> second -> first", (4, 17)),
        ("macro 'own': refers to itself", (5, 13)),
    ]
    assert errors[0].hint == "a macro is expanded in place, so it cannot contain itself"


# --- every condition-bearing string maps errors to the file ----------------------------------------------------

@pytest.mark.parametrize("style", ["plain", "double", "single", "block", "folded"])
def test_errors_in_macros_exceptions_and_actions_point_at_the_character(tmp_path, style):
    def scalar(text: str, indent: int) -> str:
        pad = " " * indent
        return {"plain": text, "double": json.dumps(text), "single": f"'{text}'",
                "block": f"|\n{pad}  {text}", "folded": f">-\n{pad}  {text}"}[style]
    path = tmp_path / "p.yaml"
    path.write_text(
        "macros:\n"
        f"  broken: {scalar('a and (b or || c)', 2)}\n"
        "rules:\n"
        "  - name: r\n"
        "    condition: a\n"
        "    exceptions:\n"
        "      - name: e\n"
        f"        condition: {scalar('a and in user', 8)}\n"
        "  - name: s\n"
        "    condition: a\n"
        f"    action: {scalar('rotate(plane=x, angle=3', 4)}\n")
    macro, exception, action = errors_of(path)
    lines = path.read_text().splitlines()
    for err, message, token in ((macro, "macro 'broken': unexpected `|`", "||"),
                                (exception, "rule 'r': unexpected `in`", "in user"),
                                (action, "rule 's': unexpected end of condition", "")):
        assert err.message.startswith(message)
        line, column = at(err)
        if token:
            assert lines[line - 1][column - 1:].startswith(token)
        else:  # the end of the action text: one past its last character
            assert lines[line - 1][:column - 1].rstrip("'\"").endswith("angle=3")
        assert err.excerpt.splitlines()[0].strip() == lines[line - 1].strip()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b_1", "and", "or", "not", "(", ")", "> 0.5", "once", "within 3 tokens",
                                 "2 of (a, b)", "${p:1}", "# note\n"]), min_size=1, max_size=12),
       st.sampled_from(["double", "single", "block", "plain"]))
def test_every_character_of_a_macro_maps_to_itself_in_the_file(tmp_path_factory, words, style):
    text = " ".join(words).strip()
    if style == "plain" and ("#" in text or text[:1] in "(>" or ": " in text):
        style = "double"
    if "#" in text and style in ("double", "single"):
        style = "block"
    value = {"double": json.dumps(text), "single": "'" + text.replace("'", "''") + "'",
             "block": "|\n    " + text.replace("\n", "\n    "), "plain": text}[style]
    path = tmp_path_factory.mktemp("m") / "p.yaml"
    path.write_text(f"macros:\n  m: {value}\nrules: []\n")
    if yaml.safe_load(path.read_text())["macros"]["m"].rstrip("\n") != text:
        return  # YAML reads this spelling differently; nothing to map
    from gavel.rules.load import _read

    doc = _read(path, [])
    chars = doc.scalars[("macros", "m")]
    stored = yaml.safe_load(path.read_text())["macros"]["m"]
    file_text = path.read_text()
    assert len(chars) == len(stored) + 1
    assert all(file_text[i] == ch for ch, i in zip(stored, chars) if not ch.isspace())


# --- fields: Sigma aliases, action spellings, did you mean -------------------------------------------------------

def test_level_is_sigmas_name_for_severity(tmp_path):
    assert RuleSpec(name="r", condition="a", level="informational").severity == "low"
    assert RuleSpec(name="r", condition="a", level="critical").severity == "critical"
    assert RuleSpec(name="r", condition="a").severity == "medium"
    path = write(tmp_path / "r.yaml", """
        name: r
        condition: a
        severity: high
        level: low
        """)
    (err,) = errors_of(path)
    assert err.message == "rule 'r': give `severity` or Sigma's `level`, not both" and at(err) == (4, 1)


def test_misspellings_get_did_you_mean(tmp_path):
    path = write(tmp_path / "p.yaml", """
        pack: p
        descripton: typo
        requires: {bank: b, modle: m}
        rules:
          - name: r
            condition: a in respnse
            severity: hihg
            status: stabel
            match: tokens
            exceptions:
              - {name: e, conditon: a}
          - name: s
            conditon: a
        """)
    found = {(e.message, at(e), e.hint) for e in errors_of(path)}
    assert found == {
        ("unknown field 'descripton'", (2, 1), "did you mean 'description'?"),
        ("unknown field 'requires.modle'", (3, 21), "did you mean 'model'?"),
        ("rule 'r': unknown scope 'respnse'", (6, 21), "did you mean 'response'?"),
        ("rule 'r': severity: Input should be 'low', 'medium', 'high' or 'critical'", (7, 15), "did you mean 'high'?"),
        ("rule 'r': status: Input should be 'experimental', 'test', 'stable' or 'deprecated'", (8, 13),
         "did you mean 'stable'?"),
        ("rule 'r': match: Input should be 'conversation' or 'token'", (9, 12), "did you mean 'token'?"),
        ("rule 'r': missing required field 'exceptions.0.condition'", (11, 9), None),
        ("rule 'r': unknown field 'exceptions.0.conditon'", spot(path, "conditon: a}", "conditon"),
         "did you mean 'condition'?"),
        ("rule 's': missing required field 'condition'", (12, 5), None),
        ("rule 's': unknown field 'conditon'", (13, 5), "did you mean 'condition'?"),
    }


def test_message_and_reply_are_the_older_spelling_of_the_action_text(tmp_path):
    old = RuleSpec(name="r", condition="a", action="alert", message="careful")
    assert old.action_call == Action("alert", "careful", (), old.action_call.span)
    old = RuleSpec(name="r", condition="a", action="block", reply="no", message="logged")
    assert (old.action_call.name, old.action_call.text, old.message) == ("block", "no", "logged")
    assert RuleSpec(name="r", condition="a", message="a note").action_call.text is None  # log keeps no text
    path = write(tmp_path / "p.yaml", """
        rules:
          - name: twice
            condition: a
            action: alert "new"
            message: old
          - name: reply_twice
            condition: a
            action: block "new"
            reply: old
          - name: reply_alert
            condition: a
            action: alert
            reply: old
        """)
    twice, reply_twice, reply_alert = errors_of(path)
    assert twice.message.startswith("rule 'twice': the action already says what it does: drop `message`")
    assert at(twice) == (5, 5) and at(reply_twice) == (9, 5) and at(reply_alert) == (13, 5)
    assert reply_alert.message == "rule 'reply_alert': `reply` is only used by action `block`"


def test_exception_names_are_unique(tmp_path):
    path = write(tmp_path / "r.yaml", """
        name: r
        condition: a
        exceptions:
          - {name: e, condition: b}
          - {name: e, condition: c}
        """)
    (err,) = errors_of(path)
    assert err.message == "rule 'r': two exceptions are named 'e'" and at(err) == (5, 6)


def test_rules_built_in_python_name_their_rule():
    rule = RuleSpec(name="r", condition="a", exceptions=[{"name": "e", "condition": "b and\n  ${x}  of (a, b)"}])
    with pytest.raises(RuleErrors) as info:
        _ = rule.exceptions[0].expr   # the expression is parsed when first read
    (err,) = info.value.errors
    assert err.message == "rule 'r': exception 'e': parameter 'x' has no value"
    assert str(err.location) == "<rule r>:2:3"
    assert rule.lists == {} and rule.macros == {} and rule.pack is None


def test_a_bad_pack_header_keeps_its_rules_from_loading_but_reports_theirs(tmp_path):
    path = write(tmp_path / "p.yaml", """
        macros: {m: a and}
        rules:
          - {name: good, condition: m}
          - {name: bad, condition: a and}
        """)
    rules, errors = collect_rules(path)
    end = spot(path, "name: bad", "a and}")
    assert rules == [] and [at(e) for e in errors] == [(1, 18), (end[0], end[1] + len("a and"))]


# --- check_actions -----------------------------------------------------------------------------------------------

def test_check_actions_locates_every_problem():
    rules, errors = collect_rules(SLOPPY)
    assert errors == []
    found = [(e.message.split(": ", 1)[1], at(e), e.hint) for e in check_actions(rules, REGISTRY)]
    alert = "action: 'alert"
    assert found == [
        ("unknown action 'alrt'", spot(SLOPPY, "action: alrt", "alrt"), "did you mean 'alert'?"),
        ("unknown placeholder '{tokn}'", spot(SLOPPY, alert, "{tokn}"), "did you mean 'token'?"),
        ("unknown placeholder '{x}'", spot(SLOPPY, alert, "{x}"),
         "`${...}` parameters are bound in conditions and action arguments, not in text"),
        ("unknown placeholder '{rule.x}'", spot(SLOPPY, alert, "{rule.x}"), "did you mean 'rule'?"),
        ("a lone '}' in the alert text", spot(SLOPPY, alert, "}", 8), "write {{ or }} for a literal brace"),
        ("action 'rotate' needs argument 'angle'", spot(SLOPPY, "angel=30", "rotate"),
         "write it as rotate(plane=..., angle=...)"),
        ("action 'rotate' has no argument 'angel'", spot(SLOPPY, "angel=30", "angel"), "did you mean 'angle'?"),
        ("action 'log' takes no text", spot(SLOPPY, 'log "text"', "text"),
         "only actions like alert and block take text"),
        ("action 'block' takes no arguments", spot(SLOPPY, "block(x=1)", "x=1"), None),
        ("argument 'plane' of action 'rotate': Input should be a valid string", spot(SLOPPY, "plane=3", "plane"),
         None),
        ("argument 'angle' of action 'rotate': Input should be a valid number", spot(SLOPPY, "plane=3", "angle"),
         None),
    ]


def test_placeholders_in_the_older_message_field_are_located(tmp_path):
    path = write(tmp_path / "r.yaml", """
        name: r
        condition: tax
        action: alert
        message: "{tax} and {ce}"
        """)
    (err,) = check_actions(load_rules(path), REGISTRY)
    assert err.message == "rule 'r': unknown placeholder '{ce}'" and err.hint == "did you mean 'ces'?"
    assert at(err) == spot(path, "message", "{ce}")


# --- lints ---------------------------------------------------------------------------------------------------------

def test_every_lint_is_located():
    rules = load_rules(SLOPPY)
    issues = lint(rules, ces=["tax", "urgency", "making_threat", "harm_a"])
    found = {(type(i).__name__, i.subject, i.message, (i.location.line, i.location.column)) for i in issues
             if not isinstance(i, ActionIssue)}
    s = SLOPPY
    assert found == {
        ("UnusedGroupIssue", "rule 'a'", "group 'unused' is never used by the condition",
         spot(s, "unused: [tax]", "unused")),
        ("KOutOfRangeIssue", "rule 'a'", "`3 of pressure` needs 1 <= k <= 2 (the CEs in 'pressure')",
         spot(s, "3 of pressure", "3 of pressure")),
        ("KOutOfRangeIssue", "rule 'a'", "`3 of (tax, urgency)` needs 1 <= k <= 2 (the items)",
         spot(s, "3 of pressure", "3 of (")),
        ("KOutOfRangeIssue", "rule 'a'", "`0 of pressure` needs 1 <= k <= 2 (the CEs in 'pressure')",
         spot(s, "3 of pressure", "0 of")),
        ("ShadowedNameIssue", "rule 'a'", "group 'making_threat' hides the rule 'making_threat' (names resolve "
         "in the order group, list, macro, rule, CE): rename one", spot(s, "making_threat: [", "making_threat")),
        ("WildcardMatchesNothingIssue", "rule 'a'", "wildcard 'nothing_*' matches no CE",
         spot(s, "3 of pressure", "nothing_*")),
        ("UselessExceptionIssue", "rule 'b'", "exception 'same' is the rule's condition: the rule can never fire",
         (33, 20)),
        ("UselessExceptionIssue", "rule 'b'", "exception 'e2' repeats exception 'e1'", (37, 20)),
        ("MissingRequiredCEIssue", "rule 'c'", "requires CE 'phantom', which the bank lacks",
         spot(s, "ces: [phantom]", "phantom")),
        ("ShadowedNameIssue", "rule 'making_threat'", "rule 'making_threat' hides the CE 'making_threat' (names "
         "resolve in the order group, list, macro, rule, CE): rename one", spot(s, "- name: making_threat",
                                                                               "making_threat")),
        ("UnusedPrivateRuleIssue", "rule 'helper'",
         "private rule is never used by another rule, and private rules are never reported", (18, 5)),
        ("UnusedPrivateRuleIssue", "rule 'lonely'",
         "private rule is never used by another rule, and private rules are never reported", (21, 5)),
        ("UnusedDefinitionIssue", "pack 'sloppy'", "list 'spare' is never used by the pack's rules",
         spot(s, "spare: [tax]", "spare")),
        ("UnusedDefinitionIssue", "pack 'sloppy'", "list 'pair' is never used by the pack's rules",
         spot(s, "pair: [", "pair")),
        ("UnusedDefinitionIssue", "pack 'sloppy'", "macro 'spare_macro' is never used by the pack's rules",
         spot(s, "spare_macro:", "spare_macro")),
        ("UnusedDefinitionIssue", "pack 'sloppy'", "parameter 'unused_param' is never used by the pack's rules",
         spot(s, "unused_param:", "unused_param")),
        ("PackShadowedNameIssue", "pack 'sloppy'", "list 'tax' hides the CE 'tax' (names resolve in the order "
         "group, list, macro, rule, CE): rename one", spot(s, "tax: [tax, urgency]", "tax")),
        ("PackShadowedNameIssue", "pack 'sloppy'", "macro 'helper' hides the rule 'helper' (names resolve in the "
         "order group, list, macro, rule, CE): rename one", spot(s, "helper: once", "helper")),
        ("PackUnknownCEIssue", "pack 'sloppy'", "list 'pair': unknown CE 'urgncy' (did you mean 'urgency'?)",
         spot(s, "pair: [", "urgncy")),
        ("PackMissingRequiredCEIssue", "pack 'sloppy'", "requires CE 'ghost', which the bank lacks",
         spot(s, "ces: [tax, ghost]", "ghost")),
    }
    lines = SLOPPY.read_text().splitlines()
    assert lines[32].strip() == "condition: harm and helper" and lines[36].strip() == "condition: urgency"
    assert lines[17].strip() == "private: true" and lines[20].strip() == "private: true"
    actions = [i for i in issues if isinstance(i, ActionIssue)]
    assert len(actions) == len(check_actions(rules, REGISTRY)) and all(i.severity.name == "HIGH" for i in actions)


def test_lints_without_ce_names_skip_the_ce_checks():
    kinds = {type(i) for i in lint(load_rules(SLOPPY))}
    assert not kinds & {UnknownCEIssue, WildcardMatchesNothingIssue, MissingRequiredCEIssue}
    assert {UnusedDefinitionIssue, UnusedGroupIssue, UnusedPrivateRuleIssue, KOutOfRangeIssue, ShadowedNameIssue,
            UselessExceptionIssue, ActionIssue} <= kinds


def test_names_used_only_through_macros_exceptions_and_rule_references_count_as_used(tmp_path):
    path = write(tmp_path / "p.yaml", """
        lists: {money: [tax, payment_tools]}
        macros:
          outer: inner and once urgency
          inner: any of money and near
        rules:
          - name: helper
            private: true
            condition: making_threat
          - name: r
            groups:
              near: [urgency]
              in_exception: [tax]
            condition: outer or helper
            exceptions:
              - {name: e, condition: in_exception in user}
        """)
    assert lint(load_rules(path), ces=["tax", "payment_tools", "urgency", "making_threat"]) == []


def test_k_of_a_wildcard_is_checked_when_the_ces_are_known(tmp_path):
    path = write(tmp_path / "r.yaml", "name: r\ncondition: 3 of harm_*\n")
    (issue,) = [i for i in lint(load_rules(path), ces=["harm_a", "harm_b", "other"])]
    assert isinstance(issue, KOutOfRangeIssue) and issue.message.startswith("`3 of harm_*` needs 1 <= k <= 2")
    assert lint(load_rules(path)) == []


# --- gavel rules check --------------------------------------------------------------------------------------------

def test_check_a_clean_pack_and_a_sloppy_one():
    runner = CliRunner()
    result = runner.invoke(rules_app, ["check", str(FRAUD), str(RULES / "gvl" / "fraud.gvl"), "--ces", ",".join(CES)])
    assert result.exit_code == 1  # the same rule names twice
    assert "duplicate rule name 'tax_threat'" in result.output
    result = runner.invoke(rules_app, ["check", str(FRAUD), "--ces", ",".join(CES)])
    assert result.exit_code == 0 and "4 rules: 0 errors, 0 lint findings" in result.output
    result = runner.invoke(rules_app, ["check", str(SLOPPY), "--ces", "tax,urgency,making_threat,harm_a", "--json"])
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    pack_level = [f for f in found if f["code"] == "UnusedDefinitionIssue"]
    assert pack_level and all(f["rule"] is None and f["message"].startswith("pack 'sloppy': ") for f in pack_level)
    alrt = next(f for f in found if "alrt" in f["message"])
    assert (alrt["line"], alrt["column"], alrt["hint"], alrt["severity"]) == (
        *spot(SLOPPY, "action: alrt", "alrt"), "did you mean 'alert'?", "high")
    text = runner.invoke(rules_app, ["check", str(SLOPPY)]).output
    assert "    hint: did you mean 'alert'?" in text


def test_check_sets_parameters(tmp_path):
    path = write(tmp_path / "p.yaml", """
        rules:
          - {name: r, condition: "${k} of (a, b)"}
        """)
    runner = CliRunner()
    result = runner.invoke(rules_app, ["check", str(path), "--json"])
    assert result.exit_code == 1
    (finding,) = json.loads(result.stdout)
    assert (finding["message"], finding["line"], finding["column"]) == (
        "rule 'r': parameter 'k' has no value", *spot(path, "name: r", "${k}"))
    assert runner.invoke(rules_app, ["check", str(path), "--param", "k=2", "--ces", "a,b"]).exit_code == 0
    result = runner.invoke(rules_app, ["check", str(path), "-p", "k=3"])
    assert result.exit_code == 1 and "`3 of (a, b)` needs 1 <= k <= 2 (the items)" in result.output
    for bad in ("k", "k=two", "=2", "k=nan"):
        result = runner.invoke(rules_app, ["check", str(path), "--param", bad])
        assert result.exit_code == 2 and "expected NAME=NUMBER" in result.output
