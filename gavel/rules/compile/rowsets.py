"""The rows (batch x token) a chunk evaluates: on the CPU only those where some input changes, every other row
repeating the evaluated row before it (`RowSet`)."""
from __future__ import annotations

import torch
from torch import Tensor

from gavel.rules.compile import kernels


class RowSet:
    """The rows (batch x token) a chunk evaluates its gates on. Gates are functions of the current token's atoms
    and window outputs, so on the CPU only the rows where one of those changed are evaluated (with the first token
    of each sequence); every other row repeats the row before it. `sparse=False` evaluates every row (no host
    sync: the path for accelerators and single tokens)."""

    def __init__(self, batch: int, length: int, sparse: bool) -> None:
        self.batch, self.length, self.sparse = batch, length, sparse
        self.changed: Tensor | None = None
        self._index: Tensor | None = None
        self._position: Tensor | None = None

    def note_changes(self, columns: Tensor) -> None:
        """Add the rows where any of `columns` ([rows, k] or [B, T, k]) differs from the token before."""
        if not self.sparse:
            return
        grid = _words(columns.reshape(self.batch, self.length, -1))
        changed = torch.ones(self.batch, self.length, dtype=torch.bool, device=columns.device)
        changed[:, 1:] = (grid[:, 1:] != grid[:, :-1]).any(-1)
        self.note(changed)

    def note(self, rows: Tensor) -> None:
        """Add the rows where bool `rows` [B, T] holds."""
        if not self.sparse:
            return
        self.changed = rows.reshape(-1) if self.changed is None else self.changed | rows.reshape(-1)
        self._index = self._position = None

    @property
    def index(self) -> Tensor:
        """long [n]: the evaluated rows."""
        if self._index is None:
            assert self.changed is not None   # rows are noted (`note_changes`) before they are read
            self._index = self.changed.nonzero().squeeze(1)
        return self._index

    @property
    def position(self) -> Tensor:
        """long [rows]: the evaluated row each row repeats."""
        if self._position is None:
            assert self.changed is not None   # rows are noted (`note_changes`) before they are read
            self._position = self.changed.long().cumsum(0) - 1
        return self._position

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Evaluated-row positions of each sequence's first and last token."""
        starts = torch.arange(self.batch, device=self.position.device) * self.length
        return self.position.index_select(0, starts), self.position.index_select(0, starts + self.length - 1)

    def segments(self, view: Tensor) -> tuple[kernels.Segments, Tensor]:
        """The evaluated rows as runs of a view (bool [rows]), and which evaluated rows are in it."""
        index = self.index
        sequence = index // self.length
        following = torch.empty_like(index)
        following[:-1] = index[1:]
        following[-1:] = self.batch * self.length
        length = torch.minimum(following, (sequence + 1) * self.length) - index
        inside = view.index_select(0, index)
        counted = length * inside
        through = counted.cumsum(0)
        before = through - counted
        firsts, lasts = self.bounds()
        base = before.index_select(0, firsts)
        start = before - base.index_select(0, sequence)
        runs = kernels.Segments(sequence[inside], start[inside], length[inside], index[inside],
                                through.index_select(0, lasts) - base)
        return runs, inside

    def add(self, new_rows: Tensor) -> Tensor:
        """Evaluate `new_rows` too; returns, for each evaluated row, the previously evaluated row whose values
        it starts from."""
        before = self.position
        assert self.changed is not None   # reading `position` needed it
        self.changed = self.changed.clone()
        self.changed[new_rows] = True
        self._index = self._position = None
        return before.index_select(0, self.index)

    def take_grid(self, grid: Tensor) -> Tensor:
        """The evaluated rows of a [B, T, k] tensor, as [n, k] (no copy of the whole grid)."""
        if not self.sparse:
            return grid.reshape(self.batch * self.length, -1)
        return grid[self.index // self.length, self.index % self.length]

    def take(self, full: Tensor) -> Tensor:
        """The evaluated rows of a full [rows, k] tensor."""
        return full if not self.sparse else full.index_select(0, self.index)

    def expand_into(self, taken: Tensor, out: Tensor) -> None:
        """Write `full(taken)` into `out` ([B, T, k]; contiguous or not)."""
        flat = out.view(self.batch * self.length, -1) if out.is_contiguous() else None
        if not self.sparse:
            out.copy_(taken.view(out.shape))
        elif flat is not None:
            torch.index_select(taken, 0, self.position, out=flat)
        else:
            out.copy_(taken.index_select(0, self.position).view(out.shape))

    def full(self, taken: Tensor) -> Tensor:
        """A full [rows, k] tensor from its evaluated rows (each row repeats the last evaluated one)."""
        return taken if not self.sparse else taken.index_select(0, self.position)

    def grow(self, new_columns: list[Tensor]) -> Tensor | None:
        """Also evaluate the rows where `new_columns` (full [rows, k]) change; returns what `add` does (None
        when every row is evaluated anyway)."""
        if not self.sparse:
            return None
        before = self.position
        self.note_changes(torch.cat(new_columns, dim=1))
        return before.index_select(0, self.index)


def any_last(x: Tensor) -> Tensor:
    """`x.any(-1)` for bool x, a word at a time."""
    words = _words(x)
    return words.any(-1) if words.dtype == torch.bool else (words != 0).any(-1)


def _words(x: Tensor) -> Tensor:
    """A bool/0-1 [..., k] tensor's last dim as few wide integers (cheap to compare for any difference)."""
    if x.dtype != torch.bool:
        x = x != 0
    x = x.contiguous().view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if x.shape[-1] % size == 0:
            return x.view(dtype)
    return x

