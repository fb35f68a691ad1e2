"""Measures the built-in organism and the demo: behaviour rates, probe AUROCs, demo wall time.

Usage: python benchmarks/organism_report.py [--model builtin:organism] [--out benchmarks/results/organism.json]
Prints a table and writes JSON. Runs on one torch thread (see DESIGN.md on thread contention).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:organism")
    parser.add_argument("--out", default="benchmarks/results/organism.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gavel.models.loading import load_model
    from gavel.organism.behaviour import measure_behaviour
    from gavel.organism.demo import run_demo

    start = time.perf_counter()
    behaviour = measure_behaviour(load_model(args.model))
    behaviour_seconds = time.perf_counter() - start
    demo = run_demo(args.model)
    report = {
        "model": args.model,
        "behaviour": behaviour,
        "behaviour_seconds": round(behaviour_seconds, 1),
        "demo_seconds": demo.seconds,
        "demo_probe_sites": demo.probe_sites,
        "demo_probe_auroc": demo.probe_auroc,
        "demo_cases": [{"kind": c.kind, "blocked": c.blocked, "rules": [e.rule for e in c.events]} for c in demo.cases],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in behaviour.items():
        print(f"{key:40s} {value:.3f}")
    for key, value in demo.probe_auroc.items():
        print(f"probe AUROC {key:28s} {value:.3f}")
    print(f"demo: {demo.seconds:.1f} s   behaviour eval: {behaviour_seconds:.1f} s   -> {out}")


if __name__ == "__main__":
    main()
