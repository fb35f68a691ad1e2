"""SAE-feature CEs: heads agree with sae-lens's own encode, selection recovers planted latents, errors are clear.

The SAEs are trained here (a plain torch loop) and wrapped as real sae-lens SAEs, saved and reloaded.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from gavel.errors import ArtifactError, DataError, NotFittedError
from gavel.probes.heads import Head, head_class
from gavel.probes.metrics import auroc, sequence_maxima
from gavel.probes.sae import (
    SAEHead,
    SAELatentSelector,
    build_head,
    encode_all,
    latent_aurocs,
    load_sae,
    load_sae_release,
)

pytest.importorskip("sae_lens")  # the optional `lens` extra

SITE = "blocks.1.hook_resid_post"
D, M, F = 24, 64, 32  # input width, SAE latents, planted features


def planted_features(n: int, seed: int = 2):
    """Activations made of F sparse features along fixed random directions, plus an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(F, D, generator=torch.Generator().manual_seed(1)), dim=1)
    active = torch.rand(n, F, generator=g) < 0.06
    X = (active * (1 + torch.rand(n, F, generator=g))) @ directions + 0.02 * torch.randn(n, D, generator=g) + 0.5
    return X, active, directions


def train_relu_sae(X: torch.Tensor, d_sae: int, steps: int, l1: float, lr: float = 1e-2, seed: int = 0):
    """A ReLU SAE (sae-lens parameter names) trained with MSE + decoder-norm-weighted L1."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, X.shape[1], generator=g), dim=1)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": X.mean(0)}
    for p in params.values():
        p.requires_grad_()
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        x = X[torch.randint(len(X), (512,), generator=g)]
        a = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        loss = ((a @ params["W_dec"] + params["b_dec"] - x) ** 2).sum(-1).mean() \
            + l1 * (a * params["W_dec"].norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def as_sae_lens(weights, architecture: str = "standard", hook_name: str | None = SITE, **cfg):
    """The weights wrapped as a sae-lens inference SAE of `architecture`."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
                    "topk": (TopKSAE, TopKSAEConfig)}[architecture]
    d_in, d_sae = weights["W_enc"].shape
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name), **cfg))
    sae.load_state_dict(weights)
    return sae


@pytest.fixture(scope="module")
def data():
    X, active, directions = planted_features(4000)
    return X, active, directions, train_relu_sae(X, M, steps=400, l1=0.2)


@pytest.fixture(scope="module")
def saes(data, tmp_path_factory):
    """Trained SAEs saved with sae-lens and loaded back through load_sae."""
    weights = data[3]
    made = {"standard": as_sae_lens(weights),
            "jumprelu": as_sae_lens({**weights, "threshold": torch.full((M,), 0.5)}, "jumprelu"),
            "no_input_bias": as_sae_lens(weights, apply_b_dec_to_input=False)}
    loaded = {}
    for name, sae in made.items():
        directory = tmp_path_factory.mktemp(name)
        sae.save_model(directory)
        loaded[name] = load_sae(directory)
    return loaded


@pytest.mark.parametrize("name", ["standard", "jumprelu", "no_input_bias"])
def test_head_scores_equal_sae_lens_encode(saes, data, name):
    X, active = data[0], data[1]
    sae = saes[name]
    selector = SAELatentSelector(combine="nonneg").fit(encode_all(sae, X), active[:, :3])
    head = build_head(sae, selector, SITE)
    assert isinstance(head, Head) and head.n_ces == 3 and head.encoder.shape == (D, len(selector.union_))
    x = X[:60].reshape(3, 20, D)
    expected = sae.encode(x)[..., selector.union_] @ selector.combination_
    torch.testing.assert_close(head.score({SITE: x}), expected, atol=1e-5, rtol=1e-5)
    assert (expected > 0).any()


def test_jumprelu_thresholds_matter(saes, data):
    x = data[0][:500]
    relu, jump = saes["standard"].encode(x), saes["jumprelu"].encode(x)
    assert ((relu > 0) & (jump == 0)).any() and torch.equal(jump[jump > 0], relu[jump > 0])


def test_hook_z_heads_flatten_heads_like_sae_lens(data):
    X, active, _, weights = data
    sae = as_sae_lens(weights, hook_name="blocks.0.attn.hook_z", reshape_activations="hook_z")
    z = X[:200].reshape(200, 4, D // 4)                      # [tokens, n_heads, d_head]
    selector = SAELatentSelector(top_k=2).fit(encode_all(sae, z), active[:200, :2])
    head = build_head(sae, selector, "blocks.0.attn.hook_z")
    torch.testing.assert_close(head.score({"blocks.0.attn.hook_z": z}), selector.decision_function(sae.encode(z)))


def test_selector_recovers_latents_that_define_the_labels(saes, data):
    acts = encode_all(saes["standard"], data[0])
    rate = (acts > 0).float().mean(0)
    known = torch.nonzero((rate > 0.03) & (rate < 0.3)).flatten()[:3].tolist()
    Y = acts[:, known] > 0
    for method in ("auroc", "mean_diff"):
        selector = SAELatentSelector(method=method).fit(acts, Y, ["a", "b", "c"])
        assert selector.latents_ == [[i] for i in known]
        assert torch.equal(selector.combination_, torch.eye(3))             # union_ is sorted, as `known`
    assert selector.ce_names_ == ["a", "b", "c"]
    assert SAELatentSelector().fit(acts, Y).scores_ == [[1.0]] * 3


def test_selector_finds_planted_features(saes, data):
    X, active, directions, _ = data
    sae = saes["standard"]
    selector = SAELatentSelector().fit(encode_all(sae, X), active[:, :4])
    for j, ([latent], [score]) in enumerate(zip(selector.latents_, selector.scores_)):
        assert score > 0.95
        assert torch.cosine_similarity(sae.W_dec[latent], directions[j], dim=0) > 0.8


def test_nonneg_combines_the_latents_of_an_either_or_concept(saes, data):
    X, active = data[0], data[1]
    acts = encode_all(saes["standard"], X)
    Y = active[:, 0] | active[:, 1]
    single = SAELatentSelector().fit(acts[:3000], Y[:3000])
    combined = SAELatentSelector(combine="nonneg", max_latents=8).fit(acts[:3000], Y[:3000])
    weights = combined.combination_[:, 0]
    assert 2 <= len(combined.latents_[0]) <= 8 and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert combined.score(acts[3000:], Y[3000:]) > 0.97 > single.score(acts[3000:], Y[3000:])


def test_top_k_sums_the_best_latents():
    acts = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    selector = SAELatentSelector(top_k=2).fit(acts, torch.tensor([True, True, False, False]))
    assert sorted(selector.latents_[0]) == [0, 1] and selector.combination_.flatten().tolist() == [1.0, 1.0]
    assert selector.decision_function(acts)[:, 0].tolist() == [1.0, 2.0, 0.0, 0.0]


def test_latent_aurocs_match_the_reference_with_ties_and_chunks():
    g = torch.Generator().manual_seed(3)
    X = torch.relu(torch.randn(300, 7, generator=g)).round(decimals=1)   # sparse, many ties
    Y = torch.rand(300, 2, generator=g) < 0.3
    fast = latent_aurocs(X, Y, max_elements=700)                          # 2 columns per chunk
    reference = torch.tensor([[auroc(X[:, i], Y[:, j]) for i in range(7)] for j in range(2)])
    torch.testing.assert_close(fast, reference.float())


def test_head_tensors_round_trip(saes, data, tmp_path):
    X, active = data[0], data[1]
    head = build_head(saes["jumprelu"], SAELatentSelector(top_k=2).fit(encode_all(saes["jumprelu"], X), active[:, :2]),
                      SITE)
    save_file(head.tensors(), tmp_path / "head.safetensors")
    again = head_class(head.kind).from_tensors((SITE,), load_file(tmp_path / "head.safetensors")).to("cpu")
    assert isinstance(again, SAEHead)
    torch.testing.assert_close(again.score({SITE: X[:50]}), head.score({SITE: X[:50]}))
    with pytest.raises(ArtifactError, match="threshold"):
        SAEHead.from_tensors((SITE,), {k: v for k, v in head.tensors().items() if k != "threshold"})
    with pytest.raises(ArtifactError, match="non-negative"):
        SAEHead.from_tensors((SITE,), {**head.tensors(), "combination": -head.combination})
    with pytest.raises(ArtifactError, match="expects width"):
        head.score({SITE: X[:5, :10]})


def test_refuses_what_a_slice_cannot_compute(saes, data):
    X, active, _, weights = data
    selector = SAELatentSelector().fit(encode_all(saes["standard"], X[:500]), active[:500, :1])
    with pytest.raises(ArtifactError, match=r"trained on 'blocks.1.hook_resid_post', not on site 'blocks.2"):
        build_head(saes["standard"], selector, "blocks.2.hook_resid_post")
    with pytest.raises(ArtifactError, match="does not say which hook"):
        build_head(as_sae_lens(weights, hook_name=None), selector, SITE)
    with pytest.raises(ArtifactError, match="topk SAE cannot define SAE CEs: a latent is kept only if it ranks"):
        build_head(as_sae_lens(weights, "topk", k=4), selector, SITE)
    with pytest.raises(ArtifactError, match="normalises its inputs"):
        build_head(as_sae_lens(weights, normalize_activations="layer_norm"), selector, SITE)
    with pytest.raises(ArtifactError, match="fitted on 64 latents, the SAE has 32"):
        build_head(as_sae_lens({k: v[..., :32] if k in ("W_enc", "b_enc") else v[:32] if k == "W_dec" else v
                                for k, v in weights.items()}), selector, SITE)
    with pytest.raises(NotFittedError, match="SAELatentSelector"):
        build_head(saes["standard"], SAELatentSelector(), SITE)


def test_selector_rejects_bad_data():
    acts = torch.relu(torch.randn(50, 8))
    with pytest.raises(DataError, match="only negative"):
        SAELatentSelector().fit(acts, torch.zeros(50, dtype=torch.bool))
    with pytest.raises(DataError, match="NaN"):
        SAELatentSelector().fit(acts.masked_fill(acts > 1, float("nan")), acts[:, 0] > 0)
    with pytest.raises(DataError, match="50 activation rows but 49 label rows"):
        SAELatentSelector().fit(acts, acts[:49, 0] > 0)
    with pytest.raises(DataError, match="method"):
        SAELatentSelector(method="l1").fit(acts, acts[:, 0] > 0)
    with pytest.raises(DataError, match="top_k must be a positive integer up to d_sae=8, not 9"):
        SAELatentSelector(top_k=9).fit(acts, acts[:, 0] > 0)
    with pytest.raises(DataError, match="max_latents must be a positive integer, not 0"):
        SAELatentSelector(combine="nonneg", max_latents=0).fit(acts, acts[:, 0] > 0)


def test_loading_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # never reach the hub from tests
    with pytest.raises(ArtifactError, match="not a saved sae-lens SAE"):
        load_sae(tmp_path)
    with pytest.raises(ArtifactError, match="no-such-release"):
        load_sae_release("no-such-release", "blocks.0.hook_resid_pre")
    with pytest.raises(ArtifactError, match="gpt2-small-res-jb") as offline:
        load_sae_release("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    assert "load_sae(dir)" in str(offline.value)


def test_sae_ce_on_organism_activations(organism):
    """An SAE trained on the organism's layer-2 residual stream yields an arithmetic CE that holds out."""
    from gavel.models.collect import collect_activations
    from gavel.organism import corpus
    from gavel.organism.labels import encode_example

    site = "blocks.2.hook_resid_post"
    data = [encode_example(organism.tokenizer, ex) for ex in corpus.generate_corpus(120, seed=5)]
    acts = collect_activations(organism, [e for e, _ in data], [site])
    content = ~torch.isin(acts.token, torch.tensor(organism.tokenizer.all_special_ids))
    X, example = acts.sites[site][content], acts.example[content]
    y = torch.cat([labels for _, labels in data])[content, corpus.CONCEPTS.index("arithmetic")]
    test = example % 5 == 0                                   # held-out conversations
    sae = as_sae_lens(train_relu_sae(X[~test], 256, steps=300, l1=1.0), hook_name=site)
    selector = SAELatentSelector(method="mean_diff", combine="nonneg", max_latents=16)
    head = build_head(sae, selector.fit(encode_all(sae, X[~test]), y[~test]), site)
    scores = head.score({site: X[test]})[:, 0]
    assert auroc(*sequence_maxima(scores, y[test], example[test])) > 0.95   # conversations (latched CEs)
    assert auroc(scores, y[test]) > 0.9                                    # tokens


def test_pooled_sae_ces_select_latents_pooled_over_trailing_tokens(organism):
    """With a pooling width, fit_bank ranks the latents averaged over each token's trailing window (an SAE head's score
    is linear in its latents, so the monitor pools the head's scores) and the monitor scores as offline."""
    from gavel.models.collect import collect_activations
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import content_rows, fit_bank, split_examples
    from gavel.probes.pooling import pool_rows
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    site, width = "blocks.2.hook_resid_post", 4
    data = organism_dataset(organism.tokenizer, 200, seed=6).select(["arithmetic", "benchmark"])
    acts = collect_activations(organism, [e.encoded for e in data.examples], [site])
    sae = as_sae_lens(train_relu_sae(acts.sites[site], 256, steps=300, l1=1.0), hook_name=site)
    params = {"method": "mean_diff", "combine": "nonneg", "max_latents": 6}
    bank = fit_bank(organism, data, [site], extractor="sae", sae=sae, params=params, pools=(width,))
    assert bank.pools == [width] and all(c.metrics["auroc"] > 0.85 for c in bank.manifest.ces)

    # the reference: the same selector on the train split's latents, pooled by hand
    train = split_examples(len(data.examples), (0.6, 0.2, 0.2), 0) == 0
    keep = content_rows(organism, acts) & train[acts.example]
    latents = pool_rows(encode_all(sae, acts.sites[site]), acts.example, width)[keep]
    labels = torch.cat([e.labels for e in data.examples])[keep]
    reference = SAELatentSelector(**params).fit(latents, labels, data.names)
    head = bank.heads[0]
    assert bank.columns[0] == [0, 1]
    torch.testing.assert_close(head.combination, reference.combination_, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.encoder, sae.W_enc[:, reference.union_].detach())

    rule = RuleSpec(name="sums", groups={"math": ["arithmetic"]}, condition="math")
    conversation = [{"role": "user", "content": "what is 12 plus 34 ?"}, {"role": "assistant", "content": "46 ."}]
    result = Monitor(organism, bank, [rule], score="all").scan([conversation])[0]
    offline = collect_activations(organism, [_encoded(result.token_ids)], [site])
    torch.testing.assert_close(result.scores, bank.score_rows(offline.sites, offline.example), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sae_ces_through_fit_bank_the_cli_and_the_monitor(organism, tmp_path):
    """SAE CEs fitted like any other: a bank with an SAE head, saved, loaded, and scored by the monitor."""
    import json

    from typer.testing import CliRunner

    from gavel.cli import app
    from gavel.models.collect import collect_activations
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.bank import CEBank
    from gavel.probes.fit import fit_bank
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    site = "blocks.2.hook_resid_post"
    data = organism_dataset(organism.tokenizer, 300, seed=6).select(["arithmetic", "benchmark"])
    acts = collect_activations(organism, [e.encoded for e in data.examples], [site])
    sae = as_sae_lens(train_relu_sae(acts.sites[site], 256, steps=300, l1=1.0), hook_name=site)
    sae_dir = tmp_path / "sae"
    sae.save_model(str(sae_dir))
    params = {"method": "mean_diff", "combine": "nonneg", "max_latents": 16}
    bank = fit_bank(organism, data, [site], extractor="sae", sae=load_sae(sae_dir), params=params)
    assert [h.kind for h in bank.heads] == ["sae"] and all(c.metrics["auroc"] > 0.85 for c in bank.manifest.ces)
    loaded = CEBank.load(bank.save(tmp_path / "bank"), fingerprint=organism.fingerprint())
    torch.testing.assert_close(loaded.score({site: acts.sites[site]}), bank.score({site: acts.sites[site]}))

    rule = RuleSpec(name="sums", groups={"math": ["arithmetic"]}, condition="math")
    monitor = Monitor(organism, loaded, [rule])
    results = monitor.generate(
        [[{"role": "user", "content": "what is 12 plus 34 ?"}],
         [{"role": "user", "content": "how do i fix my bike ?"}]],
        max_new_tokens=8)
    assert results[0].fired == ["sums"] and results[1].fired == []
    # the monitor computes only the latents of the CE the rule reads, and those scores equal the whole head's
    a = loaded.index("arithmetic")
    (head, _columns, _, _, _, _), = monitor.plan
    used = int((loaded.heads[0].combination[:, loaded.columns[0].index(a)] > 0).sum())
    assert head.n_ces == 1 and head.encoder.shape[1] == used < loaded.heads[0].encoder.shape[1]
    for r in results:
        offline = loaded.score(collect_activations(organism, [_encoded(r.token_ids)], [site]).sites)
        torch.testing.assert_close(r.scores[:, a], offline[:, a], atol=1e-5, rtol=1e-4)
        assert not r.scores[:, loaded.index("benchmark")].any()     # a CE no rule reads is not computed

    result = CliRunner().invoke(app, ["ce", "fit", "--data", "builtin:organism:300", "--site", site, "--extractor",
                                      "sae", "--sae", str(sae_dir), "--out", str(tmp_path / "cli_bank"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ces"]["arithmetic"]["auroc"] > 0.8


def _encoded(token_ids):
    from gavel.models.chat import Encoded

    n = len(token_ids)
    return Encoded("", token_ids, torch.zeros(n, dtype=torch.uint8), torch.zeros(n, 2), ())
