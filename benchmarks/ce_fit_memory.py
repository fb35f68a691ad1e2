"""Peak memory of `gavel ce fit --site auto` on a BERT-base-sized encoder with GAVEL-shaped data, by data size.

Usage: python benchmarks/ce_fit_memory.py [--samples 25 50 100] [--max-rows 5000 20000] [--threads 2]
Builds, under --workdir (default /tmp/gavel_ce_fit_memory): a randomly initialised 6-layer BertConfig model
(hidden 768, 12 heads, intermediate 3072, 512 positions) with a WordPiece BERT tokenizer over a made-up
vocabulary, and a GAVEL library of 23 CEs (`ces/<name>/ce.yaml`, `excitation.json` with --samples single
exchanges each of ~100-200 tokens, `calibration.json` with 15 multi-turn conversations each). Then runs the CLI
once per size and cap in its own process and reads that process's peak RSS (os.wait4) and wall time. Fitted memory
should stay flat in the data size once the training tokens pass --max-rows (see docs/probes.md, "Memory").
Prints one line per size and writes benchmarks/results/ce_fit_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

N_CES, LAYERS, D_MODEL, HEADS, D_MLP, POSITIONS, CALIBRATION = 23, 6, 768, 12, 3072, 512, 15
WORDS = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "bcdfgklmnprstvz"]  # 1200 words


def build_model(folder: Path) -> None:
    """The random BERT encoder and its tokenizer, saved where `gavel --model` reads them."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate([*specials, ":", ".", ",", "?", "system", "user", "assistant", *WORDS])}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                           cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=D_MLP, max_position_embeddings=POSITIONS)
    torch.manual_seed(0)
    tf.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_library(root: Path, samples: int, seed: int = 0) -> Path:
    """23 GAVEL CE folders: each CE's assistant replies carry a few words of its own among common ones."""
    rng = random.Random(seed)
    common = WORDS[:800]
    own = {j: WORDS[800 + 16 * j: 816 + 16 * j] for j in range(N_CES)}

    def text(n: int, j: int | None = None) -> str:
        words = [rng.choice(own[j]) if j is not None and rng.random() < 0.3 else rng.choice(common) for _ in range(n)]
        return " ".join(words) + " ."

    def exchange(j: int | None) -> list[dict[str, str]]:
        return [{"role": "user", "content": text(rng.randint(20, 50))},
                {"role": "assistant", "content": text(rng.randint(40, 100), j)}]

    ces = root / "ces"
    for j in range(N_CES):
        name = f"ce_{j:02d}"
        folder = ces / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ce.yaml").write_text(f"name: {name}\ntitle: CE {j}\nrole: topic\ndefinition: made-up concept {j}\n")
        excitation = [[{"role": "system", "content": text(rng.randint(10, 30))}, *exchange(j)] for _ in range(samples)]
        calibration = [[m for _ in range(rng.randint(1, 2)) for m in exchange(None)] + exchange(j)
                       for _ in range(CALIBRATION)]
        (folder / "excitation.json").write_text(json.dumps({"conversations": excitation}))
        (folder / "calibration.json").write_text(json.dumps({"conversations": calibration}))
    return ces


def run_fit(model: Path, ces: Path, out: Path, max_rows: int, threads: int) -> dict:
    """`gavel ce fit --site auto` in a child process: its peak RSS, wall time and exit code."""
    gavel = Path(sys.executable).with_name("gavel")
    command = [str(gavel), "ce", "fit", "--data", str(ces), "--model", str(model), "--site", "auto",
               "--max-rows", str(max_rows), "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        stdout = child.stdout.read() if child.stdout else ""
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    report = json.loads(stdout) if code == 0 else {}
    aurocs = [m["auroc"] for m in report.get("ces", {}).values()]
    return {"exit_code": code, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(seconds, 1),
            "mean_test_auroc": round(sum(aurocs) / len(aurocs), 4) if aurocs else None,
            "thresholds_from": report.get("thresholds_from")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, nargs="+", default=[25, 50, 100],
                        help="excitation samples per CE, one run each")
    parser.add_argument("--max-rows", type=int, nargs="+", default=[20_000], help="row caps, one run each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/gavel_ce_fit_memory")
    parser.add_argument("--out", default="benchmarks/results/ce_fit_memory.json")
    args = parser.parse_args()
    work = Path(args.workdir)
    model = work / "bert"
    if not (model / "config.json").exists():
        build_model(model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    results = []
    for samples in args.samples:
        ces = build_library(work / f"library_{samples}", samples)
        tokens = sum(len(tokenizer(m["content"])["input_ids"]) for p in ces.glob("*/excitation.json")
                     for c in json.loads(p.read_text())["conversations"] for m in c)
        for max_rows in args.max_rows:
            row = {"samples_per_ce": samples, "excitation_tokens": tokens, "max_rows": max_rows,
                   **run_fit(model, ces, work / f"bank_{samples}_{max_rows}", max_rows, args.threads),
                   # what keeping every layer's activations takes (the fit before streaming): tokens x d x layers x 4
                   "all_activations_mb": round(tokens * D_MODEL * LAYERS * 4 / 2**20, 1),
                   "row_sample_mb": round(max_rows * D_MODEL * LAYERS * 4 / 2**20, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": f"random BertConfig {LAYERS} layers, d_model {D_MODEL}",
                                          "ces": N_CES, "calibration_per_ce": CALIBRATION, "runs": results},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
