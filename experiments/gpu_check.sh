#!/usr/bin/env bash
# GPU check for the Pallas flash kernel (../shared/GPU.md): devices, compiled kernel tests, benchmark, table.
# Run from the repository root on the GPU machine:  bash experiments/gpu_check.sh   (results under $OUT)
# Internal budget: tests <= TEST_BUDGET_S, benchmark <= BENCH_BUDGET_S (defaults fit a 10-minute call).
set -uo pipefail
OUT=${OUT:-/tmp}
TEST_BUDGET_S=${TEST_BUDGET_S:-200}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-300}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"

echo "== 1. devices"
nvidia-smi -L || true
python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

echo "== 2. kernel tests compiled for the GPU (the non-interpret mode of the CPU suite)"
timeout "$TEST_BUDGET_S" python -m pytest -q -x -p no:cacheprovider tests/test_flash_gpu.py \
  -k "Compiled or FlashApi" -m "not slow" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
echo "tests exit: ${PIPESTATUS[0]}"

echo "== 3. benchmark (bf16, B=2 N=16 H=128; ours vs cuDNN vs XLA vs jax's Pallas kernel, same run)"
timeout $((BENCH_BUDGET_S + 60)) python -m experiments.bench_kernels --budget_s="$BENCH_BUDGET_S" \
  --seq_lens=4096,16384 --out="$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
echo "bench exit: $?"
tail -5 "$OUT/bench_gpu.log"

echo "== 4. table"
python -m experiments.bench_kernels --summarize="$OUT/bench_gpu.json" 2>/dev/null || tail -40 "$OUT/bench_gpu.log"
