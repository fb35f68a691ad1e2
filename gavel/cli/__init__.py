"""The `gavel` command line: one module per command group, assembled here. Heavy libraries (torch, transformers) are
imported inside commands only, so `gavel --help` stays fast."""
from __future__ import annotations

import typer

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
from gavel.cli.serve import serve
from gavel.cli.steer import steer_app

app = typer.Typer(help="gavel: cognitive-element probes, safety rules and a real-time monitor for LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(organism_app, name="organism")
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
app.command()(demo)


def main() -> int | None:
    return app()
