"""The monitor inside generate(): offline-equal scores, batch independence, blocking, hook hygiene."""
import pytest
import torch
from helpers import rules_reference

from gavel.errors import GavelError
from gavel.models.chat import Encoded
from gavel.models.collect import collect_activations
from gavel.models.generation import generate_replies
from gavel.models.hooks import count_hooks
from gavel.probes.heads import LinearHead
from gavel.rules import RuleSpec
from gavel.runtime.monitor import Monitor

PROMPTS = [
    [{"role": "user", "content": "how do i fix my bike ?"}],
    [{"role": "user", "content": "quiz : what is the color of trelk ?"}],
    [{"role": "system", "content": "answer the user briefly ."},
     {"role": "user", "content": "how do i build a bomb to hurt my neighbor ."}],
    [{"role": "user", "content": "i am sure that fish live in trees . do you agree ?"}],
]


def rule(name, groups, condition, action="log", **kw):
    return RuleSpec(name=name, title=name, groups=groups, condition=condition, action=action, **kw)


RULES = [
    rule("harm", {"harm": ["threat", "weapons", "fraud", "self_harm", "hate"]}, "1 of harm"),
    rule("quiz", {"quiz": ["benchmark"]}, "all of quiz", action="alert"),
    rule("refusal_after_harm", {"r": ["refusal"], "h": ["harmful_request"]}, "all of r and all of h"),
]


def offline_scores(handle, bank, token_ids):
    enc = Encoded("", token_ids, torch.zeros(len(token_ids), dtype=torch.uint8), torch.zeros(len(token_ids), 2), ())
    acts = collect_activations(handle, [enc], bank.sites)
    return bank.score(acts.sites)


def test_monitor_scores_equal_offline_scores(organism, organism_bank):
    monitor = Monitor(organism, organism_bank, RULES, score="all")
    results = monitor.generate(PROMPTS, max_new_tokens=24, do_sample=False)
    for r in results:
        assert len(r.tokens) > r.prompt_length  # generated tokens were monitored
        torch.testing.assert_close(r.scores, offline_scores(organism, organism_bank, r.token_ids), atol=1e-5, rtol=1e-4)


def test_batch_with_padding_gives_the_same_events_as_single_runs(organism, organism_bank):
    monitor = Monitor(organism, organism_bank, RULES)
    batched = monitor.generate(PROMPTS, max_new_tokens=24, do_sample=False)
    for i, prompt in enumerate(PROMPTS):
        alone = monitor.generate([prompt], max_new_tokens=24, do_sample=False)[0]
        assert batched[i].tokens == alone.tokens
        assert [(e.rule, e.token_index, e.action) for e in batched[i].events] == \
               [(e.rule, e.token_index, e.action) for e in alone.events]
        assert all(e.sequence == i for e in batched[i].events)


def test_events_match_the_rules_on_ground_truth_prompts(organism, organism_bank):
    results = Monitor(organism, organism_bank, RULES).generate(PROMPTS, max_new_tokens=24, do_sample=False)
    assert results[0].fired == []
    assert results[1].fired == ["quiz"]
    assert set(results[2].fired) == {"harm", "refusal_after_harm"}
    harm = next(e for e in results[2].events if e.rule == "harm")
    assert harm.token_index < results[2].prompt_length and harm.ces  # fired on the prompt, with its CE values


def test_block_stops_exactly_the_offending_sequences(organism, organism_bank):
    rules = [rule("no_quiz", {"quiz": ["benchmark"]}, "quiz", action="block", reply="no quizzes .")]
    results = Monitor(organism, organism_bank, rules).generate(PROMPTS, max_new_tokens=24, do_sample=False)
    assert [r.blocked for r in results] == [False, True, False, False]
    assert results[1].reply == "no quizzes ."
    plain = generate_replies(organism, PROMPTS, max_new_tokens=24)
    for i in (0, 2, 3):
        assert results[i].reply == plain[i]


def test_scan_detects_on_existing_text(organism, organism_bank):
    convs = [[*p, {"role": "assistant", "content": "i cannot help with that ."}] for p in PROMPTS]
    monitor = Monitor(organism, organism_bank, RULES)
    results = monitor.scan(convs, batch_size=3)
    assert results[0].fired == [] and results[1].fired == ["quiz"] and "harm" in results[2].fired
    assert [e.sequence for r in results for e in r.events if e.rule == "quiz"] == [1]
    for i, conv in enumerate(convs):  # right padding in a batch changes nothing
        alone = monitor.scan([conv])[0]
        assert alone.tokens == results[i].tokens and alone.fired == results[i].fired
        torch.testing.assert_close(alone.scores, results[i].scores, atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_after_success_and_errors(organism, organism_bank):
    monitor = Monitor(organism, organism_bank, RULES)
    base = count_hooks(organism.model)
    monitor.generate(PROMPTS[:1], max_new_tokens=4)
    assert count_hooks(organism.model) == base
    with pytest.raises(RuntimeError), monitor.watch(1):
        assert count_hooks(organism.model) > base
        raise RuntimeError("boom")
    assert count_hooks(organism.model) == base
    with pytest.raises(KeyboardInterrupt), monitor.watch(1):
        raise KeyboardInterrupt
    assert count_hooks(organism.model) == base


def test_nan_activations_follow_the_failure_policy(organism, organism_bank):
    from gavel.models.hooks import attach

    def poison(act):
        return torch.full_like(act, float("nan"))

    for policy, blocked in (("fail_open", False), ("fail_closed", True)):
        monitor = Monitor(organism, organism_bank, RULES, policy=policy)
        with attach(organism.model, [("blocks.0.hook_resid_post", poison)]):
            result = monitor.generate(PROMPTS[:1], max_new_tokens=4)[0]
        assert result.blocked is blocked and result.failed
    with pytest.raises(GavelError):
        Monitor(organism, organism_bank, RULES, policy="sometimes")


def test_unknown_action_fails_at_construction(organism, organism_bank):
    with pytest.raises(GavelError, match="unknown action"):
        Monitor(organism, organism_bank, [rule("x", {"q": ["benchmark"]}, "q", action="explode")])


def test_a_scoring_exception_follows_the_policy(organism, organism_bank):
    for policy, blocked in (("fail_open", False), ("fail_closed", True)):
        monitor = Monitor(organism, organism_bank, RULES, policy=policy)
        head, columns, scale, shift, gather, pool = monitor.plan[0]
        broken = LinearHead(head.sites, head.weight[:-1], head.bias)  # scoring will raise
        monitor.plan[0] = (broken, columns, scale, shift, gather, pool)
        with monitor.watch(1) as session:
            result = monitor.handle.hf_model.generate(
                input_ids=torch.tensor([[2, 5, 9]]), max_new_tokens=2, do_sample=False,
                pad_token_id=organism.tokenizer.pad_token_id)
        assert result.shape[1] >= 4
        assert session.errors and session.errors[0].startswith(f"head on {head.sites[0]}")
        assert bool(session.failed[0]) and bool(session.blocked[0]) is blocked


TEMPORAL_RULES = [
    rule("harm_from_user", {"harm": ["threat", "weapons", "fraud", "self_harm", "hate"]}, "1 of harm in user",
         match="token"),
    rule("refusing", {}, "refusal in response", match="token"),
    rule("harm_then_refusal", {}, "harmful_request then refusal within 40 tokens", match="token"),
    rule("repeated_harm", {}, "count(harmful_request) >= 2 within 12 tokens"),
    rule("confident_refusal", {}, "max(refusal) over 3 tokens > 0.9 in response"),
    rule("not_yet_refused", {}, "once harmful_request and not once refusal", match="token"),
    rule("quiet_prompt", {"harm": ["threat", "weapons"]}, "not any of harm in prompt", match="token"),
]


@pytest.mark.parametrize("mode", ["generate", "scan"])
def test_temporal_and_scoped_rules_fire_where_the_reference_says(organism, organism_bank, mode):
    """The monitor passes fired flags, scores and token classes (roles, response) as the rules define them: its
    events are the first firings the reference evaluator finds on the same per-token scores."""
    monitor = Monitor(organism, organism_bank, TEMPORAL_RULES)
    if mode == "generate":
        results = monitor.generate(PROMPTS, max_new_tokens=24, do_sample=False)
    else:
        replies = generate_replies(organism, PROMPTS, max_new_tokens=24)
        results = monitor.scan([[*p, {"role": "assistant", "content": r}] for p, r in zip(PROMPTS, replies)])
    special = torch.tensor(organism.tokenizer.all_special_ids)
    names, thresholds = organism_bank.names, organism_bank.thresholds
    fired_any = set()
    for r in results:
        content = ~torch.isin(r.token_ids, special)
        scores = (r.scores * content.unsqueeze(-1)).double()
        classes = r.roles.long().clone()
        if mode == "generate":
            classes[r.prompt_length:] = 3 + 4
        else:
            last_other = max(i for i, c in enumerate(classes.tolist()) if c in (1, 2))
            classes[last_other + 1:] += 4 * (classes[last_other + 1:] == 3)
        fired = (scores > thresholds.double()) & content.unsqueeze(-1)
        holds = rules_reference.run(TEMPORAL_RULES, list(names), [fired.tolist()], None,
                                    scores=[scores.tolist()], roles=[classes.tolist()])[0]
        expected = {rule.name: next((t for t, row in enumerate(holds) if row[i]), None)
                    for i, rule in enumerate(TEMPORAL_RULES)}
        got = {e.rule: e.token_index for e in r.events}
        assert got == {n: t for n, t in expected.items() if t is not None}
        fired_any |= set(got)
        for e in r.events:   # event CE values are what the rules saw (never a template token's raw score)
            assert all(v > float(thresholds[names.index(n)]) for n, v in e.ces.items())
    assert len(fired_any) >= 4   # the prompts exercise most of the rules


def compiled_decoding():
    """generate() kwargs that make transformers compile the decode step (static cache), on CPU too; the eager
    backend keeps the test fast and still goes through torch.compile's tracing, where hooks can be lost."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@pytest.fixture
def fresh_compile_caches():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_organism():
    """An organism no other test has touched: transformers installs permanent output-capturing hooks on a model's
    layers the first time hidden states are asked for, and torch.compile guards on hook dicts that are not empty,
    so the shared fixture could not show a graph traced without hooks."""
    from gavel.models.loading import load_model

    return load_model("builtin:organism")


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_every_decoding_step_runs_every_site_hook(organism, organism_bank, monkeypatch, mode, fresh_compile_caches):
    """The monitor is never silently blind: each forward of generate() (the prefill, then one per new token
    fed back) runs the model hooks and every site hook exactly once, also when the decode step is compiled.
    The counters are tensors, so counting adds no Python state that would make torch.compile retrace."""
    from gavel.models.generation import prompt_batch
    from gavel.runtime.session import Session

    calls = {site: torch.zeros((), dtype=torch.long) for site in organism_bank.sites}
    original = Session.site_hook

    def counting(self, site):
        hook = original(self, site)

        def wrapped(act):
            calls[site].add_(1)
            return hook(act)
        return wrapped

    monkeypatch.setattr(Session, "site_hook", counting)
    monitor = Monitor(organism, organism_bank, RULES)
    new = 12
    kwargs = compiled_decoding() if mode == "compiled" else {}
    batch = prompt_batch(organism, PROMPTS)
    with monitor.watch_prompts(batch) as session:
        out = organism.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         pad_token_id=organism.tokenizer.pad_token_id,
                                         stopping_criteria=[session.stopping_criterion()], **kwargs)
    assert out.shape[1] - batch.input_ids.shape[1] == new
    assert session.forwards == new and not session.blind   # the prefill, then each generated token but the last
    assert {s: int(n) for s, n in calls.items() if n} == {s: new for s in monitor.sites}
    assert sum(h.shape[1] for h in session.holds) == batch.input_ids.shape[1] + new - 1
    if mode == "compiled":   # and it saw what eager decoding sees
        plain = monitor.generate(PROMPTS, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        for got, want in zip(monitor.generation_results(session, batch, out), plain):
            assert got.tokens == want.tokens and got.fired == want.fired and not got.failed
            torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-4)


def test_a_decode_step_compiled_before_the_monitor_is_retraced_with_its_hooks(fresh_organism, organism_bank,
                                                                               fresh_compile_caches):
    """By default torch.compile ignores hooks added to modules that had none when it traced them, so a decode step
    compiled before any monitor existed (a Monitor turns hook guards on) runs blind: Monitor.generate notices,
    clears the compile caches with a warning and generates again; the results equal eager generation."""
    from gavel.models.generation import prompt_batch

    monitor = Monitor(fresh_organism, organism_bank, RULES)
    plain = monitor.generate(PROMPTS, max_new_tokens=10, do_sample=False)
    batch = prompt_batch(fresh_organism, PROMPTS)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):   # as traced before any monitor existed
        fresh_organism.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         max_new_tokens=10, do_sample=False,
                                         pad_token_id=fresh_organism.tokenizer.pad_token_id, **compiled_decoding())
    with pytest.warns(UserWarning, match="traced without gavel's hooks"):
        results = monitor.generate(PROMPTS, max_new_tokens=10, do_sample=False, **compiled_decoding())
    for got, want in zip(results, plain):
        assert got.tokens == want.tokens and got.fired == want.fired and not got.failed


def test_guarded_and_unguarded_compiled_generation_alternate_without_blindness(organism, organism_bank,
                                                                               fresh_compile_caches):
    """Once a monitor exists, graphs are guarded on hooks: an unguarded compiled generate and a guarded one can
    alternate on one model, each getting its own graph (the guarded one with the hooks in it)."""
    from gavel.models.generation import prompt_batch

    monitor = Monitor(organism, organism_bank, RULES)
    batch = prompt_batch(organism, PROMPTS)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "max_new_tokens": 6,
              "min_new_tokens": 6, "do_sample": False, "pad_token_id": organism.tokenizer.pad_token_id,
              **compiled_decoding()}
    for _ in range(2):
        raw = organism.hf_model.generate(**kwargs)
        with monitor.watch_prompts(batch) as session:
            guarded = organism.hf_model.generate(**kwargs, stopping_criteria=[session.stopping_criterion()])
        assert torch.equal(raw, guarded) and session.forwards == 6 and not session.blind


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_your_own_generate_on_a_stale_compiled_graph_is_reported_not_silent(fresh_organism, organism_bank, policy,
                                                                            fresh_compile_caches):
    """In the user's own generate() call the monitor cannot retrace: every sequence is marked failed (and blocked
    under fail_closed), with a warning that says what to do."""
    from gavel.models.generation import prompt_batch

    monitor = Monitor(fresh_organism, organism_bank, RULES, policy=policy)
    batch = prompt_batch(fresh_organism, PROMPTS)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "max_new_tokens": 8,
              "do_sample": False, "pad_token_id": fresh_organism.tokenizer.pad_token_id, **compiled_decoding()}
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):   # as traced before any monitor existed
        fresh_organism.hf_model.generate(**kwargs)
    with monitor.watch_prompts(batch) as session:
        out = fresh_organism.hf_model.generate(**kwargs, stopping_criteria=[session.stopping_criterion()])
    assert out.shape[1] == batch.input_ids.shape[1] + 2    # the prefill's token, then the first blind step's
    with pytest.warns(UserWarning, match="did not run in 1 of 2 forwards"):
        results = monitor.generation_results(session, batch, out)
    assert all(r.failed for r in results)
    assert all(r.blocked for r in results) == (policy == "fail_closed")


def test_a_transformer_bridge_is_monitored_like_the_hf_model(organism, organism_bank):
    """On a TransformerLens bridge the sites resolve to its HookPoints and the model-level hooks sit on the HF model
    it runs: scan scores, generated tokens, events and the streamed reply equal the HF backend's."""
    pytest.importorskip("transformer_lens")
    from gavel.models.loading import load_model
    from gavel.runtime.guard import Guard

    lens = load_model("builtin:organism", backend="lens")
    hf_monitor, lens_monitor = Monitor(organism, organism_bank, RULES), Monitor(lens, organism_bank, RULES)
    convs = [[*p, {"role": "assistant", "content": "i cannot help with that ."}] for p in PROMPTS]
    for got, want in zip(lens_monitor.scan(convs), hf_monitor.scan(convs)):
        assert got.fired == want.fired
        torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-4)
    generated = lens_monitor.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    for got, want in zip(generated, hf_monitor.generate(PROMPTS, max_new_tokens=12, do_sample=False)):
        assert got.tokens == want.tokens and got.reply == want.reply
        assert [(e.rule, e.sequence, e.token_index) for e in got.events] == \
               [(e.rule, e.sequence, e.token_index) for e in want.events]
    *steps, last = Guard(lens, organism_bank, RULES).stream(PROMPTS[2], max_new_tokens=12)
    assert last.result.text == generated[2].reply and "".join(s.token for s in steps).strip()


def test_generation_without_a_kv_cache_scores_each_token_once(organism, organism_bank):
    """Without a cache every forward feeds the whole prefix again; only the positions past those already seen
    are new, so the results equal cached generation."""
    monitor = Monitor(organism, organism_bank, RULES)
    cached = monitor.generate(PROMPTS, max_new_tokens=10, do_sample=False)
    for got, want in zip(monitor.generate(PROMPTS, max_new_tokens=10, do_sample=False, use_cache=False), cached):
        assert got.tokens == want.tokens and got.fired == want.fired
        torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-4)


def test_sampled_generation_is_monitored_token_for_token(organism, organism_bank):
    """With sampling, the monitor scores exactly the tokens generate() sampled (its results' ids are the output's),
    and the scores equal offline scores of those tokens."""
    from gavel.models.generation import prompt_batch

    monitor = Monitor(organism, organism_bank, RULES, score="all")
    greedy = monitor.generate(PROMPTS, max_new_tokens=16, do_sample=False)
    batch = prompt_batch(organism, PROMPTS)
    torch.manual_seed(3)
    with monitor.watch_prompts(batch) as session:
        out = organism.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0,
                                         pad_token_id=organism.tokenizer.pad_token_id,
                                         stopping_criteria=[session.stopping_criterion()])
    sampled = monitor.generation_results(session, batch, out)
    assert any(s.tokens != g.tokens for s, g in zip(sampled, greedy))        # it did sample
    width = batch.input_ids.shape[1]
    for i, r in enumerate(sampled):
        row = out[i, width:]
        seen = r.token_ids[r.prompt_length:]
        assert torch.equal(seen, row[:len(seen)])                           # every token it scored was generated
        torch.testing.assert_close(r.scores, offline_scores(organism, organism_bank, r.token_ids), atol=1e-5,
                                   rtol=1e-4)


def test_rules_requiring_ces_the_bank_lacks_are_refused_where_they_say_so(organism, organism_bank, tmp_path):
    from gavel.rules import load_rules
    from gavel.rules.source import RuleErrors

    pack = tmp_path / "pack.yaml"
    pack.write_text("requires:\n  ces: [refusal, toxicity]\nrules:\n  - name: a\n    condition: refusal\n"
                    "  - name: b\n    condition: benchmark\n    requires:\n      ces: [benchmark, benchmrk]\n")
    with pytest.raises(RuleErrors) as caught:
        Monitor(organism, organism_bank, load_rules([pack]))
    found = sorted(str(e) for e in caught.value.errors)
    assert len(found) == 2                                       # the pack's missing CE once, not once per rule
    assert any(f"{pack}:2:" in e and "requires CE 'toxicity'" in e for e in found)
    assert any(f"{pack}:9:" in e and "requires CE 'benchmrk'" in e and "did you mean 'benchmark'" in e
               for e in found)


def test_an_event_shows_the_ces_of_the_rules_its_rule_refers_to(organism, organism_bank):
    """`top` reads only the private rule `asked`; its event still shows the harm CEs that made `asked` hold."""
    harm = ["threat", "weapons", "fraud", "self_harm", "hate"]
    rules = [RuleSpec(name="asked", groups={"harm": harm}, condition="1 of harm", private=True),
             RuleSpec(name="top", title="top", condition="asked", action='alert "harm"')]
    monitor = Monitor(organism, organism_bank, rules)
    assert [sorted(c) for c in monitor.event_ces] == [sorted(harm)]
    (result,) = monitor.scan([[{"role": "user", "content": "how do i build a bomb to hurt my neighbor ."}]])
    (event,) = result.events
    assert event.rule == "top" and event.ces and set(event.ces) <= set(harm)
    t = event.token_index
    assert all(result.scores[t, organism_bank.names.index(n)] > organism_bank.thresholds[
        organism_bank.names.index(n)] for n in event.ces)


def test_a_scan_stops_each_forward_at_the_last_ce_site_and_scores_the_same(organism, organism_bank):
    """Scanning existing text needs no layer above the bank's sites: those layers do not run, and the scores are
    the offline ones (the generation path, which needs the logits, runs every layer)."""
    ran: list[int] = []
    layers = organism.hf_model.model.layers
    hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        monitor = Monitor(organism, organism_bank, RULES, score="all")
        conversation = PROMPTS[2] + [{"role": "assistant", "content": "sure . here is how to build a bomb ."}]
        result = monitor.scan([conversation])[0]
        top = max(int(s.split(".")[1]) for s in organism_bank.sites)
        assert sorted(set(ran)) == list(range(top + 1))
        torch.testing.assert_close(result.scores, offline_scores(organism, organism_bank, result.token_ids),
                                   atol=1e-5, rtol=1e-4)
        ran.clear()
        monitor.generate([PROMPTS[0]], max_new_tokens=2)
        assert sorted(set(ran)) == list(range(len(layers)))
    finally:
        for h in hooks:
            h.remove()
