"""`gavel demo --model builtin:smollm2`: the demo flow on the real chat model, from the command line."""
import json

import pytest
from typer.testing import CliRunner

from gavel.cli import app
from gavel.models.generation import generate_replies
from gavel.organism.demo import DEMO_PROMPTS, demo_sites


@pytest.mark.slow
def test_demo_runs_on_smollm2_and_lets_its_own_replies_through(smollm2):
    result = CliRunner().invoke(app, ["demo", "--model", "builtin:smollm2", "--examples", "300",
                                      "--max-new-tokens", "16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "builtin:smollm2" and len(report["cases"]) == len(DEMO_PROMPTS)
    assert set(report["probe_sites"].values()) <= set(demo_sites(smollm2.n_layers))
    assert all(0 <= auroc <= 1 for auroc in report["probe_auroc"].values())
    # the reference: the same prompts, in the same batch, generated without the monitor
    expected = generate_replies(smollm2, [p for _, p in DEMO_PROMPTS], max_new_tokens=16)
    let_through = [(case["reply"], reply) for case, reply in zip(report["cases"], expected) if not case["blocked"]]
    assert let_through and all(got == want for got, want in let_through)
