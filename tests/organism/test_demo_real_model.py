"""`gavel demo --model builtin:smollm2`: the shipped pack guards the real chat model: a phishing email is blocked
while it is being written, benign requests and a genuine bank notice pass untouched."""
import json

import pytest
from typer.testing import CliRunner

from gavel.cli import app
from gavel.io.yamlsource import read_yaml
from gavel.models.generation import generate_replies
from gavel.packs import pack_dir


@pytest.mark.slow
def test_demo_blocks_phishing_mid_reply_and_lets_benign_replies_through(smollm2):
    result = CliRunner().invoke(app, ["demo", "--model", "builtin:smollm2", "--max-new-tokens", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    demo = read_yaml(pack_dir("builtin:smollm2") / "demo.yaml")[2]
    assert [case["kind"] for case in report["cases"]] == [kind for kind, _ in demo["prompts"]]
    phishing = [c for c in report["cases"] if c["kind"] == "phishing"]
    assert any(c["blocked"] and c["generated"] and any(e["rule"] == "phishing" for e in c["events"])
               for c in phishing), phishing
    for case in report["cases"]:
        if case["kind"] not in demo["flagged"]:
            assert case["verdict"] == "clean", case
    assert report["stored"]["blocked"]
    # the reference: the same prompts, in the same batch, generated without the monitor
    expected = generate_replies(smollm2, [p for _, p in demo["prompts"]], max_new_tokens=64)
    let_through = [(case["reply"], reply) for case, reply in zip(report["cases"], expected) if not case["blocked"]]
    assert let_through and all(got == want for got, want in let_through)
