"""Steering figures we can defend: each method on held-out prompts, beside its random control, over seeds.

Usage: python benchmarks/methods_report.py [--model builtin:smollm2] [--seeds 3] [--max-new-tokens 32]
       [--method rotate:60,120 --method add:0.5 --method ablate ...] [--judge BANK:CE] [--out-json F] [--out-md F]

Per seed, the harmful and the benign prompt pools are each cut in half by a seeded shuffle. The steering plane is
fitted on the fit halves (`SteeringPlane`, last prompt token, every block's `hook_resid_pre` or `--sites norm`,
layers chosen by its sign test or `--layers all`); every figure is measured on the held-out halves and on a utility
task set that nothing is fitted on. Each method and strength runs beside its random control at the same strength:
the same method with a random plane (rotate, angular, ablate) or with random vectors of each site's norm (add),
drawn per seed. Measured:
- refusal on the held-out harmful prompts and over-refusal on the held-out benign ones, by a judge that is not the
  method's yardstick: a refusal CE of a CE bank fitted on other data (SmolLM2: the pack's bank; the organism: the
  demo's bank) reading the reply; the refusal-phrase count is shown beside it for comparison;
- degenerate replies (gavel.steering.degeneracy: empty, looping, or implausible to the unsteered model);
- utility: exact-match accuracy on the task set with the steering applied, and as a share of the unsteered accuracy.
Intervals: 95% percentile bootstrap over prompts, each seed's prompts resampled within it (prompts pooled over
seeds); the per-seed values are in the JSON.

`--model builtin:organism` uses the organism's prompt sets (harmful, benign) and its 2-digit arithmetic problems;
`builtin:smollm2` (default) data/english/requests (harmful.jsonl, benign.jsonl, arithmetic.jsonl).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from gavel.io.conversations import Conversation, Problem
from gavel.models.chat import decode_text
from gavel.models.handle import ModelHandle
from gavel.probes.bootstrap import percentile_interval, resample_counts
from gavel.steering.activations import last_prompt_activations, norm_sites
from gavel.steering.degeneracy import degenerate
from gavel.steering.evaluate import Judge, generate_with_ids, refusal_phrases, reply_perplexities
from gavel.steering.intervention import steering
from gavel.steering.selective.intervene import PlaneIntervention, steering_method
from gavel.steering.selective.plane import SteeringPlane

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = "builtin:organism"
DEFAULT_METHODS = ("rotate:60,120,180", "angular:120", "add:0.5,1", "ablate")


# ---------------------------------------------------------------- data


@dataclass
class Data:
    harmful: list[Conversation]
    benign: list[Conversation]
    utility: list[Problem]
    checker: Callable[[str, str], bool]
    describe: str


def last_number(reply: str, expected: str) -> bool:
    """Exact match: the last integer of the reply's first line is the expected answer."""
    first = reply.strip().splitlines()[0] if reply.strip() else ""
    numbers = re.findall(r"-?\d+", first.replace(",", ""))
    return bool(numbers) and numbers[-1] == expected


def english_data(folder: Path) -> Data:
    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    def user(text: str) -> Conversation:
        return [{"role": "user", "content": text}]

    return Data([user(r["prompt"]) for r in read("harmful.jsonl")], [user(r["prompt"]) for r in read("benign.jsonl")],
                [Problem(user(r["question"]), str(r["answer"])) for r in read("arithmetic.jsonl")], last_number,
                f"{folder.relative_to(ROOT)}/{{harmful,benign,arithmetic}}.jsonl")


def organism_data() -> Data:
    from gavel.organism.behaviour import final_answer
    from gavel.organism.datasets import problems, prompt_set

    return Data(prompt_set("harmful"), prompt_set("benign"), problems("arithmetic_2digit"),
                lambda reply, expected: final_answer(reply) == expected,
                "organism prompt sets harmful and benign, problems arithmetic_2digit")


def halves(items: Sequence, seed: int) -> tuple[list, list]:
    """A seeded shuffle cut in half: (fit, held out)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = len(items) // 2
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


# ---------------------------------------------------------------- interventions


def random_control(intervention: PlaneIntervention, seed: int) -> PlaneIntervention:
    """The same method and strength at the same sites with a random orthonormal plane, and random vectors of each
    site's norm for `add`."""
    g = torch.Generator().manual_seed(seed)
    d = intervention.plane.shape[0]
    plane, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    vectors = torch.randn(intervention.vectors.shape, generator=g, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * intervention.vectors.double().norm(dim=-1, keepdim=True)
    return PlaneIntervention(intervention.method, intervention.sites, intervention.strength,
                             plane.to(intervention.plane.dtype), vectors.to(intervention.vectors.dtype))


def parse_method(spec: str) -> list[tuple[str, float]]:
    """`rotate:60,120` as [(rotate, 60), (rotate, 120)]; `ablate` as [(ablate, 0)]."""
    name, _, strengths = spec.partition(":")
    steering_method(name)
    return [(name, float(s)) for s in strengths.split(",")] if strengths else [(name, 0.0)]


# ---------------------------------------------------------------- measuring


@dataclass
class Outcomes:
    """Per held-out prompt: the judges' readings of one configuration's replies."""

    refused_harmful: list[bool]
    phrase_refused_harmful: list[bool]
    degenerate_harmful: list[bool]
    refused_benign: list[bool]
    phrase_refused_benign: list[bool]
    degenerate_benign: list[bool]
    correct: list[bool]
    examples: list[str]


def replies(handle: ModelHandle, prompts: Sequence[Conversation], intervention: PlaneIntervention | None,
            max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Greedy replies under the intervention, and whether each is degenerate (read by the unsteered model)."""
    if intervention is None:
        ids = generate_with_ids(handle, prompts, max_new_tokens)
    else:
        with steering(handle, intervention):
            ids = generate_with_ids(handle, prompts, max_new_tokens)
    texts = [decode_text(handle.tokenizer, r, skip_special_tokens=True).strip() for r in ids]
    perplexities = reply_perplexities(handle, prompts, ids)
    return texts, [degenerate(t, p) for t, p in zip(texts, perplexities)]


def measure(handle: ModelHandle, intervention: PlaneIntervention | None, harmful: Sequence[Conversation],
            benign: Sequence[Conversation], utility: Sequence[Problem], checker, judge: Judge,
            max_new_tokens: int, utility_tokens: int) -> Outcomes:
    harmful_texts, harmful_bad = replies(handle, harmful, intervention, max_new_tokens)
    benign_texts, benign_bad = replies(handle, benign, intervention, max_new_tokens)
    if intervention is None:
        answers = generate_with_ids(handle, [p.conversation for p in utility], utility_tokens)
    else:
        with steering(handle, intervention):
            answers = generate_with_ids(handle, [p.conversation for p in utility], utility_tokens)
    answer_texts = [decode_text(handle.tokenizer, r, skip_special_tokens=True) for r in answers]
    return Outcomes(judge(harmful, harmful_texts), refusal_phrases(harmful, harmful_texts), harmful_bad,
                    judge(benign, benign_texts), refusal_phrases(benign, benign_texts), benign_bad,
                    [checker(t, p.expected) for t, p in zip(answer_texts, utility)],
                    harmful_texts[:2] + benign_texts[:1])


# ---------------------------------------------------------------- figures


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Rate(_Model):
    """A rate over held-out prompts pooled across seeds, its 95% bootstrap interval, and each seed's value."""

    value: float
    low: float
    high: float
    per_seed: list[float]


class Row(_Model):
    method: str                    # "unsteered", or the method
    strength: float
    control: bool                  # the random control of that method and strength
    refusal_harmful: Rate
    phrase_refusal_harmful: Rate
    degenerate_harmful: Rate
    over_refusal_benign: Rate
    phrase_refusal_benign: Rate
    degenerate_benign: Rate
    utility: Rate
    utility_kept: float            # utility / the unsteered utility
    examples: list[str]            # the first seed's first replies: two harmful, one benign


class MethodsReport(_Model):
    model: str
    data: str
    judge: str
    seeds: int
    resamples: int
    max_new_tokens: int
    held_out: dict[str, int]       # prompts per seed
    layers: list[list[int]]        # the plane's selected layers, per seed
    command: str
    rows: list[Row]
    notes: list[str]
    seconds: float


def rate(flags: Sequence[Sequence[bool]], resamples: int, seed: int) -> Rate:
    """Pooled rate of per-seed flags with a bootstrap interval that resamples prompts within each seed."""
    values = torch.tensor([float(f) for fs in flags for f in fs], dtype=torch.float64)
    strata = torch.tensor([s for s, fs in enumerate(flags) for _ in fs])
    counts = resample_counts(strata, resamples, seed)
    low, high = percentile_interval(counts @ values / len(values))
    return Rate(value=float(values.mean()), low=low, high=high,
                per_seed=[sum(fs) / len(fs) if fs else float("nan") for fs in flags])


def row(method: str, strength: float, control: bool, runs: Sequence[Outcomes], resamples: int,
        unsteered_utility: float | None) -> Row:
    def r(name: str, seed: int) -> Rate:
        return rate([getattr(o, name) for o in runs], resamples, seed)

    utility = r("correct", 6)
    kept = utility.value / unsteered_utility if unsteered_utility else float("nan")
    return Row(method=method, strength=strength, control=control, refusal_harmful=r("refused_harmful", 0),
               phrase_refusal_harmful=r("phrase_refused_harmful", 1), degenerate_harmful=r("degenerate_harmful", 2),
               over_refusal_benign=r("refused_benign", 3), phrase_refusal_benign=r("phrase_refused_benign", 4),
               degenerate_benign=r("degenerate_benign", 5), utility=utility,
               utility_kept=1.0 if unsteered_utility is None else kept, examples=runs[0].examples)


def build_report(handle: ModelHandle, data: Data, judge: Judge, judge_name: str, methods: Sequence[tuple[str, float]],
                 *, seeds: int = 3, resamples: int = 1000, max_new_tokens: int = 32, utility_tokens: int = 48,
                 sites: str = "resid_pre", layers: str = "auto", command: str = "",
                 progress: Callable[[str], None] = lambda _: None) -> MethodsReport:
    started = time.perf_counter()
    read = (norm_sites(handle.n_layers) if sites == "norm"
            else [f"blocks.{layer}.hook_resid_pre" for layer in range(handle.n_layers)])
    runs: dict[tuple[str, float, bool], list[Outcomes]] = {}
    selected, held, notes = [], {}, []
    for seed in range(seeds):
        fit_h, held_h = halves(data.harmful, seed)
        fit_b, held_b = halves(data.benign, seed)
        _, utility = halves(data.utility, seed)
        held = {"harmful": len(held_h), "benign": len(held_b), "utility": len(utility)}
        plane = SteeringPlane(layers=layers).fit(last_prompt_activations(handle, fit_h, read),
                                                 last_prompt_activations(handle, fit_b, read))
        selected.append(list(plane.selected_layers))
        if not plane.selected_layers:
            notes.append(f"seed {seed}: the sign test selected no block, so every method is the identity "
                         "(try --sites norm or --layers all)")

        configs: list[tuple[tuple[str, float, bool], PlaneIntervention | None]] = [(("unsteered", 0.0, False), None)]
        for method, strength in methods:
            intervention = PlaneIntervention.from_plane(plane, steering_method(method), strength)
            configs += [((method, strength, False), intervention),
                        ((method, strength, True), random_control(intervention, 1_000 * seed + 17))]
        for key, intervention in configs:
            progress(f"seed {seed}: {key[0]} {key[1]:g}{' (random control)' if key[2] else ''}")
            runs.setdefault(key, []).append(measure(handle, intervention, held_h, held_b, utility, data.checker,
                                                    judge, max_new_tokens, utility_tokens))
    base = runs[("unsteered", 0.0, False)]
    unsteered_utility = sum(sum(o.correct) for o in base) / max(sum(len(o.correct) for o in base), 1)
    rows = [row(m, s, c, outcomes, resamples, None if m == "unsteered" else unsteered_utility)
            for (m, s, c), outcomes in runs.items()]
    if unsteered_utility == 0:
        notes.append("the unsteered model answers no utility problem, so utility kept is undefined")
    return MethodsReport(model=handle.name, data=data.describe, judge=judge_name, seeds=seeds, resamples=resamples,
                         max_new_tokens=max_new_tokens, held_out=held, layers=selected, command=command, rows=rows,
                         notes=notes, seconds=round(time.perf_counter() - started, 1))


# ---------------------------------------------------------------- markdown


def _r(x: Rate) -> str:
    return f"{x.value:.2f} [{x.low:.2f}, {x.high:.2f}]"


def markdown(report: MethodsReport) -> str:
    lines = [f"# Steering figures: `{report.model}`", "",
             f"Generated by `{report.command}` ({report.seconds:.0f} s).", "",
             f"Data: {report.data}. Per seed ({report.seeds}), the plane is fitted on half of the harmful and benign "
             f"prompts and every figure is read on the other half ({report.held_out.get('harmful', 0)} harmful, "
             f"{report.held_out.get('benign', 0)} benign) and on {report.held_out.get('utility', 0)} utility "
             f"problems; replies of at most {report.max_new_tokens} tokens. Refusal judge: {report.judge}; the "
             "refusal-phrase judge beside it. Degenerate: empty, looping, or perplexity above 20 under the unsteered "
             "model. Intervals: 95% bootstrap over prompts within seeds. Selected layers per seed: "
             f"{'; '.join(','.join(map(str, ls)) for ls in report.layers)}.", "",
             "| method | strength | control | refusal (harmful) | phrase refusal (harmful) | degenerate (harmful) | "
             "over-refusal (benign) | phrase refusal (benign) | degenerate (benign) | utility | utility kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in report.rows:
        lines.append(f"| {x.method} | {'' if x.method in ('unsteered', 'ablate') else f'{x.strength:g}'} | "
                     f"{'random' if x.control else ''} | {_r(x.refusal_harmful)} | {_r(x.phrase_refusal_harmful)} | "
                     f"{_r(x.degenerate_harmful)} | {_r(x.over_refusal_benign)} | {_r(x.phrase_refusal_benign)} | "
                     f"{_r(x.degenerate_benign)} | {_r(x.utility)} | {x.utility_kept:.2f} |")
    lines += ["", "## Example replies (first seed)", ""]
    for x in report.rows:
        if not x.control:
            label = x.method if x.method in ("unsteered", "ablate") else f"{x.method} {x.strength:g}"
            lines.append(f"- {label}: " + " / ".join(f"`{e[:90]}`" for e in x.examples))
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def load(args: argparse.Namespace) -> tuple[ModelHandle, Data, Judge, str]:
    from gavel.models.loading import load_model
    from gavel.probes.bank import CEBank
    from gavel.runtime.judges import judge_from, refusal_ce

    handle = load_model(args.model)
    if args.model == ORGANISM:
        data = organism_data()
    else:
        data = english_data(args.data)
    if args.judge is not None:
        return handle, data, judge_from(args.judge, handle), args.judge
    if args.model == ORGANISM:
        from gavel.organism.datasets import organism_dataset
        from gavel.organism.demo import demo_sites
        from gavel.probes.fit import fit_bank

        print("fitting the organism's bank (the demo's recipe) for the refusal judge", file=sys.stderr)
        bank = fit_bank(handle, organism_dataset(handle.tokenizer, 1500, seed=2024), demo_sites(handle.n_layers))
        return handle, data, refusal_ce(handle, bank, "refusal"), "the demo bank's refusal CE (organism corpus)"
    from gavel.packs import pack_dir

    bank_dir = pack_dir(args.model) / "bank"
    bank = CEBank.load(bank_dir, handle.fingerprint())
    return handle, data, refusal_ce(handle, bank, "refusal"), f"the refusal CE of {bank_dir.relative_to(ROOT)}"


def main(argv: Sequence[str] | None = None) -> MethodsReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--data", type=Path, default=ROOT / "data/english/requests")
    parser.add_argument("--method", action="append", help=f"METHOD[:S1,S2] (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--judge", help="BANK:CE, or phrases (default: the model's bank's refusal CE)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--utility-tokens", type=int, default=48, help="new tokens of a utility answer")
    parser.add_argument("--sites", choices=("resid_pre", "norm"), default="resid_pre",
                        help="where the plane is fitted and steers: every block's residual input, or its norm outputs")
    parser.add_argument("--layers", choices=("auto", "all"), default="auto", help="auto: the sign test's blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--out-md", type=Path)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.model.removeprefix("builtin:")
    out_json = args.out_json or ROOT / f"benchmarks/results/methods_{name}.json"
    out_md = args.out_md or ROOT / f"docs/steering_figures_{name}.md"
    methods = [m for spec in (args.method or DEFAULT_METHODS) for m in parse_method(spec)]
    handle, data, judge, judge_name = load(args)
    report = build_report(handle, data, judge, judge_name, methods, seeds=args.seeds, resamples=args.resamples,
                          max_new_tokens=args.max_new_tokens, utility_tokens=args.utility_tokens,
                          sites=args.sites, layers=args.layers,
                          command=shlex.join(["python", "benchmarks/methods_report.py", *argv]),
                          progress=lambda text: print(text, file=sys.stderr, flush=True))
    for path, text in ((out_json, report.model_dump_json(indent=2) + "\n"), (out_md, markdown(report))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
