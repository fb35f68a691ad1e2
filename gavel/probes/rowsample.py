"""A bounded sample of labelled training rows, kept while activations stream past batch by batch.

`fit_bank` never holds a dataset's activations: it keeps at most `max_rows` token rows (float32, at every
candidate site, the same rows at each) and fits every head on them. While the rows seen fit, all are kept, in
order, so small data fits exactly as if collected whole. Beyond that the sample is two seeded reservoirs:
positives (rows carrying any CE) and negatives, each at least half of `max_rows` when the other class has more
rows than its half. Negatives are a uniform sample; positives are weighted by their rarest CE (A-Res keys
`u ** (1 / w)`, `w = 1 / positive rows of that CE`), so a rare CE keeps its positives among common ones.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class _Pool:
    """The rows with the highest keys so far, up to a capacity that only ever shrinks (so the kept rows are
    exactly the top rows by key of everything offered)."""

    def __init__(self) -> None:
        self.keys = torch.empty(0, dtype=torch.float64)
        self.index = torch.empty(0, dtype=torch.long)
        self.labels: torch.Tensor | None = None
        self.sites: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: torch.Tensor, index: torch.Tensor, labels: torch.Tensor,
            sites: Mapping[str, torch.Tensor], capacity: int) -> None:
        held = len(self.keys)
        all_keys = torch.cat([self.keys, keys])
        if len(all_keys) <= capacity:
            old, new = torch.arange(held), torch.arange(len(keys))
        else:
            top = all_keys.topk(capacity).indices.sort().values
            old, new = top[top < held], top[top >= held] - held
        self.keys = torch.cat([self.keys[old], keys[new]])
        self.index = torch.cat([self.index[old], index[new]])
        self.labels = labels[new] if self.labels is None else torch.cat([self.labels[old], labels[new]])
        for site, rows in sites.items():     # one site at a time: the copy in flight is one site's
            self.sites[site] = rows[new] if site not in self.sites else torch.cat([self.sites[site][old], rows[new]])


class RowSample:
    """At most `max_rows` labelled rows of every site, offered batch by batch with `add`; `ce_positives` (the
    positive rows each CE will have in total) weights positives towards rare CEs."""

    def __init__(self, max_rows: int, ce_positives: torch.Tensor, seed: int = 0) -> None:
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2, not {max_rows}")
        self.max_rows = max_rows
        self.weight = 1.0 / ce_positives.double().clamp_min(1.0)       # [n_ce]
        self.generator = torch.Generator().manual_seed(seed)
        self.seen_positive = self.seen_negative = 0
        self.positives, self.negatives = _Pool(), _Pool()

    @property
    def seen(self) -> int:
        return self.seen_positive + self.seen_negative

    def __len__(self) -> int:
        return len(self.positives) + len(self.negatives)

    def add(self, sites: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Offer rows: activations [n, ...] per site and their bool labels [n, n_ce]."""
        index = torch.arange(self.seen, self.seen + len(labels))
        log_u = torch.rand(len(labels), generator=self.generator, dtype=torch.float64).clamp_min(1e-300).log()
        positive = labels.any(1)
        rarest = (labels.double() * self.weight).amax(1) if labels.shape[1] else torch.zeros(len(labels))
        keys = torch.where(positive, log_u / rarest.clamp_min(1e-300), log_u)
        self.seen_positive += int(positive.sum())
        self.seen_negative += int((~positive).sum())
        half = self.max_rows // 2
        for pool, rows, capacity in (
                (self.positives, positive, max(half, self.max_rows - self.seen_negative)),
                (self.negatives, ~positive, max(self.max_rows - half, self.max_rows - self.seen_positive))):
            pool.add(keys[rows], index[rows], labels[rows], {s: a[rows] for s, a in sites.items()}, capacity)

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each pool's rows go in arrival order."""
        rank = torch.cat([self.positives.index, self.negatives.index]).argsort().argsort()
        return rank[:len(self.positives)], rank[len(self.positives):]

    def labels(self) -> torch.Tensor:
        """Bool labels [kept, n_ce] of the kept rows, in arrival order."""
        return self._gather(self.positives.labels, self.negatives.labels)

    def site(self, site: str) -> torch.Tensor:
        """The kept rows' activations at `site`, in arrival order (the order `labels()` uses)."""
        return self._gather(self.positives.sites.get(site), self.negatives.sites.get(site))

    def _gather(self, pos: torch.Tensor | None, neg: torch.Tensor | None) -> torch.Tensor:
        where_pos, where_neg = self._order()
        parts = [(where, rows) for where, rows in ((where_pos, pos), (where_neg, neg)) if rows is not None]
        like = parts[0][1]
        out = torch.empty((len(self), *like.shape[1:]), dtype=like.dtype)
        for where, rows in parts:
            out[where] = rows
        return out
