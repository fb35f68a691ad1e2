"""The rule evaluator, operator by operator: hand-checked traces (which also check the reference evaluator), then
random rules and traces where run, token-by-token step and chunked advance must equal the reference exactly."""
from __future__ import annotations

import random

import pytest
import torch
from helpers import rules_reference
from helpers.rule_traces import (
    CES,
    P_CES,
    SIZES,
    assert_compiled,
    conditions,
    members,
    pack,
    random_trace,
    rule,
    tensors,
    trace,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.rules import RuleSpec, compile_rules
from gavel.rules.compile import program as compiler

# --- each rule's value per token, on a trace written as strings (helpers/rule_traces.py) ---------

def holds(rules: str | RuleSpec | list[RuleSpec], *, lists=None, macros=None, roles=None, mask=None,
          **ces) -> str | dict[str, str]:
    """Each public rule's value per token ('0'/'1'), by the reference; the compiler must agree exactly."""
    rules = [rule(rules)] if isinstance(rules, str) else [rules] if isinstance(rules, RuleSpec) else rules
    if lists or macros:
        rules = pack(rules, lists=lists, macros=macros)
    length = len(next(iter(ces.values())))
    fired, scores, role, valid = trace(length, roles, mask, ces)
    expected = rules_reference.run(rules, CES, fired, valid, scores=scores, roles=role)
    assert_compiled(compile_rules(rules, CES), fired, scores, role, valid, expected)
    names = [r.name for r in rules if not r.private]
    out = {n: "".join(str(int(expected[0][t][i])) for t in range(length)) for i, n in enumerate(names)}
    return out[names[0]] if len(out) == 1 else out


# --- hand-checked traces, one operator at a time (token mode unless a test says otherwise) -------

def test_ce_name():
    assert holds("a", a=".x.x.") == "01010"
    assert holds("harm_x", harm_x="x...x") == "10001"


def test_group_is_any_of_its_members():
    g = {"g": ("a", "b")}
    assert holds(rule("g", groups=g), a="x....", b="..x..") == "10100"
    assert holds(rule("g", groups=g), c="xxxxx") == "00000"


def test_group_shadows_a_ce_of_the_same_name():
    assert holds(rule("a", groups={"a": ("b",)}), a="xx...", b="...x.") == "00010"


def test_wildcard_is_any_matching_ce():
    assert holds("harm_*", harm_x=".x...", harm_y="...x.", a="x.x.x") == "01010"
    assert holds("all of harm_*", harm_x=".xx..", harm_y="..xx.") == "00100"
    assert holds("harm_* > 0.5", harm_x="04000", harm_y="00030") == "01010"


@pytest.mark.parametrize(("op", "expected"), [(">", "00011"), (">=", "00111"), ("<", "11000"), ("<=", "11100"),
                                              ("==", "00100"), ("!=", "11011")])
def test_score_comparisons(op, expected):
    assert holds(f"a {op} 0.5", a="01234") == expected


def test_group_comparison_is_any_member():
    g = {"g": ("a", "b")}
    assert holds(rule("g > 0.5", groups=g), a="01234", b="40000") == "10011"
    assert holds(rule("g == 0.25", groups=g), a="01234", b="40000") == "01000"


def test_all_any_k_of_a_group_count_distinct_ces_at_the_token():
    g = {"g": ("a", "b", "c")}
    ces = {"a": "x.x.x", "b": "..xx.", "c": "x.x.."}
    assert holds(rule("all of g", groups=g), **ces) == "00100"
    assert holds(rule("any of g", groups=g), **ces) == "10111"
    assert holds(rule("2 of g", groups=g), **ces) == "10100"
    assert holds(rule("3 of g", groups=g), **ces) == "00100"


def test_duplicate_group_members_count_once():
    g = {"g": ("a", "a", "b")}
    assert holds(rule("all of g", groups=g), a="xxx", b="..x") == "001"
    assert holds(rule("2 of g", groups=g), a="xxx") == "000"


def test_k_of_a_list_counts_items_holding():
    ces = {"a": "x..x..", "b": "..4.4.", "c": ".x...."}
    assert holds("2 of (a, b > 0.5, once c)", **ces) == "001110"
    assert holds("3 of (a, b > 0.5, once c)", **ces) == "000000"
    assert holds("all of (a, once c)", **ces) == "000100"
    assert holds("any of (a, b > 0.5)", **ces) == "101110"


def test_not_and_or():
    ces = {"a": ".xx.", "b": "..xx"}
    assert holds("a and b", **ces) == "0010"
    assert holds("a or b", **ces) == "0111"
    assert holds("not a", **ces) == "1001"
    assert holds("a and not b", **ces) == "0100"
    assert holds("not (a or b)", **ces) == "1000"
    assert holds("c or a and b", **ces) == "0010"


def test_once():
    assert holds("once a", a="..x...") == "001111"
    assert holds("ever a", a="..x...") == "001111"
    assert holds("once a within 2 tokens", a="..x...") == "001100"
    assert holds("once a within 1 token", a="..x..x") == "001001"
    assert holds("once (a and b)", a="x.x...", b=".xx...") == "001111"


def test_then():
    ces = {"a": ".x....", "b": "x..x.x"}
    assert holds("a then b", **ces) == "000101"
    assert holds("a then b within 2 tokens", **ces) == "000100"
    assert holds("a then b within 1 token", a=".x..", b="..xx") == "0010"
    assert holds("a then b", a="..x", b="..x") == "000"  # the same token is not before
    assert holds("a then a", a="x.xx") == "0011"


def test_sustained():
    assert holds("a for 2 tokens", a="xx.xxx") == "010011"
    assert holds("a for 3 tokens", a="xx.xxx") == "000001"
    assert holds("a for 1 token", a="xx.xxx") == "110111"
    assert holds("a for 2 tokens", a="xxx") == "011"  # the first token has too short a history


def test_count():
    a = "x.xx.x"
    assert holds("count(a) >= 2", a=a) == "001111"
    assert holds("count(a) == 1", a=a) == "110000"
    assert holds("count(a) >= 2 within 2 tokens", a=a) == "000100"
    assert holds("count(a) over 2 tokens >= 2", a=a) == "000100"
    assert holds("count(a) < 1 within 2 tokens", a=a) == "000000"
    assert holds("count(a) <= 1 within 3 tokens", a=a) == "110000"
    assert holds("count(a and b) != 0", a="xxx", b=".x.") == "011"


def test_max_min():
    assert holds("max(a) > 0.5", a="04102") == "01111"
    assert holds("max(a) over 2 tokens > 0.5", a="04102") == "01100"
    assert holds("max(a) > 0.5 within 2 tokens", a="04102") == "01100"
    assert holds("min(a) over 2 tokens >= 0.25", a="04102") == "00100"
    assert holds("min(a) > 0", a="43204") == "11100"
    assert holds("min(a) over 1 token == 0.5", a="43204") == "00100"


def test_mean():
    assert holds("mean(a) >= 0.5", a="04040") == "01010"  # 0, 1/2, 1/3, 1/2, 2/5
    assert holds("mean(a) == 0.5", a="04040") == "01010"
    assert holds("mean(a) over 2 tokens == 0.5", a="04040") == "01111"
    assert holds("mean(a) over 3 tokens > 0.5", a="04040") == "00010"
    assert holds("mean(a) > 0.5 within 3 tokens", a="04040") == "00010"
    # 1/4 alone, then (1 + 2) / 2, (1 + 2 + 0) / 3, (2 + 0 + 1) / 3, (0 + 1 + 0) / 3 quarters
    assert holds("mean(a) over 3 tokens == 0.25", a="12010") == "10110"


def test_aggregate_of_a_group_is_any_member_with_its_own_aggregate():
    g = {"g": ("a", "b")}
    assert holds(rule("min(g) > 0.5", groups=g), a="44", b="00") == "11"  # the union's min would be 0
    assert holds(rule("mean(g) > 0.75", groups=g), a="44", b="00") == "11"  # the union's mean would be 0.5
    assert holds(rule("max(g) over 2 tokens < 0.5", groups=g), a="4000", b="0400") == "1011"
    assert holds(rule("max(g) over 2 tokens < 0.5", groups=g), a="4000", b="4400") == "0011"
    assert holds(rule("count(g) >= 2 within 3 tokens", groups=g), a="x...", b=".x..") == "0110"


SCOPED = {"roles": "ssuuaaAA", "a": "x.x.x.x."}


@pytest.mark.parametrize(("scope", "expected"), [
    ("system", "10000000"), ("user", "00100000"), ("assistant", "00001010"), ("prompt", "10101000"),
    ("response", "00000010"), ("conversation", "10101010")])
def test_each_scope(scope, expected):
    assert holds(f"a in {scope}", **SCOPED) == expected


def test_none_role_tokens_are_only_in_prompt_and_conversation():
    assert holds(rule("a in prompt"), roles="nNnN", a="xxxx") == "1010"
    assert holds(rule("a in user or a in system or a in assistant"), roles="nNnN", a="xxxx") == "0000"


def test_a_scope_is_a_view_that_skips_other_tokens():
    ces = {"roles": "uaauu", "a": "x....", "b": "....x"}
    assert holds("(a then b within 2 tokens) in user", **ces) == "00001"  # user tokens 0, 3, 4
    assert holds("a then b within 2 tokens", **ces) == "00000"
    assert holds("count(a) >= 2 within 2 tokens in user", roles="uauau", a="x.x..") == "00100"
    assert holds("count(a) >= 2 within 2 tokens", roles="uauau", a="x.x..") == "00000"
    assert holds("(a for 2 tokens) in assistant", roles="auaau", a="x.x..") == "00100"
    assert holds("(once a within 2 tokens) in user", roles="uau", a="x..") == "101"


def test_temporal_operand_scoped_inside():
    # `once a in user` is once(a in user): the once looks at every token, the scope only at a
    assert holds("once a in user", roles="uaua", a=".x.x") == "0000"
    assert holds("once a in user", roles="uaua", a="..x.") == "0011"
    assert holds("once a in user within 2 tokens", roles="uaaa", a="x...") == "1100"


def test_nested_scopes():
    ces = {"roles": "uUaAU", "a": "xxxxx"}
    assert holds("(a in user) in response", **ces) == "01001"
    assert holds(rule("(a in user) in response", match="conversation"), **ces) == "01111"
    assert holds("((a then a within 1 token) in user) in response", **ces) == "00001"
    assert holds("(a in user) in system", **ces) == "00000"


def test_conversation_mode_latches_each_leaf():
    ces = {"a": ".x..", "b": "...x"}
    assert holds(rule("a and b"), **ces) == "0000"
    assert holds(rule("a and b", match="conversation"), **ces) == "0001"
    assert holds(rule("a and not b", match="conversation"), **ces) == "0110"
    assert holds(rule("not a", match="conversation"), **ces) == "1000"
    assert holds(rule("a or b", match="conversation"), **ces) == "0111"


def test_conversation_mode_groups_count_ces_seen_so_far():
    g = {"g": ("a", "b", "c")}
    ces = {"a": "x.x.x", "b": "..xx.", "c": "x.x.."}
    assert holds(rule("all of g", groups=g, match="conversation"), a="x....", b="...x.", c=".x...") == "00011"
    assert holds(rule("2 of g", groups=g, match="conversation"), **ces) == "11111"
    assert holds(rule("g", groups=g, match="conversation"), c="..x..") == "00111"
    assert holds(rule("all of harm_*", match="conversation"), harm_x="x....", harm_y="...x.") == "00011"
    assert holds(rule("2 of (a, b, once c within 1 token)", match="conversation"), a="x...", c="..x.") == "0011"


def test_conversation_mode_latches_temporal_leaves_whole():
    conv = {"match": "conversation"}
    assert holds(rule("once a within 2 tokens", **conv), a="x....") == "11111"
    assert holds(rule("a then b within 1 token", **conv), a="x...", b=".x..") == "0111"
    assert holds(rule("a then b within 1 token", **conv), a="x...", b="..x.") == "0000"
    assert holds(rule("not (a then b)", **conv), a="x...", b="..x.") == "1100"
    assert holds(rule("count(a) >= 2 within 2 tokens", **conv), a="x.xx.") == "00011"
    assert holds(rule("a > 0.5 and b < 0.5", **conv), a="0400", b="4040") == "0111"
    assert holds(rule("a > 0.5 and b < 0.5"), a="0400", b="4040") == "0100"
    assert holds(rule("mean(a) over 2 tokens > 0.5", **conv), a="04400") == "00111"


def test_conversation_mode_scoped_leaf():
    conv = {"match": "conversation"}
    assert holds(rule("a in user", **conv), **SCOPED) == "00111111"
    # once((once a and once b) in user): a and b seen in the user view by the same user token
    assert holds(rule("(a and b) in user", **conv), roles="uaua", a="x...", b=".x.x") == "0000"
    assert holds(rule("(a and b) in user", **conv), roles="uaua", a="x...", b="..x.") == "0011"
    assert holds(rule("not (a in user)", **conv), roles="auau", a="x..x") == "1110"


def test_exceptions():
    assert holds(rule("a", exceptions=["b"]), a="xxxx", b=".x..") == "1011"
    assert holds(rule("a", exceptions=["a"]), a="xx.x") == "0000"
    assert holds(rule("a", exceptions=["b", "c"]), a="xxxx", b=".x..", c="...x") == "1010"
    assert holds(rule("a", exceptions=["b"], match="conversation"), a="xxxx", b=".x..") == "1000"
    assert holds(rule("a", exceptions=["b in user"], match="conversation"), roles="aaua", a="xxxx",
                 b="x.x.") == "1100"
    assert holds(rule("once a", exceptions=["b for 2 tokens"]), a="x...", b=".xx.") == "1101"


def test_macros_expand_in_place():
    macros = {"pressure": "a and b", "push": "pressure or c"}
    ces = {"a": ".x..", "b": "...x"}
    assert holds(rule("pressure"), macros=macros, a=".xx.", b="..xx") == "0010"
    assert holds(rule("push"), macros=macros, a=".xx.", b="..xx", c="x...") == "1010"
    # conversation mode rewrites the macro's own leaves: a and b seen, at different tokens
    assert holds(rule("pressure", match="conversation"), macros=macros, **ces) == "0001"
    assert holds(rule("once pressure", match="conversation"), macros=macros, **ces) == "0000"


def test_macros_use_the_names_of_the_rule_that_uses_them():
    rules = [rule("m", "r1", groups={"g": ("a",)}), rule("m", "r2", groups={"g": ("b",)})]
    assert holds(rules, macros={"m": "g"}, a="x..", b="..x") == {"r1": "100", "r2": "001"}
    rules = [rule("a and b", "base", private=True), rule("m", "top")]
    assert holds(rules, macros={"m": "base or c"}, a="x.x.", b="..x.", c="...x") == "0011"


def test_names_resolve_group_list_macro_rule_ce_in_that_order():
    assert holds(rule("dup", groups={"dup": ("c",)}), lists={"dup": ["a"]}, a="x..", c="..x") == "001"
    assert holds(rule("dup"), lists={"dup": ["a"]}, macros={"dup": "b"}, a="x..", b=".x.") == "100"
    assert holds([rule("a", "dup", private=True), rule("dup", "top")], macros={"dup": "b"}, a="x..",
                 b=".x.") == "010"
    assert holds([rule("b", "a", private=True), rule("a", "top")], a="x..", b=".x.") == "010"


def test_lists():
    lists = {"money": ["a", "c"]}
    assert holds(rule("money"), lists=lists, a="x...", c="..x.") == "1010"
    assert holds(rule("all of money"), lists=lists, a="xx..", c=".xx.") == "0100"
    assert holds(rule("money", groups={"money": ("b",)}), lists=lists, a="x...", b=".x..") == "0100"


def test_rule_references_use_the_referenced_rules_mode_and_exceptions():
    base = rule("a and b", "base", private=True)
    top = rule("base and c", "top", match="conversation")
    assert holds([base, top], a="x.x..", b="..x..", c="x...x") == "00111"
    latched = rule("a and b", "base", match="conversation", private=True)
    assert holds([latched, top], a="x....", b="..x..", c=".x...") == "00111"
    excepted = rule("a", "base", exceptions=["b"], private=True)
    assert holds([excepted, rule("base", "top")], a="xxx", b=".x.") == "101"
    assert holds([rule("base", "top"), rule("a or b", "base")], a="x..", b="..x") == {"top": "101", "base": "101"}


def test_rule_reference_is_evaluated_under_the_referencing_view():
    base = rule("a then b within 1 token", "base")
    ces = {"roles": "uauu", "a": "x...", "b": "..x."}
    assert holds([base, rule("base in user", "top")], **ces) == {"base": "0000", "top": "0010"}


def test_one_rule_referenced_under_two_views():
    rules = [rule("a then b within 1 token", "base", private=True), rule("base in user or base", "top")]
    assert holds(rules, roles="uauu", a="x..x", b="..xx") == "0010"
    assert holds(rules, roles="uauu", a="x.x.", b="...x") == "0001"


def test_private_rules_are_not_outputs():
    rules = [rule("a", "hidden", private=True), rule("hidden or b", "shown")]
    assert compile_rules(rules, CES).rule_names == ("shown",)
    assert holds(rules, a="x..", b="..x") == "101"


def test_padding_at_the_start():
    assert holds("once a", mask="0011", a="x...") == "0000"
    assert holds("once a", mask="0011", a="..x.") == "0011"
    assert holds("a for 2 tokens", mask="0011", a="xxxx") == "0001"
    assert holds("count(a) >= 1 within 3 tokens", mask="0011", a="xx.x") == "0001"
    assert holds("mean(a) over 3 tokens == 0.5", mask="0011", a="0044") == "0000"
    assert holds("mean(a) over 3 tokens == 0.5", mask="0011", a="4422") == "0011"


def test_holes_in_the_middle_are_skipped():
    assert holds("a for 2 tokens", mask="11011", a="xx.xx") == "01011"
    assert holds("a for 2 tokens", a="xx.xx") == "01001"
    assert holds("a then b within 1 token", mask="101", a="x..", b="..x") == "001"
    assert holds("once a", mask="101", a=".x.") == "000"
    assert holds("max(a) over 2 tokens < 0.5", mask="1101", a="0040") == "1101"


def test_masked_tokens_never_hold():
    assert holds(rule("a", match="conversation"), mask="101", a="x..") == "101"
    assert holds("not a", mask="0110", a="....") == "0110"
    assert holds(rule("not a", match="conversation"), mask="0110", a="....") == "0110"


# --- state ------------------------------------------------------------------------------------

STATEFUL = ["once a within 3 tokens", "a then b within 4 tokens", "a then b", "a for 3 tokens", "count(a) >= 2",
            "count(a or b) >= 2 within 5 tokens", "max(a) over 4 tokens > 0.5", "mean(b) over 3 tokens >= 0.5",
            "mean(b) > 0.25", "min(a) < 0.5", "(once a within 2 tokens) in user", "once a in response"]


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor held in a state object (dataclass fields, attributes, tuples, lists, dicts), in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in state_tensors(v)]
    if isinstance(state, (tuple, list)):
        return [t for v in state for t in state_tensors(v)]
    names = getattr(state, "__dict__", None) or {s: getattr(state, s) for s in getattr(type(state), "__slots__", ())}
    return [t for v in names.values() for t in state_tensors(v)]


def random_inputs(batch: int, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (batch, length, len(CES)), generator=generator) / 4
    roles = torch.randint(0, 8, (batch, length), generator=generator, dtype=torch.uint8)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    return scores > 0.5, scores, roles, mask


def test_state_size_depends_only_on_the_rules():
    rules = [rule(c, f"r{i}", match=("token", "conversation")[i % 2]) for i, c in enumerate(STATEFUL)]
    program = compile_rules(rules, CES)
    shapes = []
    for length in (5, 500):
        fired, scores, roles, mask = random_inputs(2, length, length)
        _, state = program.advance(fired, program.init_state(2), mask, scores=scores, roles=roles)
        shapes.append([t.shape for t in state_tensors(state)])
    assert shapes[0] == shapes[1] == [t.shape for t in state_tensors(program.init_state(2))]
    assert shapes[0], "the temporal rules keep some state"


def test_state_carries_across_many_advance_calls():
    rules = [rule(c, f"r{i}") for i, c in enumerate(STATEFUL)] + [rule(c, f"c{i}", match="conversation")
                                                                  for i, c in enumerate(STATEFUL)]
    fired, scores, roles, mask = random_inputs(3, 40, 7)
    expected = rules_reference.run(rules, CES, fired.tolist(), mask.tolist(), scores=scores.tolist(),
                                   roles=roles.tolist())
    program = compile_rules(rules, CES)
    assert program.run(fired, mask, scores=scores, roles=roles).tolist() == expected
    state, chunks, start = program.init_state(3), [], 0
    for size in (1, 2, 3, 0, 5, 1, 8, 4, 16):
        out, state = program.advance(fired[:, start:start + size], state, mask[:, start:start + size],
                                     scores=scores[:, start:start + size], roles=roles[:, start:start + size])
        chunks.append(out)
        start += size
    assert start == 40 and torch.cat(chunks, dim=1).tolist() == expected


# --- random rules and traces against the reference ---------------------------------------------

TRACES_PER_EXAMPLE = 10


@st.composite
def rule_sets(draw) -> list[RuleSpec]:
    """1-3 rules of a pack, sharing two groups, the pack's list and macro; a rule may use the rules before it."""
    groups = {"g1": draw(members(SIZES["g1"])), "g2": draw(members(SIZES["g2"]))}
    macro = str(draw(conditions()))
    rules = []
    for i in range(draw(st.integers(1, 3))):
        references = ("m", *(r.name for r in rules))
        rules.append(rule(str(draw(conditions(references))), f"r{i}", groups=groups, private=draw(st.booleans()),
                          match=draw(st.sampled_from(["token", "conversation"])),
                          exceptions=[str(e) for e in draw(st.lists(conditions(references), max_size=1))]))
    return pack(rules, lists={"lst": list(draw(members(SIZES["lst"])))}, macros={"m": macro})


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(rule_sets(), st.permutations([*P_CES, "noise"]), st.integers(0, 2**32 - 1))
def test_run_step_and_advance_match_the_reference(rules, ce_names, seed):
    program = compile_rules(rules, ce_names)
    rng = random.Random(seed)
    for _ in range(TRACES_PER_EXAMPLE):
        fired, scores, roles, mask = random_trace(rng, ce_names)
        expected = rules_reference.run(rules, ce_names, fired, mask, scores=scores, roles=roles)
        try:
            assert_compiled(program, fired, scores, roles, mask, expected, rng)
        except AssertionError as err:
            described = "\n".join(f"{r.name} ({r.match}{', private' if r.private else ''}): {r.condition}"
                                  + "".join(f" except {e.condition}" for e in r.exceptions) for r in rules)
            raise AssertionError(f"{err}\nrules:\n{described}\nmacro m: {rules[0].macros['m'].condition}\n"
                                 f"groups: {rules[0].groups} list: {dict(rules[0].lists)}\nce_names: {ce_names}\n"
                                 f"fired={fired}\nscores={scores}\nroles={roles}\nmask={mask}") from None


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(rule_sets(), st.permutations([*P_CES, "noise"]), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 7]))
def test_chunked_evaluation_matches_the_reference(rules, ce_names, seed, tokens_per_chunk):
    """Long inputs are evaluated in chunks of sequences and of tokens (state carried between them): shrink the chunk
    budget so that the property traces cross chunk boundaries both ways."""
    budget = compiler._CHUNK
    compiler._CHUNK = tokens_per_chunk * 64   # the CPU path budgets 64 value columns per token
    try:
        program = compile_rules(rules, ce_names)
        rng = random.Random(seed)
        for _ in range(TRACES_PER_EXAMPLE):
            fired, scores, roles, mask = random_trace(rng, ce_names)
            expected = rules_reference.run(rules, ce_names, fired, mask, scores=scores, roles=roles)
            fired_t, scores_t, roles_t, mask_t = tensors(fired, scores, roles, mask, len(ce_names))
            inputs = {"scores": scores_t if program.needs_scores else None,
                      "roles": roles_t if program.needs_roles else None}
            assert program.run(fired_t, mask_t, **inputs).tolist() == expected
    finally:
        compiler._CHUNK = budget
