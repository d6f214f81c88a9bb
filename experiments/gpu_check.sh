#!/usr/bin/env bash
# GPU check for the Pallas flash kernel (../shared/GPU.md): devices, compiled kernel tests, benchmark, table.
# Run from the repository root on the GPU machine:  bash experiments/gpu_check.sh   (results under $OUT)
# Budgets (env): TEST_BUDGET_S for the compiled tests, BENCH_BUDGET_S for the benchmark; TEST_FILTER picks the
# compiled tests (default: all of FlashCompiledTest's CI subset), SEQ_LENS / IMPLS the benchmark grid.
set -uo pipefail
OUT=${OUT:-/tmp}
TEST_BUDGET_S=${TEST_BUDGET_S:-200}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-300}
TEST_FILTER=${TEST_FILTER:-Compiled or FlashApi}
SEQ_LENS=${SEQ_LENS:-16384,4096}
IMPLS=${IMPLS:-pallas,cudnn,jax_pallas_tuned,jax_pallas,xla}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"

echo "== 1. devices"
nvidia-smi -L || true
python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

echo "== 2. kernel tests compiled for the GPU (the non-interpret mode of the CPU suite)"
timeout "$TEST_BUDGET_S" python -m pytest -q --maxfail=3 -p no:cacheprovider tests/test_flash_gpu.py \
  -k "$TEST_FILTER" -m "not slow" > "$OUT/gpu_tests.txt" 2>&1
echo "tests exit: $?"
tail -30 "$OUT/gpu_tests.txt"

echo "== 3. benchmark (bf16, B=2 N=16 H=128; ours vs cuDNN vs jax's Pallas kernel vs XLA, same run)"
timeout $((BENCH_BUDGET_S + 60)) python -m experiments.bench_kernels --budget_s="$BENCH_BUDGET_S" \
  --implementations="$IMPLS" --seq_lens="$SEQ_LENS" --repeats=5 --out="$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
echo "bench exit: $?"
grep -v "^W\|^I" "$OUT/bench_gpu.log" | tail -45
