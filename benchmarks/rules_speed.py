"""How fast rules load, compile and run on this CPU, on one torch thread.

Targets: load (YAML + validation + condition parsing) and compile 1,000 generated rules in <= 2 s;
`RuleProgram.run` evaluates 100 rules at >= 1M token-steps/s (batch 64, 15,625 tokens each, 64 CEs).
Usage: python benchmarks/rules_speed.py [--rules 1000] [--eval-rules 100] [--steps 1000000] [--batch 64]
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
    parser.add_argument("--out", default="benchmarks/results/rules_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ces = [f"ce_{j:03d}" for j in range(args.ces)]
    parse_condition("warm and up")  # builds the Lark parser once, as any process does on first use

    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "pack.yaml"
        pack.write_text(yaml.safe_dump({"pack": "bench", "rules": generate_rules(args.rules, ces, 0)}))

        def load():
            parse_condition.cache_clear()
            return load_rules(pack)

        load_s, rules = _median_seconds(load, args.repeats)
    compile_s, _ = _median_seconds(lambda: compile_rules(rules, ces), args.repeats)
    build_s = load_s + compile_s

    program = compile_rules(rules[:args.eval_rules], ces)
    length = args.steps // args.batch
    g = torch.Generator().manual_seed(0)
    fired = torch.rand(args.batch, length, len(ces), generator=g) < args.fire_rate
    mask = torch.ones(args.batch, length, dtype=torch.bool)
    program.run(fired[:, :256], mask[:, :256])  # warm-up
    run_s, holds = _median_seconds(lambda: program.run(fired, mask), args.repeats)
    steps = args.batch * length
    rate = steps / run_s

    result = {
        "threads": 1,
        "build": {"rules": len(rules), "load_seconds": round(load_s, 3), "compile_seconds": round(compile_s, 3),
                  "seconds": round(build_s, 3), "time_ratio_to_2s_target": round(build_s / 2.0, 3)},
        "run": {"rules": len(program.rule_names), "ces": len(ces), "batch": args.batch, "tokens": length,
                "token_steps": steps, "seconds": round(run_s, 3), "steps_per_second": round(rate),
                "throughput_ratio_to_1M_target": round(rate / 1e6, 3),
                "rules_holding_at_end": round(holds[:, -1].float().mean().item(), 3)},
    }
    print(f"torch threads: 1 (torch {torch.__version__})")
    print(f"load {len(rules)} rules: {load_s:.3f} s (YAML + validation + parsing), compile: {compile_s:.3f} s; "
          f"total {build_s:.3f} s = {build_s / 2.0:.2f} of the 2 s target")
    print(f"run {len(program.rule_names)} rules over {steps:,} token-steps (batch {args.batch} x {length} tokens, "
          f"{len(ces)} CEs): {run_s:.3f} s = {rate / 1e6:.2f}M steps/s = {rate / 1e6:.2f}x the 1M steps/s target")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
