"""The plugin registry: built-ins first, broken or non-conforming plugins reported and skipped."""
from importlib.metadata import EntryPoint

import pytest

from gavel.errors import GavelError
from gavel.plugins import registry as registry_module
from gavel.plugins.actions import BlockAction


class WebhookAction:
    name = "webhook"
    kind = "alert"
    stops_generation = False


class NotAnAction:
    name = "half"


def fake_entry_points(**points):
    def entry_points(group):
        return [EntryPoint(name, value, group) for name, value in points.get(group, [])]
    return entry_points


def test_builtins_are_registered():
    reg = registry_module.load_registry()
    assert {"log", "alert", "block"} <= set(reg.plugins["actions"])
    assert reg.get("actions", "block") is BlockAction


def test_third_party_broken_and_duplicate_plugins(monkeypatch):
    here = __name__
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points(**{"gavel.actions": [
        ("webhook", f"{here}:WebhookAction"),
        ("missing", "no_such_module_xyz:Action"),
        ("half", f"{here}:NotAnAction"),
        ("log", f"{here}:WebhookAction"),
    ]}))
    with pytest.warns(UserWarning):
        reg = registry_module.load_registry()
    assert reg.get("actions", "webhook") is WebhookAction
    assert reg.plugins["actions"]["log"].__module__ == "gavel.plugins.actions"  # the first one wins
    assert "missing" not in reg.plugins["actions"] and "half" not in reg.plugins["actions"]
    assert any("no_such_module_xyz" in p for p in reg.problems)
    assert any("does not implement Action" in p for p in reg.problems)


def test_unknown_plugin_suggests_a_name():
    with pytest.raises(GavelError, match="did you mean 'block'"):
        registry_module.load_registry().get("actions", "blok")
