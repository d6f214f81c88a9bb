"""Block-size tuning for the Triton flash kernel: measures candidate tiles per head dim and dtype on the GPU and
prints the rows of ``attention_jax.kernels.flash_gpu._DEFAULT_BLOCKS`` that won.

For each (head dim, dtype) group, in two stages:

1. the forward tile (``block_q``, ``block_k``, warps, stages), ranked by forward TFLOP/s;
2. the backward tiles (dK/dV and dQ tiles, warps, stages), with the winning forward, ranked by forward+backward
   TFLOP/s.

Candidates start from the current table row and move outwards (fewest changed fields first), skipping tiles that
a rough resource estimate (:func:`fits`) says cannot fit in an H100/H200's shared memory or registers; a candidate
that still fails to compile is recorded with its error and the run goes on. ``--budget_s`` is shared fairly among
the groups still to run. Timing is :func:`experiments.bench_kernels.bench_one`'s (median of repeats after a
warm-up, back-to-back calls). 4-byte dtypes run IEEE float32 products, ~20x slower than bf16 tensor-core ones, so
they are tuned at ``--wide_seq_len``.

  python -m experiments.tune_blocks --out=/tmp/tune.json --budget_s=300      # on the GPU
  python -m experiments.tune_blocks --summarize=/tmp/tune.json               # rows and tables again
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable

from attention_jax.kernels import flash_gpu
from experiments import bench_kernels, common
from experiments import config as config_lib
from experiments.config import setting

# Candidate values. Forward: (block_q, block_k); backward: (dK/dV tile, dQ tile) pairs, each (block_q, block_k) --
# the dK/dV kernel holds a key tile and loops over queries, the dQ kernel the transpose, so they are paired
# transposed as well as square.
FWD_TILES = [(bq, bk) for bq in (32, 64, 128) for bk in (16, 32, 64, 128)]
BWD_TILES = [((64, 64), (64, 64)), ((32, 64), (64, 32)), ((32, 128), (128, 32)), ((64, 128), (128, 64)),
             ((32, 32), (32, 32)), ((16, 32), (32, 16)), ((128, 64), (64, 128)), ((128, 128), (128, 128))]
WARPS = (4, 8)
STAGES = (1, 2, 3)

SMEM_BYTES = 200 * 1024   # H100 / H200 allow 227 KB per block; leave room for Triton's own scratch
FWD_SHARE = 0.4           # of a group's budget for the forward stage (a fwd+bwd candidate compiles three kernels)
REG_VALUES = 192          # float32 accumulator + score values per thread before spilling is likely


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  head_dims: tuple[int, ...] = setting((128, 64, 256, 32), "Head dims to tune (table rows are by padded H).")
  dtypes: tuple[str, ...] = setting(("bfloat16", "float32"), "Dtypes (2-byte rows also serve float16).")
  seq_len: int = setting(8192, "T = S for 2-byte dtypes.")
  wide_seq_len: int = setting(2048, "T = S for 4-byte dtypes.")
  batch: int = setting(2, "B")
  heads: int = setting(16, "N (= K)")
  causal: bool = setting(False, "Tune with a causal mask.")
  max_candidates: int = setting(8, "Candidates per stage, nearest to the current row first.")
  repeats: int = setting(3, "Timed repeats (median).")
  budget_s: float = setting(0.0, "Total seconds, shared among the groups (0: no limit).")
  out: str = setting("", "Write all measurements and the chosen rows as JSON here.")
  summarize: str = setting("", "Print the rows of an existing JSON file and exit.")


def fits(b, head_dim: int, itemsize: int) -> bool:
  """Rough resource estimate of the three kernels' tiles (heuristic, to skip hopeless candidates)."""
  hp = flash_gpu.padded_head_dim(head_dim)
  per_thread = lambda values, warps: values / (32 * warps)
  fwd = (per_thread(b.block_q * hp + b.block_q * b.block_k, b.num_warps_fwd),
         (b.block_q * hp + 2 * b.block_k * hp * b.num_stages_fwd) * itemsize)
  dkdv = (per_thread(2 * b.block_kv_dkv * hp + 2 * b.block_q_dkv * b.block_kv_dkv, b.num_warps_bwd),
          (2 * b.block_kv_dkv * hp + 2 * b.block_q_dkv * hp * b.num_stages_bwd) * itemsize)
  dq = (per_thread(b.block_q_dq * hp + 2 * b.block_q_dq * b.block_kv_dq, b.num_warps_bwd),
        (2 * b.block_q_dq * hp + 2 * b.block_kv_dq * hp * b.num_stages_bwd) * itemsize)
  return all(regs <= REG_VALUES and smem <= SMEM_BYTES for regs, smem in (fwd, dkdv, dq))


def _distance(a, b) -> tuple[int, float]:
  """(fields changed, summed |log2| ratio of the changed values): nearest neighbours of ``b`` sort first."""
  pairs = [(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)) if x != y]
  return len(pairs), sum(abs(math.log2(x / y)) for x, y in pairs)


def candidates(stage: str, base, head_dim: int, itemsize: int, limit: int) -> list:
  """``base`` first, then the fitting variations of ``stage``'s fields ("fwd" or "bwd"), nearest first."""
  if stage == "fwd":
    vary = [dict(block_q=bq, block_k=bk, num_warps_fwd=w, num_stages_fwd=s)
            for bq, bk in FWD_TILES for w in WARPS for s in STAGES]
  elif stage == "bwd":
    vary = [dict(block_q_dkv=a[0], block_kv_dkv=a[1], block_q_dq=d[0], block_kv_dq=d[1], num_warps_bwd=w,
                 num_stages_bwd=s) for a, d in BWD_TILES for w in WARPS for s in STAGES]
  else:
    raise ValueError(f"stage must be 'fwd' or 'bwd', got {stage!r}")
  out = [base]
  for c in sorted({dataclasses.replace(base, **kw) for kw in vary} - {base},
                  key=lambda c: (*_distance(c, base), dataclasses.astuple(c))):
    if len(out) >= limit:
      break
    if fits(c, head_dim, itemsize):
      out.append(c)
  return out


def best(records: list[dict]):
  """The fastest ok record, or None."""
  ok = [r for r in records if r.get("status") == "ok"]
  return max(ok, key=lambda r: r["tflops"]) if ok else None


def table_row(group: dict, device_kind: str) -> str:
  """One ``_DEFAULT_BLOCKS`` line for a tuned group, with what was measured on ``device_kind``."""
  b = flash_gpu.BlockSizes(*group["chosen"])
  vals = ", ".join(f"{f.name}={getattr(b, f.name)}" for f in dataclasses.fields(b) if f.name != "longest_first")
  vals += ", longest_first=True" if b.longest_first else ""
  h, wide = flash_gpu.BlockSizes.table_key(group["head_dim"], group["dtype"])
  return (f"    ({h}, {wide}): BlockSizes({vals}),  # fwd {group['fwd_tflops']:.1f}, "
          f"fwd+bwd {group['fwd_bwd_tflops']:.1f} TFLOP/s ({device_kind}, T={group['T']}, {group['dtype']})")


def tune_group(head_dim: int, dtype: str, *, T: int, B: int, N: int, causal: bool, max_candidates: int,
               repeats: int, budget_s: float = float("inf"), bench: Callable = bench_kernels.bench_one,
               log: Callable = print) -> dict:
  """Both stages for one (head dim, dtype); returns the group record (chosen blocks, all measurements).

  The forward stage may use the first ``FWD_SHARE`` of ``budget_s``, the backward stage what is left.
  """
  import jax.numpy as jnp
  itemsize = jnp.dtype(dtype).itemsize
  base = flash_gpu.BlockSizes.get_default(head_dim, dtype)
  group = dict(head_dim=head_dim, dtype=dtype, T=T, B=B, N=N, causal=causal, default=list(dataclasses.astuple(base)),
               records=[])

  start = time.time()

  def run(stage, mode, cands, deadline):
    recs = []
    for c in cands:
      label = bench_kernels.blocks_label(dataclasses.astuple(c))
      if time.time() > deadline:
        recs.append(dict(stage=stage, implementation=label, mode=mode, blocks=list(dataclasses.astuple(c)),
                         status="skipped: budget"))
        continue
      r = bench("pallas", T, causal, mode, B=B, N=N, H=head_dim, dtype=dtype, repeats=repeats, blocks=c,
                label=label)
      r["stage"] = stage
      log(f"H={head_dim} {dtype} {stage} {r['implementation']}: " +
          (f"{r['tflops']:.1f} TFLOP/s" if r["status"] == "ok" else r["status"]))
      recs.append(r)
    group["records"] += recs
    return recs

  win = best(run("fwd", "fwd", candidates("fwd", base, head_dim, itemsize, max_candidates),
                 start + FWD_SHARE * budget_s))
  fwd_base = base if win is None else flash_gpu.BlockSizes(*win["blocks"])
  group["fwd_tflops"] = float("nan") if win is None else win["tflops"]
  win_b = best(run("bwd", "fwd_bwd", candidates("bwd", fwd_base, head_dim, itemsize, max_candidates),
                   start + budget_s))
  group["fwd_bwd_tflops"] = float("nan") if win_b is None else win_b["tflops"]
  group["chosen"] = list(dataclasses.astuple(fwd_base)) if win_b is None else win_b["blocks"]
  group["complete"] = win is not None and win_b is not None
  return group


def summarize(data: dict) -> str:
  lines = [json.dumps(data["meta"]), "", "rows for flash_gpu._DEFAULT_BLOCKS (complete groups only):"]
  for g in data["groups"]:
    lines.append(table_row(g, data["meta"]["device_kind"]) if g["complete"]
                 else f"    # H={g['head_dim']} {g['dtype']}: incomplete (budget)")
  for g in data["groups"]:
    lines += ["", f"H={g['head_dim']} {g['dtype']} T={g['T']} (default {g['default']}):",
              bench_kernels.table([dict(r, implementation=f"{r.get('stage', '')} {r.get('implementation', '')}",
                                        T=g["T"], causal=g["causal"], mode=r.get("mode", r.get("stage")))
                                   for r in g["records"]])]
  return "\n".join(lines)


def main(config: TuneConfig) -> None:
  if config.summarize:
    print(summarize(common.read_json(config.summarize)))
    return
  import jax.numpy as jnp
  start = time.time()
  groups_todo = [(h, d) for h in config.head_dims for d in config.dtypes]
  meta = dict(common.run_metadata(), causal=config.causal, budget_s=config.budget_s)
  groups = []
  for i, (h, dtype) in enumerate(groups_todo):
    share = ((config.budget_s - (time.time() - start)) / (len(groups_todo) - i) if config.budget_s
             else float("inf"))
    T = config.wide_seq_len if jnp.dtype(dtype).itemsize >= 4 else config.seq_len
    g = tune_group(h, dtype, T=T, B=config.batch, N=config.heads, causal=config.causal,
                   max_candidates=config.max_candidates, repeats=config.repeats, budget_s=share)
    groups.append(g)
    if config.out:   # rewritten after every group, so a cut run keeps what it measured
      common.write_json(config.out, dict(meta=meta, groups=groups))
  print(summarize(dict(meta=meta, groups=groups)))


if __name__ == "__main__":
  config_lib.run(main, TuneConfig)
