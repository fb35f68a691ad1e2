"""Plugin score functions (entry-point group `gavel.functions`) in the rule language: hand-checked traces, random
rules and traces against the reference evaluator (run, step, chunked advance, the dense path), errors, and the
example package's `slope` installed for real."""
from __future__ import annotations

import contextlib
import functools
import random
import statistics
from importlib.metadata import EntryPoint
from typing import ClassVar

import pytest
import torch
from helpers import rules_reference
from helpers.rule_traces import (
    CES,
    GRID,
    NO_SPAN,
    OPS,
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gavel.plugins import registry as registry_module
from gavel.rules import RuleErrors, RuleSpec, compile_rules, load_rules, parse_condition
from gavel.rules.ast import SCOPES, Aggregate, And, Name, Not, Once, Or, Scoped
from gavel.rules.compile import program as compiler
from gavel.rules.compile import rowsets
from gavel.rules.parser import ConditionSyntaxError


def check_inputs(windows: torch.Tensor, valid: torch.Tensor) -> None:
    """What the protocol promises `reduce`: float64 windows, a bool mask of the same shape, invalid slots zero
    (never NaN) and only before the valid ones (the window's oldest slots)."""
    assert windows.dtype == torch.float64 and valid.dtype == torch.bool and windows.shape == valid.shape
    assert not windows.isnan().any() and not windows[~valid].any()
    assert (valid.to(torch.int8).diff(dim=-1) >= 0).all()


class Median:
    """The lower median of the valid scores: a score of the window, so `==` compares exactly."""

    name: ClassVar[str] = "median"

    def reduce(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        check_inputs(windows, valid)
        return torch.where(valid, windows, torch.nan).nanmedian(-1).values


class First:
    """The oldest valid score of the window: wrong wherever the window is misaligned or mis-masked."""

    name: ClassVar[str] = "first"

    def reduce(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        check_inputs(windows, valid)
        oldest = valid.to(torch.uint8).argmax(-1, keepdim=True)
        return windows.gather(-1, oldest).squeeze(-1)


REFERENCE = {"median": statistics.median_low, "first": lambda values: values[0]}


def use_registry(monkeypatch, reg: registry_module.Registry) -> None:
    """Make `reg` the process registry (the caller's teardown clears the cache again)."""
    monkeypatch.setattr(registry_module, "load_registry", lambda: reg)
    registry_module.registry.cache_clear()


@pytest.fixture
def plugins(monkeypatch):
    """The built-in registry plus the test-local `median` and `first`, as the process registry."""
    reg = registry_module.load_registry()
    for function in (Median, First):
        reg.add("functions", function.name, function, __name__)
    use_registry(monkeypatch, reg)
    yield reg
    registry_module.registry.cache_clear()


def holds(rules: str | RuleSpec | list[RuleSpec], *, roles=None, mask=None, **ces) -> str:
    """The first rule's value per token ('0'/'1'), by the reference; the compiled program must agree exactly."""
    rules = [rule(rules)] if isinstance(rules, str) else [rules] if isinstance(rules, RuleSpec) else rules
    length = len(next(iter(ces.values())))
    fired, scores, role, valid = trace(length, roles, mask, ces)
    expected = rules_reference.run(rules, CES, fired, valid, scores=scores, roles=role, functions=REFERENCE)
    assert_compiled(compile_rules(rules, CES), fired, scores, role, valid, expected)
    return "".join(str(int(expected[0][t][0])) for t in range(length))


# --- hand-checked traces ('0'..'4' are quarter scores) ------------------------------------------

def test_a_plugin_function_over_a_window(plugins):
    # windows of a: [1], [1 2], [1 2 3], [2 3 4], [3 4 0]
    assert holds("first(a) over 3 tokens == 0.25", a="12340") == "11100"
    assert holds("first(a) == 0.25 within 3 tokens", a="12340") == "11100"
    assert holds("first(a) over 3 tokens != 0.25", a="12340") == "00011"
    assert holds("median(a) over 3 tokens >= 0.5", a="12340") == "00111"   # lower medians 1, 1, 2, 3, 3
    assert holds("median(a) over 1 token > 0.5", a="12340") == "00110"


def test_a_group_is_any_member_with_its_own_value(plugins):
    g = {"g": ("a", "b")}
    assert holds(rule("first(g) over 2 tokens == 0.25", groups=g), a="2222", b="1144") == "1110"
    assert holds(rule("median(g) over 2 tokens > 0.5", groups=g), a="0044", b="4400") == "1101"


def test_the_window_counts_view_tokens_and_starts_at_the_first(plugins):
    # user tokens are t0, t3, t4: their windows are [1], [1 1], [1 4] of a
    assert holds("first(a) over 2 tokens == 0.25 in user", roles="uaauu", a="14414") == "10011"
    assert holds("first(a) over 2 tokens == 0.25", roles="uaauu", a="14414") == "11001"
    # padding before the first valid token is no part of any window
    assert holds("first(a) over 3 tokens == 1", mask="00111", a="11411") == "00111"


def test_conversation_mode_latches_a_plugin_function(plugins):
    assert holds(rule("first(a) over 2 tokens == 1", match="conversation"), a="0440000") == "0011111"
    assert holds(rule("not median(a) over 2 tokens < 0.5", match="conversation"), a="0400") == "0000"


def test_the_program_keeps_its_functions_across_devices(plugins):
    program = compile_rules([rule("median(a) over 3 tokens >= 0.5")], CES)
    fired, scores, _, _ = tensors(*trace(5, None, None, {"a": "04400"}), len(CES))
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        moved = program.to(device)
        out = moved.run(fired.to(device), scores=scores.to(device))
        assert out[0, :, 0].tolist() == [False, False, True, True, False]


# --- random rules and traces against the reference -----------------------------------------------

@functools.cache
def plugin_conditions(references: tuple[str, ...]) -> st.SearchStrategy:
    """Random conditions where plugin functions (any window, comparison, grid threshold) sit among the
    temporal tests' random conditions, under not, and, or, once and scopes."""
    call = st.builds(lambda f, n, w, o, v: Aggregate(f, Name(n, NO_SPAN), w, o, v, NO_SPAN),
                     st.sampled_from(sorted(REFERENCE)), st.sampled_from([*P_CES, *SIZES]), st.integers(1, 5),
                     st.sampled_from(OPS), st.sampled_from(GRID))

    def extend(inner: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.builds(Not, inner, st.just(NO_SPAN)),
            st.builds(And, st.lists(inner, min_size=2, max_size=3).map(tuple), st.just(NO_SPAN)),
            st.builds(Or, st.lists(inner, min_size=2, max_size=3).map(tuple), st.just(NO_SPAN)),
            st.builds(Once, inner, st.none() | st.integers(1, 4), st.just(NO_SPAN)),
            st.builds(Scoped, inner, st.sampled_from(SCOPES), st.just(NO_SPAN)))

    return st.recursive(call | conditions(references), extend, max_leaves=4)


@st.composite
def rule_sets(draw) -> list[RuleSpec]:
    """1-3 rules of a pack sharing two groups, a list and a macro; a rule may use the rules before it."""
    groups = {"g1": draw(members(SIZES["g1"])), "g2": draw(members(SIZES["g2"]))}
    macro = str(draw(plugin_conditions(())))
    rules = []
    for i in range(draw(st.integers(1, 3))):
        references = ("m", *(r.name for r in rules))
        rules.append(rule(str(draw(plugin_conditions(references))), f"r{i}", groups=groups,
                          private=draw(st.booleans()), match=draw(st.sampled_from(["token", "conversation"]))))
    return pack(rules, lists={"lst": list(draw(members(SIZES["lst"])))}, macros={"m": macro})


@contextlib.contextmanager
def dense_rows():
    """Every token evaluated, as on an accelerator: the path a GPU takes, taken on the CPU."""
    class Dense(rowsets.RowSet):
        def __init__(self, batch: int, length: int, sparse: bool) -> None:
            super().__init__(batch, length, sparse=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "RowSet", Dense)
        yield


TRACES = 6
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # `plugins` holds no state an example could change


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURE_OK)
@given(rule_sets(), st.permutations([*P_CES, "noise"]), st.integers(0, 2**32 - 1))
def test_run_step_and_advance_match_the_reference(plugins, rules, ce_names, seed):
    program = compile_rules(rules, ce_names)
    rng = random.Random(seed)
    for _ in range(TRACES):
        fired, scores, roles, mask = random_trace(rng, ce_names)
        expected = rules_reference.run(rules, ce_names, fired, mask, scores=scores, roles=roles,
                                       functions=REFERENCE)
        try:
            assert_compiled(program, fired, scores, roles, mask, expected, rng)
            with dense_rows():
                assert_compiled(program, fired, scores, roles, mask, expected, rng)
        except AssertionError as err:
            described = "\n".join(f"{r.name} ({r.match}): {r.condition}" for r in rules)
            raise AssertionError(f"{err}\nrules:\n{described}\nmacro m: {rules[0].macros['m'].condition}\n"
                                 f"fired={fired}\nscores={scores}\nroles={roles}\nmask={mask}") from None


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(rule_sets(), st.permutations([*P_CES, "noise"]), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 7]))
def test_chunked_evaluation_matches_the_reference(plugins, monkeypatch, rules, ce_names, seed, tokens_per_chunk):
    """Long inputs run in chunks of sequences and of tokens that carry the windows' NaN-padded histories."""
    monkeypatch.setattr(compiler, "_CHUNK", tokens_per_chunk * 64)   # the CPU path budgets 64 columns per token
    program = compile_rules(rules, ce_names)
    rng = random.Random(seed)
    for _ in range(TRACES):
        fired, scores, roles, mask = random_trace(rng, ce_names)
        expected = rules_reference.run(rules, ce_names, fired, mask, scores=scores, roles=roles,
                                       functions=REFERENCE)
        fired_t, scores_t, roles_t, mask_t = tensors(fired, scores, roles, mask, len(ce_names))
        inputs = {"scores": scores_t if program.needs_scores else None,
                  "roles": roles_t if program.needs_roles else None}
        assert program.run(fired_t, mask_t, **inputs).tolist() == expected


# --- errors ---------------------------------------------------------------------------------------

def test_an_unknown_function_is_located_and_lists_the_plugin_functions(plugins):
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("a and medain(a) over 3 tokens > 0.5")
    assert (info.value.message, info.value.offset, info.value.hint) == (
        "unknown function 'medain'", 6, "did you mean 'median'?")
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("trend(a) over 3 tokens > 0.5")
    assert info.value.hint == "functions: count, max, min, mean; from plugins: first, median"


def test_a_plugin_function_needs_a_window(plugins, tmp_path):
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("median(a) >= 0.5")
    assert (info.value.message, info.value.offset) == ("`median` is a plugin function and needs a window", 10)
    assert info.value.hint == "plugin functions need a window: `median(a) over N tokens >= 0.5`"
    path = tmp_path / "pack.yaml"
    path.write_text("rules:\n  - name: r\n    condition: a or median(a) > 0.5\n")
    with pytest.raises(RuleErrors) as errors:
        load_rules(path)
    assert "pack.yaml:3:31" in str(errors.value) and "needs a window" in str(errors.value)
    with pytest.raises(ConditionSyntaxError, match="takes a CE or group name"):
        parse_condition("median(a and b) over 3 tokens > 0.5")


class Nameless:
    def reduce(self, windows, valid):
        return windows.sum(-1)


class NoReduce:
    name = "no_reduce"
    reduce = 0.5


def test_non_conforming_function_plugins_are_reported_and_skipped(monkeypatch):
    here = __name__
    points = [("median", f"{here}:Median"), ("nameless", f"{here}:Nameless"), ("no_reduce", f"{here}:NoReduce"),
              ("mean", f"{here}:Median"), ("plain", f"{here}:check_inputs")]
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [EntryPoint(n, v, group) for n, v in points] if group == "gavel.functions"
                        else [])
    with pytest.warns(UserWarning):
        reg = registry_module.load_registry()
    assert reg.plugins["functions"] == {"median": Median}
    problems = "\n".join(reg.problems)
    assert "'nameless' does not implement ScoreFunction (it lacks name)" in problems
    assert "'no_reduce' does not implement ScoreFunction (it lacks reduce)" in problems
    assert "'mean' is named like the built-in function 'mean'; rules would never reach it" in problems
    assert "'plain' does not implement ScoreFunction (it is not a class)" in problems


class Broken(Median):
    name: ClassVar[str] = "broken"

    def __init__(self) -> None:
        raise RuntimeError("no model here")


class WrongShape(Median):
    name: ClassVar[str] = "wrong_shape"

    def reduce(self, windows, valid):
        return windows


def test_functions_that_vanish_fail_to_start_or_misbehave(plugins, monkeypatch):
    for function in (Broken, WrongShape):
        plugins.add("functions", function.name, function, __name__)
    rules = [rule("median(a) over 2 tokens > 0.5", "m"), rule("broken(a) over 2 tokens > 0.5", "b")]
    with pytest.raises(RuleErrors) as errors:
        compile_rules(rules, CES)
    assert [str(e).splitlines()[0] for e in errors.value.errors] == [
        "<rule b>:1:1: rule 'b': score function 'broken' failed to start: no model here"]
    use_registry(monkeypatch, registry_module.Registry())   # the conditions stay parsed; the plugins are gone
    with pytest.raises(RuleErrors, match="unknown function 'median'"):
        compile_rules(rules[:1], CES, actions=False)
    use_registry(monkeypatch, plugins)
    program = compile_rules([rule("wrong_shape(a) over 2 tokens > 0.5")], CES)
    with pytest.raises(ValueError, match="'wrong_shape' returned shape"):
        program.run(torch.zeros(1, 3, len(CES), dtype=torch.bool), scores=torch.zeros(1, 3, len(CES)))


# --- the example package's `slope`, pip-installed ---------------------------------------------------

def naive_slope(values: list[float]) -> float:
    """Least squares of the values against 0, 1, 2, ...; 0 for fewer than two."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def test_the_example_slope_fires_where_a_concept_rises(installed_example):
    rising = [0.1, 0.1, 0.15, 0.3, 0.5, 0.7, 0.75, 0.7, 0.4, 0.2, 0.3, 0.6, 0.9, 0.9]
    padding = 3
    scores = torch.rand(2, len(rising) + padding, 2)           # padding and the other CE: noise
    scores[0, :len(rising), 0] = scores[1, padding:, 0] = torch.tensor(rising)
    mask = torch.ones(2, len(rising) + padding, dtype=torch.bool)
    mask[0, len(rising):] = mask[1, :padding] = False          # padding after, and before
    program = compile_rules([RuleSpec(name="rising", condition="slope(x) over 4 tokens > 0.1", match="token")],
                            ["x", "y"])
    holds = program.run(scores > 0.5, mask, scores=scores)[..., 0]
    seen = scores[0, :len(rising), 0].double().tolist()   # the float32 scores the program reads
    slopes = [naive_slope(seen[max(0, t - 3):t + 1]) for t in range(len(seen))]
    assert min(abs(s - 0.1) for s in slopes) > 1e-6, "no slope so close to the threshold that rounding decides"
    expected = [s > 0.1 for s in slopes]
    assert any(expected) and not all(expected)
    assert holds.tolist() == [expected + [False] * padding, [False] * padding + expected]
    assert registry_module.registry().origins[("functions", "slope")] == "gavel_example_plugins.trend:Slope"


def test_a_negative_threshold_catches_a_falling_concept(installed_example):
    """`slope(x) over 4 tokens < -0.1`: where the concept falls, as the naive slope says; the condition prints
    back as written; built-in functions, which read probabilities or counts, refuse a negative threshold."""

    falling = [0.9, 0.9, 0.85, 0.6, 0.3, 0.25, 0.3, 0.5, 0.8, 0.4, 0.1, 0.1]
    scores = torch.rand(1, len(falling), 2)
    scores[0, :, 0] = torch.tensor(falling)
    text = "slope(x) over 4 tokens < -0.1"
    assert str(parse_condition(text)) == text
    program = compile_rules([RuleSpec(name="falling", condition=text, match="token")], ["x", "y"])
    holds = program.run(scores > 0.5, scores=scores)[0, :, 0]
    seen = scores[0, :, 0].double().tolist()
    slopes = [naive_slope(seen[max(0, t - 3):t + 1]) for t in range(len(seen))]
    assert min(abs(s + 0.1) for s in slopes) > 1e-6
    expected = [s < -0.1 for s in slopes]
    assert any(expected) and not all(expected) and holds.tolist() == expected
    for condition, message in (("mean(x) over 3 tokens > -0.5", "CE scores, probabilities in \\[0, 1\\]"),
                               ("count(x) >= -2 within 4 tokens", "a number of tokens")):
        with pytest.raises(ConditionSyntaxError, match=message):
            parse_condition(condition)
