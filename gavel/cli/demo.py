"""`gavel demo`: the main job end to end (a CE bank, guarded replies, an audit): builtin:smollm2 uses the pack gavel
ships for it; the organism and any other chat model get a bank fitted on the organism's labelled corpus."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gavel.cli.common import JsonOpt, ModelOpt, console, make_table, progress_bar, user_errors


def demo(model: ModelOpt = "builtin:organism", as_json: JsonOpt = False,
         max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 48,
         examples: Annotated[int, typer.Option(min=30, help="Labelled organism conversations the CE probes are "
                                                          "fitted on (models without a shipped pack).")] = 1500,
         save_bank: Annotated[Path | None, typer.Option(help="Save the fitted CE bank to this directory.")] = None,
         audit_log: Annotated[Path | None, typer.Option(help="Append every guarded result to this JSONL log.")]
         = None,
         html: Annotated[Path | None, typer.Option(help="Write the audit page (per-token CE heat maps) here.")]
         = None) -> None:
    """Guard the demo prompts with a CE bank and rules, and summarise: the shipped pack of builtin:smollm2, else probes
    fitted on the organism's labelled corpus with the organism's demo rules."""
    from gavel.organism.demo import run_demo
    from gavel.packs import pack_dir

    # only a model without a shipped pack has probes to fit
    fitting = progress_bar("collecting activations", examples) if pack_dir(model) is None else nullcontext(None)
    with user_errors(), fitting as advance:
        report = run_demo(model, n_train=examples, max_new_tokens=max_new_tokens, progress=advance, bank_out=save_bank,
                          audit_log=audit_log, html=html)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    table = make_table("CE", "read at", "AUROC", title="CE probes (held-out token AUROC)", numeric=("AUROC",))
    for name, value in report.probe_auroc.items():
        table.add_row(name, report.probe_sites[name], f"{value:.3f}")
    console.print(table)
    for case in report.cases:
        _print_case(case)
    console.print("\n[bold]a stored conversation, checked without generating[/]")
    _print_case(report.stored)
    stats = make_table("rule", "fires", "precision", "recall", "FPR", numeric=("fires", "precision", "recall", "FPR"),
                       title="\nrules over the demo prompts (expected: harmful and jailbreak prompts flagged)")
    for r in report.rules:
        stats.add_row(r.rule, str(r.fires), *(f"{v:.2f}" if v is not None else "-" for v in (r.precision, r.recall,
                                                                                              r.fpr)))
    console.print(stats)
    for what, where in (("CE bank", report.bank), ("audit log", report.audit_log), ("audit page", report.html)):
        if where:
            console.print(f"{what}: {where}")
    console.print(f"\n[dim]demo finished in {report.seconds:.1f} s[/]")


def _print_case(case) -> None:
    colour = {"block": "red", "clean": "green"}.get(case.verdict, "yellow")
    console.print(f"\n[bold {colour}]{case.kind}[/] [{colour}]{case.verdict}[/]  [dim]user:[/] {escape(case.prompt)}")
    if case.blocked and case.generated:
        console.print(f"  [dim]model began:[/] {escape(case.generated)}")
    console.print(f"  [dim]reply:[/] {escape(case.reply)}")
    for e in case.events:      # Event.to_dict() records
        ces = ", ".join(f"{k}={v:.2f}" for k, v in e["ces"].items())
        console.print(f"  [{colour}]{e['action']:>5}[/] {e['rule']} ({e['severity']}) at {e['where']} token "
                      f"{e['token_index']} {escape(repr(e['token']))}  [dim]{escape(ces)}[/]")
