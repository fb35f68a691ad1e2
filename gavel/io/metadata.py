"""Keys a GAVEL library file has and gavel does not know: split off before validation, kept on what was read, and
reported as located warnings (never errors), so a library that adds metadata still loads unchanged."""
from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel

from gavel.errors import Location, did_you_mean, excerpt
from gavel.io.yamlsource import PathKey, YamlSource


@dataclass(frozen=True)
class FileWarning:
    """Something a file says that gavel keeps but does not read, and where: shown, never fatal."""

    message: str
    location: Location
    excerpt: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.location}: warning: {self.message}"
        if self.excerpt:
            text += "\n" + self.excerpt.rstrip("\n")
        return text + (f"\nhint: {self.hint}" if self.hint else "")


def model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model a field's type holds (itself, optional, or the items of a tuple or dict), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := model_in(a)) is not None), None)


def field_names(model: type[BaseModel], path: PathKey) -> list[str]:
    """The field names allowed at `path` below `model` (for "did you mean" on a misspelt nested field)."""
    for part in path:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        inner = model_in(info.annotation) if info else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _split(annotation: object, value: object, path: PathKey) -> tuple[object, dict[PathKey, object]]:
    """`value` of a field typed `annotation`, without the keys its models do not declare, and those keys."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return split_unknown(annotation, value, path)
    if origin is Annotated:
        return _split(args[0], value, path)
    if origin in (Union, types.UnionType):
        inner = next((a for a in args if model_in(a) is not None), None)
        return (value, {}) if inner is None else _split(inner, value, path)
    found: dict[PathKey, object] = {}
    if origin in (tuple, list) and isinstance(value, list) and args:
        items = []
        for i, item in enumerate(value):
            kept, unknown = _split(args[0], item, (*path, i))
            items.append(kept)
            found.update(unknown)
        return items, found
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        out = {}
        for key, item in value.items():
            out[key], unknown = _split(args[1], item, (*path, key))
            found.update(unknown)
        return out, found
    return value, found


def split_unknown(model: type[BaseModel], data: object, path: PathKey = ()) -> tuple[object, dict[PathKey, object]]:
    """`data` without the keys `model` (or a model in one of its fields) does not declare, and those keys by path.
    Anything that is not a mapping is returned as it is, for validation to report."""
    if not isinstance(data, dict):
        return data, {}
    known: dict[object, object] = {}
    unknown: dict[PathKey, object] = {}
    for key, value in data.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        if info is None:
            unknown[(*path, key)] = value
            continue
        known[key], found = _split(info.annotation, value, (*path, key))
        unknown.update(found)
    return known, unknown


def dotted(path: PathKey) -> str:
    return ".".join(map(str, path))


def unknown_warnings(unknown: Mapping[PathKey, object], source: YamlSource, model: type[BaseModel],
                     prefix: str = "") -> list[FileWarning]:
    """One warning per unknown key, at the key in the file, with a did-you-mean among the fields allowed there;
    `prefix` says whose key it is ("rule 'r': ")."""
    out = []
    for path in unknown:
        i = source.index(path, key=True)
        guess = did_you_mean(str(path[-1]), field_names(model, path[:-1]))
        out.append(FileWarning(f"{prefix}unknown field '{dotted(path)}' (kept, not read by gavel)",
                               source.location(i), excerpt(source.text, i),
                               f"did you mean '{guess}'?" if guess else None))
    return out


def kept(unknown: Mapping[PathKey, Any]) -> dict[str, Any]:
    """Unknown keys as kept on the object read: by dotted path (`provenance.license`), values as written."""
    return {dotted(path): value for path, value in unknown.items()}
