"""experiments/tune_blocks.py (block-size tuning) and bench_kernels.bench_one, on CPU (interpret mode)."""

import dataclasses
import math

import pytest

from attention_jax.kernels import flash_gpu
from experiments import bench_kernels, tune_blocks

FWD_FIELDS = {"block_q", "block_k", "num_warps_fwd", "num_stages_fwd"}
BWD_FIELDS = {"block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq", "num_warps_bwd", "num_stages_bwd"}


def _diff(a, b):
  return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("stage,fields", [("fwd", FWD_FIELDS), ("bwd", BWD_FIELDS)])
@pytest.mark.parametrize("head_dim,itemsize", [(64, 2), (128, 2), (256, 2), (128, 4)])
def test_candidates_start_at_the_table_row_and_change_only_their_stage(stage, fields, head_dim, itemsize):
  base = flash_gpu.BlockSizes.get_default(head_dim, "float32" if itemsize == 4 else "bfloat16")
  cands = tune_blocks.candidates(stage, base, head_dim, itemsize, limit=12)
  assert cands[0] == base and 2 <= len(cands) <= 12
  assert len(set(cands)) == len(cands)
  dist = [tune_blocks._distance(c, base) for c in cands]
  assert dist == sorted(dist)                            # nearest first
  for c in cands[1:]:
    assert _diff(c, base) <= fields
    assert tune_blocks.fits(c, head_dim, itemsize)


def test_fits_accepts_the_measured_default_and_rejects_oversized_tiles():
  # The bf16 H=128 row is the one measured on an H200; the estimate must not rule it out.
  assert tune_blocks.fits(flash_gpu.BlockSizes.get_default(128, "bfloat16"), 128, 2)
  for (h, wide), b in flash_gpu._DEFAULT_BLOCKS.items():
    assert tune_blocks.fits(b, h, 4 if wide else 2), (h, wide)
  big = flash_gpu.BlockSizes(128, 128, 128, 128, 128, 128, 4, 3, 4, 3)
  assert not tune_blocks.fits(big, 256, 2)
  with pytest.raises(ValueError, match="stage"):
    tune_blocks.candidates("both", big, 128, 2, 4)


def _fake_bench(speed):
  """A bench_one stand-in: TFLOP/s from ``speed(blocks, mode)``; None means the candidate fails."""
  calls = []

  def bench(impl, T, causal, mode, *, B, N, H, dtype, repeats, blocks, label):
    calls.append((mode, blocks))
    tf = speed(blocks, mode)
    rec = dict(implementation=label, mode=mode, blocks=list(dataclasses.astuple(blocks)))
    rec.update(dict(status="ok", tflops=tf, time_ms=1.0) if tf is not None else dict(status="XlaRuntimeError: x"))
    return rec
  return bench, calls


def test_tune_group_keeps_the_forward_winner_for_the_backward_stage():
  def speed(b, mode):
    if b.block_k == 32 and b.num_stages_fwd == 1:
      return None                                         # a compile failure is recorded and skipped
    if mode == "fwd":
      return 100.0 + b.block_q + b.num_stages_fwd         # prefers the largest block_q, most stages
    return 50.0 + b.num_warps_bwd - b.block_q_dkv / 100   # prefers 8 warps, small dK/dV query tiles
  bench, calls = _fake_bench(speed)
  g = tune_blocks.tune_group(128, "bfloat16", T=64, B=1, N=1, causal=False, max_candidates=10, repeats=1,
                             bench=bench, log=lambda *_: None)
  fwd = [r for r in g["records"] if r["stage"] == "fwd"]
  bwd = [r for r in g["records"] if r["stage"] == "bwd"]
  assert len(fwd) == len(bwd) == 10 and len(calls) == 20
  win_f = max((r for r in fwd if r["status"] == "ok"), key=lambda r: r["tflops"])
  chosen = flash_gpu.BlockSizes(*g["chosen"])
  assert [getattr(chosen, f) for f in ("block_q", "block_k", "num_warps_fwd", "num_stages_fwd")] == \
      [win_f["blocks"][0], win_f["blocks"][1], win_f["blocks"][6], win_f["blocks"][7]]
  assert all(flash_gpu.BlockSizes(*r["blocks"]).block_q == chosen.block_q for r in bwd)
  assert g["fwd_tflops"] == win_f["tflops"]
  assert g["fwd_bwd_tflops"] == max(r["tflops"] for r in bwd if r["status"] == "ok")
  assert g["complete"]
  # The printed table row evaluates back to the chosen blocks.
  row = tune_blocks.table_row(g, "test")
  assert row.strip().startswith("(128, False): BlockSizes(")
  expr = row.split(": ", 1)[1].split("),", 1)[0] + ")"
  assert eval(expr, {"BlockSizes": flash_gpu.BlockSizes}) == chosen


def test_tune_group_without_budget_skips_and_is_incomplete():
  bench, calls = _fake_bench(lambda b, mode: 1.0)
  g = tune_blocks.tune_group(64, "float32", T=64, B=1, N=1, causal=False, max_candidates=3, repeats=1,
                             budget_s=-1.0, bench=bench, log=lambda *_: None)
  assert not calls and not g["complete"] and math.isnan(g["fwd_tflops"])
  assert all(r["status"] == "skipped: budget" for r in g["records"])
  assert g["chosen"] == g["default"]
  summary = tune_blocks.summarize(dict(meta=dict(device_kind="test"), groups=[g]))
  assert "H=64 float32: incomplete (budget)" in summary


def test_tune_group_runs_the_real_kernel_in_interpret_mode():
  g = tune_blocks.tune_group(16, "float32", T=40, B=1, N=2, causal=True, max_candidates=2, repeats=1,
                             log=lambda *_: None)
  assert g["complete"], [r["status"] for r in g["records"]]
  assert [r["stage"] for r in g["records"]] == ["fwd", "fwd", "bwd", "bwd"]
  assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["inner"] >= 1 for r in g["records"])
  assert g["chosen"] in [r["blocks"] for r in g["records"] if r["stage"] == "bwd"]


def test_bench_one_records_failures_and_amortises_short_calls():
  rec = bench_kernels.bench_one("reference", 32, True, "fwd_bwd", B=1, N=2, H=16, dtype="float32", repeats=2)
  assert rec["status"] == "ok" and rec["time_ms"] > 0 and rec["memory_mb"] > 0
  assert rec["inner"] > 1             # a ~ms call is repeated back to back to fill ~20 ms
  bad = bench_kernels.bench_one("no_such_impl", 32, False, "fwd", B=1, N=1, H=16, dtype="float32", repeats=1)
  assert bad["status"].startswith("ValueError: unknown implementation")
