"""How long fitting 20 linear CEs on 200k tokens takes on this CPU (target: <= 60 s).

Usage: python benchmarks/ce_fit_speed.py [--tokens 200000] [--ces 20] [--widths 128 512 2048] [--threads 2]
Activations are synthetic (Gaussian with planted CE directions) so the width can match real models;
the fit is the same L-BFGS logistic probe `gavel ce fit` runs. Writes benchmarks/results/ce_fit_speed.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--ces", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/ce_fit_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gavel.probes.linear import LinearProbe

    results = []
    for d in args.widths:
        g = torch.Generator().manual_seed(d)
        X = torch.randn(args.tokens, d, generator=g)
        directions = torch.randn(d, args.ces, generator=g) / d ** 0.5
        Y = (X @ directions + 0.5 * torch.randn(args.tokens, args.ces, generator=g)) > 1.0
        start = time.perf_counter()
        probe = LinearProbe().fit(X, Y)
        seconds = time.perf_counter() - start
        auroc = probe.score(X[:20_000], Y[:20_000])
        results.append({"width": d, "tokens": args.tokens, "ces": args.ces, "seconds": round(seconds, 2),
                        "ratio_to_target_60s": round(seconds / 60, 3), "train_auroc": round(auroc, 4)})
        print(f"d={d:5d}: {seconds:6.1f} s for {args.ces} CEs on {args.tokens} tokens "
              f"({seconds / 60:.2f} of the 60 s target), AUROC {auroc:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
