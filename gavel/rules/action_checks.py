"""Check rules' actions against the action plugins they name: known name, valid arguments, text only where the
action takes text, and alert placeholders the monitor can fill. Every problem is a located RuleError."""
from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gavel.errors import RuleError, did_you_mean
from gavel.plugins.actions import Action
from gavel.plugins.registry import Registry
from gavel.rules.spec import RuleSpec

PLACEHOLDERS = ("rule", "title", "severity", "token", "token_index", "sequence", "ces")
_BRACES = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")  # `{{` and `}}` are literal braces


def _hint(word: str, choices: Iterable[str]) -> str | None:
    guess = did_you_mean(word, sorted(choices))
    return f"did you mean '{guess}'?" if guess else None


def _argument_offset(action: str, key: str) -> int:
    """Where argument `key=` is written in the action string (its start when not found)."""
    found = re.search(rf"\b{re.escape(key)}\s*=", action)
    return found.start() if found else 0


def _argument_errors(rule: RuleSpec, plugin: type[Action]) -> list[RuleError]:
    call = rule.action_call
    if plugin.params is None:
        return [rule.action_error(f"action '{call.name}' takes no arguments", _argument_offset(rule.action, key))
                for key, _ in call.args[:1]]
    try:
        plugin.params.model_validate(dict(call.args))
    except ValidationError as e:
        return [_argument_error(rule, plugin.params, err) for err in e.errors()]
    return []


def _argument_error(rule: RuleSpec, params: type[BaseModel], err: ErrorDetails) -> RuleError:
    name = rule.action_call.name
    key = str(err["loc"][0]) if err["loc"] else ""
    fields = list(params.model_fields)
    if err["type"] == "missing":
        required = [f for f, info in params.model_fields.items() if info.is_required()]
        return rule.action_error(f"action '{name}' needs argument '{key}'", 0,
                                 hint=f"write it as {name}({', '.join(f'{f}=...' for f in required)})")
    if err["type"] == "extra_forbidden":
        return rule.action_error(f"action '{name}' has no argument '{key}'", _argument_offset(rule.action, key),
                                 hint=_hint(key, fields) or f"its arguments: {', '.join(fields)}")
    return rule.action_error(f"argument '{key}' of action '{name}': {err['msg']}", _argument_offset(rule.action, key))


def placeholder_errors(rule: RuleSpec, text: str) -> list[RuleError]:
    """Unknown or malformed `{placeholders}` in an alert's text."""
    allowed = {*PLACEHOLDERS, *rule.ce_names}
    errors = []
    for m in _BRACES.finditer(text):
        if m.group(0) in ("{{", "}}"):
            continue
        if m.group(1) is None:
            errors.append(rule.action_text_error(f"a lone '{m.group(0)}' in the alert text", m.start(),
                                                 hint="write {{ or }} for a literal brace"))
            continue
        field = re.split(r"[:!]", m.group(1), maxsplit=1)[0]
        if field not in allowed:
            dollar = m.start() > 0 and text[m.start() - 1] == "$"
            hint = ("`${...}` parameters are bound in conditions and action arguments, not in text" if dollar
                    else _hint(field, allowed) or f"placeholders: {', '.join(PLACEHOLDERS)} and the CEs the rule reads")
            errors.append(rule.action_text_error(f"unknown placeholder '{{{field}}}'", m.start(), hint=hint))
    return errors


def check_actions(rules: Iterable[RuleSpec], registry: Registry, *, runnable: bool = False) -> list[RuleError]:
    """Every problem with the rules' actions, located; with `runnable`, also actions that are only declared
    (`implemented = False`), which a monitor cannot run yet."""
    known = registry.actions
    errors: list[RuleError] = []
    for rule in rules:
        call = rule.action_call
        plugin = known.get(call.name)
        if plugin is None:
            errors.append(rule.action_error(f"unknown action '{call.name}'", 0,
                                            hint=_hint(call.name, known) or f"actions: {', '.join(sorted(known))}"))
            continue
        errors += _argument_errors(rule, plugin)
        if call.text is not None and not plugin.takes_text:
            errors.append(rule.action_text_error(f"action '{call.name}' takes no text", 0,
                                                 hint="only actions like alert and block take text"))
        elif call.text is not None and plugin.kind == "alert":
            errors += placeholder_errors(rule, call.text)
        if runnable and not plugin.implemented:
            errors.append(rule.action_error(f"action '{call.name}' is declared but not implemented yet", 0,
                                            hint="steering interventions arrive in a later version of gavel"))
    return errors
