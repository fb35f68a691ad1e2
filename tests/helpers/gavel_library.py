"""A GAVEL-shaped CE library written from organism conversations, for fitting tests (tests/probes, tests/cli)."""
from __future__ import annotations

import json

import yaml


def gavel_library(root, tokenizer, calibration=False):
    """A GAVEL ces/ folder written from organism conversations (assistant turns carry the CE); with `calibration`,
    each CE also gets calibration.json: multi-turn conversations, a neutral exchange then one with the CE."""
    from gavel.organism import corpus

    wanted = ("refusal", "harmful_compliance", "arithmetic")
    convs = {n: [] for n in wanted}
    only = {n: [] for n in wanted}
    neutral = []
    for ex in corpus.generate_corpus(1400, seed=9):
        messages = [{"role": m.role, "content": m.content} for m in ex.messages]
        carried = {s.ce for s in ex.spans if ex.messages[s.message].role == "assistant"} & set(wanted)
        for name in carried:
            convs[name].append(messages)
        if len(carried) == 1:
            only[carried.pop()].append(messages)
        if not {s.ce for s in ex.spans} and messages[-1]["role"] == "assistant":
            neutral.append(messages)
    for name, conversations in convs.items():
        folder = root / "ces" / name
        folder.mkdir(parents=True)
        (folder / "ce.yaml").write_text(yaml.safe_dump({"name": name, "title": name.title(), "role": "llm_behavior",
                                                        "definition": f"the assistant shows {name}"}))
        (folder / "excitation.json").write_text(json.dumps({"conversations": conversations[:80]}))
        if calibration:
            multi_turn = [[m for m in first if m["role"] != "system"] + [m for m in second if m["role"] != "system"]
                          for first, second in zip(neutral[::-1], only[name][-20:])]
            (folder / "calibration.json").write_text(json.dumps({"conversations": multi_turn}))
    return root / "ces"
