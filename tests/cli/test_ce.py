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
                                    "--which", "calibration", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads(evaluated.stdout)
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
