"""The GAVEL paper's CE classifier: a bidirectional GRU over non-overlapping token windows (offline only)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gavel.base import Estimator
from gavel.errors import DataError, check_is_fitted
from gavel.probes.linear import mean_auroc, validate_labelled

SCORE_CHUNK = 4096  # windows per forward pass when scoring


@dataclass(frozen=True, slots=True, eq=False)
class Windows:
    """Where each row sits (window index, slot in it) and each window's sequence, first position and length."""

    token_window: torch.Tensor  # [N] long
    offset: torch.Tensor        # [N] long: slot within the window, 0..window-1
    sequence: torch.Tensor      # [W] long: the sequence (example) of each window
    start: torch.Tensor         # [W] long: position of the window's first token
    length: torch.Tensor        # [W] long: real tokens in the window, 1..window


def assign_windows(sequence: torch.Tensor, position: torch.Tensor, window: int) -> Windows:
    """Cut each sequence's rows, in position order, into runs of `window` consecutive rows; the last may be shorter.

    Windows count the rows given: positions missing from a sequence (dropped special tokens) are skipped.
    """
    if not isinstance(window, int) or window < 1:
        raise DataError(f"window must be a positive integer, not {window!r}")
    sequence, position = torch.as_tensor(sequence), torch.as_tensor(position)
    for name, t in (("sequence", sequence), ("position", position)):
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise DataError(f"{name} must be a 1-D integer tensor, got {t.dtype} {list(t.shape)}")
    if len(sequence) != len(position):
        raise DataError(f"{len(sequence)} sequence ids but {len(position)} positions")
    if len(sequence) == 0:
        raise DataError("no tokens to cut into windows")
    if (position < 0).any():
        raise DataError("positions must be non-negative")
    sequence, position = sequence.long().cpu(), position.long().cpu()
    by_position = position.argsort(stable=True)
    order = by_position[sequence[by_position].argsort(stable=True)]
    seq, pos = sequence[order], position[order]
    if ((seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1])).any():
        raise DataError("a (sequence, position) pair occurs twice; each row must be one token")
    rank = torch.arange(len(seq)) - torch.searchsorted(seq, seq)        # index of the row within its sequence
    chunk = rank // window
    new = torch.ones(len(seq), dtype=torch.bool)
    new[1:] = (seq[1:] != seq[:-1]) | (chunk[1:] != chunk[:-1])
    window_of_sorted = new.cumsum(0) - 1
    token_window, offset = torch.empty_like(order), torch.empty_like(order)
    token_window[order], offset[order] = window_of_sorted, rank % window
    starts = new.nonzero().squeeze(1)
    return Windows(token_window, offset, seq[starts], pos[starts], torch.bincount(window_of_sorted))


class _WindowGRU(nn.Module):
    """Bidirectional GRU over a padded window, mean-pooled over its real tokens, then k logits."""

    def __init__(self, d: int, hidden: int, k: int) -> None:
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, k)

    def forward(self, x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, length.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.out(h.sum(1) / length.to(h)[:, None])


class WindowedGRUClassifier(Estimator):
    """Multi-label CE classifier on non-overlapping windows of `window` tokens, as in the GAVEL paper's code.

    Each window's standardised token features run through a small bidirectional GRU, are mean-pooled over
    the window's real tokens and mapped to k logits; a window is positive for a CE when any of its tokens
    is. Trained with Adam on BCE with per-CE `pos_weight` (negative/positive windows), no neutral class.
    Offline only: a window's score needs the whole window, so a live monitor would lag up to window-1
    tokens and show early tokens a score that saw up to window-1 tokens of their future. Not a bank Head.
    """

    def __init__(self, window: int = 5, hidden: int = 64, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0, device: str = "cpu") -> None:
        self.window = window
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def fit(self, X: torch.Tensor, Y: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor,
            ce_names: Sequence[str] | None = None) -> WindowedGRUClassifier:
        """X [N, d] token features, Y [N, k] bool labels, `sequence`/`position` [N] per row; returns self."""
        X, Y, names = validate_labelled(X, Y, ce_names)
        win = self._windows(X, sequence, position)
        X = X.to(self.device, torch.float32)
        mean, std = X.mean(0), X.std(0).clamp_min(1e-6)
        Xw = self._windowed(X, win, mean, std)
        Yw = torch.zeros(len(win.length), Y.shape[1]).index_add_(0, win.token_window, Y.float()).gt(0).float()
        pos = Yw.sum(0)
        for name, p in zip(names, pos.tolist()):
            if p == len(Yw):
                raise DataError(f"CE {name!r} is present in every window; an extractor needs negative windows")
        Yw = Yw.to(self.device)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=((len(Yw) - pos) / pos).to(self.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = _WindowGRU(X.shape[1], self.hidden, Y.shape[1]).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        shuffle = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(Yw), generator=shuffle).split(self.batch_size):
                opt.zero_grad()
                loss_fn(net(Xw[idx], win.length[idx]), Yw[idx]).backward()
                opt.step()
        self.net_ = net.eval()
        self.mean_, self.std_ = mean, std
        self.ce_names_ = names
        self.n_features_in_ = X.shape[1]
        return self

    def _build_module(self, name: str) -> nn.Module:
        return _WindowGRU(self.n_features_in_, self.hidden, len(self.ce_names_)).to(self.device)

    def window_scores(self, X: torch.Tensor, sequence: torch.Tensor,
                      position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [n_windows, k], and each window's sequence id and first position [n_windows]."""
        scores, win = self._score(X, sequence, position)
        return scores, win.sequence, win.start

    def token_scores(self, X: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits [N, k]: each row gets its window's score, so token metrics and sequence maxima apply unchanged."""
        scores, win = self._score(X, sequence, position)
        return scores[win.token_window]

    def score(self, X: torch.Tensor, Y: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> float:
        """Mean token AUROC over CEs."""
        return mean_auroc(self.token_scores(X, sequence, position), Y)

    @torch.no_grad()
    def _score(self, X: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, Windows]:
        check_is_fitted(self, ("net_",))
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise DataError(f"expected activations [tokens, {self.n_features_in_}], got shape {tuple(X.shape)}")
        win = self._windows(X, sequence, position)
        Xw = self._windowed(X.to(self.device, torch.float32), win, self.mean_, self.std_)
        scores = [self.net_(Xw[i:i + SCORE_CHUNK], win.length[i:i + SCORE_CHUNK]).cpu()
                  for i in range(0, len(Xw), SCORE_CHUNK)]
        return torch.cat(scores), win

    def _windows(self, X: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> Windows:
        if len(sequence) != len(X) or len(position) != len(X):
            raise DataError(f"{len(X)} activation rows but {len(sequence)} sequence ids and {len(position)} positions")
        return assign_windows(sequence, position, self.window)

    def _windowed(self, X: torch.Tensor, win: Windows, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Standardised features laid out as [n_windows, window, d], zero-padded after a short window."""
        out = torch.zeros(len(win.length), self.window, X.shape[1], device=X.device)
        out[win.token_window.to(X.device), win.offset.to(X.device)] = (X - mean) / std
        return out
