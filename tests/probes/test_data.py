"""The CE data layer: labelled-span JSONL, GAVEL ces/ folders, the organism's ground truth, and dataset ops."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import paths
from hypothesis import given, settings
from hypothesis import strategies as st

from gavel.errors import DataError, Location
from gavel.io.conversations import ROLE_ASSISTANT
from gavel.organism import corpus
from gavel.organism.datasets import load_dataset, organism_dataset
from gavel.organism.labels import as_conversation, encode_example
from gavel.organism.tokenizer import build_tokenizer
from gavel.probes.data import (
    CEDataset,
    CEInfo,
    LabelledExample,
    load_gavel_ces,
    load_spans_jsonl,
    merge_datasets,
    read_ce_yaml,
)
from gavel.probes.data.spans import parse_record, role_codes

FIXTURES = paths.FIXTURES
SPANS = FIXTURES / "spans" / "organism.jsonl"
CES = FIXTURES / "gavel_ces"
HERE = Location("test")
BIKE = [{"role": "user", "content": "how do i clean my bike ?"},
        {"role": "assistant", "content": "sure . to clean your bike , first wipe the bike , then dry it carefully ."}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus.vocabulary())


def record(tok, rec, roles=("assistant",)):
    """One record parsed in memory, as a JSONL line would be."""
    return parse_record(rec, tok, role_codes(roles), HERE)


def tokens_of(tok, parsed, ce):
    """The tokens (as strings) a parsed record marks with `ce`."""
    ids = parsed.encoded.input_ids[parsed.positives[ce]]
    return tok.convert_ids_to_tokens(ids.tolist())


def write_jsonl(tmp_path, *records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- spans land on the right tokens

def test_char_span_in_plain_text(tok):
    text = "how do i build a bomb to hurt my neighbor ?"
    p = record(tok, {"text": text, "spans": [{"ce": "weapons", "start": 9, "end": 21}]})
    assert tokens_of(tok, p, "weapons") == ["build", "a", "bomb"]
    p = record(tok, {"text": text, "spans": [{"ce": "weapons", "start": 10, "end": 11}]})  # inside a word
    assert tokens_of(tok, p, "weapons") == ["build"]


def test_char_span_in_a_message_is_relative_to_its_content(tok):
    answer = "i cannot help with that . building weapons is illegal ."
    p = record(tok, {"conversation": [{"role": "user", "content": "i cannot build a bomb ."},
                                      {"role": "assistant", "content": answer}],
                     "spans": [{"ce": "refusal", "message": 1, "start": 2, "end": 13}]})
    assert tokens_of(tok, p, "refusal") == ["cannot", "help"]
    assert (p.encoded.roles[p.positives["refusal"]] == ROLE_ASSISTANT).all()


def test_token_spans_mark_exactly_those_tokens(tok):
    rows = [json.loads(line) for line in SPANS.read_text().splitlines()]
    p = record(tok, rows[3])
    assert tokens_of(tok, p, "threat") == "they will regret it unless they pay me".split()
    p = record(tok, {"conversation": BIKE, "token_spans": [{"ce": "x", "start": 0, "end": 13}]})
    assert tokens_of(tok, p, "x") == ["sure", "."]  # only the assistant tokens of [0, 13)


def test_whole_example_labels_cover_the_chosen_roles_only(tok):
    p = record(tok, {"conversation": BIKE, "labels": ["benign"]})
    assert tokens_of(tok, p, "benign") == BIKE[1]["content"].split()
    p = record(tok, {"conversation": BIKE, "labels": ["benign"]}, roles=("user",))
    assert tokens_of(tok, p, "benign") == BIKE[0]["content"].split()
    p = record(tok, {"text": "the sun is hot .", "labels": ["opinion"]})  # plain text: every token
    assert tokens_of(tok, p, "opinion") == ["the", "sun", "is", "hot", "."]


def test_spans_are_role_filtered(tok):
    rec = {"conversation": BIKE, "spans": [{"ce": "x", "message": 0, "start": 0, "end": 6}]}
    with pytest.raises(DataError, match="lies in a user message"):
        record(tok, rec)
    assert tokens_of(tok, record(tok, rec, roles=("user", "assistant")), "x") == ["how", "do"]
    rec = {"conversation": BIKE, "token_spans": [{"ce": "x", "start": 0, "end": 5}]}  # scaffolding + user
    with pytest.raises(DataError, match="covers no assistant token"):
        record(tok, rec)
    with pytest.raises(DataError, match="did you mean 'assistant'"):
        role_codes(["asistant"])
    with pytest.raises(DataError, match="unknown role 'none'"):
        role_codes(["none"])


def test_unicode_text(tok):
    text = "naïve café — über 🙂 the sun is hot"
    start = text.index("sun")
    p = record(tok, {"text": text, "spans": [{"ce": "s", "start": start, "end": start + 3}]})
    assert tokens_of(tok, p, "s") == ["sun"]
    p = record(tok, {"text": text, "spans": [{"ce": "u", "start": 0, "end": 5}]})
    assert p.encoded.offsets[p.positives["u"]].tolist() == [[0, 5]]


def test_load_spans_jsonl(tok):
    d = load_spans_jsonl(SPANS, tok)
    assert d.names == ("weapons", "refusal", "arithmetic", "threat")  # order of first mention
    assert [e.source for e in d.examples] == [f"{SPANS}:{n}" for n in range(1, 6)]
    assert d.support() == {"weapons": (5, 2), "refusal": (5, 1), "arithmetic": (6, 1), "threat": (8, 1)}
    last = d.examples[-1]
    assert not last.labels.any()  # the neutral conversation: a negative for every CE
    assert d.ces[0] == CEInfo("weapons")


# ---------------------------------------------------------------- GAVEL ces/ folders

def test_gavel_excitation(tok):
    d = load_gavel_ces(CES, tok)
    assert d.names == ("arithmetic", "refusal", "threat", "weapons")
    assert d.ces[2] == CEInfo("threat", "Making a threat", "directive_to_user",
                              "The text threatens someone with harm unless they comply.")
    assert [c.role for c in d.ces] == ["llm_task", "llm_behavior", "directive_to_user", "topic"]
    assert len(d) == 8
    for e in d.examples:
        own = d.names.index(Path(e.source.split("#")[0]).parent.name)
        assistant = e.encoded.roles == ROLE_ASSISTANT
        assert torch.equal(e.labels[:, own], assistant)  # bare conversations: every assistant token
        assert not e.labels[:, [j for j in range(4) if j != own]].any()  # negatives for the others
    assert d.examples[0].source == f"{CES}/arithmetic/excitation.json#0"


def test_gavel_calibration_labelled_records(tok):
    d = load_gavel_ces(CES, tok, which="calibration", names=["threat", "refusal"])
    assert d.names == ("threat", "refusal")
    by_source = {e.source.removeprefix(f"{CES}/"): e for e in d.examples}
    assert len(by_source) == 4
    first = by_source["threat/calibration.json#0"]
    assert tok.decode(first.encoded.input_ids[first.labels[:, 0]]) == "they will regret it unless they pay me ."
    assert not by_source["refusal/calibration.json#1"].labels.any()  # a neutral negative
    refusal = by_source["refusal/calibration.json#0"]
    assert tok.decode(refusal.encoded.input_ids[refusal.labels[:, 1]]).startswith("i cannot help")


def test_gavel_library_root_and_dispatch(tok, tmp_path):
    shutil.copytree(CES, tmp_path / "lib" / "ces")
    assert load_dataset(str(tmp_path / "lib"), tok, names=["weapons", "refusal"]).names == ("weapons", "refusal")
    assert load_dataset(str(CES), tok, which="calibration").digest() == \
        load_gavel_ces(CES, tok, which="calibration").digest()
    assert load_dataset(str(SPANS), tok).names == load_spans_jsonl(SPANS, tok).names


def test_ce_yaml_forms():
    refusal, threat = read_ce_yaml(CES / "refusal" / "ce.yaml"), read_ce_yaml(CES / "threat" / "ce.yaml")
    assert [(e.input, e.output) for e in refusal.examples] == [("i cannot help with that .", "YES"),
                                                              ("sure . here is how .", "NO")]
    assert threat.schema_version == 2 and threat.provenance.created_by == "gavel-tests"
    assert threat.examples[0].output == "YES"
    existing = FIXTURES / "gavel_library" / "ces" / "tax" / "ce.yaml"
    if existing.exists():
        assert read_ce_yaml(existing).info().role == "topic"


# ---------------------------------------------------------------- the organism

def test_organism_dataset_is_its_ground_truth(tok):
    d = load_dataset("builtin:organism:12", tok, seed=3)
    assert d.names == corpus.CONCEPTS and len(d) == 12
    for e, ex in zip(d.examples, corpus.generate_corpus(12, seed=3)):
        enc, labels = encode_example(tok, ex)
        assert torch.equal(e.encoded.input_ids, enc.input_ids) and torch.equal(e.labels, labels)
    assert d.digest() == organism_dataset(tok, 12, seed=3).digest() != organism_dataset(tok, 12).digest()
    assert load_dataset("builtin:organism:12:3", tok).digest() == d.digest()     # the seed in the name
    with pytest.raises(DataError, match="bad seed"):
        load_dataset("builtin:organism:12:x", tok)


def test_organism_prompt_sets_can_be_sliced_for_held_out_evaluation():
    from gavel.organism.datasets import read_prompts

    harmful = read_prompts("builtin:harmful")
    assert read_prompts("builtin:harmful[0:5]") == harmful[:5] and read_prompts("builtin:harmful[5:]") == harmful[5:]
    assert read_prompts("builtin:harmful[:3]") == harmful[:3]
    for bad in ("builtin:harmful[5]", "builtin:harmful[a:b]", "builtin:harmful[1:2"):
        with pytest.raises(DataError, match="bad slice"):
            read_prompts(bad)


def test_organism_written_as_jsonl_loads_back_identically(tok, tmp_path):
    rows = [{"conversation": as_conversation(ex.messages),
             "spans": [{"ce": s.ce, "message": s.message, "start": s.start, "end": s.end} for s in ex.spans]}
            for ex in corpus.generate_corpus(40, seed=1)]
    loaded = load_spans_jsonl(write_jsonl(tmp_path, *rows), tok, roles=("system", "user", "assistant"))
    truth = organism_dataset(tok, 40, seed=1)
    assert set(loaded.names) == {name for name, (n, _) in truth.support().items() if n}
    assert loaded.digest() == truth.select(loaded.names).digest()


# ---------------------------------------------------------------- split, select, merge, digest

def test_split_by_example_seeded_and_complete(tok):
    d = organism_dataset(tok, 23)
    parts = d.split([0.6, 0.2, 0.2], seed=5)
    assert [len(p) for p in parts] == [14, 5, 4]
    sources = [e.source for p in parts for e in p.examples]
    assert sorted(sources) == sorted(e.source for e in d.examples)  # every example exactly once
    assert all(p.ces == d.ces for p in parts)
    again = d.split([0.6, 0.2, 0.2], seed=5)
    assert [[e.source for e in p.examples] for p in again] == [[e.source for e in p.examples] for p in parts]
    other = d.split([0.6, 0.2, 0.2], seed=6)
    assert [e.source for e in other[0].examples] != [e.source for e in parts[0].examples]
    with pytest.raises(DataError, match="sum to 1"):
        d.split([0.5, 0.2])


def test_select_and_merge(tok):
    spans = load_spans_jsonl(SPANS, tok)
    picked = spans.select(["threat", "weapons"])
    assert picked.names == ("threat", "weapons")
    assert torch.equal(picked.examples[3].labels[:, 0], spans.examples[3].labels[:, 3])
    with pytest.raises(DataError, match="unknown CE 'weapon'") as err:
        spans.select(["weapon"])
    assert "did you mean 'weapons'" in str(err.value)
    gavel = load_gavel_ces(CES, tok, names=["refusal"])
    merged = CEDataset.merge(spans, gavel)
    assert merged.names == spans.names and len(merged) == len(spans) + len(gavel)
    assert merged.ces[1].role == "llm_behavior"  # metadata filled in from the GAVEL CE
    assert merged.support()["refusal"][0] == spans.support()["refusal"][0] + gavel.support()["refusal"][0]
    organism = organism_dataset(tok, 3)
    merged = merge_datasets(gavel, organism)
    assert merged.names == ("refusal", *[c for c in corpus.CONCEPTS if c != "refusal"])
    assert not merged.examples[0].labels[:, 1:].any()  # the GAVEL example lacks the organism's other CEs
    clash = CEDataset((CEInfo("refusal", role="topic"),), ())
    with pytest.raises(DataError, match="role"):
        CEDataset.merge(gavel, clash)


def test_digest_tracks_ids_and_labels_only(tok):
    d = load_spans_jsonl(SPANS, tok)
    same = CEDataset(d.ces, tuple(replace(e, source="elsewhere") for e in d.examples))
    assert same.digest() == d.digest()
    flipped = d.examples[0].labels.clone()
    flipped[1, 0] = ~flipped[1, 0]
    changed = CEDataset(d.ces, (replace(d.examples[0], labels=flipped), *d.examples[1:]))
    assert changed.digest() != d.digest()
    assert d.select(reversed(d.names)).digest() != d.digest()


def test_dataset_checks_label_shapes(tok):
    e = load_spans_jsonl(SPANS, tok).examples[0]
    with pytest.raises(DataError, match="labels must be bool"):
        CEDataset((CEInfo("a"),), (LabelledExample(e.encoded, e.labels),))


# ---------------------------------------------------------------- bad input: DataError naming file and line

GOOD = {"text": "the sun is hot .", "spans": [{"ce": "opinion", "start": 4, "end": 7}]}
NEUTRAL = {"text": "the sky is blue ."}


@pytest.mark.parametrize("bad, message", [
    ('{"text": "the sun", ', "invalid JSON"),
    ('["text"]', "must be a JSON object"),
    ({"txt": "the sun"}, "unknown field 'txt'"),
    ({"text": "the sun", "conversation": BIKE}, "exactly one of"),
    ({"text": "   "}, "empty text"),
    ({"text": "the sun", "spans": [{"ce": "opinion", "start": 2, "end": 40}]}, "outside the text"),
    ({"text": "the sun", "spans": [{"ce": "opinion", "start": 3, "end": 3}]}, "outside the text"),
    ({"text": "the sun", "spans": [{"ce": "opinion", "start": 3, "end": 4}]}, "covers no labelled token"),
    ({"text": "the sun", "spans": [{"ce": "opinion", "start": "0", "end": 4}]}, "must be an integer"),
    ({"text": "the sun", "spans": [{"ce": "bad name", "start": 0, "end": 3}]}, "must be an identifier"),
    ({"text": "the sun", "token_spans": [{"ce": "opinion", "start": 0, "end": 9}]}, "outside the example"),
    ({"conversation": BIKE, "spans": [{"ce": "opinion", "start": 0, "end": 4}]}, "needs `message`"),
    ({"conversation": BIKE, "spans": [{"ce": "opinion", "message": 5, "start": 0, "end": 4}]}, "does not exist"),
    ({"conversation": BIKE, "spans": [{"ce": "opinion", "message": 0, "start": 0, "end": 4}]}, "lies in a user"),
    ({"conversation": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"conversation": [{"role": "user", "content": "hi"}], "labels": ["opinion"]}, "covers no assistant token"),
    ({"text": "the sun", "labels": "opinion"}, "must be a list"),
])
def test_bad_jsonl_lines_are_located(tok, tmp_path, bad, message):
    path = write_jsonl(tmp_path, GOOD, NEUTRAL, bad)
    with pytest.raises(DataError, match=message) as err:
        load_spans_jsonl(path, tok)
    assert str(err.value).startswith(f"{path}:3")


def test_bad_jsonl_files(tok, tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        load_spans_jsonl(tmp_path / "missing.jsonl", tok)
    assert str(tmp_path / "missing.jsonl") in str(err.value)
    with pytest.raises(DataError, match="no examples"):
        load_spans_jsonl(write_jsonl(tmp_path, "", "  "), tok)
    declared = write_jsonl(tmp_path, GOOD, NEUTRAL, {"text": "the moon", "ces": ["threat"]})
    with pytest.raises(DataError, match="CE 'threat' has no positive token") as err:
        load_spans_jsonl(declared, tok)
    assert str(err.value).startswith(f"{declared}:3")
    only = write_jsonl(tmp_path, {"text": "the sun is hot", "labels": ["opinion"]})
    with pytest.raises(DataError, match="CE 'opinion' has only positive tokens"):
        load_spans_jsonl(only, tok)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nothing"), tok)
    with pytest.raises(DataError, match="did you mean 'builtin:organism'"):
        load_dataset("builtin:organsim", tok)
    with pytest.raises(DataError, match="bad example count"):
        load_dataset("builtin:organism:0", tok)


def test_blank_lines_are_skipped_and_line_numbers_kept(tok, tmp_path):
    path = write_jsonl(tmp_path, GOOD, "", NEUTRAL, '{"text": 3}')
    with pytest.raises(DataError, match="`text` must be a string") as err:
        load_spans_jsonl(path, tok)
    assert str(err.value).startswith(f"{path}:4")


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "ces"
    shutil.copytree(CES, root)
    return root


@pytest.mark.parametrize("yaml_text, where, message", [
    ("name: tax\ntags: [Scam]\n", ":2:8", "tags.0: String should match pattern"),
    ("name: tax\nprovenance: {created_by: me, published_at: soon}\n", ":2:44", "not an ISO-8601 date and time"),
    ("name: tax\npublic_id: ce_123\n", ":2:12", "public_id: String should match pattern"),
    ("name: tax\ntitle: [Tax\n", ":3:1", "invalid YAML"),
    ("name: tax\nrole: tax_topic\n", ":2:7", "role: Input should be"),
    ("name: tax\nexamples:\n  maybe: [a]\n", ":3:3", "examples: example groups are `yes` and `no`"),
    ("name: tax\nname: tax\n", ":2:1", "duplicate key 'name'"),
    ("name: taxes\n", ":1:7", "differs from its folder name"),
    ("title: Tax\n", ":1:1", "missing required field 'name'"),
    ("- name\n", ":1:1", "must be a mapping"),
])
def test_bad_ce_yaml_is_located(tok, library, yaml_text, where, message):
    (library / "tax").mkdir()
    (library / "tax" / "ce.yaml").write_text(yaml_text)
    shutil.copy(library / "weapons" / "excitation.json", library / "tax" / "excitation.json")
    with pytest.raises(DataError, match=message) as err:
        load_gavel_ces(library, tok)
    assert str(err.value).startswith(f"{library / 'tax' / 'ce.yaml'}{where}:")


def test_bad_gavel_samples_are_located(tok, library):
    path = library / "threat" / "excitation.json"
    lines = path.read_text().splitlines()
    lines[7] = lines[7].replace('"role": "user"', '"role": "usr"', 1)  # the second sample, on line 8
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="sample 1: unknown role 'usr'") as err:
        load_gavel_ces(library, tok)
    assert str(err.value).startswith(f"{path}:8:")
    path.write_text('{"conversations": [[{"role": "user", "content": "hi"}],\n  {"labels": ["threat"]}\n]}')
    with pytest.raises(DataError, match=r"sample 0: label 'threat' .* covers no assistant token") as err:
        load_gavel_ces(library, tok)
    assert str(err.value).startswith(f"{path}:1:")
    path.write_text('{"conversations": [\n  {"conversation": [{"role": "assistant", "content": "hi"}], '
                    '"labels": ["treat"]}]}')
    with pytest.raises(DataError, match="unknown CE 'treat'") as err:
        load_gavel_ces(library, tok)
    assert str(err.value).startswith(f"{path}:2:") and "did you mean 'threat'" in str(err.value)
    path.write_text('{"conversations": [\n  [{"role": "user", "content": "hi"}],\n}')
    with pytest.raises(DataError, match="invalid JSON") as err:
        load_gavel_ces(library, tok)
    assert str(err.value).startswith(f"{path}:3:1:")
    path.write_text('{"type": "calibration", "conversations": []}')
    with pytest.raises(DataError, match="`type` is 'calibration'"):
        load_gavel_ces(library, tok)
    path.write_text('{"conversation": []}')
    with pytest.raises(DataError, match="did you mean 'conversations'"):
        load_gavel_ces(library, tok)
    path.unlink()
    with pytest.raises(DataError, match=r"missing excitation.json for CE 'threat'"):
        load_gavel_ces(library, tok)
    with pytest.raises(DataError, match="did you mean 'weapons'"):
        load_gavel_ces(library, tok, names=["weapon"])
    with pytest.raises(DataError, match="no CEs here"):
        load_gavel_ces(library / "threat", tok)


def test_the_documented_library_shapes_load_unchanged(tok):
    """FORMAT.md's ce.yaml (public_id, provenance, tags, namespace) and sample envelopes (schema_version, ce,
    ce_public_id, type, published_at, sample_count), CE names in upper case too."""
    library = FIXTURES / "gavel_library"
    warnings: list = []
    d = load_gavel_ces(library, tok, warnings=warnings)
    assert warnings == []
    assert "LGBTQ" in d.names and len(d) == 2 * len(d.names)
    cal = load_gavel_ces(library, tok, which="calibration", names=["LGBTQ", "tax"])
    assert cal.names == ("LGBTQ", "tax") and len(cal) == 4
    spec = read_ce_yaml(library / "ces" / "emotionally_engaging" / "ce.yaml")
    assert spec.tags == ("scam.romance", "tone.affection") and spec.namespace == "gavel"
    assert spec.provenance.publisher.hf_handle == "GavelPublicData"
    assert spec.public_id == json.loads((library / "ces" / "emotionally_engaging" / "excitation.json").read_text())[
        "ce_public_id"]


def test_unknown_keys_of_ce_files_are_kept_and_warned_about(tok, library):
    ce_yaml = library / "threat" / "ce.yaml"
    ce_yaml.write_text(ce_yaml.read_text().replace("provenance:\n", "license: MIT\nprovenance:\n  reviewed_by: a\n"))
    samples = library / "threat" / "excitation.json"
    data = json.loads(samples.read_text())
    samples.write_text(json.dumps({"schema_version": 1, "generator": "v2", **data}, indent=1))
    warnings: list = []
    plain = load_gavel_ces(CES, tok)
    d = load_gavel_ces(library, tok, warnings=warnings)
    assert d.digest() == plain.digest()  # the data is what it was: unknown keys change nothing
    assert read_ce_yaml(ce_yaml).unknown_fields == {"license": "MIT", "provenance.reviewed_by": "a"}
    ce_lines, sample_lines = ce_yaml.read_text().splitlines(), samples.read_text().splitlines()
    expected = {(str(ce_yaml), ce_lines.index("license: MIT") + 1, 1, "unknown field 'license' (kept, not read by "
                                                                     "gavel)"),
                (str(ce_yaml), ce_lines.index("  reviewed_by: a") + 1, 3,
                 "unknown field 'provenance.reviewed_by' (kept, not read by gavel)"),
                (str(samples), sample_lines.index(' "generator": "v2",') + 1, 2,
                 "unknown field 'generator' (kept, not read by gavel)")}
    assert {(w.location.path, w.location.line, w.location.column, w.message) for w in warnings} == expected


@pytest.mark.parametrize("envelope, message", [
    ({"schema_version": 3}, "`schema_version` is 3; known: 1, 2"),
    ({"published_at": "later"}, "`published_at`: 'later' is not an ISO-8601 date and time"),
    ({"ce_public_id": "ce_ffffffffffffffffffffffffffffffff"}, "`ce_public_id` is 'ce_ffff"),
])
def test_sample_envelopes_are_checked(tok, library, envelope, message):
    samples = library / "threat" / "excitation.json"
    data = json.loads(samples.read_text())
    samples.write_text(json.dumps({**data, **envelope}, indent=1))
    with pytest.raises(DataError, match=message) as err:
        load_gavel_ces(library, tok)
    key = next(iter(envelope))
    line = next(i for i, text in enumerate(samples.read_text().splitlines(), 1) if f'"{key}"' in text)
    assert (err.value.location.line, err.value.location.column) == (line, 2)


def test_gavel_single_ce_needs_negatives(tok, library):
    (library / "weapons" / "excitation.json").write_text(
        '{"conversations": [[{"role": "assistant", "content": "get the gun ."}]]}')
    with pytest.raises(DataError, match="CE 'weapons' has only positive tokens"):
        load_gavel_ces(library, tok, names=["weapons"])


# ---------------------------------------------------------------- property: char spans map to overlapping tokens

WORDS = ["the", "sun", "is", "hot", "bomb", "café", "?", ".", "12", "naïve", "🙂", "x,y"]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
       gaps=st.lists(st.sampled_from([" ", "  ", "\n", " \t "]), min_size=12, max_size=12),
       data=st.data(), chat=st.booleans())
def test_char_spans_map_to_overlapping_tokens(tok, words, gaps, data, chat):
    text = "".join(w + g for w, g in zip(words, gaps)).rstrip()
    start = data.draw(st.integers(0, len(text) - 1))
    end = data.draw(st.integers(start + 1, len(text)))
    span = {"ce": "c", "start": start, "end": end}
    if chat:
        rec = {"conversation": [{"role": "user", "content": "the sun"}, {"role": "assistant", "content": text}],
               "spans": [{**span, "message": 1}]}
    else:
        rec = {"text": text, "spans": [span]}
    try:
        p = record(tok, rec)
    except DataError as e:  # only when the span holds nothing but whitespace
        assert "covers no" in str(e) and not text[start:end].strip()
        return
    encoded_base = p.encoded.content_starts[1] if chat else 0
    offsets = p.encoded.offsets - encoded_base
    overlaps = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (p.encoded.offsets[:, 1] > p.encoded.offsets[:, 0])
    if chat:
        overlaps &= p.encoded.roles == ROLE_ASSISTANT
    assert torch.equal(p.positives["c"], overlaps)
    for (a, b) in offsets[p.positives["c"]].tolist():
        assert text[max(a, start):min(b, end)].strip()  # each marked token shares a visible character
