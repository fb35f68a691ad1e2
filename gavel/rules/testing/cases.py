"""Rule test cases: what a trace or text case says and expects, read from JSONL fixtures and from packs' `tests:`.

A trace case gives per-token CE values (0/1 fired flags, or probabilities with `thresholds`), optionally a mask,
each token's role and where the response starts; it expects each named rule to fire (at a token, with an action)
or not, and/or the pack's verdict. A text case gives a conversation (or a text: one user message) and expects a
verdict, optionally a rule that fires and its action. Every problem is a DataError at its file, line and, in a
pack, the field itself.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gavel.errors import DataError, GavelError, Location, did_you_mean, excerpt
from gavel.io.conversations import ROLES
from gavel.io.yamlsource import PathKey, index_document, line_starts, read_yaml
from gavel.rules.gvl import read_gvl
from gavel.rules.load import Identifier, RuleErrors, RuleSource

Verdict = Literal["block", "steer", "alert", "log", "clean"]  # the action kinds by precedence, then none fired
Role = Literal["none", "system", "user", "assistant"]
RESPONSE = 4  # added to a token's role code for response tokens (the compiler's token classes)
Locator = Callable[[PathKey], tuple[Location, str | None]]  # a field path in a case -> where it is, an excerpt


# --- what a case expects ------------------------------------------------------------------------------------

class Expectation(BaseModel):
    """What one rule must do: fire (at `first_token` when given) or not, and take `action` when it fires."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fires: bool = True
    first_token: int | None = Field(default=None, ge=0)
    action: Identifier | None = None

    @model_validator(mode="after")
    def _meaningful(self) -> Expectation:
        if not self.model_fields_set:
            raise ValueError("say `fires`, `first_token` and/or `action`")
        if not self.fires and self.first_token is not None:
            raise ValueError("`first_token` needs `fires: true`")
        return self


def _tokens(n: int) -> str:
    return f"{n} token" + "s" * (n != 1)


class _Problem(ValueError):
    """A validation problem at a field below the one pydantic reports (`at`), so errors land on it."""

    def __init__(self, message: str, *at: str | int) -> None:
        super().__init__(message)
        self.at = at


def _check_verdict_fields(verdict: Verdict | None, first_token: int | None) -> None:
    if first_token is not None and verdict in (None, "clean"):
        raise _Problem("`first_token` is where the verdict starts: it needs a `verdict` other than clean",
                       "first_token")


class TraceCase(BaseModel):
    """One trace case: per-token CE values (0/1 fired flags, or scores with `thresholds`), optional mask, roles
    and response start, and what each rule (`expect`) and the whole pack (`verdict`, `first_token`) must do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    ces: tuple[Identifier, ...] = Field(min_length=1)
    trace: tuple[tuple[float, ...], ...]
    thresholds: dict[str, float] | None = None
    mask: tuple[bool, ...] | None = None
    roles: tuple[Role, ...] | None = None
    response_from: int | None = Field(default=None, ge=0)
    expect: dict[Identifier, Expectation] = Field(default_factory=dict)
    verdict: Verdict | None = None
    first_token: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _shapes(self) -> TraceCase:
        if not self.expect and self.verdict is None:
            raise ValueError("say what to expect: `expect` (per rule) and/or `verdict`")
        _check_verdict_fields(self.verdict, self.first_token)
        if len(set(self.ces)) != len(self.ces):
            raise _Problem("`ces` lists a CE more than once", "ces")
        for t, row in enumerate(self.trace):
            if len(row) != len(self.ces):
                raise _Problem(f"trace[{t}] needs one value per CE of `ces` ({len(self.ces)}), not {len(row)}",
                               "trace", t)
            if self.thresholds is None and any(v not in (0.0, 1.0) for v in row):
                raise _Problem(f"trace[{t}] holds scores: give `thresholds`, or use 0/1 fired flags", "trace", t)
            if self.thresholds is not None and not all(0.0 <= v <= 1.0 for v in row):
                raise _Problem(f"trace[{t}] holds a score outside [0, 1] (scores are probabilities)", "trace", t)
        if self.thresholds is not None and set(self.thresholds) != set(self.ces):
            missing, extra = set(self.ces) - set(self.thresholds), set(self.thresholds) - set(self.ces)
            raise _Problem("`thresholds` needs exactly one value per CE of `ces`"
                           + (f"; missing {sorted(missing)}" if missing else "")
                           + (f"; not in `ces`: {sorted(extra)}" if extra else ""), "thresholds")
        for key in ("mask", "roles"):
            value = getattr(self, key)
            if value is not None and len(value) != len(self.trace):
                raise _Problem(f"`{key}` needs one value per token of the trace ({_tokens(len(self.trace))}), "
                               f"not {len(value)}", key)
        if self.response_from is not None and self.response_from > len(self.trace):
            raise _Problem(f"`response_from` is past the end of the trace ({_tokens(len(self.trace))})",
                           "response_from")
        return self

    def values(self, width: int) -> torch.Tensor:
        """float64 [1, T, width]: the trace, zero-padded to `width` CEs."""
        values = torch.zeros(1, len(self.trace), width, dtype=torch.float64)
        values[0, :, :len(self.ces)] = torch.tensor(self.trace, dtype=torch.float64).reshape(len(self.trace), -1)
        return values

    def fired(self, width: int | None = None) -> torch.Tensor:
        """bool [1, T, width]: flags as given, or score > threshold (as the monitor compares); padding never fires."""
        values = self.values(width or len(self.ces))
        if self.thresholds is None:
            return values > 0.5
        limits = torch.ones(values.shape[-1], dtype=torch.float64)
        limits[:len(self.ces)] = torch.tensor([self.thresholds[c] for c in self.ces], dtype=torch.float64)
        return values > limits

    def scores(self, width: int | None = None) -> torch.Tensor:
        """float64 [1, T, width] probabilities (exactly as written, so `x >= 0.9` holds at 0.9): the scores, or
        the 0/1 flags read as scores; padding scores 0."""
        return self.values(width or len(self.ces))

    def token_classes(self) -> torch.Tensor:
        """uint8 [1, T]: role code (none without `roles`) + 4 from `response_from` on (no response without it)."""
        codes = torch.tensor([ROLES.index(r) for r in self.roles or ("none",) * len(self.trace)], dtype=torch.uint8)
        if self.response_from is not None:
            codes[self.response_from:] += RESPONSE
        return codes.reshape(1, len(self.trace))


class Message(BaseModel):
    """One chat message of a text case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class TextExpectation(BaseModel):
    """What a scanned text must give: its verdict (from `first_token` on), and optionally a rule that fires there
    with its `action`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    first_token: int | None = Field(default=None, ge=0)
    rule: Identifier | None = None
    action: Identifier | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TextExpectation:
        _check_verdict_fields(self.verdict, self.first_token)
        if self.verdict == "clean" and self.rule is not None:
            raise _Problem("a clean verdict means no rule fires: drop `rule`", "rule")
        if self.action is not None and self.rule is None:
            raise _Problem("`action` is the action of `rule`: name the rule", "action")
        return self


class TextCase(BaseModel):
    """One text case: a conversation (or a text, read as one user message) and what scanning it must give."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    conversation: tuple[Message, ...] | None = Field(default=None, min_length=1)
    text: str | None = None
    expect: TextExpectation

    @model_validator(mode="after")
    def _one_input(self) -> TextCase:
        if (self.conversation is None) == (self.text is None):
            raise ValueError("give either `conversation` (a list of {role, content}) or `text`")
        return self

    def messages(self) -> list[dict[str, str]]:
        if self.conversation is not None:
            return [m.model_dump() for m in self.conversation]
        assert self.text is not None   # `_one_input`: a case has a conversation or a text
        return [{"role": "user", "content": self.text}]


Case = TypeVar("Case", TraceCase, TextCase)
_MODELS = (TraceCase, Expectation, TextCase, TextExpectation, Message)



# --- reading cases ------------------------------------------------------------------------------------------

def read_pack_document(path: Path) -> tuple[RuleSource, object]:
    """A YAML or `.gvl` pack's positions and data; raises GavelError (RuleErrors for `.gvl` syntax errors)."""
    data: object
    if path.suffix == ".gvl":
        doc = read_gvl(path)
        text, data, values, keys = doc.text, doc.data, doc.values, doc.keys
    else:
        text, node, data = read_yaml(path, DataError)
        values, keys, _ = index_document(node)
    return RuleSource(str(path), text, line_starts(text), values, keys), data


@dataclass(frozen=True)
class Located(Generic[Case]):
    """A case and where it was written: a JSONL line, or an item of a pack's `tests:` (fields located within)."""

    case: Case
    path: str
    line: int | None
    locate: Locator = field(repr=False)

    def error(self, message: str, *at: str | int, hint: str | None = None) -> DataError:
        """A DataError about this case, at its field `at` when the source can locate fields."""
        location, text = self.locate(at)
        return DataError(f"test {self.case.name!r}: {message}", location=location, excerpt=text, hint=hint)


def _problems(e: ValidationError) -> list[tuple[PathKey, str, str | None]]:
    """(field path, message, hint) of each error, without those that only follow from a deeper one."""
    found = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if p != "[key]")
        where, hint = ".".join(map(str, loc)), None
        if err["type"] == "extra_forbidden":
            message = f"unknown field '{where}'"
            guess = did_you_mean(str(loc[-1]), sorted({f for m in _MODELS for f in m.model_fields}))
            hint = f"did you mean '{guess}'?" if guess else None
        else:
            message = err["msg"].removeprefix("Value error, ")
            message = f"{where}: {message}" if where else message
        found.append(((*loc, *getattr(err.get("ctx", {}).get("error"), "at", ())), message, hint))
    return [p for p in found if not any(len(q[0]) > len(p[0]) and q[0][:len(p[0])] == p[0] for q in found)]


def _validate(model: type[Case], items: Iterable[tuple[object, Locator]], path: str
              ) -> tuple[list[Located[Case]], list[GavelError]]:
    """Validate raw case data with each item's locator; every bad item and duplicate name is a located error."""
    cases: list[Located[Case]] = []
    errors: list[GavelError] = []
    seen: dict[str, Location] = {}
    for data, locate in items:
        try:
            case = model.model_validate(data)
        except ValidationError as e:
            name = data.get("name") if isinstance(data, dict) else None
            prefix = f"test {name!r}: " if isinstance(name, str) else ""
            for at, message, hint in _problems(e):
                location, text = locate(at)
                errors.append(DataError(prefix + message, location=location, excerpt=text, hint=hint))
            continue
        location = locate(())[0]
        if case.name in seen:
            errors.append(DataError(f"duplicate test name {case.name!r} (first at {seen[case.name]})",
                                    location=location))
            continue
        seen[case.name] = location
        cases.append(Located(case, path, location.line, locate))
    return cases, errors


def _at_line(where: Location) -> Locator:
    """Where every field of a JSONL case is: its line."""
    return lambda _at: (where, None)


def read_jsonl(path: Path, model: type[Case]) -> tuple[list[Located[Case]], list[GavelError]]:
    """The cases of a JSONL fixture (one JSON object a line), and every malformed line, located file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [DataError(f"cannot read this fixture: {e}", location=Location(str(path)))]
    items: list[tuple[object, Locator]] = []
    errors: list[GavelError] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(DataError(f"invalid JSON: {e.msg}", location=Location(str(path), number, e.colno)))
            continue
        items.append((data, _at_line(Location(str(path), number))))
    cases, bad = _validate(model, items, str(path))
    return cases, errors + bad


def read_pack_tests(path: Path) -> tuple[list[Located[TraceCase]], list[GavelError]]:
    """The trace cases under a pack's `tests:` key (YAML or `.gvl`), each error located at its field."""
    try:
        source, data = read_pack_document(path)
    except RuleErrors as e:
        return [], list(e.errors)
    except GavelError as e:
        return [], [e]

    def locate(at: PathKey) -> tuple[Location, str | None]:
        i = source.index(at, key=True)
        return source.location(i), excerpt(source.text, i)

    tests = data.get("tests") if isinstance(data, dict) else None
    if not isinstance(tests, list):
        location, text = locate(("tests",))
        return [], [DataError("a pack's `tests` must be a list of test cases", location=location, excerpt=text)]

    def in_item(i: int) -> Locator:
        return lambda at: locate(("tests", i, *at))

    return _validate(TraceCase, [(item, in_item(i)) for i, item in enumerate(tests)], str(path))
