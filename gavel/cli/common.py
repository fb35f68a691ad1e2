"""What every gavel command shares: consoles, the user-error boundary, progress bars, common options."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gavel.errors import GavelError


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


DataOpt = Annotated[list[str], typer.Option("--data", "-d", help="builtin:organism[:N], a labelled-span .jsonl file, "
                                            "or a GAVEL ces/ directory; repeat to merge.")]


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
