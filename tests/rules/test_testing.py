"""Rule tests (gavel.rules.testing.run): case formats, verdicts, located fixture errors, discovery, and the runner
checked against the naive reference evaluator on random traces."""
import json
import shutil
import tempfile
from pathlib import Path
from typing import get_args

import torch
from helpers import paths, rules_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.plugins.actions import PRECEDENCE
from gavel.rules import collect_rules
from gavel.rules.testing import run as testing
from gavel.rules.testing.run import Expectation, Firing, TraceCase, Verdict, deciding, discover, run_rule_tests

FIXTURES = paths.FIXTURES / "rules_tests"
PASS, FAIL, BROKEN = FIXTURES / "pass", FIXTURES / "fail", FIXTURES / "broken"
KINDS = {"tax_talk": "log", "tax_from_user": "log", "pressure": "alert", "sure_threat": "alert",
         "reply_threat": "alert", "extortion": "block"}  # the actions of pass/verdicts.yaml


def _case(**fields) -> TraceCase:
    return TraceCase.model_validate({"name": "c", "ces": ["a", "b"], "trace": [[0, 0]], "verdict": "clean", **fields})


def test_verdicts_are_the_action_kinds_by_precedence_then_clean():
    assert get_args(Verdict) == (*sorted(PRECEDENCE, key=PRECEDENCE.get, reverse=True), "clean")


def test_token_classes_are_role_plus_4_in_the_response():
    roles = ["system", "user", "assistant", "none", "assistant"]
    trace = [[0, 0]] * 5
    assert _case(trace=trace, roles=roles, response_from=3).token_classes().tolist() == [[1, 2, 3, 4, 7]]
    assert _case(trace=trace, roles=roles).token_classes().tolist() == [[1, 2, 3, 0, 3]]
    assert _case(trace=trace, response_from=1).token_classes().tolist() == [[0, 4, 4, 4, 4]]
    assert _case(trace=trace, response_from=5).token_classes().tolist() == [[0, 0, 0, 0, 0]]


def test_scores_compare_with_thresholds_and_padding_never_fires():
    case = _case(thresholds={"a": 0.5, "b": 0.8}, trace=[[0.5, 0.9], [0.6, 0.8]])
    assert case.fired(3).tolist() == [[[False, True, False], [True, False, False]]]
    assert torch.equal(case.scores(3), torch.tensor([[[0.5, 0.9, 0.0], [0.6, 0.8, 0.0]]], dtype=torch.float64))
    flags = _case(trace=[[1, 0]])
    assert flags.fired().tolist() == [[[True, False]]] and flags.scores().tolist() == [[[1.0, 0.0]]]


def test_scores_reach_comparisons_exactly_as_written(tmp_path):
    (tmp_path / "edge.yaml").write_text("rules: [{name: at_least, condition: x >= 0.9, match: token},\n"
                                        "        {name: above, condition: x > 0.9, match: token}]\n")
    case = {"name": "edge", "ces": ["x"], "thresholds": {"x": 0.5}, "trace": [[0.9], [0.95]],
            "expect": {"at_least": {"first_token": 0}, "above": {"first_token": 1}}}
    (tmp_path / "edge.tests.jsonl").write_text(json.dumps(case))
    results, errors = run_rule_tests([tmp_path])
    assert errors == [] and [(r.status, r.mismatches) for r in results] == [("pass", ())]


def test_deciding_firing_and_mismatch_messages():
    log, alert, block = Firing("l", 0, "log", "log"), Firing("a", 4, "alert", "alert"), Firing("b", 2, "block", "block")
    assert deciding([log, alert, block]) is block and deciding([log, alert]) is alert and deciding([]) is None
    assert deciding([Firing("a2", 3, "alert", "alert", "tok"), alert]).rule == "a2"
    (m,) = testing.verdict_mismatches("alert", 4, block)
    assert (m.subject, m.expected, m.got) == ("verdict", {"verdict": "alert", "first_token": 4}, {
        "verdict": "block", "first_token": 2, "token": None, "rule": "b", "action": "block"})
    assert str(m) == "verdict: expected alert from token 4, got block from token 2 (rule 'b')"
    assert testing.verdict_mismatches("block", 2, block) == [] and testing.verdict_mismatches("clean", None, None) == []
    assert str(testing.verdict_mismatches("clean", None, Firing("r", 3, "alert", "alert", "▁quiz"))[0]) == \
        "verdict: expected clean, got alert from token 3 '▁quiz' (rule 'r')"
    late = Firing("r", 5, "block", "block", "x")
    wrong = testing.rule_mismatches("r", Expectation(first_token=1, action="alert"), late, "block")
    assert [str(m) for m in wrong] == ["r: expected to fire at token 1, first fired at token 5 'x'",
                                       "r: expected action 'alert', the rule's action is 'block'"]
    assert wrong[0].got == {"fires": True, "first_token": 5, "token": "x"}


@settings(max_examples=40, deadline=None)
@given(trace=st.lists(st.tuples(*[st.sampled_from([0.0, 0.3, 0.6, 0.95, 1.0])] * 3), min_size=1, max_size=7),
       data=st.data())
def test_runner_agrees_with_the_reference_evaluator(trace, data):
    """Random traces through pass/verdicts.yaml: every rule's first firing and the verdict the reference evaluator
    gives (with the CE columns shuffled, scores, roles, a response and a mask) must pass as expectations."""
    n = len(trace)
    order = data.draw(st.permutations(["tax", "making_threat", "urgency"]))
    thresholds = dict(zip(order, data.draw(st.tuples(*[st.sampled_from([0.25, 0.5, 0.9])] * 3))))
    roles = data.draw(st.lists(st.sampled_from(["none", "system", "user", "assistant"]), min_size=n, max_size=n))
    response_from = data.draw(st.integers(0, n))
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rows = [[row[["tax", "making_threat", "urgency"].index(c)] for c in order] for row in trace]
    rules = collect_rules(PASS / "verdicts.yaml")[0]
    classes = [["none", "system", "user", "assistant"].index(r) + 4 * (t >= response_from) for t, r in enumerate(roles)]
    holds = rules_reference.run(rules, order, [[[v > thresholds[c] for v, c in zip(row, order)] for row in rows]],
                                [mask], scores=[rows], roles=[classes])[0]
    first = {r.name: next((t for t in range(n) if holds[t][i]), None) for i, r in enumerate(rules)}
    expect = {name: {"fires": False} if t is None else {"first_token": t} for name, t in first.items()}
    fired = [(-PRECEDENCE[KINDS[name]], t) for name, t in first.items() if t is not None]
    verdict = {"verdict": "clean"}
    if fired:
        rank, token = min(fired)
        verdict = {"verdict": next(k for k, p in PRECEDENCE.items() if p == -rank), "first_token": token}
    case = {"name": "random", "ces": list(order), "thresholds": thresholds, "trace": rows, "roles": roles,
            "response_from": response_from, "mask": mask, "expect": expect, **verdict}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(PASS / "verdicts.yaml", Path(tmp) / "verdicts.yaml")
        (Path(tmp) / "verdicts.tests.jsonl").write_text(json.dumps(case) + "\n")
        results, errors = run_rule_tests([tmp])
    assert errors == []
    assert [(r.status, [str(m) for m in r.mismatches]) for r in results] == [("pass", [])]


def test_ces_read_follows_lists_macros_exceptions_and_rule_references():
    rules = {r.name: r for r in collect_rules(PASS / "guarded.yaml")[0]}
    assert testing.referenced_rules(rules["complied"]) == {"asked_harm"}
    assert testing.ces_read(rules["complied"], rules) == {"compliance", "refusal", "weapons", "fraud"}
    assert testing.ces_read(rules["mentions_fraud"], rules) == {"fraud"}


def test_fixture_errors_are_located(tmp_path):
    results, errors = run_rule_tests([BROKEN])
    where = {(Path(e.location.path).name, e.location.line, e.location.column): e for e in errors}
    assert {k: e.message for k, e in where.items() if k[0] == "bad.tests.jsonl"} == {
        ("bad.tests.jsonl", 2, None): "test 'short roles': `roles` needs one value per token of the trace "
                                      "(2 tokens), not 1",
        ("bad.tests.jsonl", 3, None): "test 'response past the end': `response_from` is past the end of the trace "
                                      "(1 token)",
        ("bad.tests.jsonl", 4, None): "test 'first token without a verdict': `first_token` is where the verdict "
                                      "starts: it needs a `verdict` other than clean",
        ("bad.tests.jsonl", 5, None): "test 'unknown verdict': verdict: Input should be 'block', 'steer', 'alert', "
                                      "'log' or 'clean'",
        ("bad.tests.jsonl", 6, None): "test 'score above 1': trace[0] holds a score outside [0, 1] (scores are "
                                      "probabilities)",
        ("bad.tests.jsonl", 7, None): "test 'expects nothing': say what to expect: `expect` (per rule) and/or "
                                      "`verdict`",
        ("bad.tests.jsonl", 8, None): "test 'unknown role': roles.0: Input should be 'none', 'system', 'user' or "
                                      "'assistant'"}
    # a verdict needs every rule's action kind: an unknown action is an error at the rule (line 9 never runs)
    assert where["bad.yaml", 6, 13].message == "rule 'loud': unknown action 'explode'"
    # inside a pack, errors point at the field, with the line and a caret
    row = where["inline.yaml", 13, 9]
    assert row.message == "test 'row too long': trace[1] needs one value per CE of `ces` (1), not 2"
    assert row.excerpt.splitlines() == ["      - [1, 0]", "        ^"]
    assert where["inline.yaml", 18, 5].hint == "did you mean 'verdict'?"
    assert where["inline.yaml", 19, 5].message.startswith("duplicate test name 'fine' (first at ")
    assert where["inline.yaml", 24, 7].hint == "did you mean 'good'?"
    assert where["located.gvl", 8, 17].message == "test 'bad row': trace[1] needs one value per CE of `ces` (1), not 2"
    assert where["located.gvl", 14, 13].message.startswith("test 'private': expects rule 'helper', which is private")
    texts = {k[1]: e.message for k, e in where.items() if k[0] == "bad.texts.jsonl"}
    assert texts == {2: "test 'both inputs': give either `conversation` (a list of {role, content}) or `text`",
                     3: "test 'action without rule': expect: `action` is the action of `rule`: name the rule",
                     4: "test 'clean with a rule': expect: a clean verdict means no rule fires: drop `rule`",
                     5: "test 'typo': expects rule 'godo', which bad.yaml does not define",
                     6: "test 'unknown role': conversation.0.role: Input should be 'system', 'user' or 'assistant'"}
    assert sorted((Path(r.path).name, r.line, r.status) for r in results) == [
        ("bad.tests.jsonl", 1, "pass"), ("bad.texts.jsonl", 1, "skip"), ("inline.yaml", 5, "pass")]


def test_discovery_finds_every_kind_of_suite_once(tmp_path):
    suites, errors = discover([PASS, PASS / "verdicts.yaml", PASS / "verdicts.tests.jsonl"])
    assert errors == []
    assert sorted((s.kind, s.fixture.name, s.rules.name) for s in suites) == [
        ("trace", "guarded.yaml", "guarded.yaml"), ("trace", "mini.gvl", "mini.gvl"),
        ("trace", "verdicts.tests.jsonl", "verdicts.yaml")]
    (tmp_path / "orphan.texts.jsonl").write_text("")
    (tmp_path / "plain.yaml").write_text("rules: [{name: r, condition: a}]\n")
    suites, errors = discover([tmp_path / "orphan.texts.jsonl", tmp_path / "plain.yaml"])
    assert suites == []
    assert [e.message for e in errors] == ["no pack orphan.yaml (or .yml, .gvl) beside this fixture",
                                           "no rule tests here"]


def test_text_cases_are_skipped_without_a_model():
    results, errors = run_rule_tests([FIXTURES / "organism"])
    assert errors == []
    assert {(r.kind, r.status, r.reason) for r in results} == {
        ("text", "skip", "needs --model and --bank (the conversations are scanned by a model with a CE bank)")}
    assert len(results) == 4
