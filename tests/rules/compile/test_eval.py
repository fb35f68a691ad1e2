"""Rule evaluation in GAVEL's `conversation` mode (the default: a CE counts from its first firing), the program API
(masks, state, devices, errors), and a long trace against the reference evaluator. Every operator and both modes
are in test_rules_temporal.py."""
import pytest
import torch
from helpers import rules_reference

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


def test_not_is_never_fired_so_far():
    assert holds_over_time("tax and not threat", {"tax": [1], "threat": [4]}) == [0, 1, 1, 1, 0, 0]
    assert holds_over_time("not (tax or threat)", {"threat": [2]}) == [1, 1, 0, 0, 0, 0]


def test_masked_tokens_are_ignored_and_never_hold():
    program = compile_rules([RuleSpec(name="a", condition="tax"), RuleSpec(name="b", condition="threat")], CES)
    fired = trace(5, {"tax": [1, 3], "threat": [0]})
    mask = torch.tensor([[True, False, True, True, True]])
    holds = program.run(fired, mask)
    assert holds[0, :, 0].int().tolist() == [0, 0, 0, 1, 1]
    assert holds[0, :, 1].int().tolist() == [1, 0, 1, 1, 1]
    assert first_firing(holds).tolist() == [[3, 0]]
    assert first_firing(torch.zeros(2, 4, 3, dtype=torch.bool)).tolist() == [[-1] * 3] * 2
    assert first_firing(torch.zeros(2, 0, 3, dtype=torch.bool)).tolist() == [[-1] * 3] * 2


def test_inactive_rows_skip_the_step():
    program = compile_rules([RuleSpec(name="a", groups={"g": ["tax", "threat"]}, condition="all of g"),
                             RuleSpec(name="b", condition="tax then threat within 1 token", match="token")], CES)
    state = program.init_state(2)
    _, state = program.step(trace(1, {"tax": [0]}).expand(2, 1, -1)[:, 0], state)
    nothing = torch.zeros(2, len(CES), dtype=torch.bool)
    holds, state = program.step(nothing, state, active=torch.tensor([True, False]))
    assert holds.tolist() == [[False, False], [False, False]]
    holds, _ = program.step(trace(1, {"threat": [0]})[:, 0].expand(2, -1), state)
    assert holds.tolist() == [[True, False], [True, True]]  # row 1 never saw the empty token


def test_fired_must_be_boolean_but_masks_may_be_integers():
    program = compile_rules([RuleSpec(name="a", condition="tax")], CES)
    with pytest.raises(TypeError, match="bool"):
        program.run(torch.full((1, 2, len(CES)), 0.3))
    holds = program.run(trace(3, {"tax": [0, 2]}), torch.tensor([[0, 1, 1]]))
    assert holds[0, :, 0].tolist() == [False, False, True]


def test_empty_inputs():
    program = compile_rules([RuleSpec(name="a", condition="tax")], CES)
    assert program.run(torch.zeros(2, 0, len(CES), dtype=torch.bool)).shape == (2, 0, 1)
    nothing = compile_rules([], CES)
    assert nothing.rule_names == ()
    assert nothing.run(torch.ones(2, 3, len(CES), dtype=torch.bool)).shape == (2, 3, 0)
    holds, _ = nothing.step(torch.ones(2, len(CES), dtype=torch.bool), nothing.init_state(2))
    assert holds.shape == (2, 0)


def test_only_rules_reading_scores_or_scopes_need_them():
    def needs(condition):
        program = compile_rules([RuleSpec(name="a", condition=condition)], CES)
        return program.needs_scores, program.needs_roles

    assert needs("tax and once threat within 3 tokens") == (False, False)
    assert needs("tax > 0.5") == (True, False)
    assert needs("mean(tax) over 4 tokens > 0.5") == (True, False)
    assert needs("count(tax) >= 2 within 4 tokens") == (False, False)
    assert needs("tax in user") == (False, True)
    assert needs("tax in conversation") == (False, False)


def test_roles_may_be_bytes_or_longs():
    program = compile_rules([RuleSpec(name="a", condition="(once tax within 2 tokens) in user", match="token")], CES)
    fired = trace(4, {"tax": [0]})
    roles = torch.tensor([[2, 3, 2, 6]])  # user, assistant, user, user in the response
    for dtype in (torch.uint8, torch.long):
        assert program.run(fired, roles=roles.to(dtype))[0, :, 0].tolist() == [True, False, True, False]


def test_compile_errors_are_all_reported_with_hints():
    rules = [
        RuleSpec(name="a", groups={"g": ["tax", "thret"]}, condition="all of g"),
        RuleSpec(name="b", groups={"g": ["tax"]}, condition="all of gg or 2 of g or urgncy"),
        RuleSpec(name="a", condition="tax"),
        RuleSpec(name="c", condition="harm_* or d"),
        RuleSpec(name="d", condition="c and tax"),
    ]
    with pytest.raises(RuleErrors) as info:
        compile_rules(rules, CES)
    text = [str(e) for e in info.value.errors]
    assert len(text) == 7
    assert any("unknown CE 'thret'" in t and "did you mean 'threat'" in t for t in text)
    assert any("undefined group 'gg'" in t and "did you mean 'g'" in t for t in text)
    assert any("`2 of g` needs 1 <= k <= 1" in t for t in text)
    assert any("'urgncy' is not" in t and "did you mean 'urgency'" in t for t in text)
    assert any("rule name 'a' is used more than once" in t for t in text)
    assert any("wildcard 'harm_*' matches no CE" in t for t in text)
    assert any("refers to itself" in t and "c -> d -> c" in t for t in text)
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
    rules = [RuleSpec(name="a", groups={"g": ["tax", "threat", "payment"]}, condition="2 of g"),
             RuleSpec(name="b", condition="urgency and tax"),
             RuleSpec(name="c", condition="count(tax or urgency) >= 2 within 40 tokens", match="token")]
    program = compile_rules(rules, CES)
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
    assert first[2].tolist() == [699, 511, -1]
    for b in range(3):
        for r in range(3):
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
