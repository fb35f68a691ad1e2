"""The English CE dataset (data/english): what is committed is what build.py makes, the splits share no passage, the
labels mark exactly the passages, length tells positives from hard negatives no better than chance, and gavel's own
loaders read every file."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from gavel.io.conversations import read_test_set
from gavel.probes.metrics import auroc

ROOT = Path(__file__).resolve().parents[2] / "data" / "english"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("english_build", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["english_build"] = module
    spec.loader.exec_module(module)
    return module


def fragments() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "fragments").glob("*.yaml"))}


def samples(split: str, ce: str, which: str) -> list[dict]:
    return json.loads((ROOT / split / "ces" / ce / f"{which}.json").read_text(encoding="utf-8"))["samples"]


def test_enough_ces_passages_and_benign_conversations():
    ces = {k: v for k, v in fragments().items() if k != "benign"}
    assert len(ces) >= 12
    for name, data in ces.items():
        assert len(data["positive"]) >= 110 and len(data["hard_negative"]) >= 110, name
        assert not set(data["positive"]) & set(data["hard_negative"]), name
    for name in ces:
        positives = sum(1 for split in ("train", "test") for s in samples(split, name, "excitation")
                        if any(sp["ce"] == name for sp in s.get("spans", [])))
        assert positives >= 150, name
    assert len((ROOT / "benign" / "test.jsonl").read_text(encoding="utf-8").splitlines()) >= 300


def test_no_test_sentence_is_in_the_training_split(build):
    """Every assistant message of the test split is built from passages the hash put in the test split only."""
    ces = {k: v for k, v in fragments().items() if k != "benign"}
    train_text = "\n".join(json.dumps(samples("train", n, w)) for n in ces for w in ("excitation", "calibration"))
    for name, data in ces.items():
        for passage in data["positive"] + data["hard_negative"]:
            if build.split_of("passage", passage) == "test":
                assert json.dumps(passage)[1:-1] not in train_text, (name, passage)


def test_spans_mark_whole_passages_of_their_ce():
    ces = {k: v for k, v in fragments().items() if k != "benign"}
    for name in ces:
        for record in samples("test", name, "calibration"):
            for span in record.get("spans", []):
                text = record["conversation"][span["message"]]["content"][span["start"]:span["end"]]
                assert text in ces[span["ce"]]["positive"], (span, text)


def test_length_does_not_tell_positives_from_hard_negatives():
    """The AUROC of message length, positive vs hard-negative messages of the same CE, stays near chance."""
    import torch

    ces = [k for k in fragments() if k != "benign"]
    for name in ces:
        records = samples("train", name, "excitation") + samples("test", name, "excitation")
        own = [r for r in records if r["conversation"][-1]["role"] == "assistant" and len(r["conversation"]) == 2]
        lengths = torch.tensor([float(len(r["conversation"][1]["content"])) for r in own])
        labels = torch.tensor([any(s["ce"] == name for s in r.get("spans", [])) for r in own])
        assert 0.35 < auroc(lengths, labels) < 0.65, (name, auroc(lengths, labels))


def test_gavel_reads_the_libraries_and_rule_tests(organism):
    """The test split's CE files through gavel's loader (the training split is read by every `ce fit` of the pack);
    both splits' rules and rule tests."""
    from gavel.probes.data import load_dataset
    from gavel.rules import load_rules

    data = load_dataset(str(ROOT / "test"), organism.tokenizer, which="calibration")
    assert len(data.names) >= 12 and all(pos > 0 for pos, _ in data.support().values())
    for split in ("train", "test"):
        rules = load_rules(sorted((ROOT / split / "rules").glob("*/rule.yaml")))
        assert len(rules) == 10
        for rule in rules:
            tests = ROOT / split / "rules" / rule.name / "tests"
            assert read_test_set(tests / "positive.json").conversations
            assert read_test_set(tests / "negative.json").conversations


def test_the_committed_files_are_what_build_makes(build, tmp_path):
    build.build_split("test", 0, out=tmp_path)
    files = [*(ROOT / "test").rglob("*"), ROOT / "benign" / "test.jsonl"]
    committed = {p.relative_to(ROOT): p.read_bytes() for p in files if p.is_file()}
    built = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert committed == built
