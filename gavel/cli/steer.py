"""`gavel steer fit | run | eval`: fit a Selective Steering plane from two prompt sets, generate with it, sweep it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from gavel.cli.common import (
    AllowOverlapOpt,
    JsonOpt,
    ModelOpt,
    check_overlap,
    console,
    make_table,
    print_overlap,
    progress_bar,
    user_errors,
)
from gavel.errors import DataError

if TYPE_CHECKING:
    from gavel.io.conversations import Conversation

steer_app = typer.Typer(help="Selective Steering: fit a plane, generate with it, sweep angles and coefficients.",
                        no_args_is_help=True)
SITE_SETS = ("norm", "resid_pre", "resid_post", "attn_out", "mlp_out")
PlaneOpt = Annotated[Path, typer.Option("--plane", "-p", help="A steering artifact folder (gavel steer fit).")]
LayersOpt = Annotated[str, typer.Option(help="Blocks to steer: auto (the sign test), all, L or L-M.")]


def site_list(sites: str, n_layers: int) -> list[str]:
    """`norm` (both norm outputs of every block, as the paper), another per-block kind, or a comma list."""
    from gavel.steering.activations import norm_sites

    if sites == "norm":
        return norm_sites(n_layers)
    if sites in SITE_SETS:
        return [f"blocks.{layer}.hook_{sites}" for layer in range(n_layers)]
    return [s.strip() for s in sites.split(",") if s.strip()]


@steer_app.command("fit")
def fit(pos: Annotated[str, typer.Option("--pos", help="Prompts of the positive class (e.g. harmful): a JSONL or "
                                                         "JSON file, or builtin:harmful (builtin:harmful[0:10]: "
                                                         "its first 10, leaving the rest held out).")],
        neg: Annotated[str, typer.Option("--neg", help="Prompts of the negative class (e.g. builtin:benign).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the steering artifact to.")],
        model: ModelOpt = "builtin:organism",
        sites: Annotated[str, typer.Option(help=f"Where to read: {', '.join(SITE_SETS)}, or a comma list of "
                                                  "sites.")] = "norm",
        layers: Annotated[str, typer.Option(help="auto: keep blocks where the classes project onto b1 with "
                                                   "opposite signs; all: every block.")] = "auto",
        as_json: JsonOpt = False) -> None:
    """Fit a steering plane: per-site difference-of-means candidates at the last prompt token, the shared plane
    (b1, b2) and the discriminative blocks; saved with the model's fingerprint and a digest of every prompt (so
    `steer eval` can refuse to evaluate on them)."""
    from gavel.artifacts import FittedOn
    from gavel.models.loading import load_model
    from gavel.organism.datasets import read_prompts
    from gavel.steering.activations import last_prompt_activations
    from gavel.steering.selective.plane import SteeringPlane

    with user_errors():
        handle = load_model(model)
        positive, negative = read_prompts(pos), read_prompts(neg)
        chosen = site_list(sites, handle.n_layers)
        with progress_bar("reading activations", len(positive) + len(negative)) as advance:
            acts = [last_prompt_activations(handle, p, chosen, progress=advance) for p in (positive, negative)]
        plane = SteeringPlane(layers=layers).fit(*acts)
        plane.save(out, fingerprint=handle.fingerprint(),
                   provenance={"positive": pos, "negative": neg, "sites": sites,
                               "prompts": f"{len(positive)} positive, {len(negative)} negative"},
                   fitted_on=FittedOn.of({"pos": (pos, positive), "neg": (neg, negative)}))
    per_site = {s: {"mu_pos": round(float(a), 4), "mu_neg": round(float(b), 4), "passes": bool(ok)}
                for s, a, b, ok in zip(plane.sites_, plane.mu_pos_, plane.mu_neg_, plane.passes_)}
    report = {"out": str(out), "layers": plane.selected_layers, "sites": plane.selected_sites, "per_site": per_site}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = make_table("site", "mu_pos", "mu_neg", "steered", numeric=("mu_pos", "mu_neg", "steered"),
                       title=f"steering plane: {len(positive)} positive, {len(negative)} negative prompts")
    chosen_sites = set(plane.selected_sites)
    for site, row in per_site.items():
        table.add_row(site, f"{row['mu_pos']:+.3f}", f"{row['mu_neg']:+.3f}", "yes" if site in chosen_sites else "")
    console.print(table)
    console.print(f"selected blocks: {plane.selected_layers or 'none'} -> {out}")


@steer_app.command("run")
def run(plane_dir: PlaneOpt,
        prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A user prompt (repeatable).")] = None,
        data: Annotated[str | None, typer.Option(help="Prompts from a file or builtin:SET.")] = None,
        method: Annotated[str, typer.Option(help="rotate, angular, angular_adaptive, add or ablate.")] = "rotate",
        strength: Annotated[float, typer.Option(help="Degrees (rotate, angular) or coefficient (add).")] = 90.0,
        layers: LayersOpt = "auto", model: ModelOpt = "builtin:organism",
        max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 48,
        as_json: JsonOpt = False) -> None:
    """Generate with a steering method at one strength, beside the unsteered replies."""
    from gavel.models.generation import generate_replies
    from gavel.models.loading import load_model
    from gavel.organism.datasets import read_prompts
    from gavel.steering.intervention import steering
    from gavel.steering.selective.intervene import PlaneIntervention, steering_method
    from gavel.steering.selective.plane import SteeringPlane

    with user_errors():
        if not prompt and not data:
            raise DataError("give --prompt TEXT (repeatable) or --data FILE")
        handle = load_model(model)
        plane = SteeringPlane.load(plane_dir, handle.fingerprint())
        conversations: list[Conversation] = [[{"role": "user", "content": p}] for p in prompt or []]
        conversations += read_prompts(data) if data else []
        intervention = PlaneIntervention.from_plane(plane, steering_method(method), strength, plane.sites_in(layers))
        plain = generate_replies(handle, conversations, max_new_tokens)
        with steering(handle, intervention):
            steered = generate_replies(handle, conversations, max_new_tokens)
    rows = [{"prompt": c[-1]["content"], "unsteered": a, "steered": b}
            for c, a, b in zip(conversations, plain, steered)]
    if as_json:
        print(json.dumps({"method": method, "strength": strength, "sites": list(intervention.sites), "replies": rows},
                         indent=2))
        return
    for row in rows:
        console.print(f"[bold]user:[/] {escape(row['prompt'])}\n  [dim]unsteered:[/] {escape(row['unsteered'])}\n"
                      f"  [dim]{method} {strength:g}:[/] {escape(row['steered'])}")


def _strengths(spec: str) -> list[float]:
    """`0:360:10` (start:stop:step, stop included when reached) or a comma list."""
    if ":" in spec:
        start, stop, step = (float(x) for x in spec.split(":"))
        if step <= 0:
            raise DataError(f"the step of {spec!r} must be positive")
        count = int((stop - start) / step + 1e-9) + 1
        return [round(start + i * step, 6) for i in range(count)]
    return [float(x) for x in spec.split(",") if x.strip()]


@steer_app.command("eval")
def evaluate(plane_dir: PlaneOpt,
             data: Annotated[str, typer.Option(help="Prompts to steer: a file or builtin:SET (e.g. "
                                                     "builtin:harmful[10:]), held out from the plane's --pos and "
                                                     "--neg.")],
             methods: Annotated[list[str], typer.Option("--method", help="Methods to sweep (repeatable).")] = [
                 "rotate", "angular", "add"],
             angles: Annotated[str, typer.Option(help="Angles for rotate and angular.")] = "0:360:10",
             coefficients: Annotated[str, typer.Option(help="Coefficients for add.")] = "-1,-0.5,-0.25,0.25,0.5,1",
             judge: Annotated[str, typer.Option(help="phrases (refusal phrases) or BANK:CE (a refusal CE).")] =
             "phrases",
             layers: LayersOpt = "auto", model: ModelOpt = "builtin:organism",
             max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 32,
             perplexity_limit: Annotated[float, typer.Option(
                 help="Perplexity under the unsteered model above which a steered reply is a violation (and "
                      "degenerate).")] = 20.0,
             out: Annotated[Path | None, typer.Option(help="Folder for sweep.json and sweep.png.")] = None,
             allow_overlap: AllowOverlapOpt = False, as_json: JsonOpt = False) -> None:
    """Sweep angles (rotate, angular) and coefficients (add): refusal rate, perplexity under the unsteered model and
    its violations, degenerate replies, norm ratio |h'|/|h| and distance from the unsteered replies, per strength.

    --data must be held out: a prompt the plane was fitted on (its --pos or --neg) is refused unless
    --allow-overlap; the JSON's `overlap` counts them either way."""
    from gavel.models.loading import load_model
    from gavel.organism.datasets import read_prompts
    from gavel.runtime.judges import judge_from
    from gavel.steering.evaluate import plot_sweeps, sweep
    from gavel.steering.selective.intervene import steering_method
    from gavel.steering.selective.plane import SteeringPlane

    with user_errors():
        handle = load_model(model)
        plane = SteeringPlane.load(plane_dir, handle.fingerprint())
        conversations = read_prompts(data)
        overlap = check_overlap(getattr(plane, "fitted_on_", None), {"--data": conversations},
                                artifact=f"the steering plane {plane_dir}", allow=allow_overlap,
                                held_out="held-out prompts (e.g. fit on builtin:harmful[0:10], evaluate on "
                                         "builtin:harmful[10:])")
        sites = plane.sites_in(layers)
        judged = judge_from(judge, handle)
        plan = {m: ([0.0] if m == "ablate" else _strengths(coefficients if m == "add" else angles))
                for m in map(steering_method, methods)}
        with progress_bar("sweeping", sum(map(len, plan.values()))) as advance:
            sweeps = [sweep(handle, plane, conversations, m, strengths, sites=sites, judge=judged,
                            max_new_tokens=max_new_tokens, perplexity_limit=perplexity_limit, progress=advance)
                      for m, strengths in plan.items()]
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.json").write_text(json.dumps({"sweeps": [s.model_dump() for s in sweeps],
                                                        "overlap": overlap}, indent=2) + "\n")
            plot_sweeps(sweeps, out / "sweep.png")
    if as_json:
        print(json.dumps({"sweeps": [s.model_dump() for s in sweeps], "overlap": overlap}, indent=2))
        return
    print_overlap(overlap, f"the steering plane {plane_dir}")
    columns = ("method", "strength", "refusal", "perplexity", "violations", "degenerate", "|h'|/|h|", "distance")
    table = make_table(*columns, numeric=columns[1:],
                       title=f"{len(conversations)} prompts, unsteered refusal rate "
                             f"{sweeps[0].unsteered_refusal_rate:.2f}" if sweeps else "no methods")
    for s in sweeps:
        for p in s.points:
            table.add_row(p.method, f"{p.strength:g}", f"{p.refusal_rate:.2f}", f"{p.perplexity_mean:.2f}",
                          str(p.perplexity_violations), f"{p.degenerate_rate:.2f}", f"{p.norm_ratio:.3f}",
                          f"{p.distance:.2f}")
    console.print(table)
    if out is not None:
        console.print(f"-> {out / 'sweep.json'}, {out / 'sweep.png'}")
