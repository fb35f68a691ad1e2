#!/usr/bin/env bash
# The GPU checks of the runtime, as one script for a lent H200 (see the device tool's README): the compiled-decoding
# tests on CUDA, then monitor_overhead's CUDA mode (random Llama-1B/8B shapes, bf16, 128 CEs on 4 sites, 50 rules,
# batch 1 and 32, eager and compiled with a static cache). About 6-8 minutes; results land in $OUT.
#
# The device image lacks pydantic and lark. Here, once per session, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 lark==1.3.1
# (versions: what `pip list` shows in the CPU environment), then run with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/compiled_cuda.log"
# the monitor inside transformers' own CUDA compile (inductor, CUDA graphs): every hook on every step, same events
import torch, warnings
from gavel import load_model
from gavel.runtime.monitor import Monitor
from gavel.models.generation import prompt_batch
import sys; sys.path[:0] = ["benchmarks"]
from monitor_overhead import PROMPTS, build_bank, build_rules
handle = load_model("builtin:organism", device="cuda")
bank = build_bank(handle, [f"blocks.{i}.hook_resid_post" for i in range(4)], 8)
monitor = Monitor(handle, bank, build_rules(bank.names, 20))
eager = monitor.generate(PROMPTS, max_new_tokens=32, min_new_tokens=32, do_sample=False)
with warnings.catch_warnings():
    warnings.simplefilter("error")   # a retrace warning would mean the hooks were missing at first
    for attempt in range(2):
        compiled = monitor.generate(PROMPTS, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    cache_implementation="static")
        same = all(a.tokens == b.tokens and a.fired == b.fired and not a.failed for a, b in zip(compiled, eager))
        diff = max(float((a.scores - b.scores).abs().max()) for a, b in zip(compiled, eager))
        print(f"compiled run {attempt}: tokens and events equal to eager: {same}; max score difference {diff:.2e}")
PY
timeout 480 python3 benchmarks/monitor_overhead.py --device cuda --repeats 3 --out "$OUT/monitor_overhead_cuda.json" \
  2>&1 | grep -v "^W1\|^  " | tee "$OUT/monitor_overhead_cuda.log"
