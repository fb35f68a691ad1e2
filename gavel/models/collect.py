"""Activation collection over a dataset: batched, padded on either side, masks respected.

Results are flattened over real (non-padding) tokens, so a row is one token of one example. Small
collections stay in memory; pass `shard_dir` to stream safetensors shards for data larger than RAM, or
iterate batches with `iter_activations` to reduce each batch as it comes.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gavel.errors import DataError
from gavel.models.batching import Side, pad_sequences
from gavel.models.chat import Encoded
from gavel.models.handle import ModelHandle

META_KEYS = ("example", "position", "role", "token")


@dataclass(frozen=True, slots=True)
class Activations:
    """Per-site activations of N real tokens, plus which example/position/role/token each row is."""

    sites: dict[str, torch.Tensor]   # site -> [N, ...]
    example: torch.Tensor            # [N] long: index of the example in the input sequence
    position: torch.Tensor           # [N] long: token index within that example (no padding)
    role: torch.Tensor               # [N] uint8: chat role code
    token: torch.Tensor              # [N] long: token id

    def __len__(self) -> int:
        return len(self.example)

    def select(self, rows: torch.Tensor) -> Activations:
        """The subset of rows given by a bool mask or index tensor."""
        return Activations({k: v[rows] for k, v in self.sites.items()}, self.example[rows],
                           self.position[rows], self.role[rows], self.token[rows])

    @staticmethod
    def concat(parts: Sequence[Activations]) -> Activations:
        if not parts:
            raise DataError("no activations to concatenate")
        return Activations({k: torch.cat([p.sites[k] for p in parts]) for k in parts[0].sites},
                           *(torch.cat([getattr(p, m) for p in parts]) for m in META_KEYS))


class ShardedActivations:
    """Activations streamed to `dir/shard_*.safetensors`; iterate shards, or `load()` them all."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "index.json"
        if not index.exists():
            raise DataError(f"{self.directory} holds no activation shards (no index.json)")
        self.index = json.loads(index.read_text())

    def __iter__(self) -> Iterator[Activations]:
        from safetensors.torch import load_file

        for name in self.index["shards"]:
            t = load_file(self.directory / name)
            yield Activations({s: t[f"site/{s}"] for s in self.index["sites"]}, *(t[m] for m in META_KEYS))

    def load(self) -> Activations:
        return Activations.concat(list(self))


class _ShardWriter:
    def __init__(self, directory: Path, sites: Sequence[str], shard_tokens: int) -> None:
        self.directory, self.sites, self.shard_tokens = directory, list(sites), shard_tokens
        self.pending: list[Activations] = []
        self.names: list[str] = []
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, part: Activations) -> None:
        self.pending.append(part)
        if sum(len(p) for p in self.pending) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        acts = Activations.concat(self.pending)
        tensors = {f"site/{s}": acts.sites[s].contiguous() for s in self.sites}
        tensors.update({m: getattr(acts, m).contiguous() for m in META_KEYS})
        name = f"shard_{len(self.names):05d}.safetensors"
        save_file(tensors, self.directory / name)
        self.names.append(name)
        self.pending = []

    def close(self) -> ShardedActivations:
        self.flush()
        (self.directory / "index.json").write_text(json.dumps({"sites": self.sites, "shards": self.names}))
        return ShardedActivations(self.directory)


def collect_activations(handle: ModelHandle, examples: Sequence[Encoded], sites: Sequence[str], *,
                        batch_size: int = 16, padding_side: Side = "right",
                        progress: Callable[[int], None] | None = None, shard_dir: str | Path | None = None,
                        shard_tokens: int = 200_000, dtype: torch.dtype = torch.float32,
                        max_batch_tokens: int | None = None):
    """Run the model over `examples` and keep `sites` at every real token.

    Returns Activations, or ShardedActivations when `shard_dir` is given. `progress(n)` is called
    after each batch with the number of examples done in it. Batches: see `batches`.
    """
    writer = _ShardWriter(Path(shard_dir), sites, shard_tokens) if shard_dir is not None else None
    parts: list[Activations] = []
    for part in iter_activations(handle, examples, sites, batch_size=batch_size, padding_side=padding_side,
                                 progress=progress, dtype=dtype, max_batch_tokens=max_batch_tokens):
        if writer is not None:
            writer.add(part)
        else:
            parts.append(part)
    return writer.close() if writer is not None else Activations.concat(parts)


class _Collected(Exception):
    """Raised by the last site hook of a forward: every activation wanted is captured."""


def iter_activations(handle: ModelHandle, examples: Sequence[Encoded], sites: Sequence[str], *,
                     batch_size: int = 16, padding_side: Side = "right",
                     progress: Callable[[int], None] | None = None, dtype: torch.dtype = torch.float32,
                     max_batch_tokens: int | None = None) -> Iterator[Activations]:
    """One batch of `collect_activations` at a time, so a caller that reduces each batch (samples rows, scores
    them) holds one batch's activations, never the whole dataset's. `progress(n)` follows each yielded batch."""
    if not sites:
        raise DataError("collect_activations needs at least one site")
    if any(len(e.input_ids) == 0 for e in examples):
        raise DataError("an example has no tokens; drop empty texts before collecting")
    captured: dict[str, torch.Tensor] = {}

    def keep(site: str):
        def hook(act: torch.Tensor) -> None:
            captured[site] = act
            if len(captured) == len(wanted):   # the layers above the last site are not needed: stop the forward
                raise _Collected
        return hook

    wanted = set(sites)
    pad_id = handle.tokenizer.pad_token_id or 0
    with handle.hooks([(s, keep(s)) for s in sites]):
        for start, stop in batches([len(e.input_ids) for e in examples], batch_size, max_batch_tokens):
            chunk = examples[start:stop]
            ids, mask = pad_sequences([e.input_ids for e in chunk], pad_id, padding_side)
            roles, _ = pad_sequences([e.roles for e in chunk], 0, padding_side)
            captured.clear()
            with torch.no_grad(), contextlib.suppress(_Collected):
                handle.forward(ids.to(handle.device), mask.long().to(handle.device))
            rows = mask.nonzero()                                   # [N, 2]: (batch row, padded position)
            lengths = mask.sum(1)
            offset = (mask.shape[1] - lengths) if padding_side == "left" else torch.zeros_like(lengths)
            part = Activations(
                {s: captured[s][mask.to(captured[s].device)].to("cpu", dtype) for s in sites},
                rows[:, 0] + start, rows[:, 1] - offset[rows[:, 0]], roles[mask], ids[mask])
            captured.clear()
            yield part
            if progress:
                progress(len(chunk))


def batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive batches: at most `batch_size` examples and, with `max_batch_tokens`, at most
    that many padded tokens (examples x longest), so long conversations come in smaller batches and a forward's
    memory (activations, attention scores) stays bounded; one longer example is a batch of its own."""
    if batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
        raise DataError(f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}")
    start = 0
    while start < len(lengths):
        stop, longest = start + 1, lengths[start]
        while stop < len(lengths) and stop - start < batch_size:
            longer = max(longest, lengths[stop])
            if max_batch_tokens is not None and longer * (stop + 1 - start) > max_batch_tokens:
                break
            stop, longest = stop + 1, longer
        yield start, stop
        start = stop
