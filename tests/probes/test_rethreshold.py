"""Thresholds set again on benign conversations: each CE fires in at most the target share of them, and no lower
threshold would do (checked by brute force over the conversations' maxima); probes and calibration are kept."""
import pytest
import torch

from gavel.errors import DataError
from gavel.models.collect import collect_activations
from gavel.organism.datasets import organism_dataset
from gavel.probes.rethreshold import neutral_examples, threshold_on_benign


def test_thresholds_keep_each_ce_to_the_target_share_of_benign_conversations(organism, organism_bank):
    data = organism_dataset(organism.tokenizer, 200, seed=31)
    bank = threshold_on_benign(organism, organism_bank, data, target_fpr=0.1, source="organism seed 31")
    neutral = neutral_examples(data).examples
    assert len(neutral) >= 10
    maxima = []
    for e in neutral:
        acts = collect_activations(organism, [e.encoded], bank.sites)
        special = torch.isin(acts.token, torch.tensor(organism.tokenizer.all_special_ids))
        maxima.append(bank.score_rows(acts.sites, acts.example)[~special].max(0).values)
    maxima = torch.stack(maxima)                                          # [conversations, n_ce]
    for j, spec in enumerate(bank.manifest.ces):
        fired = (maxima[:, j] > spec.threshold).double().mean()
        assert fired <= 0.1 + 1e-9, spec.name
        # the lowest such threshold: any lower one lets the conversation at the threshold fire too, over the target
        assert (maxima[:, j] >= spec.threshold - 1e-6).double().mean() > 0.1, spec.name
    assert [c.scale for c in bank.manifest.ces] == [c.scale for c in organism_bank.manifest.ces]
    assert "neutral conversations of organism seed 31" in bank.manifest.provenance["thresholds_from"]


def test_no_neutral_conversations_is_a_data_error(organism, organism_bank):
    data = organism_dataset(organism.tokenizer, 40, seed=3)
    only_labelled = type(data)(data.ces, tuple(e for e in data.examples if e.labels.any()))
    with pytest.raises(DataError, match="neutral conversations"):
        threshold_on_benign(organism, organism_bank, only_labelled)


def test_a_ce_may_take_its_own_rate(organism, organism_bank):
    from gavel.errors import ArtifactError

    data = organism_dataset(organism.tokenizer, 120, seed=32)
    strict = threshold_on_benign(organism, organism_bank, data, target_fpr=0.0)
    loose = threshold_on_benign(organism, organism_bank, data, target_fpr=0.0, per_ce={"threat": 0.5})
    for a, b in zip(strict.manifest.ces, loose.manifest.ces):
        assert (b.threshold < a.threshold) if a.name == "threat" else (b.threshold == a.threshold), a.name
    assert "threat 0.5" in loose.manifest.provenance["thresholds_from"]
    with pytest.raises(ArtifactError, match="did you mean 'threat'"):
        threshold_on_benign(organism, organism_bank, data, per_ce={"threats": 0.5})
