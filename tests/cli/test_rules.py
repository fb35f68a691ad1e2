"""`gavel rules check|test|fmt`: exit codes, text and JSON output, trace and text fixtures, GAVEL sets and text
fixtures on the organism."""
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import paths
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gavel.cli.rules import rules_app
from gavel.rules import And, Or, parse_condition
from gavel.rules.fmt import canonical, format_paths

FIXTURES = paths.FIXTURES
LIBRARY = FIXTURES / "gavel_library"
RULE_TESTS = FIXTURES / "rule_tests"
RULES_TESTS = FIXTURES / "rules_tests"  # verdicts, roles, scores, tests inside packs, text fixtures
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(rules_app, [str(a) for a in args])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_importing_the_commands_loads_neither_torch_nor_the_rule_parser():
    code = ("import sys, gavel.cli.rules; bad = {'torch', 'lark', 'gavel.rules'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- check ------------------------------------------------------------------------------------------------------

def test_check_a_clean_library():
    result = invoke("check", LIBRARY, "--bank", LIBRARY / "ces")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "5 rules: 0 errors, 0 lint findings"  # FORMAT.md's shapes, all read
    assert "not checked" in invoke("check", LIBRARY).output  # no CE names given: says so
    ruleset = LIBRARY / "rulesets" / "fraud.yaml"
    assert invoke("check", ruleset, "--library", LIBRARY, "--bank", LIBRARY / "ces").exit_code == 0


def test_check_warns_about_unknown_keys_of_gavel_files_and_exits_0(tmp_path):
    library = Path(shutil.copytree(LIBRARY, tmp_path / "lib"))
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    rule.write_text(rule.read_text() + "license: MIT\n")
    line = rule.read_text().splitlines().index("license: MIT") + 1
    result = invoke("check", library, "--bank", library / "ces")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"{rule}:{line}:1: warning: rule 'tax_scam': unknown field 'license' (kept, not read by gavel)" in lines
    assert lines[-1] == "5 rules: 0 errors, 0 lint findings, 1 warning"
    found = json.loads(invoke("check", library, "--bank", library / "ces", "--json").stdout)
    assert [(f["path"], f["line"], f["column"], f["severity"]) for f in found] == [(str(rule), line, 1, "warning")]
    rule.write_text(rule.read_text().replace("tax_threat: [tax, making_threat]", "tax_threat: [tax, acme/threat]"))
    result = invoke("check", library)  # a missing dependency is an error: exit 1, the warning still shown
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("5 rules: 1 error, 0 lint findings, 1 warning")
    assert "missing dependency: ce 'threat' of namespace 'acme'" in result.stdout


def test_check_reports_every_problem_located(tmp_path):
    pack = write(tmp_path / "pack.yaml", """
        rules:
          - name: broken
            condition: tax and || making_threat
          - name: typo
            condtion: tax
          - name: sloppy
            groups:
              g1: [tax, taxx]
            condition: all of g1
        """)
    result = invoke("check", pack, "--ces", "tax,making_threat")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert (f"{pack}:3:24: error: rule 'broken': unexpected `|`; expected a name, a number, a `${{parameter}}`, "
            "`all`, `any`, `not`, `once`, `ever` or `(`") in lines
    assert "    hint: use `or` instead of `||`" in lines
    assert f"{pack}:5:5: error: rule 'typo': unknown field 'condtion'" in lines
    assert f"{pack}:8:7: medium: rule 'sloppy': group 'g1' has a positional name; name it after what its CEs " \
           "mean together" in lines
    assert f"{pack}:8:17: high: rule 'sloppy': unknown CE 'taxx' (did you mean 'tax'?)" in lines
    assert lines[-1] == "1 rule: 3 errors, 2 lint findings"

    found = json.loads(invoke("check", pack, "--ces", "tax,making_threat", "--json").stdout)
    assert [(f["line"], f["severity"], f["code"]) for f in found] == [
        (3, "error", "RuleError"), (4, "error", "RuleError"), (5, "error", "RuleError"),
        (8, "medium", "PositionalGroupNameIssue"), (8, "high", "UnknownCEIssue")]
    assert set(found[0]) >= {"path", "line", "column", "severity", "code", "message", "hint"}
    assert found[0]["hint"] == "use `or` instead of `||`" and found[0]["path"] == str(pack)
    assert found[-1]["rule"] == "sloppy" and found[-1]["column"] == 17


def test_check_reads_ce_names_from_a_bank_manifest(tmp_path):
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps({"ces": [{"name": "tax"}, {"name": "urgency"}]}))
    result = invoke("check", LIBRARY / "rules" / "tax_scam", "--bank", tmp_path / "bank", "--json")
    assert result.exit_code == 1
    assert [f["message"] for f in json.loads(result.stdout)] == ["rule 'tax_scam': unknown CE 'making_threat'"]


def test_check_bad_invocation_exits_2(tmp_path):
    assert invoke("check", tmp_path / "missing.yaml").exit_code == 2
    (tmp_path / "empty").mkdir()
    result = invoke("check", LIBRARY, "--bank", tmp_path / "empty")
    assert result.exit_code == 2 and "neither a CE bank" in result.output


# --- test -------------------------------------------------------------------------------------------------------

def test_trace_fixtures_pass():
    result = invoke("test", RULE_TESTS / "pass")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "6 passed, 0 failed, 0 skipped, 0 errors"
    report = json.loads(invoke("test", RULE_TESTS / "pass" / "scam.yaml", "--json").stdout)
    assert report["summary"] == {"pass": 4, "fail": 0, "skip": 0, "error": 0}
    assert [r["line"] for r in report["results"]] == [1, 2, 3, 4]
    assert invoke("test", RULE_TESTS / "pass" / "library" / "rules" / "pressure" / "tests" / "traces.jsonl"
                  ).exit_code == 0


def test_trace_failures_show_what_was_expected_and_got():
    result = invoke("test", RULE_TESTS / "fail")
    assert result.exit_code == 1
    for line in ("late: expected to fire at token 1, first fired at token 2", "late: expected to fire, never fired",
                 "late: expected no firing, fired at token 0", "1 passed, 3 failed, 0 skipped, 0 errors"):
        assert line in result.output
    report = json.loads(invoke("test", RULE_TESTS / "fail", "--json").stdout)
    first = report["results"][0]
    assert (first["status"], first["name"]) == ("fail", "fires later than expected")
    assert first["mismatches"] == [{
        "subject": "late", "expected": {"fires": True, "first_token": 1},
        "got": {"fires": True, "first_token": 2, "token": None},
        "message": "late: expected to fire at token 1, first fired at token 2"}]


def test_verdicts_roles_scores_and_tests_inside_packs_pass():
    result = invoke("test", RULES_TESTS / "pass")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "15 passed, 0 failed, 0 skipped, 0 errors"
    assert f"PASS {RULES_TESTS / 'pass' / 'guarded.yaml'}:21  compliance after a harmful ask blocks  -> block from " \
           "token 3 (rule 'complied')" in lines
    assert f"PASS {RULES_TESTS / 'pass' / 'mini.gvl'}:8  tax alerts  -> alert from token 1 (rule 'tax_talk')" in lines


def test_verdict_and_action_failures_show_expected_vs_got():
    result = invoke("test", RULES_TESTS / "fail")
    assert result.exit_code == 1
    fixture = RULES_TESTS / "fail" / "misjudged.tests.jsonl"
    assert result.output.splitlines() == [
        f"FAIL {fixture}:1  wrong verdict  -> block from token 1 (rule 'extortion')",
        "     verdict: expected alert, got block from token 1 (rule 'extortion')",
        f"FAIL {fixture}:2  verdict starts later  -> block from token 1 (rule 'extortion')",
        "     verdict: expected block from token 0, got block from token 1 (rule 'extortion')",
        f"FAIL {fixture}:3  not clean  -> log from token 1 (rule 'tax_talk')",
        "     verdict: expected clean, got log from token 1 (rule 'tax_talk')",
        f"FAIL {fixture}:4  clean, not blocked  -> clean",
        "     verdict: expected block, got clean",
        f"FAIL {fixture}:5  wrong action",
        "     extortion: expected action 'alert', the rule's action is 'block'",
        f"PASS {fixture}:6  passes  -> block from token 0 (rule 'extortion')",
        "1 passed, 5 failed, 0 skipped, 0 errors"]
    report = json.loads(invoke("test", fixture, "--json").stdout)
    assert [(r["status"], r["outcome"]) for r in report["results"]][3:5] == [
        ("fail", {"verdict": "clean"}), ("fail", None)]
    assert report["results"][4]["mismatches"][0] | {"message": None} == {
        "subject": "extortion", "expected": {"action": "alert"}, "got": {"action": "block"}, "message": None}


def test_bad_rule_test_inputs_exit_2_with_file_and_line():
    result = invoke("test", RULES_TESTS / "broken")
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[-1] == "2 passed, 0 failed, 1 skipped, 19 errors"
    assert f"{RULES_TESTS / 'broken' / 'bad.tests.jsonl'}:3: error: test 'response past the end': `response_from` " \
           "is past the end of the trace (1 token)" in lines
    at = lines.index(f"{RULES_TESTS / 'broken' / 'inline.yaml'}:18:5: error: test 'misspelt field': unknown field "
                     "'verdcit'")
    assert lines[at + 1:at + 4] == ["        verdcit: log", "        ^", "    hint: did you mean 'verdict'?"]


def test_bad_fixtures_are_errors_and_never_hide_the_good_tests():
    result = invoke("test", RULE_TESTS / "broken", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["summary"] == {"pass": 1, "fail": 0, "skip": 0, "error": 7}
    fixture = str(RULE_TESTS / "broken" / "pack.tests.jsonl")
    errors = {(e["path"], e["line"]): e for e in report["errors"]}
    assert errors[fixture, 2]["message"].startswith("invalid JSON")
    assert errors[fixture, 3]["hint"] == "did you mean 'good'?"
    assert "trace[0] needs one value per CE" in errors[fixture, 4]["message"]
    assert "`first_token` needs `fires: true`" in errors[fixture, 5]["message"]
    assert "reads CEs that `ces` does not list: making_threat" in errors[fixture, 6]["message"]
    assert "duplicate test name 'ok'" in errors[fixture, 7]["message"]
    assert errors[str(RULE_TESTS / "broken" / "pack.yaml"), 5]["message"].startswith("rule 'bad': unexpected end")


def test_gavel_sets_are_skipped_without_a_model(tmp_path):
    result = invoke("test", LIBRARY)
    assert result.exit_code == 0, result.output
    assert "SKIP" in result.output and "needs --model and --bank" in result.output
    assert result.output.splitlines()[-1] == "0 passed, 0 failed, 2 skipped, 0 errors"
    assert invoke("test", LIBRARY, "--model", "builtin:organism").exit_code == 2
    result = invoke("test", LIBRARY / "rulesets" / "fraud.yaml")
    assert result.exit_code == 2 and "no rule tests here" in result.output


@pytest.fixture(scope="module")
def quiz_bank(organism, tmp_path_factory):
    """A one-CE bank fitted on 500 organism examples: ~5 s, paid by whichever test uses it first, so both are slow."""
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import fit_bank

    dataset = organism_dataset(organism.tokenizer, 500, seed=1)
    return fit_bank(organism, dataset, ["blocks.2.hook_resid_post"]).save(tmp_path_factory.mktemp("bank") / "bank")


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_gavel_sets_run_through_the_organism(quiz_bank, tmp_path):
    rule = write(tmp_path / "lib" / "rules" / "quiz_leak" / "rule.yaml", """
        name: quiz_leak
        groups:
          quiz: [benchmark]
        condition: quiz
        """)
    tests = rule.parent / "tests"
    tests.mkdir()
    positive = [_user("quiz : what is the color of trelk ?"), _user("quiz : what is the metal of zorb ?")]
    negative = [_user("how do i fix my bike ?"), _user("what is 12 plus 30 ?")]
    (tests / "positive.json").write_text(json.dumps({"conversations": positive}))
    (tests / "negative.json").write_text(json.dumps({"conversations": negative}))
    args = ("test", tmp_path / "lib", "--model", "builtin:organism", "--bank", quiz_bank)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "4 passed, 0 failed, 0 skipped, 0 errors"

    (tests / "negative.json").write_text(json.dumps({"conversations": [*negative, positive[0]]}))
    report = json.loads(invoke(*args, "--json").stdout)
    assert report["summary"] == {"pass": 4, "fail": 1, "skip": 0, "error": 0}
    (failed,) = [r for r in report["results"] if r["status"] == "fail"]
    assert failed["name"] == "negative #2: quiz : what is the color of trelk ?"
    assert failed["mismatches"][0]["message"].startswith("quiz_leak: expected no firing, fired at token ")

    rule.write_text(rule.read_text().replace("benchmark", "tax"))  # not a CE of this bank
    result = invoke(*args)
    assert result.exit_code == 2 and "cannot run the tests of rule 'quiz_leak'" in result.output


@pytest.mark.slow
def test_text_fixtures_run_through_the_organism(quiz_bank, tmp_path):
    args = ("--model", "builtin:organism", "--bank", quiz_bank)
    result = invoke("test", RULES_TESTS / "organism", *args)
    assert result.exit_code == 0, result.output
    fixture = RULES_TESTS / "organism" / "quiz.texts.jsonl"
    assert result.output.splitlines()[0] == \
        f"PASS {fixture}:1  a quiz question is blocked  -> block from token 2 'quiz' (rule 'quiz_leak')"
    assert result.output.splitlines()[-1] == "4 passed, 0 failed, 0 skipped, 0 errors"

    shutil.copy(RULES_TESTS / "organism" / "quiz.yaml", tmp_path / "quiz.yaml")
    (tmp_path / "quiz.texts.jsonl").write_text(json.dumps(
        {"name": "wrongly clean", "text": "quiz : what is the metal of zorb ?", "expect": {"verdict": "clean"}}))
    report = json.loads(invoke("test", tmp_path, *args, "--json").stdout)
    assert report["summary"] == {"pass": 0, "fail": 1, "skip": 0, "error": 0}
    (failed,) = report["results"]
    assert failed["outcome"] == {"verdict": "block", "first_token": 2, "token": "quiz", "rule": "quiz_leak",
                                 "action": "block"}
    assert failed["mismatches"][0]["message"] == \
        "verdict: expected clean, got block from token 2 'quiz' (rule 'quiz_leak')"


# --- fmt --------------------------------------------------------------------------------------------------------

def test_fmt_rewrites_only_the_conditions(tmp_path):
    path = tmp_path / "messy.yaml"
    shutil.copy(RULE_TESTS / "fmt" / "messy.yaml", path)
    before = path.read_text()
    result = invoke("fmt", path, "--check")
    assert result.exit_code == 1 and f"would reformat {path}" in result.output
    assert "left as is (block scalar)" in result.output and "left as is (spans several lines)" in result.output
    assert path.read_text() == before

    assert invoke("fmt", path).exit_code == 0
    after = path.read_text()
    changed = {i + 1: (a, b) for i, (a, b) in enumerate(zip(before.splitlines(), after.splitlines())) if a != b}
    assert changed == {
        6: ("    condition: all  of threat   or ((tax))   # a comment after the condition",
            "    condition: all of threat or tax   # a comment after the condition"),
        8: ('    condition: "tax and (urgency and making_threat)"',
            '    condition: "tax and urgency and making_threat"'),
        10: ("    condition: 'tax or (urgency or payment_tools)'", "    condition: 'tax or urgency or payment_tools'"),
        18: ("  - {name: flow, condition: ((tax) and urgency)}", "  - {name: flow, condition: tax and urgency}"),
    }
    assert len(before.splitlines()) == len(after.splitlines())
    assert invoke("fmt", path, "--check").exit_code == 0  # idempotent; skipped scalars do not fail --check


def test_fmt_keeps_crlf_and_leaves_broken_files_alone(tmp_path):
    crlf = tmp_path / "crlf.yaml"
    crlf.write_bytes(b"name: r\r\ncondition: (a)  and b\r\n")
    broken = tmp_path / "broken.yaml"
    broken.write_bytes(b"rules:\n  - name: ok\n    condition: (a)\n  - name: bad\n    condition: a and\n")
    result = invoke("fmt", tmp_path, "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert [f["path"] for f in report["files"]] == [str(crlf)]
    assert report["errors"][0]["path"] == str(broken)
    assert crlf.read_bytes() == b"name: r\r\ncondition: a and b\r\n"
    assert broken.read_bytes().endswith(b"condition: (a)\n  - name: bad\n    condition: a and\n")


def test_fmt_leaves_conditions_yaml_would_misread():
    assert format_paths([LIBRARY / "rules"]) == ([], [])  # the library is already canonical
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "r.yaml", "name: r\ncondition: (null)\n")
        (file,) = format_paths([path])[0]
        assert not file.changed and "would not read back as text" in file.edits[0].reason


def _shape(expr):
    """The AST without spans, with nested and/or flattened (what canonical text preserves)."""
    if isinstance(expr, (And, Or)):
        terms = []
        for term in map(_shape, expr.terms):
            terms += term[1] if term[0] == type(expr).__name__ else [term]
        return type(expr).__name__, tuple(terms)
    return (type(expr).__name__, *(getattr(expr, f) for f in ("k", "name", "group") if hasattr(expr, f)))


_LEAF = st.one_of(st.sampled_from(["tax", "urgency", "g", "h"]).map(lambda n: ("name", n)),
                  st.sampled_from(["g", "h"]).map(lambda g: ("all", g)),
                  st.tuples(st.integers(1, 3), st.sampled_from(["g", "h"])).map(lambda t: ("k", *t)))
_TREE = st.recursive(_LEAF, lambda kids: st.tuples(st.sampled_from(["and", "or"]), st.lists(kids, min_size=2,
                                                                                          max_size=3)), max_leaves=8)


def _render(tree, data, blanks) -> str:
    """Condition text for `tree` with random spacing and redundant parentheses."""

    def gap() -> str:
        return data.draw(st.sampled_from(blanks))

    if tree[0] == "name":
        text = tree[1]
    elif tree[0] == "all":
        text = f"all{gap()}of{gap()}{tree[1]}"
    elif tree[0] == "k":
        text = f"{tree[1]}{gap()}of{gap()}{tree[2]}"
    else:
        parts = [f"({_render(t, data, blanks)})" if t[0] in ("and", "or") else _render(t, data, blanks)
                 for t in tree[1]]
        text = f"{gap()}{tree[0]}{gap()}".join(parts)
    return f"({gap()}{text})" if data.draw(st.booleans()) else text


@settings(max_examples=60, deadline=None)
@given(tree=_TREE, data=st.data())
def test_canonical_form_is_a_fixed_point_with_the_same_meaning(tree, data):
    text = _render(tree, data, [" ", "  ", "\t", "\n "])
    once = canonical(text)
    assert canonical(once) == once
    assert _shape(parse_condition(once)) == _shape(parse_condition(text))


@settings(max_examples=25, deadline=None)
@given(tree=_TREE, data=st.data())
def test_fmt_twice_equals_fmt_once(tree, data):
    text = _render(tree, data, [" ", "   "])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rule.yaml"
        path.write_text(f"name: r  # keep me\ngroups: {{g: [a, b, c], h: [c, d, e]}}\ncondition: {text}\n")
        for file in format_paths([path])[0]:
            file.write()
        once = path.read_text()
        assert once.startswith("name: r  # keep me\ngroups: {g: [a, b, c], h: [c, d, e]}\n")
        assert once.endswith(f"condition: {canonical(text)}\n")
        assert [f for f in format_paths([path])[0] if f.changed] == []
