"""The bounded training-row sample of fit_bank: everything while it fits, then the documented allocation; the same
rows at every site; independent of how the rows are batched; rare CEs keep their positives; negatives uniform."""
import pytest
import torch

from gavel.probes.rowsample import RowSample


def _rows(n, n_ce=2, positive_every=4, seed=0):
    """n rows whose site values are their own index (so a kept row names itself) and planted labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, n_ce, dtype=torch.bool)
    labels[::positive_every, 0] = True
    labels[:, 1] = torch.rand(n, generator=g) < 0.05
    index = torch.arange(n, dtype=torch.float32)
    return {"a": index[:, None].repeat(1, 3), "b": -index[:, None]}, labels


def _offer(sample, sites, labels, batch):
    for start in range(0, len(labels), batch):
        sample.add({s: x[start:start + batch] for s, x in sites.items()}, labels[start:start + batch])
    return sample


def test_everything_is_kept_in_order_while_it_fits():
    sites, labels = _rows(300)
    sample = _offer(RowSample(300, labels.sum(0)), sites, labels, batch=37)
    assert len(sample) == sample.seen == 300
    assert torch.equal(sample.site("a"), sites["a"]) and torch.equal(sample.site("b"), sites["b"])
    assert torch.equal(sample.labels(), labels)


@pytest.mark.parametrize("n, positive_every", [(2000, 4), (2000, 1_000_000), (2000, 1)])
def test_beyond_the_cap_the_allocation_is_the_documented_one(n, positive_every):
    sites, labels = _rows(n, positive_every=positive_every)
    labels[:, 1] = False if positive_every == 1 else labels[:, 1]
    cap = 200
    sample = _offer(RowSample(cap, labels.sum(0), seed=3), sites, labels, batch=64)
    n_pos = int(labels.any(1).sum())
    n_neg = n - n_pos
    expected_pos = min(n_pos, max(cap // 2, cap - n_neg))
    expected_neg = min(n_neg, max(cap - cap // 2, cap - n_pos))
    kept = sample.site("a")[:, 0].long()
    assert len(sample) == expected_pos + expected_neg == min(cap, n)
    assert int(labels[kept].any(1).sum()) == expected_pos
    assert torch.equal(sample.labels(), labels[kept])                    # labels travel with their rows
    assert torch.equal(sample.site("b")[:, 0].long(), -kept)             # the same rows at every site
    assert bool((kept[1:] > kept[:-1]).all())                            # in arrival order


def test_batching_does_not_change_the_sample():
    sites, labels = _rows(3000)
    one = _offer(RowSample(250, labels.sum(0), seed=1), sites, labels, batch=3000)
    many = _offer(RowSample(250, labels.sum(0), seed=1), sites, labels, batch=7)
    assert torch.equal(one.site("a"), many.site("a"))
    other_seed = _offer(RowSample(250, labels.sum(0), seed=2), sites, labels, batch=7)
    assert not torch.equal(one.site("a"), other_seed.site("a"))


def test_rare_ce_keeps_its_positives():
    n = 6000
    labels = torch.zeros(n, 2, dtype=torch.bool)
    labels[: n // 2, 0] = True                    # a common CE on half the rows
    rare = torch.arange(0, n, 600)                # a rare CE on 10 rows, some of them also common ones
    labels[rare, 1] = True
    sites = {"a": torch.arange(n, dtype=torch.float32)[:, None]}
    sample = _offer(RowSample(200, labels.sum(0)), sites, labels, batch=500)
    kept = sample.site("a")[:, 0].long()
    assert set(rare.tolist()) <= set(kept.tolist())        # uniformly, about 100/3010 of them would stay


def test_negatives_are_a_uniform_sample():
    n, cap, runs = 1000, 100, 60
    labels = torch.zeros(n, 1, dtype=torch.bool)
    labels[:40, 0] = True
    counts = torch.zeros(10)
    for seed in range(runs):
        sample = _offer(RowSample(cap, labels.sum(0), seed=seed), {"a": torch.arange(n)[:, None].float()}, labels, 50)
        kept = sample.site("a")[:, 0].long()
        assert labels[kept].sum() == 40                     # every positive: they fit in their half
        counts += torch.bincount(kept[kept >= 40] * 10 // n, minlength=10)[:10]
    share = counts / counts.sum()
    # each tenth of the stream holds its share of the 960 negatives: 100 each, 60 in the first (after 40 positives)
    expected = torch.full((10,), 100 / 960)
    expected[0] = 60 / 960
    assert torch.allclose(share, expected, atol=0.02), share
