"""The `gavel` command line: one module per command group, assembled here. Heavy libraries (torch, transformers) are
imported inside commands only, so `gavel --help` stays fast.

Exit codes, for every command: 0 clean, 1 findings (a rule fired, a test failed), 2 bad input or failure. An
unexpected exception is one line on stderr and exit 2 here, never a traceback with exit 1 (the code of findings);
`gavel --debug ...` or GAVEL_DEBUG=1 shows the traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from gavel.cli.align import align_app
from gavel.cli.audit import audit
from gavel.cli.ce import ce_app
from gavel.cli.chat import chat
from gavel.cli.decon import decon_app
from gavel.cli.demo import demo
from gavel.cli.neurons import neurons_app
from gavel.cli.organism import organism_app
from gavel.cli.plugins import plugins_app
from gavel.cli.rules import rules_app
from gavel.cli.sae import sae_app
from gavel.cli.serve import serve
from gavel.cli.steer import steer_app

FAILURE = 2   # the exit code of bad input and of failures (1 means findings)
DEBUG_ENV = "GAVEL_DEBUG"


class _Gavel(TyperGroup):
    """The top-level group: every command runs inside `invoke`, so an exception no command handled ends here."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException, EOFError, KeyboardInterrupt):
            raise   # exits, aborts and usage errors already carry their code (usage errors: 2)
        except Exception as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"error: {type(e).__name__}{': ' + first if first else ''} (internal error; run with --debug or "
                  f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            raise typer.Exit(FAILURE) from None


app = typer.Typer(help="gavel: cognitive-element probes, safety rules and a real-time monitor for LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_Gavel)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an internal error.")]
             = False) -> None:
    """gavel: cognitive-element probes, safety rules and a real-time monitor for LLMs."""
    # `debug` is read where errors are caught (_Gavel.invoke, from the context's parameters)
    _show_library_notes()


def _show_library_notes() -> None:
    """The library's INFO notes (e.g. a GGUF file being converted once) as `gavel: ...` lines on stderr, in place of
    Hugging Face's own progress bars (off before transformers is imported)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    log = logging.getLogger("gavel")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gavel: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


app.add_typer(organism_app, name="organism")
app.add_typer(ce_app, name="ce")
app.add_typer(rules_app, name="rules")
app.add_typer(plugins_app, name="plugins")
app.add_typer(steer_app, name="steer")
app.add_typer(align_app, name="align")
app.add_typer(neurons_app, name="neurons")
app.add_typer(decon_app, name="decon")
app.add_typer(sae_app, name="sae")
app.command()(audit)
app.command()(chat)
app.command()(serve)
app.command()(demo)


def main() -> int | None:
    return app()
