"""DeconIEP: the bound on delta, prompt-only perturbation in generate() (with and without a KV cache), training only
G against a reference, the artifact and its fingerprint checks, RC/BUD, and the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers.decon import random_fitted
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gavel.decon.generator import PerturbationGenerator, bounded_delta
from gavel.decon.metrics import accuracy, benign_utility_drop, residual_contamination
from gavel.decon.train import DeconIEP, decon_loss, sample_replies
from gavel.errors import ArtifactError, ModelLoadError, NotFittedError
from gavel.models.generation import prompt_batch
from gavel.organism.behaviour import final_answer
from gavel.organism.decon import decon_splits, evaluate_decon

PROMPTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15 w16", "w20 w21 w22"]


# the two models: 2-layer Llamas (d=32) sharing the word tokenizer, with large weights (N(0, 0.3)): confident,
# well-separated logits (no greedy near-ties)
TINY = dict(positions=128, std=0.3, pad_token_id=1, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def con(tiny_model):
    return tiny_model(seed=0, name="con", **TINY)


@pytest.fixture(scope="module")
def ref(tiny_model):
    return tiny_model(seed=1, name="ref", **TINY)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the bound
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 1e3, 1e8, 1e30, float("inf")]),
       weight_scale=st.sampled_from([0.0, 1.0, 1e3, 1e20]), zeta=st.floats(0.0, 10.0), t=st.integers(1, 6),
       nan=st.booleans())
def test_delta_is_bounded_by_zeta_for_any_input_and_weights(seed, scale, weight_scale, zeta, t, nan):
    gen = torch.Generator().manual_seed(seed)
    g = PerturbationGenerator(8, width=8, n_layers=2, n_heads=2, dropout=0.0)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
    embeds = torch.randn(2, t, 8, generator=gen) * scale
    if nan:
        embeds[0, 0, 0] = float("nan")
    mask = torch.rand(2, t, generator=gen) > 0.3
    delta = bounded_delta(g, embeds, mask, zeta)
    assert torch.isfinite(delta).all()
    assert delta.abs().max() <= torch.tensor(zeta, dtype=torch.float32)
    assert (delta[~mask] == 0).all()


def test_an_untrained_generator_perturbs_nothing():
    g = PerturbationGenerator(8, width=8, n_layers=1, n_heads=2)
    assert torch.equal(bounded_delta(g, torch.randn(2, 5, 8), None, 1.0), torch.zeros(2, 5, 8))


def test_left_padding_neither_gets_nor_changes_a_delta(con):
    est = random_fitted(con)
    b = prompt_batch(con, [[{"role": "user", "content": p}] for p in PROMPTS])
    embeds = con.hf_model.get_input_embeddings()(b.input_ids)
    delta = est.delta(embeds, b.attention_mask)
    assert (delta[b.attention_mask == 0] == 0).all() and (delta[b.attention_mask == 1] != 0).any()
    for i in range(len(PROMPTS)):
        real = b.attention_mask[i].bool()
        alone = est.delta(embeds[i:i + 1, real], None)
        torch.testing.assert_close(delta[i, real], alone[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- applying it during generate
def capture(handle):
    """A hook after the perturbation's (hooks run in order): every embedding call's ids and output."""
    calls = []
    h = handle.hf_model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: calls.append((args[0].clone(), out.detach().clone())))
    return calls, h


@pytest.mark.parametrize("use_cache", [True, False])
def test_only_prompt_positions_are_perturbed_and_by_exactly_delta(con, use_cache):
    est = random_fitted(con)
    b = prompt_batch(con, [[{"role": "user", "content": p}] for p in PROMPTS])
    width = b.input_ids.shape[1]
    weight = con.hf_model.get_input_embeddings().weight
    expected = est.delta(weight[b.input_ids], b.attention_mask)
    with est.perturbing(con) as state:
        calls, h = capture(con)
        try:
            out = con.hf_model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=5,
                                        do_sample=False, use_cache=use_cache, pad_token_id=1)
        finally:
            h.remove()
    assert len(calls) == 5 and state.calls == (1 if use_cache else 5)
    for i, (ids, emb) in enumerate(calls):
        start = 0 if (i == 0 or not use_cache) else width + i - 1
        assert torch.equal(ids, out[:, start:start + ids.shape[1]])
        plain = weight[ids]
        if start == 0:
            torch.testing.assert_close(emb[:, :width] - plain[:, :width], expected, rtol=0, atol=1e-6)
            assert (emb[:, :width][b.attention_mask == 0] == plain[:, :width][b.attention_mask == 0]).all()
            assert torch.equal(emb[:, width:], plain[:, width:])   # generated positions: untouched
        else:
            assert torch.equal(emb, plain)
    assert len(con.hf_model.get_input_embeddings()._forward_hooks) == 0
    assert len(con.hf_model._forward_pre_hooks) == 0


def test_cached_and_uncached_greedy_generation_agree_under_perturbation(con):
    est = random_fitted(con, zeta=0.5)
    b = prompt_batch(con, [[{"role": "user", "content": p}] for p in PROMPTS])
    outs = {}
    for use_cache in (True, False, None):
        if use_cache is None:
            outs[None] = con.hf_model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                               max_new_tokens=8, do_sample=False, pad_token_id=1)
            continue
        with est.perturbing(con):
            outs[use_cache] = con.hf_model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                    max_new_tokens=8, do_sample=False, use_cache=use_cache,
                                                    pad_token_id=1)
    assert torch.equal(outs[True], outs[False])
    assert not torch.equal(outs[True], outs[None])   # zeta 0.5 on these weights changes some tokens


def test_rows_pick_which_sequences_are_perturbed(con):
    est = random_fitted(con, zeta=0.5)
    b = prompt_batch(con, [[{"role": "user", "content": p}] for p in PROMPTS])
    kwargs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=8, do_sample=False,
                  pad_token_id=1)
    plain = con.hf_model.generate(**kwargs)
    with est.perturbing(con):
        full = con.hf_model.generate(**kwargs)
    with est.perturbing(con, rows=[1, 3]):
        some = con.hf_model.generate(**kwargs)
    for i in range(len(PROMPTS)):
        assert torch.equal(some[i], (full if i in (1, 3) else plain)[i])
    with est.perturbing(con, rows=torch.tensor([False, True, False, True])) as state:
        assert torch.equal(con.hf_model.generate(**kwargs), some)
        state.rows = None   # reassigned between generate() calls
        assert torch.equal(con.hf_model.generate(**kwargs), full)


def test_a_zero_initialised_generator_leaves_generation_bit_identical(con, ref):
    est = DeconIEP(width=16, n_layers=2, n_heads=2, steps=0).fit(con, ref, PROMPTS)
    b = prompt_batch(con, [[{"role": "user", "content": p}] for p in PROMPTS])
    kwargs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=6, do_sample=False,
                  pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    plain = con.hf_model.generate(**kwargs)
    with est.perturbing(con, zeta=1.0):
        perturbed = con.hf_model.generate(**kwargs)
    assert torch.equal(plain.sequences, perturbed.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, perturbed.scores))


def test_hooks_are_removed_after_an_error(con):
    est = random_fitted(con)
    with pytest.raises(IndexError), est.perturbing(con):
        con.hf_model(input_ids=torch.tensor([[5, 6, 1000]]))
    assert len(con.hf_model.get_input_embeddings()._forward_hooks) == 0
    assert len(con.hf_model._forward_pre_hooks) == 0


# ---------------------------------------------------------------- training
def naive_loss(con, ref, est, batch, zeta):
    """KL + CE one row at a time, without padding, from plain forwards."""
    total_kl, total_ce, n = 0.0, 0.0, 0
    width = batch.prompt_width
    for i in range(batch.input_ids.shape[0]):
        prompt = batch.input_ids[i, :width][batch.attention_mask[i, :width].bool()]
        reply = batch.input_ids[i, width:][batch.reply_mask[i]]
        ids = torch.cat([prompt, reply])[None]
        emb = con.hf_model.get_input_embeddings()(ids)
        p = len(prompt)
        delta = zeta * torch.tanh(est.generator_(emb[:, :p]))
        emb = torch.cat([emb[:, :p] + delta, emb[:, p:]], dim=1)
        lc = F.log_softmax(con.hf_model(inputs_embeds=emb).logits[0, p - 1:-1], -1)
        lr = F.log_softmax(ref.hf_model(input_ids=ids).logits[0, p - 1:-1], -1)
        total_kl += (lc.exp() * (lc - lr)).sum().item()
        total_ce += -lc[torch.arange(len(reply)), reply].sum().item()
        n += len(reply)
    return total_kl / n, total_ce / n


def test_the_loss_matches_a_naive_recomputation(con, ref):
    est = random_fitted(con, zeta=0.3)
    torch.manual_seed(5)
    batch = sample_replies(ref, [[{"role": "user", "content": p}] for p in PROMPTS], 6, 1.0)
    assert batch.reply_mask.any(dim=1).all()
    with torch.no_grad():
        loss, parts = decon_loss(con, ref, est.generator_, batch, 0.3, lambda_kl=0.7, lambda_ce=1.3)
        kl, ce = naive_loss(con, ref, est, batch, 0.3)
    assert parts["kl"] == pytest.approx(kl, rel=1e-4) and parts["ce"] == pytest.approx(ce, rel=1e-4)
    assert float(loss) == pytest.approx(0.7 * kl + 1.3 * ce, rel=1e-4)


def test_fit_lowers_the_loss_and_leaves_both_models_bit_identical(con, ref):
    before_con, before_ref = snapshot(con.hf_model), snapshot(ref.hf_model)
    steps = []
    est = DeconIEP(zeta=1.0, width=16, n_layers=2, n_heads=2, dropout=0.0, lr=3e-3, steps=25, batch_size=4,
                   temperature=0.0, max_new_tokens=6, lambda_kl=1.0, lambda_ce=0.5)
    assert est.fit(con, ref, PROMPTS, on_step=lambda step, loss: steps.append(step)) is est
    assert steps == list(range(25)) and len(est.losses_) == 25
    assert est.losses_[-1] < 0.8 * est.losses_[0]
    assert all(torch.equal(v, before_con[k]) for k, v in con.hf_model.state_dict().items())
    assert all(torch.equal(v, before_ref[k]) for k, v in ref.hf_model.state_dict().items())
    assert all(p.requires_grad for p in con.hf_model.parameters())   # flags restored after fit
    # the first step's loss (G still zero) equals the naive KL + CE on the greedy replies
    batch = sample_replies(ref, [[{"role": "user", "content": p}] for p in PROMPTS], 6, 0.0)
    zero = DeconIEP(width=16, n_layers=2, n_heads=2, steps=0).fit(con, ref, PROMPTS)
    kl, ce = naive_loss(con, ref, zero, batch, 1.0)
    assert est.losses_[0] == pytest.approx(kl + 0.5 * ce, rel=1e-4)


def test_fit_refuses_models_with_another_vocabulary(con, tiny_model):
    other = tiny_model(seed=2, name="other", **TINY)
    other.tokenizer.add_tokens(["brand_new_word"])
    with pytest.raises(ModelLoadError, match="do not share a tokenizer"):
        DeconIEP(steps=1).fit(con, other, PROMPTS)


def test_unfitted_use_names_the_class(con):
    with pytest.raises(NotFittedError, match="DeconIEP"):
        DeconIEP().perturbing(con).__enter__()


# ---------------------------------------------------------------- artifact
def test_save_load_roundtrip_refusal_and_force(con, ref, tmp_path):
    est = DeconIEP(zeta=0.2, width=16, n_layers=2, n_heads=2, lr=1e-2, steps=3, batch_size=2, max_new_tokens=4)
    est.fit(con, ref, PROMPTS, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, data="tiny prompts")
    est.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kind"] == "input_perturbation" and manifest["learned"]["provenance_"]["steps"] == 3
    assert manifest["fingerprint"]["name"] == "con" and manifest["learned"]["reference_fingerprint_"]["name"] == "ref"
    assert manifest["params"]["zeta"] == 0.2 and manifest["learned"]["provenance_"]["data"] == "tiny prompts"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000002"]
    loaded = DeconIEP.load(tmp_path / "p", fingerprint=con.fingerprint())
    assert loaded.get_params() == est.get_params() and loaded.reference_fingerprint_ == ref.fingerprint()
    assert loaded.provenance_ == est.provenance_ and loaded.losses_ == est.losses_
    embeds = torch.randn(2, 5, con.d_model)
    assert torch.equal(loaded.delta(embeds), est.delta(embeds))
    assert torch.equal(loaded.delta(embeds, zeta=0.1), est.delta(embeds) / 2)   # zeta rescales, no refit
    with pytest.raises(ArtifactError, match="weights_sha256"):
        DeconIEP.load(tmp_path / "p", fingerprint=ref.fingerprint())
    assert DeconIEP.load(tmp_path / "p", fingerprint=ref.fingerprint(), force=True).zeta == 0.2
    (tmp_path / "p" / "manifest.json").write_text(json.dumps({**manifest, "typo": 1}))
    with pytest.raises(ArtifactError, match="typo"):
        DeconIEP.load(tmp_path / "p")


# ---------------------------------------------------------------- metrics
def test_rc_and_bud_against_hand_computation(con, monkeypatch, tiny_model):
    from gavel.organism import decon as organism_decon

    splits = decon_splits()
    assert len(splits.leaked_eval) == len(splits.heldout_eval) == 25 and len(splits.arithmetic_eval) == 50
    train_items = {c[0]["content"] for c in splits.train}
    assert not train_items & {p.conversation[0]["content"] for p in splits.leaked_eval + splits.clean_eval}
    assert residual_contamination(0.2, 0.9) == pytest.approx(0.7)
    assert benign_utility_drop(0.5, 0.4) == pytest.approx(0.1)
    table = {  # (model, perturbed zeta) -> accuracy on (leaked, held-out, arithmetic)
        ("clean", None): (0.08, 0.0, 0.0), ("con", None): (1.0, 0.12, 0.9),
        ("con", 0.1): (0.2, 0.08, 0.86), ("con", 0.0): (1.0, 0.12, 0.9)}
    which = {id(splits.leaked_eval): 0, id(splits.heldout_eval): 1, id(splits.arithmetic_eval): 2}

    def fake(handle, problems, answer_of, perturbation=None, *, zeta=None, **kwargs):
        return table[(handle.name, None if perturbation is None else zeta)][which[id(problems)]]

    monkeypatch.setattr(organism_decon, "accuracy", fake)
    clean = tiny_model(seed=1, name="clean", **TINY)
    est = DeconIEP(zeta=0.1)
    report = evaluate_decon(con, clean, est, [0.0, 0.1], splits=splits)
    assert report.rc_before == pytest.approx(0.92) and report.clean_acc_leaked == 0.08
    assert report.acc_clean_data == pytest.approx((0.12 * 25 + 0.9 * 50) / 75)
    at = {p.zeta: p for p in report.points}
    assert at[0.1].rc == pytest.approx(0.12) and at[0.0].rc == pytest.approx(0.92) and at[0.0].bud == 0
    assert at[0.1].bud == pytest.approx((0.12 * 25 + 0.9 * 50) / 75 - (0.08 * 25 + 0.86 * 50) / 75)


def test_accuracy_reads_final_answers(organism):
    splits = decon_splits()
    assert accuracy(organism, splits.leaked_eval[:8], final_answer, max_new_tokens=12) == 1.0


# ---------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, con, ref):
    dirs = {}
    for name, handle in (("con", con), ("ref", ref)):
        path = tmp_path_factory.mktemp(name)
        handle.hf_model.save_pretrained(path)
        handle.tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def test_cli_train_then_eval_with_a_zeta_sweep(model_dirs, tmp_path):
    from gavel.cli import app

    runner = CliRunner()
    out = tmp_path / "decon"
    trained = runner.invoke(app, ["decon", "train", "--model", model_dirs["con"], "--reference", model_dirs["ref"],
                                  "--out", str(out), "--steps", "3", "--zeta", "0.01", "--lr", "1e-3", "--width",
                                  "16", "--layers", "1", "--heads", "2", "--batch-size", "4", "--max-new-tokens",
                                  "4", "--checkpoint-every", "2", "--json"])
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout)
    assert report["steps"] == 3 and report["prompts"] == 85 and (out / "checkpoints" / "step-000002").is_dir()
    evaluated = runner.invoke(app, ["decon", "eval", "--model", model_dirs["con"], "--clean", model_dirs["ref"],
                                    "--perturbation", str(out), "--zeta-sweep", "0,0.01", "--max-new-tokens", "3",
                                    "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)
    assert [p["zeta"] for p in result["points"]] == [0.0, 0.01] and result["points"][0]["bud"] == 0.0
    assert result["overlap"]["fit_data"] == "recorded"       # builtin:decon-train shares nothing with the splits
    assert {name: o["overlapping"] for name, o in result["overlap"]["sets"].items()} == {
        "leaked_eval": 0, "heldout_eval": 0, "arithmetic_eval": 0}
    # a G whose record says it was trained on three leaked evaluation items is refused, unless --allow-overlap
    from gavel.artifacts import FittedOn
    from gavel.organism.decon import decon_splits

    manifest = json.loads((out / "manifest.json").read_text())
    leaked = [p.conversation for p in decon_splits().leaked_eval[:3]]
    manifest["fitted_on"] = FittedOn.of({"data": ("leaked.jsonl", leaked)}).model_dump()
    (out / "manifest.json").write_text(json.dumps(manifest))
    reused = runner.invoke(app, ["decon", "eval", "--model", model_dirs["con"], "--clean", model_dirs["ref"],
                                 "--perturbation", str(out), "--max-new-tokens", "2", "--json"])
    assert reused.exit_code == 2 and "3 of 25 evaluation prompts in leaked_eval were used to fit" in reused.output
    allowed = runner.invoke(app, ["decon", "eval", "--model", model_dirs["con"], "--clean", model_dirs["ref"],
                                  "--perturbation", str(out), "--max-new-tokens", "2", "--allow-overlap"])
    assert allowed.exit_code == 0 and "warning: 3 of 25 evaluation prompts in leaked_eval" in allowed.output
    assert "RC before" in allowed.output


def test_cli_bad_input_exits_2(model_dirs, tmp_path):
    from gavel.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["decon", "eval", "--model", model_dirs["con"], "--clean", model_dirs["ref"],
                                  "--perturbation", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a DeconIEP perturbation" in missing.output
    bad_sweep = runner.invoke(app, ["decon", "eval", "--model", model_dirs["con"], "--clean", model_dirs["ref"],
                                    "--perturbation", str(tmp_path), "--zeta-sweep", "0,big"])
    assert bad_sweep.exit_code == 2 and "zeta-sweep" in bad_sweep.output
    bad_zeta = runner.invoke(app, ["decon", "train", "--model", model_dirs["con"], "--reference", model_dirs["ref"],
                                   "--out", str(tmp_path / "x"), "--zeta", "-1", "--steps", "1"])
    assert bad_zeta.exit_code == 2 and "zeta" in bad_zeta.output
