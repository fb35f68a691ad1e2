"""The `gavel` command line. Heavy libraries (torch, transformers) are imported inside commands only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from gavel.cli.align import align_app
from gavel.cli.audit import audit
from gavel.cli.chat import chat
from gavel.cli.common import JsonOpt, ModelOpt, console, progress_bar, user_errors
from gavel.cli.decon import decon_app
from gavel.cli.neurons import neurons_app
from gavel.cli.plugins import plugins_app
from gavel.cli.rules import rules_app
from gavel.cli.serve import serve
from gavel.cli.steer import steer_app
from gavel.errors import GavelError

app = typer.Typer(help="gavel: cognitive-element probes, safety rules and a real-time monitor for LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
organism_app = typer.Typer(help="Train and measure the built-in model organism.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")
ce_app = typer.Typer(help="Fit, evaluate and inspect cognitive-element (CE) banks.", no_args_is_help=True)
app.add_typer(ce_app, name="ce")
app.add_typer(rules_app, name="rules")
app.add_typer(plugins_app, name="plugins")
app.add_typer(steer_app, name="steer")
app.add_typer(align_app, name="align")
app.add_typer(neurons_app, name="neurons")
app.add_typer(decon_app, name="decon")
app.command()(audit)
app.command()(chat)
app.command()(serve)


@app.command()
def demo(model: ModelOpt = "builtin:organism", as_json: JsonOpt = False,
         max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 48,
         save_bank: Annotated[Optional[Path], typer.Option(help="Save the fitted CE bank to this directory.")] = None,
         audit_log: Annotated[Optional[Path], typer.Option(help="Append every guarded result to this JSONL log.")]
         = None,
         html: Annotated[Optional[Path], typer.Option(help="Write the audit page (per-token CE heat maps) here.")]
         = None) -> None:
    """Fit CE probes on the organism, guard the demo prompts with the demo rules, and summarise."""
    from gavel.organism.demo import run_demo

    with user_errors(), progress_bar("collecting activations", 1500, enabled=not as_json) as advance:
        report = run_demo(model, max_new_tokens=max_new_tokens, progress=advance, bank_out=save_bank,
                          audit_log=audit_log, html=html)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    table = Table(title="CE probes (held-out token AUROC)")
    table.add_column("CE")
    table.add_column("read at")
    table.add_column("AUROC", justify="right")
    for name, value in report.probe_auroc.items():
        table.add_row(name, report.probe_sites[name], f"{value:.3f}")
    console.print(table)
    for case in report.cases:
        _print_case(case)
    console.print("\n[bold]a stored conversation, checked without generating[/]")
    _print_case(report.stored)
    stats = Table(title="\nrules over the demo prompts (expected: harmful and jailbreak prompts flagged)")
    for column in ("rule", "fires", "precision", "recall", "FPR"):
        stats.add_column(column, justify="left" if column == "rule" else "right")
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
    for e in case.events:
        ces = ", ".join(f"{k}={v:.2f}" for k, v in e.ces.items())
        console.print(f"  [{colour}]{e.action:>5}[/] {e.rule} ({e.severity}) at {e.where} token "
                      f"{e.token_index} {escape(repr(e.token))}  [dim]{escape(ces)}[/]")


@organism_app.command("train")
def organism_train(out: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
                   steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1100,
                   seed: Annotated[int, typer.Option(help="Seed for corpus and weights.")] = 0,
                   threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
                   exclude_leaked: Annotated[bool, typer.Option(help="Train a clean reference without the memorised items.")] = False) -> None:
    """Train the model organism from its synthetic corpus (about 7 minutes on 2 CPU cores)."""
    from gavel.organism.train import TrainConfig, train_organism

    with user_errors(), progress_bar("training", steps) as advance:
        cfg = TrainConfig(steps=steps, seed=seed, threads=threads, exclude_leaked_items=exclude_leaked)
        report = train_organism(out, cfg, on_step=lambda step, loss: advance(1))
    console.print(f"trained in {report['train_seconds']} s, final loss {report['final_loss']:.3f}: {out}")


@organism_app.command("eval")
def organism_eval(model: ModelOpt = "builtin:organism", as_json: JsonOpt = False) -> None:
    """Measure the organism's planted behaviours by greedy generation."""
    from gavel.models.loading import load_model
    from gavel.organism.behaviour import measure_behaviour

    with user_errors():
        rates = measure_behaviour(load_model(model))
    if as_json:
        print(json.dumps(rates, indent=2))
        return
    table = Table(title=f"organism behaviour: {model}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rates.items():
        table.add_row(k, f"{v:.3f}")
    console.print(table)


BankOpt = Annotated[Path, typer.Option("--bank", "-b", help="A CE bank directory.")]
DataOpt = Annotated[list[str], typer.Option("--data", "-d", help="builtin:organism[:N], a labelled-span .jsonl file, "
                                            "or a GAVEL ces/ directory; repeat to merge.")]
METRIC_COLUMNS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("tpr_at_1pct_fpr", "TPR@1%FPR"),
                  ("sequence_tpr", "seq TPR"), ("sequence_fpr", "seq FPR"))


def _load_data(specs: list[str], tokenizer):
    from gavel.organism.datasets import load_dataset
    from gavel.probes.data import merge_datasets

    datasets = [load_dataset(spec, tokenizer) for spec in specs]
    return datasets[0] if len(datasets) == 1 else merge_datasets(*datasets)


def _metrics_table(title: str, rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> Table:
    table = Table(title=title)
    table.add_column("CE")
    if extra:
        table.add_column("read at")
    for _, header in METRIC_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("threshold", justify="right")
    for name, m in rows.items():
        cells = [f"{m[key]:.3f}" for key, _ in METRIC_COLUMNS]
        table.add_row(name, *([extra[name]] if extra else []), *cells, f"{m['threshold']:.3f}")
    return table


@ce_app.command("fit")
def ce_fit(out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the bank to.")],
           data: DataOpt, model: ModelOpt = "builtin:organism",
           site: Annotated[list[str], typer.Option(help="Candidate site(s); each CE is read where it scores best. "
                                                   "'auto' tries every layer's hook_resid_post.")] = ["auto"],
           extractor: Annotated[str, typer.Option(help="linear (logistic probes), diff_means, or sae (SAE latents).")] = "linear",
           sae: Annotated[Optional[Path], typer.Option(help="With --extractor sae: a saved sae-lens SAE directory.")] = None,
           latents: Annotated[int, typer.Option(help="With --extractor sae: latents combined per CE.")] = 8,
           concat: Annotated[bool, typer.Option(help="Read every CE from all sites concatenated.")] = False,
           calibration: Annotated[str, typer.Option(help="youden (max TPR-FPR over sequences) or fpr.")] = "youden",
           target_fpr: Annotated[float, typer.Option(help="With --calibration fpr: sequence false-positive rate.")] = 0.01,
           C: Annotated[float, typer.Option("--C", help="Inverse L2 strength of linear probes.")] = 1.0,
           seed: Annotated[int, typer.Option(help="Seed of the train/calibration/test split.")] = 0,
           as_json: JsonOpt = False) -> None:
    """Fit a calibrated CE bank on labelled data and report held-out metrics per CE."""
    from gavel.models.loading import load_model
    from gavel.probes.fit import fit_bank

    with user_errors():
        handle = load_model(model)
        dataset = _load_data(data, handle.tokenizer)
        sites = [f"blocks.{layer}.hook_resid_post" for layer in range(handle.n_layers)] if site == ["auto"] else site
        params = {"linear": {"C": C}, "diff_means": {},
                  "sae": {"method": "mean_diff", "combine": "nonneg", "max_latents": latents}}.get(extractor)
        loaded_sae = None
        if extractor == "sae":
            from gavel.probes.sae import load_sae

            if sae is None:
                raise GavelError("--extractor sae needs --sae DIR (a saved sae-lens SAE)")
            loaded_sae = load_sae(sae)
        with progress_bar("collecting activations", len(dataset.examples), enabled=not as_json) as advance:
            bank = fit_bank(handle, dataset, sites, extractor=extractor, concat=concat, params=params,
                            calibration=calibration, target_fpr=target_fpr, seed=seed, sae=loaded_sae,
                            progress=advance, provenance={"data": " + ".join(data), "model": model})
        bank.save(out)
    rows = {c.name: {**c.metrics, "threshold": c.threshold} for c in bank.manifest.ces}
    if as_json:
        print(json.dumps({"bank": str(out), "ces": rows}, indent=2))
        return
    where = {c.name: "+".join(bank.heads[c.head].sites) for c in bank.manifest.ces}
    console.print(_metrics_table(f"CE bank {out} (held-out test split)", rows, where))


@ce_app.command("eval")
def ce_eval(bank: BankOpt, data: DataOpt, model: ModelOpt = "builtin:organism",
            force: Annotated[bool, typer.Option(help="Skip the model fingerprint check.")] = False,
            as_json: JsonOpt = False) -> None:
    """Measure a CE bank on labelled data: AUROC, AUPRC, TPR at 1% FPR, sequence rates, support."""
    from gavel.models.loading import load_model
    from gavel.probes.bank import CEBank
    from gavel.probes.evaluate import evaluate_bank

    with user_errors():
        handle = load_model(model)
        loaded = CEBank.load(bank, fingerprint=handle.fingerprint(), force=force)
        dataset = _load_data(data, handle.tokenizer)
        with progress_bar("collecting activations", len(dataset.examples), enabled=not as_json) as advance:
            rows = evaluate_bank(handle, loaded, dataset, progress=advance)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console.print(_metrics_table(f"CE bank {bank} on {' + '.join(data)}", rows))


@ce_app.command("list")
def ce_list(bank: BankOpt, as_json: JsonOpt = False) -> None:
    """List the CEs of a bank with where they are read and their thresholds."""
    from gavel.probes.bank import CEBank

    with user_errors():
        loaded = CEBank.load(bank)
    rows = [{"name": c.name, "title": c.title, "role": c.role, "sites": loaded.heads[c.head].sites,
             "extractor": c.extractor, "threshold": c.threshold, "auroc": c.metrics.get("auroc")}
            for c in loaded.manifest.ces]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{bank}: {len(rows)} CEs for {loaded.manifest.fingerprint.name}")
    for column in ("CE", "role", "read at", "extractor", "threshold", "AUROC"):
        table.add_column(column)
    for r in rows:
        auroc = "" if r["auroc"] is None else f"{r['auroc']:.3f}"
        table.add_row(r["name"], r["role"] or "", "+".join(r["sites"]), r["extractor"], f"{r['threshold']:.3f}", auroc)
    console.print(table)


@ce_app.command("show")
def ce_show(bank: BankOpt, name: Annotated[str, typer.Argument(help="The CE to show.")], as_json: JsonOpt = False) -> None:
    """Everything the bank knows about one CE."""
    from gavel.probes.bank import CEBank

    with user_errors():
        loaded = CEBank.load(bank)
        spec = loaded.spec(name)
    head = loaded.manifest.heads[spec.head]
    record = {**spec.model_dump(), "sites": head.sites, "head_kind": head.kind,
              "hyperparameters": head.hyperparameters, "data_digest": loaded.manifest.data_digest}
    if as_json:
        print(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        console.print(f"[bold]{key}[/]: {escape(str(value))}")


def main() -> Optional[int]:
    return app()
