"""What every gavel command shares: consoles, the user-error boundary, progress bars, common options."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gavel.errors import GavelError


def _width(stream) -> int | None:
    """The terminal's width on a terminal; elsewhere (a file, a pipe, a test) wide enough that tables keep their
    columns whole, where rich would otherwise wrap them at 80."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:organism, a local model directory, or a hub id.")]


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
