"""The windowed GRU classifier: window cutting by hand, a cross-token concept a linear probe cannot see, errors."""
import pytest
import torch

from gavel.errors import DataError, NotFittedError
from gavel.probes.linear import LinearProbe
from gavel.probes.window import WindowedGRUClassifier, assign_windows

SMALL = dict(hidden=16, epochs=15, batch_size=64, lr=1e-2)


def patterned(n_seq: int, seed: int):
    """Tokens of type A or B (one-hot + noise); CE "ab" is in a 5-token window holding A then B, "ba" B then A.

    Every token of a window carries the window's labels. Swapping A and B and reversing a window maps
    each CE's windows onto themselves, so a single token's type says nothing about either label.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 31, (n_seq,), generator=g)
    sequence = torch.repeat_interleave(torch.arange(n_seq), lengths)
    position = torch.cat([torch.arange(int(n)) for n in lengths])
    kind = torch.randint(0, 2, (len(sequence),), generator=g)          # 0 = A, 1 = B
    X = 0.3 * torch.randn(len(sequence), 4, generator=g)
    X[:, 0] += (kind == 0).float()
    X[:, 1] += (kind == 1).float()
    Y = torch.zeros(len(sequence), 2, dtype=torch.bool)
    window_key = sequence * 100 + position // 5
    for key in window_key.unique():
        rows = (window_key == key).nonzero().squeeze(1)
        text = "".join("AB"[int(kind[r])] for r in rows)
        Y[rows, 0], Y[rows, 1] = "AB" in text, "BA" in text
    perm = torch.randperm(len(sequence), generator=g)                  # row order must not matter
    return X[perm], Y[perm], sequence[perm], position[perm]


def test_windows_cut_by_hand():
    sequence = torch.tensor([0] * 12 + [1] * 3)
    position = torch.tensor([*range(12), 0, 1, 2])
    perm = torch.tensor([14, 3, 0, 11, 7, 12, 5, 9, 1, 13, 2, 10, 4, 6, 8])
    w = assign_windows(sequence[perm], position[perm], 5)
    expected = {(0, p): (p // 5, p % 5) for p in range(12)} | {(1, p): (3, p) for p in range(3)}
    for i, (s, p) in enumerate(zip(sequence[perm].tolist(), position[perm].tolist())):
        assert (int(w.token_window[i]), int(w.offset[i])) == expected[(s, p)]
    assert w.sequence.tolist() == [0, 0, 0, 1]
    assert w.start.tolist() == [0, 5, 10, 0]
    assert w.length.tolist() == [5, 5, 2, 3]


def test_windows_skip_missing_positions():
    w = assign_windows(torch.zeros(7, dtype=torch.long), torch.tensor([1, 2, 3, 5, 6, 7, 8]), 5)
    assert w.token_window.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert w.start.tolist() == [1, 7] and w.length.tolist() == [5, 2]


def test_gru_sees_cross_token_pattern_that_linear_probe_cannot():
    X, Y, seq, pos = patterned(300, seed=1)
    Xt, Yt, seqt, post = patterned(100, seed=2)
    gru = WindowedGRUClassifier(**SMALL).fit(X, Y, seq, pos, ["ab", "ba"])
    assert gru.score(Xt, Yt, seqt, post) > 0.95
    assert LinearProbe().fit(X, Y).score(Xt, Yt) < 0.6
    scores, wseq, wstart = gru.window_scores(Xt, seqt, post)
    tokens = gru.token_scores(Xt, seqt, post)
    assert scores.shape == (len(wseq), 2) and tokens.shape == (len(Xt), 2)
    first = (seqt == wseq[0]) & (post == wstart[0])
    assert torch.equal(tokens[first][0], scores[0])


def test_fit_is_deterministic_and_forgets_earlier_fits():
    X, Y, seq, pos = patterned(60, seed=3)
    params = dict(SMALL, epochs=3)
    a = WindowedGRUClassifier(**params).fit(X, Y, seq, pos).token_scores(X, seq, pos)
    b = WindowedGRUClassifier(**params).fit(X, Y, seq, pos).token_scores(X, seq, pos)
    c = WindowedGRUClassifier(**params, seed=1).fit(X, Y, seq, pos).token_scores(X, seq, pos)
    assert torch.equal(a, b) and not torch.equal(a, c)
    clf = WindowedGRUClassifier(**params).fit(X, Y, seq, pos, ["ab", "ba"])
    assert clf.fit(X, Y[:, :1], seq, pos) is clf
    assert clf.ce_names_ == ["ce0"] and clf.token_scores(X, seq, pos).shape == (len(X), 1)


def test_init_stores_params_only_and_scoring_needs_fit():
    clf = WindowedGRUClassifier(window=3, hidden=8)
    assert (clf.window, clf.hidden, clf.epochs, clf.seed) == (3, 8, 20, 0) and not hasattr(clf, "net_")
    with pytest.raises(NotFittedError, match="WindowedGRUClassifier"):
        clf.token_scores(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.arange(2))


@pytest.mark.parametrize("bad, match", [("one_class", "only negative"), ("nan", "NaN"), ("sequence", "sequence ids"),
                                        ("position", "positions"), ("duplicate", "twice"), ("float", "integer"),
                                        ("every_window", "every window")])
def test_bad_input_raises_data_error(bad, match):
    X, Y, seq, pos = patterned(20, seed=4)
    if bad == "one_class":
        Y[:, 1] = False
    elif bad == "nan":
        X[0, 0] = float("nan")
    elif bad == "sequence":
        seq = seq[:-1]
    elif bad == "position":
        pos = pos[1:]
    elif bad == "duplicate":
        pos = torch.where(pos == 1, torch.zeros_like(pos), pos)
    elif bad == "float":
        pos = pos.float()
    else:
        Y[:, 0] = pos % 5 == 0                                         # every window has a positive token
    with pytest.raises(DataError, match=match):
        WindowedGRUClassifier(epochs=1).fit(X, Y, seq, pos)


def test_scoring_checks_feature_width():
    X, Y, seq, pos = patterned(20, seed=5)
    clf = WindowedGRUClassifier(**dict(SMALL, epochs=1)).fit(X, Y, seq, pos)
    with pytest.raises(DataError, match=r"\[tokens, 4\]"):
        clf.token_scores(X[:, :3], seq, pos)


def test_save_and_load_give_the_same_scores(tmp_path):
    X, Y, seq, pos = patterned(40, seed=4)
    clf = WindowedGRUClassifier(epochs=2, hidden=8).fit(X, Y, seq, pos)
    loaded = WindowedGRUClassifier.load(clf.save(tmp_path / "gru"))
    assert loaded.get_params() == clf.get_params()
    torch.testing.assert_close(loaded.token_scores(X, seq, pos), clf.token_scores(X, seq, pos))
