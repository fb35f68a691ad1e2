"""Training SAEs with sae-lens's trainer: planted sparse directions recovered, held-out figures against naive
recomputations, determinism, sae-lens's format on disk, the `gavel sae train` command."""
import json
import random
import time

import pytest
import torch
from typer.testing import CliRunner

from gavel.cli import app
from gavel.errors import DataError
from gavel.models.chat import encode_text
from gavel.models.collect import collect_activations
from gavel.probes.data import CEDataset, CEInfo, LabelledExample
from gavel.probes.fit import content_rows
from gavel.probes.sae import check_sliceable, load_sae
from gavel.probes.sae_train import (
    REPORT_FILE,
    SAETrainConfig,
    SAETrainReport,
    evaluate_sae,
    fit_sae,
    save_trained,
    train_sae,
)

pytest.importorskip("sae_lens")
SITE = "blocks.1.hook_resid_post"
runner = CliRunner()


def _texts(n: int, seed: int = 0) -> list[str]:
    """Word sequences over w3..w99 (w0-w2 are the tiny tokenizer's special tokens)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, 100)}" for _ in range(rng.randrange(8, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    from helpers.models import tiny_model

    return tiny_model(layers=2, d_model=32, seed=3, std=0.2)


@pytest.fixture(scope="module")
def dataset(model):
    examples = []
    for text in _texts(120):
        enc = encode_text(model.tokenizer, text)
        examples.append(LabelledExample(enc, torch.zeros(len(enc.input_ids), 1, dtype=torch.bool)))
    return CEDataset((CEInfo("x"),), tuple(examples))


SMALL = SAETrainConfig(d_sae=64, tokens=256 * 150, batch_size=256, lr=3e-3, sparsity=1.0, holdout=0.2)


@pytest.fixture(scope="module")
def trained(model, dataset):
    return train_sae(model, dataset, SITE, SMALL)


def _planted(n_dirs: int, d: int, seed: int):
    """Unit directions [n_dirs, d] and an endless stream of batches of rows that are each a positive combination of
    2 of them plus an offset (so b_dec has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)
    offset = torch.randn(d, generator=g)

    def batches(size: int):
        while True:
            picks = torch.rand(size, n_dirs, generator=g).argsort(dim=1)[:, :2]
            coef = torch.zeros(size, n_dirs).scatter_(1, picks, 1 + 2 * torch.rand(size, 2, generator=g))
            yield coef @ directions + offset
    return directions, batches


def test_planted_sparse_directions_are_recovered_by_the_decoder():
    directions, batches = _planted(n_dirs=24, d=16, seed=1)
    config = SAETrainConfig(d_sae=48, tokens=256 * 600, batch_size=256, lr=4e-3, sparsity=1.0)
    sae, run = fit_sae(batches(256), 16, config)
    decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)          # [d_sae, d]
    best = (directions @ decoder.T).max(dim=1).values                            # per planted direction
    assert best.min() > 0.9, best
    assert run.steps == 600 and run.stopped == "tokens"
    assert run.history[-1].fvu < 0.2 * run.history[0].fvu                     # the L1 penalty shrinks a little
    assert run.history[-1].l0 < 6                                                # rows use 2 directions


def test_a_finite_stream_stops_training_early():
    _, batches = _planted(n_dirs=8, d=8, seed=2)
    stream = iter(list(zip(range(5), batches(64))))
    _, run = fit_sae((b for _, b in stream), 8, SAETrainConfig(d_sae=16, tokens=64 * 50, batch_size=64))
    assert run.steps == 5 and run.stopped == "data"


def test_the_deadline_stops_training_after_one_step_at_least():
    _, batches = _planted(n_dirs=8, d=8, seed=2)
    _, run = fit_sae(batches(64), 8, SAETrainConfig(d_sae=16, tokens=64 * 50, batch_size=64),
                     deadline=time.monotonic())
    assert run.steps == 1 and run.stopped == "budget"


def test_report_matches_naive_recomputation_on_held_out_examples(model, dataset, trained):
    sae, report = trained
    _, held_out = dataset.split([0.8, 0.2], seed=SMALL.seed)
    encoded = [e.encoded for e in held_out.examples]
    acts = collect_activations(model, encoded, [SITE])
    x = acts.sites[SITE][content_rows(model, acts)].double()     # the tokens CEs read
    latents = sae.encode(x.float()).detach()
    x_hat = sae.decode(latents).detach().double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    held = report.held_out
    assert held.examples == len(encoded) and held.tokens == len(x)
    assert held.fvu == pytest.approx(fvu, rel=1e-4)
    assert held.l0 == pytest.approx(float((latents > 0).sum(1).double().mean()), rel=1e-6)
    assert held.dead_fraction == pytest.approx(float((latents.amax(0) <= 0).double().mean()))
    special = torch.tensor(model.tokenizer.all_special_ids)
    nll, count = 0.0, 0
    for e in encoded:                                    # clean loss of predictions made at content tokens
        ids = e.input_ids
        at = ~torch.isin(ids[:-1], special)
        with torch.no_grad():
            logits = model.hf_model(input_ids=ids[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits[at], ids[1:][at], reduction="sum"))
        count += int(at.sum())
    assert held.loss_clean == pytest.approx(nll / count, rel=1e-4)
    assert held.loss_recovered == pytest.approx(
        (held.loss_zero - held.loss_spliced) / (held.loss_zero - held.loss_clean))


def test_held_out_fvu_falls_with_training(model, dataset, trained):
    _, report = trained
    _, early = train_sae(model, dataset, SITE, SMALL.model_copy(update={"tokens": 256 * 3}))
    assert report.held_out.fvu < 0.5 * early.held_out.fvu
    assert report.steps == 150 and early.steps == 3 and report.train_examples == 96


def test_training_is_deterministic_for_a_seed(model, dataset, trained):
    sae, report = trained
    again, report2 = train_sae(model, dataset, SITE, SMALL)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values()))
    assert report2.held_out == report.held_out
    other, _ = train_sae(model, dataset, SITE, SMALL.model_copy(update={"seed": 1, "tokens": 256 * 3}))
    assert not torch.equal(other.W_enc, sae.W_enc)


def test_saved_sae_loads_with_load_sae_and_is_sliceable(trained, tmp_path):
    sae, report = trained
    for half in (False, True):
        path = save_trained(sae, report, tmp_path / str(half), half=half)
        loaded = load_sae(path)
        check_sliceable(loaded, SITE)
        assert loaded.W_enc.dtype == torch.float32 and loaded.cfg.metadata.hook_name == SITE
        x = torch.randn(50, 32)
        tolerance = dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x).detach(), **tolerance)
        assert SAETrainReport.model_validate_json((path / REPORT_FILE).read_text()) == report
    assert (tmp_path / "True" / "sae_weights.safetensors").stat().st_size < \
        0.6 * (tmp_path / "False" / "sae_weights.safetensors").stat().st_size


def test_jumprelu_trains_and_stays_sliceable(model, dataset):
    config = SMALL.model_copy(update={"architecture": "jumprelu", "tokens": 256 * 20})
    sae, report = train_sae(model, dataset, SITE, config)
    check_sliceable(sae, SITE)
    assert sae.cfg.architecture() == "jumprelu" and report.held_out.fvu < 1


def test_bad_inputs_are_data_errors(model, dataset):
    with pytest.raises(DataError, match="one per head"):
        train_sae(model, dataset, "blocks.1.attn.hook_z", SMALL)
    with pytest.raises(DataError, match="cannot be split"):
        train_sae(model, CEDataset(dataset.ces, dataset.examples[:1]), SITE, SMALL)
    with pytest.raises(DataError, match="no held-out examples"):
        evaluate_sae(model, None, [], SITE)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from helpers.models import tiny_model

    root = tmp_path_factory.mktemp("sae_cli")
    folder = tiny_model(layers=2, d_model=32, seed=3, std=0.2, save_to=root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "spans": [{"ce": "x", "start": 0, "end": 2}]}) + "\n"
                            for t in _texts(40)))
    return root, str(folder), str(data)


def test_cli_trains_writes_sae_and_report_as_json(cli_inputs):
    root, folder, data = cli_inputs
    out = root / "sae"
    result = runner.invoke(app, ["sae", "train", "--model", folder, "--data", data, "--site", SITE, "--d-sae", "32",
                                 "--tokens", "2048", "--batch-size", "128", "--lr", "0.003", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    report = SAETrainReport.model_validate(printed["report"])
    assert printed["sae"] == str(out) and report.steps == 16 and report.config.d_sae == 32
    assert SAETrainReport.model_validate_json((out / REPORT_FILE).read_text()) == report
    check_sliceable(load_sae(out), SITE)
    table = runner.invoke(app, ["sae", "train", "--model", folder, "--data", data, "--site", SITE, "--d-sae", "32",
                                "--tokens", "256", "--batch-size", "128", "--out", str(out), "--force"])
    assert table.exit_code == 0 and "loss recovered" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--d-sae", "0"], "--d-sae"),
    (["--holdout", "1.5"], "--holdout"),
    (["--architecture", "topk"], "--architecture"),
    (["--site", "blocks.9.hook_resid_post"], "layer"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_cli_bad_input_exits_2(cli_inputs, args, message):
    root, folder, data = cli_inputs
    base = {"--model": folder, "--data": data, "--site": SITE, "--d-sae": "16", "--tokens": "256",
            "--batch-size": "128", "--out": str(root / "bad")}
    base.update(dict(zip(args[::2], args[1::2])))
    result = runner.invoke(app, ["sae", "train", *[part for pair in base.items() for part in pair]])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (root / "bad").exists()


def test_cli_refuses_a_non_empty_out_without_force(cli_inputs):
    root, folder, data = cli_inputs
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["sae", "train", "--model", folder, "--data", data, "--site", SITE, "--d-sae", "16",
                                 "--out", str(root / "taken")])
    assert result.exit_code == 2 and "--force" in result.output
