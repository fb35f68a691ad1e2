"""`gavel plugins list`: what the entry-point registry holds, and which plugins failed to load."""
from __future__ import annotations

import json

import typer

from gavel.cli.common import JsonOpt, console, make_table, user_errors

plugins_app = typer.Typer(help="Inspect gavel's plugins (entry-point groups gavel.*).", no_args_is_help=True)


@plugins_app.command("list")
def plugins_list(as_json: JsonOpt = False) -> None:
    """List every plugin by group, with where it comes from; exit 1 when a plugin failed to load."""
    with user_errors():
        from gavel.plugins.registry import load_registry

        registry = load_registry()
    rows = [{"group": group, "name": name, "origin": registry.origins.get((group, name), ""),
             "kind": getattr(obj, "kind", None), "implemented": getattr(obj, "implemented", None)}
            for group, entries in registry.plugins.items() for name, obj in sorted(entries.items())]
    if as_json:
        console.print_json(json.dumps({"plugins": rows, "problems": registry.problems}))
    else:
        table = make_table("group", "name", "kind", "origin")
        for r in rows:
            kind = "" if r["kind"] is None else r["kind"] + ("" if r["implemented"] in (None, True) else " (declared)")
            table.add_row(r["group"], r["name"], kind, r["origin"])
        console.print(table)
        for problem in registry.problems:
            console.print(f"[red]problem:[/] {problem}", soft_wrap=True, markup=True)
    if registry.problems:
        raise typer.Exit(code=1)
