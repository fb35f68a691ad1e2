"""`gavel neurons find | gate | eval | steer`: AdaRAS reasoning-critical neurons from sampled traces, and steering
with them; `select | tune` (gavel.cli.surgery): the few neurons behind a behaviour, fine-tuned alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from gavel.cli.common import JsonOpt, ModelOpt, console, progress_bar, user_errors
from gavel.cli.surgery import select, tune

neurons_app = typer.Typer(help="MLP neurons: AdaRAS reasoning neurons to steer with (find, gate, eval, steer), and "
                               "the few neurons behind a behaviour to fine-tune alone (select, tune).",
                          no_args_is_help=True)
neurons_app.command("select")(select)
neurons_app.command("tune")(tune)
ProblemsOpt = Annotated[str, typer.Option(help="Problems with answers: an organism set (builtin:arithmetic_2digit), "
                                               "optionally sliced, builtin:arithmetic_2digit[0:25].")]
NeuronsOpt = Annotated[Path, typer.Option("--neurons", help="A neuron set folder (gavel neurons find).")]


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
        with progress_bar("sampling traces", len(chosen), enabled=not as_json) as advance:
            correct, incorrect, counts = contrastive_means(handle, chosen, _checker(), mlp_sites(handle.n_layers),
                                                           samples=samples, temperature=temperature, seed=seed,
                                                           progress=advance)
        neurons = ReasoningNeurons(k=k, polarity=polarity).fit(correct, incorrect)
        neurons.save(out, fingerprint=handle.fingerprint(),
                     provenance={"problems": problems, "samples": str(samples), **{k: str(v) for k, v in counts.items()}})
    report = {"out": str(out), **counts, "kept_per_site": dict(zip(neurons.sites_, neurons.kept_.sum(1).tolist()))}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"{counts['pairs']} correct/incorrect pairs from {counts['traces']} traces "
                  f"({counts['correct']} correct); kept {int(neurons.kept_.sum())} neurons: "
                  + ", ".join(f"{s} {n}" for s, n in report["kept_per_site"].items()) + f" -> {out}")


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
    from gavel.steering.adaras.neurons import ReasoningNeurons
    from gavel.steering.adaras.gate import FailureGate
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
        gate_model.save(out)
    report = {"out": str(out), "problems": len(chosen), "failures": int(fails.sum()),
              "train_accuracy": round(float(gate_model.train_accuracy_), 4)}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"gate trained on {len(chosen)} problems ({report['failures']} failures), training accuracy "
                  f"{report['train_accuracy']:.3f} -> {out}")


@neurons_app.command("eval")
def evaluate(neurons_dir: NeuronsOpt, problems: ProblemsOpt, model: ModelOpt = "builtin:organism",
             alpha: Annotated[list[float], typer.Option(help="Steering strengths (repeatable).")] = [0.1, 0.2, 0.4],
             control_seed: Annotated[int, typer.Option(help="Seed of the random-neuron control.")] = 0,
             gate_dir: Annotated[Optional[Path], typer.Option("--gate", help="A gate (gavel neurons gate): also "
                                                                          "steer only where it predicts a failure.")]
             = None,
             as_json: JsonOpt = False) -> None:
    """Greedy accuracy without steering, with the neurons, with a random-neuron control and (with --gate) with the
    neurons only where the gate predicts a failure, per alpha."""
    import torch

    from gavel.models.loading import load_model
    from gavel.steering.adaras.neurons import ReasoningNeurons
    from gavel.steering.adaras.intervention import NeuronIntervention, accuracy, gated_accuracy

    with user_errors():
        handle = load_model(model)
        neurons = ReasoningNeurons.load(neurons_dir, handle.fingerprint())
        chosen, check = _problems(problems), _checker()
        rows = {"baseline": accuracy(handle, chosen, check), "steered": {}, "random": {}}
        for a in alpha:
            for name, which in (("steered", neurons), ("random", neurons.random_control(control_seed))):
                with handle.hooks(NeuronIntervention.from_neurons(which, a).to(handle.device).hooks()):
                    rows[name][str(a)] = accuracy(handle, chosen, check)
        if gate_dir is not None:
            from gavel.models.generation import generate_replies
            from gavel.steering.adaras.gate import FailureGate
            from gavel.steering.adaras.traces import prompt_features

            predicted = FailureGate.load(gate_dir).predict(
                prompt_features(handle, [p.conversation for p in chosen], neurons.sites_))
            replies = generate_replies(handle, [p.conversation for p in chosen], 96)
            failed = torch.tensor([not check(r, p.expected) for r, p in zip(replies, chosen)])
            rows["gate_steers"] = round(float(predicted.float().mean()), 4)
            rows["gate_accuracy"] = round(float((predicted == failed).float().mean()), 4)
            rows["gated"] = {str(a): gated_accuracy(handle, chosen, check, NeuronIntervention.from_neurons(neurons, a),
                                                    predicted) for a in alpha}
    if as_json:
        print(json.dumps({"problems": len(chosen), **rows}, indent=2))
        return
    table = Table(title=f"{len(chosen)} problems, accuracy without steering {rows['baseline']:.3f}")
    columns = ["alpha", "AdaRAS neurons", "random neurons"] + (
        [f"gated ({rows['gate_steers']:.0%} steered, gate accuracy {rows['gate_accuracy']:.2f})"]
        if "gated" in rows else [])
    for column in columns:
        table.add_column(column, justify="right")
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
    from gavel.steering.adaras.neurons import ReasoningNeurons
    from gavel.steering.adaras.intervention import NeuronIntervention

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
