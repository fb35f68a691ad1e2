"""The one artifact contract: a folder holding `manifest.json` and `tensors.safetensors`.

Every saved thing (CE bank, steering plane, neuron set, weight delta, alignment, DeconIEP generator, fitted
estimator) is such a folder. Its manifest (a pydantic model deriving from `Manifest`) names the kind and format
version, the fingerprint of the model it was made for, its provenance and the sha256 of every tensor. `write_artifact`
and `read_artifact` are the only code that touches these files: a missing or malformed manifest, another kind or
version, a tensor that does not match its digest, or (unless forced) another model is refused with one
`ArtifactError` naming the folder and the field. Never pickle.

A manifest may also record what the artifact was fitted on (`fitted_on`: per named set, a digest of each item), so
an evaluation can tell whether its data is held out (`FittedOn.overlap`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gavel.errors import ArtifactError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class ModelFingerprint(BaseModel):
    """Name, architecture, sizes and a hash of some weights: enough to tell two models apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    architecture: str
    d_model: int
    n_layers: int
    weights_sha256: str

    def check(self, other: ModelFingerprint, what: str = "artifact") -> None:
        """ArtifactError naming the first field where `other` (the live model) differs."""
        for field in ("architecture", "d_model", "n_layers", "weights_sha256"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise ArtifactError(
                    f"{what} was made for model {self.name!r} but is being used with {other.name!r}: "
                    f"{field} is {mine!r} in the {what}, {theirs!r} in the model",
                    hint="fit it again on this model, or pass --force if you know they are compatible")


ITEM_DIGEST_LENGTH = 16   # hex digits kept of each item's sha256


def canonical(item: Any) -> Any:
    """An item as plain JSON values, so that the same data always digests alike: text with its runs of whitespace
    made single spaces and its ends stripped, mappings with string keys, sequences as lists. Conversations
    (lists of {role, content}), problems (their question) and token ids all come out as such values."""
    if isinstance(item, str):
        return " ".join(item.split())
    if isinstance(item, Mapping):
        return {str(k): canonical(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [canonical(v) for v in item]
    if item is None or isinstance(item, (bool, int, float)):
        return item
    raise TypeError(f"cannot fingerprint a {type(item).__name__}: give text, numbers, lists or mappings")


def item_digest(item: Any) -> str:
    """The first 16 hex digits of the sha256 of the item's canonical JSON (keys sorted)."""
    text = json.dumps(canonical(item), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:ITEM_DIGEST_LENGTH]


class DataFingerprint(BaseModel):
    """One named set of data an artifact was fitted on: where it came from (as the user named it), how many items,
    each item's digest (in order) and a digest of the set (of its sorted item digests: order does not change it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = ""
    count: int
    digest: str
    items: list[str]

    @classmethod
    def of(cls, items: Iterable[Any], source: str = "") -> DataFingerprint:
        digests = [item_digest(item) for item in items]
        whole = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
        return cls(source=source, count=len(digests), digest=whole, items=digests)


class SetOverlap(BaseModel):
    """How many of an evaluation set's items an artifact was fitted on, and in which of its fit sets they were."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    overlapping: int
    total: int
    fit_sets: list[str] = []


class FittedOn(BaseModel):
    """What an artifact was fitted on: its data sets by name (the fitting command's option: pos, neg, benign, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sets: dict[str, DataFingerprint]

    @classmethod
    def of(cls, sets: Mapping[str, tuple[str, Iterable[Any]]]) -> FittedOn:
        """From {set name: (source, items)}."""
        return cls(sets={name: DataFingerprint.of(items, source) for name, (source, items) in sets.items()})

    def overlap(self, items: Iterable[Any]) -> SetOverlap:
        """How many of `items` (counted with repeats) are items of any fit set, and which sets those are."""
        digests = [item_digest(item) for item in items]
        seen = {name: set(s.items) for name, s in self.sets.items()}
        shared = [d for d in digests if any(d in s for s in seen.values())]
        return SetOverlap(overlapping=len(shared), total=len(digests),
                          fit_sets=[name for name, s in seen.items() if s.intersection(shared)])

    def overlapping(self, items: Iterable[Any]) -> list[bool]:
        """Per item: whether it is an item of any fit set."""
        fit = set().union(*(s.items for s in self.sets.values()))
        return [item_digest(item) in fit for item in items]


class Manifest(BaseModel):
    """What every artifact's manifest holds; each kind derives from it, fixing `kind` and adding its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")
    format_version: int = FORMAT_VERSION
    kind: str
    fingerprint: ModelFingerprint | None = None     # the model it was made for (None: not tied to one)
    provenance: dict[str, str] = {}
    fitted_on: FittedOn | None = None               # the data it was fitted on (None: not recorded)
    tensors: dict[str, str] = {}                    # tensor name -> sha256 (filled in by write_artifact)


M = TypeVar("M", bound=Manifest)


def kind_of(manifest_type: type[Manifest]) -> str:
    """The kind a manifest class declares (its `kind` field's default)."""
    default = manifest_type.model_fields["kind"].default
    if not isinstance(default, str):
        raise TypeError(f"{manifest_type.__name__} declares no default kind")
    return default


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the host)."""
    import torch

    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def write_artifact(directory: str | os.PathLike[str], manifest: Manifest,
                   tensors: Mapping[str, torch.Tensor]) -> Path:
    """Save `tensors` (any device, contiguous copies are made on the host) and `manifest`, with each tensor's
    digest, into `directory` (created if needed); the manifest is written last, so a folder with one is whole."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(host, d / TENSORS)
    complete = manifest.model_copy(update={"tensors": {name: tensor_sha256(t) for name, t in host.items()}})
    (d / MANIFEST).write_text(complete.model_dump_json(indent=2) + "\n")
    return d


def describe(kind: str) -> str:
    """A kind in words, with its article: "ce_bank" -> "a ce bank", "input_perturbation" -> "an input perturbation"."""
    words = kind.replace("_", " ")
    return ("an " if words[:1] in "aeiou" else "a ") + words


def read_manifest(directory: str | os.PathLike[str], manifest_type: type[M], *, kind: str | None = None,
                  what: str | None = None, hint: str | None = None) -> M:
    """The validated manifest of the artifact in `directory`, which must be of `kind` (default: the one
    `manifest_type` declares) and of this gavel's format version; `what` names it in errors (default: its kind)."""
    d = Path(directory)
    want = kind or kind_of(manifest_type)
    what = what or describe(want)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} is not {what} (no {MANIFEST})", hint=hint)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: a manifest is a JSON object, not {type(raw).__name__}")
    if raw.get("kind") != want:
        found = describe(str(raw["kind"])) if raw.get("kind") else "an artifact of no kind"
        raise ArtifactError(f"{d} holds {found}, not {what}", hint=hint)
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {raw.get('format_version')!r} is not supported "
                            f"(this gavel reads {FORMAT_VERSION})", hint=hint)
    try:
        return manifest_type.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ArtifactError(f"{path}: invalid manifest of {what}: field {field}: {err['msg']}") from None


def read_artifact(directory: str | os.PathLike[str], manifest_type: type[M], *, kind: str | None = None,
                  what: str | None = None, fingerprint: ModelFingerprint | None = None, force: bool = False,
                  hint: str | None = None) -> tuple[M, dict[str, torch.Tensor]]:
    """An artifact's manifest and tensors (on the host). Refused: see `read_manifest`; tensors that are missing,
    unreadable or not the ones the manifest's digests name; and, with the live model's `fingerprint`, an artifact
    made for another model (or for no model), unless `force`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = read_manifest(d, manifest_type, kind=kind, what=what, hint=hint)
    words = (what or describe(manifest.kind)).split(" ", 1)[1]
    if fingerprint is not None and not force:
        if manifest.fingerprint is None:
            raise ArtifactError(f"{words} {d} records no model fingerprint, so it cannot be checked against "
                                f"{fingerprint.name!r}", hint="pass --force (force=True) if you know it fits")
        manifest.fingerprint.check(fingerprint, what=f"{words} {d}")
    path = d / TENSORS
    if not path.is_file():
        raise ArtifactError(f"{d} is not a whole {words} (no {TENSORS})")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable tensors ({e})") from None
    if set(tensors) != set(manifest.tensors):
        missing, extra = sorted(set(manifest.tensors) - set(tensors)), sorted(set(tensors) - set(manifest.tensors))
        raise ArtifactError(f"{path} does not hold the tensors {MANIFEST} lists (missing: {missing or 'none'}; "
                            f"not listed: {extra or 'none'})")
    for name, t in tensors.items():
        if tensor_sha256(t) != manifest.tensors[name]:
            raise ArtifactError(f"{path}: tensor {name!r} does not match its sha256 in {MANIFEST} "
                                "(the file was changed or damaged after it was saved)")
    return manifest, tensors
