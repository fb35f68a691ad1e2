"""Weight deltas: applied and removed bit for bit, refused on other weights or models, on the right projections."""
import pytest
import torch

from gavel.errors import ArtifactError, SiteError
from gavel.steering.delta import WeightDelta, output_projection


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """A random 2-layer Llama (bf16 weights too, to check exact restores in low precision) with a tokenizer."""
    return tiny_model("llama", seed=0)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_output_projections_are_the_sublayers_last_linear_maps(tiny):
    layer = tiny.hf_model.model.layers[1]
    assert output_projection(tiny.hf_model, "blocks.1.hook_attn_out") is layer.self_attn.o_proj
    assert output_projection(tiny.hf_model, "blocks.1.hook_mlp_out") is layer.mlp.down_proj
    with pytest.raises(SiteError, match="hook_attn_out and hook_mlp_out"):
        output_projection(tiny.hf_model, "blocks.1.hook_resid_post")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applying_then_removing_restores_every_weight_bit_for_bit(tiny, dtype, tmp_path):
    model = tiny.hf_model.to(dtype)
    before = snapshot(model)
    g = torch.Generator().manual_seed(1)
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    delta = WeightDelta.for_model(model, tiny.fingerprint(), {n: torch.randn(params[n].shape, generator=g) * 1e-2
                                                              for n in names})
    delta = WeightDelta.load(delta.save(tmp_path / "delta"), tiny.fingerprint())
    edit = delta.apply(model)
    changed = [k for k, v in snapshot(model).items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(names)
    expected = (before[names[0]].double() + delta.deltas[names[0]].double()).to(dtype)
    assert torch.equal(params[names[0]].detach(), expected)
    with pytest.raises(ArtifactError, match="not the weight this delta was made for"):
        delta.apply(model)                                  # applied twice: refused
    edit.remove()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    with pytest.raises(RuntimeError), delta.applied(model):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    model.float()


def test_a_delta_for_another_model_or_shape_is_refused(tiny, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    shape = dict(tiny.hf_model.named_parameters())[name].shape
    delta = WeightDelta.for_model(tiny.hf_model, tiny.fingerprint(), {name: torch.zeros(shape)})
    delta.save(tmp_path / "d")
    other = tiny.fingerprint().model_copy(update={"d_model": 64})
    with pytest.raises(ArtifactError, match="d_model"):
        WeightDelta.load(tmp_path / "d", other)
    bad = WeightDelta({name: torch.zeros(3, 3)}, tiny.fingerprint(), delta.base_sha256)
    with pytest.raises(ArtifactError, match=r"the delta is \(3, 3\)"):
        bad.apply(tiny.hf_model)
    with pytest.raises(ArtifactError, match="no parameter"):
        WeightDelta.for_model(tiny.hf_model, tiny.fingerprint(), {"model.nope.weight": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="not a weight delta"):
        WeightDelta.load(tmp_path)


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model):
    """A random 2-layer GPT-2 (Conv1D projections, weight [in, out]) with its projection biases zeroed: the edit
    leaves biases alone, so only bias-free projections make edit and runtime projection the same map."""
    handle = tiny_model("gpt2", seed=0)
    with torch.no_grad():
        for block in handle.hf_model.transformer.h:
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.bias.zero_()
    return handle


@pytest.mark.parametrize("which", ["tiny", "tiny_gpt2"])
def test_the_llmva_weight_edit_equals_its_runtime_projection_on_a_real_model(which, request):
    """Fit LLM-VA on a tiny Llama's sublayer outputs (planted labels), then: the model with the delta applied gives
    the logits the unedited model gives with the projection hooked at the selected sublayers; removing the delta
    gives the original logits bit for bit; gated hooks change only the active rows."""
    from gavel.steering.llmva.alignment import VectorAlignment
    from gavel.steering.llmva.edit import AlignmentIntervention, alignment_delta, final_site, sublayer_sites

    tiny = request.getfixturevalue(which)
    model, g = tiny.hf_model, torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (48, 6), generator=g)
    sites = [*sublayer_sites(2), final_site(2)]
    acts = {}
    with torch.no_grad(), tiny.hooks([(s, lambda a, s=s: acts.__setitem__(s, a[:, -1].clone())) for s in sites]):
        base = model(ids).logits
    benign = torch.arange(48) % 2 == 0
    answered = torch.arange(48) % 3 != 0
    alignment = VectorAlignment(l_select=2, C=0.01).fit(acts, benign, answered, final=final_site(2))
    assert len(alignment.selected_) == 2
    runtime = AlignmentIntervention.from_alignment(alignment)
    with torch.no_grad(), tiny.hooks(runtime.hooks()):
        projected = model(ids).logits
    assert not torch.allclose(projected, base, atol=1e-4)
    delta = alignment_delta(tiny, alignment)
    assert len(delta.deltas) == 2 and all(k.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight"))
                                          for k in delta.deltas)
    with torch.no_grad(), delta.applied(model):
        edited = model(ids).logits
    torch.testing.assert_close(edited, projected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
        active = torch.arange(48) < 10
        with tiny.hooks(runtime.hooks(active)):
            gated = model(ids).logits
    torch.testing.assert_close(gated[:10], projected[:10])
    assert torch.equal(gated[10:], base[10:])
