"""Surgical fine-tuning: only the selected neurons' rows and columns move; every other parameter is bit-identical."""
import pytest
import torch

from gavel.errors import DataError
from gavel.finetune.surgical import masked_finetune, neuron_masks


@pytest.fixture
def tiny(tiny_model):
    return tiny_model("llama", d_model=16, heads=2, kv_heads=2, vocab=50, positions=32, seed=0).hf_model


def test_masks_cover_the_selected_neurons_rows_and_columns(tiny):
    masks = neuron_masks(tiny, {1: torch.tensor([3, 7])})
    assert set(masks) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert masks["model.layers.1.mlp.up_proj.weight"].sum(1).nonzero().flatten().tolist() == [3, 7]
    assert masks["model.layers.1.mlp.down_proj.weight"].sum(0).nonzero().flatten().tolist() == [3, 7]
    with pytest.raises(DataError, match=r"neuron indices must lie in \[0, 32\)"):
        neuron_masks(tiny, {0: torch.tensor([32])})


def test_finetuning_moves_only_the_selected_neurons(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    masks = neuron_masks(tiny, {0: torch.tensor([1, 5, 9]), 1: torch.tensor([0])})
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (4, 8), generator=g) for _ in range(5)]
    losses = masked_finetune(tiny, masks, batches, lambda m, ids: m(input_ids=ids, labels=ids).loss, lr=1e-2)
    assert len(losses) == 5 and losses[-1] < losses[0]
    after = tiny.state_dict()
    for name, value in after.items():
        if name in masks:
            assert torch.equal(value[~masks[name]], before[name][~masks[name]])    # outside: bit-identical
            assert not torch.equal(value[masks[name]], before[name][masks[name]])  # inside: trained
        else:
            assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in tiny.parameters()) and not tiny.training
