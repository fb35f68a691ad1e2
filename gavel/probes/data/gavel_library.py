"""GAVEL library CEs: `ces/<name>/ce.yaml` metadata and the `excitation.json` / `calibration.json` sample files.

A bare conversation sample carries its folder's CE on every chosen-role token; a labelled sample is a
record in the labelled-span format (see docs/data.md). These are files of the public GAVEL format: keys gavel
does not know are kept and reported as warnings, never errors. Formats and choices are documented in docs/data.md.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from gavel.errors import DataError, Location, did_you_mean, excerpt, line_column
from gavel.io.gavel_format import CEPublicId, Namespace, Provenance, Tag, Timestamp
from gavel.io.metadata import FileWarning, kept, split_unknown, unknown_warnings
from gavel.io.yamlsource import YamlSource, index_document, line_starts, read_yaml
from gavel.probes.data.dataset import CEDataset, CEInfo
from gavel.probes.data.spans import Parsed, assemble, parse_record, read_text, role_codes

GavelRole = Literal["directive_to_user", "llm_task", "llm_behavior", "topic"]
GAVEL_ROLES: tuple[str, ...] = get_args(GavelRole)
_ENVELOPE_KEYS = ("conversations", "samples", "type", "ce", "ce_public_id", "sample_count", "schema_version",
                  "published_at")
_TIMESTAMP: TypeAdapter[str] = TypeAdapter(Timestamp)
_WS = re.compile(r"[ \t\n\r]*")


class SeedExample(BaseModel):
    """A YES/NO seed statement of a CE (GAVEL's `{input, output}` form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: Literal["YES", "NO"]

    @field_validator("output", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class CEDefinition(BaseModel):
    """One `ce.yaml`: GAVEL's fields (schema versions 1 and 2). `read_ce_yaml` keeps keys it does not know
    (`unknown_fields`) and reports them as warnings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    title: str = ""
    role: GavelRole | None = None
    definition: str = ""
    examples: tuple[SeedExample, ...] = ()
    schema_version: Literal[1, 2] = 1
    public_id: CEPublicId | None = None
    provenance: Provenance | None = None
    tags: tuple[Tag, ...] = ()
    namespace: Namespace | None = None  # the file's own; else its library's (`gavel.yaml`)
    _unknown: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def unknown_fields(self) -> dict[str, Any]:
        """Keys of the file gavel does not read, by dotted path, as written."""
        return self._unknown

    @field_validator("examples", mode="before")
    @classmethod
    def _yes_no_mapping(cls, value: object) -> object:
        """Also accept `{yes: [...], no: [...]}` (unquoted yes/no read as booleans under YAML 1.1)."""
        if not isinstance(value, dict):
            return value
        out = []
        for key, items in value.items():
            answer = {True: "YES", False: "NO"}.get(key) if isinstance(key, bool) else str(key).upper()
            if answer not in ("YES", "NO"):
                raise ValueError(f"example groups are `yes` and `no`, not {key!r}")
            if not isinstance(items, list):
                raise ValueError(f"`{key}` examples must be a list of strings")
            out += [{"input": text, "output": answer} for text in items]
        return out

    def info(self) -> CEInfo:
        return CEInfo(self.name, self.title, self.role, self.definition)


def read_ce_yaml(path: str | os.PathLike[str], warnings: list[FileWarning] | None = None) -> CEDefinition:
    """A `ce.yaml` file, validated; DataError at the file, line and column of the first problem. Unknown keys are
    kept (`unknown_fields`) and added to `warnings`, when given."""
    path = Path(path)
    text, node, data = read_yaml(path, DataError)
    values, keys, duplicates = index_document(node)
    source = YamlSource(str(path), text, line_starts(text), values, keys, None)

    def fail(message: str, i: int, hint: str | None = None) -> DataError:
        return DataError(message, location=source.location(i), excerpt=excerpt(text, i), hint=hint)

    if duplicates:
        key, i = duplicates[0]
        raise fail(f"duplicate key '{key}' (YAML would silently keep the last one)", i)
    if not isinstance(data, dict):
        raise fail("a ce.yaml must be a mapping of fields (name, title, role, definition, examples)", 0)
    data, unknown = split_unknown(CEDefinition, data)
    if warnings is not None:
        warnings.extend(unknown_warnings(unknown, source, CEDefinition))
    try:
        spec = CEDefinition.model_validate(data)
    except ValidationError as e:
        raise min((_pydantic_error(err, source, fail) for err in e.errors()), key=lambda x: x[0])[1] from None
    spec._unknown = kept(unknown)
    if spec.name != path.parent.name:
        raise fail(f"CE name {spec.name!r} differs from its folder name {path.parent.name!r}",
                   source.index(("name",)))
    return spec


def _pydantic_error(err: ErrorDetails, source: YamlSource, fail: Callable[..., DataError]) -> tuple[int, DataError]:
    """A pydantic error as (position in the file, DataError at that field)."""
    path = tuple(p for p in err["loc"] if p != "[key]")
    dotted = ".".join(map(str, path))
    if err["type"] == "extra_forbidden":
        i = source.index(path, key=True)
        guess = did_you_mean(str(path[-1]), list(CEDefinition.model_fields)) if len(path) == 1 else None
        return i, fail(f"unknown field '{dotted}'", i, f"did you mean '{guess}'?" if guess else None)
    if err["type"] == "missing":
        i = source.index(path[:-1])
        return i, fail(f"missing required field '{dotted}'", i)
    i = source.index(path)
    return i, fail(f"{dotted}: {err['msg'].removeprefix('Value error, ')}", i)


def _skip_ws(text: str, i: int) -> int:
    """The first offset at or after `i` that is not JSON whitespace."""
    match = _WS.match(text, i)
    assert match is not None   # the pattern matches the empty string, so it matches anywhere
    return match.end()


def _offsets(text: str, key: str) -> tuple[dict[str, int], list[int]]:
    """Character offset of each top-level key of a JSON object known to parse, and of each element of the list
    under `key`."""
    decoder = json.JSONDecoder()
    keys: dict[str, int] = {}
    found: list[int] = []
    i = _skip_ws(text, text.index("{") + 1)
    while text[i] != "}":
        start = i
        name, i = decoder.raw_decode(text, i)
        keys.setdefault(name, start)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
        if name == key and text[i] == "[":
            found, i = [], _skip_ws(text, i + 1)
            while text[i] != "]":
                found.append(i)
                _, i = decoder.raw_decode(text, i)
                i = _skip_ws(text, i)
                i = _skip_ws(text, i + 1) if text[i] == "," else i
            i += 1
        else:
            _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1) if text[i] == "," else i
    return keys, found


def read_samples(path: Path, which: str, ce: str, *, public_id: str | None = None,
                 warnings: list[FileWarning] | None = None) -> list[tuple[object, Location]]:
    """The samples of one CE's `excitation.json` / `calibration.json`, each with the place it starts. The
    envelope's fields must agree with the file (and `ce_public_id` with the ce.yaml's `public_id`); keys it does
    not know are added to `warnings`, when given."""
    if not path.is_file():
        raise DataError(f"missing {which}.json for CE {ce!r}", location=Location(str(path)))
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", location=Location(str(path), e.lineno, e.colno),
                        excerpt=excerpt(text, e.pos)) from None
    if not isinstance(data, dict):
        raise DataError('expected an object {"conversations": [...]} (or {"samples": [...]})',
                        location=Location(str(path), 1))
    key = "conversations" if "conversations" in data else "samples"
    keys, items = _offsets(text, key)

    def at(name: str) -> Location:
        return Location(str(path), *line_column(text, keys[name]))

    unknown = [name for name in data if name not in _ENVELOPE_KEYS]
    for name in unknown:
        if warnings is None:
            break
        guess = did_you_mean(name, _ENVELOPE_KEYS)
        warnings.append(FileWarning(f"unknown field {name!r} (kept, not read by gavel)", at(name),
                                    excerpt(text, keys[name]), f"did you mean {guess!r}?" if guess else None))
    top = Location(str(path), 1)
    if ("conversations" in data) == ("samples" in data):
        guess = next((g for name in unknown if (g := did_you_mean(name, ("conversations", "samples")))), None)
        raise DataError("expected exactly one of `conversations` or `samples`", location=top,
                        hint=f"did you mean {guess!r}?" if guess else None)
    samples = data[key]
    if not isinstance(samples, list):
        raise DataError(f"`{key}` must be a list", location=at(key))
    expected_values = {"type": which, "ce": ce, "sample_count": len(samples), "ce_public_id": public_id}
    for field, expected in expected_values.items():
        if field in data and expected is not None and data[field] != expected:
            raise DataError(f"`{field}` is {data[field]!r} but should be {expected!r}", location=at(field))
    if data.get("schema_version", 1) not in (1, 2):
        raise DataError(f"`schema_version` is {data['schema_version']!r}; known: 1, 2", location=at("schema_version"))
    if "published_at" in data:
        try:
            _TIMESTAMP.validate_python(data["published_at"])
        except ValidationError as e:
            raise DataError(f"`published_at`: {e.errors()[0]['msg'].removeprefix('Value error, ')}",
                            location=at("published_at")) from None
    return [(s, Location(str(path), line_column(text, i)[0])) for s, i in zip(samples, items)]


def load_gavel_ces(ces_dir: str | os.PathLike[str], tokenizer, *,
                   which: Literal["excitation", "calibration"] = "excitation", roles: Sequence[str] = ("assistant",),
                   names: Iterable[str] | None = None, warnings: list[FileWarning] | None = None) -> CEDataset:
    """The CEs of a GAVEL `ces/` folder (or a library holding one), from their excitation or calibration samples.

    A CE's samples are negatives for every other loaded CE; `names` picks CEs (default: all, sorted). Keys of the
    files gavel does not know are added to `warnings`, when given (they are never errors).
    """
    if which not in ("excitation", "calibration"):
        raise DataError(f"which must be 'excitation' or 'calibration', not {which!r}")
    codes = role_codes(roles)
    root = Path(ces_dir)
    root = root / "ces" if (root / "ces").is_dir() else root
    if not root.is_dir():
        raise DataError("no such CE folder", location=Location(str(root)))
    found = {p.parent.name: p for p in sorted(root.glob("*/ce.yaml"))}
    if not found:
        raise DataError("no CEs here: expected <name>/ce.yaml folders", location=Location(str(root)))
    selected = list(found) if names is None else [names] if isinstance(names, str) else list(names)
    if not selected:
        raise DataError("names selects no CE", location=Location(str(root)))
    for name in selected:
        if name not in found:
            guess = did_you_mean(str(name), list(found))
            raise DataError(f"unknown CE {name!r}; {root} has {', '.join(found)}",
                            hint=f"did you mean {guess!r}?" if guess else None)
    specs = {name: read_ce_yaml(found[name], warnings) for name in selected}
    parsed: list[Parsed] = []
    sources, declared = [], {}
    for name in selected:
        path = found[name].parent / f"{which}.json"
        declared[name] = Location(str(path))
        samples = read_samples(path, which, name, public_id=specs[name].public_id, warnings=warnings)
        for i, (sample, where) in enumerate(samples):
            parsed.append(_sample(sample, i, name, found, tokenizer, codes, where))
            sources.append(f"{path}#{i}")
    return assemble(parsed, [spec.info() for spec in specs.values()], declared, sources)


def _sample(sample: object, i: int, ce: str, known: dict[str, Path], tokenizer, codes: frozenset[int],
            where: Location) -> Parsed:
    """One sample: a bare conversation (labelled `ce` throughout) or a labelled record naming library CEs."""
    try:
        if isinstance(sample, list):
            sample = {"conversation": sample, "labels": [ce]}
        elif not isinstance(sample, dict):
            raise DataError("must be a conversation (a list of messages) or a labelled record (an object)",
                            location=where)
        parsed = parse_record(sample, tokenizer, codes, where)
    except DataError as e:
        raise DataError(f"sample {i}: {e.message}", location=e.location, hint=e.hint) from None
    for name in parsed.mentioned:
        if name not in known:
            guess = did_you_mean(name, list(known))
            raise DataError(f"sample {i}: unknown CE {name!r} (not in this library)", location=where,
                            hint=f"did you mean {guess!r}?" if guess else None)
    return parsed
