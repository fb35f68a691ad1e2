"""Audits over GAVEL rule test sets: the envelope read unchanged and checked (located errors), folders and several
`--data`, labels per rule, and the continuous rule score's AUC against an independent computation."""
import json
import shutil

import pytest
import torch
from helpers import paths
from helpers.audit import PACK
from typer.testing import CliRunner

from gavel.audit.local import run_audit
from gavel.cli import app
from gavel.errors import DataError
from gavel.io.conversations import read_audit_data, read_test_set
from gavel.probes.metrics import auroc
from gavel.runtime.guard import Guard

RULES = paths.FIXTURES / "audit_rules" / "rules"
HARM = ["threat", "weapons", "fraud", "self_harm", "hate"]


def test_the_envelope_is_read_unchanged():
    test_set = read_test_set(RULES / "quiz" / "tests" / "positive_calibration.json")
    assert (test_set.rule, test_set.type, test_set.label) == ("quiz", "positive_calibration", True)
    raw = json.loads((RULES / "quiz" / "tests" / "negative.json").read_text())
    negative = read_test_set(RULES / "quiz" / "tests" / "negative.json")
    assert negative.conversations == raw["conversations"] and negative.label is False


def test_folders_and_files_expand_in_order(tmp_path):
    items = read_audit_data([RULES])
    assert [(i.rule, i.label) for i in items] == [("harm", False), ("harm", True), ("quiz", False), ("quiz", False),
                                                  ("quiz", True), ("quiz", True), ("quiz", True)]
    assert len(read_audit_data([RULES / "quiz"])) == 5 == len(read_audit_data(RULES / "quiz" / "tests"))
    lines = tmp_path / "extra.jsonl"
    lines.write_text('{"prompt": "hello", "label": false}\n')
    both = read_audit_data([RULES / "harm", lines])
    assert [(i.source.endswith("extra.jsonl"), i.rule, i.label) for i in both][-1] == (True, None, False)
    with pytest.raises(DataError, match="no GAVEL test sets"):
        read_audit_data([tmp_path])
    with pytest.raises(DataError, match="no such data file or folder"):
        read_audit_data([tmp_path / "nowhere"])


def _write(tmp_path, name: str, **changes):
    data = json.loads((RULES / "quiz" / "tests" / "positive.json").read_text())
    data.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.mark.parametrize("name, changes, message, key", [
    ("positive.json", {"conversation_count": 3}, "conversation_count is 3 but the file holds 2", "conversation_count"),
    ("negative.json", {}, "named negative.json but its type is 'positive'", "type"),
    ("positive.json", {"schema_version": 2}, "schema_version 2 is not supported", "schema_version"),
    ("positive.json", {"config": {"scenario": "x"}}, "unknown config field 'scenario'", "scenario"),
    ("positive.json", {"conversation": []}, "(?s)unknown field 'conversation'.*did you mean 'conversations'",
     "conversation"),
    ("positive.json", {"type": "neutral"}, "unknown test set type 'neutral'", "type"),
])
def test_envelope_errors_name_the_field_and_its_line(tmp_path, name, changes, message, key):
    path = _write(tmp_path, name, **changes)
    with pytest.raises(DataError, match=message) as caught:
        read_test_set(path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f'"{key}"'))
    assert caught.value.location.line == line and caught.value.excerpt


def test_bad_messages_are_located(tmp_path):
    data = json.loads((RULES / "quiz" / "tests" / "positive.json").read_text())
    data["conversations"][1][1]["role"] = "users"
    path = tmp_path / "positive.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(DataError, match=r"(?s)unknown role 'users'.*did you mean 'user'") as caught:
        read_test_set(path)
    assert caught.value.location.line == path.read_text().splitlines().index('        "role": "users",') + 1


def expected_scores(result, names):
    """The soft scores of the pack's rules computed directly: quiz (`benchmark in user`) is the highest benchmark
    probability at a user content token, harm (`1 of harm`) the highest probability of any harm CE."""
    r = result.record
    seen = r.scores * r.content.unsqueeze(-1)
    user = r.classes == 2
    quiz = float(seen[user, names.index("benchmark")].max()) if user.any() else 0.0
    harm = float(seen[:, [names.index(n) for n in HARM]].max())
    return {"quiz": quiz, "harm": harm}


def test_soft_score_auc_matches_a_direct_computation(organism, organism_bank, tmp_path):
    rules = tmp_path / "pack.yaml"
    rules.write_text(PACK)
    guard = Guard(organism, organism_bank, str(rules))
    items = read_audit_data([RULES])
    report = run_audit(guard, items, generate=False, batch_size=3)
    results = guard.check([i.conversation for i in items])
    direct = [expected_scores(r, organism_bank.names) for r in results]
    for item, d in zip(report.items, direct):
        assert item.rule_scores == pytest.approx(d)
    for stats in report.rules:
        own = [(d[stats.rule], i.label, i.tokens) for d, i in zip(direct, report.items) if i.rule == stats.rule]
        labels = torch.tensor([y for _, y, _ in own])
        assert stats.labelled == len(own) and stats.positives == int(labels.sum())
        assert stats.score_auc == pytest.approx(auroc(torch.tensor([s for s, _, _ in own]), labels))
        assert stats.length_auc == pytest.approx(auroc(torch.tensor([float(n) for _, _, n in own]), labels))
    quiz = next(s for s in report.rules if s.rule == "quiz")
    assert quiz.score_auc == 1.0   # every quiz question outranks every other conversation


def test_the_audit_command_over_a_rules_folder(organism_bank, tmp_path):
    rules, bank = tmp_path / "pack.yaml", tmp_path / "bank"
    rules.write_text(PACK)
    organism_bank.save(bank)
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    lines = tmp_path / "more.jsonl"
    lines.write_text('{"prompt": "how do i fix my bike ?", "label": false}\n')
    args = ["audit", "--data", str(folder), "--data", str(lines), "--bank", str(bank), "--rules", str(rules),
            "--no-generate"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output   # rules fired: findings
    report = json.loads(result.stdout)
    assert len(report["items"]) == 8
    stats = {r["rule"]: r for r in report["rules"]}
    assert stats["quiz"]["labelled"] == 6 and stats["harm"]["labelled"] == 3   # own sets + the unlabelled-rule line
    assert all(stats[r]["score_auc"] is not None for r in stats)
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 1 and "AUC (score)" in table.output
    (folder / "quiz" / "tests" / "positive.json").write_text('{"conversations": 1}')
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 2 and "positive.json" in bad.output
