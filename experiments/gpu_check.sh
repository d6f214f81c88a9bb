#!/usr/bin/env bash
# GPU check for the Pallas flash kernel: devices, compiled kernel tests, benchmarks, tables.
# Run from the repository root on the GPU machine:  bash experiments/gpu_check.sh   (results under $OUT)
# Budgets (env): TEST_BUDGET_S for the compiled tests, BENCH_BUDGET_S for the benchmark; TEST_FILTER picks the
# compiled tests (default: all of FlashCompiledTest's CI subset; TEST_SHARDS parallel pytest processes, concurrent
# with the compare step when it runs) and TEST_MARKS their marks ("" for slow ones too),
# SEQ_LENS / IMPLS the benchmark grid (BENCH_BUDGET_S=0 skips it); COMPARE_BUDGET_S > 0 also runs
# `experiments.compare --preset=$COMPARE_PRESET` on the GPU with that budget (results under $OUT/compare);
# MASK_BUDGET_S > 0 times masks given as dense boolean arrays against the same masks given structurally
# (is_causal vs a [1,1,T,S] array; key_value_seq_lengths vs a [B,1,1,S] array) for MASK_IMPLS at MASK_SEQ_LENS
# (JSON under $OUT/bench_masks_*.json, with the dense / structured ratios in "mask_comparison"; MASK_EXTRA adds
# bench_kernels flags, e.g. "--batch=1 --heads=2 --head_dim=16" for a dry run on CPU);
# FLEX_BUDGET_S > 0 runs the flex_attention GPU kernel's tests compiled and times causal flex against our built-in
# causal kernel (T=16K) and a causal sliding window of 1024 against causal flex (T=32K);
# ZOOLOGY_BUDGET_S > 0 runs the Zoology MQAR sweep (compare --preset=zoology at T=ZOOLOGY_SEQ_LENS, default
# 64,128,256,512; resumable: ZOOLOGY_RESUME=<results.json of an earlier run> keeps its finished runs; results under
# $OUT/zoology), and times the linear recurrences (chunked RetNet / GLA / DeltaNet against cuDNN, bf16 T=16K);
# MOSAIC_BUDGET_S > 0 runs the Hopper Mosaic-GPU kernel's tests compiled and times it (bench_mosaic.json);
# DECODE_BUDGET_S > 0 runs the decode kernels' tests compiled and experiments/decode_bench.py --preset=gpu (decode
# attention against context to 1M, the bandwidth at 64K next to cuDNN / XLA / jax's decode op; under $OUT/decode);
# TUNE_BUDGET_S > 0 runs experiments/tune_blocks.py last (TUNE_HEAD_DIMS x TUNE_DTYPES; rows under $OUT/tune.json).
set -uo pipefail
OUT=${OUT:-/tmp}
TEST_BUDGET_S=${TEST_BUDGET_S:-200}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-240}
TEST_FILTER=${TEST_FILTER:-Compiled or FlashApi}
TEST_MARKS=${TEST_MARKS-not slow}
TEST_SHARDS=${TEST_SHARDS:-4}
COMPARE_BUDGET_S=${COMPARE_BUDGET_S:-0}
COMPARE_PRESET=${COMPARE_PRESET:-full}
SEQ_LENS=${SEQ_LENS:-16384,4096}
MASK_BUDGET_S=${MASK_BUDGET_S:-90}
MASK_IMPLS=${MASK_IMPLS:-pallas,cudnn}
MASK_SEQ_LENS=${MASK_SEQ_LENS:-16384}
MASK_EXTRA=${MASK_EXTRA:-}
FLEX_BUDGET_S=${FLEX_BUDGET_S:-180}
TUNE_BUDGET_S=${TUNE_BUDGET_S:-0}
TUNE_HEAD_DIMS=${TUNE_HEAD_DIMS:-128,64,256,32}
TUNE_DTYPES=${TUNE_DTYPES:-bfloat16,float32}
IMPLS=${IMPLS:-pallas,pallas_longest_first,cudnn,jax_pallas_tuned,jax_pallas,xla}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"

echo "== 1. devices"
nvidia-smi -L || true
python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

echo "== 2. kernel tests compiled for the GPU (the non-interpret mode of the CPU suite), $TEST_SHARDS processes"
# Triton compilation is CPU-bound: split the collected tests over TEST_SHARDS pytest processes.
python -m pytest -q --collect-only -p no:cacheprovider tests/test_flash_gpu.py -k "$TEST_FILTER" \
  -m "$TEST_MARKS" 2>/dev/null | grep "::" > "$OUT/gpu_test_ids.txt"
echo "$(wc -l < "$OUT/gpu_test_ids.txt") tests collected"
for i in $(seq 0 $((TEST_SHARDS - 1))); do
  awk -v n="$TEST_SHARDS" -v i="$i" 'NR % n == i' "$OUT/gpu_test_ids.txt" > "$OUT/gpu_test_ids_$i.txt"
  timeout "$TEST_BUDGET_S" python -m pytest -q -p no:cacheprovider -rs $(cat "$OUT/gpu_test_ids_$i.txt") \
    > "$OUT/gpu_tests_$i.txt" 2>&1 &
done
if [ "$COMPARE_BUDGET_S" -le 0 ]; then wait; fi

if [ "$COMPARE_BUDGET_S" -gt 0 ]; then
  echo "== 2b. experiments.compare --preset=$COMPARE_PRESET (budget ${COMPARE_BUDGET_S}s)"
  timeout $((COMPARE_BUDGET_S + 120)) python -m experiments.compare --preset="$COMPARE_PRESET" \
    --workdir="$OUT/compare" --budget_s="$COMPARE_BUDGET_S" > "$OUT/compare.log" 2>&1
  echo "compare exit: $?"
  grep -v "^W\|^I" "$OUT/compare.log" | tail -40
fi
wait
echo "== 2c. compiled test results"
for f in "$OUT"/gpu_tests_*.txt; do echo "-- $f"; grep -E "passed|failed|error|FAILED|ERROR|Timeout" "$f" | tail -8; done

if [ "$BENCH_BUDGET_S" -gt 0 ]; then
  echo "== 3. benchmark (bf16, B=2 N=16 H=128; ours vs cuDNN vs jax's Pallas kernel vs XLA, same run)"
  timeout $((BENCH_BUDGET_S + 60)) python -m experiments.bench_kernels --budget_s="$BENCH_BUDGET_S" \
    --implementations="$IMPLS" --seq_lens="$SEQ_LENS" --repeats=5 --out="$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
  echo "bench exit: $?"
  grep -v "^W\|^I" "$OUT/bench_gpu.log" | tail -45
fi

if [ "$MASK_BUDGET_S" -gt 0 ]; then
  echo "== 3b. dense mask arrays vs structured masks ($MASK_IMPLS, T=$MASK_SEQ_LENS, budget ${MASK_BUDGET_S}s)"
  # Two runs: causal (is_causal vs a [1,1,T,S] array) and padding (key_value_seq_lengths vs a [B,1,1,S] array).
  for setting in "causal:--causal=true --padding=0" "padding:--causal=false --padding=0.25"; do
    name=${setting%%:*}
    timeout $((MASK_BUDGET_S / 2 + 60)) python -m experiments.bench_kernels --budget_s=$((MASK_BUDGET_S / 2)) \
      --implementations="$MASK_IMPLS" --seq_lens="$MASK_SEQ_LENS" --mask_modes=structured,dense ${setting#*:} \
      $MASK_EXTRA --repeats=5 --out="$OUT/bench_masks_$name.json" > "$OUT/bench_masks_$name.log" 2>&1
    echo "bench ($name masks) exit: $?"
    grep -A30 "dense / structured" "$OUT/bench_masks_$name.log" | head -12
  done
fi

if [ "$FLEX_BUDGET_S" -gt 0 ]; then
  echo "== 3c. flex_attention on the GPU: compiled kernel tests, then causal flex vs our built-in causal kernel"
  echo "   (bf16 B=2 N=16 H=128 T=16K, fwd and fwd+bwd) and a causal sliding window of 1024 vs causal at T=32K"
  timeout $((FLEX_BUDGET_S / 3)) python -m pytest -q -p no:cacheprovider -rs tests/test_flex_gpu.py -m "not slow" \
    > "$OUT/flex_tests.txt" 2>&1
  echo "flex tests exit: $?"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/flex_tests.txt" | tail -8
  timeout $((FLEX_BUDGET_S / 3 + 60)) python -m experiments.bench_kernels --budget_s=$((FLEX_BUDGET_S / 3)) \
    --implementations=pallas,flex --causal=true --seq_lens=16384 --repeats=5 \
    --out="$OUT/bench_flex_causal.json" > "$OUT/bench_flex_causal.log" 2>&1
  echo "flex causal bench exit: $?"; grep -v "^W\|^I" "$OUT/bench_flex_causal.log" | tail -12
  timeout $((FLEX_BUDGET_S / 3 + 60)) python -m experiments.bench_kernels --budget_s=$((FLEX_BUDGET_S / 3)) \
    --implementations=flex,flex:window=1024 --causal=true --seq_lens=32768 --repeats=5 \
    --out="$OUT/bench_flex_window.json" > "$OUT/bench_flex_window.log" 2>&1
  echo "flex window bench exit: $?"; grep -v "^W\|^I" "$OUT/bench_flex_window.log" | tail -12
fi

ZOOLOGY_BUDGET_S=${ZOOLOGY_BUDGET_S:-0}
ZOOLOGY_SEQ_LENS=${ZOOLOGY_SEQ_LENS:-64,128,256,512}
if [ "$ZOOLOGY_BUDGET_S" -gt 0 ]; then
  echo "== 3d. linear recurrences vs cuDNN (bf16 B=2 N=16 H=128 T=16K, causal fwd+bwd), then the Zoology sweep"
  timeout 120 python -m experiments.bench_kernels --budget_s=60 --causal=true --seq_lens=16384 --modes=fwd_bwd \
    --implementations=cudnn,retnet,gla,deltanet,linear_elu --out="$OUT/bench_linear_rnn.json" \
    > "$OUT/bench_linear_rnn.log" 2>&1
  echo "linear recurrences bench exit: $?"; grep -v "^W\|^I" "$OUT/bench_linear_rnn.log" | tail -8
  mkdir -p "$OUT/zoology"
  if [ -n "${ZOOLOGY_RESUME:-}" ]; then cp "$ZOOLOGY_RESUME" "$OUT/zoology/results.json"; fi
  timeout $((ZOOLOGY_BUDGET_S + 180)) python -m experiments.compare --preset=zoology --seq_lens="$ZOOLOGY_SEQ_LENS" \
    --workdir="$OUT/zoology" --budget_s="$ZOOLOGY_BUDGET_S" > "$OUT/zoology.log" 2>&1
  echo "zoology exit: $?"; grep -c '"variant"' "$OUT/zoology/results.json" || true
  sed -n '/mean/,/^$/p' "$OUT/zoology/results.md" | head -40
fi

MOSAIC_BUDGET_S=${MOSAIC_BUDGET_S:-120}
if [ "$MOSAIC_BUDGET_S" -gt 0 ]; then
  echo "== 3f. Hopper Mosaic-GPU kernel: its tests compiled, then fwd and fwd+bwd at T=4K/16K next to pallas, cuDNN"
  timeout $((MOSAIC_BUDGET_S / 2)) python -m pytest -q -p no:cacheprovider -rs tests/test_flash_mosaic_gpu.py \
    tests/test_flash_mosaic_gpu_bwd.py > "$OUT/mosaic_tests.log" 2>&1
  echo "mosaic tests exit: $?"; tail -5 "$OUT/mosaic_tests.log"
  timeout $((MOSAIC_BUDGET_S / 2 + 60)) python -m experiments.bench_kernels --budget_s=$((MOSAIC_BUDGET_S / 2)) \
    --implementations=mosaic,pallas,cudnn --seq_lens=16384,4096 --out="$OUT/bench_mosaic.json" \
    > "$OUT/bench_mosaic.log" 2>&1
  echo "mosaic bench exit: $?"; grep -v "^W\|^I" "$OUT/bench_mosaic.log" | tail -14
fi

DECODE_BUDGET_S=${DECODE_BUDGET_S:-120}
if [ "$DECODE_BUDGET_S" -gt 0 ]; then
  echo "== 3e. decode attention: compiled decode-kernel tests, then bandwidth at 64K (bf16 B=8 N=32 K=8 H=128)"
  timeout $((DECODE_BUDGET_S / 3)) python -m pytest -q -p no:cacheprovider -rs tests/test_decode.py \
    tests/test_decode_gpu.py -k "pallas and not tpu or gpu" > "$OUT/decode_tests.log" 2>&1
  echo "decode tests exit: $?"; tail -3 "$OUT/decode_tests.log"
  timeout $((DECODE_BUDGET_S * 2 / 3 + 60)) python -m experiments.decode_bench --preset=gpu \
    --budget_s=$((DECODE_BUDGET_S * 2 / 3)) --workdir="$OUT/decode" > "$OUT/decode_bench.log" 2>&1
  echo "decode bench exit: $?"; grep -v "^W\|^I" "$OUT/decode_bench.log" | grep "L=" | head -40
fi

if [ "$TUNE_BUDGET_S" -gt 0 ]; then
  echo "== 4. block-size tuning (experiments/tune_blocks.py: H=$TUNE_HEAD_DIMS, $TUNE_DTYPES; rows for the table)"
  timeout $((TUNE_BUDGET_S + 90)) python -m experiments.tune_blocks --budget_s="$TUNE_BUDGET_S" \
    --head_dims="$TUNE_HEAD_DIMS" --dtypes="$TUNE_DTYPES" --out="$OUT/tune.json" > "$OUT/tune.log" 2>&1
  echo "tune exit: $?"
  grep -v "^W\|^I" "$OUT/tune.log" | grep -v "^H=" | head -12
fi
