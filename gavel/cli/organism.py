"""`gavel organism train | eval`: train the built-in model organism and measure its planted behaviours."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gavel.cli.common import JsonOpt, ModelOpt, console, make_table, progress_bar, user_errors

organism_app = typer.Typer(help="Train and measure the built-in model organism.", no_args_is_help=True)


@organism_app.command("train")
def organism_train(out: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
                   steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1100,
                   seed: Annotated[int, typer.Option(help="Seed for corpus and weights.")] = 0,
                   threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
                   exclude_leaked: Annotated[bool, typer.Option(
                       help="Train a clean reference without the memorised items.")] = False) -> None:
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
    table = make_table("measure", "value", title=f"organism behaviour: {model}", numeric=("value",))
    for k, v in rates.items():
        table.add_row(k, f"{v:.3f}")
    console.print(table)
