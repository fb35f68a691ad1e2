"""Rule tests: trace cases run through the compiled rules, text cases scanned by a model with a CE bank.

Where tests live:
- trace cases, one JSON object a line, beside a pack (`<pack>.tests.jsonl`), in a GAVEL rule folder
  (`rules/<name>/tests/traces.jsonl`), or inside a pack under its `tests:` key (YAML, or a `.gvl` pack);
- text cases (`<pack>.texts.jsonl`, `rules/<name>/tests/texts.jsonl`) and GAVEL's
  `tests/{positive,negative}.json`: these need a model and a CE bank, and are skipped without them.
A case's verdict is the highest-precedence action kind (block > steer > alert > log) among the rules that
fire anywhere in it, "clean" when none does. The formats: gavel.rules.testing.cases.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from gavel.errors import DataError, GavelError, Location, RuleError, did_you_mean
from gavel.io.conversations import Conversation, read_conversations
from gavel.plugins.actions import PRECEDENCE
from gavel.plugins.registry import registry
from gavel.rules.action_checks import check_actions
from gavel.rules.compile.program import RuleProgram, compile_rules, first_firing
from gavel.rules.load import RuleErrors, RuleSpec, collect_rules
from gavel.rules.names import references, resolve
from gavel.rules.testing.cases import (
    Expectation,
    Located,
    TextCase,
    TraceCase,
    Verdict,
    read_jsonl,
    read_pack_document,
    read_pack_tests,
)

Kind = Literal["trace", "text", "positive", "negative"]
Status = Literal["pass", "fail", "skip"]
FIXTURES: dict[str, Kind] = {".tests.jsonl": "trace", ".texts.jsonl": "text"}  # beside a pack: <pack><suffix>
GAVEL_TESTS: dict[str, Kind] = {"traces.jsonl": "trace", "texts.jsonl": "text", "positive.json": "positive",
                                "negative.json": "negative"}  # in rules/<name>/tests/
PACK_SUFFIXES = (".yaml", ".yml", ".gvl")
NEEDS_MODEL = "needs --model and --bank (the conversations are scanned by a model with a CE bank)"


# --- outcomes and mismatches --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Firing:
    """A rule's first firing: its token (and the token's text, for model runs) and its action."""

    rule: str
    token_index: int
    action: str
    kind: str | None  # the action's kind, a PRECEDENCE key (None: not looked up, no verdict asked)
    token: str | None = None

    def where(self) -> str:
        return f"token {self.token_index}" + (f" {self.token!r}" if self.token is not None else "")


def deciding(firings: Iterable[Firing]) -> Firing | None:
    """The firing that sets the verdict: the highest-precedence kind, then the earliest token; None: clean."""
    return min(firings, key=lambda f: (-_precedence(f), f.token_index), default=None)


def _precedence(firing: Firing) -> int:
    if firing.kind is None:
        raise ValueError(f"rule '{firing.rule}' fired with no action kind looked up: a verdict needs each kind")
    return PRECEDENCE[firing.kind]


def outcome(firing: Firing | None) -> dict:
    """The verdict a deciding firing gives, as reported."""
    if firing is None:
        return {"verdict": "clean"}
    return {"verdict": firing.kind, "first_token": firing.token_index, "token": firing.token, "rule": firing.rule,
            "action": firing.action}


def describe(result: Mapping) -> str:
    """`block from token 3 'x' (rule r)`, or `clean`."""
    if result["verdict"] == "clean":
        return "clean"
    token = "" if result.get("token") is None else f" {result['token']!r}"
    return f"{result['verdict']} from token {result['first_token']}{token} (rule '{result['rule']}')"


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expectation a case did not meet: about a rule or the verdict (`subject`), expected vs got."""

    subject: str  # a rule name, or "verdict"
    expected: dict
    got: dict
    message: str

    def __str__(self) -> str:
        return self.message


def rule_mismatches(rule: str, want: Expectation, got: Firing | None, action: str) -> list[Mismatch]:
    """How a rule's first firing `got` (None: never) and its `action` differ from what is expected."""
    out = []
    at = None if got is None else got.where()
    wrong_token = want.first_token is not None and got is not None and want.first_token != got.token_index
    if want.fires != (got is not None) or wrong_token:
        if not want.fires:
            message = f"{rule}: expected no firing, fired at {at}"
        else:
            expected_at = "" if want.first_token is None else f" at token {want.first_token}"
            message = f"{rule}: expected to fire{expected_at}, " + (f"first fired at {at}" if at else "never fired")
        expected = {"fires": want.fires} | ({} if want.first_token is None else {"first_token": want.first_token})
        found = {"fires": got is not None} | ({} if got is None else {"first_token": got.token_index,
                                                                      "token": got.token})
        out.append(Mismatch(rule, expected, found, message))
    if want.action is not None and want.action != action:
        out.append(Mismatch(rule, {"action": want.action}, {"action": action},
                            f"{rule}: expected action {want.action!r}, the rule's action is {action!r}"))
    return out


def verdict_mismatches(verdict: Verdict, first_token: int | None, got: Firing | None) -> list[Mismatch]:
    """How the verdict the firings give differs from `verdict` (from `first_token`, when given)."""
    found = outcome(got)
    wrong_token = first_token is not None and got is not None and first_token != got.token_index
    if found["verdict"] == verdict and not wrong_token:
        return []
    expected = {"verdict": verdict} | ({} if first_token is None else {"first_token": first_token})
    want = verdict + ("" if first_token is None else f" from token {first_token}")
    return [Mismatch("verdict", expected, found, f"verdict: expected {want}, got {describe(found)}")]


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The outcome of one test case: a trace or text case, or one conversation of a GAVEL set."""

    path: str
    line: int | None
    name: str
    kind: Kind
    status: Status
    rules: tuple[str, ...]  # the rules the case checks (every public rule when it checks the verdict)
    mismatches: tuple[Mismatch, ...] = ()
    reason: str | None = None  # why it was skipped
    outcome: dict | None = None  # the verdict the case gave, when it checks one (see `outcome`)

    def to_dict(self) -> dict:
        return asdict(self)


# --- finding the tests --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Suite:
    """One source of test cases (a fixture file, or a pack's own `tests:`) and the rule file it tests."""

    kind: Kind
    fixture: Path
    rules: Path

    @property
    def inline(self) -> bool:
        return self.fixture == self.rules


def _has_inline_tests(path: Path) -> bool:
    """Whether a pack file has `tests:` (a `.gvl` file that does not parse is a pack: its errors are reported)."""
    try:
        data = read_pack_document(path)[1]
    except GavelError:
        return path.suffix == ".gvl"  # a YAML file that does not read may be anything; `rules check` reports it
    return isinstance(data, dict) and "tests" in data


def _suites_of_rule_file(path: Path) -> list[Suite]:
    if path.name == "rule.yaml":
        tests = path.parent / "tests"
        return [Suite(kind, tests / name, path) for name, kind in GAVEL_TESTS.items() if (tests / name).is_file()]
    found = [Suite(kind, path.with_name(path.stem + suffix), path) for suffix, kind in FIXTURES.items()
             if path.with_name(path.stem + suffix).is_file()]
    return found + ([Suite("trace", path, path)] if _has_inline_tests(path) else [])


def _suite_of_fixture(path: Path) -> Suite:
    for suffix, kind in FIXTURES.items():
        if path.name.endswith(suffix):
            stem = path.name.removesuffix(suffix)
            pack = next((p for p in map(path.with_name, (stem + s for s in PACK_SUFFIXES)) if p.is_file()), None)
            if pack is None:
                raise DataError(f"no pack {stem}.yaml (or .yml, .gvl) beside this fixture",
                                location=Location(str(path)))
            return Suite(kind, path, pack)
    rule = path.parent.parent / "rule.yaml"
    if not rule.is_file():
        raise DataError(f"a GAVEL rule test belongs in rules/<name>/tests/, next to rule.yaml (no {rule})",
                        location=Location(str(path)))
    return Suite(GAVEL_TESTS[path.name], path, rule)


def _is_fixture(path: Path) -> bool:
    return path.name.endswith(tuple(FIXTURES)) or (path.parent.name == "tests" and path.name in GAVEL_TESTS)


def _suites_under(folder: Path, errors: list[GavelError]) -> list[Suite]:
    found = [s for f in sorted(folder.rglob("rule.yaml")) for s in _suites_of_rule_file(f)]
    for f in sorted(p for suffix in FIXTURES for p in folder.rglob("*" + suffix)):
        try:
            found.append(_suite_of_fixture(f))
        except DataError as e:
            errors.append(e)
    packs = sorted(p for suffix in PACK_SUFFIXES for p in folder.rglob("*" + suffix) if p.name != "rule.yaml")
    return found + [Suite("trace", p, p) for p in packs if _has_inline_tests(p)]


def discover(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Suite], list[GavelError]]:
    """The test suites under `paths` (rule files, packs, fixture files or folders), and the paths that have none."""
    suites: dict[tuple[str, Path], Suite] = {}
    errors: list[GavelError] = []
    for item in map(Path, paths):
        found: list[Suite] = []
        if not item.exists():
            errors.append(DataError("no such file or folder", location=Location(str(item))))
            continue
        if item.is_dir():
            found = _suites_under(item, errors)
        elif _is_fixture(item):
            try:
                found = [_suite_of_fixture(item)]
            except DataError as e:
                errors.append(e)
                continue
        elif item.suffix in PACK_SUFFIXES:
            found = _suites_of_rule_file(item)
        if not found:
            errors.append(DataError("no rule tests here", location=Location(str(item)),
                                    hint="add <pack>.tests.jsonl or a `tests:` list to a pack, or rules/<name>/tests/"))
        suites.update(((s.kind, s.fixture.resolve()), s) for s in found)
    return list(suites.values()), errors


# --- running ------------------------------------------------------------------------------------------------

def action_name(rule: RuleSpec) -> str:
    """The name of the action a rule takes (`block "sorry"` -> block)."""
    return rule.action_call.name


def referenced_rules(rule: RuleSpec, rule_names: Iterable[str] | None = None) -> set[str]:
    """The other rules `rule` names, in its condition, exceptions and the macros they use: rules of its pack, or of
    `rule_names` (the rules compiled with it, as the compiler resolves names)."""
    names = rule_names if rule_names is not None else (rule.pack.rule_names if rule.pack else ())
    rules = [n for n in names if n != rule.name]
    found: set[str] = set()
    seen: set[str] = set()
    todo = [rule.expr, *(e.expr for e in rule.exceptions)]
    while todo:
        for name, _, _ in references(todo.pop()):
            kind = resolve(name, groups=rule.groups, lists=rule.lists, macros=rule.macros, rules=rules)
            if kind == "macro" and name not in seen:
                seen.add(name)
                todo.append(rule.macros[name].expr)
            elif kind == "rule":
                found.add(name)
    return found


def ces_read(rule: RuleSpec, rules: Mapping[str, RuleSpec]) -> set[str]:
    """The CE names `rule` reads, also through the `rules` it refers to (wildcards left out: they match whatever
    CEs there are)."""
    found: set[str] = set()
    seen, todo = {rule.name}, [rule]
    while todo:
        current = todo.pop()
        found.update(current.ce_names)
        for name in referenced_rules(current, rules) - seen:
            if name in rules:
                seen.add(name)
                todo.append(rules[name])
    return found


def _kinds(rules: Iterable[RuleSpec]) -> tuple[dict[str, str], list[GavelError]]:
    """Each rule's action kind (block, steer, alert, log) from the action registry; unknown actions are errors."""
    known = registry().actions
    rules = list(rules)
    kinds = {r.name: known[action_name(r)].kind for r in rules if action_name(r) in known}
    return kinds, list(check_actions([r for r in rules if r.name not in kinds], registry()))


@dataclass(frozen=True, slots=True)
class _Pack:
    """The rules a suite tests, and its file (whether it loaded cleanly) for messages."""

    path: Path
    rules: dict[str, RuleSpec]
    loaded: bool  # False: some rules failed to load

    @property
    def public(self) -> list[str]:
        return [n for n, r in self.rules.items() if not r.private]

    def unknown_rule(self, located: Located, name: str, *at: str) -> GavelError | None:
        """The error for a case that expects `name`, unless it is a public rule of the pack."""
        if name in self.public:
            return None
        if name in self.rules:
            return located.error(f"expects rule {name!r}, which is private (only other rules read it)", *at)
        guess = did_you_mean(name, self.public)
        return located.error(f"expects rule {name!r}, which {self.path.name} does not define"
                             + ("" if self.loaded else " (or it failed to load)"), *at,
                             hint=f"did you mean {guess!r}?" if guess else None)


def _load_pack(path: Path) -> tuple[_Pack, list[GavelError]]:
    rules, errors = collect_rules(path)
    return _Pack(path, {r.name: r for r in rules}, not errors), list(errors)


class _Programs:
    """A pack's rules compiled once per CE list; a CE list the rules do not compile over is reported once."""

    def __init__(self, pack: _Pack) -> None:
        self.rules = pack.rules
        self.reads = {name: ces_read(rule, pack.rules) for name, rule in pack.rules.items()}
        self.cache: dict[tuple[str, ...], RuleProgram | None] = {}

    def columns(self, ces: Sequence[str]) -> tuple[str, ...]:
        """The case's CEs, then every other CE a rule reads (columns that never fire and score 0)."""
        extra = set().union(*self.reads.values()) - set(ces)
        return (*ces, *sorted(extra))

    def get(self, columns: tuple[str, ...], case: Located[TraceCase]) -> tuple[RuleProgram | None, list[GavelError]]:
        if columns in self.cache:
            return self.cache[columns], []
        try:
            self.cache[columns] = compile_rules(list(self.rules.values()), columns, actions=False)  # see _kinds
            return self.cache[columns], []
        except RuleErrors as e:
            self.cache[columns] = None
            context = f" (compiling the rules over the CEs of test {case.case.name!r}, {case.path}:{case.line})"
            return None, [RuleError(err.message + context, location=err.location, excerpt=err.excerpt, hint=err.hint)
                          for err in e.errors]


def _check_trace(located: Located[TraceCase], pack: _Pack, programs: _Programs
                 ) -> tuple[CaseResult | None, list[GavelError]]:
    """Run one trace case over the whole pack and compare; None with errors when the case cannot run."""
    case, rules = located.case, pack.rules
    errors = [e for name in case.expect if (e := pack.unknown_rule(located, name, "expect", name)) is not None]
    for name in set(case.expect) & set(pack.public):
        missing = sorted(programs.reads[name] - set(case.ces))
        if missing:
            errors.append(located.error(f"rule '{name}' reads CEs that `ces` does not list: {', '.join(missing)}",
                                        "ces", hint="list them, with 0s where a CE does not fire"))
    kinds: dict[str, str] = {}
    if case.verdict is not None:
        kinds, bad = _kinds(rules[n] for n in pack.public)
        errors += bad
    if errors:
        return None, errors
    columns = programs.columns(case.ces)
    program, errors = programs.get(columns, located)
    if program is None:
        return None, errors
    mask = None if case.mask is None else torch.tensor([case.mask], dtype=torch.bool)
    holds = program.run(case.fired(len(columns)), mask,
                        scores=case.scores(len(columns)) if program.needs_scores else None,
                        roles=case.token_classes() if program.needs_roles else None)
    first = dict(zip(program.rule_names, first_firing(holds)[0].tolist()))
    firings = {n: Firing(n, t, action_name(rules[n]), kinds.get(n)) for n, t in first.items() if t >= 0}
    mismatches = [m for n, want in case.expect.items()
                  for m in rule_mismatches(n, want, firings.get(n), action_name(rules[n]))]
    checked, found = tuple(case.expect), None
    if case.verdict is not None:
        decided = deciding(firings.values())
        mismatches += verdict_mismatches(case.verdict, case.first_token, decided)
        checked, found = tuple(pack.public), outcome(decided)
    return CaseResult(located.path, located.line, case.name, "trace", "fail" if mismatches else "pass", checked,
                      tuple(mismatches), outcome=found), []


def _trace_suite(suite: Suite) -> tuple[list[CaseResult], list[GavelError]]:
    pack, errors = _load_pack(suite.rules)
    cases, bad = read_pack_tests(suite.fixture) if suite.inline else read_jsonl(suite.fixture, TraceCase)
    errors += bad
    programs = _Programs(pack)
    results = []
    for case in cases:
        result, bad = _check_trace(case, pack, programs)
        errors += bad
        results += [result] if result is not None else []
    return results, errors


Scan = Callable[[Sequence[RuleSpec], Sequence[Conversation]], list[list[Firing]]]
"""Runs rules over conversations (the final assistant message being the response) and gives each conversation's
firings in order; raises a GavelError when the rules cannot run. `gavel.runtime.monitor.scanner(handle, bank)`
makes one from a model and a CE bank."""


def _scan(rules: Sequence[RuleSpec], conversations: list[Conversation], scan: Scan, where: Path, what: str
          ) -> tuple[list[list[Firing]] | None, list[GavelError]]:
    """Each conversation's rule firings; None with errors (about `what`, the rule or pack under test, at `where`)
    when the rules cannot run."""
    try:
        return scan(rules, conversations), []
    except GavelError as e:
        nested = e.errors if isinstance(e, RuleErrors) else (e,)
        return None, [RuleError(f"cannot run the tests of {what}: {err.message}", location=Location(str(where)),
                                hint=err.hint) for err in nested]


def _text_suite(suite: Suite, scan: Scan | None) -> tuple[list[CaseResult], list[GavelError]]:
    pack, errors = _load_pack(suite.rules)
    cases, bad = read_jsonl(suite.fixture, TextCase)
    errors += bad
    runnable = []
    for located in cases:
        name = located.case.expect.rule
        problem = None if name is None else pack.unknown_rule(located, name, "expect", "rule")
        errors += [problem] if problem is not None else []
        runnable += [located] if problem is None else []
    if not runnable or not pack.rules:
        return [], errors
    if scan is None:
        return [CaseResult(c.path, c.line, c.case.name, "text", "skip", tuple(pack.public), reason=NEEDS_MODEL)
                for c in runnable], errors
    firings, bad = _scan(list(pack.rules.values()), [c.case.messages() for c in runnable], scan, suite.rules,
                          suite.rules.name)
    if firings is None:
        return [], errors + bad
    results = []
    for located, found in zip(runnable, firings):
        want, decided = located.case.expect, deciding(found)
        mismatches = verdict_mismatches(want.verdict, want.first_token, decided)
        if want.rule is not None:
            got = next((f for f in found if f.rule == want.rule), None)
            mismatches += rule_mismatches(want.rule, Expectation(action=want.action), got,
                                          action_name(pack.rules[want.rule]))
        results.append(CaseResult(located.path, located.line, located.case.name, "text",
                                  "fail" if mismatches else "pass", tuple(pack.public), tuple(mismatches),
                                  outcome=outcome(decided)))
    return results, errors


def _case_name(kind: str, i: int, conversation: list[dict[str, str]]) -> str:
    text = next((m["content"] for m in conversation if m["role"] == "user"), conversation[0]["content"])
    return f"{kind} #{i}: {text[:57] + '...' if len(text) > 60 else text}"


def _gavel_suites(suites: Sequence[Suite], scan: Scan | None) -> tuple[list[CaseResult], list[GavelError]]:
    """The positive/negative sets of one GAVEL rule: scanned when a scan function (a model and a bank) is given."""
    pack, errors = _load_pack(suites[0].rules)
    rules = pack.rules
    sets = []
    for suite in suites:
        try:
            sets.append((suite, read_conversations(suite.fixture)))
        except DataError as e:
            errors.append(e)
    if len(rules) > 1:
        errors.append(RuleError("a GAVEL rule folder's rule.yaml holds one rule, not a pack",
                                location=Location(str(suites[0].rules))))
    if len(rules) != 1 or not sets:
        return [], errors
    (rule,) = rules.values()
    if scan is None:
        return [CaseResult(str(s.fixture), None, _case_name(s.kind, i, c), s.kind, "skip", (rule.name,),
                           reason=NEEDS_MODEL) for s, convs in sets for i, c in enumerate(convs)], errors
    firings, bad = _scan([rule], [c for _, convs in sets for c in convs], scan, suites[0].rules,
                         f"rule '{rule.name}'")
    if firings is None:
        return [], errors + bad
    scanned = iter(firings)
    results = []
    for suite, convs in sets:
        want = Expectation(fires=suite.kind == "positive")
        for i, conversation in enumerate(convs):
            got = next((f for f in next(scanned) if f.rule == rule.name), None)
            mismatches = tuple(rule_mismatches(rule.name, want, got, action_name(rule)))
            results.append(CaseResult(str(suite.fixture), None, _case_name(suite.kind, i, conversation), suite.kind,
                                      "fail" if mismatches else "pass", (rule.name,), mismatches))
    return results, errors


def run_rule_tests(paths: Iterable[str | os.PathLike[str]], *, scan: Scan | None = None
                   ) -> tuple[list[CaseResult], list[GavelError]]:
    """Run every rule test under `paths`; text cases and GAVEL positive/negative sets need a `scan` function (a
    model with a CE bank: `gavel.runtime.monitor.scanner`) and are skipped without one.

    Returns the case results and every problem with the inputs (fixtures, rule files, rules that do not
    compile over a case's CEs or the bank), so one bad fixture never hides the other tests.
    """
    suites, errors = discover(paths)
    results: list[CaseResult] = []
    gavel: dict[Path, list[Suite]] = {}
    for suite in suites:
        if suite.kind in ("positive", "negative"):
            gavel.setdefault(suite.rules.resolve(), []).append(suite)
            continue
        found, bad = _trace_suite(suite) if suite.kind == "trace" else _text_suite(suite, scan)
        results += found
        errors += bad
    for group in gavel.values():
        found, bad = _gavel_suites(group, scan)
        results += found
        errors += bad
    unique = {str(e): e for e in errors}.values()  # a rule file tested twice reports its errors once
    return results, sorted(unique, key=lambda e: (e.location.path or "", e.location.line or 0, e.location.column or 0)
                           if e.location else ("", 0, 0))
