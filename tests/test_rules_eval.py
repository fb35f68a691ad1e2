"""Rule evaluation: hand-checked traces per operator, and run/step against the naive reference evaluator."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rules_reference
from gavel.errors import RuleError
from gavel.rules import RuleErrors, RuleSpec, compile_rules, first_firing

CES = ["tax", "threat", "payment", "urgency", "roleplay"]


def trace(length: int, events: dict[str, list[int]], names=CES) -> torch.Tensor:
    """fired [1, length, len(names)] with each CE firing at the given tokens."""
    fired = torch.zeros(1, length, len(names), dtype=torch.bool)
    for ce, tokens in events.items():
        fired[0, tokens, names.index(ce)] = True
    return fired


def holds_over_time(condition: str, events: dict[str, list[int]], groups=None, length=6) -> list[int]:
    program = compile_rules([RuleSpec(name="r", groups=groups or {}, condition=condition)], CES)
    return program.run(trace(length, events))[0, :, 0].int().tolist()


def test_bare_ce_latches_from_its_first_firing():
    assert holds_over_time("threat", {"threat": [2]}) == [0, 0, 1, 1, 1, 1]


def test_bare_group_is_any_of_it():
    groups = {"money": ["payment", "tax"]}
    assert holds_over_time("money", {"tax": [4]}, groups) == [0, 0, 0, 0, 1, 1]
    assert holds_over_time("money", {"urgency": [0]}, groups) == [0] * 6


def test_all_of_combines_firings_at_different_tokens():
    groups = {"tax_threat": ["tax", "threat"]}
    assert holds_over_time("all of tax_threat", {"tax": [0], "threat": [3]}, groups) == [0, 0, 0, 1, 1, 1]
    assert holds_over_time("all of tax_threat", {"tax": [0, 1, 2, 3]}, groups) == [0] * 6


def test_k_of_counts_distinct_ces():
    groups = {"pressure": ["threat", "urgency", "payment"]}
    assert holds_over_time("2 of pressure", {"threat": [0, 1, 2]}, groups) == [0] * 6
    assert holds_over_time("2 of pressure", {"threat": [1], "payment": [4]}, groups) == [0, 0, 0, 0, 1, 1]
    assert holds_over_time("3 of pressure", {"threat": [1], "payment": [4], "urgency": [5]}, groups) == [0] * 5 + [1]


def test_duplicate_group_members_count_once():
    groups = {"g": ["tax", "tax", "threat"]}
    assert holds_over_time("all of g", {"tax": [0], "threat": [2]}, groups) == [0, 0, 1, 1, 1, 1]
    assert holds_over_time("2 of g", {"tax": [0]}, groups) == [0] * 6


def test_and_or_and_precedence():
    events = {"tax": [1], "urgency": [3], "roleplay": [5]}
    assert holds_over_time("tax and urgency", events) == [0, 0, 0, 1, 1, 1]
    assert holds_over_time("threat or urgency", events) == [0, 0, 0, 1, 1, 1]
    assert holds_over_time("roleplay or tax and urgency", events) == [0, 0, 0, 1, 1, 1]
    assert holds_over_time("(roleplay or tax) and urgency", events) == [0, 0, 0, 1, 1, 1]
    assert holds_over_time("(roleplay or threat) and urgency", events) == [0, 0, 0, 0, 0, 1]


def test_group_name_shadows_a_ce_of_the_same_name():
    groups = {"tax": ["payment"]}
    assert holds_over_time("tax", {"tax": [0], "payment": [2]}, groups) == [0, 0, 1, 1, 1, 1]


def test_masked_tokens_are_ignored_and_first_firing():
    program = compile_rules([RuleSpec(name="a", condition="tax"), RuleSpec(name="b", condition="threat")], CES)
    fired = trace(5, {"tax": [1, 3], "threat": [0]})
    mask = torch.tensor([[True, False, True, True, True]])
    holds = program.run(fired, mask)
    assert holds[0, :, 0].int().tolist() == [0, 0, 0, 1, 1]
    assert holds[0, :, 1].int().tolist() == [1, 1, 1, 1, 1]
    assert first_firing(holds).tolist() == [[3, 0]]
    assert first_firing(torch.zeros(2, 4, 3, dtype=torch.bool)).tolist() == [[-1] * 3] * 2
    assert first_firing(torch.zeros(2, 0, 3, dtype=torch.bool)).tolist() == [[-1] * 3] * 2


def test_inactive_rows_keep_their_state():
    program = compile_rules([RuleSpec(name="a", groups={"g": ["tax", "threat"]}, condition="all of g")], CES)
    state = program.init_state(2)
    _, state = program.step(trace(1, {"tax": [0]}).expand(2, 1, -1)[:, 0], state)
    both = trace(1, {"threat": [0]}).expand(2, 1, -1)[:, 0]
    holds, new = program.step(both, state, active=torch.tensor([True, False]))
    assert holds[:, 0].tolist() == [True, False]
    assert torch.equal(new.detected[1], state.detected[1])


def test_fired_must_be_boolean_but_masks_may_be_integers():
    program = compile_rules([RuleSpec(name="a", condition="tax")], CES)
    with pytest.raises(TypeError, match="bool"):
        program.run(torch.full((1, 2, len(CES)), 0.3))
    holds = program.run(trace(3, {"tax": [0, 2]}), torch.tensor([[0, 1, 1]]))
    assert holds[0, :, 0].tolist() == [False, False, True]


def test_state_size_depends_only_on_the_rules():
    program = compile_rules([RuleSpec(name="a", groups={"g": ["tax", "threat"]}, condition="all of g or urgency")],
                            ["x", *CES])
    assert program.ce_indices == (1, 2, 4)
    state = program.init_state(3)
    for _ in range(50):
        _, state = program.step(torch.ones(3, 6, dtype=torch.bool), state)
    assert state.detected.shape == (3, 3)


def test_shared_subconditions_share_gates():
    groups = {"g": ["tax", "threat"], "h": ["payment", "urgency"]}
    rules = [RuleSpec(name=f"r{i}", groups=groups, condition=c)
             for i, c in enumerate(["all of g and h", "h and all of g", "all of g or 2 of h", "tax"])]
    program = compile_rules(rules, CES)
    assert program.membership.shape == (4, 3)  # all of g, any of h, 2 of h
    assert [g.threshold.tolist() for g in program.levels] == [[2.0, 1.0]]  # one `and`, one `or`


def test_empty_inputs():
    program = compile_rules([RuleSpec(name="a", condition="tax")], CES)
    assert program.run(torch.zeros(2, 0, len(CES), dtype=torch.bool)).shape == (2, 0, 1)
    nothing = compile_rules([], CES)
    assert nothing.run(torch.ones(2, 3, len(CES), dtype=torch.bool)).shape == (2, 3, 0)
    assert nothing.init_state(2).detected.shape == (2, 0)


def test_compile_errors_are_all_reported_with_hints():
    rules = [
        RuleSpec(name="a", groups={"g": ["tax", "thret"]}, condition="all of g"),
        RuleSpec(name="b", groups={"g": ["tax"]}, condition="all of gg or 2 of g or urgncy"),
        RuleSpec(name="a", condition="tax"),
    ]
    with pytest.raises(RuleErrors) as info:
        compile_rules(rules, CES)
    text = [str(e) for e in info.value.errors]
    assert len(text) == 5
    assert any("unknown CE 'thret'" in t and "did you mean 'threat'" in t for t in text)
    assert any("undefined group 'gg'" in t and "did you mean 'g'" in t for t in text)
    assert any("`2 of g` needs 1 <= k <= 1" in t for t in text)
    assert any("'urgncy' is neither" in t and "did you mean 'urgency'" in t for t in text)
    assert any("rule name 'a' is used more than once" in t for t in text)
    with pytest.raises(RuleError, match="more than once"):
        compile_rules([], ["tax", "tax"])


def test_program_moves_between_devices():
    program = compile_rules([RuleSpec(name="a", groups={"g": ["tax", "threat"]}, condition="all of g")], CES)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    fired = trace(4, {"tax": [0], "threat": [2]})
    for device in devices:
        moved = program.to(device)
        assert moved.run(fired.to(device)).device.type == device
        assert moved.run(fired.to(device))[0, :, 0].tolist() == [False, False, True, True]


def test_long_traces_cross_block_boundaries():
    rules = [({"g": ["tax", "threat", "payment"]}, ("k", 2, "g")), ({}, ("and", [("name", "urgency"), ("name", "tax")]))]
    program = compile_rules([RuleSpec(name="a", groups=rules[0][0], condition="2 of g"),
                             RuleSpec(name="b", condition="urgency and tax")], CES)
    generator = torch.Generator().manual_seed(1)
    fired = torch.rand(3, 700, len(CES), generator=generator) < 0.002
    fired[2] = False
    fired[2, 256, 0] = fired[2, 511, 3] = fired[2, 699, 1] = True
    mask = torch.rand(3, 700, generator=generator) < 0.8
    mask[2] = True
    holds = program.run(fired, mask)
    assert holds.tolist() == rules_reference.run(rules, CES, fired.tolist(), mask.tolist())
    state, stepped = program.init_state(3), []
    for t in range(700):
        out, state = program.step(fired[:, t], state, mask[:, t])
        stepped.append(out)
    assert torch.equal(torch.stack(stepped, dim=1), holds)
    first = first_firing(holds)
    assert first[2].tolist() == [699, 511]
    for b in range(3):
        for r in range(2):
            hits = holds[b, :, r].nonzero()
            assert first[b, r].item() == (hits[0, 0].item() if len(hits) else -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_and_run_never_sync_the_host():
    program = compile_rules([RuleSpec(name="a", groups={"g": ["tax", "threat"]}, condition="all of g or urgency")],
                            CES).to("cuda")
    fired = trace(300, {"tax": [3], "threat": [290]}).cuda()
    state = program.init_state(1, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, state = program.step(fired[:, 0], state, torch.ones(1, dtype=torch.bool, device="cuda"))
        first = first_firing(program.run(fired))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.tolist() == [[290]]


# --- property tests against the reference evaluator -------------------------------------------

GROUP_NAMES = ["alpha", "beta", "gamma"]


@st.composite
def rules_and_texts(draw):
    """A random rule as (groups, tree, condition text rendered with random optional parentheses)."""
    groups = {GROUP_NAMES[i]: draw(st.lists(st.sampled_from(CES), min_size=1, max_size=4))
              for i in range(draw(st.integers(1, 3)))}
    leaf = st.one_of(
        st.sampled_from([("name", n) for n in [*groups, *CES]]),
        st.sampled_from([("all", g) for g in groups]),
        st.sampled_from(list(groups)).flatmap(
            lambda g: st.integers(1, len(set(groups[g]))).map(lambda k: ("k", k, g))))
    tree = draw(st.recursive(
        leaf, lambda kids: st.tuples(st.sampled_from(["and", "or"]), st.lists(kids, min_size=2, max_size=3)),
        max_leaves=8))
    return groups, tree, render(tree, draw)


def render(tree, draw) -> str:
    kind = tree[0]
    if kind == "name":
        return tree[1]
    if kind == "all":
        return f"all of {tree[1]}"
    if kind == "k":
        return f"{tree[1]} of {tree[2]}"
    parts = []
    for child in tree[1]:
        text = render(child, draw)
        if (kind == "and" and child[0] == "or") or draw(st.integers(0, 3)) == 0:
            text = f"({text})"
        parts.append(text)
    return draw(st.sampled_from([f" {kind} ", f"\n  {kind} ", f"  {kind}\n"])).join(parts)


@st.composite
def cases(draw):
    rules = draw(st.lists(rules_and_texts(), min_size=1, max_size=4))
    ce_names = draw(st.permutations([*CES, "noise"]))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(0, 7))
    flags = st.lists(st.lists(st.lists(st.booleans(), min_size=len(ce_names), max_size=len(ce_names)),
                              min_size=length, max_size=length), min_size=batch, max_size=batch)
    mask = draw(st.none() | st.lists(st.lists(st.booleans(), min_size=length, max_size=length),
                                     min_size=batch, max_size=batch))
    return rules, ce_names, draw(flags), mask


@settings(max_examples=200, deadline=None)
@given(cases())
def test_run_and_step_match_the_reference(case):
    rules, ce_names, fired, mask = case
    specs = [RuleSpec(name=f"r{i}", groups=g, condition=text) for i, (g, _, text) in enumerate(rules)]
    program = compile_rules(specs, ce_names)
    expected = rules_reference.run([(g, tree) for g, tree, _ in rules], ce_names, fired, mask)

    batch, length = len(fired), len(fired[0])
    fired_t = torch.tensor(fired, dtype=torch.bool).reshape(batch, length, len(ce_names))
    mask_t = torch.tensor(mask, dtype=torch.bool).reshape(batch, length) if mask is not None else None
    assert program.run(fired_t, mask_t).tolist() == expected

    state, stepped = program.init_state(batch), []
    for t in range(length):
        holds, state = program.step(fired_t[:, t], state, None if mask_t is None else mask_t[:, t])
        stepped.append(holds)
    steps = torch.stack(stepped, dim=1) if stepped else torch.zeros(batch, 0, len(specs), dtype=torch.bool)
    assert steps.tolist() == expected

    split = length // 2  # a prefill of `split` tokens, then the rest in one more advance
    first, state = program.advance(fired_t[:, :split], program.init_state(batch),
                                   None if mask_t is None else mask_t[:, :split])
    second, state = program.advance(fired_t[:, split:], state, None if mask_t is None else mask_t[:, split:])
    assert torch.cat([first, second], dim=1).tolist() == expected
