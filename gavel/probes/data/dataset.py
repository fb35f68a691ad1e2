"""The CE dataset: tokenized examples with a bool [T, n_ces] label matrix each, and its split/select/merge/digest."""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from gavel.errors import DataError, did_you_mean
from gavel.models.chat import Encoded


@dataclass(frozen=True, slots=True)
class CEInfo:
    """A CE's metadata, carried into the CE bank manifest (GAVEL `ce.yaml` fields)."""

    name: str
    title: str = ""
    role: str | None = None  # GAVEL role: directive_to_user | llm_task | llm_behavior | topic
    definition: str = ""


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: identity, as tensors have no truth value
class LabelledExample:
    """One tokenized example; `labels[t, j]` says token t carries CE j."""

    encoded: Encoded
    labels: torch.Tensor  # bool [T, n_ces]
    source: str = ""      # where it came from: "file.jsonl:12", "ces/tax/excitation.json#3"


@dataclass(frozen=True, eq=False)
class CEDataset:
    """Labelled examples over a fixed, ordered set of CEs (the label columns)."""

    ces: tuple[CEInfo, ...]
    examples: tuple[LabelledExample, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.ces]
        if len(set(names)) != len(names):
            raise DataError(f"duplicate CE names in dataset: {sorted({n for n in names if names.count(n) > 1})}")
        for e in self.examples:
            shape = (len(e.encoded.input_ids), len(names))
            if e.labels.dtype != torch.bool or tuple(e.labels.shape) != shape:
                raise DataError(f"{e.source or 'an example'}: labels must be bool {list(shape)}, "
                                f"got {e.labels.dtype} {list(e.labels.shape)}")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.ces)

    def split(self, fractions: Sequence[float], seed: int = 0) -> tuple[CEDataset, ...]:
        """Disjoint parts by whole example (seeded shuffle, largest-remainder sizes); each keeps every CE."""
        if not fractions or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise DataError(f"split fractions must be positive and sum to 1, got {list(fractions)}")
        n = len(self.examples)
        sizes = [math.floor(f * n) for f in fractions]
        by_remainder = sorted(range(len(fractions)), key=lambda i: (sizes[i] - fractions[i] * n, i))
        for i in by_remainder[:n - sum(sizes)]:
            sizes[i] += 1
        order = list(range(n))
        random.Random(seed).shuffle(order)
        parts, at = [], 0
        for size in sizes:
            chosen = sorted(order[at:at + size])
            parts.append(CEDataset(self.ces, tuple(self.examples[i] for i in chosen)))
            at += size
        return tuple(parts)

    def select(self, names: Iterable[str]) -> CEDataset:
        """The same examples with only the CE columns `names`, in that order."""
        names = list(names)
        known = self.names
        for name in names:
            if name not in known:
                guess = did_you_mean(name, known)
                raise DataError(f"unknown CE {name!r}; the dataset has {', '.join(known)}",
                                hint=f"did you mean {guess!r}?" if guess else None)
        cols = [known.index(n) for n in names]
        return CEDataset(tuple(self.ces[j] for j in cols),
                         tuple(replace(e, labels=e.labels[:, cols]) for e in self.examples))

    @staticmethod
    def merge(*datasets: CEDataset) -> CEDataset:
        """All examples of all datasets over the union of their CEs (False where a dataset lacks a CE)."""
        infos: dict[str, CEInfo] = {}
        for d in datasets:
            for c in d.ces:
                infos[c.name] = _merge_info(infos[c.name], c) if c.name in infos else c
        names = list(infos)
        examples = []
        for d in datasets:
            cols = torch.tensor([names.index(n) for n in d.names], dtype=torch.long)
            for e in d.examples:
                labels = torch.zeros(len(e.labels), len(names), dtype=torch.bool)
                labels[:, cols] = e.labels
                examples.append(replace(e, labels=labels))
        return CEDataset(tuple(infos.values()), tuple(examples))

    def digest(self) -> str:
        """sha256 over CE names, token ids and labels: the training-data digest stored in CE banks."""
        h = hashlib.sha256("\n".join(self.names).encode() + b"\0")
        for e in self.examples:
            h.update(len(e.labels).to_bytes(8, "little"))
            h.update(e.encoded.input_ids.to(torch.int64).numpy().astype("<i8").tobytes())
            h.update(e.labels.to(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def support(self) -> dict[str, tuple[int, int]]:
        """Per CE: (positive tokens, examples with at least one positive token)."""
        if not self.examples:
            return {n: (0, 0) for n in self.names}
        tokens = torch.stack([e.labels.sum(0) for e in self.examples]).sum(0)
        examples = torch.stack([e.labels.any(0) for e in self.examples]).sum(0)
        return {n: (int(tokens[j]), int(examples[j])) for j, n in enumerate(self.names)}


def _merge_info(a: CEInfo, b: CEInfo) -> CEInfo:
    """One CE's metadata from two datasets: the first's fields, filled in from the second; roles must agree."""
    if a.role and b.role and a.role != b.role:
        raise DataError(f"CE {a.name!r} has role {a.role!r} in one dataset and {b.role!r} in another")
    return CEInfo(a.name, a.title or b.title, a.role or b.role, a.definition or b.definition)
