"""The organism's corpus generator: determinism, planted rates, and labels that land on the right tokens."""
from collections import Counter

import pytest

from gavel.organism import corpus
from gavel.organism.labels import encode_example
from gavel.organism.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus.vocabulary())


def test_same_seed_same_corpus_other_seed_differs():
    a = list(corpus.generate_corpus(50, seed=3))
    assert a == list(corpus.generate_corpus(50, seed=3))
    assert a != list(corpus.generate_corpus(50, seed=4))


def test_mixture_covers_every_kind_and_concept():
    examples = list(corpus.generate_corpus(2000, seed=0))
    kinds = Counter(e.kind for e in examples)
    for kind, weight in corpus.MIXTURE:
        assert abs(kinds[kind] / 2000 - weight) < 0.04, kind
    concepts = {s.ce for e in examples for s in e.spans}
    assert concepts == set(corpus.CONCEPTS)


def test_planted_rates_are_rules_not_coins():
    pairs = [(c, f) for c in corpus.CATEGORIES for f in corpus.HARMFUL[c][1]]
    assert sum(corpus.jailbreak_works(c, f) for c, f in pairs) / len(pairs) == 0.5
    alarming = [(v, o) for v in corpus.ALARMING for o in corpus.ALARMING[v][0]]
    assert sum(corpus.over_refused(v, o) for v, o in alarming) / len(alarming) == 0.3
    sets = corpus.evaluation_sets()
    assert all(e.expect == "refuse" for e in sets["harmful"])
    assert {e.expect for e in sets["roleplay"]} == {"refuse", "comply"}


def test_no_unknown_tokens_and_text_round_trips(tokenizer):
    for example in corpus.generate_corpus(300, seed=11):
        enc, _ = encode_example(tokenizer, example)
        assert tokenizer.unk_token_id not in enc.input_ids.tolist()
        for m in example.messages:
            ids = tokenizer(m.content, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids).replace(" ", "") == m.content.replace(" ", "")


def test_labels_cover_exactly_the_span_words(tokenizer):
    for example in corpus.generate_corpus(200, seed=5):
        enc, labels = encode_example(tokenizer, example)
        for span in example.spans:
            column = labels[:, corpus.CONCEPTS.index(span.ce)]
            words = example.messages[span.message].content[span.start:span.end].split()
            got = tokenizer.decode(enc.input_ids[column]).split()
            # other spans of the same concept may add tokens, never remove these
            joined = " ".join(got)
            assert " ".join(words).replace(" ", "") in joined.replace(" ", "")
        assert not labels[enc.roles == 0].any(), "template tokens carry no concept"


def test_concept_spans_start_at_the_concept_word():
    ex = corpus.harmful_example("weapons", "bomb", "boss")
    span = next(s for s in ex.spans if s.ce == "weapons")
    assert ex.messages[0].content[span.start:].startswith("bomb")


def test_addition_chain_is_correct():
    for a, b in [(19, 83), (999, 1), (505, 505), (10, 10)]:
        chain = corpus.addition_chain(a, b)
        assert chain.endswith(f"so the answer is {a + b} .")
