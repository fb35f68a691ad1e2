"""A GAVEL library folder: its manifest `gavel.yaml` (the namespace of its files), its `categories.yaml` (the only
category names its rules and rulesets may use), its rules `rules/<name>/rule.yaml` and rulesets
`rulesets/<name>.yaml`. Its `ces/` are CE data (`gavel.probes.data`); a generated `index.json` is not read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gavel.errors import RuleError, did_you_mean
from gavel.io.gavel_format import DEFAULT_NAMESPACE, Category, LibraryManifest
from gavel.io.metadata import FileWarning
from gavel.io.yamlsource import index_document, line_starts, read_yaml
from gavel.rules.located import validate
from gavel.rules.source import RuleSource

_LAYOUT = {"rule.yaml": 3, "ce.yaml": 3}  # rules/<name>/rule.yaml, ces/<name>/ce.yaml: the root is 3 levels up


@dataclass(frozen=True)
class Library:
    """One library folder, its manifest and categories read (None where the file is absent)."""

    root: Path
    manifest: LibraryManifest | None = None
    categories: tuple[str, ...] | None = None
    namespace: str = DEFAULT_NAMESPACE  # the manifest's (as written even when another of its fields is wrong)

    @property
    def rules(self) -> dict[str, Path]:
        """The library's rules by name: `rules/<name>/rule.yaml` (or `<name>/rule.yaml` in a bare rules folder)."""
        folder = self.root / "rules" if (self.root / "rules").is_dir() else self.root
        return {p.parent.name: p for p in sorted(folder.glob("*/rule.yaml"))}

    @property
    def rulesets(self) -> list[Path]:
        return sorted((self.root / "rulesets").glob("*.yaml"))

    def category_error(self, category: object, source: RuleSource, path: tuple[str | int, ...],
                       prefix: str) -> RuleError | None:
        """An error when `category` is not one of `categories.yaml` (None when it is, or there is no such file)."""
        if self.categories is None or category in self.categories:
            return None
        guess = did_you_mean(str(category), self.categories)
        return source.error(path, f"{prefix}category {category!r} is not in {self.root / 'categories.yaml'}",
                            key=False, hint=f"did you mean {guess!r}?" if guess else
                            f"known: {', '.join(self.categories)}")


def library_root(path: Path) -> Path | None:
    """The library a file is part of: by the layout (`rules/<name>/rule.yaml`, `rulesets/<name>.yaml`,
    `ces/<name>/ce.yaml`), else the nearest folder at or above it with a `gavel.yaml`."""
    up = _LAYOUT.get(path.name)
    if up is not None and path.parent.parent.name in ("rules", "ces"):
        return path.parents[up - 1]
    if path.parent.name == "rulesets" and path.suffix in (".yaml", ".yml"):
        return path.parent.parent
    start = path if path.is_dir() else path.parent
    return next((d for d in (start, *start.parents) if (d / "gavel.yaml").is_file()), None)


def _source(path: Path, errors: list[RuleError]) -> tuple[RuleSource, object] | None:
    try:
        text, node, data = read_yaml(path, RuleError)
    except RuleError as e:
        errors.append(e)
        return None
    values, keys, _ = index_document(node)
    return RuleSource(str(path), text, line_starts(text), values, keys), data


def read_library(root: Path, errors: list[RuleError], warnings: list[FileWarning]) -> Library:
    """The library at `root`: its `gavel.yaml` and `categories.yaml` when present, problems added to `errors`,
    unknown keys (kept nowhere: these files hold nothing else) to `warnings`."""
    manifest, namespace = None, DEFAULT_NAMESPACE
    read = _source(root / "gavel.yaml", errors) if (root / "gavel.yaml").is_file() else None
    if read is not None:
        source, data = read
        manifest = validate(LibraryManifest, data, source, "", errors, warnings)[0]
        written = data.get("namespace") if isinstance(data, dict) else None
        namespace = manifest.namespace if manifest else written if isinstance(written, str) else namespace
    read = _source(root / "categories.yaml", errors) if (root / "categories.yaml").is_file() else None
    if read is None:
        return Library(root, manifest, None, namespace)
    source, data = read
    if not isinstance(data, list):
        errors.append(source.error((), "categories.yaml must be a list of {name, description} entries", key=False))
        return Library(root, manifest, None, namespace)
    entries = [validate(Category, item, source.at((i,)), f"category {i}: ", errors, warnings)[0]
               for i, item in enumerate(data)]
    return Library(root, manifest, tuple(e.name for e in entries if e is not None), namespace)
