"""Site names, and their resolution on tiny random models of every supported family."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from hypothesis import given
from hypothesis import strategies as st

from gavel.errors import ModelLoadError, SiteError
from gavel.models.hooks import attach
from gavel.models.sites import (
    FAMILIES,
    SITE_KINDS,
    HookTarget,
    Site,
    d_model,
    family_of,
    n_layers,
    parse_site,
    resolve_site,
    site_name,
)

D, V, T = 32, 100, 5
# every family, as tiny_model builds it (2 layers, d_model D, d_mlp 64, 4 heads (2 KV heads where the family has
# them), vocabulary V, 64 positions), plus these config fields
CONFIGS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {},
    "gpt2": dict(bos_token_id=0, eos_token_id=1),
    "gpt_neox": dict(use_parallel_residual=False),
    "phi3": {}, "bert": {},
}


@pytest.fixture(scope="module")
def tokenizer():
    from gavel.organism import corpus
    from gavel.organism.tokenizer import build_tokenizer

    return build_tokenizer(corpus.vocabulary())


@pytest.fixture(scope="module", params=list(CONFIGS))
def family_model(request, tmp_path_factory, tokenizer, tiny_model):
    """(family, model): built from its config, saved with a tokenizer and loaded through gavel.load_model."""
    from gavel.models.loading import load_model

    family = request.param
    path = tiny_model(family, d_model=D, vocab=V, tokenizer=tokenizer, save_to=tmp_path_factory.mktemp(family),
                      **CONFIGS[family])
    handle = load_model(path)
    assert handle.family == family
    return family, handle.hf_model


def run(model, ids, hooks=()):
    """Output of a hooked forward pass (hidden states included)."""
    with attach(model, list(hooks)), torch.no_grad():
        return model(ids, output_hidden_states=True)


def final(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def record(store, name):
    def fn(act):
        store[name] = act
    return fn


def capture(model, ids, sites):
    acts = {}
    out = run(model, ids, [(s, record(acts, s)) for s in sites])
    return acts, out


IDS = torch.arange(2 * T).reshape(2, T) + 3


# ---- names ---------------------------------------------------------------------------------

def test_parse_site_examples():
    assert parse_site("blocks.3.hook_resid_post") == Site("blocks.3.hook_resid_post", "hook_resid_post", 3)
    assert parse_site("blocks.0.attn.hook_z").kind == "attn.hook_z"
    assert parse_site("hook_embed") == Site("hook_embed", "hook_embed", None)
    assert parse_site("ln_final.hook_normalized").layer is None


def test_parse_site_suggests_a_fix():
    with pytest.raises(SiteError) as e:
        parse_site("blocks.0.hook_resid_pots")
    assert "did you mean 'blocks.0.hook_resid_post'" in str(e.value)
    assert "blocks.0.hook_resid_post" in e.value.hint


@pytest.mark.parametrize("bad", ["hook_resid_post", "blocks.1.hook_embed", "blocks.x.hook_resid_pre",
                                 "", "blocks.2.mlp.hook_pre", "hook_embd"])
def test_parse_site_rejects(bad):
    with pytest.raises(SiteError):
        parse_site(bad)


def test_site_name_rejects():
    with pytest.raises(SiteError, match="has no layer"):
        site_name("hook_embed", 2)
    with pytest.raises(SiteError, match="needs a layer"):
        site_name("hook_resid_pre")
    with pytest.raises(SiteError, match="did you mean 'hook_mlp_out'"):
        site_name("hook_mlp_outt", 1)


@given(st.sampled_from(SITE_KINDS), st.integers(0, 10_000))
def test_site_name_round_trip(kind, layer):
    layer = None if kind in ("hook_embed", "ln_final.hook_normalized") else layer
    name = site_name(kind, layer)
    assert parse_site(name) == Site(name, kind, layer)


@given(st.text(max_size=40))
def test_parse_site_only_raises_site_error(text):
    try:
        site = parse_site(text)
    except SiteError:
        return
    assert site_name(site.kind, site.layer) == site.name


def test_family_of_unknown():
    with pytest.raises(ModelLoadError, match="supported families: llama"):
        family_of(tf.OPTConfig())
    assert set(CONFIGS) == set(FAMILIES)


# ---- resolution on every family --------------------------------------------------------------

def test_shapes_and_hidden_states(family_model):
    _family, model = family_model
    assert n_layers(model) == 2 and d_model(model) == D
    sites = ["blocks.0.hook_resid_post", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out",
             "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "hook_embed"]
    acts, out = capture(model, IDS, sites)
    for s in sites[:3] + sites[-1:]:
        assert acts[s].shape == (2, T, D), s
    assert acts["blocks.0.mlp.hook_post"].shape == (2, T, 64)
    assert acts["blocks.0.attn.hook_z"].shape == (2, T, 4, 8)
    assert torch.equal(acts["blocks.0.hook_resid_post"], out.hidden_states[1])


@pytest.mark.parametrize("layer", [0, 1])
def test_residual_identities(family_model, layer):
    family, model = family_model
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]
    acts, out = capture(model, IDS, [site_name(k, layer) for k in kinds])
    pre, attn, mid, mlp, post = (acts[site_name(k, layer)] for k in kinds)
    if family == "bert":  # post-norm: each sublayer's sum is renormalised
        block = model.encoder.layer[layer]
        norm1, norm2 = block.attention.output.LayerNorm, block.output.LayerNorm
        torch.testing.assert_close(mid, norm1(pre + attn))
        torch.testing.assert_close(post, norm2(mid + mlp))
        with pytest.raises(SiteError, match="no final norm"):
            resolve_site(model, "ln_final.hook_normalized")
    else:
        torch.testing.assert_close(mid, pre + attn)
        torch.testing.assert_close(post, mid + mlp)
    assert torch.equal(pre, out.hidden_states[layer])
    if layer == 0:  # the last entry of hidden_states is taken after the final norm
        assert torch.equal(post, out.hidden_states[1])


def test_identity_hooks_leave_outputs_bit_identical(family_model):
    family, model = family_model
    reference = final(run(model, IDS))
    every = [site_name(k, L) for k in SITE_KINDS for L in (0, 1)
             if k not in ("hook_embed", "ln_final.hook_normalized")] + ["hook_embed"]
    if family != "bert":
        every.append("ln_final.hook_normalized")
    assert torch.equal(final(run(model, IDS, [(s, lambda a: a) for s in every])), reference)
    assert torch.equal(final(run(model, IDS, [(s, lambda a: a.clone()) for s in every])), reference)


def test_added_vector_reaches_next_layer(family_model):
    _family, model = family_model
    v = torch.randn(D)
    acts = {}
    hooks = [("blocks.0.hook_resid_post", record(acts, "post0")),
             ("blocks.0.hook_resid_post", lambda a: a + v),
             ("blocks.1.hook_resid_pre", record(acts, "pre1"))]
    out = run(model, IDS, hooks)
    assert torch.equal(acts["pre1"], acts["post0"] + v)
    assert not torch.equal(final(out), final(run(model, IDS)))


def test_layer_out_of_range(family_model):
    _, model = family_model
    with pytest.raises(SiteError, match="the model has 2 layers"):
        resolve_site(model, "blocks.2.hook_resid_post")


def test_resolve_accepts_base_model_and_site_objects(family_model):
    _, model = family_model
    target = resolve_site(model.base_model, parse_site("blocks.1.hook_mlp_out"))
    assert isinstance(target, HookTarget) and target.io == "output"
    assert resolve_site(model, "blocks.1.attn.hook_z").heads == (4, 8)


def test_neox_parallel_residual_has_no_resid_mid(tiny_model):
    model = tiny_model("gpt_neox", d_model=D, vocab=V, use_parallel_residual=True).hf_model
    with pytest.raises(SiteError, match="parallel residual"):
        resolve_site(model, "blocks.0.hook_resid_mid")
    assert resolve_site(model, "blocks.0.hook_mlp_out").module is model.gpt_neox.layers[0].mlp
