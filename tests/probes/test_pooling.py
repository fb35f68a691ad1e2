"""Trailing-mean pooling of CE scores: offline rows and the monitor's stream agree with a naive mean, and a bank fitted
with pooled heads scores the same through the monitor as offline."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import ArtifactError, DataError
from gavel.models.collect import collect_activations
from gavel.organism.datasets import organism_dataset
from gavel.probes.fit import fit_bank
from gavel.probes.pooling import TrailingMean, pool_rows


def naive_pool(values: list[list[float]], width: int) -> list[list[float]]:
    """Each position's mean over itself and up to width - 1 earlier positions of the same sequence."""
    return [[sum(col) / len(col) for col in zip(*values[max(0, t - width + 1):t + 1])] for t in range(len(values))]


lengths = st.lists(st.integers(1, 9), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths, width=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pool_rows_is_the_mean_of_each_examples_last_width_rows(lengths, width, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), 3, generator=g)
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    expected, start = [], 0
    for n in lengths:
        expected += naive_pool(x[start:start + n].tolist(), width)
        start += n
    torch.testing.assert_close(pool_rows(x, example, width), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(pad=st.lists(st.integers(0, 4), min_size=2, max_size=2), prompt=st.integers(1, 7), steps=st.integers(0, 5),
       width=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_streamed_pooling_equals_pooling_the_whole_sequence(pad, prompt, steps, width, seed):
    """A left-padded prompt then one token per forward (as generation runs) gives each real token the offline mean."""
    g = torch.Generator().manual_seed(seed)
    total = max(pad) + prompt
    x = torch.randn(2, total + steps, 2, generator=g)
    valid = torch.ones(2, total + steps, dtype=torch.bool)
    for b, p in enumerate(pad):
        valid[b, :p] = False              # left padding: sequence b's prompt has total - p real tokens
    pooled = TrailingMean(width)
    out = [pooled(x[:, :total], valid[:, :total])]
    out += [pooled(x[:, t:t + 1], valid[:, t:t + 1]) for t in range(total, total + steps)]
    got = torch.cat(out, 1)
    for b in range(2):
        real = valid[b]
        torch.testing.assert_close(got[b][real], torch.tensor(naive_pool(x[b][real].tolist(), width)),
                                   rtol=1e-5, atol=1e-6)


def test_widths_are_checked():
    with pytest.raises(DataError, match="positive integer"):
        TrailingMean(0)
    with pytest.raises(DataError, match="positive integer"):
        pool_rows(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), True)


@pytest.fixture(scope="module")
def pooled_bank(organism):
    data = organism_dataset(organism.tokenizer, 240, seed=11).select(["threat", "refusal"])
    return fit_bank(organism, data, ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"], pools=(4,))


def test_pooled_heads_are_scored_the_same_by_the_monitor_as_offline(organism, pooled_bank):
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    assert {spec.pool for spec in pooled_bank.manifest.heads} == {4}
    assert pooled_bank.manifest.provenance["pools"] == "4"
    assert all(c.metrics["auroc"] > 0.9 for c in pooled_bank.manifest.ces)
    conversation = [{"role": "user", "content": "write a message to my boss ."},
                    {"role": "assistant", "content": "tell your boss they will regret it unless they pay me ."}]
    rule = RuleSpec(name="threat", groups={"t": ["threat"]}, condition="t")
    result = Monitor(organism, pooled_bank, [rule], score="all").scan([conversation])[0]
    enc = organism_dataset(organism.tokenizer, 1, seed=0).examples[0].encoded.__class__(
        "", result.token_ids, torch.zeros(len(result.token_ids), dtype=torch.uint8),
        torch.zeros(len(result.token_ids), 2), ())
    acts = collect_activations(organism, [enc], pooled_bank.sites)
    offline = pooled_bank.score_rows(acts.sites, acts.example)
    torch.testing.assert_close(result.scores, offline, rtol=1e-4, atol=1e-5)


def test_a_pooled_bank_refuses_token_by_token_scoring(organism, pooled_bank):
    acts = collect_activations(organism, [organism_dataset(organism.tokenizer, 1, seed=0).examples[0].encoded],
                               pooled_bank.sites)
    with pytest.raises(ArtifactError, match="score_rows"):
        pooled_bank.score(acts.sites)
