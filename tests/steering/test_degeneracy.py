"""The degeneracy judge: repetition against a naive count, the judge's rule, and a sweep whose replies it reads with
the unsteered model (a looping reply the refusal-phrase judge counts as compliance is flagged)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.steering.degeneracy import degenerate, judge_degeneracy, repetition, words


def naive_repetition(text: str) -> float:
    tokens = text.lower().split()
    bigrams = [(tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1)]
    if len(bigrams) < 2:
        return 0.0
    return sum(bigrams[i] in bigrams[:i] for i in range(len(bigrams))) / len(bigrams)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["i", "the", "cat", "sat", "5", "Sure", "help"]), max_size=30))
def test_repetition_is_the_share_of_bigrams_seen_before(tokens):
    text = " ".join(tokens)
    assert repetition(text) == pytest.approx(naive_repetition(text))
    assert 0.0 <= repetition(text) < 1.0
    assert repetition(text.upper()) == repetition(text)


def test_loops_repeat_and_fresh_text_does_not():
    assert repetition("i i i i i i") == pytest.approx(4 / 5)
    assert repetition("sure . to 5 5 5 5 5 5 5 5") > 0.5
    assert repetition("I cannot help with that, it is dangerous.") == 0.0
    assert words("Don't stop!") == ["don", "'", "t", "stop", "!"]


def test_a_reply_is_degenerate_when_empty_looping_or_implausible():
    assert degenerate("   ", 1.0)
    assert degenerate("i i i i i i i i", 1.0)
    assert degenerate("the bridge sings purple arithmetic", 250.0)
    assert not degenerate("To fix a bike, check the tyre first.", 3.0)
    judged = judge_degeneracy(["fine reply here", "i i i i i i", ""], [2.0, 1.5, 1.0])
    assert judged.rate == pytest.approx(2 / 3) and judged.perplexity_mean == pytest.approx(1.5)


def test_a_sweep_reads_replies_with_the_unsteered_model(organism):
    """Rotation by 0 is the identity: its perplexities and degeneracy are the unsteered ones. Adding the class
    difference makes the harmful replies loop: the phrase judge calls them compliance (refusal 0), the degeneracy
    judge flags every one."""
    from gavel.organism.corpus import evaluation_sets
    from gavel.organism.labels import as_conversation
    from gavel.steering.activations import last_prompt_activations
    from gavel.steering.evaluate import generate_with_ids, reply_perplexity, sweep
    from gavel.steering.selective.plane import SteeringPlane

    sets = evaluation_sets()
    sites = [f"blocks.{layer}.hook_resid_pre" for layer in range(organism.n_layers)]
    pos, neg = ([as_conversation(e.prompt()) for e in sets[name]] for name in ("harmful", "benign"))
    plane = SteeringPlane().fit(last_prompt_activations(organism, pos, sites), last_prompt_activations(organism, neg,
                                                                                                         sites))
    prompts = pos[:6]
    rotated = sweep(organism, plane, prompts, "rotate", [0.0], max_new_tokens=12)
    base = generate_with_ids(organism, prompts, 12)
    expected = sum(reply_perplexity(organism, c, r) for c, r in zip(prompts, base)) / len(prompts)
    assert rotated.points[0].perplexity_mean == pytest.approx(expected, abs=1e-3)
    assert rotated.points[0].degenerate_rate == rotated.unsteered_degeneracy.rate == 0.0
    assert rotated.unsteered_refusal_rate == 1.0
    added = sweep(organism, plane, prompts, "add", [1.0], max_new_tokens=12).points[0]
    assert added.refusal_rate == 0.0 and added.degenerate_rate == 1.0 and added.repetition_mean > 0.5
    assert torch.isfinite(torch.tensor(added.perplexity_mean))


def test_batched_perplexities_equal_one_at_a_time(organism):
    from gavel.organism.datasets import prompt_set
    from gavel.steering.evaluate import generate_with_ids, reply_perplexities, reply_perplexity

    prompts = prompt_set("benign")[:5] + prompt_set("harmful")[:4]
    replies = generate_with_ids(organism, prompts, 10)
    replies[2] = replies[2][:0]                                   # an empty reply
    replies[3] = torch.flip(replies[3], [0])                      # an implausible one
    batched = reply_perplexities(organism, prompts, replies, batch_size=4)
    single = []
    for c, r in zip(prompts, replies):
        from gavel.models.generation import prompt_batch

        ids = torch.cat([prompt_batch(organism, [c]).input_ids[0], r])[None]
        if len(r) == 0:
            single.append(1.0)
            continue
        with torch.no_grad():
            logits = organism.forward(ids, torch.ones_like(ids)).logits[0, -len(r) - 1:-1].float()
        single.append(float(torch.nn.functional.cross_entropy(logits, r).exp()))
    assert batched == pytest.approx(single, rel=1e-4)
    assert batched[3] > batched[4] and reply_perplexity(organism, prompts[0], replies[0]) == pytest.approx(single[0],
                                                                                                           rel=1e-4)
