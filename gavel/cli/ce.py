"""`gavel ce fit | eval | list | show`: fit, evaluate and inspect cognitive-element (CE) banks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from gavel.cli.common import (
    AllowOverlapOpt,
    DataOpt,
    JsonOpt,
    ModelOpt,
    check_overlap,
    console,
    load_data,
    make_table,
    print_overlap,
    progress_bar,
    user_errors,
)
from gavel.errors import GavelError, one_of

ce_app = typer.Typer(help="Fit, evaluate and inspect cognitive-element (CE) banks.", no_args_is_help=True)
BankOpt = Annotated[Path, typer.Option("--bank", "-b", help="A CE bank directory.")]
METRIC_COLUMNS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("tpr_at_1pct_fpr", "TPR@1%FPR"),
                  ("sequence_tpr", "seq TPR"), ("sequence_fpr", "seq FPR"))
THRESHOLD_SOURCES = ("auto", "calibration", "split")


def _calibration_data(specs: list[str], tokenizer, source: str, shown: set[str]):
    """GAVEL calibration sets for `ce fit`, or None for the split: `auto` uses them when every --data is a GAVEL
    folder whose CEs all have calibration.json, `calibration` requires them, `split` never reads them."""
    from gavel.organism.datasets import has_calibration

    source = one_of(source, THRESHOLD_SOURCES, "--thresholds-from source")
    missing = [spec for spec in specs if not has_calibration(spec)]
    if source == "split" or (source == "auto" and missing):
        return None
    if missing:
        raise GavelError(f"--thresholds-from calibration needs GAVEL ces/ folders whose every CE has a "
                         f"calibration.json; {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not")
    return load_data(specs, tokenizer, which="calibration", shown=shown)


def _metrics_table(title: str, rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> Table:
    table = make_table("CE", *(["read at"] if extra else []), *(header for _, header in METRIC_COLUMNS), "threshold",
                       title=title, numeric=[header for _, header in METRIC_COLUMNS] + ["threshold"])
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
           pool: Annotated[list[int], typer.Option(
               help="Candidate pooling widths: a CE's score is the mean over the last N tokens (1: each token "
                    "alone); repeat to let each CE pick the width that scores best on calibration data.")] = [1],
           calibration: Annotated[str, typer.Option(help="youden (max TPR-FPR over sequences) or fpr.")] = "youden",
           target_fpr: Annotated[float, typer.Option(
               help="With --calibration fpr: sequence false-positive rate.")] = 0.01,
           C: Annotated[float, typer.Option("--C", help="Inverse L2 strength of linear probes.")] = 1.0,
           seed: Annotated[int, typer.Option(help="Seed of the train/calibration/test split.")] = 0,
           thresholds_from: Annotated[str, typer.Option(
               help="Where Platt scaling and thresholds are fitted: calibration (GAVEL folders' calibration.json "
                    "conversations; the excitation samples are split train/test), split (20% of the examples), "
                    "or auto (calibration when every --data folder has them, else split).")] = "auto",
           max_rows: Annotated[int, typer.Option(
               help="Training tokens kept per site (float32): bounds memory at about "
                    "max-rows x d_model x sites x 4 bytes.")] = 20_000,
           as_json: JsonOpt = False) -> None:
    """Fit a calibrated CE bank on labelled data and report held-out metrics per CE.

    Activations stream through: memory holds a bounded sample of training rows and the scores of the held-out
    rows, never a whole dataset's activations (see docs/probes.md, "Memory"). The bank records a digest of every
    conversation of --data (and its calibration sets), so `ce eval` can refuse to evaluate on them."""
    from gavel.artifacts import FittedOn
    from gavel.models.loading import load_model
    from gavel.probes.fit import calibration_method, fit_bank

    with user_errors():
        handle = load_model(model)
        shown: set[str] = set()
        dataset = load_data(data, handle.tokenizer, shown=shown)
        calibration_data = _calibration_data(data, handle.tokenizer, thresholds_from, shown)
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
        total = len(dataset.examples) + (len(calibration_data.examples) if calibration_data is not None else 0)
        provenance = {"data": " + ".join(data), "model": model}
        if calibration_data is not None:
            provenance["calibration_data"] = " + ".join(f"{spec} (calibration.json)" for spec in data)
        with progress_bar("collecting activations", total) as advance:           # stderr: never in the JSON
            bank = fit_bank(handle, dataset, sites, extractor=extractor, concat=concat, pools=pool, params=params,
                            calibration=calibration_method(calibration), target_fpr=target_fpr, seed=seed,
                            calibration_data=calibration_data, max_rows=max_rows, sae=loaded_sae, progress=advance,
                            provenance=provenance)
        fit_sets = {"data": (" + ".join(data), _items(dataset))}
        if calibration_data is not None:
            fit_sets["data (calibration)"] = (" + ".join(data), _items(calibration_data))
        bank.manifest = bank.manifest.model_copy(update={"fitted_on": FittedOn.of(fit_sets)})
        bank.save(out)
    rows = {c.name: {**c.metrics, "threshold": c.threshold} for c in bank.manifest.ces}
    if as_json:
        print(json.dumps({"bank": str(out), "thresholds_from": bank.manifest.provenance["thresholds_from"],
                          "ces": rows}, indent=2))
        return
    where = {c.name: bank.read_at(c.head) for c in bank.manifest.ces}
    console.print(_metrics_table(f"CE bank {out} (held-out test split; thresholds from "
                                 f"{bank.manifest.provenance['thresholds_from']})", rows, where))


@ce_app.command("eval")
def ce_eval(bank: BankOpt, data: DataOpt, model: ModelOpt = "builtin:organism",
            force: Annotated[bool, typer.Option(help="Skip the model fingerprint check.")] = False,
            which: Annotated[str, typer.Option(
                help="With GAVEL ces/ folders: excitation (single exchanges) or calibration (their calibration.json "
                     "conversations).")] = "excitation",
            allow_overlap: AllowOverlapOpt = False,
            drop_overlap: Annotated[bool, typer.Option(
                "--drop-overlap", help="Leave out the conversations the bank was fitted on and evaluate on the "
                                       "rest (e.g. of builtin:organism:N:SEED, another seed than the fit's).")] = False,
            as_json: JsonOpt = False) -> None:
    """Measure a CE bank on labelled data: AUROC, AUPRC, TPR at 1% FPR, sequence rates, support.

    --data must be held out: a conversation the bank was fitted on is refused unless --allow-overlap (or left out
    with --drop-overlap); the JSON's `overlap` counts them either way."""
    from gavel.models.loading import load_model
    from gavel.probes.bank import CEBank
    from gavel.probes.data import CEDataset
    from gavel.probes.evaluate import evaluate_bank

    with user_errors():
        handle = load_model(model)
        loaded = CEBank.load(bank, fingerprint=handle.fingerprint(), force=force)
        dataset = load_data(data, handle.tokenizer, which)
        fitted_on, dropped = loaded.manifest.fitted_on, 0
        if drop_overlap and fitted_on is not None:
            shared = fitted_on.overlapping(_items(dataset))
            dropped = sum(shared)
            dataset = CEDataset(dataset.ces, tuple(e for e, s in zip(dataset.examples, shared) if not s))
            if not dataset.examples:
                raise GavelError(f"every conversation of --data was used to fit the CE bank {bank}; pass held-out "
                                 "data (e.g. builtin:organism:N:SEED with another seed than the fit's)")
        overlap = {**check_overlap(fitted_on, {"--data": _items(dataset)}, artifact=f"the CE bank {bank}",
                                   allow=allow_overlap, noun="conversations",
                                   held_out="held-out data (e.g. builtin:organism:N:SEED with another seed than the "
                                            "fit's, with --drop-overlap)"), "dropped": dropped}
        with progress_bar("collecting activations", len(dataset.examples)) as advance:
            rows = evaluate_bank(handle, loaded, dataset, progress=advance)
    if as_json:
        print(json.dumps({"ces": rows, "overlap": overlap}, indent=2))
        return
    print_overlap(overlap, f"the CE bank {bank}", noun="conversations")
    if dropped:
        console.print(f"left out {dropped} conversations the bank was fitted on (--drop-overlap)")
    suffix = " (calibration sets)" if which == "calibration" else ""
    console.print(_metrics_table(f"CE bank {bank} on {' + '.join(data)}{suffix}", rows))


def _items(dataset) -> list[list[int]]:
    """A CE dataset's conversations as what fit and evaluation data are compared by: their token ids."""
    return [e.encoded.input_ids.tolist() for e in dataset.examples]


@ce_app.command("threshold")
def ce_threshold(bank: BankOpt, data: DataOpt,
                 out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the new bank to.")],
                 model: ModelOpt = "builtin:organism",
                 which: Annotated[str, typer.Option(
                     help="With GAVEL ces/ folders: excitation or calibration (their conversations).")] = "calibration",
                 target_fpr: Annotated[float, typer.Option(
                     help="Share of the neutral conversations each CE may fire in.")] = 0.01,
                 ce_fpr: Annotated[list[str], typer.Option(
                     help="NAME=RATE: another share for one CE (e.g. one that rules only combine with others); "
                          "repeat for several.")] = [],
                 force: Annotated[bool, typer.Option(help="Skip the model fingerprint check.")] = False,
                 as_json: JsonOpt = False) -> None:
    """Set a bank's thresholds again, without refitting, so each CE fires in at most --target-fpr of the neutral
    conversations (those carrying no CE) of --data: the false-positive rate of everyday text."""
    from gavel.models.loading import load_model
    from gavel.probes.bank import CEBank
    from gavel.probes.rethreshold import neutral_examples, threshold_on_benign

    with user_errors():
        handle = load_model(model)
        loaded = CEBank.load(bank, fingerprint=handle.fingerprint(), force=force)
        dataset = load_data(data, handle.tokenizer, which)
        per_ce = {}
        for item in ce_fpr:
            name, _, rate = item.partition("=")
            try:
                per_ce[name.strip()] = float(rate)
            except ValueError:
                raise GavelError(f"--ce-fpr takes NAME=RATE (e.g. impersonation=0.05), not {item!r}") from None
        with progress_bar("scoring neutral conversations", len(neutral_examples(dataset))) as advance:
            new = threshold_on_benign(handle, loaded, dataset, target_fpr=target_fpr, per_ce=per_ce,
                                      source=" + ".join(data), progress=advance)
        new.save(out)
    rows = {c.name: {"old": old.threshold, "new": c.threshold} for c, old in zip(new.manifest.ces, loaded.manifest.ces)}
    if as_json:
        print(json.dumps({"bank": str(out), "thresholds_from": new.manifest.provenance["thresholds_from"],
                          "thresholds": rows}, indent=2))
        return
    table = make_table("CE", "old threshold", "new threshold", numeric=("old threshold", "new threshold"),
                       title=f"{out}: thresholds from {new.manifest.provenance['thresholds_from']}")
    for name, row in rows.items():
        table.add_row(name, f"{row['old']:.5f}", f"{row['new']:.5f}")
    console.print(table)


@ce_app.command("list")
def ce_list(bank: BankOpt, as_json: JsonOpt = False) -> None:
    """List the CEs of a bank with where they are read and their thresholds."""
    from gavel.probes.bank import CEBank

    with user_errors():
        loaded = CEBank.load(bank)
    rows = [{"name": c.name, "title": c.title, "role": c.role, "sites": loaded.heads[c.head].sites,
             "pool": loaded.pools[c.head],
             "extractor": c.extractor, "threshold": c.threshold, "auroc": c.metrics.get("auroc")}
            for c in loaded.manifest.ces]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = make_table("CE", "role", "read at", "extractor", "threshold", "AUROC", numeric=("threshold", "AUROC"),
                       title=f"{bank}: {len(rows)} CEs for {loaded.manifest.fingerprint.name}")
    for c in loaded.manifest.ces:
        auroc = c.metrics.get("auroc")
        table.add_row(c.name, c.role or "", loaded.read_at(c.head), c.extractor, f"{c.threshold:.3f}",
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
              "pool": head.pool, "hyperparameters": head.hyperparameters, "data_digest": loaded.manifest.data_digest}
    if as_json:
        print(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        console.print(f"[bold]{key}[/]: {escape(str(value))}")
