"""Fitting and evaluating CE banks on the organism: quality against ground truth, artifacts, CLI, errors."""
import json

import pytest
import torch
from helpers.gavel_library import gavel_library
from typer.testing import CliRunner

from gavel.cli import app
from gavel.errors import ArtifactError, DataError, SiteError
from gavel.models.collect import collect_activations
from gavel.organism.datasets import load_dataset, organism_dataset
from gavel.probes.bank import CEBank
from gavel.probes.calibration import PlattScaling
from gavel.probes.evaluate import evaluate_bank
from gavel.probes.fit import MAX_ROWS, fit_bank, split_examples
from gavel.probes.linear import LinearProbe
from gavel.probes.metrics import sequence_youden_threshold

SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(organism):
    return organism_dataset(organism.tokenizer, 600, seed=5)


def test_fitted_bank_recovers_ground_truth_on_held_out_data(organism, organism_bank):
    fresh = organism_dataset(organism.tokenizer, 300, seed=123)
    metrics = evaluate_bank(organism, organism_bank, fresh)
    assert set(metrics) == set(organism_bank.names)
    for name, m in metrics.items():
        assert m["auroc"] > 0.95, (name, m)
    for name in ("benchmark", "arithmetic", "refusal", "threat"):
        assert metrics[name]["sequence_tpr"] > 0.9 and metrics[name]["sequence_fpr"] < 0.1, (name, metrics[name])
    stored = {c.name: c.metrics for c in organism_bank.manifest.ces}
    assert all(0.9 < stored[n]["auroc"] <= 1 for n in stored) and all("sequence_fpr" in m for m in stored.values())


def test_each_ce_is_read_at_its_best_candidate_site(organism_bank):
    for spec in organism_bank.manifest.ces:
        head_sites = organism_bank.heads[spec.head].sites
        assert len(head_sites) == 1 and head_sites[0] in ("blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
    assert organism_bank.manifest.data_digest and organism_bank.manifest.fingerprint.n_layers == 4


def test_loaded_bank_scores_equal_in_memory_scores(organism, organism_bank, dataset, tmp_path):
    loaded = CEBank.load(organism_bank.save(tmp_path), fingerprint=organism.fingerprint())
    acts = collect_activations(organism, [e.encoded for e in dataset.examples[:20]], organism_bank.sites)
    # same tensors; BLAS may sum in another order for differently aligned memory, so equal to float rounding
    torch.testing.assert_close(loaded.score(acts.sites), organism_bank.score(acts.sites), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for h, g in zip(loaded.heads, organism_bank.heads)
               for a, b in zip(h.tensors().values(), g.tensors().values()))
    assert loaded.manifest.model_dump(exclude={"tensors"}) == organism_bank.manifest.model_dump(exclude={"tensors"})
    assert set(loaded.manifest.tensors) == {f"head{h}/{k}" for h, g in enumerate(organism_bank.heads)
                                            for k in g.tensors()}


def test_diff_means_and_concatenated_sites(organism, dataset):
    bank = fit_bank(organism, dataset, SITES, extractor="diff_means", concat=True)
    assert len(bank.heads) == 1 and bank.heads[0].sites == tuple(SITES)
    assert bank.heads[0].weight.shape == (2 * organism.d_model, len(bank.names))
    assert all(c.extractor == "diff_means" and c.metrics["auroc"] > 0.8 for c in bank.manifest.ces)


def test_split_is_by_example_seeded_and_complete():
    part = split_examples(100, (0.6, 0.2, 0.2), seed=1)
    assert torch.equal(part, split_examples(100, (0.6, 0.2, 0.2), seed=1))
    assert torch.bincount(part).tolist() == [60, 20, 20]
    assert not torch.equal(part, split_examples(100, (0.6, 0.2, 0.2), seed=2))


def test_bad_requests_are_clear_errors(organism, dataset):
    with pytest.raises(DataError, match="unknown extractor"):
        fit_bank(organism, dataset, SITES, extractor="svm")
    with pytest.raises(SiteError, match="hook_resid_post"):
        fit_bank(organism, dataset, ["blocks.1.hook_resid_pots"])
    with pytest.raises(SiteError, match="layer"):
        fit_bank(organism, dataset, ["blocks.9.hook_resid_post"])
    with pytest.raises(DataError, match="split"):
        fit_bank(organism, dataset, SITES, split=(0.5, 0.5))
    tiny = organism_dataset(organism.tokenizer, 12, seed=0).select(["benchmark"])
    with pytest.raises(DataError, match="benchmark"):
        fit_bank(organism, tiny, SITES[:1])


def test_gavel_library_ces_fit_end_to_end(organism, tmp_path):
    data = load_dataset(str(gavel_library(tmp_path, organism.tokenizer)), organism.tokenizer)
    bank = fit_bank(organism, data, SITES)
    assert bank.names == ["arithmetic", "harmful_compliance", "refusal"] or set(bank.names) == set(data.names)
    for c in bank.manifest.ces:
        assert c.role == "llm_behavior" and c.title and c.metrics["auroc"] > 0.9, c


def _naive_fit(handle, dataset, site, seed=0):
    """The reference: every activation in memory, the 60/20/20 split, a probe on train, Platt and sequence Youden
    thresholds on calibration."""
    acts = collect_activations(handle, [e.encoded for e in dataset.examples], [site], batch_size=1)
    keep = ~torch.isin(acts.token, torch.tensor(handle.tokenizer.all_special_ids))
    X, example = acts.sites[site][keep], acts.example[keep]
    Y = torch.cat([e.labels for e in dataset.examples])[keep]
    part = split_examples(len(dataset.examples), (0.6, 0.2, 0.2), seed)[example]
    probe = LinearProbe().fit(X[part == 0], Y[part == 0])
    raw = probe.decision_function(X[part == 1])
    platt = PlattScaling().fit(raw, Y[part == 1])
    probs = platt.transform(raw)
    thresholds = [sequence_youden_threshold(probs[:, j], Y[part == 1][:, j], example[part == 1])
                  for j in range(Y.shape[1])]
    return probe, platt, thresholds, int((part == 0).sum())


def test_streamed_fit_equals_a_naive_in_memory_fit(organism, dataset):
    selected = dataset.select(["benchmark", "arithmetic", "refusal"])
    data = type(selected)(selected.ces, selected.examples[:250])
    site = "blocks.2.hook_resid_post"
    probe, platt, thresholds, n_train = _naive_fit(organism, data, site)
    assert n_train < MAX_ROWS                                     # under the cap: every training row is used
    # unbatched on both sides: padding moves activations by float rounding, which an unconverged L-BFGS
    # amplifies (tests/models/test_collect.py checks batching and padding)
    bank = fit_bank(organism, data, [site], batch_size=1)
    (head,) = bank.heads
    torch.testing.assert_close(head.weight, probe.coef_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.bias, probe.intercept_, rtol=1e-4, atol=1e-5)
    for j, spec in enumerate(bank.manifest.ces):
        assert spec.scale == pytest.approx(float(platt.scale_[j]), rel=1e-4)
        assert spec.shift == pytest.approx(float(platt.shift_[j]), rel=1e-4, abs=1e-5)
        assert spec.threshold == pytest.approx(thresholds[j], abs=1e-5)
        assert spec.support["train_tokens_fitted"] == spec.support["train_tokens"]
    assert bank.manifest.provenance["thresholds_from"].startswith("calibration split")


def test_beyond_the_row_cap_the_fit_uses_a_bounded_sample(organism, dataset):
    data = dataset.select(["benchmark", "arithmetic", "refusal"])
    bank = fit_bank(organism, data, SITES, max_rows=600)
    for spec in bank.manifest.ces:
        assert spec.support["train_tokens_fitted"] < spec.support["train_tokens"]
        assert spec.metrics["auroc"] > 0.9, spec
    assert bank.manifest.provenance["max_rows"] == "600"


def test_calibration_sets_set_thresholds_and_excitation_is_split_train_test(organism, tmp_path):
    ces = gavel_library(tmp_path, organism.tokenizer, calibration=True)
    data = load_dataset(str(ces), organism.tokenizer)
    calibration = load_dataset(str(ces), organism.tokenizer, which="calibration")
    bank = fit_bank(organism, data, SITES, calibration_data=calibration)
    assert bank.manifest.provenance["thresholds_from"] == f"calibration data: {len(calibration)} examples"
    # the reference: the bank's own probabilities on the calibration conversations, sequence-level Youden J
    acts = collect_activations(organism, [e.encoded for e in calibration.examples], bank.sites)
    keep = ~torch.isin(acts.token, torch.tensor(organism.tokenizer.all_special_ids))
    probs = bank.score({s: a[keep] for s, a in acts.sites.items()})
    labels = torch.cat([e.labels for e in calibration.examples])[keep]
    for j, spec in enumerate(bank.manifest.ces):
        column = calibration.names.index(spec.name)
        expected = sequence_youden_threshold(probs[:, j], labels[:, column], acts.example[keep])
        assert spec.threshold == pytest.approx(expected, abs=1e-4), spec.name
        assert spec.metrics["auroc"] > 0.9, spec
    # 80% of the excitation examples trained (the split's calibration share joins training), 20% tested
    assert sum(len(e.labels) for e in data.examples) > 0
    test_sequences = sum(c.support["test_sequences"] for c in bank.manifest.ces)
    assert 0.15 * len(data) < test_sequences < 0.25 * len(data)


@pytest.mark.slow
def test_cli_fit_list_show_eval(organism, tmp_path):
    out = tmp_path / "bank"
    result = runner.invoke(app, ["ce", "fit", "--data", "builtin:organism:400", "--site", "blocks.2.hook_resid_post",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.stdout)["ces"]
    assert set(fitted) == set(CEBank.load(out).names) and all("auroc" in m for m in fitted.values())

    listed = json.loads(runner.invoke(app, ["ce", "list", "--bank", str(out), "--json"]).stdout)
    assert [r["name"] for r in listed][:2] == ["harmful_request", "threat"]
    shown = json.loads(runner.invoke(app, ["ce", "show", "--bank", str(out), "benchmark", "--json"]).stdout)
    assert shown["sites"] == ["blocks.2.hook_resid_post"] and shown["data_digest"]

    evaluated = runner.invoke(app, ["ce", "eval", "--bank", str(out), "--data", "builtin:organism:150:1",
                                    "--drop-overlap", "--json"])      # another seed's corpus, less what both share
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ces"]["benchmark"]["auroc"] > 0.95

    table = runner.invoke(app, ["ce", "eval", "--bank", str(out), "--data", "builtin:organism:100:1",
                                "--drop-overlap"])
    assert table.exit_code == 0 and "AUROC" in table.stdout


def test_cli_errors_exit_2(organism, organism_bank, tmp_path, tiny_model):
    bank_dir = organism_bank.save(tmp_path / "bank")
    other = tiny_model("llama", layers=4, d_model=128, d_mlp=64, heads=4, kv_heads=4, vocab=len(organism.tokenizer),
                       positions=None, tokenizer=organism.tokenizer, save_to=tmp_path / "other_model")
    mismatch = runner.invoke(app, ["ce", "eval", "--bank", str(bank_dir), "--model", str(other), "--data",
                                   "builtin:organism:50"])
    assert mismatch.exit_code == 2 and "weights_sha256" in mismatch.output
    forced = runner.invoke(app, ["ce", "eval", "--bank", str(bank_dir), "--model", str(other), "--data",
                                 "builtin:organism:50", "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    missing = runner.invoke(app, ["ce", "show", "--bank", str(bank_dir), "benchmrk"])
    assert missing.exit_code == 2 and "did you mean 'benchmark'" in missing.output
    bad_data = runner.invoke(app, ["ce", "fit", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert bad_data.exit_code == 2 and "no such file" in bad_data.output
    with pytest.raises(ArtifactError):
        CEBank.load(tmp_path)


@pytest.mark.slow
def test_per_head_readouts_and_neurons_as_features(organism, dataset):
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    sites = ["blocks.2.attn.hook_z", "blocks.2.mlp.hook_post"]
    bank = fit_bank(organism, dataset.select(["benchmark", "arithmetic", "refusal"]), sites)
    widths = {"blocks.2.attn.hook_z": organism.d_model, "blocks.2.mlp.hook_post": 512}
    for head in bank.heads:
        assert head.weight.shape[0] == widths[head.sites[0]]
    assert all(c.metrics["auroc"] > 0.9 for c in bank.manifest.ces)
    rule = RuleSpec(name="quiz", groups={"q": ["benchmark"]}, condition="q")
    result = Monitor(organism, bank, [rule], score="all").scan([[{"role": "user", "content": "quiz : what is the "
                                                                  "color of trelk ?"}]])[0]
    acts = collect_activations(organism, [dataset.examples[0].encoded.__class__(
        "", result.token_ids, torch.zeros(len(result.token_ids), dtype=torch.uint8),
        torch.zeros(len(result.token_ids), 2), ())], bank.sites)
    torch.testing.assert_close(result.scores, bank.score(acts.sites), rtol=1e-4, atol=1e-5)
    assert result.fired == ["quiz"]
