#!/usr/bin/env bash
# Everything a session lent a GPU runs, in one call (device time is short):
#   1. the Triton kernels compiled for the GPU against the references, and the merge job with
#      --device cuda against the CPU job (tests -k "triton or cuda"),
#   2. the GPU benchmark tables: merge (fused vs reference vs FusionBench-style vs copy bandwidth),
#      the merge ops over the models (share of the copy bandwidth) and DARE, streaming statistics,
#      permutation gathers,
#   3. `nlmerge demo --quick --device cuda` (the whole pipeline on the GPU backends), when the
#      machine has the demo's scikit-learn, matplotlib and tqdm.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_check.sh
# Writes tests.txt, bench*.txt under $OUT (the device tool brings them back) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install: the GPU path needs no C++ build
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
# budgets: 600 s per device command in all (tests 200, benchmarks 300, demo 90)
timeout "${TEST_TIMEOUT:-200}" python -m pytest -q -x -p no:warnings --continue-on-collection-errors tests -k "triton or cuda" 2>&1 | tee "$out/tests.txt" | tail -25
timeout "${BENCH_TIMEOUT:-80}" python benchmarks/bench_merge.py --device cuda --sizes 24 26 2>&1 | tee "$out/bench.txt"
# the ops that read the models (issue 13: share of the copy bandwidth), then DARE over the models
timeout 100 python benchmarks/bench_merge.py --device cuda --models --sizes 24 26 2>&1 | tee "$out/bench_models.txt"
timeout 40 python benchmarks/bench_merge.py --device cuda --dare --sizes 24 2>&1 | tee "$out/bench_dare.txt"
timeout 40 python benchmarks/bench_stats.py --device cuda 2>&1 | tee "$out/bench_stats.txt"
timeout 40 python benchmarks/bench_permute.py --device cuda 2>&1 | tee "$out/bench_permute.txt"
if python -c "import sklearn, matplotlib, tqdm" 2>/dev/null; then
    timeout 90 python -m nlmerge.cli demo --quick --device cuda --no-progress --out "$out/demo" 2>&1 | tee "$out/demo.txt" | tail -14
else
    echo "demo skipped: scikit-learn, matplotlib or tqdm missing on this machine" | tee "$out/demo.txt"
fi
