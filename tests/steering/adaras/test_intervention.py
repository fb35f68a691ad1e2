"""AdaRAS on the organism: paired traces, the neuron intervention, the CLI and the steer_neurons rule action."""
import json

import pytest
import torch
from typer.testing import CliRunner

from gavel.cli import app
from gavel.errors import DataError
from gavel.organism.datasets import problems as organism_problems
from gavel.steering.adaras.intervention import NeuronIntervention
from gavel.steering.adaras.neurons import ReasoningNeurons
from gavel.steering.adaras.traces import contrastive_means, mlp_sites

runner = CliRunner()


def checker(reply, expected):
    from gavel.organism.behaviour import final_answer

    return final_answer(reply) == expected


@pytest.fixture(scope="module")
def neurons(organism):
    correct, incorrect, counts = contrastive_means(organism, organism_problems("arithmetic_2digit", slice(0, 12)),
                                                   checker, mlp_sites(organism.n_layers), samples=6)
    assert counts["problems"] == 12 and counts["traces"] == 72 and 0 < counts["pairs"] <= counts["correct"]
    assert all(t.shape == (counts["pairs"], 512) for t in (*correct.values(), *incorrect.values()))
    return ReasoningNeurons(k=20).fit(correct, incorrect)


def test_the_intervention_adds_alpha_times_s_prime_to_every_tokens_neurons(organism, neurons):
    from gavel.models.generation import prompt_batch

    intervention = NeuronIntervention.from_neurons(neurons, 0.5)
    assert set(intervention.sites) == {s for s, n in zip(neurons.sites_, neurons.kept_.sum(1)) if n}
    batch = prompt_batch(organism, [[{"role": "user", "content": "what is 12 plus 34 ?"}]])
    site = intervention.sites[0]
    seen = {}
    with torch.no_grad():
        with organism.hooks([(site, lambda a: seen.__setitem__("plain", a.clone()))]):
            organism.forward(batch.input_ids, batch.attention_mask)
        with organism.hooks([*intervention.hooks(), (site, lambda a: seen.__setitem__("steered", a.clone()))]):
            organism.forward(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(seen["steered"] - seen["plain"], 0.5 * neurons.vector(site).expand_as(seen["plain"]),
                               atol=1e-5, rtol=0)


def test_no_pair_is_a_clear_error(organism):
    with pytest.raises(DataError, match="no problem had both a correct and an incorrect trace"):
        contrastive_means(organism, organism_problems("arithmetic_1digit", slice(0, 2)), lambda r, e: False,
                          mlp_sites(organism.n_layers), samples=2)


def test_a_steer_neurons_rule_changes_only_the_sequence_that_fired(organism, organism_bank, neurons):
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    prompts = [[{"role": "user", "content": "what is 12 plus 34 ?"}],
               [{"role": "user", "content": "how do i fix my bike ?"}]]
    plain = Monitor(organism, organism_bank, [RuleSpec(name="sums", condition="arithmetic")]).generate(
        prompts, max_new_tokens=8)
    rule = RuleSpec(name="sums", condition="arithmetic", action='steer_neurons(neurons="n", strength=40)')
    steered = Monitor(organism, organism_bank, [rule], artifacts={"n": neurons}).generate(prompts, max_new_tokens=8)
    assert [r.fired for r in steered] == [["sums"], []] and steered[0].events[0].action == "steer_neurons"
    assert steered[1].tokens == plain[1].tokens and torch.equal(steered[1].scores, plain[1].scores)
    n = plain[0].events[0].token_index   # fired in the prompt: steered from that token on
    assert n < steered[0].prompt_length
    torch.testing.assert_close(steered[0].scores[:n], plain[0].scores[:n])
    assert not torch.allclose(steered[0].scores[n:], plain[0].scores[n:len(steered[0].scores)])


@pytest.mark.slow
def test_neurons_find_eval_and_steer_from_the_command_line(tmp_path):
    out = tmp_path / "neurons"
    found = runner.invoke(app, ["neurons", "find", "--problems", "builtin:arithmetic_2digit[0:10]", "--samples", "4",
                                "--k", "10", "--out", str(out), "--json"])
    assert found.exit_code == 0, found.output
    report = json.loads(found.stdout)
    assert report["problems"] == 10 and sum(report["kept_per_site"].values()) <= 10
    assert json.loads((out / "manifest.json").read_text())["kind"] == "reasoning_neuron_set"
    gated = runner.invoke(app, ["neurons", "gate", "--neurons", str(out), "--problems",
                                "builtin:arithmetic_2digit[0:20]", "--out", str(out / "gate"), "--epochs", "50",
                                "--json"])
    assert gated.exit_code == 0, gated.output
    assert 0 < json.loads(gated.stdout)["failures"] < 20
    evaluated = runner.invoke(app, ["neurons", "eval", "--neurons", str(out), "--problems",
                                    "builtin:arithmetic_2digit[40:50]", "--alpha", "0.2", "--gate", str(out / "gate"),
                                    "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads(evaluated.stdout)
    assert rows["problems"] == 10 and set(rows["steered"]) == set(rows["random"]) == set(rows["gated"]) == {"0.2"}
    assert 0 <= rows["gate_steers"] <= 1 and 0 <= rows["gate_accuracy"] <= 1
    assert rows["overlap"]["sets"]["--problems"] == rows["gate_overlap"]["sets"]["--problems"] == {
        "overlapping": 0, "total": 10, "fit_sets": []}
    # problems the neurons were found on (0-9) or the gate trained on (0-19) are refused before anything runs
    for problems, count, what in (("[5:15]", 5, "the neuron set"), ("[15:25]", 5, "the gate")):
        reused = runner.invoke(app, ["neurons", "eval", "--neurons", str(out), "--problems",
                                     f"builtin:arithmetic_2digit{problems}", "--gate", str(out / "gate")])
        assert reused.exit_code == 2
        assert f"{count} of 10 evaluation problems in --problems were used to fit {what}" in reused.output
        assert "(its --problems); pass held-out problems" in reused.output
    shown = runner.invoke(app, ["neurons", "steer", "--neurons", str(out), "--prompt", "what is 12 plus 34 ?",
                                "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["replies"][0]["unsteered"]
    bad = runner.invoke(app, ["neurons", "find", "--problems", "problems.jsonl", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "only the organism's sets are built in" in bad.output
