"""What guarding costs behind `gavel serve`: requests/s and tokens/s of the HTTP server, guarded vs unguarded.

Two `gavel serve` processes on the built-in organism, started through the CLI on loopback ports: one guarded with
a demo-like CE bank (fitted on the organism corpus at the demo's sites, as `gavel demo` does) and the demo rule
pack, one `--no-rules`. Clients (httpx, one thread each) send non-streaming chat completions of the 8 demo prompts
round robin, greedy (temperature 0) with a fixed max_tokens, at concurrency 1 and 8; the server queues them and
generates one at a time. Repetitions are interleaved (unguarded, guarded, per concurrency); medians are reported.
ratio = guarded / unguarded. Guarded replies blocked by a rule end early, so requests/s can rise with guarding;
tokens/s (generated tokens over wall time) is the like-for-like figure.

Usage: python benchmarks/serve_throughput.py [--requests 48] [--max-tokens 32] [--concurrency 1 8] [--repeats 3]
       [--threads 1] [--n-train 1500] [--out benchmarks/results/serve_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from gavel.organism.demo import DEMO_PROMPTS, DEMO_RULES, DEMO_SITES

NAME = "builtin:organism"


def fit_demo_bank(out: Path, n_train: int, threads: int) -> None:
    import torch

    from gavel.models.loading import load_model
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import fit_bank

    torch.set_num_threads(threads)
    handle = load_model(NAME)
    fit_bank(handle, organism_dataset(handle.tokenizer, n_train, seed=2024), DEMO_SITES).save(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", "from gavel.cli import app; app()", "serve", "--model", NAME, "--port", str(port),
           "--threads", str(threads), "--log-level", "warning", "--max-tokens", "256", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up")


def load(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`requests` completions from `concurrency` client threads; wall time, tokens, per-request latency."""
    prompts = [conversation for _, conversation in DEMO_PROMPTS]
    latencies: list[float] = []
    tokens = [0]
    blocked = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            for i in counter:   # the shared iterator hands each request to one thread
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/chat/completions",
                              json={"model": NAME, "messages": prompts[i % len(prompts)], "temperature": 0,
                                    "max_tokens": max_tokens})
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                body = r.json()
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += body["usage"]["completion_tokens"]
                    blocked[0] += body["choices"][0]["finish_reason"] == "content_filter"

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"seconds": wall, "requests_per_s": requests / wall, "tokens_per_s": tokens[0] / wall,
            "tokens": tokens[0], "blocked": blocked[0], "p50_latency_s": statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--n-train", type=int, default=1500, help="organism conversations the bank is fitted on")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "bank"
        t0 = time.perf_counter()
        fit_demo_bank(bank, args.n_train, args.threads)
        print(f"bank fitted in {time.perf_counter() - t0:.1f} s", flush=True)
        servers = {"unguarded": start_server(["--no-rules"], args.threads),
                   "guarded": start_server(["--bank", str(bank), "--rules", str(DEMO_RULES)], args.threads)}
        try:
            for _, url in servers.values():   # warm up: first calls allocate and fill caches
                load(url, 8, 1, args.max_tokens)
            runs: dict[tuple[str, int], list[dict]] = {}
            for rep in range(args.repeats):
                for c in args.concurrency:
                    for mode, (_, url) in servers.items():
                        runs.setdefault((mode, c), []).append(load(url, args.requests, c, args.max_tokens))
                print(f"repetition {rep + 1}/{args.repeats} done", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    rows = []
    for c in args.concurrency:
        med = {mode: {k: statistics.median(r[k] for r in runs[(mode, c)])
                      for k in ("requests_per_s", "tokens_per_s", "p50_latency_s")} for mode in servers}
        extra = {mode: {"tokens": runs[(mode, c)][0]["tokens"], "blocked": runs[(mode, c)][0]["blocked"]}
                 for mode in servers}
        rows.append({"concurrency": c, **{m: {**med[m], **extra[m]} for m in servers},
                     "requests_per_s_ratio": med["guarded"]["requests_per_s"] / med["unguarded"]["requests_per_s"],
                     "tokens_per_s_ratio": med["guarded"]["tokens_per_s"] / med["unguarded"]["tokens_per_s"]})
    import torch

    report = {"model": NAME, "torch": torch.__version__, "threads": args.threads, "requests": args.requests,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "n_train": args.n_train,
              "rules": str(DEMO_RULES.name), "results": rows}
    print(f"{'concurrency':>11} {'mode':>9} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'tokens':>6} {'blocked':>7}")
    for row in rows:
        for mode in servers:
            r = row[mode]
            print(f"{row['concurrency']:>11} {mode:>9} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>8.1f} "
                  f"{r['p50_latency_s']:>7.3f} {r['tokens']:>6} {r['blocked']:>7}")
        print(f"{'':>11} {'ratio':>9} {row['requests_per_s_ratio']:>8.3f} {row['tokens_per_s_ratio']:>8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
