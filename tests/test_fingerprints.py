"""What an artifact was fitted on (`FittedOn`): item digests that ignore order and whitespace, and the overlap of
evaluation data with them; the manifest field is optional, so artifacts saved before it still load."""
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gavel.artifacts import (
    MANIFEST,
    DataFingerprint,
    FittedOn,
    Manifest,
    canonical,
    item_digest,
    read_artifact,
    write_artifact,
)

words = st.text(alphabet="abcdefghij?.", min_size=1, max_size=6)
texts = st.lists(words, min_size=1, max_size=6).map(" ".join)
conversations = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": texts}), min_size=1, max_size=3)
sets = st.lists(conversations, max_size=12)


def respaced(conversation, draw_spaces):
    """The same conversation with its words joined by other runs of whitespace, and padded."""
    return [{"role": m["role"], "content": draw_spaces + draw_spaces.join(m["content"].split()) + draw_spaces}
            for m in conversation]


@given(sets, sets)
def test_disjoint_sets_do_not_overlap_and_a_set_overlaps_itself_wholly(fit, other):
    held_out = [c for c in other if item_digest(c) not in {item_digest(f) for f in fit}]
    fitted = FittedOn.of({"pos": ("a", fit)})
    assert fitted.overlap(held_out).overlapping == 0 and fitted.overlap(held_out).fit_sets == []
    itself = fitted.overlap(fit)
    assert (itself.overlapping, itself.total) == (len(fit), len(fit))
    assert itself.fit_sets == (["pos"] if fit else [])


@given(sets, sets, st.randoms())
def test_the_overlap_counts_every_shared_item_and_names_the_fit_sets(pos, neg, rng):
    fitted = FittedOn.of({"pos": ("p", pos), "neg": ("n", neg)})
    evaluated = pos[: len(pos) // 2] + neg[len(neg) // 2:]
    rng.shuffle(evaluated)
    found = fitted.overlap(evaluated)
    assert found.overlapping == found.total == len(evaluated)
    assert fitted.overlapping(evaluated) == [True] * len(evaluated)
    assert set(found.fit_sets) <= {"pos", "neg"}


@given(sets, st.randoms(), st.sampled_from([" ", "  ", "\t", "\n ", " \n\t "]))
def test_digests_ignore_order_and_whitespace(items, rng, spaces):
    shuffled = list(items)
    rng.shuffle(shuffled)
    a, b = DataFingerprint.of(items, "x"), DataFingerprint.of([respaced(c, spaces) for c in shuffled], "x")
    assert a.digest == b.digest and sorted(a.items) == sorted(b.items) and a.count == b.count == len(items)
    assert FittedOn.of({"s": ("x", items)}).overlap([respaced(c, spaces) for c in items]).overlapping == len(items)


def test_item_digests_are_16_hex_digits_and_tell_content_apart():
    one = [{"role": "user", "content": "how do i fix my bike ?"}]
    assert re.fullmatch(r"[0-9a-f]{16}", item_digest(one))
    assert item_digest(one) != item_digest([{"role": "user", "content": "how do i fix my car ?"}])
    assert item_digest(one) != item_digest([{"role": "system", "content": "how do i fix my bike ?"}])
    assert item_digest([1, 2, 3]) != item_digest([1, 2, 4])
    assert canonical((" a  b ", {"k": ("c",)})) == ["a b", {"k": ["c"]}]
    with pytest.raises(TypeError, match="cannot fingerprint"):
        canonical(object())


class ThingManifest(Manifest):
    kind: str = "thing"


def test_the_manifest_field_round_trips_and_is_optional(tmp_path):
    fitted = FittedOn.of({"benign": ("builtin:benign", [[{"role": "user", "content": "hi"}]])})
    folder = write_artifact(tmp_path / "a", ThingManifest(fitted_on=fitted), {"w": torch.zeros(2)})
    assert read_artifact(folder, ThingManifest)[0].fitted_on == fitted
    raw = json.loads((folder / MANIFEST).read_text())
    assert raw["fitted_on"]["sets"]["benign"]["count"] == 1
    del raw["fitted_on"]                                  # an artifact saved before the field existed
    (folder / MANIFEST).write_text(json.dumps(raw))
    assert read_artifact(folder, ThingManifest)[0].fitted_on is None


def test_an_estimator_keeps_what_it_was_fitted_on_until_it_is_refitted(tmp_path):
    from gavel.probes.calibration import PlattScaling

    raw, labels = torch.linspace(-2, 2, 20)[:, None], (torch.arange(20) >= 10)[:, None]
    fitted = FittedOn.of({"data": ("x.jsonl", [[i] for i in range(20)])})
    PlattScaling().fit(raw, labels).save(tmp_path / "a", fitted_on=fitted)
    loaded = PlattScaling.load(tmp_path / "a")
    assert loaded.fitted_on_ == fitted
    loaded.save(tmp_path / "b")                        # kept when saved again
    assert PlattScaling.load(tmp_path / "b").fitted_on_ == fitted
    assert not hasattr(loaded.fit(raw, labels), "fitted_on_")
    PlattScaling().fit(raw, labels).save(tmp_path / "c")
    assert not hasattr(PlattScaling.load(tmp_path / "c"), "fitted_on_")
