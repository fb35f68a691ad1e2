"""A naive reference evaluator for GAVEL conditions, written independently of gavel.rules.compiler.

Rules are plain trees: ("name", n) | ("all", g) | ("k", k, g) | ("and", [t...]) | ("or", [t...]).
A CE is detected from the first active token where it fires; a rule holds at a token when its
condition holds over the CEs detected so far. Plain Python over whole traces, slow on purpose.
"""
from __future__ import annotations


def holds(tree, groups: dict[str, list[str]], detected: set[str]) -> bool:
    """Does the condition tree hold for this set of detected CE names?"""
    kind = tree[0]
    if kind == "name":
        name = tree[1]
        if name in groups:
            return any(ce in detected for ce in groups[name])
        return name in detected
    if kind == "all":
        return all(ce in detected for ce in groups[tree[1]])
    if kind == "k":
        return len(set(groups[tree[2]]) & detected) >= tree[1]
    if kind == "and":
        return all(holds(t, groups, detected) for t in tree[1])
    if kind == "or":
        return any(holds(t, groups, detected) for t in tree[1])
    raise ValueError(kind)


def run(rules, ce_names: list[str], fired: list[list[list[bool]]], mask: list[list[bool]] | None):
    """rules: [(groups, tree)]; fired[b][t][c]; mask[b][t] -> out[b][t][r]."""
    out = []
    for b, sequence in enumerate(fired):
        detected: set[str] = set()
        rows = []
        for t, flags in enumerate(sequence):
            if mask is None or mask[b][t]:
                detected |= {ce for ce, on in zip(ce_names, flags) if on}
            rows.append([holds(tree, groups, detected) for groups, tree in rules])
        out.append(rows)
    return out
