"""Fields the files of the public GAVEL library share (its FORMAT.md): public ids, tags, namespaces, provenance,
and the library's own files, `gavel.yaml` (the manifest) and `categories.yaml`."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, StringConstraints

NAME = r"^[A-Za-z0-9_]+$"
RESERVED_NAMESPACES = ("local", "gavel")
"""`gavel` is the public library's namespace; `local` is that of files in no library (and of none declared)."""
DEFAULT_NAMESPACE = "local"

Namespace = Annotated[str, StringConstraints(pattern=NAME)]
TAG = r"^[a-z0-9_]+(\.[a-z0-9_]+)*$"
Tag = Annotated[str, StringConstraints(pattern=TAG)]
RulePublicId = Annotated[str, StringConstraints(pattern=r"^rule_[0-9a-f]{32}$")]
CEPublicId = Annotated[str, StringConstraints(pattern=r"^ce_[0-9a-f]{32}$")]
RulesetPublicId = Annotated[str, StringConstraints(pattern=r"^ruleset_[0-9a-f]{32}$")]


def _as_text(value: object) -> object:
    """An unquoted YAML timestamp (read as a datetime) back as the ISO-8601 text it was."""
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value.isoformat() if isinstance(value, dt.date) else value


def _iso_8601(value: str) -> str:
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 date and time, like '2026-06-11T09:59:26Z'") from None
    return value


Timestamp = Annotated[str, BeforeValidator(_as_text), AfterValidator(_iso_8601)]


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Publisher(_Meta):
    """Who published an artifact on the hub."""

    username: str | None = None
    hf_handle: str | None = None


class Provenance(_Meta):
    """Who made an artifact and when it was published (rules, CEs, rulesets alike)."""

    created_by: str
    published_at: Timestamp | None = None
    publisher: Publisher | None = None


class LibraryManifest(_Meta):
    """`gavel.yaml`: the library's format version and the namespace its files are in."""

    schema_version: Literal[1] = 1
    namespace: Namespace = DEFAULT_NAMESPACE


class Category(_Meta):
    """One entry of `categories.yaml`: the only category names the library's rules and rulesets may use."""

    name: str
    description: str = ""
