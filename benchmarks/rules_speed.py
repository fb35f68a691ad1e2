"""How fast rules load, compile and run on this CPU (one torch thread unless --threads).

Targets: load (YAML + validation + condition parsing) and compile 1,000 generated rules in <= 2 s;
`RuleProgram.run` evaluates 100 rules at >= 1M token-steps/s (batch 64, 15,625 tokens each, 64 CEs).
Two rule families: GAVEL conditions (groups, selectors, and/or; conversation mode) and the temporal language
(comparisons, not, once/then/for/count/max windows, scopes, both modes). Also timed: token-by-token `step`
(batch 64), the monitor's decoding path.
Usage: python benchmarks/rules_speed.py [--rules 1000] [--eval-rules 100] [--steps 1000000] [--batch 64] [--threads 1]
Each measurement is the median of --repeats runs (the condition parse cache is cleared before each load).
Writes benchmarks/results/rules_speed.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from gavel.rules import compile_rules, load_rules, parse_condition
from gavel.rules.compile.program import RESPONSE


def _condition(rng: random.Random, groups: dict[str, list[str]], depth: int) -> str:
    """A random condition over the rule's groups (and bare CE names), up to `depth` and/or levels."""
    if depth == 0 or rng.random() < 0.3:
        group = rng.choice(list(groups))
        kind = rng.randrange(4)
        if kind == 0:
            return f"all of {group}"
        if kind == 1:
            return f"{rng.randint(1, len(groups[group]))} of {group}"
        return group if kind == 2 else rng.choice(groups[group])
    op = rng.choice(["and", "or"])
    terms = [_condition(rng, groups, depth - 1) for _ in range(rng.randint(2, 3))]
    return f" {op} ".join(f"({t})" if " and " in t or " or " in t else t for t in terms)


def _temporal(rng: random.Random, groups: dict[str, list[str]], depth: int) -> str:
    """A random condition of the full language over the rule's groups and CEs."""
    names = [*groups, *(c for g in groups.values() for c in g)]
    if depth == 0 or rng.random() < 0.25:
        a, b = rng.choice(names), rng.choice(names)
        n = rng.randint(2, 16)
        return rng.choice([
            f"{a}", f"{rng.choice(names)} > 0.{rng.randint(5, 9)}", f"once {a} within {n} tokens",
            f"{a} then {b} within {n} tokens", f"{a} for {rng.randint(2, 4)} tokens",
            f"count({a}) >= {rng.randint(2, 3)} within {n} tokens", f"max({a}) over {n} tokens > 0.9",
            f"{a} in {rng.choice(['prompt', 'response', 'user', 'assistant'])}", f"not {a}",
            f"2 of ({a}, {b}, {rng.choice(names)})"])
    op = rng.choice(["and", "or"])
    terms = [_temporal(rng, groups, depth - 1) for _ in range(rng.randint(2, 3))]
    return f" {op} ".join(f"({t})" if " and " in t or " or " in t else t for t in terms)


def generate_temporal_rules(n: int, ces: list[str], seed: int) -> list[dict]:
    """`n` rules of the temporal language, half per token and half conversation-level."""
    rng = random.Random(seed)
    rules = []
    for i in range(n):
        groups = {f"{topic}_{i}": rng.sample(ces, rng.randint(2, 4))
                  for topic in rng.sample(["threat", "money", "topic", "urgency", "fiction"], 2)}
        rules.append({"name": f"temporal_{i}", "groups": groups, "condition": _temporal(rng, groups, 2),
                      "match": rng.choice(["token", "conversation"])})
    return rules


def traces(batch: int, length: int, n_ces: int, fire_rate: float, seed: int):
    """CE scores that are mostly low with rare spikes (fired above 0.5), plus role codes: user prompt, then
    the assistant's response."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, length, n_ces, generator=g) * 0.2
    spikes = torch.rand(batch, length, n_ces, generator=g) < fire_rate
    scores = torch.where(spikes, 0.6 + 0.4 * torch.rand(batch, length, n_ces, generator=g), scores)
    roles = torch.full((batch, length), 2, dtype=torch.long)
    roles[:, length // 4:] = 3 + RESPONSE
    return scores > 0.5, scores, roles


def generate_rules(n: int, ces: list[str], seed: int) -> list[dict]:
    """`n` GAVEL rules, each with 2-3 groups of 2-4 CEs (group names unique per rule, so no two conditions match)."""
    rng = random.Random(seed)
    rules = []
    for i in range(n):
        groups = {f"{topic}_{i}": rng.sample(ces, rng.randint(2, 4))
                  for topic in rng.sample(["threat", "money", "topic", "urgency", "fiction"], rng.randint(2, 3))}
        rules.append({"name": f"rule_{i}", "groups": groups, "condition": _condition(rng, groups, 3)})
    return rules


def _median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--eval-rules", type=int, default=100)
    parser.add_argument("--ces", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1_000_000, help="token-steps: batch x tokens")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fire-rate", type=float, default=2e-4, help="chance a CE fires at a token")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (this machine has 2 cores)")
    parser.add_argument("--out", default="benchmarks/results/rules_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ces = [f"ce_{j:03d}" for j in range(args.ces)]
    parse_condition("warm and up")  # builds the Lark parser once, as any process does on first use

    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "pack.yaml"
        half = args.rules // 2
        specs = generate_rules(args.rules - half, ces, 0) + generate_temporal_rules(half, ces, 1)
        pack.write_text(yaml.safe_dump({"pack": "bench", "rules": specs}))

        def load():
            parse_condition.cache_clear()
            return load_rules(pack)

        load_s, rules = _median_seconds(load, args.repeats)
    compile_s, _ = _median_seconds(lambda: compile_rules(rules, ces), args.repeats)
    build_s = load_s + compile_s
    result = {"threads": args.threads, "build": {"rules": len(rules), "load_seconds": round(load_s, 3),
                                      "compile_seconds": round(compile_s, 3), "seconds": round(build_s, 3),
                                      "time_ratio_to_2s_target": round(build_s / 2.0, 3)}}
    print(f"torch threads: {args.threads} (torch {torch.__version__})")
    print(f"load {len(rules)} rules (half GAVEL, half temporal): {load_s:.3f} s (YAML + validation + parsing), "
          f"compile: {compile_s:.3f} s; total {build_s:.3f} s = {build_s / 2.0:.2f} of the 2 s target")

    length = args.steps // args.batch
    fired, scores, roles = traces(args.batch, length, len(ces), args.fire_rate, 0)
    mask = torch.ones(args.batch, length, dtype=torch.bool)
    gavel_rules = [r for r in rules if not r.name.startswith("temporal_")][:args.eval_rules]
    temporal_rules = [r for r in rules if r.name.startswith("temporal_")][:args.eval_rules]
    for family, chosen in (("gavel", gavel_rules), ("temporal", temporal_rules)):
        program = compile_rules(chosen, ces)
        kwargs = {"scores": scores, "roles": roles}
        program.run(fired[:, :256], mask[:, :256], scores=scores[:, :256], roles=roles[:, :256])  # warm-up
        run_s, holds = _median_seconds(lambda program=program, kwargs=kwargs: program.run(fired, mask, **kwargs),
                                       args.repeats)
        steps = args.batch * length
        rate = steps / run_s
        result[f"run_{family}"] = {
            "rules": len(program.rule_names), "ces": len(ces), "batch": args.batch, "tokens": length,
            "token_steps": steps, "seconds": round(run_s, 3), "steps_per_second": round(rate),
            "throughput_ratio_to_1M_target": round(rate / 1e6, 3),
            "rules_holding_at_end": round(holds[:, -1].float().mean().item(), 3)}
        print(f"run {len(program.rule_names)} {family} rules over {steps:,} token-steps (batch {args.batch} x "
              f"{length} tokens, {len(ces)} CEs): {run_s:.3f} s = {rate / 1e6:.2f}M steps/s = "
              f"{rate / 1e6:.2f}x the 1M steps/s target")
        state = program.init_state(args.batch)
        tokens = 200
        start = time.perf_counter()
        for t in range(tokens):
            _, state = program.step(fired[:, t], state, scores=scores[:, t], roles=roles[:, t])
        step_s = (time.perf_counter() - start) / tokens
        result[f"step_{family}"] = {"batch": args.batch, "ms_per_token": round(step_s * 1e3, 3),
                                    "steps_per_second": round(args.batch / step_s)}
        print(f"  token by token (step, batch {args.batch}): {step_s * 1e3:.2f} ms per token = "
              f"{args.batch / step_s / 1e3:.0f}k steps/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
