"""Windowed GRU (the GAVEL paper's classifier) against per-token linear probes on the organism, per layer and CE.

Usage: python benchmarks/window_vs_linear.py [--examples 1500] [--layers 1 2 3]
Collects hook_resid_post once, keeps content rows, splits examples 60/20/20 as fit_bank does (the middle
part is unused), fits both extractors on train and prints test token and sequence AUROC per CE.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path("benchmarks/results/window_vs_linear.json")


def sequence_auroc(scores: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor) -> float:
    from gavel.probes.metrics import auroc, sequence_maxima

    return auroc(*sequence_maxima(scores, labels, sequence))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)

    import gavel
    from gavel.models.collect import collect_activations
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import content_rows, split_examples
    from gavel.probes.linear import LinearProbe
    from gavel.probes.metrics import auroc
    from gavel.probes.window import WindowedGRUClassifier

    handle = gavel.load_model("builtin:organism")
    dataset = organism_dataset(handle.tokenizer, args.examples, seed=2024)
    sites = [f"blocks.{layer}.hook_resid_post" for layer in args.layers]
    acts = collect_activations(handle, [e.encoded for e in dataset.examples], sites, batch_size=64)
    labels = torch.cat([e.labels for e in dataset.examples])
    keep = content_rows(handle, acts)
    acts, labels = acts.select(keep), labels[keep]
    part = split_examples(len(dataset.examples), (0.6, 0.2, 0.2), seed=0)[acts.example]
    train, test = part == 0, part == 2
    both = lambda rows: labels[rows].any(0) & ~labels[rows].all(0)  # noqa: E731
    cols = (both(train) & both(test)).nonzero().squeeze(1).tolist()
    names = [dataset.names[j] for j in cols]
    Y = labels[:, cols]
    seq, pos = acts.example, acts.position
    report: dict = {"examples": args.examples, "tokens": {"train": int(train.sum()), "test": int(test.sum())},
                    "skipped_ces": [n for n in dataset.names if n not in names], "layers": {}}
    for site in sites:
        X = acts.sites[site]
        fitters = {"linear": lambda X=X: LinearProbe().fit(X[train], Y[train], names),
                   "gru": lambda X=X: WindowedGRUClassifier().fit(X[train], Y[train], seq[train], pos[train], names)}
        results = {}
        for kind, fit in fitters.items():
            start = time.perf_counter()
            est = fit()
            seconds = time.perf_counter() - start
            scores = (est.decision_function(X[test]) if kind == "linear"
                      else est.token_scores(X[test], seq[test], pos[test])).cpu()
            results[kind] = {"fit_seconds": round(seconds, 1), "ces": {
                n: {"token_auroc": round(auroc(scores[:, j], Y[test][:, j]), 4),
                    "sequence_auroc": round(sequence_auroc(scores[:, j], Y[test][:, j], seq[test]), 4)}
                for j, n in enumerate(names)}}
        report["layers"][site] = results
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, names)


def print_table(report: dict, names: list[str]) -> None:
    """Token and sequence AUROC, linear vs GRU, one block per layer; fit seconds and means under each block."""
    for site, results in report["layers"].items():
        lin, gru = results["linear"]["ces"], results["gru"]["ces"]
        print(f"\n{site}            token AUROC       sequence AUROC")
        print(f"{'CE':20s} {'linear':>8s} {'gru':>8s}   {'linear':>8s} {'gru':>8s}")
        for n in names:
            print(f"{n:20s} {lin[n]['token_auroc']:8.4f} {gru[n]['token_auroc']:8.4f}   "
                  f"{lin[n]['sequence_auroc']:8.4f} {gru[n]['sequence_auroc']:8.4f}")
        mean = {k: {m: sum(c[m] for c in v.values()) / len(v) for m in ("token_auroc", "sequence_auroc")}
                for k, v in (("linear", lin), ("gru", gru))}
        print(f"{'mean':20s} {mean['linear']['token_auroc']:8.4f} {mean['gru']['token_auroc']:8.4f}   "
              f"{mean['linear']['sequence_auroc']:8.4f} {mean['gru']['sequence_auroc']:8.4f}")
        print(f"fit seconds: linear {results['linear']['fit_seconds']}, gru {results['gru']['fit_seconds']}")
    if report["skipped_ces"]:
        print(f"skipped (one class in train or test): {', '.join(report['skipped_ces'])}")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
