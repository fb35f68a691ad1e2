"""`gavel ce fit | eval | list | show`: fit, evaluate and inspect cognitive-element (CE) banks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from gavel.cli.common import JsonOpt, ModelOpt, console, progress_bar, user_errors
from gavel.errors import GavelError

ce_app = typer.Typer(help="Fit, evaluate and inspect cognitive-element (CE) banks.", no_args_is_help=True)
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
           extractor: Annotated[str, typer.Option(
               help="linear (logistic probes), diff_means, or sae (SAE latents).")] = "linear",
           sae: Annotated[Path | None, typer.Option(
               help="With --extractor sae: a saved sae-lens SAE directory.")] = None,
           latents: Annotated[int, typer.Option(help="With --extractor sae: latents combined per CE.")] = 8,
           concat: Annotated[bool, typer.Option(help="Read every CE from all sites concatenated.")] = False,
           calibration: Annotated[str, typer.Option(help="youden (max TPR-FPR over sequences) or fpr.")] = "youden",
           target_fpr: Annotated[float, typer.Option(
               help="With --calibration fpr: sequence false-positive rate.")] = 0.01,
           C: Annotated[float, typer.Option("--C", help="Inverse L2 strength of linear probes.")] = 1.0,
           seed: Annotated[int, typer.Option(help="Seed of the train/calibration/test split.")] = 0,
           as_json: JsonOpt = False) -> None:
    """Fit a calibrated CE bank on labelled data and report held-out metrics per CE."""
    from gavel.models.loading import load_model
    from gavel.probes.fit import calibration_method, fit_bank

    with user_errors():
        handle = load_model(model)
        dataset = _load_data(data, handle.tokenizer)
        sites = [f"blocks.{layer}.hook_resid_post" for layer in range(handle.n_layers)] if site == ["auto"] else site
        defaults: dict[str, dict[str, object]] = {
            "linear": {"C": C}, "diff_means": {},
            "sae": {"method": "mean_diff", "combine": "nonneg", "max_latents": latents}}
        params = defaults.get(extractor)
        loaded_sae = None
        if extractor == "sae":
            from gavel.probes.sae import load_sae

            if sae is None:
                raise GavelError("--extractor sae needs --sae DIR (a saved sae-lens SAE)")
            loaded_sae = load_sae(sae)
        with progress_bar("collecting activations", len(dataset.examples), enabled=not as_json) as advance:
            bank = fit_bank(handle, dataset, sites, extractor=extractor, concat=concat, params=params,
                            calibration=calibration_method(calibration), target_fpr=target_fpr, seed=seed,
                            sae=loaded_sae, progress=advance, provenance={"data": " + ".join(data), "model": model})
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
    for c in loaded.manifest.ces:
        auroc = c.metrics.get("auroc")
        table.add_row(c.name, c.role or "", "+".join(loaded.heads[c.head].sites), c.extractor, f"{c.threshold:.3f}",
                      "" if auroc is None else f"{auroc:.3f}")
    console.print(table)


@ce_app.command("show")
def ce_show(bank: BankOpt, name: Annotated[str, typer.Argument(help="The CE to show.")],
            as_json: JsonOpt = False) -> None:
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
