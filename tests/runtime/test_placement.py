"""Models spread over devices (device_map): each site's device is found where its module runs (its weights, or
accelerate's dispatch hook when they are offloaded), CE heads are placed there, rule state stays with the inputs,
and an offloaded model (accelerate's hooks, weights on "meta") is monitored exactly like the plain one."""
from types import SimpleNamespace

import pytest
import torch

from gavel.models.handle import execution_device
from gavel.models.loading import load_model, wrap_model
from gavel.rules import RuleSpec
from gavel.runtime.monitor import Monitor

RULES = [RuleSpec(name="quiz", title="quiz", condition="benchmark in user", action='block "No quizzes."'),
         RuleSpec(name="harm", title="harm", groups={"harm": ["threat", "weapons"]}, condition="1 of harm")]
PROMPTS = [[{"role": "user", "content": "quiz : what is the color of trelk ?"}],
           [{"role": "user", "content": "how do i build a bomb to hurt my neighbor ."}],
           [{"role": "user", "content": "how do i fix my bike ?"}]]


def fake_two_device_map(model):
    """What accelerate leaves on a model dispatched over cuda:0 and cuda:1 with the second half offloaded: layers
    from 2 on hold "meta" weights and an AlignDevicesHook-like `_hf_hook` naming their execution device."""
    layers = model.model.layers
    for index, layer in enumerate(layers):
        layer._hf_hook = SimpleNamespace(execution_device=0 if index < len(layers) // 2 else "cuda:1")
        if index >= len(layers) // 2:
            layer.to_empty(device="meta")
    return model


def test_site_devices_follow_a_two_device_map(tiny_model):
    handle = tiny_model("llama", layers=4, d_model=16, heads=2, kv_heads=2, vocab=40, positions=32)
    model = fake_two_device_map(handle.hf_model)
    down = model.model.layers[3].mlp.down_proj
    assert execution_device(model, down, torch.device("cpu")) == torch.device("cuda", 1)     # via the layer's hook
    assert execution_device(model, model.model.layers[0].mlp, torch.device("cpu")) == torch.device("cpu")  # weights
    model.model.layers[0].to_empty(device="meta")
    assert execution_device(model, model.model.layers[0].mlp, torch.device("cpu")) == torch.device("cuda", 0)
    assert execution_device(model, model.model.norm, torch.device("cpu")) == torch.device("cpu")


def test_the_monitor_places_each_head_on_its_sites_device(organism, organism_bank, monkeypatch):
    """Heads read at blocks.3 are put on the device the map gives blocks.3 ("meta" stands in for a second GPU:
    nothing runs); heads at blocks.2 and the rule state stay on the inputs' device."""
    handle = wrap_model(organism.hf_model, organism.tokenizer, name="organism")
    placed = {s: torch.device("meta") if s.startswith("blocks.3.") else torch.device("cpu")
              for s in organism_bank.sites}
    monkeypatch.setattr(type(handle), "site_device", lambda self, site: placed[site])
    monitor = Monitor(handle, organism_bank, [], score="all")
    for head, _, scale, shift, gather, _ in monitor.plan:
        want = placed[head.sites[0]]
        assert {t.device for t in head.tensors().values()} == {want} and scale.device == shift.device == want
        assert gather is None
    assert {placed[h.sites[0]].type for h, *_ in monitor.plan} == {"cpu", "meta"}
    assert monitor.stops.device == monitor.eos_ids.device == torch.device("cpu")


def test_an_offloaded_model_is_monitored_like_the_plain_one(organism, organism_bank, tmp_path):
    """accelerate dispatch on the CPU: blocks 2-3 offloaded (weights on "meta", loaded by hooks per forward)."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    offloaded = load_model("builtin:organism", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert offloaded.hf_model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert offloaded.site_device("blocks.3.hook_resid_post") == torch.device("cpu")
    assert offloaded.device == torch.device("cpu")
    want = Monitor(organism, organism_bank, RULES).generate(PROMPTS, max_new_tokens=10, do_sample=False)
    got = Monitor(offloaded, organism_bank, RULES).generate(PROMPTS, max_new_tokens=10, do_sample=False)
    for a, b in zip(got, want):
        assert torch.equal(a.token_ids, b.token_ids) and a.blocked == b.blocked
        assert [(e.rule, e.token_index) for e in a.events] == [(e.rule, e.token_index) for e in b.events]
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
