"""The attach context manager: every hook comes off, whatever happens inside."""
from __future__ import annotations

import pytest
import torch

from gavel.errors import SiteError
from gavel.models.hooks import attach, count_hooks
from gavel.models.sites import HookTarget

IDS = torch.tensor([[3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama").hf_model


def raw_hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_nested(llama):
    with attach(llama, [("blocks.0.hook_resid_post", lambda a: None),
                        ("blocks.1.attn.hook_z", lambda a: None)]):
        assert count_hooks(llama) == 2
        with attach(llama, [("hook_embed", lambda a: None)]):
            assert count_hooks(llama) == 3
        assert count_hooks(llama) == 2
    assert count_hooks(llama) == 0


def test_hooks_removed_after_exception_in_forward(llama):
    def boom(act):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attach(llama, [("blocks.1.hook_mlp_out", boom)]):
        llama(IDS)
    assert count_hooks(llama) == 0


def test_hooks_removed_after_bad_second_site(llama):
    with pytest.raises(SiteError, match=r"did you mean 'blocks.0.hook_resid_post'"):
        with attach(llama, [("blocks.0.hook_resid_pre", lambda a: None),
                            ("blocks.0.hook_resid_pots", lambda a: None)]):
            pytest.fail("body must not run")
    with pytest.raises(SiteError, match="has 2 layers"), attach(llama, [("blocks.0.hook_mlp_out", print),
                                                                         ("blocks.7.hook_mlp_out", print)]):
        pass
    assert count_hooks(llama) == 0


def test_wrong_shape_replacement_is_an_error(llama):
    with pytest.raises(SiteError, match="expected a tensor of shape"):
        with attach(llama, [("blocks.0.hook_resid_post", lambda a: a[..., :3])]):
            llama(IDS)
    assert count_hooks(llama) == 0


def test_same_site_hooks_chain_in_registration_order(llama):
    seen = []
    hooks = [("blocks.0.hook_resid_pre", lambda a: a * 0 + 1),
             ("blocks.0.hook_resid_pre", lambda a: seen.append(a.clone()) or a * 2),
             ("blocks.0.hook_resid_pre", lambda a: seen.append(a.clone()))]
    with attach(llama, hooks), torch.no_grad():
        llama(IDS)
    assert torch.equal(seen[0], torch.ones_like(seen[0]))
    assert torch.equal(seen[1], torch.full_like(seen[1], 2.0))


def test_hook_z_write_is_reshaped_back(llama):
    mask = torch.ones(4, 1)
    mask[1] = 0
    seen = {}

    def keep(name):
        return lambda a: seen.__setitem__(name, a)

    hooks = [("blocks.0.attn.hook_z", lambda a: a * mask), ("blocks.0.attn.hook_z", keep("z")),
             ("blocks.0.hook_attn_out", keep("out"))]
    with attach(llama, hooks), torch.no_grad():
        llama(IDS)
    assert seen["z"].shape == (1, 5, 4, 8) and not seen["z"][:, :, 1].any()
    o_proj = llama.model.layers[0].self_attn.o_proj
    torch.testing.assert_close(seen["out"], o_proj(seen["z"].flatten(-2)))


def test_count_hooks_ignores_transformers_capture_hooks(llama):
    with torch.no_grad():
        llama(IDS, output_hidden_states=True)
    assert raw_hook_count(llama) > 0  # installed once, permanently, by transformers
    assert count_hooks(llama) == 0


class KwLinear(torch.nn.Linear):
    """A sublayer taking its input by keyword and returning a tuple, like HF attention."""

    def forward(self, hidden_states):
        return super().forward(hidden_states), "extra"


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = KwLinear(4, 4)

    def forward(self, x):
        return self.inner(hidden_states=x)


def test_tuple_outputs_and_keyword_inputs_with_custom_resolver():
    toy = Toy()
    targets = {"in": HookTarget(toy.inner, "input"), "out": HookTarget(toy.inner, "output")}
    x = torch.randn(2, 3, 4)
    with attach(toy, [("in", lambda a: a + 1), ("out", lambda a: a * 0)],
                resolve=lambda model, site: targets[site]):
        out, extra = toy(x)
        assert count_hooks(toy) == 2
    assert extra == "extra" and not out.any()
    got, _ = toy(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, toy.inner.weight, toy.inner.bias))
    seen = []
    with attach(toy, [("in", seen.append)], resolve=lambda model, site: targets[site]):
        toy(x)
    assert torch.equal(seen[0], x) and count_hooks(toy) == 0
