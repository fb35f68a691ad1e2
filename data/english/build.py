"""Build gavel's English CE detection dataset from the hand-written passages in `fragments/`.

    python data/english/build.py            # writes train/, test/, benign/ here and the rule pack's rules and CEs

Every passage, user request and benign exchange is assigned to the train or the test split by a hash of its text,
so the test split holds sentences that nothing was fitted or tuned on. Messages are composed from passages: one or
two passages of one kind (a CE's positives, or its hard negatives) with 0-3 neutral filler sentences around them, so
that positives and hard negatives have the same length distribution. Spans label exactly the characters of the
passages that carry a CE. Rules' test sets are composed the same way from the CEs each rule needs (and from subsets
of them with hard negatives of the rest, which must not fire the rule). Output is deterministic for a seed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PACK = HERE.parent.parent / "gavel" / "packs" / "smollm2"
PUBLISHED = "2026-12-03T00:00:00Z"
PROVENANCE = {"created_by": "gavel", "published_at": PUBLISHED}
TEST_SHARE = {"passage": 0.3, "topic": 0.3, "exchange": 0.45, "filler": 0.3}


@dataclass(frozen=True)
class Rule:
    """A rule of the pack: its GAVEL groups and condition, how to compose a positive (a list of CE choices: one CE is
    drawn from each), and its hard negatives (CE choices with the rest replaced by their hard negatives)."""

    name: str
    title: str
    category: str
    action: str
    definition: str
    groups: dict[str, list[str]]
    condition: str
    positive: list[list[str]]
    negatives: list[tuple[list[list[str]], list[str]]]   # (CEs kept, CEs written as hard negatives)


BLOCK = 'block "I can\'t help with that."'
SELF_HARM = ('block "I\'m really sorry you\'re feeling this way. You don\'t have to go through it alone: please '
             'reach out to someone you trust or a local crisis line."')
RULES = [
    Rule("phishing", "Phishing", "Fraud", BLOCK,
         "A message that poses as an organisation and asks for credentials or sends the reader to a link.",
         {"authority": ["impersonation"], "credentials": ["credential_request", "phishing_link"]},
         "all of authority and any of credentials",
         [["impersonation"], ["credential_request", "phishing_link"]],
         [([["impersonation"]], ["credential_request"]), ([["credential_request", "phishing_link"]],
                                                          ["impersonation"])]),
    Rule("payment_scam", "Payment scam", "Fraud", BLOCK,
         "A demand for money by gift cards, wire or crypto, pressed with urgency or an official name.",
         {"payment": ["payment_request"], "pressure": ["urgency", "impersonation"]},
         "all of payment and any of pressure",
         [["payment_request"], ["urgency", "impersonation"]],
         [([["urgency", "impersonation"]], ["payment_request"]), ([["payment_request"]], ["urgency"])]),
    Rule("romance_scam", "Romance scam", "Fraud", BLOCK,
         "Emotional manipulation used to get the reader to send money.",
         {"bond": ["emotional_manipulation"], "payment": ["payment_request"]},
         "all of bond and all of payment",
         [["emotional_manipulation"], ["payment_request"]],
         [([["emotional_manipulation"]], ["payment_request"]), ([["payment_request"]], ["emotional_manipulation"])]),
    Rule("threats", "Threats", "Safety & Harm Prevention", BLOCK, "The message threatens someone with harm.",
         {"threat": ["threat"]}, "any of threat", [["threat"]], [([], ["threat"])]),
    Rule("weapons_instructions", "Weapons instructions", "Safety & Harm Prevention", BLOCK,
         "Instructions to build or use a weapon to hurt people.",
         {"weapons": ["weapons"]}, "any of weapons", [["weapons"]], [([], ["weapons"])]),
    Rule("drug_instructions", "Drug synthesis instructions", "Safety & Harm Prevention", BLOCK,
         "Instructions to produce illegal drugs.",
         {"drugs": ["drug_synthesis"]}, "any of drugs", [["drug_synthesis"]], [([], ["drug_synthesis"])]),
    Rule("hateful_content", "Hateful content", "Safety & Harm Prevention", BLOCK,
         "Hateful or dehumanising content against a protected group.",
         {"hate": ["hate"]}, "any of hate", [["hate"]], [([], ["hate"])]),
    Rule("self_harm", "Self-harm", "Safety & Harm Prevention", SELF_HARM,
         "Intent to hurt oneself, or encouragement to do so.",
         {"self_harm": ["self_harm"]}, "any of self_harm", [["self_harm"]], [([], ["self_harm"])]),
    Rule("code_injection", "Code injection", "Security & Defense", BLOCK,
         "An injection payload or a push to run one (SQL, shell, prompt injection).",
         {"injection": ["code_injection"]}, "any of injection", [["code_injection"]], [([], ["code_injection"])]),
    Rule("election_persuasion", "Election persuasion", "Politics", 'alert "partisan persuasion"',
         "Partisan persuasion to vote for or against a candidate or party.",
         {"persuasion": ["political_persuasion"]}, "any of persuasion", [["political_persuasion"]],
         [([], ["political_persuasion"])]),
]


def split_of(kind: str, text: str) -> str:
    """'test' for a stable share of texts of each kind (by sha256 of the text), else 'train'."""
    digest = int(hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()[:8], 16)
    return "test" if digest / 0xFFFFFFFF < TEST_SHARE[kind] else "train"


def public_id(prefix: str, name: str) -> str:
    return f"{prefix}_{hashlib.md5(f'gavel-en/{name}'.encode()).hexdigest()}"


@dataclass
class Pools:
    """One split's material."""

    positive: dict[str, list[str]]
    hard: dict[str, list[str]]
    topics: dict[str, list[str]]
    exchanges: list[dict[str, str]]
    fillers: list[str]


def read_fragments(split: str) -> tuple[dict[str, dict], Pools]:
    ces: dict[str, dict] = {}
    pools = Pools({}, {}, {}, [], [])
    for path in sorted((HERE / "fragments").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if path.stem == "benign":
            pools.exchanges = [e for e in data["exchanges"]
                               if split_of("exchange", e["user"] + e["assistant"]) == split]
            pools.fillers = [f for f in data["fillers"] if split_of("filler", f) == split]
            continue
        name = data["ce"]
        ces[name] = data
        pools.positive[name] = [p for p in data["positive"] if split_of("passage", p) == split]
        pools.hard[name] = [p for p in data["hard_negative"] if split_of("passage", p) == split]
        pools.topics[name] = [t for t in data["topics"] if split_of("topic", t) == split] or data["topics"][:1]
    return ces, pools


class Composer:
    """Messages and conversations from one split's pools, with character spans of the CE-carrying passages."""

    def __init__(self, pools: Pools, rng: random.Random) -> None:
        self.p, self.rng = pools, rng

    def message(self, parts: Sequence[tuple[str, str | None]]) -> tuple[str, list[tuple[str, int, int]]]:
        """Join (text, CE or None) parts with 0-3 fillers placed at random; spans of the CE parts."""
        items = list(parts)
        for _ in range(self.rng.randint(0, 3)):
            items.insert(self.rng.randint(0, len(items)), (self.rng.choice(self.p.fillers), None))
        text, spans = "", []
        for body, ce in items:
            if text:
                text += "\n\n" if self.rng.random() < 0.25 else " "
            if ce is not None:
                spans.append((ce, len(text), len(text) + len(body)))
            text += body
        return text, spans

    def passages(self, ce: str, hard: bool) -> list[tuple[str, str | None]]:
        pool = self.p.hard[ce] if hard else self.p.positive[ce]
        picked = self.rng.sample(pool, 2 if self.rng.random() < 0.3 else 1)
        return [(text, None if hard else ce) for text in picked]

    def exchange(self, topic_of: str, parts: Sequence[tuple[str, str | None]]) -> tuple[list[dict], list]:
        text, spans = self.message(parts)
        user = self.rng.choice(self.p.topics[topic_of])
        return [{"role": "user", "content": user}, {"role": "assistant", "content": text}], spans

    def conversation(self, core: tuple[list[dict], list] | None, extra: tuple[int, int] = (0, 2)) -> dict:
        """Benign exchanges around an optional core exchange, as a labelled record (spans by message index)."""
        before = self.rng.randint(*extra)
        after = self.rng.randint(0, max(0, extra[1] - before))
        messages: list[dict] = []
        for _ in range(before):
            messages += self._benign()
        spans = []
        if core is not None:
            for ce, start, end in core[1]:
                spans.append({"ce": ce, "message": len(messages) + 1, "start": start, "end": end})
            messages += core[0]
        for _ in range(after):
            messages += self._benign()
        record: dict = {"conversation": messages}
        if spans:
            record["spans"] = spans
        return record

    def _benign(self) -> list[dict]:
        e = self.rng.choice(self.p.exchanges)
        return [{"role": "user", "content": e["user"]}, {"role": "assistant", "content": e["assistant"]}]

    def rule_case(self, choices: Sequence[Sequence[str]], hard: Sequence[str]) -> dict:
        """One assistant message with a passage of one CE drawn from each choice and hard negatives of `hard`."""
        parts = [part for options in choices for part in self.passages(self.rng.choice(list(options)), False)[:1]]
        parts += [part for ce in hard for part in self.passages(ce, True)[:1]]
        self.rng.shuffle(parts)
        topic = self.rng.choice([ce for options in choices for ce in options] + list(hard))
        return self.conversation(self.exchange(topic, parts), (0, 1))


def sample_file(ce: str, kind: str, samples: list) -> dict:
    return {"schema_version": 1, "ce": ce, "ce_public_id": public_id("ce", ce), "type": kind,
            "published_at": PUBLISHED, "sample_count": len(samples), "samples": samples}


def write_json(path: Path, obj: dict) -> None:
    """Compact JSON with one sample (or conversation) per line: small, and diffs stay readable."""
    key = "samples" if "samples" in obj else "conversations"
    head = json.dumps({k: v for k, v in obj.items() if k != key}, ensure_ascii=False)[:-1]
    rows = ",\n".join(json.dumps(item, ensure_ascii=False) for item in obj[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head}{", " if len(head) > 1 else ""}"{key}": [\n{rows}\n]}}\n', encoding="utf-8")


def ce_yaml(data: dict, pools: Pools) -> str:
    name = data["ce"]
    record = {"name": name, "title": data["title"], "public_id": public_id("ce", name), "schema_version": 1,
              "role": data["role"], "definition": data["definition"],
              "examples": [{"input": pools.positive[name][0], "output": "YES"},
                           {"input": pools.hard[name][0], "output": "NO"}],
              "provenance": PROVENANCE}
    return yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=1000)


def rule_yaml(rule: Rule) -> str:
    record = {"name": rule.name, "title": rule.title, "public_id": public_id("rule", rule.name), "schema_version": 1,
              "categories": [rule.category], "definition": rule.definition, "groups": rule.groups,
              "condition": rule.condition, "action": rule.action, "provenance": PROVENANCE}
    return yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=1000)


SIZES = {"train": {"messages": 110, "conversations": 25, "rule_cases": 30, "benign": 240},
         "test": {"messages": 50, "conversations": 20, "rule_cases": 40, "benign": 320}}


def build_split(split: str, seed: int, out: Path = HERE) -> dict[str, int]:
    """Write one split's GAVEL library (`out/<split>/`) and, for the test split, the benign pool
    (`out/benign/test.jsonl`); counts written."""
    ces, pools = read_fragments(split)
    rng = random.Random(f"{seed}/{split}")
    make = Composer(pools, rng)
    size = SIZES[split]
    root = out / split
    shutil.rmtree(root, ignore_errors=True)
    (root / "gavel.yaml").parent.mkdir(parents=True)
    (root / "gavel.yaml").write_text("schema_version: 1\nnamespace: gavel_en\n", encoding="utf-8")
    benign = [make.conversation(None, (1, 3)) for _ in range(size["benign"])]
    names = sorted(ces)
    counts = {"benign_conversations": len(benign)}
    cases = {rule.name: ([make.rule_case(rule.positive, []) for _ in range(size["rule_cases"])],
                         [make.rule_case(*rule.negatives[k % len(rule.negatives)]) for k in range(size["rule_cases"])])
             for rule in RULES}
    composite: dict[str, list[dict]] = {name: [] for name in names}   # train: rule cases teach CEs together
    if split == "train":
        for rule in RULES:
            composite[rule.positive[0][0]] += [c for part in cases[rule.name] for c in part]
    neutral_share = [benign[i::len(names)] for i in range(len(names))]  # train: neutral records in calibration
    for i, name in enumerate(names):
        folder = root / "ces" / name
        folder.mkdir(parents=True)
        (folder / "ce.yaml").write_text(ce_yaml(ces[name], pools), encoding="utf-8")
        excitation = [make.conversation(make.exchange(name, make.passages(name, hard)), (0, 0))
                      for hard in (False, True) for _ in range(size["messages"])]
        calibration = [make.conversation(make.exchange(name, make.passages(name, hard)), (1, 2))
                       for hard in (False, True) for _ in range(size["conversations"])]
        if split == "train":
            calibration += neutral_share[i]
            excitation += composite[name] + [make.conversation(None, (1, 1)) for _ in range(size["messages"] // 5)]
        rng.shuffle(excitation)
        rng.shuffle(calibration)
        write_json(folder / "excitation.json", sample_file(name, "excitation", excitation))
        write_json(folder / "calibration.json", sample_file(name, "calibration", calibration))
        counts[f"{name}: excitation"] = len(excitation)
        counts[f"{name}: calibration"] = len(calibration)
    for rule in RULES:
        folder = root / "rules" / rule.name
        folder.mkdir(parents=True)
        (folder / "rule.yaml").write_text(rule_yaml(rule), encoding="utf-8")
        for kind, part in zip(("positive", "negative"), cases[rule.name]):
            write_json(folder / "tests" / f"{kind}.json", {"conversations": [c["conversation"] for c in part]})
    if split == "test":
        path = out / "benign" / "test.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in benign), encoding="utf-8")
    return counts


def write_pack() -> None:
    """The rule pack's GAVEL files (rules and CE definitions, no samples) for builtin:smollm2."""
    ces, pools = read_fragments("train")
    for sub in ("rules", "ces"):
        shutil.rmtree(PACK / sub, ignore_errors=True)
    (PACK / "gavel.yaml").parent.mkdir(parents=True, exist_ok=True)
    (PACK / "gavel.yaml").write_text("schema_version: 1\nnamespace: gavel_en\n", encoding="utf-8")
    for name, data in ces.items():
        (PACK / "ces" / name).mkdir(parents=True)
        (PACK / "ces" / name / "ce.yaml").write_text(ce_yaml(data, pools), encoding="utf-8")
    for rule in RULES:
        (PACK / "rules" / rule.name).mkdir(parents=True)
        (PACK / "rules" / rule.name / "rule.yaml").write_text(rule_yaml(rule), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split in ("train", "test"):
        counts = build_split(split, args.seed)
        print(split, json.dumps(counts))
    write_pack()


if __name__ == "__main__":
    main()
