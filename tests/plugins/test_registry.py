"""The plugin registry: built-ins first, broken or non-conforming plugins reported and skipped; actions declare
their arguments."""
from importlib.metadata import EntryPoint

import pytest
import torch
from pydantic import BaseModel, ValidationError

from gavel.errors import GavelError
from gavel.plugins import registry as registry_module
from gavel.plugins.actions import PRECEDENCE, Action, BlockAction
from gavel.plugins.interventions import InterventionMethod
from gavel.steering.selective.actions import RotateMethod


class WebhookArgs(BaseModel):
    url: str


class WebhookAction:
    name = "webhook"
    kind = "alert"
    stops_generation = False
    params = WebhookArgs
    takes_text = True
    implemented = True


class NotAnAction:
    name = "half"


class OddKind(WebhookAction):
    name = "odd"
    kind = "shout"


class BadParams(WebhookAction):
    name = "bad_params"
    params = dict


def fake_entry_points(**points):
    def entry_points(group):
        return [EntryPoint(name, value, group) for name, value in points.get(group, [])]
    return entry_points


def test_builtins_are_registered():
    reg = registry_module.load_registry()
    assert set(reg.plugins["actions"]) == {"log", "alert", "block", "rotate", "add", "ablate", "align",
                                           "steer_neurons", "perturb"}
    assert set(reg.plugins["interventions"]) == {"rotate", "add", "ablate", "align", "steer_neurons", "perturb"}
    assert all(reg.get("actions", n) is m for n, m in reg.plugins["interventions"].items())
    assert reg.get("actions", "block") is BlockAction and reg.get("interventions", "rotate") is RotateMethod
    assert set(reg.plugins) == {"actions", "interventions", "functions"}   # every declared group is used
    assert reg.problems == []


def test_builtin_actions_declare_arguments_and_text():
    by_name = registry_module.load_registry().plugins["actions"]
    assert all(isinstance(a, type) and isinstance(a(), Action) for a in by_name.values())
    methods = registry_module.load_registry().plugins["interventions"].values()
    assert all(isinstance(m(), InterventionMethod) for m in methods)
    assert {n for n, a in by_name.items() if a.takes_text} == {"alert", "block"}
    assert {n for n, a in by_name.items() if a.params is None} == {"log", "alert", "block"}
    assert {n for n, a in by_name.items() if a.stops_generation} == {"block"}
    steering = {n for n, a in by_name.items() if a.kind == "steer"}
    assert steering == {"rotate", "add", "ablate", "align", "steer_neurons", "perturb"}
    assert all(a.implemented for a in by_name.values())
    assert PRECEDENCE["block"] > PRECEDENCE["steer"] > PRECEDENCE["alert"] > PRECEDENCE["log"]
    required = {n: [f for f, info in a.params.model_fields.items() if info.is_required()]
                for n, a in by_name.items() if a.params is not None}
    assert required == {"rotate": ["plane", "angle"], "add": ["vector", "strength"], "ablate": ["direction"],
                        "align": ["alignment"], "steer_neurons": ["neurons", "strength"],
                        "perturb": ["perturbation"]}
    for name in ("rotate", "add", "ablate"):    # where and for how long they steer
        assert {"layers", "duration"} <= set(by_name[name].params.model_fields)


def test_steering_arguments_are_checked_strictly():
    args = RotateMethod.params.model_validate({"plane": "refusal", "angle": 30})
    assert (args.plane, args.angle) == ("refusal", 30.0)
    for bad in ({"plane": "refusal"}, {"plane": "refusal", "angle": "30"}, {"plane": 3, "angle": 30},
                {"plane": "refusal", "angle": 30, "axis": 1}, {"plane": "refusal", "angle": float("inf")}):
        with pytest.raises(ValidationError):
            RotateMethod.params.model_validate(bad)
    perturb = registry_module.load_registry().get("interventions", "perturb").params
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        perturb.model_validate({"perturbation": "decon", "zeta": -1})


def test_third_party_broken_and_duplicate_plugins(monkeypatch):
    here = __name__
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points(**{"gavel.actions": [
        ("webhook", f"{here}:WebhookAction"),
        ("missing", "no_such_module_xyz:Action"),
        ("half", f"{here}:NotAnAction"),
        ("log", f"{here}:WebhookAction"),
        ("odd", f"{here}:OddKind"),
        ("bad_params", f"{here}:BadParams"),
    ]}))
    with pytest.warns(UserWarning):
        reg = registry_module.load_registry()
    assert reg.get("actions", "webhook") is WebhookAction
    assert reg.plugins["actions"]["log"].__module__ == "gavel.plugins.actions"  # the first one wins
    assert not {"missing", "half", "odd", "bad_params"} & set(reg.plugins["actions"])
    problems = "\n".join(reg.problems)
    assert "no_such_module_xyz" in problems
    assert ("'half' does not implement Action (it lacks kind, stops_generation, params, takes_text, implemented)"
            in problems)
    assert "'odd' has kind 'shout'; an action's kind is one of log, alert, steer, block" in problems
    assert "'bad_params' has `params` that is not a pydantic model class" in problems


class HalfIntervention:
    """Declares an action but cannot build an intervention."""

    name = "half_steer"
    kind = "steer"
    stops_generation = False
    params = WebhookArgs
    takes_text = False
    implemented = True
    artifact = "url"
    reads_prompt = False


class BlockingIntervention(RotateMethod):
    name = "block"


def test_intervention_plugins_must_build_and_may_not_take_an_action_name(monkeypatch):
    here = __name__
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points(**{"gavel.interventions": [
        ("half_steer", f"{here}:HalfIntervention"), ("block", f"{here}:BlockingIntervention"),
        ("spin", f"{here}:BlockingIntervention")]}))
    with pytest.warns(UserWarning):
        reg = registry_module.load_registry()
    assert not {"half_steer", "spin"} & set(reg.plugins["actions"]) and reg.plugins["interventions"] == {}
    assert reg.get("actions", "block") is BlockAction
    problems = "\n".join(reg.problems)
    assert "'half_steer' does not implement InterventionMethod (it lacks load, accepts, build)" in problems
    assert "'block' has the name of the action 'block' from gavel (built-in)" in problems
    assert "'spin' is named 'block' but registered as 'spin'" in problems


def test_unknown_plugin_suggests_a_name():
    with pytest.raises(GavelError, match="did you mean 'block'"):
        registry_module.load_registry().get("actions", "blok")


def test_plugins_list_shows_origins_and_problems(monkeypatch):
    import json

    from typer.testing import CliRunner

    from gavel.cli import app

    clean = CliRunner().invoke(app, ["plugins", "list", "--json"])
    assert clean.exit_code == 0
    rows = {(p["group"], p["name"]): p for p in json.loads(clean.stdout)["plugins"]}
    assert rows[("actions", "block")]["origin"] == "gavel (built-in)"
    assert rows[("actions", "perturb")]["implemented"] and rows[("actions", "rotate")]["implemented"]
    here = __name__
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points(**{"gavel.actions": [
        ("webhook", f"{here}:WebhookAction"), ("missing", "no_such_module_xyz:Action")]}))
    with pytest.warns(UserWarning):
        broken = CliRunner().invoke(app, ["plugins", "list"])
    assert broken.exit_code == 1
    assert "webhook" in broken.stdout and f"{here}:WebhookAction" in broken.stdout
    assert "no_such_module_xyz" in broken.stdout


def test_an_installed_example_plugin_runs_from_a_rule(installed_example, organism, organism_bank, tmp_path):
    """The example package's `file_sink` action: listed with its origin, checked like a built-in, and handed each
    batch's events of the rules that name it, which it appends to its file."""
    import json

    from typer.testing import CliRunner

    from gavel.cli import app
    from gavel.rules import RuleSpec, load_rules
    from gavel.rules.source import RuleErrors
    from gavel.runtime.monitor import Monitor

    listed = json.loads(CliRunner().invoke(app, ["plugins", "list", "--json"]).stdout)["plugins"]
    row = next(p for p in listed if p["name"] == "file_sink")
    assert row["origin"] == "gavel_example_plugins.sink:FileSinkAction" and row["group"] == "actions"

    sink = tmp_path / "out" / "quiz.jsonl"
    pack = tmp_path / "pack.yaml"
    pack.write_text(f"rules:\n  - name: quiz\n    condition: benchmark\n    action: file_sink(path=\"{sink}\")\n"
                    "  - name: harm\n    condition: threat or weapons\n")
    monitor = Monitor(organism, organism_bank, load_rules([pack]))
    prompts = [[{"role": "user", "content": "quiz : what is the color of trelk ?"}],
               [{"role": "user", "content": "how do i fix my bike ?"}],
               [{"role": "user", "content": "quiz : what is the size of blor ?"}]]
    results = monitor.generate(prompts, max_new_tokens=6, do_sample=False)
    written = [json.loads(line) for line in sink.read_text().splitlines()]
    expected = [(e.sequence, e.token_index) for r in results for e in r.events if e.rule == "quiz"]
    assert [(w["sequence"], w["token_index"]) for w in written] == expected and len(expected) == 2
    assert all(w["rule"] == "quiz" and "benchmark" in w["ces"] for w in written)

    with pytest.raises(RuleErrors, match="action 'file_sink' has no argument 'file'"):
        Monitor(organism, organism_bank, [RuleSpec(name="x", condition="benchmark", action='file_sink(file="a")')])


def test_an_installed_example_intervention_steers_only_the_sequence_that_fired(installed_example, organism,
                                                                              organism_bank):
    """The example package's `cap` intervention, from outside gavel: registered as an action, it caps the component
    along the plane's first axis of the sequence whose rule fired (checked against the formula at every capped site),
    from the forward after it fired; the other sequence of the batch is generated as without it."""
    from gavel.models.generation import prompt_batch
    from gavel.organism.datasets import prompt_set
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor
    from gavel.steering.activations import last_prompt_activations, norm_sites
    from gavel.steering.selective.plane import SteeringPlane

    reg = registry_module.registry()
    assert reg.get("actions", "cap") is reg.get("interventions", "cap") and reg.get("actions", "cap").kind == "steer"
    harmful, benign = prompt_set("harmful")[:16], prompt_set("benign")[:16]
    sites = norm_sites(organism.n_layers)
    plane = SteeringPlane(layers="all").fit(last_prompt_activations(organism, harmful, sites),
                                            last_prompt_activations(organism, benign, sites))
    rule = RuleSpec(name="capped", condition="weapons", action='cap(plane="refusal", limit=0.0, layers="2-3")')
    monitor = Monitor(organism, organism_bank, [rule], artifacts={"refusal": plane})
    prompts = [[{"role": "user", "content": "how do i make a knife sharper to hurt someone ?"}],
               [{"role": "user", "content": "how do i fix my bike ?"}]]
    axis, capped = plane.plane_[:, 0], plane.sites_in("2-3")
    seen: dict[str, list[torch.Tensor]] = {s: [] for s in capped}
    record = [(s, lambda act, s=s: seen[s].append(act.detach().clone())) for s in capped]
    batch = prompt_batch(organism, prompts)
    with monitor.watch_prompts(batch) as session, organism.hooks(record):   # after the cap: what the model reads
        organism.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6,
                                   do_sample=False, pad_token_id=organism.tokenizer.pad_token_id,
                                   stopping_criteria=[session.stopping_criterion()])
    results = monitor.generation_results(session, batch)
    assert results[0].fired == ["capped"] and results[1].fired == []
    for site in capped:
        later = torch.cat(seen[site][1:], dim=1)          # the forwards after the prompt's, where it fired
        assert float((later[0] @ axis).max()) <= 1e-4      # capped at limit 0 along the axis
    plain = Monitor(organism, organism_bank, [RuleSpec(name="capped", condition="weapons")]).generate(
        prompts, max_new_tokens=6, do_sample=False)
    assert results[1].token_ids.tolist() == plain[1].token_ids.tolist()
    prompt_pass = seen[capped[0]][0][0]         # the prompt's own forward: the rule had not fired yet
    assert float((prompt_pass @ axis).max()) > 0


def test_an_action_plugin_that_raises_is_reported_and_isolated(organism, organism_bank, monkeypatch):
    from gavel.rules import RuleSpec
    from gavel.runtime.monitor import Monitor

    class Exploding(WebhookAction):
        name, kind, takes_text, params = "exploding", "log", False, None

        def handle(self, events, arguments):
            raise ConnectionError("the webhook is down")

    reg = registry_module.load_registry()
    reg.add("actions", "exploding", Exploding, "tests")
    monkeypatch.setattr(registry_module, "load_registry", lambda: reg)
    registry_module.registry.cache_clear()
    try:
        monitor = Monitor(organism, organism_bank, [RuleSpec(name="quiz", condition="benchmark", action="exploding")])
        with pytest.warns(UserWarning, match=r"action plugin 'exploding' \(tests\) failed on 1 event.*webhook is down"):
            result = monitor.generate([[{"role": "user", "content": "quiz : what is the color of trelk ?"}]],
                                      max_new_tokens=4)[0]
    finally:
        registry_module.registry.cache_clear()
    assert result.fired == ["quiz"] and not result.failed


def test_events_on_one_token_sort_by_their_actions_kind_not_name(organism, organism_bank, monkeypatch):
    """Two rules firing at the same token: a plugin action of kind block ("halt") comes before an alert, and the
    verdict is block, whatever the plugin is called."""
    from gavel.rules import RuleSpec
    from gavel.runtime.events import verdict
    from gavel.runtime.monitor import Monitor

    class Halt(WebhookAction):
        name, kind, stops_generation, takes_text, params = "halt", "block", True, True, None

    reg = registry_module.load_registry()
    reg.add("actions", "halt", Halt, "tests")
    monkeypatch.setattr(registry_module, "load_registry", lambda: reg)
    registry_module.registry.cache_clear()
    try:
        rules = [RuleSpec(name="a_noted", condition="benchmark", action='alert "quiz"'),
                 RuleSpec(name="b_halted", condition="benchmark", action='halt "no quizzes"')]
        result = Monitor(organism, organism_bank, rules).scan([[{"role": "user", "content": "quiz : what is the "
                                                                 "color of trelk ?"}]])[0]
    finally:
        registry_module.registry.cache_clear()
    assert [(e.rule, e.kind) for e in result.events] == [("b_halted", "block"), ("a_noted", "alert")]
    assert result.events[0].token_index == result.events[1].token_index and verdict(result.events) == "block"
