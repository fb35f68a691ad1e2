"""`gavel neurons`: AdaRAS reasoning-critical neurons from sampled traces and steering with them (`find | gate | eval |
steer`), and the few neurons behind a behaviour, fine-tuned alone (`select | tune`, "A Few Bad Neurons")."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NotRequired, TypedDict

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

neurons_app = typer.Typer(help="MLP neurons: AdaRAS reasoning neurons to steer with (find, gate, eval, steer), and "
                               "the few neurons behind a behaviour to fine-tune alone (select, tune).",
                          no_args_is_help=True)
ProblemsOpt = Annotated[str, typer.Option(help="Problems with answers: an organism set (builtin:arithmetic_2digit), "
                                               "optionally sliced, builtin:arithmetic_2digit[0:25].")]
NeuronsOpt = Annotated[Path, typer.Option("--neurons", help="A neuron set folder (gavel neurons find).")]
HELD_OUT = "held-out problems (e.g. find on builtin:arithmetic_2digit[0:25], evaluate on [25:50])"


def _problems(spec: str):
    """`builtin:NAME` or `builtin:NAME[a:b]` (the organism's prompt sets with expected answers)."""
    from gavel.errors import DataError
    from gavel.organism.datasets import problems as organism_problems

    if not spec.startswith("builtin:"):
        raise DataError(f"problems {spec!r}: only the organism's sets are built in (builtin:arithmetic_2digit)")
    name, _, rest = spec.removeprefix("builtin:").partition("[")
    span = slice(None)
    if rest:
        low, _, high = rest.rstrip("]").partition(":")
        span = slice(int(low) if low else None, int(high) if high else None)
    return organism_problems(name, span)


def _fitted_on(problems: str, chosen):
    """What a neuron set or gate fitted on `problems` records: each problem's conversation (its question)."""
    from gavel.artifacts import FittedOn

    return FittedOn.of({"problems": (problems, [p.conversation for p in chosen])})


def _checker():
    from gavel.organism.behaviour import final_answer

    return lambda reply, expected: final_answer(reply) == expected


@neurons_app.command("find")
def find(problems: ProblemsOpt, out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the neuron set.")],
         model: ModelOpt = "builtin:organism",
         samples: Annotated[int, typer.Option(help="Sampled traces per problem.")] = 6,
         temperature: Annotated[float, typer.Option(help="Sampling temperature of the traces.")] = 0.8,
         k: Annotated[int, typer.Option(help="Neurons kept (global top K by |S|).")] = 50,
         polarity: Annotated[bool, typer.Option(help="Keep only neurons whose mean flips sign.")] = True,
         seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0, as_json: JsonOpt = False) -> None:
    """Sample traces per problem, pair correct with incorrect ones, score MLP neurons by their mean activation
    difference (polarity-filtered) and keep the global top K."""
    from gavel.models.loading import load_model
    from gavel.steering.adaras.neurons import ReasoningNeurons
    from gavel.steering.adaras.traces import contrastive_means, mlp_sites

    with user_errors():
        chosen = _problems(problems)
        handle = load_model(model)
        with progress_bar("sampling traces", len(chosen)) as advance:
            correct, incorrect, counts = contrastive_means(handle, chosen, _checker(), mlp_sites(handle.n_layers),
                                                           samples=samples, temperature=temperature, seed=seed,
                                                           progress=advance)
        neurons = ReasoningNeurons(k=k, polarity=polarity).fit(correct, incorrect)
        neurons.save(out, fingerprint=handle.fingerprint(),
                     provenance={"problems": problems, "samples": str(samples),
                                 **{k: str(v) for k, v in counts.items()}},
                     fitted_on=_fitted_on(problems, chosen))
    kept_per_site = dict(zip(neurons.sites_, neurons.kept_.sum(1).tolist()))
    report = {"out": str(out), **counts, "kept_per_site": kept_per_site}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"{counts['pairs']} correct/incorrect pairs from {counts['traces']} traces "
                  f"({counts['correct']} correct); kept {int(neurons.kept_.sum())} neurons: "
                  + ", ".join(f"{s} {n}" for s, n in kept_per_site.items()) + f" -> {out}")


@neurons_app.command("gate")
def gate(neurons_dir: NeuronsOpt, problems: ProblemsOpt,
         out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the gate.")],
         model: ModelOpt = "builtin:organism",
         k_features: Annotated[int, typer.Option(help="ANOVA-selected neuron features (256 in the paper).")] = 64,
         hidden: Annotated[int, typer.Option(help="Width of the gate's two hidden layers.")] = 64,
         epochs: Annotated[int, typer.Option(help="Training epochs (full batch).")] = 300,
         weight_decay: Annotated[float, typer.Option(help="Adam weight decay (few prompts: keep some).")] = 1e-2,
         as_json: JsonOpt = False) -> None:
    """Train AdaRAS's gate: from the prompt's MLP neurons (the neuron set's layers), predict whether the model's
    greedy answer will be wrong, so steering can run only then."""
    import torch

    from gavel.models.generation import generate_replies
    from gavel.models.loading import load_model
    from gavel.steering.adaras.gate import FailureGate
    from gavel.steering.adaras.neurons import ReasoningNeurons
    from gavel.steering.adaras.traces import prompt_features

    with user_errors():
        handle = load_model(model)
        neurons = ReasoningNeurons.load(neurons_dir, handle.fingerprint())
        chosen, check = _problems(problems), _checker()
        replies = generate_replies(handle, [p.conversation for p in chosen], 96)
        fails = torch.tensor([not check(r, p.expected) for r, p in zip(replies, chosen)])
        features = prompt_features(handle, [p.conversation for p in chosen], neurons.sites_)
        gate_model = FailureGate(k_features=k_features, hidden=hidden, epochs=epochs, lr=1e-2,
                                 weight_decay=weight_decay).fit(features, fails)
        gate_model.save(out, fitted_on=_fitted_on(problems, chosen))
    report = {"out": str(out), "problems": len(chosen), "failures": int(fails.sum()),
              "train_accuracy": round(float(gate_model.train_accuracy_), 4)}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"gate trained on {len(chosen)} problems ({report['failures']} failures), training accuracy "
                  f"{report['train_accuracy']:.3f} -> {out}")


class _EvalRows(TypedDict):
    """`gavel neurons eval`'s accuracies: unsteered, steered per alpha (AdaRAS and random neurons), and with a gate
    what it steers, how often it is right and the gated accuracy per alpha."""

    baseline: float
    steered: dict[str, float]
    random: dict[str, float]
    gate_steers: NotRequired[float]
    gate_accuracy: NotRequired[float]
    gated: NotRequired[dict[str, float]]


@neurons_app.command("eval")
def evaluate(neurons_dir: NeuronsOpt, problems: ProblemsOpt, model: ModelOpt = "builtin:organism",
             alpha: Annotated[list[float], typer.Option(help="Steering strengths (repeatable).")] = [0.1, 0.2, 0.4],
             control_seed: Annotated[int, typer.Option(help="Seed of the random-neuron control.")] = 0,
             gate_dir: Annotated[Path | None, typer.Option("--gate", help="A gate (gavel neurons gate): also "
                                                                          "steer only where it predicts a failure.")]
             = None,
             allow_overlap: AllowOverlapOpt = False, as_json: JsonOpt = False) -> None:
    """Greedy accuracy without steering, with the neurons, with a random-neuron control and (with --gate) with the
    neurons only where the gate predicts a failure, per alpha.

    --problems must be held out: a problem the neurons (or the gate) were fitted on is refused unless
    --allow-overlap; the JSON's `overlap` (and `gate_overlap`) count them either way."""
    import torch

    from gavel.models.loading import load_model
    from gavel.steering.adaras.intervention import NeuronIntervention, accuracy, gated_accuracy
    from gavel.steering.adaras.neurons import ReasoningNeurons

    with user_errors():
        handle = load_model(model)
        neurons = ReasoningNeurons.load(neurons_dir, handle.fingerprint())
        chosen, check = _problems(problems), _checker()
        asked = {"--problems": [p.conversation for p in chosen]}
        overlaps = {"overlap": check_overlap(getattr(neurons, "fitted_on_", None), asked, allow=allow_overlap,
                                             artifact=f"the neuron set {neurons_dir}", noun="problems",
                                             held_out=HELD_OUT)}
        gate = None
        if gate_dir is not None:
            from gavel.steering.adaras.gate import FailureGate

            gate = FailureGate.load(gate_dir)
            overlaps["gate_overlap"] = check_overlap(getattr(gate, "fitted_on_", None), asked, allow=allow_overlap,
                                                     artifact=f"the gate {gate_dir}", noun="problems",
                                                     held_out=HELD_OUT)
        rows: _EvalRows = {"baseline": accuracy(handle, chosen, check), "steered": {}, "random": {}}
        for a in alpha:
            for into, which in ((rows["steered"], neurons), (rows["random"], neurons.random_control(control_seed))):
                with handle.hooks(NeuronIntervention.from_neurons(which, a).to(handle.device).hooks()):
                    into[str(a)] = accuracy(handle, chosen, check)
        if gate is not None:
            from gavel.models.generation import generate_replies
            from gavel.steering.adaras.traces import prompt_features

            predicted = gate.predict(
                prompt_features(handle, [p.conversation for p in chosen], neurons.sites_))
            replies = generate_replies(handle, [p.conversation for p in chosen], 96)
            failed = torch.tensor([not check(r, p.expected) for r, p in zip(replies, chosen)])
            rows["gate_steers"] = round(float(predicted.float().mean()), 4)
            rows["gate_accuracy"] = round(float((predicted == failed).float().mean()), 4)
            rows["gated"] = {str(a): gated_accuracy(handle, chosen, check, NeuronIntervention.from_neurons(neurons, a),
                                                    predicted) for a in alpha}
    if as_json:
        print(json.dumps({"problems": len(chosen), **rows, **overlaps}, indent=2))
        return
    print_overlap(overlaps["overlap"], f"the neuron set {neurons_dir}", noun="problems")
    if "gate_overlap" in overlaps:
        print_overlap(overlaps["gate_overlap"], f"the gate {gate_dir}", noun="problems")
    columns = ["alpha", "AdaRAS neurons", "random neurons"] + (
        [f"gated ({rows['gate_steers']:.0%} steered, gate accuracy {rows['gate_accuracy']:.2f})"]
        if "gated" in rows else [])
    table = make_table(*columns, numeric=columns,
                       title=f"{len(chosen)} problems, accuracy without steering {rows['baseline']:.3f}")
    for a in alpha:
        cells = [f"{a:g}", f"{rows['steered'][str(a)]:.3f}", f"{rows['random'][str(a)]:.3f}"]
        table.add_row(*cells, *([f"{rows['gated'][str(a)]:.3f}"] if "gated" in rows else []))
    console.print(table)


@neurons_app.command("steer")
def steer(neurons_dir: NeuronsOpt, prompt: Annotated[list[str], typer.Option(help="A user prompt (repeatable).")],
          alpha: Annotated[float, typer.Option(help="Steering strength.")] = 0.2, model: ModelOpt = "builtin:organism",
          max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 96,
          as_json: JsonOpt = False) -> None:
    """Generate with the neurons steered, beside the unsteered replies."""
    from gavel.models.generation import generate_replies
    from gavel.models.loading import load_model
    from gavel.steering.adaras.intervention import NeuronIntervention
    from gavel.steering.adaras.neurons import ReasoningNeurons

    with user_errors():
        handle = load_model(model)
        intervention = NeuronIntervention.from_neurons(ReasoningNeurons.load(neurons_dir, handle.fingerprint()), alpha)
        conversations = [[{"role": "user", "content": p}] for p in prompt]
        plain = generate_replies(handle, conversations, max_new_tokens)
        with handle.hooks(intervention.to(handle.device).hooks()):
            steered = generate_replies(handle, conversations, max_new_tokens)
    rows = [{"prompt": p, "unsteered": a, "steered": b} for p, a, b in zip(prompt, plain, steered)]
    if as_json:
        print(json.dumps({"alpha": alpha, "replies": rows}, indent=2))
        return
    for row in rows:
        console.print(f"[bold]user:[/] {escape(row['prompt'])}\n  [dim]unsteered:[/] {escape(row['unsteered'])}\n"
                      f"  [dim]alpha {alpha:g}:[/] {escape(row['steered'])}")


# ---- a few bad neurons: select the neurons behind a behaviour, tune only them
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


@neurons_app.command("select")
def select(out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the neuron set.")],
           behaviour: Annotated[str | None, typer.Option(help=f"A built-in behaviour ({SYCOPHANCY}).")] = None,
           positive: Annotated[Path | None, typer.Option(help="Prompts that show the behaviour (JSONL/JSON).")]
           = None,
           negative: Annotated[Path | None, typer.Option(help="Prompts that do not (JSONL/JSON).")] = None,
           model: ModelOpt = "builtin:organism",
           fraction: Annotated[float, typer.Option(help="Share of all MLP neurons kept.")] = 0.03,
           c: Annotated[float, typer.Option("--C", help="Inverse L2 strength of the probe.")] = 0.1,
           sae: Annotated[Path | None, typer.Option(help="A sae-lens SAE folder on a residual site: add its "
                                                            "attribution to the probe's.")] = None,
           sae_latents: Annotated[int, typer.Option(help="Behaviour-predictive SAE latents used.")] = 8,
           sae_weight: Annotated[float, typer.Option(help="Weight of the SAE attribution (0-1).")] = 0.5,
           as_json: JsonOpt = False) -> None:
    """Score every MLP neuron by how well it predicts a behaviour (at the last prompt token) and keep the top few.
    The neuron set records a digest of every prompt it was selected on."""
    from gavel.artifacts import FittedOn
    from gavel.finetune.behaviour_neurons import BehaviourNeurons
    from gavel.finetune.few_neurons import select_neurons
    from gavel.models.loading import load_model

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
                                 "negative": str(len(neg))},
                     fitted_on=FittedOn.of({"positive": (str(positive or source), pos),
                                            "negative": (str(negative or source), neg)}))
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


@neurons_app.command("tune")
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

    from gavel.finetune.behaviour_neurons import BehaviourNeurons
    from gavel.finetune.few_neurons import finetune, random_neurons
    from gavel.finetune.surgical import all_parameters, down_projection, neuron_masks
    from gavel.io.conversations import read_audit_data
    from gavel.models.loading import load_model

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
    columns = ["before", *runs]
    table = make_table("", *columns, numeric=columns,
                       title=f"{report['conversations']} corrective conversations, {report['steps']} steps, "
                             f"lr {report['lr']:g}")
    table.add_row("parameters trained", "", *(f"{report[r]['parameters_trained']:,}" for r in runs))
    table.add_row("final loss", "", *(f"{report[r]['final_loss']:.4f}" for r in runs))
    for metric in report["before"]:
        table.add_row(metric.replace("_", " "), *(f"{report[c][metric]:.3f}" for c in columns))
    console.print(table)
