"""Per-CE held-out quality on the organism: linear probes and difference-of-means at every layer.

Usage: python benchmarks/ce_quality.py [--examples 3000] [--out benchmarks/results/ce_quality.json]
Fits a bank per layer (hook_resid_post) and one that reads each CE at its best layer, and prints the
held-out (test split) token AUROC per CE, plus sequence-level TPR/FPR of the best-layer bank.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--out", default="benchmarks/results/ce_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gavel.models.loading import load_model
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import fit_bank

    handle = load_model("builtin:organism")
    dataset = organism_dataset(handle.tokenizer, args.examples, seed=2024)
    layers = [f"blocks.{layer}.hook_resid_post" for layer in range(handle.n_layers)]
    report: dict = {"examples": args.examples, "per_layer": {}, "best": {}}
    for extractor in ("linear", "diff_means"):
        for site in layers:
            bank = fit_bank(handle, dataset, [site], extractor=extractor)
            aurocs = {c.name: c.metrics["auroc"] for c in bank.manifest.ces}
            report["per_layer"].setdefault(extractor, {})[site] = aurocs
        start = time.perf_counter()
        bank = fit_bank(handle, dataset, layers, extractor=extractor)
        report["best"][extractor] = {
            "seconds": round(time.perf_counter() - start, 1),
            "ces": {c.name: {"site": "+".join(bank.heads[c.head].sites), **c.metrics} for c in bank.manifest.ces}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    names = list(report["best"]["linear"]["ces"])
    print(f"{'CE':20s} " + " ".join(f"L{i:<5d}" for i in range(len(layers)))
          + " best   site   seqTPR seqFPR | diff-means best")
    for n in names:
        per = [report["per_layer"]["linear"][s][n] for s in layers]
        best = report["best"]["linear"]["ces"][n]
        dm = report["best"]["diff_means"]["ces"][n]["auroc"]
        print(f"{n:20s} " + " ".join(f"{a:.3f}" for a in per)
              + f"  {best['auroc']:.3f}  L{best['site'].split('.')[1]}    {best['sequence_tpr']:.2f}   "
                f"{best['sequence_fpr']:.2f}   | {dm:.3f}")
    worst = min(report["best"]["linear"]["ces"].values(), key=lambda m: m["auroc"])
    print(f"min best-layer AUROC (linear): {worst['auroc']:.3f}   -> {out}")


if __name__ == "__main__":
    main()
