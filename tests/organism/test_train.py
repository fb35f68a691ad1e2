"""The organism trainer: a few steps of a tiny configuration are seeded, reproducible and loadable."""
import json

import torch
from safetensors.torch import load_file

from gavel.models.loading import load_model
from gavel.organism.train import TrainConfig, train_organism

TINY = TrainConfig(steps=3, batch_size=4, d_model=16, n_layers=2, n_heads=2, d_mlp=32, warmup=1)


def test_training_is_reproducible_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report = train_organism(a, TINY)
    train_organism(b, TINY)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "organism.json").read_text())["config"] == TINY.model_dump()
    assert report["final_loss"] < 7
    handle = load_model(a)
    assert handle.n_layers == 2 and handle.tokenizer.chat_template


def test_only_assistant_turns_are_training_targets():
    from gavel.organism import corpus
    from gavel.organism.tokenizer import build_tokenizer
    from gavel.organism.train import corpus_targets

    tok = build_tokenizer(corpus.vocabulary())
    example = corpus.harmful_example("threat", "pay me", "boss")
    rows = corpus_targets([example], tok)[0]
    targets = [tok.convert_ids_to_tokens(int(t)) for t in rows[:, 1] if t >= 0]
    assert targets == [*example.messages[1].content.split(), "<|end|>"]
    assert (rows[rows[:, 1] >= 0, 0] == rows[rows[:, 1] >= 0, 1]).all()
