"""`gavel neurons select | tune`: the few MLP neurons behind a behaviour ("A Few Bad Neurons"), and fine-tuning only
them on a corrective set, with full fine-tuning and random neurons as the baselines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gavel.cli.common import JsonOpt, ModelOpt, console, progress_bar, user_errors

SYCOPHANCY = "builtin:sycophancy"


def _behaviour(spec: str | None, positive: Path | None, negative: Path | None):
    """(positive, negative, provenance) prompts: the organism's sycophancy or two prompt files."""
    from gavel.errors import DataError
    from gavel.organism.datasets import read_prompts

    if positive is not None or negative is not None:
        if positive is None or negative is None or spec is not None:
            raise DataError("give --positive and --negative prompt files together, or --behaviour alone")
        return read_prompts(str(positive)), read_prompts(str(negative)), f"{positive} vs {negative}"
    if spec != SYCOPHANCY:
        raise DataError(f"unknown behaviour {spec!r}; built in: {SYCOPHANCY} (or --positive/--negative files)")
    from gavel.organism.sycophancy import behaviour_prompts

    return *behaviour_prompts("all"), spec


def select(out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the neuron set.")],
           behaviour: Annotated[Optional[str], typer.Option(help=f"A built-in behaviour ({SYCOPHANCY}).")] = None,
           positive: Annotated[Optional[Path], typer.Option(help="Prompts that show the behaviour (JSONL/JSON).")]
           = None,
           negative: Annotated[Optional[Path], typer.Option(help="Prompts that do not (JSONL/JSON).")] = None,
           model: ModelOpt = "builtin:organism",
           fraction: Annotated[float, typer.Option(help="Share of all MLP neurons kept.")] = 0.03,
           c: Annotated[float, typer.Option("--C", help="Inverse L2 strength of the probe.")] = 0.1,
           sae: Annotated[Optional[Path], typer.Option(help="A sae-lens SAE folder on a residual site: add its "
                                                            "attribution to the probe's.")] = None,
           sae_latents: Annotated[int, typer.Option(help="Behaviour-predictive SAE latents used.")] = 8,
           sae_weight: Annotated[float, typer.Option(help="Weight of the SAE attribution (0-1).")] = 0.5,
           as_json: JsonOpt = False) -> None:
    """Score every MLP neuron by how well it predicts a behaviour (at the last prompt token) and keep the top few."""
    from gavel.models.loading import load_model
    from gavel.finetune.behaviour_neurons import BehaviourNeurons
    from gavel.finetune.few_neurons import select_neurons

    if behaviour is None and positive is None and negative is None:
        behaviour = SYCOPHANCY
    with user_errors():
        pos, neg, source = _behaviour(behaviour, positive, negative)
        handle = load_model(model)
        loaded_sae = None
        if sae is not None:
            from gavel.probes.sae import load_sae

            loaded_sae = load_sae(sae)
        estimator = BehaviourNeurons(fraction=fraction, C=c, sae_latents=sae_latents, sae_weight=sae_weight)
        neurons = select_neurons(handle, pos, neg, estimator=estimator, sae=loaded_sae)
        per_layer = {str(layer): len(index) for layer, index in neurons.neurons().items()}
        neurons.save(out, fingerprint=handle.fingerprint(),
                     provenance={"behaviour": source, "sae": str(sae) if sae else "", "positive": str(len(pos)),
                                 "negative": str(len(neg))})
    summary = {"out": str(out), "kept": int(neurons.kept_.sum()), "of": int(neurons.kept_.numel()),
               "per_layer": per_layer, "positive": len(pos), "negative": len(neg),
               "sae_latents": neurons.latents_.tolist()}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"kept {summary['kept']} of {summary['of']} neurons "
                  f"({', '.join(f'layer {k}: {v}' for k, v in per_layer.items())}) -> {out}")


def _measure(handle, builtin: bool) -> dict[str, float]:
    """The organism's sycophancy rates per claim split and its benign-task accuracies (when the data is built in)."""
    if not builtin:
        return {}
    from gavel.organism.behaviour import arithmetic_accuracy, refusal_accuracy
    from gavel.organism.sycophancy import sycophancy_rates

    out = {f"{split}_{k}": v for split in ("train", "heldout") for k, v in sycophancy_rates(handle, split).items()}
    return {**out, "arithmetic_accuracy": arithmetic_accuracy(handle), "refusal_accuracy": refusal_accuracy(handle)}


def tune(out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fine-tuned model.")],
         neurons_dir: Annotated[Path, typer.Option("--neurons", help="A neuron set (gavel neurons select).")],
         data: Annotated[str, typer.Option(help=f"Corrective conversations with replies: {SYCOPHANCY} (the "
                                                "organism's training claims) or a JSONL/JSON file.")] = SYCOPHANCY,
         model: ModelOpt = "builtin:organism",
         steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
         lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-3,
         batch_size: Annotated[int, typer.Option(help="Conversations per step.")] = 8,
         seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
         compare: Annotated[bool, typer.Option(help="Also fine-tune every parameter, and as many random neurons, "
                                                    "from the same start with the same data and steps.")] = True,
         as_json: JsonOpt = False) -> None:
    """Fine-tune only the selected neurons' weights (every other parameter stays bit-identical) and save the model;
    on the built-in data, report sycophancy and benign-task accuracy before and after, beside the baselines."""
    import copy

    from gavel.io.conversations import read_audit_data
    from gavel.models.loading import load_model
    from gavel.finetune.few_neurons import finetune, random_neurons
    from gavel.finetune.behaviour_neurons import BehaviourNeurons
    from gavel.finetune.surgical import all_parameters, down_projection, neuron_masks

    builtin = data == SYCOPHANCY
    with user_errors():
        handle = load_model(model)
        neurons = BehaviourNeurons.load(neurons_dir, handle.fingerprint()).neurons()
        if builtin:
            from gavel.organism.sycophancy import corrective_set

            conversations = corrective_set("train")
        else:
            conversations = [list(item.conversation) for item in read_audit_data(data)]
        width = down_projection(handle.hf_model, next(iter(neurons))).shape[1]
        runs = {"neurons": neuron_masks(handle.hf_model, neurons)}
        if compare:
            runs["full"] = all_parameters(handle.hf_model)
            runs["random"] = neuron_masks(handle.hf_model, random_neurons(neurons, width, seed))
        start = copy.deepcopy(handle.hf_model.state_dict())
        report = {"steps": steps, "lr": lr, "conversations": len(conversations), "before": _measure(handle, builtin)}
        for name, masks in reversed(runs.items()):          # the selected neurons last: theirs is the model saved
            handle.hf_model.load_state_dict(start)
            with progress_bar(f"fine-tuning ({name})", steps) as advance:
                losses = finetune(handle, conversations, masks, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                  on_step=lambda loss: advance(1))
            trained = sum(int(m.sum()) for m in masks.values())
            report[name] = {"parameters_trained": trained, "first_loss": round(losses[0], 4),
                            "final_loss": round(losses[-1], 4), **_measure(handle, builtin)}
        handle.hf_model.save_pretrained(out)
        handle.tokenizer.save_pretrained(out)
        (Path(out) / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_report(report, list(runs))


def _print_report(report: dict, runs: list[str]) -> None:
    table = Table(title=f"{report['conversations']} corrective conversations, {report['steps']} steps, "
                        f"lr {report['lr']:g}")
    table.add_column("")
    columns = ["before", *runs]
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row("parameters trained", "", *(f"{report[r]['parameters_trained']:,}" for r in runs))
    table.add_row("final loss", "", *(f"{report[r]['final_loss']:.4f}" for r in runs))
    for metric in report["before"]:
        table.add_row(metric.replace("_", " "), *(f"{report[c][metric]:.3f}" for c in columns))
    console.print(table)
