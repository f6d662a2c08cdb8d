#!/usr/bin/env bash
# The one device script: build, check correctness on the GPU first, then time. Run it in ONE call of
# the lent GPU, from the repository root, e.g. (device tool):
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# What it writes under $OUT (default benchmarks/results/<date>-<gpu>) is what gets committed under
# benchmarks/results/: the GPU and versions, the build log's summary, the CUDA tests' log, the
# pytest-benchmark JSON and the rendered table.
set -uo pipefail
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[gpu_check] $(( $(date +%s) - t0 ))s: $*"; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '_')
OUT=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-${gpu}}
mkdir -p "$OUT"
{
  echo "date: $(date -Iseconds)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n1
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

stamp "build"
if ! pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"; stamp "build failed"; exit 1
fi
python -c "import kcd_fast._ext as e; assert e.has_cuda_kernels(), 'no CUDA kernels in the build'" || exit 1

stamp "correctness on the GPU (against the float64 reference, fresh random inputs)"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_update_values.py tests/test_rank.py \
  tests/test_condense.py tests/test_vaks_mix.py tests/test_build.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then stamp "GPU correctness FAILED: not timing"; exit 1; fi

stamp "timing"
python -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 60
python benchmarks/report.py --strip-data "$OUT/bench.json" | tee "$OUT/report.md"

stamp "whole runs: KD vs KCD vs cached KCD on device-resident data"
python benchmarks/wall_ratio.py --out "$OUT/wall_ratio.json" 2>&1 | tail -n 30
stamp "done: results in $OUT"
