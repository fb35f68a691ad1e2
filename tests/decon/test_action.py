"""The `perturb` rule action (DeconIEP in the monitor): a rule that holds on a prompt has that sequence generated from
its perturbed prompt, exactly as the decon API perturbs it, while the rest of the batch is untouched; the same in
Guard.generate, Guard.stream and Guard.watch; artifacts resolve like steering ones."""
import pytest
import torch
from helpers.decon import random_fitted

from gavel.models.generation import generate_replies
from gavel.rules import RuleSpec, load_rules
from gavel.rules.source import RuleErrors
from gavel.runtime.guard import Guard
from gavel.runtime.monitor import Monitor

QUIZ = [{"role": "user", "content": "quiz : what is the color of trelk ?"}]
BIKE = [{"role": "user", "content": "how do i fix my bike ?"}]
RULE = RuleSpec(name="benchmark", title="benchmark question", condition="benchmark in user",
                action='perturb(perturbation="decon")')


@pytest.fixture(scope="module")
def decon(organism):
    return random_fitted(organism, zeta=0.5, seed=4)


def test_the_perturbed_sequence_is_generated_as_decon_perturbs_it_and_the_rest_is_untouched(organism, organism_bank,
                                                                                             decon):
    monitor = Monitor(organism, organism_bank, [RULE], artifacts={"decon": decon})
    quiz, bike = monitor.generate([QUIZ, BIKE], max_new_tokens=12, do_sample=False)
    plain = generate_replies(organism, [QUIZ, BIKE], 12)
    with decon.perturbing(organism, rows=[True, False]):
        reference = generate_replies(organism, [QUIZ, BIKE], 12)
    assert quiz.generated == reference[0] != plain[0]
    assert bike.generated == plain[1] == reference[1] and bike.events == []
    assert [e.rule for e in quiz.events] == ["benchmark"] and quiz.events[0].action == "perturb"
    assert quiz.events[0].token_index < quiz.prompt_length and quiz.events[0].sequence == 0
    alone = monitor.generate([BIKE], max_new_tokens=12, do_sample=False)[0]
    assert torch.equal(alone.token_ids, bike.token_ids)


def test_every_guard_path_perturbs_alike(organism, organism_bank, decon):
    guard = Guard(organism, organism_bank, [RULE], artifacts={"decon": decon})
    whole = guard.generate(QUIZ, max_new_tokens=12)
    streamed = list(guard.stream(QUIZ, max_new_tokens=12))
    text = organism.tokenizer.decode([s.token_id for s in streamed[:-1]], skip_special_tokens=True).strip()
    assert text == whole.generated and whole.verdict == streamed[-1].result.verdict == "steer"
    with guard.watch([QUIZ]) as watch:
        out = organism.hf_model.generate(**watch.inputs, stopping_criteria=watch.stopping_criteria,
                                         max_new_tokens=12, do_sample=False,
                                         pad_token_id=organism.tokenizer.pad_token_id)
    watched = watch.results(out)[0]
    assert watched.generated == whole.generated and [e.rule for e in watched.events] == ["benchmark"]


def test_a_rule_file_names_the_perturbation_by_folder_in_either_form(organism, organism_bank, decon, tmp_path):
    decon.save(tmp_path / "decon")
    (tmp_path / "pack.gvl").write_text('rule benchmark {\n    title "benchmark question"\n'
                                       '    when benchmark in user\n    action perturb decon\n}\n')
    rules = load_rules([tmp_path / "pack.gvl"])
    assert dict(rules[0].action_call.args) == {"perturbation": "decon"}
    got = Monitor(organism, organism_bank, rules).generate([QUIZ], max_new_tokens=12, do_sample=False)[0]
    want = Monitor(organism, organism_bank, [RULE], artifacts={"decon": decon}).generate(
        [QUIZ], max_new_tokens=12, do_sample=False)[0]
    assert torch.equal(got.token_ids, want.token_ids)


def test_a_perturbation_for_another_model_is_a_located_error(organism, organism_bank, tmp_path):
    from gavel.models.loading import load_model

    clean = load_model("builtin:organism-clean")
    random_fitted(clean, zeta=0.5).save(tmp_path / "decon")
    (tmp_path / "pack.yaml").write_text("rules:\n  - name: quiz\n    condition: benchmark in user\n"
                                        "    action: perturb(perturbation=\"decon\", zeta=0.01)\n")
    with pytest.raises(RuleErrors) as info:
        Monitor(organism, organism_bank, load_rules([tmp_path / "pack.yaml"]))
    error = info.value.errors[0]
    assert "weights_sha256" in error.message and error.location.line == 4


def test_rule_gated_rc_and_bud_perturb_exactly_the_flagged_prompts(organism, organism_bank, decon):
    """Gated by `benchmark in user`, quiz items are perturbed as under the plain perturbation and additions are
    generated as without it, so the gated row's accuracies equal those two rows'."""
    from gavel.models.loading import load_model
    from gavel.organism.decon import DeconSplits, decon_splits, evaluate_decon

    full = decon_splits()
    splits = DeconSplits(train=(), leaked_eval=full.leaked_eval[:4], heldout_eval=full.heldout_eval[:4],
                         arithmetic_eval=full.arithmetic_eval[:4])
    guard = Guard(organism, organism_bank, [RULE], artifacts={"decon": decon})
    report = evaluate_decon(organism, load_model("builtin:organism-clean"), decon, [decon.zeta], splits=splits,
                            guard=guard)
    (point,), gated = report.points, report.gated
    assert (gated.acc_leaked, gated.acc_heldout) == (point.acc_leaked, point.acc_heldout)
    assert gated.acc_arithmetic == report.acc_arithmetic and point.acc_leaked < report.acc_leaked == 1.0
    assert gated.rc == abs(gated.acc_leaked - report.clean_acc_leaked)
