"""Rule tests: CE-trace fixtures run through the compiled rules, and GAVEL positive/negative sets through a monitor.

A trace fixture is JSONL beside a pack (`<pack>.tests.jsonl`) or in a GAVEL rule folder
(`rules/<name>/tests/traces.jsonl`); GAVEL's `tests/{positive,negative}.json` need a model and a CE bank.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gavel.errors import DataError, GavelError, Location, RuleError, did_you_mean
from gavel.rules.compiler import compile_rules, first_firing
from gavel.rules.spec import Identifier, RuleErrors, RuleSpec, collect_rules

Kind = Literal["trace", "positive", "negative"]
Status = Literal["pass", "fail", "skip"]
TRACE_SUFFIX = ".tests.jsonl"
GAVEL_TESTS = {"traces.jsonl": "trace", "positive.json": "positive", "negative.json": "negative"}
NEEDS_MODEL = "needs --model and --bank (the conversations are scanned by a model with a CE bank)"


class Expectation(BaseModel):
    """What one rule must do over a trace: fire (at `first_token` when given), or never fire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fires: bool = True
    first_token: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _meaningful(self) -> Expectation:
        if not self.model_fields_set:
            raise ValueError("say `fires` and/or `first_token`")
        if not self.fires and self.first_token is not None:
            raise ValueError("`first_token` needs `fires: true`")
        return self


class TraceCase(BaseModel):
    """One line of a trace fixture: per-token CE values, an optional mask, and what each rule must do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    ces: tuple[Identifier, ...] = Field(min_length=1)
    trace: tuple[tuple[float, ...], ...]
    thresholds: dict[str, float] | None = None
    mask: tuple[bool, ...] | None = None
    expect: dict[Identifier, Expectation] = Field(min_length=1)

    @model_validator(mode="after")
    def _shapes(self) -> TraceCase:
        if len(set(self.ces)) != len(self.ces):
            raise ValueError("`ces` lists a CE more than once")
        for t, row in enumerate(self.trace):
            if len(row) != len(self.ces):
                raise ValueError(f"trace[{t}] needs one value per CE of `ces` ({len(self.ces)}), not {len(row)}")
            if self.thresholds is None and any(v not in (0.0, 1.0) for v in row):
                raise ValueError(f"trace[{t}] holds scores: give `thresholds`, or use 0/1 fired flags")
        if self.thresholds is not None and set(self.thresholds) != set(self.ces):
            missing, extra = set(self.ces) - set(self.thresholds), set(self.thresholds) - set(self.ces)
            raise ValueError("`thresholds` needs exactly one value per CE of `ces`"
                             + (f"; missing {sorted(missing)}" if missing else "")
                             + (f"; not in `ces`: {sorted(extra)}" if extra else ""))
        if self.mask is not None and len(self.mask) != len(self.trace):
            raise ValueError(f"`mask` needs one value per token of the trace ({len(self.trace)}), not {len(self.mask)}")
        return self

    def fired(self) -> torch.Tensor:
        """bool [1, T, len(ces)]: flags as given, or score > threshold (as the monitor compares)."""
        values = torch.tensor(self.trace, dtype=torch.float64).reshape(1, len(self.trace), len(self.ces))
        if self.thresholds is None:
            return values > 0.5
        return values > torch.tensor([self.thresholds[c] for c in self.ces], dtype=torch.float64)


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A rule that did not do what the test expects; `got` is its first firing token (None: never)."""

    rule: str
    expected: Expectation
    got: int | None
    token: str | None = None  # the token text, for model runs

    def __str__(self) -> str:
        at = "" if self.got is None else f"token {self.got}" + (f" {self.token!r}" if self.token else "")
        if not self.expected.fires:
            return f"{self.rule}: expected no firing, fired at {at}"
        want = "" if self.expected.first_token is None else f" at token {self.expected.first_token}"
        return f"{self.rule}: expected to fire{want}, " + (f"first fired at {at}" if at else "never fired")


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The outcome of one test case: a trace line, or one conversation of a GAVEL set."""

    path: str
    line: int | None
    name: str
    kind: Kind
    status: Status
    rules: tuple[str, ...]
    mismatches: tuple[Mismatch, ...] = ()
    reason: str | None = None  # why it was skipped

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mismatches"] = [{"rule": m.rule, "expected": m.expected.model_dump(), "got_first_token": m.got,
                              "token": m.token, "message": str(m)} for m in self.mismatches]
        return out


@dataclass(frozen=True, slots=True)
class Suite:
    """One fixture file and the rule file (a pack or a GAVEL `rule.yaml`) whose rules it tests."""

    kind: Kind
    fixture: Path
    rules: Path


def _suites_of_rule_file(path: Path) -> list[Suite]:
    if path.name == "rule.yaml":
        tests = path.parent / "tests"
        return [Suite(kind, tests / name, path) for name, kind in GAVEL_TESTS.items() if (tests / name).is_file()]
    fixture = path.with_name(path.stem + TRACE_SUFFIX)
    return [Suite("trace", fixture, path)] if fixture.is_file() else []


def _suite_of_fixture(path: Path) -> Suite:
    if path.name.endswith(TRACE_SUFFIX):
        stem = path.name.removesuffix(TRACE_SUFFIX)
        pack = next((p for p in (path.with_name(stem + ".yaml"), path.with_name(stem + ".yml")) if p.is_file()), None)
        if pack is None:
            raise DataError(f"no rule file {stem}.yaml beside this trace fixture", location=Location(str(path)))
        return Suite("trace", path, pack)
    rule = path.parent.parent / "rule.yaml"
    if not rule.is_file():
        raise DataError(f"a GAVEL rule test belongs in rules/<name>/tests/, next to rule.yaml (no {rule})",
                        location=Location(str(path)))
    return Suite(GAVEL_TESTS[path.name], path, rule)


def discover(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Suite], list[GavelError]]:
    """The test suites under `paths` (rule files, packs, fixture files or folders), and the paths that have none."""
    suites: dict[tuple[str, Path], Suite] = {}
    errors: list[GavelError] = []
    for item in map(Path, paths):
        found: list[Suite] = []
        try:
            if not item.exists():
                raise DataError("no such file or folder", location=Location(str(item)))
            if item.is_dir():
                found = [s for f in sorted(item.rglob("rule.yaml")) for s in _suites_of_rule_file(f)]
                found += [_suite_of_fixture(f) for f in sorted(item.rglob("*" + TRACE_SUFFIX))]
            elif item.name.endswith(TRACE_SUFFIX) or (item.parent.name == "tests" and item.name in GAVEL_TESTS):
                found = [_suite_of_fixture(item)]
            elif item.suffix in (".yaml", ".yml"):
                found = _suites_of_rule_file(item)
        except DataError as e:
            errors.append(e)
            continue
        if not found:
            errors.append(DataError("no rule tests here", location=Location(str(item)),
                                    hint=f"add <pack>{TRACE_SUFFIX} beside a pack, or rules/<name>/tests/"))
        suites.update(((s.kind, s.fixture.resolve()), s) for s in found)
    return list(suites.values()), errors


def read_traces(path: Path) -> tuple[list[tuple[int, TraceCase]], list[GavelError]]:
    """The cases of a JSONL trace fixture with their line numbers, and every malformed line."""
    cases: list[tuple[int, TraceCase]] = []
    errors: list[GavelError] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [DataError(f"cannot read this trace fixture: {e}", location=Location(str(path)))]
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = Location(str(path), number)
        try:
            data = json.loads(line)
            case = TraceCase.model_validate(data)
        except json.JSONDecodeError as e:
            errors.append(DataError(f"invalid JSON: {e.msg}", location=Location(str(path), number, e.colno)))
            continue
        except ValidationError as e:
            name = data.get("name") if isinstance(data, dict) else None
            prefix = f"test {name!r}: " if isinstance(name, str) else ""
            errors.append(DataError(prefix + "; ".join(map(_problem, e.errors())), location=where))
            continue
        if case.name in seen:
            errors.append(DataError(f"duplicate test name {case.name!r} (first on line {seen[case.name]})",
                                    location=where))
            continue
        seen[case.name] = number
        cases.append((number, case))
    return cases, errors


def _problem(err: dict) -> str:
    where = ".".join(map(str, err["loc"]))
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def run_trace(case: TraceCase, rules: Sequence[RuleSpec]) -> tuple[Mismatch, ...]:
    """Compile `rules` over the case's CEs, run its trace, and compare each rule's first firing; raises RuleErrors."""
    program = compile_rules(rules, case.ces)
    mask = None if case.mask is None else torch.tensor([case.mask], dtype=torch.bool)
    first = first_firing(program.run(case.fired(), mask))[0].tolist()
    out = []
    for rule, got in zip(program.rule_names, first):
        want, got = case.expect[rule], (got if got >= 0 else None)
        if want.fires != (got is not None) or (want.first_token is not None and want.first_token != got):
            out.append(Mismatch(rule, want, got))
    return tuple(out)


def _load_rules(path: Path) -> tuple[dict[str, RuleSpec], list[GavelError]]:
    rules, errors = collect_rules(path)
    return {r.name: r for r in rules}, list(errors)


def _trace_suite(suite: Suite) -> tuple[list[CaseResult], list[GavelError]]:
    rules, errors = _load_rules(suite.rules)
    defines = f"{suite.rules} does not define" + (" (or it failed to load)" if errors else "")
    cases, bad = read_traces(suite.fixture)
    errors += bad
    results = []
    for line, case in cases:
        where = Location(str(suite.fixture), line)
        unknown = [n for n in case.expect if n not in rules]
        for name in unknown:
            guess = did_you_mean(name, list(rules))
            errors.append(DataError(f"test {case.name!r} expects rule {name!r}, which {defines}",
                                    location=where, hint=f"did you mean {guess!r}?" if guess else None))
        missing = {n: [ce for ce in rules[n].ce_names if ce not in case.ces] for n in case.expect if n in rules}
        errors += [DataError(f"test {case.name!r}: rule '{n}' reads CEs that `ces` does not list: {', '.join(ces)}",
                             location=where) for n, ces in missing.items() if ces]
        if unknown or any(missing.values()):
            continue
        try:
            mismatches = run_trace(case, [rules[n] for n in case.expect])
        except RuleErrors as e:
            errors += [DataError(f"test {case.name!r}: {err.message}", location=where, hint=err.hint)
                       for err in e.errors]
            continue
        results.append(CaseResult(str(suite.fixture), line, case.name, "trace", "fail" if mismatches else "pass",
                                  tuple(case.expect), mismatches))
    return results, errors


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """A GAVEL test set `{"conversations": [[{role, content}, ...], ...]}`; raises DataError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", location=Location(str(path), e.lineno, e.colno)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read this test set: {e}", location=Location(str(path))) from None
    conversations = data.get("conversations") if isinstance(data, dict) else None
    ok = isinstance(conversations, list) and all(
        isinstance(c, list) and c and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in c) for c in conversations)
    if not ok:
        raise DataError('expected {"conversations": [[{"role": ..., "content": ...}, ...], ...]}',
                        location=Location(str(path)))
    return conversations


def _case_name(kind: str, i: int, conversation: list[dict[str, str]]) -> str:
    text = next((m["content"] for m in conversation if m["role"] == "user"), conversation[0]["content"])
    return f"{kind} #{i}: {text[:57] + '...' if len(text) > 60 else text}"


def _gavel_suites(suites: Sequence[Suite], handle, bank) -> tuple[list[CaseResult], list[GavelError]]:
    """The positive/negative sets of one GAVEL rule: scanned by a monitor when a model and bank are given."""
    rules, errors = _load_rules(suites[0].rules)
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
    if handle is None or bank is None:
        return [CaseResult(str(s.fixture), None, _case_name(s.kind, i, c), s.kind, "skip", (rule.name,),
                           reason=NEEDS_MODEL) for s, convs in sets for i, c in enumerate(convs)], errors
    from gavel.monitor import Monitor

    try:
        monitor = Monitor(handle, bank, [rule])
        scanned = iter(monitor.scan([c for _, convs in sets for c in convs]))
    except GavelError as e:
        nested = e.errors if isinstance(e, RuleErrors) else (e,)
        return [], errors + [RuleError(f"cannot run the tests of rule '{rule.name}': {err.message}",
                                       location=Location(str(suites[0].rules)), hint=err.hint) for err in nested]
    results = []
    for suite, convs in sets:
        want = Expectation(fires=suite.kind == "positive")
        for i, conversation in enumerate(convs):
            result = next(scanned)
            event = next((e for e in result.events if e.rule == rule.name), None)
            got = None if event is None else event.token_index
            bad = want.fires != (got is not None)
            mismatch = (Mismatch(rule.name, want, got, event.token if event else None),) if bad else ()
            results.append(CaseResult(str(suite.fixture), None, _case_name(suite.kind, i, conversation), suite.kind,
                                      "fail" if bad else "pass", (rule.name,), mismatch))
    return results, errors


def run_rule_tests(paths: Iterable[str | os.PathLike[str]], *, handle=None, bank=None
                   ) -> tuple[list[CaseResult], list[GavelError]]:
    """Run every rule test under `paths`; GAVEL positive/negative sets need a model `handle` and a CE `bank`.

    Returns the case results and every problem with the inputs (fixtures, rule files, rules that do not
    compile over a case's CEs or the bank), so one bad fixture never hides the other tests.
    """
    suites, errors = discover(paths)
    results: list[CaseResult] = []
    gavel: dict[Path, list[Suite]] = {}
    for suite in suites:
        if suite.kind == "trace":
            found, bad = _trace_suite(suite)
            results += found
            errors += bad
        else:
            gavel.setdefault(suite.rules.resolve(), []).append(suite)
    for group in gavel.values():
        found, bad = _gavel_suites(group, handle, bank)
        results += found
        errors += bad
    unique = {str(e): e for e in errors}.values()  # a rule file tested twice reports its errors once
    return results, sorted(unique, key=lambda e: (e.location.path or "", e.location.line or 0, e.location.column or 0)
                           if e.location else ("", 0, 0))
