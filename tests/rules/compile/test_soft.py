"""Soft rule scores: on probabilities of exactly 0 and 1 they equal the boolean program on random rules and traces;
on other probabilities each operator is the fuzzy one it names (min, max, k-th largest, running max)."""
import random

import pytest
import rules.compile.test_temporal as temporal
import torch
from helpers.rule_traces import P_CES, rule
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.rules import compile_rules
from gavel.rules.compile.soft import SoftRules

CES = ["a", "b", "c"]


@settings(max_examples=120, deadline=None)
@given(temporal.rule_sets(), st.permutations([*P_CES, "noise"]), st.integers(0, 2**32 - 1))
def test_soft_values_on_crisp_scores_are_the_boolean_program(rules, ce_names, seed):
    """The independent reference is the compiled program: probabilities 0/1, thresholds strictly between."""
    program = compile_rules(rules, ce_names)
    soft = SoftRules(rules, ce_names)
    rng = random.Random(seed)
    for _ in range(5):
        length = rng.randint(0, 14)
        scores = torch.tensor([[float(rng.random() < 0.4) for _ in ce_names] for _ in range(length)]).reshape(
            length, len(ce_names))
        classes = torch.tensor([rng.randrange(8) for _ in range(length)], dtype=torch.long)
        holds = program.run((scores > 0.5)[None], scores=scores[None], roles=classes[None])[0]
        values = soft.values(scores, classes)
        for r, defined in enumerate(soft.defined):
            assert defined   # no plugin functions in these rules
            assert values[:, r].tolist() == holds[:, r].double().tolist(), \
                f"{rules[r].condition}: {values[:, r].tolist()} != {holds[:, r].int().tolist()}"


def soft_of(condition: str, scores: list[list[float]], **kwargs) -> list[float]:
    values = SoftRules([rule(condition, **kwargs)], CES).values(torch.tensor(scores, dtype=torch.float64))
    return [round(v, 6) for v in values[:, 0].tolist()]


@pytest.mark.parametrize("condition, expected", [
    ("a and b", [0.2, 0.3, 0.1]),
    ("a or b", [0.7, 0.9, 0.8]),
    ("not a", [0.3, 0.1, 0.2]),
    ("2 of (a, b, c)", [0.5, 0.5, 0.2]),
    ("all of (a, b, c)", [0.2, 0.3, 0.1]),
    ("once a", [0.7, 0.9, 0.9]),
    ("once a within 1 tokens", [0.7, 0.9, 0.8]),
    ("a for 2 tokens", [0.0, 0.7, 0.8]),
    ("b then a within 2 tokens", [0.0, 0.2, 0.3]),
    ("count(a) >= 2", [0.0, 0.7, 0.8]),
    ("a > 0.75", [0.0, 1.0, 1.0]),
])
def test_each_operator_is_its_fuzzy_counterpart(condition, expected):
    #         a    b    c
    scores = [[0.7, 0.2, 0.5],
              [0.9, 0.3, 0.5],
              [0.8, 0.1, 0.2]]
    assert soft_of(condition, scores) == expected


def test_conversation_mode_latches_and_exceptions_subtract():
    scores = [[0.7, 0.2, 0.0], [0.1, 0.6, 0.0]]
    assert soft_of("a and b", scores, match="conversation") == [0.2, 0.6]    # min(once a, once b)
    rules = [rule("a", exceptions=["b"])]
    assert SoftRules(rules, CES).values(torch.tensor(scores))[:, 0].tolist() == pytest.approx([0.7, 0.1])


def test_scores_are_the_highest_value_and_plugin_functions_have_none():
    soft = SoftRules([rule("a and b")], CES)
    assert soft.scores(torch.tensor([[0.7, 0.2, 0.0], [0.4, 0.4, 0.0]])) == pytest.approx([0.4])
    assert soft.scores(torch.zeros(0, 3)) == [0.0]
