"""The TransformerLens bridge backend: booted offline, same canonical sites, same values."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from gavel.errors import ModelLoadError, SiteError
from gavel.models.hooks import attach, count_hooks
from gavel.models.lens import boot_bridge, resolve_bridge_site
from gavel.models.sites import SITE_KINDS, site_name

pytest.importorskip("transformer_lens")

IDS = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
ARCHS = ["llama", "gpt2"]   # tiny_model's defaults: 2 layers, d=32, d_mlp=64, 4 heads, 100 words, 64 positions
SPECIAL = dict(bos_token_id=0, eos_token_id=1)
GLOBAL = ("hook_embed", "ln_final.hook_normalized")
SITES = [*GLOBAL, *(site_name(k, L) for L in (0, 1) for k in SITE_KINDS if k not in GLOBAL)]


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tmp_path_factory, tiny_model):
    # every parameter redrawn: norms with weight 1 and bias 0 would hide pre- vs post-affine mixups
    return tiny_model(request.param, std=0.3, redraw="all", save_to=tmp_path_factory.mktemp(request.param),
                      **SPECIAL)


def load_hf(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def capture(model, resolve, **kwargs):
    acts = {}
    hooks = [(s, lambda a, s=s: acts.__setitem__(s, a)) for s in SITES]
    with attach(model, hooks, resolve=resolve), torch.no_grad():
        out = model(IDS, **kwargs)
    return acts, out


def test_bridge_sites_match_hf_sites(model_dir):
    from gavel.models.sites import resolve_site

    hf_acts, hf_out = capture(load_hf(model_dir), resolve_site, output_hidden_states=True)
    bridge = boot_bridge(model_dir)
    acts, logits = capture(bridge, resolve_bridge_site)
    assert count_hooks(bridge) == 0
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hf_out.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=0)
    differ = [s for s in SITES if not torch.allclose(acts[s], hf_acts[s], atol=1e-5, rtol=0)]
    assert differ == []
    assert acts["blocks.1.attn.hook_z"].shape == (2, 5, 4, 8)


def test_bridge_over_loaded_model_reuses_weights(model_dir):
    hf = load_hf(model_dir)
    with torch.no_grad():
        reference = hf(IDS, output_hidden_states=True)
    weight = hf.get_input_embeddings().weight
    bridge = boot_bridge(hf, tf.AutoTokenizer.from_pretrained(model_dir))
    assert bridge.original_model is hf and bridge.embed.original_component.weight is weight
    acts = {}
    with attach(bridge, [("blocks.0.hook_resid_post", lambda a: acts.setdefault("post", a)),
                         ("blocks.1.hook_resid_pre", lambda a: a.clone())],
                resolve=resolve_bridge_site), torch.no_grad():
        logits = bridge(IDS)
    torch.testing.assert_close(acts["post"], reference.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=0)


def test_bridge_site_errors(model_dir):
    bridge = boot_bridge(model_dir)
    with pytest.raises(SiteError, match="2 layers"):
        resolve_bridge_site(bridge, "blocks.2.hook_resid_post")
    with pytest.raises(SiteError, match="did you mean"):
        resolve_bridge_site(bridge, "blocks.0.hook_resid_pots")


def test_boot_errors(tmp_path, tiny_model):
    with pytest.raises(ModelLoadError, match="not a local directory"):
        boot_bridge(tmp_path / "missing")
    handle = tiny_model("llama", **SPECIAL)
    with pytest.raises(ModelLoadError, match="from_pretrained"):
        boot_bridge(handle.hf_model, handle.tokenizer)
