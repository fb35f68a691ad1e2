"""`gavel audit`: guard a model over a dataset of prompts or conversations and report what the rules flag."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from gavel.cli.common import JsonOpt, ModelOpt, console, progress_bar, user_errors


def audit(data: Annotated[Path, typer.Option("--data", "-d", help="Prompts (.jsonl) or conversations (.json).")],
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
    """Audit a model: run every prompt or conversation through the guard; exit 1 when any rule fires."""
    from gavel.audit.local import guard_items, sarif, summarise
    from gavel.io.conversations import read_audit_data

    with user_errors():
        items = read_audit_data(data)
        with progress_bar("auditing", len(items), enabled=not as_json) as advance:
            if ray:
                from gavel.audit.cluster import GuardRecipe, ray_guard_items
                from gavel.probes.bank import CEBank
                from gavel.rules import load_rules

                ce_bank = CEBank.load(bank)
                recipe = GuardRecipe(model, ce_bank, load_rules([str(r) for r in rules]),
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
        report = summarise(name, reported, items, results, generate=generate)
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
    table = Table(title=f"{len(report.items)} conversations, {report.violations} flagged ({report.model})")
    for column in ("rule", "severity", "fires", "precision", "recall", "FPR", "AUC", "length-only AUC"):
        table.add_column(column)

    def fmt(x):
        return "" if x is None else f"{x:.2f}"
    for r in report.rules:
        table.add_row(escape(r.rule), r.severity, str(r.fires), fmt(r.precision), fmt(r.recall), fmt(r.fpr),
                      fmt(r.auc), fmt(r.length_auc))
    console.print(table)
    for item in report.items:
        if item.verdict != "clean":
            fired = ", ".join(f"{e['rule']}@{e['token_index']}" for e in item.events)
            console.print(f"{escape(item.source)}:{item.line} {item.verdict}: {escape(fired)}", soft_wrap=True)
