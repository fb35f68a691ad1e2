"""The plugin registry: built-ins first, broken or non-conforming plugins reported and skipped; actions declare
their arguments."""
from importlib.metadata import EntryPoint

import pytest
from pydantic import BaseModel, ValidationError

from gavel.errors import GavelError
from gavel.plugins import registry as registry_module
from gavel.plugins.actions import BUILTIN_ACTIONS, PRECEDENCE, Action, BlockAction, RotateAction


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
    assert reg.get("actions", "block") is BlockAction
    assert reg.problems == []


def test_builtin_actions_declare_arguments_and_text():
    by_name = {a.name: a for a in BUILTIN_ACTIONS}
    assert all(isinstance(a, type) and isinstance(a(), Action) for a in BUILTIN_ACTIONS)
    assert {n for n, a in by_name.items() if a.takes_text} == {"alert", "block"}
    assert {n for n, a in by_name.items() if a.params is None} == {"log", "alert", "block"}
    assert {n for n, a in by_name.items() if a.stops_generation} == {"block"}
    steering = {n for n, a in by_name.items() if a.kind == "steer"}
    assert steering == {"rotate", "add", "ablate", "align", "steer_neurons", "perturb"}
    # declarations only: nothing pretends to steer yet
    assert {n for n, a in by_name.items() if not a.implemented} == steering
    assert PRECEDENCE["block"] > PRECEDENCE["steer"] > PRECEDENCE["alert"] > PRECEDENCE["log"]
    fields = {n: list(a.params.model_fields) for n, a in by_name.items() if a.params is not None}
    assert fields == {"rotate": ["plane", "angle"], "add": ["vector", "strength"], "ablate": ["direction"],
                      "align": ["model"], "steer_neurons": ["neurons", "strength"], "perturb": ["method", "budget"]}


def test_steering_arguments_are_checked_strictly():
    args = RotateAction.params.model_validate({"plane": "refusal", "angle": 30})
    assert (args.plane, args.angle) == ("refusal", 30.0)
    for bad in ({"plane": "refusal"}, {"plane": "refusal", "angle": "30"}, {"plane": 3, "angle": 30},
                {"plane": "refusal", "angle": 30, "axis": 1}, {"plane": "refusal", "angle": float("inf")}):
        with pytest.raises(ValidationError):
            RotateAction.params.model_validate(bad)
    perturb = {a.name: a for a in BUILTIN_ACTIONS}["perturb"].params
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        perturb.model_validate({"method": "gaussian", "budget": -1})


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
    assert rows[("actions", "rotate")]["implemented"] is False
    here = __name__
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points(**{"gavel.actions": [
        ("webhook", f"{here}:WebhookAction"), ("missing", "no_such_module_xyz:Action")]}))
    with pytest.warns(UserWarning):
        broken = CliRunner().invoke(app, ["plugins", "list"])
    assert broken.exit_code == 1
    assert "webhook" in broken.stdout and f"{here}:WebhookAction" in broken.stdout
    assert "no_such_module_xyz" in broken.stdout
