"""`gavel ce fit | eval` with GAVEL calibration sets, thresholds' source in the bank, progress lines on stderr."""
import json

import pytest
from helpers.gavel_library import gavel_library
from typer.testing import CliRunner

from gavel.cli import app
from gavel.probes.bank import CEBank
from gavel.probes.fit import MAX_ROWS

runner = CliRunner()
SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def library(organism, tmp_path_factory):
    return gavel_library(tmp_path_factory.mktemp("library"), organism.tokenizer, calibration=True)


def _fit(*args):
    return runner.invoke(app, ["ce", "fit", "--site", SITE, "--json", *args])


def test_fit_calibrates_on_gavel_calibration_sets_and_says_so(library, tmp_path):
    result = _fit("--data", str(library), "--out", str(tmp_path / "bank"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["thresholds_from"] == "calibration data: 60 examples"       # 3 CEs x 20 conversations
    provenance = CEBank.load(tmp_path / "bank").manifest.provenance
    assert provenance["thresholds_from"] == report["thresholds_from"]
    assert provenance["calibration_data"] == f"{library} (calibration.json)"
    assert all(m["auroc"] > 0.9 for m in report["ces"].values())
    # progress goes to stderr as plain lines (not a terminal), never into the JSON
    assert "collecting activations: " in result.stderr and "(100%)" in result.stderr

    evaluated = runner.invoke(app, ["ce", "eval", "--bank", str(tmp_path / "bank"), "--data", str(library),
                                    "--which", "calibration", "--json", "--allow-overlap"])
    assert evaluated.exit_code == 0, evaluated.output
    rows, overlap = json.loads(evaluated.stdout)["ces"], json.loads(evaluated.stdout)["overlap"]
    assert overlap["sets"]["--data"] == {"overlapping": 60, "total": 60, "fit_sets": ["data (calibration)"]}
    assert set(rows) == {"arithmetic", "harmful_compliance", "refusal"}
    assert all(r["positive_sequences"] == 20 for r in rows.values())      # each CE's own 20 conversations


def test_split_is_kept_without_calibration_files_or_on_request(library, tmp_path):
    result = _fit("--data", str(library), "--thresholds-from", "split", "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thresholds_from"].startswith("calibration split: ")
    result = _fit("--data", "builtin:organism:300", "--out", str(tmp_path / "b"), "--max-rows", "3000")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thresholds_from"] == "calibration split: 60 of 300 examples"
    assert CEBank.load(tmp_path / "b").manifest.provenance["max_rows"] == "3000"


def test_calibration_requests_without_calibration_sets_are_exit_2(library, tmp_path):
    forced = _fit("--data", "builtin:organism:50", "--thresholds-from", "calibration", "--out", str(tmp_path / "x"))
    assert forced.exit_code == 2 and "calibration.json" in forced.output
    typo = _fit("--data", str(library), "--thresholds-from", "calibraton", "--out", str(tmp_path / "x"))
    assert typo.exit_code == 2 and "did you mean 'calibration'" in typo.output
    which = runner.invoke(app, ["ce", "eval", "--bank", str(tmp_path), "--data", "builtin:organism:50",
                                "--which", "calibration"])
    assert which.exit_code == 2


def test_the_cli_default_cap_is_the_library_default():
    import inspect

    from gavel.cli.ce import ce_fit

    assert inspect.signature(ce_fit).parameters["max_rows"].default == MAX_ROWS


def test_unknown_keys_of_gavel_files_are_warned_about_once_and_the_fit_goes_on(library, tmp_path):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    ce_yaml = next(copy.rglob("refusal/ce.yaml"))
    ce_yaml.write_text(ce_yaml.read_text() + "reviewed_by: alice\n")
    result = _fit("--data", str(copy), "--out", str(tmp_path / "bank"))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "warning: unknown field 'reviewed_by'" in line]
    assert len(warned) == 1 and warned[0].startswith(f"{ce_yaml}:")    # located, and once for both sample sets
    assert json.loads(result.stdout)["thresholds_from"] == "calibration data: 60 examples"


def test_pooling_candidates_from_the_command_line(library, tmp_path):
    result = _fit("--data", str(library), "--pool", "1", "--pool", "4", "--out", str(tmp_path / "bank"))
    assert result.exit_code == 0, result.output
    bank = CEBank.load(tmp_path / "bank")
    assert bank.manifest.provenance["pools"] == "1,4" and set(bank.pools) <= {1, 4}
    listed = runner.invoke(app, ["ce", "list", "--bank", str(tmp_path / "bank"), "--json"])
    assert {row["pool"] for row in json.loads(listed.stdout)} == set(bank.pools)
    bad = _fit("--data", str(library), "--pool", "0", "--out", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "positive integer" in bad.output


def test_eval_refuses_the_conversations_the_bank_was_fitted_on(organism, tmp_path):
    """Fit on the organism's first 300 conversations (seed 0): a prefix of them is refused (exit 2, counts and the
    held-out option named); another seed's corpus shares a few conversations, which --allow-overlap counts (as many
    as the two corpora share, counted here by their text) and --drop-overlap leaves out; a part of it that shares
    none is held out. A bank saved without a record of its data is evaluated, with "fit data unknown"."""
    from gavel.organism import corpus

    out = tmp_path / "bank"
    assert _fit("--data", "builtin:organism:300", "--out", str(out), "--max-rows", "3000").exit_code == 0

    def evaluate(data, *args):
        return runner.invoke(app, ["ce", "eval", "--bank", str(out), "--data", data, *args])

    refused = evaluate("builtin:organism:60", "--json")
    assert refused.exit_code == 2
    assert ("60 of 60 evaluation conversations in --data were used to fit the CE bank" in refused.output
            and "(its --data)" in refused.output and "builtin:organism:N:SEED" in refused.output)

    def text(example):
        return tuple((m.role, m.content) for m in example.messages)
    fitted = {text(e) for e in corpus.generate_corpus(300, 0)}
    shared = sum(text(e) in fitted for e in corpus.generate_corpus(80, 1))
    assert shared > 0
    allowed = evaluate("builtin:organism:80:1", "--allow-overlap", "--json")
    assert allowed.exit_code == 0, allowed.output
    overlap = json.loads(allowed.stdout)["overlap"]
    assert overlap["sets"]["--data"] == {"overlapping": shared, "total": 80, "fit_sets": ["data"]}
    dropped = evaluate("builtin:organism:80:1", "--drop-overlap", "--json")
    assert dropped.exit_code == 0, dropped.output
    overlap = json.loads(dropped.stdout)["overlap"]
    assert overlap["dropped"] == shared and overlap["sets"]["--data"]["overlapping"] == 0
    assert overlap["sets"]["--data"]["total"] == 80 - shared
    held_out = next(n for n in range(80, 0, -1)
                    if not any(text(e) in fitted for e in corpus.generate_corpus(n, 1)))
    clean = evaluate(f"builtin:organism:{held_out}:1", "--json")
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout)["overlap"]["sets"]["--data"] == {"overlapping": 0, "total": held_out,
                                                                    "fit_sets": []}
    warned = evaluate("builtin:organism:60", "--allow-overlap")
    assert warned.exit_code == 0 and "warning: 60 of 60 evaluation conversations" in warned.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["fitted_on"]                         # as saved before banks recorded their conversations
    (out / "manifest.json").write_text(json.dumps(manifest))
    unknown = evaluate("builtin:organism:60")
    assert unknown.exit_code == 0 and "fit data unknown" in unknown.stdout
