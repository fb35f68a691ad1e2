"""`gavel rules check|test|fmt`. The rule modules, torch and models are imported inside the commands."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gavel.cli.common import JsonOpt, console, err_console, user_errors
from gavel.errors import ArtifactError, GavelError, Location

rules_app = typer.Typer(help="Check, test and format GAVEL rules.", no_args_is_help=True)

PathsArg = Annotated[list[Path], typer.Argument(help="Rule files, packs, rulesets or folders.", exists=True,
                                                metavar="PATH")]
TestPathsArg = Annotated[list[Path], typer.Argument(
    help="Packs (with their `tests:`), rule.yaml files, fixtures (*.tests.jsonl, *.texts.jsonl, tests/*.json[l]) "
    "or folders.", exists=True,
    metavar="PATH")]
COLOURS = {"error": "red", "high": "red", "medium": "yellow", "low": "cyan", "warning": "magenta",
           "pass": "green", "fail": "red", "skip": "yellow"}


def _known_ces(bank: Path | None, ces: str | None) -> list[str] | None:
    """CE names from a bank's manifest.json (or a GAVEL `ces/` folder) and/or a comma list; None if neither."""
    if bank is None and ces is None:
        return None
    names = [n.strip() for n in (ces or "").split(",") if n.strip()]
    if bank is not None:
        manifest = bank / "manifest.json"
        gavel_ces = sorted(p.parent.name for p in (bank / "ces" if (bank / "ces").is_dir() else bank).glob("*/ce.yaml"))
        if manifest.is_file():
            try:
                names += [c["name"] for c in json.loads(manifest.read_text(encoding="utf-8"))["ces"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{manifest}: invalid bank manifest ({type(e).__name__}: {e})") from None
        elif gavel_ces:
            names += gavel_ces
        else:
            raise ArtifactError(f"{bank} is neither a CE bank (manifest.json) nor a GAVEL ces/ folder")
    return list(dict.fromkeys(names))


def _params(items: list[str]) -> dict[str, int | float]:
    """`NAME=NUMBER` options as parameter values."""
    out: dict[str, int | float] = {}
    for item in items:
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            number = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            number = None
        if not name or number is None or not math.isfinite(number):
            raise GavelError(f"--param {item!r}: expected NAME=NUMBER, as in --param threshold=0.8")
        out[name] = number
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _finding(loc: Location | None, severity: str, code: str, message: str, hint: str | None = None,
             excerpt: str | None = None, rule: str | None = None) -> dict:
    """One problem as the JSON object `check` prints (and `test`/`fmt` under "errors")."""
    return {"path": loc.path if loc else None, "line": loc.line if loc else None,
            "column": loc.column if loc else None, "severity": severity, "code": code, "rule": rule,
            "message": message, "hint": hint, "excerpt": excerpt}


def _error(e: GavelError) -> dict:
    return _finding(e.location, "error", type(e).__name__, e.message, e.hint, e.excerpt)


def _print_finding(f: dict) -> None:
    where = ":".join(str(x) for x in (f["path"] or "<input>", f["line"], f["column"]) if x is not None)
    console.print(f"{escape(where)}: [{COLOURS[f['severity']]}]{f['severity']}[/]: {escape(f['message'])}",
                  soft_wrap=True)
    if f["excerpt"]:
        console.print(escape("\n".join("    " + line for line in f["excerpt"].splitlines())), soft_wrap=True)
    if f["hint"]:
        console.print(f"    [dim]hint:[/] {escape(f['hint'])}", soft_wrap=True)


@rules_app.command("check")
def rules_check(paths: PathsArg,
                bank: Annotated[Path | None, typer.Option(
                    "--bank", "-b", help="A CE bank (its manifest.json) or a GAVEL ces/ folder: check CE names.")
                ] = None,
                ces: Annotated[str | None, typer.Option(
                    help="Known CE names, comma-separated (adds to --bank).")] = None,
                library: Annotated[Path | None, typer.Option(
                    help="The GAVEL library that rulesets name rules from.")] = None,
                param: Annotated[list[str] | None, typer.Option(
                    "--param", "-p", help="Set a pack parameter `${NAME}`: NAME=NUMBER (repeatable).")] = None,
                as_json: JsonOpt = False) -> None:
    """Load every rule and lint it; report every syntax error, load error and lint finding with its place, and
    as warnings the keys of GAVEL library files that gavel keeps but does not read.

    Exit 0: clean (warnings allowed). Exit 1: any finding (syntax and load errors too). Exit 2: bad invocation.
    """
    from gavel.rules import collect_rules, lint

    with user_errors():
        known = _known_ces(bank, ces)
        params = _params(param or [])
    warnings: list = []
    rules, errors = collect_rules(paths, library=library, params=params, warnings=warnings)
    findings = [_error(e) for e in errors]
    findings += [_finding(i.location, i.severity.name.lower(), type(i).__name__, f"{i.subject}: {i.message}",
                          i.hint, rule=i.rule) for i in lint(rules, ces=known)]
    findings += [_finding(w.location, "warning", type(w).__name__, w.message, w.hint, w.excerpt) for w in warnings]
    findings.sort(key=lambda f: (f["path"] or "", f["line"] or 0, f["column"] or 0))
    n_warn = len(warnings)
    if as_json:
        print(json.dumps(findings, indent=2))
    else:
        for f in findings:
            _print_finding(f)
        n_err = sum(f["severity"] == "error" for f in findings)
        summary = (f"{_plural(len(rules), 'rule')}: {_plural(n_err, 'error')}, "
                   f"{_plural(len(findings) - n_err - n_warn, 'lint finding')}"
                   + (f", {_plural(n_warn, 'warning')}" if n_warn else ""))
        note = "" if known is not None else "  [dim](CE names not checked: pass --bank or --ces)[/]"
        colour = "red" if len(findings) > n_warn else "magenta" if n_warn else "green"
        console.print(f"[{colour}]{summary}[/]{note}")
    raise typer.Exit(code=1 if len(findings) > n_warn else 0)


@rules_app.command("test")
def rules_test(paths: TestPathsArg,
               model: Annotated[str | None, typer.Option(
                   "--model", "-m", help="With --bank: run text fixtures and GAVEL positive/negative sets "
                   "(builtin:organism, a model directory, or a hub id).")] = None,
               bank: Annotated[Path | None, typer.Option(
                   "--bank", "-b", help="With --model: a CE bank directory.")] = None,
               force: Annotated[bool, typer.Option(help="Skip the bank's model fingerprint check.")] = False,
               as_json: JsonOpt = False) -> None:
    """Run rule tests: CE traces through the compiled rules; texts and GAVEL positive/negative conversations
    through a model and CE bank (--model and --bank; skipped without). Failures show expected vs got.

    Exit 0: every test passed (skips allowed). Exit 1: a test failed.
    Exit 2: bad input (a malformed fixture, a rule that does not load or compile, a bank for another model).
    """
    if (model is None) != (bank is None):
        err_console.print("[red]error:[/] --model and --bank go together (text tests need both)")
        raise typer.Exit(code=2)
    from gavel.rules.testing.run import describe, run_rule_tests

    scan = None
    with user_errors():
        if model is not None and bank is not None:
            from transformers.utils import logging as hf_logging

            from gavel.models.loading import load_model
            from gavel.probes.bank import CEBank
            from gavel.runtime.monitor import scanner

            hf_logging.disable_progress_bar()
            handle = load_model(model)
            scan = scanner(handle, CEBank.load(bank, fingerprint=handle.fingerprint(), force=force))
    results, errors = run_rule_tests(paths, scan=scan)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    if as_json:
        print(json.dumps({"results": [r.to_dict() for r in results], "errors": [_error(e) for e in errors],
                          "summary": {**counts, "error": len(errors)}}, indent=2))
    else:
        for r in results:
            where = r.path + (f":{r.line}" if r.line else "")
            console.print(f"[{COLOURS[r.status]}]{r.status.upper():4}[/] {escape(where)}  {escape(r.name)}"
                          + (f"  [dim]({escape(r.reason)})[/]" if r.reason else "")
                          + (f"  [dim]-> {escape(describe(r.outcome))}[/]" if r.outcome else ""), soft_wrap=True)
            for m in r.mismatches:
                console.print(f"     {escape(str(m))}", soft_wrap=True)
        for e in errors:
            _print_finding(_error(e))
        colour = "red" if errors or counts["fail"] else "green"
        console.print(f"[{colour}]{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
                      f"{_plural(len(errors), 'error')}[/]")
    raise typer.Exit(code=2 if errors else 1 if counts["fail"] else 0)


@rules_app.command("fmt")
def rules_fmt(paths: PathsArg,
              check: Annotated[bool, typer.Option(
                  "--check", help="Write nothing; exit 1 if any file would change.")] = False,
              as_json: JsonOpt = False) -> None:
    """Rewrite conditions in canonical form, keeping every other byte of each file.

    Exit 0: done, or with --check nothing would change. Exit 1: with --check, some file would change.
    Exit 2: a file has load errors and is left alone (see `gavel rules check`).
    """
    from gavel.rules.fmt import format_paths

    files, errors = format_paths(paths)
    changed = [f for f in files if f.changed]
    if not check:
        for f in changed:
            f.write()
    if as_json:
        print(json.dumps({"files": [{"path": str(f.path), "changed": f.changed, "written": f.changed and not check,
                                     "edits": [{"rule": e.rule, "line": e.location.line, "column": e.location.column,
                                                "before": e.before, "after": e.after, "left_as_is": e.reason}
                                               for e in f.edits]} for f in files],
                          "errors": [_error(e) for e in errors]}, indent=2))
    else:
        for f in files:
            if f.changed:
                console.print(f"{'would reformat' if check else 'reformatted'} {escape(str(f.path))}", soft_wrap=True)
            for e in f.edits:
                note = f"[yellow]left as is ({escape(e.reason)})[/]: " if e.reason else ""
                console.print(f"  {escape(str(e.location))}: rule '{e.rule}': {note}{escape(repr(e.before.strip()))} "
                              f"-> {escape(repr(e.after))}", soft_wrap=True)
        for error in errors:
            _print_finding(_error(error))
        verb = "would be reformatted" if check else "reformatted"
        console.print(f"{_plural(len(changed), 'file')} {verb}"
                      + (f", {_plural(len(errors), 'error')} (files with errors are left alone)" if errors else ""))
    raise typer.Exit(code=2 if errors else 1 if check and changed else 0)
