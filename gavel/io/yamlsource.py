"""YAML read with positions: the data `yaml.safe_load` gives plus where every value and key sits in the file,
so errors in rule packs and CE files can name the file, line and column."""
from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import yaml

from gavel.errors import GavelError, Location, excerpt

PathKey = tuple[str | int, ...]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same safe semantics, 10x faster


def line_starts(text: str) -> list[int]:
    """The index where each line of `text` starts."""
    return [0, *(m.end() for m in re.finditer("\n", text))]


def read_yaml(path: Path, error: type[GavelError] = GavelError) -> tuple[str, yaml.Node | None, object]:
    """File text, composed node tree and data (exactly `yaml.safe_load`'s), or a located `error`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path.name}: {e}", location=Location(str(path))) from None
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise error(f"invalid YAML: {e.problem or e.context}",
                    location=Location(str(path), mark.line + 1, mark.column + 1) if mark else Location(str(path)),
                    excerpt=excerpt(text, mark.index) if mark else None) from None
    except yaml.YAMLError as e:
        raise error(f"invalid YAML: {e}", location=Location(str(path))) from None
    finally:
        loader.dispose()
    return text, node, data


def index_nodes(node: yaml.Node, path: PathKey, values: dict[PathKey, int], keys: dict[PathKey, int],
                duplicates: list[tuple[str, int]]) -> None:
    """Record the character index of every value and mapping key under `node`, and any duplicated keys."""
    values[path] = node.start_mark.index
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            sub = (*path, key_node.value)
            if sub in keys:
                duplicates.append((key_node.value, key_node.start_mark.index))
                continue
            keys[sub] = key_node.start_mark.index
            index_nodes(value_node, sub, values, keys, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index_nodes(item, (*path, i), values, keys, duplicates)


def index_document(node: yaml.Node | None) -> tuple[dict[PathKey, int], dict[PathKey, int], list[tuple[str, int]]]:
    """(value positions, key positions, duplicated keys) of a whole document; empty for an empty file."""
    values: dict[PathKey, int] = {}
    keys: dict[PathKey, int] = {}
    duplicates: list[tuple[str, int]] = []
    if node is not None:
        index_nodes(node, (), values, keys, duplicates)
    return values, keys, duplicates


S = TypeVar("S", bound="YamlSource")


@dataclass(frozen=True, slots=True)
class YamlSource:
    """A YAML (or .gvl) file: its text, the index of each value and key, and of each character of its string values.

    `values`, `keys` and `scalars` cover the whole document; paths given to the methods are relative to `base`
    (the node this source stands for: `("rules", 2)` for the third rule of a pack, `()` for the file).
    """

    path: str
    text: str = field(repr=False)
    lines: Sequence[int] = field(repr=False)  # index where each line starts, shared by every rule of one file
    values: Mapping[PathKey, int] = field(repr=False)
    keys: Mapping[PathKey, int] = field(repr=False)
    # per string value: the index of each of its characters, and one past its end
    scalars: Mapping[PathKey, tuple[int, ...]] | None = field(default=None, repr=False)
    base: PathKey = ()

    error_type: ClassVar[type[GavelError]] = GavelError   # what `error` raises

    def at(self: S, base: PathKey) -> S:
        """The same file seen from the node at `base` (a path from the document root)."""
        return dataclasses.replace(self, base=base)

    def location(self, index: int) -> Location:
        line = bisect.bisect_right(self.lines, index)
        return Location(self.path, line, index - self.lines[line - 1] + 1)

    def index(self, path: PathKey, *, key: bool = False) -> int:
        """Index of the deepest known node on `path` (the key itself when `key` and it is known)."""
        full = (*self.base, *path)
        for n in range(len(full), -1, -1):
            if key and full[:n] in self.keys:
                return self.keys[full[:n]]
            if full[:n] in self.values:
                return self.values[full[:n]]
        return 0

    def char_index(self, path: PathKey, offset: int) -> int | None:
        """Index in the file of character `offset` of the string at `path`; None when it is not mapped."""
        chars = (self.scalars or {}).get((*self.base, *path))
        return None if chars is None else chars[max(0, min(offset, len(chars) - 1))]

    def error(self, path: PathKey, message: str, *, key: bool = True, hint: str | None = None) -> GavelError:
        """An `error_type` error at a field (its key when `key`), with the file line and a caret."""
        i = self.index(path, key=key)
        return self.error_type(message, location=self.location(i), excerpt=excerpt(self.text, i), hint=hint)
