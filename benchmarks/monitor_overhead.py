"""What guarding costs: tokens/s of monitored vs raw `generate()` on the same prompts, as ratios.

CPU (default): the built-in organism (4 layers, d_model 128) and a random LlamaForCausalLM (d_model 512, 8 layers,
8 heads, d_mlp 1376, vocab 4096; the organism's tokenizer padded with added tokens to 4096 ids), saved to a
temp dir and loaded with `gavel.load_model`; 32 CEs on 4 sites, 20 rules, batches 1 and 8. `--models smollm2`: the
real SmolLM2-135M-Instruct (builtin:smollm2: 30 layers, d_model 576, vocab 49,152), same bank and rule shapes.
CUDA (--device cuda): random Llama-3.2-1B- and Llama-3-8B-shaped models (bf16, built on the GPU, not saved;
the organism's tokenizer for the prompts), 128 CEs on 4 sites, 50 rules, batches 1 and 32.
Bank: random linear CEs, 4 LinearHeads on 4 resid_post sites, calibrated on the prompts so a CE fires
(p > 0.9) on a few percent of tokens. Rules: generated GAVEL rules (`k of G`, `all of G`, bare groups and
CEs, and/or) with `log`/`alert` actions only, so nothing blocks and every run generates exactly --new-tokens
tokens (min_new_tokens = max_new_tokens).

Modes (--modes): eager (dynamic cache), and compiled: a static cache, with which transformers compiles the decode
step (torch.compile; on CPU only when asked, so the CPU run is a correctness smoke test of that path, with
--compile-backend, default inductor); guarded compiled is compared with unguarded compiled.

Per model, mode and batch size (the 8 demo prompts repeated to the batch; batch 1 is the first), repetitions
interleaved:
  raw      `hf_model.generate(ids, mask)` on pre-encoded prompt tensors
  hooks    the same with no-op hooks where the monitor hooks (model pre/post + its sites): the hook floor
  guarded  the same call inside `monitor.watch(batch)` with the monitor's stopping criterion
  plain    generation.generate_replies (encode + generate + decode): the end-to-end baseline (saved models only)
  monitor  `Monitor.generate` (encode + guarded generate + per-sequence results and events + decode)
ratio = guarded tok/s / raw tok/s of the medians; paired = median over repetitions of raw/guarded time
(robust to background load drifting between repetitions); e2e ratio = monitor tok/s / plain tok/s.
Targets: CPU, d_model 512, 8 layers, batch 8: ratio >= 0.90; CPU SmolLM2, batches 1 and 8: >= 0.97;
CUDA 8B: batch 32 >= 0.97, batch 1 >= 0.95, eager and compiled.
Threads: --threads (default 1) sets torch's intra-op threads: on a small shared CPU one thread keeps the
model and the monitor off the cores other jobs use, and measures the monitor against single-core compute.

Usage: python benchmarks/monitor_overhead.py [--device cpu|cuda] [--models ...] [--modes eager compiled]
       [--repeats 7] [--threads 1] [--new-tokens 64] [--batches 1 8] [--profile]
       [--out benchmarks/results/monitor_overhead.json]
--profile adds per-decode-step timings of the monitor's own methods (stopwatches wrapped around
Session / LinearHead / RuleProgram methods at class level) for every eager row, and a cProfile
listing of one guarded batch run of the d512 model.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from gavel import load_model
from gavel.models.generation import generate_replies, prompt_batch
from gavel.models.handle import ModelHandle
from gavel.organism.demo import DEMO_PROMPTS
from gavel.probes.bank import BankManifest, CEBank, CESpec, HeadSpec
from gavel.probes.heads import LinearHead
from gavel.rules import RuleSpec
from gavel.runtime.monitor import Monitor

PROMPTS = [conversation for _, conversation in DEMO_PROMPTS]
N_HEADS, THRESHOLD = 4, 0.9
SHAPES = {  # random Llamas of real models' shapes, for the CUDA mode ("tiny" smoke-tests that path on a CPU)
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 512},
}


def build_random_llama(directory: Path) -> Path:
    """A random Llama (d 512, 8 layers) with the organism's tokenizer grown to its 4096-token vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gavel.models.loading import resolve_spec

    tokenizer = AutoTokenizer.from_pretrained(resolve_spec("builtin:organism")[0])
    vocab = 4096
    tokenizer.add_tokens([f"<r{i}>" for i in range(vocab - len(tokenizer))])  # every id decodes
    assert len(tokenizer) == vocab
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=vocab, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_shaped_llama(shape: str, device: str, dtype: torch.dtype) -> ModelHandle:
    """A random Llama of a named shape (128256-token vocabulary), built on `device`, with the organism's tokenizer
    (its ids are a prefix of the vocabulary; generated ids past it are never decoded here)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gavel.models.loading import resolve_spec, wrap_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_spec("builtin:organism")[0])
    config = LlamaConfig(**SHAPES[shape], vocab_size=128256, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.config._name_or_path = f"random-llama-{shape}"
    return wrap_model(model, tokenizer)


def build_bank(handle: ModelHandle, sites: list[str], ces_per_head: int, seed: int = 0) -> CEBank:
    """Random linear CEs (ces_per_head per site), calibrated on the prompts' activations to ~N(0, 1) logits."""
    g = torch.Generator().manual_seed(seed)
    batch = prompt_batch(handle, PROMPTS)
    acts: dict[str, torch.Tensor] = {}
    keep = [(s, lambda a, s=s: acts.__setitem__(s, a.detach().float().cpu())) for s in sites]
    with torch.no_grad(), handle.hooks(keep):
        handle.forward(batch.input_ids, batch.attention_mask)
    valid = batch.attention_mask.bool().cpu()
    heads, ces = [], []
    for h, site in enumerate(sites):
        weight = torch.randn(handle.d_model, ces_per_head, generator=g)
        weight /= weight.norm(dim=0)
        head = LinearHead((site,), weight, torch.zeros(ces_per_head))
        raw = head.score(acts)[valid]                               # [tokens, ces_per_head]
        mean, std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        heads.append(head)
        ces += [CESpec(name=f"ce_{h}_{j}", head=h, extractor="random", threshold=THRESHOLD,
                       scale=float(1 / std[j]), shift=float(-mean[j] / std[j])) for j in range(ces_per_head)]
    manifest = BankManifest(ces=ces, heads=[HeadSpec(kind="linear", sites=[s]) for s in sites],
                            fingerprint=handle.fingerprint(), provenance={"source": "benchmarks/monitor_overhead.py"})
    return CEBank(manifest, heads)


def build_rules(ce_names: list[str], n: int, seed: int = 0) -> list[RuleSpec]:
    """`n` rules over the CEs: 2-3 groups of 3-6 CEs each, conditions mixing `k of`, `all of`, and/or."""
    rng = random.Random(seed)

    def selector(group: str, size: int) -> str:
        kind = rng.randrange(4)
        return (f"all of {group}" if kind == 0 else group if kind == 1
                else f"{rng.randint(1, size)} of {group}" if kind == 2 else rng.choice(ce_names))

    rules = []
    for i in range(n):
        groups = {f"g{i}_{k}": tuple(rng.sample(ce_names, rng.randint(3, 6))) for k in range(rng.randint(2, 3))}
        terms = [selector(name, len(members)) for name, members in groups.items()]
        if len(terms) == 3 and rng.random() < 0.6:                  # nested: (a or b) and c / (a and b) or c
            inner, outer = rng.sample(["and", "or"], 2)
            condition = f"({terms[0]} {inner} {terms[1]}) {outer} {terms[2]}"
        else:
            condition = f" {rng.choice(['and', 'or'])} ".join(terms)
        rules.append(RuleSpec(name=f"rule_{i}", groups=groups, condition=condition,
                              action=rng.choice(["log", "alert"]), severity=rng.choice(["low", "medium", "high"])))
    return rules


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _paired(base: list[float], other: list[float]) -> float:
    """Median over repetitions of base time / other time (runs of one repetition ran back to back)."""
    return statistics.median(b / o for b, o in zip(base, other))


def bench(handle: ModelHandle, monitor: Monitor, batch: int, new_tokens: int, repeats: int,
          compiled: dict | None = None, e2e: bool = True) -> dict:
    """Medians of the timings (interleaved, after one warm-up of each) for one batch size; `compiled` holds the
    generate() arguments that compile the decode step (None: eager)."""
    from transformers import StoppingCriteriaList

    prompts = (PROMPTS * -(-batch // len(PROMPTS)))[:batch]
    enc = prompt_batch(handle, prompts)
    width = enc.input_ids.shape[1]
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, **(compiled or {})}
    generate = handle.hf_model.generate

    def raw():
        return generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                        pad_token_id=handle.tokenizer.pad_token_id, **kwargs)

    def guarded():
        with monitor.watch_prompts(enc) as session:
            out = generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           pad_token_id=handle.tokenizer.pad_token_id,
                           stopping_criteria=StoppingCriteriaList([session.stopping_criterion()]), **kwargs)
        assert not session.blind, "the monitor's hooks did not run in a compiled step"
        return out

    def hooks_only():                                               # the floor for any hook-based monitor
        handles = [handle.model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True),
                   handle.model.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)]
        try:
            with handle.hooks([(site, lambda act: None) for site in monitor.sites]):
                return raw()
        finally:
            for h in handles:
                h.remove()

    def plain():
        return generate_replies(handle, prompts, batch_size=batch, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, **(compiled or {}))

    def monitored():
        return monitor.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                **(compiled or {}))

    runs = {"raw": raw, "hooks": hooks_only, "guarded": guarded, "plain": plain, "monitor": monitored}
    if not e2e:                     # a model whose vocabulary outgrows the tokenizer: no decoding
        del runs["plain"], runs["monitor"]
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    with torch.no_grad():
        for name, fn in runs.items():                               # warm-up
            outputs[name] = fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                seconds, outputs[name] = _timed(fn, handle.device)
                times[name].append(seconds)
    for name in ("raw", "hooks", "guarded"):
        assert outputs[name].shape[1] - width == new_tokens, f"{name} generated {outputs[name].shape[1] - width}"
    assert torch.equal(outputs["raw"], outputs["guarded"]), "guarded generation changed the tokens"
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: batch * new_tokens / s for k, s in median.items()}
    row = {"batch": batch, "new_tokens": new_tokens, "prompt_width": width,
           "seconds_median": {k: round(v, 4) for k, v in median.items()},
           "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "tokens_per_second": {k: round(v, 1) for k, v in rate.items()},
           "ratio": round(rate["guarded"] / rate["raw"], 3),
           "ratio_paired": round(_paired(times["raw"], times["guarded"]), 3),
           "ratio_best": round(min(times["raw"]) / min(times["guarded"]), 3),
           "hooks_only_ratio": round(rate["hooks"] / rate["raw"], 3),
           "guarded_ms_per_step_overhead": round(1e3 * (median["guarded"] - median["raw"]) / new_tokens, 3)}
    if e2e:
        results = outputs["monitor"]
        assert not any(r.blocked or r.failed for r in results)
        fired = torch.cat([(r.scores > monitor.thresholds.cpu()).float() for r in results])
        row.update({"e2e_ratio": round(rate["monitor"] / rate["plain"], 3),
                    "e2e_ratio_paired": round(_paired(times["plain"], times["monitor"]), 3),
                    "monitor_vs_raw_ratio": round(rate["monitor"] / rate["raw"], 3),
                    "ce_fire_rate": round(fired.mean().item(), 4), "events": sum(len(r.events) for r in results)})
    return row


@contextmanager
def _stopwatches(acc: dict[tuple[str, str], float], forwards: list[int]):
    """Time the monitor's per-forward code by wrapping its methods at class level (restored after).

    acc[(phase, part)] sums seconds; phase is "prefill" for a session's first forward, else "decode"."""
    from gavel.rules.compile.program import RuleProgram
    from gavel.runtime import monitor as mod

    phase = ["prefill"]

    def wrap(part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[(phase[0], part)] = acc.get((phase[0], part), 0.0) + time.perf_counter() - start
        return timed

    def before(self, *args, **kwargs):
        phase[0] = "prefill" if self.forwards == 0 else "decode"
        forwards[0 if self.forwards == 0 else 1] += 1
        return timed_before(self, *args, **kwargs)

    patched = [(mod.Session, "before_forward", before),
               (mod.Session, "after_forward", None),
               (mod.Session, "site_hook", lambda self, site: wrap("site hooks (stash)",
                                                                 original["site_hook"](self, site))),
               (LinearHead, "score", None),
               (RuleProgram, "advance", None), (RuleProgram, "_chunk", None)]
    original = {name: getattr(cls, name) for cls, name, _ in patched}
    timed_before = wrap("before_forward", original["before_forward"])
    try:
        for cls, name, fn in patched:
            setattr(cls, name, fn or wrap(name, original[name]))
        yield
    finally:
        for cls, name, _ in patched:
            setattr(cls, name, original[name])


def breakdown(handle: ModelHandle, monitor: Monitor, batch: int, new_tokens: int, runs: int = 3) -> dict:
    """Milliseconds per forward spent in each part of the monitor, prefill and decode steps apart."""
    from transformers import StoppingCriteriaList

    enc = prompt_batch(handle, PROMPTS[:batch])
    acc: dict[tuple[str, str], float] = {}
    forwards = [0, 0]
    with torch.no_grad(), _stopwatches(acc, forwards):
        for _ in range(runs):
            with monitor.watch(batch) as session:
                handle.hf_model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                         pad_token_id=handle.tokenizer.pad_token_id, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False,
                                         stopping_criteria=StoppingCriteriaList([session.stopping_criterion()]))
    out = {}
    for phase, n in (("prefill", forwards[0]), ("decode", forwards[1])):
        ms = {part: 1e3 * s / n for (p, part), s in acc.items() if p == phase}
        out[phase] = {k: round(v, 4) for k, v in {
            "before_forward (eos isin, allocations)": ms["before_forward"],
            "site hooks (stash, 4 sites)": ms["site hooks (stash)"],
            "after_forward": ms["after_forward"],
            "  LinearHead.score x4 (matmul)": ms["score"],
            "  RuleProgram.advance": ms["advance"],
            "    _chunk (one chunk of tokens)": ms["_chunk"],
            "    chunking, state copies": ms["advance"] - ms["_chunk"],
            "  rest (calibration, cur[...]=, isfinite, isin, compare, flags, appends)": (
                ms["after_forward"] - ms["score"] - ms["advance"]),
            "total": ms["before_forward"] + ms["site hooks (stash)"] + ms["after_forward"],
        }.items()}
    return out


def profile_guarded(handle: ModelHandle, monitor: Monitor, batch: int, new_tokens: int, top: int = 25) -> None:
    """cProfile one guarded generate (inside watch); print gavel's functions by cumulative time."""
    import cProfile
    import pstats

    from transformers import StoppingCriteriaList

    enc = prompt_batch(handle, PROMPTS[:batch])
    profiler = cProfile.Profile()
    with torch.no_grad(), monitor.watch(batch) as session:
        profiler.enable()
        handle.hf_model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 pad_token_id=handle.tokenizer.pad_token_id, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([session.stopping_criterion()]))
        profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"gavel/|generate|_call_impl", top)


def compile_kwargs(device: str, backend: str) -> dict:
    """generate() arguments with which transformers compiles the decode step (it does so by itself on CUDA)."""
    from transformers import CompileConfig

    if device == "cuda" and backend == "inductor":
        return {"cache_implementation": "static"}
    config = CompileConfig(backend=backend, mode="reduce-overhead" if device == "cuda" else None)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def model_cases(args, tmp: Path) -> list[tuple[str, Callable[[], ModelHandle], list[int], int, int, bool]]:
    """(label, handle factory, resid_post layers, CEs per head, rules, e2e) per model asked for."""
    four = lambda n: [round(i * (n - 1) / 3) for i in range(4)]   # noqa: E731 - 4 layers spread over the depth
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cases = {
        "organism": ("organism d128 L4", lambda: load_model("builtin:organism", device=args.device), [0, 1, 2, 3],
                     8, 20, True),
        "d512": ("llama d512 L8 (random)", lambda: load_model(str(build_random_llama(tmp)), device=args.device),
                 [1, 3, 5, 7], 8, 20, True),
        "smollm2": ("SmolLM2-135M-Instruct d576 L30 (real, from GGUF)",
                    lambda: load_model("builtin:smollm2", device=args.device), four(30), 8, 20, True),
    }
    for shape, cfg in SHAPES.items():
        cases[shape] = (f"llama-{shape} shape (random)",
                        lambda shape=shape: build_shaped_llama(shape, args.device, dtype),
                        four(cfg["num_hidden_layers"]), 32, 50, False)
    return [cases[name] for name in args.models]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=["organism", "d512", "smollm2", *SHAPES],
                        help="default: organism d512 on cpu, 1b 8b on cuda")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        help="default: eager on cpu, eager compiled on cuda")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable next to other jobs on a small CPU)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 8 on cpu, 1 32 on cuda")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/monitor_overhead.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.models = args.models or (["1b", "8b"] if gpu else ["organism", "d512"])
    args.modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.batches = args.batches or ([1, 32] if gpu else [1, 8])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, report = [], {"device": args.device, "threads": args.threads, "torch": torch.__version__,
                        "repeats": args.repeats, "modes": args.modes, "compile_backend": args.compile_backend,
                        "threshold": THRESHOLD, "models": []}
    if gpu:
        report["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for label, make, layers, ces_per_head, n_rules, e2e in model_cases(args, Path(tmp)):
            handle = make()
            sites = [f"blocks.{i}.hook_resid_post" for i in layers]
            bank = build_bank(handle, sites, ces_per_head)
            monitor = Monitor(handle, bank, build_rules(bank.names, n_rules))
            assert len(monitor.heads) == N_HEADS, "the rules should read every head"
            entry = {"model": label, "d_model": handle.d_model, "n_layers": handle.n_layers, "sites": sites,
                     "n_ces": len(bank.names), "n_rules": n_rules,
                     "ces_read_by_rules": len(monitor.program.ce_indices), "results": []}
            for mode in args.modes:
                compiled = compile_kwargs(args.device, args.compile_backend) if mode == "compiled" else None
                for batch in args.batches:
                    r = {"mode": mode, **bench(handle, monitor, batch, args.new_tokens, args.repeats, compiled, e2e)}
                    if args.profile and mode == "eager":
                        r["monitor_ms_per_forward"] = breakdown(handle, monitor, batch, args.new_tokens)
                    entry["results"].append(r)
                    rows.append((label, r))
            report["models"].append(entry)
            if args.profile and handle.d_model == 512:
                profile_guarded(handle, monitor, max(args.batches), args.new_tokens)
            del handle, monitor, bank
            if gpu:
                torch.cuda.empty_cache()

    print(f"device {report.get('gpu', args.device)}, torch threads {args.threads} (torch {torch.__version__}), "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    header = (f"{'model':26s} {'mode':8s} {'batch':>5s} {'raw tok/s':>10s} {'guarded':>8s} {'ratio':>6s} "
              f"{'paired':>6s} {'hooks':>6s} {'plain e2e':>10s} {'Monitor.gen':>11s} {'e2e ratio':>9s} "
              f"{'+ms/step':>8s} {'fire%':>6s} {'events':>6s}")
    print(header)
    print("-" * len(header))
    for label, r in rows:
        t = r["tokens_per_second"]
        e2e = (f"{t['plain']:10.1f} {t['monitor']:11.1f} {r['e2e_ratio']:9.3f}" if "e2e_ratio" in r
               else f"{'-':>10s} {'-':>11s} {'-':>9s}")
        fires = f"{100 * r['ce_fire_rate']:6.2f} {r['events']:6d}" if "events" in r else f"{'-':>6s} {'-':>6s}"
        print(f"{label:26s} {r['mode']:8s} {r['batch']:5d} {t['raw']:10.1f} {t['guarded']:8.1f} {r['ratio']:6.3f} "
              f"{r['ratio_paired']:6.3f} {r['hooks_only_ratio']:6.3f} {e2e} {r['guarded_ms_per_step_overhead']:8.2f} "
              f"{fires}")
    if args.profile:
        print("\nmonitor code per decode step, ms (stopwatches around the monitor's methods):")
        print(f"{'':72s}" + "".join(f"{label.split()[0] + ' b' + str(r['batch']):>14s}" for label, r in rows))
        for part in rows[0][1]["monitor_ms_per_forward"]["decode"]:
            print(f"{part:72s}" + "".join(f"{r['monitor_ms_per_forward']['decode'][part]:14.3f}" for _, r in rows))
        print(f"{'raw generate() time per new token, for scale':72s}"
              + "".join(f"{1e3 * r['seconds_median']['raw'] / r['new_tokens']:14.3f}" for _, r in rows))
    targets = [("llama d512", "eager", 8, 0.90), *(("llama-8b", mode, b, 0.97 if b == 32 else 0.95)
                                                    for mode in ("eager", "compiled") for b in (1, 32))]
    report["targets"] = []
    for prefix, mode, batch, goal in targets:
        ratio = next((r["ratio"] for label, r in rows
                      if label.startswith(prefix) and r["mode"] == mode and r["batch"] == batch), None)
        if ratio is not None:
            report["targets"].append({"what": f"{prefix} {mode} batch {batch} guarded/raw ratio >= {goal}",
                                      "ratio": ratio, "met": ratio >= goal})
            print(f"target ({prefix} {mode}, batch {batch}, ratio >= {goal}): {ratio:.3f} -> "
                  f"{'met' if ratio >= goal else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
