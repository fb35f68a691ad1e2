"""What every gavel command shares: consoles, the user-error boundary, progress bars, common options."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gavel.errors import DataError, GavelError

if TYPE_CHECKING:
    from gavel.artifacts import FittedOn


def _width(stream) -> int | None:
    """The terminal's width on a terminal; elsewhere (a file, a pipe, a test) wide enough that tables keep their
    columns whole, where rich would otherwise wrap them at 80."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:organism, builtin:smollm2, a local model "
                                       "directory, a .gguf file, or a hub id.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """A GavelError is the user's to fix: one message on stderr, exit code 2, no traceback.

    Also turns off Hugging Face's own progress bars (the CLI draws its own), before anything imports them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        yield
    except GavelError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(code=2) from None


def make_table(*columns: str, title: str | None = None, numeric: Iterable[str] = ()) -> Table:
    """A table whose cells fold onto further lines where the console is too narrow, never cut to '...'
    (every table the CLI prints is made here); `numeric` columns are right-aligned."""
    right = set(numeric)
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold", justify="right" if column in right else "left")
    return table


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Progress on stderr; yields an `advance(n)` callback for library code.

    A rich bar on a terminal; elsewhere (stderr to a file or a pipe) plain lines such as
    `collecting activations: 120/1000 (12%) 00:31 elapsed`, one per 10% done or per 30 s, and one at the end.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not err_console.is_terminal:
        lines = ProgressLines(description, total)
        yield lines.advance
        lines.finish()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


class ProgressLines:
    """Progress as plain lines on stderr, for logs: at each further tenth of `total`, after `every` seconds
    without a line, and at the end."""

    def __init__(self, description: str, total: int, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.every, self.clock = description, max(total, 0), every, clock
        self.done = self.tenths = 0
        self.start = self.last = clock()

    def advance(self, n: int) -> None:
        self.done += n
        tenths = 10 * self.done // self.total if self.total else 10
        if tenths > self.tenths or self.clock() - self.last >= self.every:
            self.tenths = tenths
            self._line()

    def finish(self) -> None:
        """The closing line, unless the last one already said everything was done."""
        if self.tenths < 10 or self.done < self.total:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        self.last = now
        percent = f" ({100 * self.done // self.total}%)" if self.total else ""
        elapsed = int(now - self.start)
        hours, rest = divmod(elapsed, 3600)
        clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
        err_console.print(f"{self.description}: {self.done}/{self.total}{percent} {clock} elapsed",
                          markup=False, highlight=False, soft_wrap=True)


DataOpt = Annotated[list[str], typer.Option("--data", "-d", help="builtin:organism[:N[:SEED]] (SEED of the corpus, "
                                            "default 0), a labelled-span .jsonl file, or a GAVEL ces/ directory; "
                                            "repeat to merge.")]


def load_data(specs: list[str], tokenizer, which: str = "excitation", shown: set[str] | None = None):
    """The datasets `specs` name, merged; keys of GAVEL files gavel keeps but does not read are shown as warnings
    (each once, also across calls sharing `shown`)."""
    from gavel.organism.datasets import gavel_folder, load_dataset
    from gavel.probes.data import merge_datasets

    datasets, shown = [], set() if shown is None else shown
    for spec in specs:
        warnings: list = []
        datasets.append(load_dataset(spec, tokenizer, which=which,
                                     **({"warnings": warnings} if gavel_folder(spec) else {})))
        for warning in dict.fromkeys(map(str, warnings)):
            if warning not in shown:
                shown.add(warning)
                err_console.print(escape(warning), soft_wrap=True, highlight=False)
    return datasets[0] if len(datasets) == 1 else merge_datasets(*datasets)


# ---- fit and evaluation data are disjoint (docs/evaluation.md, "Fit and evaluation data")
AllowOverlapOpt = Annotated[bool, typer.Option(
    "--allow-overlap", help="Evaluate even on items the artifact was fitted on (refused otherwise); the report "
                            "counts them per set.")]


def check_overlap(fitted_on: FittedOn | None, evaluated: Mapping[str, Sequence[Any]], *, artifact: str,
                  allow: bool, noun: str = "prompts", held_out: str = "held-out data") -> dict[str, Any]:
    """The `overlap` field of an evaluation report: per evaluation set (named by its option, e.g. `--benign`), how
    many of its items the artifact was fitted on. Any at all is a DataError naming the counts and the fit set,
    unless `allow`; an artifact that records no fit data (`fitted_on` None) is evaluated, with `fit_data` unknown."""
    if fitted_on is None:
        return {"fit_data": "unknown", "allowed": allow,
                "sets": {flag: {"overlapping": None, "total": len(items), "fit_sets": []}
                         for flag, items in evaluated.items()}}
    sets = {flag: fitted_on.overlap(items) for flag, items in evaluated.items()}
    for flag, found in sets.items():
        if found.overlapping and not allow:
            theirs = ", ".join(f"--{name}" for name in found.fit_sets)
            raise DataError(f"{found.overlapping} of {found.total} evaluation {noun} in {flag} were used to fit "
                            f"{artifact} (its {theirs}); pass {held_out}, or --allow-overlap to evaluate anyway")
    return {"fit_data": "recorded", "allowed": allow, "sets": {flag: o.model_dump() for flag, o in sets.items()}}


def print_overlap(overlap: Mapping[str, Any], artifact: str, noun: str = "prompts") -> None:
    """The human form: a warning line per evaluation set that reuses fit data, or one saying the fit data is
    unknown; nothing when the evaluation is held out."""
    if overlap["fit_data"] == "unknown":
        console.print(f"[yellow]note:[/] fit data unknown: {escape(artifact)} records none, so the evaluation data "
                      "was not checked for overlap with it", soft_wrap=True)
        return
    for flag, found in overlap["sets"].items():
        if found["overlapping"]:
            console.print(f"[bold yellow]warning:[/] {found['overlapping']} of {found['total']} evaluation {noun} in "
                          f"{flag} were used to fit {escape(artifact)} (--allow-overlap): not a held-out evaluation",
                          soft_wrap=True)
