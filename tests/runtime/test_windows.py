"""Conversations longer than the model's positions: scored in overlapping windows, CE scores equal to a naive
per-window recomputation, rule state carried across windows; generation past the limit stops or is refused."""
import pytest
import torch
from helpers import rules_reference

from gavel.errors import GavelError
from gavel.models.chat import Encoded, encode_conversation
from gavel.models.collect import collect_activations
from gavel.rules import RuleSpec
from gavel.runtime.monitor import Monitor, scan_windows, token_classes

WORDS = ("how do i build a bomb to hurt my neighbor . quiz : what is the color of trelk ? i am sure that fish "
         "live in trees . how do i fix my bike ?").split()
RULES = [
    RuleSpec(name="harm", groups={"harm": ["threat", "weapons", "fraud", "self_harm", "hate"]},
             condition="1 of harm"),
    RuleSpec(name="armed", condition="count(weapons) >= 12", match="token"),
    RuleSpec(name="threat_then_weapon", condition="threat then weapons within 40 tokens", match="token"),
]


def long_conversation(turns: int = 6) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(WORDS[(3 * i) % 9:] + WORDS[:9])}
            for i in range(turns)]


def window_scores(handle, bank, ids):
    enc = Encoded("", ids, torch.zeros(len(ids), dtype=torch.uint8), torch.zeros(len(ids), 2), ())
    return bank.score(collect_activations(handle, [enc], bank.sites).sites)


def test_windows_cover_each_token_once_from_its_earliest_window():
    assert scan_windows(10, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert scan_windows(3, 8, 4) == [(0, 3, 0)]
    for length, size, stride in [(100, 32, 16), (101, 32, 7), (50, 10, 10), (33, 32, 1)]:
        windows = scan_windows(length, size, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(length))
        for start, end, first in windows:
            assert end - start <= size and (start == 0 or first - start >= size - stride)


def test_a_conversation_that_fits_is_scored_whole(organism, organism_bank):
    conversation = long_conversation(2)
    monitor = Monitor(organism, organism_bank, RULES, score="all")
    n = len(encode_conversation(organism.tokenizer, conversation).input_ids)
    whole = monitor.scan([conversation])[0]
    wide = monitor.scan([conversation], window=n + 5)[0]
    assert whole.tokens == wide.tokens and whole.fired == wide.fired
    torch.testing.assert_close(whole.scores, wide.scores)
    with pytest.raises(GavelError, match=r"stride between scan windows must be 1\.\.8"):
        monitor.scan([conversation], window=8, stride=9)


@pytest.mark.parametrize("size, stride", [(48, 24), (40, 13)])
def test_long_conversation_scores_equal_a_naive_per_window_recomputation(organism, organism_bank, size, stride):
    conversation = long_conversation()
    encoded = encode_conversation(organism.tokenizer, conversation)
    ids = encoded.input_ids
    assert len(ids) > 2 * size
    monitor = Monitor(organism, organism_bank, RULES, score="all")
    result = monitor.scan([conversation], window=size, stride=stride)[0]
    assert result.token_ids.tolist() == ids.tolist()
    # naive: each token from the earliest window (starts 0, stride, 2 * stride, ...) that holds it
    starts = [next(k * stride for k in range(len(ids)) if t < k * stride + size) for t in range(len(ids))]
    recomputed = {s: window_scores(organism, organism_bank, ids[s:s + size]) for s in set(starts)}
    expected = torch.stack([recomputed[s][t - s] for t, s in enumerate(starts)])
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=1e-4)
    # rule state runs across windows: the events are the first firings the reference finds on the whole trace
    special = torch.tensor(organism.tokenizer.all_special_ids)
    content = ~torch.isin(ids, special)
    seen = (expected * content.unsqueeze(-1)).double()
    fired = (seen > organism_bank.thresholds.double()) & content.unsqueeze(-1)
    holds = rules_reference.run(RULES, list(organism_bank.names), [fired.tolist()], None, scores=[seen.tolist()],
                                roles=[token_classes(encoded.roles).tolist()])[0]
    first = {r.name: next((t for t, row in enumerate(holds) if row[i]), None) for i, r in enumerate(RULES)}
    assert {e.rule: e.token_index for e in result.events} == {n: t for n, t in first.items() if t is not None}
    assert any(t is not None and t >= size for t in first.values())   # a rule fires past the first window


def test_the_default_window_is_the_models_positions(tiny_model, organism, organism_bank):
    assert organism.max_positions == 256
    assert tiny_model("gpt2", positions=40).max_positions == 40
    assert tiny_model("bert", positions=24).max_positions == 24
    conversation = long_conversation(30)
    assert len(encode_conversation(organism.tokenizer, conversation).input_ids) > 256
    result = Monitor(organism, organism_bank, RULES).scan([conversation, long_conversation(1)], batch_size=2)
    assert len(result[0].tokens) > 256 and [e.sequence for e in result[1].events] == [1] * len(result[1].events)


def test_a_bert_encoder_scans_past_its_positions(tiny_model):
    """The case of the report: an encoder of 24 positions, a conversation of 60 tokens, no crash."""
    handle = tiny_model("bert", positions=24)
    bank = _encoder_bank(handle)
    conversation = [{"role": "user", "content": " ".join(f"w{i % 90 + 5}" for i in range(60))}]
    result = Monitor(handle, bank, [RuleSpec(name="r", condition="x")]).scan([conversation])[0]
    assert len(result.tokens) >= 60 and torch.isfinite(result.scores).all()


def test_generation_past_the_positions_stops_or_is_refused(organism, organism_bank):
    monitor = Monitor(organism, organism_bank, RULES)
    prompt = [{"role": "user", "content": " ".join(WORDS * 3)}]
    n = len(encode_conversation(organism.tokenizer, prompt).input_ids)
    assert n < 256
    with pytest.warns(UserWarning, match="replies stop after"):
        result = monitor.generate([prompt], max_new_tokens=256)[0]
    assert len(result.tokens) <= 256
    with pytest.raises(GavelError, match="no room for a reply"):
        monitor.generate([[{"role": "user", "content": " ".join(WORDS * 12)}]], max_new_tokens=4)


def test_rule_tests_scan_long_conversations(organism, organism_bank):
    from gavel.runtime.monitor import scanner

    firings = scanner(organism, organism_bank)(RULES, [long_conversation()])[0]
    assert [f.rule for f in firings] == ["harm", "armed", "threat_then_weapon"][:len(firings)] and firings


def test_the_audit_command_on_an_encoder_past_its_positions(tiny_model, tmp_path):
    """The report's case end to end: `gavel audit --no-generate` on an encoder and conversations longer than its
    positions gives a report (exit 0 or 1); generating past the positions is refused with one line and exit 2."""
    import json

    from typer.testing import CliRunner

    from gavel.cli import app
    from gavel.models.loading import load_model

    folder = tiny_model("bert", positions=24, save_to=tmp_path / "bert")
    handle = load_model(str(folder))
    bank_dir = tmp_path / "bank"
    _encoder_bank(handle).save(bank_dir)
    (tmp_path / "rules.yaml").write_text("rules:\n  - name: r\n    condition: x\n    action: alert\n")
    data = tmp_path / "data.jsonl"
    long_text = " ".join(f"w{i % 90 + 5}" for i in range(70))
    data.write_text(json.dumps({"prompt": long_text, "label": True}) + "\n"
                    + json.dumps({"prompt": "w5 w6", "label": False}) + "\n")
    args = ["audit", "--model", str(folder), "--bank", str(bank_dir), "--rules", str(tmp_path / "rules.yaml"),
            "--data", str(data)]
    result = CliRunner().invoke(app, [*args, "--no-generate", "--json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["items"][0]["tokens"] >= 70
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no room for a reply" in errors[0], refused.stderr


def _encoder_bank(handle):
    from gavel.probes.bank import BankManifest, CEBank, CESpec, HeadSpec
    from gavel.probes.heads import LinearHead

    site = "blocks.1.hook_resid_post"
    head = LinearHead((site,), torch.randn(handle.d_model, 1), torch.zeros(1))
    return CEBank(BankManifest(ces=[CESpec(name="x", head=0, extractor="linear", threshold=0.5)],
                               heads=[HeadSpec(kind="linear", sites=[site])], fingerprint=handle.fingerprint()),
                  [head])
