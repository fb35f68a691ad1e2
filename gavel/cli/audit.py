"""`gavel audit`: guard a model over a dataset of prompts or conversations and report what the rules flag."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gavel.cli.common import JsonOpt, ModelOpt, console, make_table, progress_bar, user_errors


def audit(data: Annotated[list[Path], typer.Option(
              "--data", "-d", help="Prompts or conversations (.jsonl), GAVEL test sets (.json: positive*, "
                                   "negative*), or folders of them (a GAVEL rules/ folder, a rule's folder or its "
                                   "tests/); repeat it.")],
          bank: Annotated[Path, typer.Option("--bank", "-b", help="A CE bank folder (gavel ce fit).")],
          rules: Annotated[list[Path], typer.Option("--rules", "-r", help="Rule files or folders.")],
          model: ModelOpt = "builtin:organism",
          generate: Annotated[bool, typer.Option("--generate/--no-generate",
                                                 help="Generate replies, or only read the conversations.")] = True,
          max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
          batch_size: Annotated[int, typer.Option(help="Conversations per forward batch.")] = 16,
          sarif_out: Annotated[Path | None, typer.Option("--sarif", help="Also write SARIF 2.1.0 here.")] = None,
          html_out: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML page "
                                                                           "with per-token CE heat maps.")] = None,
          device_map: Annotated[str | None, typer.Option(help="'auto' spreads a model too large for one device "
                                                                  "over every visible GPU (accelerate).")] = None,
          ray: Annotated[bool, typer.Option("--ray", help="Run the batches on a Ray cluster (a local one unless "
                                                          "--address is given).")] = False,
          address: Annotated[str | None, typer.Option(help="Ray cluster address (e.g. auto, ray://head:10001).")]
          = None,
          workers: Annotated[int, typer.Option(help="Ray actors, each loading the model once.")] = 2,
          cpus_per_worker: Annotated[float, typer.Option(help="CPUs each Ray actor reserves (and torch threads).")]
          = 1,
          gpus_per_worker: Annotated[float, typer.Option(help="GPUs each Ray actor reserves (the model goes to "
                                                              "cuda when > 0).")] = 0,
          as_json: JsonOpt = False) -> None:
    """Audit a model: run every prompt or conversation through the guard; exit 1 when any rule fires, 2 on bad input.
    With labels, each rule gets precision, recall, FPR, the AUC of firing and of its soft score, and the AUC of
    conversation length alone (the baseline to beat)."""
    from gavel.audit.local import guard_items, sarif, summarise
    from gavel.io.conversations import read_audit_data

    with user_errors():
        items = read_audit_data(data)
        with progress_bar("auditing", len(items)) as advance:
            if ray:
                from gavel.audit.cluster import GuardRecipe, ray_guard_items
                from gavel.probes.bank import CEBank
                from gavel.rules import load_rules
                from gavel.rules.compile.soft import SoftRules

                ce_bank = CEBank.load(bank)
                all_rules = load_rules([str(r) for r in rules])
                soft = SoftRules(all_rules, ce_bank.names)
                recipe = GuardRecipe(model, ce_bank, all_rules,
                                     device="cuda" if gpus_per_worker > 0 else "cpu", device_map=device_map,
                                     threads=max(1, int(cpus_per_worker)))
                name, reported, results = ray_guard_items(
                    recipe, [item.conversation for item in items], generate=generate, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, workers=workers, address=address, cpus_per_worker=cpus_per_worker,
                    gpus_per_worker=gpus_per_worker, progress=advance)
                names = ce_bank.names
            else:
                from gavel.models.loading import load_model
                from gavel.runtime.guard import Guard

                guard = Guard(load_model(model, device_map=device_map), bank, [str(r) for r in rules])
                results = guard_items(guard, items, generate=generate, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, progress=advance)
                name, reported, names = guard.handle.name, guard.monitor.rules, guard.monitor.bank.names
                soft = guard.monitor.soft
        report = summarise(name, reported, items, results, generate=generate, soft=soft)
    if html_out is not None:
        from gavel.audit.html import audit_html

        html_out.write_text(audit_html(report, results, names), encoding="utf-8")
    if sarif_out is not None:
        sarif_out.write_text(json.dumps(sarif(report, reported), indent=2) + "\n")
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        _print(report)
    if report.violations:
        raise typer.Exit(code=1)


def _print(report) -> None:
    numbers = ("fires", "labelled", "precision", "recall", "FPR", "AUC (fires)", "AUC (score)", "AUC (length only)")
    table = make_table("rule", "severity", *numbers, numeric=numbers,
                       title=f"{len(report.items)} conversations, {report.violations} flagged ({report.model})")

    def fmt(x):
        return "" if x is None else f"{x:.2f}"
    for r in report.rules:
        table.add_row(escape(r.rule), r.severity, str(r.fires), str(r.labelled), fmt(r.precision), fmt(r.recall),
                      fmt(r.fpr), fmt(r.auc), fmt(r.score_auc), fmt(r.length_auc))
    console.print(table)
    for item in report.items:
        if item.verdict != "clean":
            fired = ", ".join(f"{e['rule']}@{e['token_index']}" for e in item.events)
            where = f"{item.source}:{item.line}" if item.line else item.source   # JSON test sets have no lines
            console.print(f"{escape(where)} {item.verdict}: {escape(fired)}", soft_wrap=True)
