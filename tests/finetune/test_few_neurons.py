"""A Few Bad Neurons: selection recovers planted neurons (probe and SAE attribution), the attribution equals a naive
sum, masks follow Conv1D layouts, neuron sets round-trip by kind, and `gavel neurons select | tune` on the organism
move only the selected neurons' weights."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import ArtifactError, DataError
from gavel.finetune.behaviour_neurons import BehaviourNeurons, SAEEvidence, sae_attribution, standardised_difference
from gavel.finetune.few_neurons import random_neurons
from gavel.finetune.surgical import down_projection, masked_finetune, neuron_masks

SITES = [f"blocks.{layer}.mlp.hook_post" for layer in range(3)]


def planted(n: int = 60, width: int = 40, plant=((0, 5), (1, 17), (2, 33)), shift: float = 1.5, seed: int = 0):
    """Per-site activations where the planted (layer, neuron) pairs fire `shift` higher on the positive side."""
    g = torch.Generator().manual_seed(seed)
    pos = {s: torch.randn(n, width, generator=g) for s in SITES}
    neg = {s: torch.randn(n, width, generator=g) for s in SITES}
    for layer, neuron in plant:
        pos[SITES[layer]][:, neuron] += shift
    return pos, neg


def kept_pairs(est: BehaviourNeurons) -> set[tuple[int, int]]:
    return {(layer, int(i)) for layer, index in est.neurons().items() for i in index}


def test_probe_recovers_planted_neurons():
    pos, neg = planted()
    est = BehaviourNeurons(fraction=3 / 120).fit(pos, neg)
    assert kept_pairs(est) == {(0, 5), (1, 17), (2, 33)}
    assert int(est.kept_.sum()) == 3 and est.scores_.shape == (3, 40)
    assert est.sae_scores_.abs().sum() == 0 and len(est.latents_) == 0


def test_constant_neurons_score_zero_and_bad_input_is_refused():
    pos, neg = planted()
    pos[SITES[0]][:, 0] = 2.0
    neg[SITES[0]][:, 0] = 2.0
    est = BehaviourNeurons(fraction=0.1).fit(pos, neg)
    assert est.probe_scores_[0, 0] == 0
    with pytest.raises(DataError, match="same non-empty sites"):
        BehaviourNeurons().fit(pos, {SITES[0]: neg[SITES[0]]})
    with pytest.raises(DataError, match="at least 2 prompts"):
        BehaviourNeurons().fit({s: v[:1] for s, v in pos.items()}, neg)
    with pytest.raises(DataError, match="fraction"):
        BehaviourNeurons(fraction=0).fit(pos, neg)
    bad = dict(neg, **{SITES[1]: neg[SITES[1]].clone().fill_(float("nan"))})
    with pytest.raises(DataError, match="NaN"):
        BehaviourNeurons().fit(pos, bad)


def sae_world(seed: int = 0, d: int = 12, width: int = 40, d_sae: int = 16):
    """Neurons (1, 7) and (2, 21) write along latent 3's encoder direction and fire more on the positive side, which
    is what makes latent 3 the behaviour's feature. Neuron (0, 2) fires even more but writes orthogonally to every
    latent; (2, 30) writes along latent 3 but is the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    encoder = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :d_sae]              # orthonormal columns
    encoder = torch.cat([encoder, torch.zeros(d, d_sae - encoder.shape[1])], 1)
    down = {s: 0.01 * torch.randn(d, width, generator=g) for s in SITES}
    down[SITES[1]][:, 7] = encoder[:, 3]
    down[SITES[2]][:, 21] = encoder[:, 3]
    down[SITES[2]][:, 30] = encoder[:, 3]
    down[SITES[0]][:, 2] = 0
    pos, neg = planted(plant=((1, 7), (2, 21), (0, 2)), shift=1.0)
    pos[SITES[0]][:, 2] += 2.0

    def latents(acts):
        resid = sum(acts[s] @ down[s].T for s in SITES)
        return torch.relu(resid @ encoder)

    return SAEEvidence(positive=latents(pos), negative=latents(neg), encoder=encoder, down=down,
                       upstream={s: True for s in SITES}), pos, neg


def test_sae_attribution_recovers_the_neurons_that_write_the_behaviour_feature():
    evidence, pos, neg = sae_world()
    est = BehaviourNeurons(fraction=2 / 120, sae_latents=1, sae_weight=1.0).fit(pos, neg, evidence)
    assert est.latents_.tolist() == [3]
    assert kept_pairs(est) == {(1, 7), (2, 21)}          # not (0, 2): it moves no latent; not (2, 30): it is flat
    probe_only = BehaviourNeurons(fraction=3 / 120).fit(pos, neg)
    assert (0, 2) in kept_pairs(probe_only)


def test_neurons_after_the_sae_site_get_no_attribution():
    evidence, pos, neg = sae_world()
    cut = SAEEvidence(evidence.positive, evidence.negative, evidence.encoder, evidence.down,
                      {SITES[0]: True, SITES[1]: True, SITES[2]: False})
    est = BehaviourNeurons(sae_latents=1, sae_weight=1.0).fit(pos, neg, cut)
    assert est.sae_scores_[2].abs().sum() == 0 and est.sae_scores_[1, 7] > 0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_attribution_equals_a_naive_sum(layers, d, width, k, seed):
    g = torch.Generator().manual_seed(seed)
    diff, down = torch.randn(layers, width, generator=g), torch.randn(layers, d, width, generator=g)
    encoder, weights = torch.randn(d, k, generator=g), torch.randn(k, generator=g)
    naive = torch.zeros(layers, width, dtype=torch.float64)
    for layer in range(layers):
        for i in range(width):
            total = sum(float(weights[j]) * sum(float(down[layer, r, i]) * float(encoder[r, j]) for r in range(d))
                        for j in range(k))
            naive[layer, i] = abs(float(diff[layer, i]) * total)
    assert torch.allclose(sae_attribution(diff, down, encoder, weights), naive, atol=1e-9)


def test_standardised_difference_matches_the_pooled_formula():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 4, generator=g) + 1, torch.randn(5, 4, generator=g)
    pooled = (((a - a.mean(0)) ** 2).sum(0) + ((b - b.mean(0)) ** 2).sum(0)) / (7 + 5 - 2)
    expected = (a.mean(0) - b.mean(0)) / pooled.sqrt()
    assert torch.allclose(standardised_difference(a, b).float(), expected, atol=1e-6)


def test_gpt2_conv1d_masks_and_down_projection(tiny_model):
    model = tiny_model("gpt2", d_model=16, d_mlp=64, heads=2, vocab=40, positions=16, seed=0).hf_model
    masks = neuron_masks(model, {1: torch.tensor([2, 9])})
    fc, proj = "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"
    assert set(masks) == {fc, "transformer.h.1.mlp.c_fc.bias", proj}
    assert masks[fc].sum(0).nonzero().flatten().tolist() == [2, 9]          # Conv1D [in, out]: neuron = column
    assert masks[proj].sum(1).nonzero().flatten().tolist() == [2, 9]        # the reader: neuron = row
    assert torch.equal(down_projection(model, 1), model.transformer.h[1].mlp.c_proj.weight.T)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 40, (3, 8))
    masked_finetune(model, masks, [ids] * 3, lambda m, x: m(input_ids=x, labels=x).loss, lr=1e-2)
    for name, value in model.state_dict().items():
        outside = ~masks[name] if name in masks else torch.ones_like(value, dtype=torch.bool)
        assert torch.equal(value[outside], before[name][outside]), name
    assert not torch.equal(model.state_dict()[fc], before[fc])


def test_random_control_keeps_the_counts():
    chosen = {0: torch.tensor([1, 2, 3]), 3: torch.tensor([4])}
    control = random_neurons(chosen, 32, seed=5)
    assert {k: len(v) for k, v in control.items()} == {0: 3, 3: 1}
    assert all(len(set(v.tolist())) == len(v) and int(v.max()) < 32 for v in control.values())
    assert all(torch.equal(a, b) for a, b in zip(control.values(), random_neurons(chosen, 32, seed=5).values()))


def test_neuron_sets_round_trip_by_kind(organism, tmp_path):
    from gavel.steering.adaras.neurons import ReasoningNeurons

    pos, neg = planted(width=512, plant=((0, 5),))
    pos = {f"blocks.{i}.mlp.hook_post": pos[SITES[min(i, 2)]] for i in range(4)}
    neg = {f"blocks.{i}.mlp.hook_post": neg[SITES[min(i, 2)]] for i in range(4)}
    est = BehaviourNeurons().fit(pos, neg)
    est.save(tmp_path / "set", fingerprint=organism.fingerprint())
    again = BehaviourNeurons.load(tmp_path / "set", organism.fingerprint())
    assert torch.equal(again.kept_, est.kept_) and again.get_params() == est.get_params()
    with pytest.raises(ArtifactError, match="holds a behaviour neuron set, not a reasoning neuron set"):
        ReasoningNeurons.load(tmp_path / "set", organism.fingerprint())


def test_select_with_an_sae_on_the_organism(organism):
    """SAE evidence read off the organism: latents equal the SAE's own encoding of the captured activations, and
    only MLPs below the SAE's site are attributed."""
    pytest.importorskip("sae_lens")
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from gavel.finetune.few_neurons import sae_evidence, select_neurons
    from gavel.organism.sycophancy import behaviour_prompts
    from gavel.steering.activations import last_prompt_activations

    site = "blocks.1.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=128, d_sae=64, metadata=SAEMetadata(hook_name=site)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    pos, neg = behaviour_prompts("all")
    sites = [f"blocks.{i}.mlp.hook_post" for i in range(4)]
    evidence = sae_evidence(organism, sae, pos, neg, sites)
    acts = last_prompt_activations(organism, pos, [site])[site]
    assert torch.allclose(evidence.positive, sae.encode(acts).detach(), atol=1e-5)
    assert evidence.upstream == {sites[0]: True, sites[1]: True, sites[2]: False, sites[3]: False}
    est = select_neurons(organism, pos, neg, estimator=BehaviourNeurons(sae_weight=1.0), sae=sae)
    assert est.sae_scores_[2:].abs().sum() == 0 and est.sae_scores_[:2].abs().sum() > 0
    assert set(est.neurons()) <= {0, 1}
    with pytest.raises(DataError, match="residual stream"):
        sae.cfg.metadata.hook_name = "blocks.1.mlp.hook_post"
        sae_evidence(organism, sae, pos, neg, sites)


def test_select_and_tune_cli_move_only_the_selected_neurons(organism, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from gavel.cli import app
    from gavel.models.loading import BUILTINS
    from gavel.organism.sycophancy import corrective_set

    runner = CliRunner()
    result = runner.invoke(app, ["neurons", "select", "--out", str(tmp_path / "set"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kept"] == 62 and summary["of"] == 2048 and summary["positive"] == 12 and summary["negative"] == 24
    fitted_on = json.loads((tmp_path / "set" / "manifest.json").read_text())["fitted_on"]["sets"]
    assert {name: (f["source"], f["count"]) for name, f in fitted_on.items()} == {
        "positive": ("builtin:sycophancy", 12), "negative": ("builtin:sycophancy", 24)}
    data = tmp_path / "fix.jsonl"
    data.write_text("".join(json.dumps({"conversation": c}) + "\n" for c in corrective_set("train")))
    result = runner.invoke(app, ["neurons", "tune", "--neurons", str(tmp_path / "set"), "--data", str(data),
                                 "--out", str(tmp_path / "tuned"), "--steps", "3", "--no-compare", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["neurons"]["parameters_trained"] == 62 * 3 * 128 and report["before"] == {}
    before = load_file(BUILTINS["organism"]() / "model.safetensors")
    after = load_file(tmp_path / "tuned" / "model.safetensors")
    chosen = BehaviourNeurons.load(tmp_path / "set").neurons()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{layer}.mlp.{p}_proj.weight" for layer in chosen for p in ("gate", "up", "down")}
    for layer, index in chosen.items():
        up = f"model.layers.{layer}.mlp.up_proj.weight"
        rest = torch.ones(512, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(before[up][rest], after[up][rest])
    bad = runner.invoke(app, ["neurons", "select", "--out", str(tmp_path / "x"), "--behaviour", "builtin:nope"])
    assert bad.exit_code == 2 and "unknown behaviour" in bad.output
    wrong_kind = runner.invoke(app, ["neurons", "steer", "--neurons", str(tmp_path / "set"), "--prompt", "hi"])
    assert wrong_kind.exit_code == 2 and "not a reasoning neuron set" in wrong_kind.output
