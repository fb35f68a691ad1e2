"""The hand-written English request sets (data/english/requests): every file parses, ids are unique, the counts and
the per-category minimum hold, no prompt is shared between files or repeated within one, and arithmetic answers are
integers."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "data" / "english" / "requests"
MINIMUM = {"harmful": 160, "benign": 160, "arithmetic": 120}


def rows(name: str) -> list[dict]:
    lines = (ROOT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def text(name: str, row: dict) -> str:
    return row["question"] if name == "arithmetic" else row["prompt"]


def normalise(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_file_parses_with_unique_ids_and_enough_rows(name):
    data = rows(name)
    assert len(data) >= MINIMUM[name]
    ids = [r["id"] for r in data]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    for r in data:
        assert isinstance(text(name, r), str) and text(name, r).strip(), r
        if name != "arithmetic":
            assert isinstance(r["category"], str) and r["category"], r


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_no_two_prompts_in_a_file_are_the_same(name):
    counts = Counter(normalise(text(name, r)) for r in rows(name))
    assert not [p for p, n in counts.items() if n > 1]


def test_every_harmful_category_has_at_least_ten_items():
    counts = Counter(r["category"] for r in rows("harmful"))
    assert len(counts) >= 10
    assert all(n >= 10 for n in counts.values()), counts


def test_no_prompt_is_in_two_files():
    seen: dict[str, str] = {}
    for name in sorted(MINIMUM):
        for r in rows(name):
            key = normalise(text(name, r))
            assert seen.setdefault(key, name) == name, (key, seen[key], name)


def test_arithmetic_answers_are_integers():
    for r in rows("arithmetic"):
        assert type(r["answer"]) is int, r
