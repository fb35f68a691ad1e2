"""Activation collection: padding side and batching never change a token's activations; shards round-trip."""
import pytest
import torch

from gavel.errors import DataError
from gavel.models.collect import ShardedActivations, batches, collect_activations, iter_activations
from gavel.organism import corpus
from gavel.organism.labels import encode_example

SITES = ["blocks.1.hook_resid_post", "blocks.3.mlp.hook_post"]


@pytest.fixture(scope="module")
def examples(organism):
    return [encode_example(organism.tokenizer, ex)[0] for ex in corpus.generate_corpus(12, seed=8)]


def test_left_right_padding_and_batch_size_agree(organism, examples):
    right = collect_activations(organism, examples, SITES, batch_size=5, padding_side="right")
    left = collect_activations(organism, examples, SITES, batch_size=4, padding_side="left")
    assert len(right) == sum(len(e.input_ids) for e in examples)
    assert torch.equal(right.example, left.example) and torch.equal(right.position, left.position)
    for s in SITES:
        torch.testing.assert_close(right.sites[s], left.sites[s], atol=1e-5, rtol=1e-4)


def test_rows_match_a_single_unpadded_forward(organism, examples):
    acts = collect_activations(organism, examples, ["blocks.1.hook_resid_post"], batch_size=6)
    ex = examples[3]
    with torch.no_grad():
        out = organism.hf_model(input_ids=ex.input_ids[None], output_hidden_states=True)
    rows = acts.example == 3
    torch.testing.assert_close(acts.sites["blocks.1.hook_resid_post"][rows], out.hidden_states[2][0],
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(acts.token[rows], ex.input_ids)
    assert torch.equal(acts.role[rows], ex.roles)


def test_shards_round_trip(organism, examples, tmp_path):
    memory = collect_activations(organism, examples, SITES, batch_size=4)
    sharded = collect_activations(organism, examples, SITES, batch_size=4, shard_dir=tmp_path, shard_tokens=100)
    assert isinstance(sharded, ShardedActivations)
    assert len(list(tmp_path.glob("shard_*.safetensors"))) > 1
    loaded = ShardedActivations(tmp_path).load()
    for s in SITES:
        assert torch.equal(loaded.sites[s], memory.sites[s])
    assert torch.equal(loaded.position, memory.position)


def test_progress_is_reported_per_batch(organism, examples):
    seen = []
    collect_activations(organism, examples, SITES[:1], batch_size=5, progress=seen.append)
    assert seen == [5, 5, 2]


def test_token_budget_cuts_batches_of_consecutive_examples():
    lengths = [10, 10, 10, 50, 5, 5, 200, 3]
    # a batch ends at batch_size examples, or before its padded size (examples x longest) would pass 60
    assert list(batches(lengths, 4, 60)) == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert list(batches(lengths, 3)) == [(0, 3), (3, 6), (6, 8)]
    for start, stop in batches(lengths, 4, 60):
        assert stop - start == 1 or (stop - start) * max(lengths[start:stop]) <= 60
    with pytest.raises(DataError):
        list(batches(lengths, 0))


def test_streamed_batches_under_a_token_budget_equal_the_collection(organism, examples):
    whole = collect_activations(organism, examples, SITES, batch_size=4)
    parts = list(iter_activations(organism, examples, SITES, batch_size=4, max_batch_tokens=120))
    for part in parts:
        members = sorted(set(part.example.tolist()))
        assert len(members) == 1 or len(members) * max(len(examples[i].input_ids) for i in members) <= 120
    assert len(parts) > 3
    for s in SITES:
        torch.testing.assert_close(torch.cat([p.sites[s] for p in parts]), whole.sites[s], atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat([p.example for p in parts]), whole.example)


def test_bad_requests(organism, examples):
    with pytest.raises(DataError):
        collect_activations(organism, examples, [])
    with pytest.raises(DataError):
        ShardedActivations("/nonexistent/dir")
