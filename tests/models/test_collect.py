"""Activation collection: padding side and batching never change a token's activations; shards round-trip."""
import pytest
import torch

from gavel.errors import DataError
from gavel.models.collect import ShardedActivations, collect_activations
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


def test_bad_requests(organism, examples):
    with pytest.raises(DataError):
        collect_activations(organism, examples, [])
    with pytest.raises(DataError):
        ShardedActivations("/nonexistent/dir")
