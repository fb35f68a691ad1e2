"""The rule language: GAVEL conditions parsed to an AST, YAML rule specs, lints and a tensor evaluator.

The evaluator (`compile_rules` and friends) is imported on first use, so parsing and linting never load torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gavel.rules.action_checks import check_actions
from gavel.rules.ast import (
    Aggregate,
    And,
    Compare,
    Expr,
    Name,
    Not,
    Once,
    Or,
    Param,
    Scoped,
    Select,
    Span,
    Sustained,
    Then,
    bind_params,
    walk,
)
from gavel.rules.gvl import parse_gvl, read_gvl
from gavel.rules.lint import Issue, Severity, Validator, default_validators, lint
from gavel.rules.load import RuleErrors, RuleSource, RuleSpec, collect_rules, load_rule_file, load_rules
from gavel.rules.parser import KNOWN_MISTAKES, ConditionSyntaxError, parse_condition
from gavel.rules.spec import Macro, Pack, Requires, RuleException

if TYPE_CHECKING:
    from gavel.rules.compile.program import RuleProgram, RuleState, compile_rules, first_firing

_COMPILER = ("RuleProgram", "RuleState", "compile_rules", "first_firing")

__all__ = [
    "KNOWN_MISTAKES",
    "Aggregate",
    "And",
    "Compare",
    "ConditionSyntaxError",
    "Expr",
    "Issue",
    "Macro",
    "Name",
    "Not",
    "Once",
    "Or",
    "Pack",
    "Param",
    "Requires",
    "RuleErrors",
    "RuleException",
    "RuleProgram",
    "RuleSource",
    "RuleSpec",
    "RuleState",
    "Scoped",
    "Select",
    "Severity",
    "Span",
    "Sustained",
    "Then",
    "Validator",
    "bind_params",
    "check_actions",
    "collect_rules",
    "compile_rules",
    "default_validators",
    "first_firing",
    "lint",
    "load_rule_file",
    "load_rules",
    "parse_condition",
    "parse_gvl",
    "read_gvl",
    "walk",
]


def __getattr__(name: str) -> object:
    if name in _COMPILER:
        from gavel.rules.compile import program

        return getattr(program, name)
    raise AttributeError(f"module 'gavel.rules' has no attribute '{name}'")
