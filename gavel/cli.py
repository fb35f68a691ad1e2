"""The `gavel` command line. Heavy libraries (torch, transformers) are imported inside commands only."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gavel.errors import GavelError

app = typer.Typer(help="gavel: cognitive-element probes, safety rules and a real-time monitor for LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
organism_app = typer.Typer(help="Train and measure the built-in model organism.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")
console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:organism, a local model directory, or a hub id.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """A GavelError is the user's to fix: one line on stderr, exit code 2, no traceback.

    Also silences transformers' own progress bars: the CLI draws its own.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    except GavelError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(code=2) from None


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields an `advance(n)` callback for library code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@app.command()
def demo(model: ModelOpt = "builtin:organism", as_json: JsonOpt = False,
         max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 48) -> None:
    """Fit CE probes on the organism, load the demo rules and show guarded generations."""
    from gavel.demo import run_demo

    with user_errors(), progress_bar("collecting activations", 2000, enabled=not as_json) as advance:
        report = run_demo(model, max_new_tokens=max_new_tokens, progress=advance)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    table = Table(title=f"CE probes at {report.site} (held-out AUROC)")
    table.add_column("CE")
    table.add_column("AUROC", justify="right")
    for name, value in report.probe_auroc.items():
        table.add_row(name, f"{value:.3f}")
    console.print(table)
    for case in report.cases:
        colour = "red" if case.blocked else ("yellow" if case.events else "green")
        console.print(f"\n[bold {colour}]{case.kind}[/]  [dim]user:[/] {escape(case.prompt)}")
        if case.blocked:
            console.print(f"  [dim]model began:[/] {escape(case.generated)}")
        console.print(f"  [dim]reply:[/] {escape(case.reply)}")
        for e in case.events:
            ces = ", ".join(f"{k}={v:.2f}" for k, v in e.ces.items())
            console.print(f"  [{colour}]{e.action:>5}[/] {e.rule} ({e.severity}) at {e.where} token "
                          f"{e.token_index} {escape(repr(e.token))}  [dim]{escape(ces)}[/]")
    console.print(f"\n[dim]demo finished in {report.seconds:.1f} s[/]")


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


def main() -> Optional[int]:
    return app()
