"""`gavel sae train`: train a sparse autoencoder on one site of a model with sae-lens's trainer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gavel.cli.common import DataOpt, JsonOpt, ModelOpt, console, load_data, make_table, progress_bar, user_errors
from gavel.errors import GavelError

sae_app = typer.Typer(help="Train sparse autoencoders (SAEs) for SAE-latent CEs.", no_args_is_help=True)
_OPTION_OF = {"budget_s": "--budget"}  # config fields whose option is not --field-name


@sae_app.command("train")
def sae_train(out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the SAE (sae-lens format) "
                                                "and training_report.json to.")],
              data: DataOpt,
              site: Annotated[str, typer.Option(help="The site the SAE reads, e.g. blocks.16.hook_resid_post.")],
              d_sae: Annotated[int, typer.Option(help="Latents.")],
              model: ModelOpt = "builtin:organism",
              architecture: Annotated[str, typer.Option(
                  help="standard (ReLU + L1) or jumprelu (L0 penalty): both usable for SAE CEs.")] = "standard",
              sparsity: Annotated[float, typer.Option(
                  help="Sparsity coefficient: L1 (standard) or L0 (jumprelu), on activations scaled to mean norm "
                       "sqrt(d_model).")] = 5.0,
              sparsity_warmup: Annotated[int | None, typer.Option(
                  help="Steps over which the sparsity coefficient rises from 0 (default: 5% of the steps; set it "
                       "when --budget stops training first).")] = None,
              tokens: Annotated[int, typer.Option(help="Training tokens; epochs repeat the data.")] = 1_000_000,
              batch_size: Annotated[int, typer.Option(help="Tokens per training step.")] = 4096,
              lr: Annotated[float, typer.Option(help="Adam's learning rate.")] = 3e-4,
              seed: Annotated[int, typer.Option(help="Seed of the initialisation, shuffles and held-out split.")]
              = 0,
              holdout: Annotated[float, typer.Option(help="Share of the examples held out for the report.")] = 0.1,
              budget: Annotated[float | None, typer.Option(
                  help="Wall-clock seconds for collecting activations and training; training stops there.")] = None,
              force: Annotated[bool, typer.Option(help="Write into --out even if it is not empty.")] = False,
              as_json: JsonOpt = False) -> None:
    """Train an SAE on a site's activations over the examples of --data, and report on held-out examples: fraction
    of variance unexplained, L0, dead latents, and the next-token loss with the reconstruction spliced in.

    The SAE loads with `gavel ce fit --extractor sae --sae OUT --site SITE`."""
    from pydantic import ValidationError

    from gavel.models.loading import load_model
    from gavel.probes.sae_train import SAETrainConfig, save_trained, train_sae

    with user_errors():
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
            raise GavelError(f"{out} already exists" + (" and is not empty" if out.is_dir() else ""),
                             hint="choose another --out, or pass --force to write into it")
        try:
            config = SAETrainConfig.model_validate(dict(
                d_sae=d_sae, architecture=architecture, sparsity=sparsity, sparsity_warmup=sparsity_warmup,
                tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, holdout=holdout, budget_s=budget))
        except ValidationError as e:
            error = e.errors()[0]
            field = str(error["loc"][0])
            raise GavelError(f"{_OPTION_OF.get(field, '--' + field.replace('_', '-'))}: {error['msg']}") from None
        handle = load_model(model)
        dataset = load_data(data, handle.tokenizer)
        sae, report = train_sae(handle, dataset, site, config, progress=progress_bar)
        save_trained(sae, report, out)
    if as_json:
        print(json.dumps({"sae": str(out), "report": report.model_dump(mode="json")}, indent=2))
        return
    held = report.held_out
    table = make_table("measure", "value", numeric=("value",),
                       title=f"SAE {out}: {config.architecture}, {report.d_in} -> {config.d_sae} at {site} "
                             f"(held out: {held.examples} examples, {held.tokens} tokens)")
    for name, value in (("fraction of variance unexplained", f"{held.fvu:.3f}"), ("L0", f"{held.l0:.1f}"),
                        ("dead latents", f"{held.dead_fraction:.1%}"),
                        ("next-token loss, clean", f"{held.loss_clean:.3f}"),
                        ("next-token loss, SAE spliced in", f"{held.loss_spliced:.3f}"),
                        ("next-token loss, zero-ablated", f"{held.loss_zero:.3f}"),
                        ("loss recovered", f"{held.loss_recovered:.3f}"),
                        ("training steps", f"{report.steps} (stopped by {report.stopped})"),
                        ("tokens seen", f"{report.tokens_seen} ({report.epochs:.1f} epochs)"),
                        ("seconds: collect / train / evaluate",
                         f"{report.seconds_collect:.0f} / {report.seconds_train:.0f} / {report.seconds_eval:.0f}")):
        table.add_row(name, value)
    console.print(table)
