"""benchmarks/detection_report.py: its metric helpers against brute-force references, and one run of the whole script
on the organism over a tiny GAVEL-shaped library, its figures checked against the bank scored without the monitor."""
import importlib.util
import json
import sys

import pytest
import torch
import yaml
from helpers import paths

from gavel.models.chat import encode_conversation
from gavel.models.collect import collect_activations
from gavel.probes.bootstrap import percentile_interval, resample_counts, weighted_auroc
from gavel.probes.metrics import auroc

_spec = importlib.util.spec_from_file_location("detection_report", paths.REPO / "benchmarks" / "detection_report.py")
report_script = sys.modules.setdefault("detection_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(report_script)   # registered first: its dataclasses look their module up

CES = ("refusal", "arithmetic")


def test_weighted_auroc_is_auroc_over_repeated_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).double()          # many ties
    labels = torch.rand(60, generator=g) > 0.6
    assert float(weighted_auroc(scores, labels, torch.ones(60))) == pytest.approx(auroc(scores, labels))
    weights = torch.randint(0, 4, (5, 60), generator=g)
    expected = [auroc(scores.repeat_interleave(w), labels.repeat_interleave(w)) for w in weights]
    torch.testing.assert_close(weighted_auroc(scores, labels, weights), torch.tensor(expected, dtype=torch.float64))
    assert weighted_auroc(scores, labels, (~labels).double()).isnan()    # no positive weight


def test_resampling_keeps_each_stratum_and_is_seeded():
    strata = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    counts = resample_counts(strata, 200, seed=4)
    for value, size in ((0, 7), (1, 3), (2, 5)):
        assert (counts[:, strata == value].sum(1) == size).all()
    torch.testing.assert_close(counts, resample_counts(strata, 200, seed=4))
    assert not torch.equal(counts, resample_counts(strata, 200, seed=5))


@pytest.mark.parametrize("max_fpr", [0.01, 0.1, 0.25])
@pytest.mark.parametrize("ties", [False, True])
def test_tpr_on_a_pool_is_the_best_threshold_by_brute_force(max_fpr, ties):
    g = torch.Generator().manual_seed(1)
    positives, pool = torch.randn(80, generator=g) + 1.5, torch.randn(150, generator=g)
    if ties:
        positives, pool = positives.round(), pool.round()
    best = 0.0
    for t in torch.cat([positives, pool, torch.tensor([-torch.inf])]).tolist():
        if float((pool > t).double().mean()) <= max_fpr:
            best = max(best, float((positives > t).double().mean()))
    assert report_script.tpr_on_pool(positives, pool, max_fpr) == pytest.approx(best)


def test_intervals_hold_the_point_estimate_and_planted_scores_get_their_auc():
    g = torch.Generator().manual_seed(2)
    labels = torch.rand(300, generator=g) > 0.5
    noisy = labels.double() + torch.randn(300, generator=g)
    strata = labels.long()
    for figure in (report_script.auc_interval(noisy, labels, strata, 300, 0),
                   report_script.rate_interval(noisy[labels] > 0.5, 300, 0),
                   report_script.pool_interval(noisy[labels], noisy[~labels], 300, 0)):
        assert figure.low <= figure.value <= figure.high and figure.high - figure.low < 0.3
    perfect = report_script.auc_interval(labels.double(), labels, strata, 100, 0)
    assert (perfect.value, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
    # length-matched data: both classes draw their lengths from one distribution
    lengths = torch.randint(20, 60, (300,), generator=g).double()
    assert report_script.auc_interval(lengths, labels, strata, 100, 0).value == pytest.approx(0.5, abs=0.08)
    assert percentile_interval(torch.tensor([float("nan")] * 3)) != percentile_interval(torch.ones(3))


def test_subsample_is_a_seeded_choice_in_order():
    items = list(range(50))
    chosen = report_script.subsample(items, 7)
    assert len(chosen) == 7 and chosen == sorted(chosen) and chosen == report_script.subsample(items, 7)
    assert report_script.subsample(items, None) == items == report_script.subsample(items, 80)


def _record(example, wanted):
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    spans = [{"ce": s.ce, "message": s.message, "start": s.start, "end": s.end} for s in example.spans
             if s.ce in wanted and example.messages[s.message].role == "assistant"]
    return messages, spans


def _write_split(root, seed: int, n: int) -> dict:
    """A GAVEL library split from the organism corpus: ces/<ce>/{ce.yaml,excitation.json,calibration.json} with
    labelled records, a rule's test sets (refusals against arithmetic replies), and the neutral conversations."""
    from gavel.organism import corpus

    records = {c: [] for c in CES}
    neutral, refusals, sums = [], [], []
    for example in corpus.generate_corpus(n, seed):
        messages, spans = _record(example, CES)
        if messages[-1]["role"] != "assistant":
            continue
        carried = sorted({s["ce"] for s in spans})
        if not {s.ce for s in example.spans}:
            neutral.append(messages)
        if carried:
            records[carried[0]].append({"conversation": messages, "spans": spans, "ces": list(CES)})
            (refusals if "refusal" in carried else sums).append(messages)
    for i, name in enumerate(CES):
        folder = root / "ces" / name
        folder.mkdir(parents=True)
        (folder / "ce.yaml").write_text(yaml.safe_dump({"name": name, "title": name, "role": "llm_behavior"}))
        mine = records[name] + [{"conversation": c, "ces": list(CES)} for c in neutral[i::2][:15]]
        (folder / "excitation.json").write_text(json.dumps({"conversations": mine[::2]}))
        (folder / "calibration.json").write_text(json.dumps({"conversations": mine[1::2]}))
    tests = root / "rules" / "refusing" / "tests"
    tests.mkdir(parents=True)
    (tests / "positive.json").write_text(json.dumps({"conversations": refusals[:15]}))
    (tests / "negative.json").write_text(json.dumps({"conversations": sums[:15]}))
    return {"neutral": neutral}


@pytest.mark.slow
def test_the_script_end_to_end_on_the_organism(organism, organism_bank, tmp_path):
    train = _write_split(tmp_path / "train", seed=31, n=260)
    test = _write_split(tmp_path / "test", seed=32, n=200)
    benign = tmp_path / "benign.jsonl"
    pool = test["neutral"][30:]           # the first 30 are the CE files' neutral conversations
    benign.write_text("".join(json.dumps({"conversation": c}) + "\n" for c in pool))
    assert train["neutral"] and len(pool) > 10
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{"name": "refusing", "title": "refusal", "groups": {"r": ["refusal"]},
                                                "condition": "all of r", "action": "alert", "severity": "low"}]}))
    bank = organism_bank.save(tmp_path / "bank")
    out_json, out_md = tmp_path / "report.json", tmp_path / "figures.md"
    argv = ["--model", "builtin:organism", "--bank", str(bank), "--rules", str(rules), "--train",
            str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--benign", str(benign), "--seeds", "2",
            "--resamples", "60", "--out-json", str(out_json), "--out-md", str(out_md), "--compare-bank", str(bank)]
    report = report_script.main(argv)
    assert report_script.DetectionReport.model_validate_json(out_json.read_text()) == report
    assert [c.ce for c in report.ces] == [n for n in organism_bank.names if n in CES]

    # the reference: the bank scored on collected activations, no monitor
    split = report_script.library_ces(tmp_path / "test", organism.tokenizer)
    items = [i for i in split.items if i.scope.any()]
    encoded = [encode_conversation(organism.tokenizer, i.conversation) for i in items]
    acts = collect_activations(organism, encoded, organism_bank.sites)
    probs = organism_bank.score_rows(acts.sites, acts.example)
    for figure in report.ces:
        j, col = organism_bank.index(figure.ce), split.names.index(figure.ce)
        per = [probs[acts.example == n, j] for n in range(len(items))]
        conv = torch.tensor([float(p[i.scope].max()) for p, i in zip(per, items)])
        positive = torch.tensor([bool(i.labels[:, col].any()) for i in items])
        tokens = torch.cat([p[i.scope] for p, i in zip(per, items)])
        labels = torch.cat([i.labels[i.scope, col] for i in items])
        assert figure.conversation_auroc.value == pytest.approx(auroc(conv, positive), abs=1e-6)
        assert figure.token_auroc.value == pytest.approx(auroc(tokens, labels), abs=1e-6)
        assert figure.token_auroc.value > 0.9 and figure.conversation_auroc.value > 0.9
        assert figure.positives == int(positive.sum()) and figure.benign == len(pool)
        assert len(figure.random_auroc.values) == 2 and len(figure.bow_auroc.values) == 2
        assert figure.length_auroc.low <= figure.length_auroc.value <= figure.length_auroc.high
        # the same bank compared with itself, through its own monitor: the same figures and intervals
        compared = figure.compared
        assert (compared.token_auroc, compared.conversation_auroc, compared.tpr_at_benign_fpr) == (
            figure.token_auroc, figure.conversation_auroc, figure.tpr_at_benign_fpr)
        assert compared.benign_fpr_at_threshold == figure.benign_fpr_at_threshold
        assert compared.read_at == figure.read_at and compared.kind == "linear"
    (rule,) = report.rules
    assert (rule.rule, rule.positives, rule.negatives, rule.benign) == ("refusing", 15, 15, len(pool))
    assert rule.fire_tpr.value > 0.8 and rule.score_auc.value > 0.9 and rule.bow_auc is not None
    assert report.targets[0].target == "per-CE conversation AUROC >= 0.95"
    text = out_md.read_text()
    assert f"| refusing | 15 / 15 / {len(pool)} |" in text and report.command in text and "## Targets" in text
    assert f"beside `{bank}`" in text and report.compare_bank == str(bank)
