"""An SAE on SmolLM2-135M-Instruct's residual stream, trained on the CPU within a wall-clock budget.

Usage: python benchmarks/sae_train.py [--data data/english/train] [--site blocks.16.hook_resid_post]
           [--d-sae 2304] [--budget 900] [--save DIR] [--out benchmarks/results/sae_train.json]
Collects the site's activations over the training examples of --data (repeatable; GAVEL ces/ folders or
labelled-span .jsonl files; at most --max-examples of them, a seeded subset), trains a ReLU SAE with sae-lens's
SAETrainer until the budget (collection included) runs out, then reports on the held-out examples: fraction of
variance unexplained, L0, dead latents, and the next-token loss with the reconstruction spliced in (clean and
zero-ablated for reference). The SAE is saved to --save with float16 weights; the report goes to --out and stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--data", action="append", help="default: data/english/train")
    parser.add_argument("--site", default="blocks.16.hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=4 * 576)
    parser.add_argument("--sparsity", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparsity-warmup", type=int, default=50, help="steps")
    parser.add_argument("--tokens", type=int, default=100_000_000, help="an upper bound: the budget stops first")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for collection and training")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--max-examples", type=int, default=450,
                        help="a seeded subset of the examples: collecting runs at 100-300 tokens a second on 2 "
                             "shared cores, and its time counts in the budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="/tmp/gavel-sae-smollm2", help="where the SAE goes (float16 weights)")
    parser.add_argument("--out", default="benchmarks/results/sae_train.json")
    args = parser.parse_args()

    from gavel.models.loading import load_model
    from gavel.probes.data import load_dataset, merge_datasets
    from gavel.probes.sae_train import SAETrainConfig, save_trained, train_sae

    started = time.monotonic()
    handle = load_model(args.model)
    specs = args.data or ["data/english/train"]
    datasets = [load_dataset(spec, handle.tokenizer) for spec in specs]
    dataset = datasets[0] if len(datasets) == 1 else merge_datasets(*datasets)
    if len(dataset) > args.max_examples:
        share = args.max_examples / len(dataset)
        dataset = dataset.split([share, 1 - share], seed=args.seed)[0]
    config = SAETrainConfig(d_sae=args.d_sae, sparsity=args.sparsity, tokens=args.tokens, batch_size=args.batch_size,
                            lr=args.lr, sparsity_warmup=args.sparsity_warmup, seed=args.seed, holdout=args.holdout,
                            budget_s=args.budget)
    sae, report = train_sae(handle, dataset, args.site, config)
    path = save_trained(sae, report, args.save, half=True)
    size = sum(f.stat().st_size for f in path.iterdir())
    result = {"data": specs, "examples": len(dataset), "saved_to": str(path), "saved_bytes": size,
              "wall_seconds": round(time.monotonic() - started, 1), "report": report.model_dump(mode="json")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    held = report.held_out
    print(f"{args.model} {args.site}: d_sae {args.d_sae}, {report.steps} steps x {args.batch_size} tokens "
          f"({report.epochs:.1f} epochs of {report.train_tokens} tokens, stopped by {report.stopped})")
    print(f"held out ({held.examples} examples, {held.tokens} tokens): FVU {held.fvu:.3f}  L0 {held.l0:.1f}  "
          f"dead {held.dead_fraction:.1%}")
    print(f"next-token loss: clean {held.loss_clean:.3f}  spliced {held.loss_spliced:.3f}  zero {held.loss_zero:.3f}"
          f"  recovered {held.loss_recovered:.3f}")
    print(f"seconds: collect {report.seconds_collect:.0f}  train {report.seconds_train:.0f}  "
          f"evaluate {report.seconds_eval:.0f}; saved {size / 1e6:.1f} MB to {path} -> {out}")


if __name__ == "__main__":
    main()
