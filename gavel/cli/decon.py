"""`gavel decon train | eval`: DeconIEP input perturbations that make a contaminated model answer like a clean one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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

decon_app = typer.Typer(help="DeconIEP: train a bounded prompt-embedding perturbation, measure RC and BUD.",
                        no_args_is_help=True)
ReferenceOpt = Annotated[str, typer.Option("--reference", "-r", help="The less contaminated reference model "
                                                                        "(same tokenizer).")]


def _zetas(spec: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"--zeta-sweep {spec!r} is not a comma list of numbers") from None
    if not values or any(not (v >= 0) or v == float("inf") for v in values):
        raise DataError(f"--zeta-sweep {spec!r}: give finite zetas >= 0")
    return values


@decon_app.command("train")
def train(out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the perturbation to.")],
          reference: ReferenceOpt, model: ModelOpt = "builtin:organism",
          data: Annotated[str, typer.Option(help="Training prompts: builtin:decon-train (the organism split, see "
                                                  "docs/decon.md), builtin:SET, or a JSONL/JSON file.")]
          = "builtin:decon-train",
          zeta: Annotated[float, typer.Option(help="Bound of the perturbation, |delta|_inf <= zeta.")] = 1e-3,
          steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
          lr: Annotated[float, typer.Option(help="Adam learning rate (the paper: 1e-5).")] = 1e-5,
          width: Annotated[int, typer.Option(help="Hidden width of G.")] = 64,
          layers: Annotated[int, typer.Option(help="Transformer layers of G.")] = 4,
          heads: Annotated[int, typer.Option(help="Attention heads of G.")] = 4,
          dropout: Annotated[float, typer.Option(help="Dropout of G while training.")] = 0.2,
          batch_size: Annotated[int, typer.Option(help="Prompts per step.")] = 8,
          lambda_kl: Annotated[float, typer.Option(help="Weight of KL(p_con || p_ref).")] = 1.0,
          lambda_ce: Annotated[float, typer.Option(help="Weight of CE(p_con, y_ref).")] = 1.0,
          temperature: Annotated[float, typer.Option(help="Sampling temperature of y_ref (0: greedy).")] = 1.0,
          max_new_tokens: Annotated[int, typer.Option(help="Reply tokens sampled from the reference.")] = 32,
          checkpoint_every: Annotated[int, typer.Option(help="Also save OUT/checkpoints/step-N every N steps "
                                                             "(0: never).")] = 0,
          seed: Annotated[int, typer.Option(help="Seed of G's weights, batch order and sampling.")] = 0,
          as_json: JsonOpt = False) -> None:
    """Train G against the reference on the training prompts; f_con stays frozen. Saves safetensors + manifest
    (both models' fingerprints, and a digest of every training prompt so `decon eval` can check its splits are held
    out)."""
    from gavel.artifacts import FittedOn
    from gavel.decon.train import DeconIEP
    from gavel.models.loading import load_model
    from gavel.organism.decon import TRAIN_DATA, decon_splits

    with user_errors():
        if steps < 1:
            raise DataError("--steps must be at least 1")
        if data == TRAIN_DATA:
            prompts = decon_splits().train_prompts()
        else:
            from gavel.organism.datasets import read_prompts

            prompts = read_prompts(data)
        f_con, f_ref = load_model(model), load_model(reference)
        est = DeconIEP(zeta=zeta, width=width, n_layers=layers, n_heads=heads, dropout=dropout, lr=lr, steps=steps,
                       batch_size=batch_size, lambda_kl=lambda_kl, lambda_ce=lambda_ce, temperature=temperature,
                       max_new_tokens=max_new_tokens, seed=seed)
        with progress_bar("training G", steps) as advance:
            est.fit(f_con, f_ref, prompts, on_step=lambda step, loss: advance(1),
                    checkpoint_dir=out / "checkpoints" if checkpoint_every else None,
                    checkpoint_every=checkpoint_every, data=data)
        est.save(out, fitted_on=FittedOn.of({"data": (data, prompts)}))
    losses = est.losses_
    tail = losses[-max(1, len(losses) // 10):]
    report = {"out": str(out), "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
              "final_loss_mean_last_10pct": sum(tail) / len(tail), "prompts": len(prompts), "zeta": zeta,
              "losses": losses}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"trained G for {len(losses)} steps on {len(prompts)} prompts: loss {losses[0]:.4f} -> "
                  f"{report['final_loss_mean_last_10pct']:.4f} (mean of the last 10%) -> {out}")


@decon_app.command("eval")
def evaluate(perturbation: Annotated[Path, typer.Option("--perturbation", "-p", help="A folder from "
                                                                                     "'gavel decon train'.")],
             clean: Annotated[str, typer.Option("--clean", help="The clean model f_clean (RC's target).")],
             model: ModelOpt = "builtin:organism",
             zeta_sweep: Annotated[str | None, typer.Option(help="Comma list of zetas to evaluate the saved G at "
                                                                  "(default: its trained zeta).")] = None,
             max_new_tokens: Annotated[int, typer.Option(help="Tokens per greedy reply (2-digit additions need "
                                                              "about 40).")] = 48,
             force: Annotated[bool, typer.Option(help="Skip the model fingerprint check.")] = False,
             bank: Annotated[Path | None, typer.Option(help="With --rules: a CE bank for the rule-gated row.")]
             = None,
             rules: Annotated[list[Path] | None, typer.Option(help="Rule files whose `perturb` rules gate the "
                                                                      "perturbation (a rule-gated row).")] = None,
             allow_overlap: AllowOverlapOpt = False, as_json: JsonOpt = False) -> None:
    """RC before/after (leaked items G never saw) and BUD (held-out items + 2-digit arithmetic) on the organism
    splits, at the trained zeta or over a sweep; with --bank and --rules also applied only where a rule holds.

    The splits must be held out from G's training prompts (as builtin:decon-train is): a G trained on any of them is
    refused unless --allow-overlap; the JSON's `overlap` counts them either way."""
    from gavel.decon.train import DeconIEP
    from gavel.models.loading import load_model
    from gavel.organism.decon import decon_splits, evaluate_decon

    with user_errors():
        zetas = _zetas(zeta_sweep) if zeta_sweep is not None else None
        f_con = load_model(model)
        est = DeconIEP.load(perturbation, fingerprint=f_con.fingerprint(), force=force)
        splits = decon_splits()
        overlap = check_overlap(getattr(est, "fitted_on_", None),
                                {name: [p.conversation for p in getattr(splits, name)]
                                 for name in ("leaked_eval", "heldout_eval", "arithmetic_eval")},
                                artifact=f"the perturbation {perturbation}", allow=allow_overlap,
                                held_out="a G trained on builtin:decon-train (the organism's training split)")
        f_clean = load_model(clean)
        guard = None
        if (bank is None) != (not rules):
            raise DataError("the rule-gated row needs both --bank and --rules")
        if bank is not None and rules:   # both or neither (checked above)
            from gavel.runtime.guard import Guard

            guard = Guard(f_con, bank, [str(r) for r in rules], artifacts={"decon": est})
        with progress_bar("evaluating", 2 + len(zetas or [0]) + (guard is not None)) as advance:
            report = evaluate_decon(f_con, f_clean, est, zetas, max_new_tokens=max_new_tokens, progress=advance,
                                    guard=guard,
                                    names={"model": model, "clean": clean, "perturbation": str(perturbation)})
    if as_json:
        print(json.dumps({**json.loads(report.model_dump_json()), "overlap": overlap}, indent=2))
        return
    console.print(f"DeconIEP {perturbation} on {model} (clean: {clean})", soft_wrap=True, markup=False)
    print_overlap(overlap, f"the perturbation {perturbation}")
    columns = ("zeta", "acc leaked", "RC", "acc held-out", "acc arithmetic", "acc clean data", "BUD")
    table = make_table(*columns, numeric=columns, title=f"RC before {report.rc_before:.3f} = "
                                                        f"|{report.acc_leaked:.3f} - {report.clean_acc_leaked:.3f}|")
    table.add_row("none", f"{report.acc_leaked:.3f}", f"{report.rc_before:.3f}", f"{report.acc_heldout:.3f}",
                  f"{report.acc_arithmetic:.3f}", f"{report.acc_clean_data:.3f}", "")
    for p in report.points:
        table.add_row(f"{p.zeta:g}", f"{p.acc_leaked:.3f}", f"{p.rc:.3f}", f"{p.acc_heldout:.3f}",
                      f"{p.acc_arithmetic:.3f}", f"{p.acc_clean_data:.3f}", f"{p.bud:+.3f}")
    if report.gated is not None:
        p = report.gated
        table.add_row("gated", f"{p.acc_leaked:.3f}", f"{p.rc:.3f}", f"{p.acc_heldout:.3f}",
                      f"{p.acc_arithmetic:.3f}", f"{p.acc_clean_data:.3f}", f"{p.bud:+.3f}")
    console.print(table)
    console.print(f"[dim]{report.n_leaked} leaked, {report.n_heldout} held-out items, {report.n_arithmetic} "
                  f"additions; f_clean leaked accuracy {report.clean_acc_leaked:.3f}[/]")
