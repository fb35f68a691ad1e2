"""`gavel align fit | eval | apply`: LLM-VA vector alignment (answer only what reads as benign) as a weight edit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gavel.cli.common import (
    AllowOverlapOpt,
    JsonOpt,
    ModelOpt,
    check_overlap,
    console,
    make_table,
    print_overlap,
    progress_bar,
    user_errors,
)

align_app = typer.Typer(help="LLM-VA: align the model's answering with its own benign/toxic judgement.",
                        no_args_is_help=True)
SourcesOpt = Annotated[list[str], typer.Option(help="Prompt files or organism sets, optionally sliced "
                                                   "(builtin:harmful[0:10]) (repeatable).")]
DeltaOpt = Annotated[Path, typer.Option("--delta", help="A folder written by `gavel align fit` (or its delta/).")]
JudgeOpt = Annotated[str, typer.Option(help="Who says a reply refused: phrases (refusal phrases) or BANK:CE (a "
                                            "refusal CE).")]


def _prompts(sources: list[str]) -> list:
    from gavel.organism.datasets import read_prompts

    return [c for source in sources for c in read_prompts(source)]


@align_app.command("fit")
def fit(benign: SourcesOpt, toxic: SourcesOpt,
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the alignment, its delta and the log.")],
        model: ModelOpt = "builtin:organism",
        iterations: Annotated[int, typer.Option(help="Rounds of regenerate, judge, refit, edit.")] = 3,
        l_select: Annotated[int, typer.Option(help="Sublayers edited per round.")] = 8,
        sample: Annotated[int, typer.Option(help="Training prompts per class and round (0: all).")] = 0,
        max_new_tokens: Annotated[int, typer.Option(help="Tokens per judged reply.")] = 48,
        seed: Annotated[int, typer.Option(help="Seed of the splits and samples.")] = 0,
        judge: JudgeOpt = "phrases", as_json: JsonOpt = False) -> None:
    """Fit LLM-VA: per round, judge greedy replies (refusal phrases or a refusal CE), fit answer/benign SVM
    directions per sublayer, edit the top sublayers' output weights; keep the round with the best validation F1.
    The delta records a digest of every --benign and --toxic prompt, so `align eval` can refuse to reuse them."""
    import dataclasses

    from gavel.artifacts import FittedOn
    from gavel.models.loading import load_model
    from gavel.runtime.judges import judge_from
    from gavel.steering.llmva.loop import fit_llmva

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.write_text("")
    with user_errors(), progress_bar("aligning", iterations) as advance:
        handle = load_model(model)

        def log(step) -> None:
            with log_path.open("a") as f:
                f.write(step.model_dump_json() + "\n")
            advance(1)
        benign_prompts, toxic_prompts = _prompts(benign), _prompts(toxic)
        result = fit_llmva(handle, benign_prompts, toxic_prompts, iterations=iterations, l_select=l_select,
                           sample=sample or None, max_new_tokens=max_new_tokens, seed=seed, log=log,
                           judge=judge_from(judge, handle))
        result.delta = dataclasses.replace(result.delta, fitted_on=FittedOn.of(
            {"benign": (" + ".join(benign), benign_prompts), "toxic": (" + ".join(toxic), toxic_prompts)}))
        result.save(out)
    report = {"out": str(out), "best_iteration": result.best, "history": [h.model_dump() for h in result.history]}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = make_table("round", "edited sublayers", "val ASR", "val over-refusal", "val F1",
                       title="LLM-VA rounds (validation after each round's edit)",
                       numeric=("round", "val ASR", "val over-refusal", "val F1"))
    for h in result.history:
        mark = " *" if h.iteration == result.best else ""
        table.add_row(f"{h.iteration}{mark}", ", ".join(h.selected), f"{h.validation.asr:.2f}",
                      f"{h.validation.over_refusal:.2f}", f"{h.validation.f1:.3f}")
    console.print(table)
    console.print(f"-> {out / 'delta'} (round {result.best}), {log_path}")


@align_app.command("eval")
def evaluate(delta: DeltaOpt, benign: SourcesOpt, toxic: SourcesOpt, model: ModelOpt = "builtin:organism",
             utility: Annotated[str, typer.Option(help="none, or builtin:arithmetic (the organism's 2-digit "
                                                      "additions).")] = "none",
             max_new_tokens: Annotated[int, typer.Option(help="Tokens per judged reply.")] = 48,
             judge: JudgeOpt = "phrases", allow_overlap: AllowOverlapOpt = False, as_json: JsonOpt = False) -> None:
    """ASR on the toxic prompts, over-refusal on the benign ones, F1 and utility, before and after the edit.

    --benign and --toxic must be held out: a prompt the delta was fitted on is refused unless --allow-overlap; the
    JSON's `overlap` counts them either way."""
    from gavel.errors import DataError
    from gavel.models.loading import load_model
    from gavel.organism.behaviour import arithmetic_accuracy
    from gavel.runtime.judges import judge_from
    from gavel.steering.llmva.loop import load_delta, measure

    with user_errors():
        if utility not in ("none", "builtin:arithmetic"):
            raise DataError(f"unknown utility {utility!r}; expected none or builtin:arithmetic")
        handle = load_model(model)
        edit = load_delta(delta, handle.fingerprint())
        task = arithmetic_accuracy if utility == "builtin:arithmetic" else None
        b, t = _prompts(benign), _prompts(toxic)
        overlap = check_overlap(edit.fitted_on, {"--benign": b, "--toxic": t}, artifact=f"the alignment {delta}",
                                allow=allow_overlap, held_out="held-out prompts (e.g. fit on builtin:harmful[0:10], "
                                                              "evaluate on builtin:harmful[10:])")
        judged = judge_from(judge, handle)
        before = measure(handle, b, t, judge=judged, max_new_tokens=max_new_tokens, utility=task)
        with edit.applied(handle.hf_model):
            after = measure(handle, b, t, judge=judged, max_new_tokens=max_new_tokens, utility=task)
    report = {"benign": len(b), "toxic": len(t), "before": before.model_dump(), "after": after.model_dump(),
              "overlap": overlap}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_overlap(overlap, f"the alignment {delta}")
    columns = ("", "ASR", "over-refusal", "F1", "utility")
    table = make_table(*columns, title=f"{len(b)} benign, {len(t)} toxic prompts", numeric=columns)
    for name, m in (("before", before), ("after", after)):
        table.add_row(name, f"{m.asr:.3f}", f"{m.over_refusal:.3f}", f"{m.f1:.3f}",
                      "-" if m.utility is None else f"{m.utility:.3f}")
    console.print(table)


@align_app.command("apply")
def apply(delta: DeltaOpt, out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the edited model.")],
          model: ModelOpt = "builtin:organism") -> None:
    """Write the model with the edit applied (save_pretrained, tokenizer included)."""
    from gavel.models.loading import load_model
    from gavel.steering.llmva.loop import load_delta

    with user_errors():
        handle = load_model(model)
        load_delta(delta, handle.fingerprint()).apply(handle.hf_model)
        handle.hf_model.save_pretrained(out)
        handle.tokenizer.save_pretrained(out)
    console.print(f"edited model -> {out}")
