"""Attention kernel benchmark: forward and forward+backward TFLOP/s and memory, several implementations, one run.

FLOPs are counted as 4*B*N*T*S*H for the forward (half when causal) and 3.5x that for forward+backward.
Times are medians of ``--repeats`` runs after a compile/warm-up run, with
``block_until_ready``; each timed run makes enough back-to-back calls to last ~20 ms and divides by their number
(``inner`` in the JSON), so that dispatch latency does not inflate sub-millisecond kernels. Memory is XLA's own
accounting of the compiled function (arguments + outputs + temporaries, ``Compiled.memory_analysis()``), which is
per function and does not depend on what ran before.

  python -m experiments.bench_kernels --out=/tmp/bench.json                       # GPU defaults
  python -m experiments.bench_kernels --implementations=pallas --sweep --seq_lens=16384   # block-size sweep
  python -m experiments.bench_kernels --implementations=pallas_tpu                 # on a TPU
  python -m experiments.bench_kernels --summarize=/tmp/bench.json                  # table from a JSON file

Implementations: ours ("pallas", "pallas_longest_first" -- the same blocks launched heaviest-first under a causal
mask, "pallas_tpu", "blockwise", "reference"), jax.nn ("xla", "cudnn"), and jax's
bundled Triton Pallas kernel where importable ("jax_pallas" with its default blocks, "jax_pallas_tuned" with the
blocks GPU.md lists). One that cannot run here is recorded with the reason and the run goes on.

Masks: ``--padding=0.25`` hides the last quarter of every key sequence; ``--mask_modes=structured,dense`` times
each mask two ways in one run -- structured (``is_causal=True`` / ``key_value_seq_lengths``) and as a boolean
array passed like any other input (the causal mask ``[1, 1, T, S]``, the padding mask ``[B, 1, 1, S]``) -- and
prints and stores (``mask_comparison`` in the JSON) the dense / structured time ratios. FLOPs count the valid keys
only (``S`` times ``1 - padding``), so both ways of giving a mask share one FLOP count.

  python -m experiments.bench_kernels --implementations=pallas,cudnn --causal=true --padding=0,0.25 \
      --mask_modes=structured,dense --seq_lens=4096 --out=/tmp/bench_masks.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import warnings

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script, so that importing this module never clashes
  with another experiment's flags of the same name)."""
  flags.DEFINE_list("implementations", ["pallas", "cudnn", "xla", "jax_pallas", "jax_pallas_tuned"],
                    "What to benchmark.")
  flags.DEFINE_list("seq_lens", ["4096", "16384"], "T (= S).")
  flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
  flags.DEFINE_list("padding", ["0"], "Fractions of every key sequence hidden as padding at its end.")
  flags.DEFINE_list("mask_modes", ["structured"], "How masks are given: 'structured' (is_causal / "
                    "key_value_seq_lengths) and/or 'dense' (boolean mask arrays).")
  flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
  flags.DEFINE_integer("batch", 2, "B")
  flags.DEFINE_integer("heads", 16, "N (= K)")
  flags.DEFINE_integer("head_dim", 128, "H")
  flags.DEFINE_string("dtype", "bfloat16", "Input dtype.")
  flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
  flags.DEFINE_integer("inner", 0, "Back-to-back calls per timed repeat (0: enough for ~20 ms).")
  flags.DEFINE_string("block_sizes", "", "Override ours: 'bq,bk,bq_dkv,bk_dkv,bq_dq,bk_dq[,wf,sf,wb,sb]'.")
  flags.DEFINE_bool("sweep", False, "Benchmark 'pallas' over SWEEP_BLOCKS instead of its default blocks.")
  flags.DEFINE_float("budget_s", 0, "Stop starting new measurements after this many seconds (0: no limit).")
  flags.DEFINE_string("out", "", "Write results as JSON here.")
  flags.DEFINE_string("summarize", "", "Print the table of an existing JSON file and exit.")


# Candidate tiles for --sweep (forward tile, backward tiles, warps/stages), around the GPU.md tuned settings.
SWEEP_BLOCKS = [
    (128, 64, 64, 64, 64, 64, 4, 2, 4, 2),
    (128, 128, 64, 64, 64, 64, 8, 2, 4, 2),
    (128, 64, 64, 128, 128, 64, 4, 3, 8, 2),
    (64, 64, 32, 64, 64, 32, 4, 3, 4, 2),
    (128, 32, 32, 64, 64, 32, 4, 3, 4, 3),
    (64, 128, 64, 32, 32, 64, 4, 2, 4, 2),
]


MIN_REPEAT_S = 0.02   # each timed repeat runs back-to-back calls for at least this long
MAX_INNER = 100


def flops(B, N, T, S, H, causal: bool, mode: str) -> float:
  f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
  return f * (3.5 if mode == "fwd_bwd" else 1.0)


MASK_MODES = ("structured", "dense")


def valid_keys(S: int, padding: float) -> int:
  """Keys left visible in every sequence when the last ``padding`` fraction is padding."""
  return S - int(round(S * padding))


def _blocks(spec):
  from attention_jax.kernels import flash_gpu
  vals = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
  names = [f.name for f in flash_gpu.BlockSizes.__dataclass_fields__.values()]
  return flash_gpu.BlockSizes(**dict(zip(names, vals)))


def mask_inputs(B: int, T: int, S: int, causal: bool, padding: float, mask_mode: str) -> tuple[dict, dict]:
  """``(static options, array options)`` of a mask setting: structured keywords, or dense boolean arrays (passed to
  the timed function as arguments, like q/k/v, so that XLA cannot fold them into constants)."""
  import jax.numpy as jnp
  if mask_mode not in MASK_MODES:
    raise ValueError(f"unknown mask mode {mask_mode!r}; choose from {MASK_MODES}")
  n_valid = valid_keys(S, padding)
  if mask_mode == "structured":
    arrays = {} if n_valid == S else {"key_value_seq_lengths": jnp.full((B,), n_valid, jnp.int32)}
    return {"is_causal": causal}, arrays
  mask = None
  if causal:
    mask = jnp.tril(jnp.ones((T, S), bool))[None, None]                      # [1, 1, T, S]
  if n_valid != S:
    pad = jnp.broadcast_to(jnp.arange(S) < n_valid, (B, 1, 1, S))            # [B, 1, 1, S]
    mask = pad if mask is None else mask & pad
  return {"is_causal": False}, ({} if mask is None else {"mask": mask})


def attention_fn(impl: str, causal: bool, blocks=None, **static):
  """(q, k, v, **arrays) -> out for one implementation, or raises with the reason it cannot run.

  ``static`` and ``arrays`` are mask options (:func:`mask_inputs`); ``causal`` is the default of ``is_causal``.
  """
  import jax
  import attention_jax as aj
  static = {"is_causal": causal, **static}
  if impl in ("pallas", "pallas_longest_first"):
    from attention_jax.kernels import flash_gpu

    def fn(q, k, v, **arrays):
      b = blocks or flash_gpu.BlockSizes.get_default(q.shape[-1], q.dtype)
      if impl == "pallas_longest_first":
        b = dataclasses.replace(b, longest_first=True)
      return flash_gpu.flash_attention(q, k, v, block_sizes=b, **static, **arrays)
    return fn
  if impl in ("pallas_tpu", "blockwise", "reference"):
    return lambda q, k, v, **arrays: aj.dot_product_attention(q, k, v, implementation=impl, **static, **arrays)
  if impl in ("xla", "cudnn"):
    return lambda q, k, v, **arrays: jax.nn.dot_product_attention(q, k, v, implementation=impl, **static, **arrays)
  if impl in ("jax_pallas", "jax_pallas_tuned"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention as jax_attention
    kw = {}
    if impl == "jax_pallas_tuned":
      kw = dict(block_sizes=jax_attention.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                                     block_q_dq=64, block_kv_dq=64), num_warps=4, num_stages=2)

    def jax_fn(q, k, v, **arrays):
      if arrays:
        raise NotImplementedError(f"jax's Pallas mha takes no {sorted(arrays)}")
      return jax_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=static["is_causal"], **kw)
    return jax_fn
  raise ValueError(f"unknown implementation {impl!r}")


def bench_one(impl, T, causal, mode, *, B, N, H, dtype, repeats, blocks=None, label=None, inner=0,
              padding: float = 0.0, mask_mode: str = "structured") -> dict:
  """One measurement record; ``inner`` calls per timed repeat (0: enough for ~MIN_REPEAT_S of device time).

  ``padding`` hides the last fraction of every key sequence; ``mask_mode`` gives the causal / padding mask
  structured or as a dense boolean array (:func:`mask_inputs`).
  """
  import jax
  import jax.numpy as jnp
  rec = dict(implementation=label or impl, T=T, causal=causal, mode=mode, B=B, N=N, H=H, dtype=dtype)
  if padding or mask_mode != "structured":
    rec.update(padding=padding, mask_mode=mask_mode)
  if blocks is not None:
    rec["blocks"] = list(dataclasses.astuple(blocks))
  try:
    static, arrays = mask_inputs(B, T, T, causal, padding, mask_mode)
    fn = attention_fn(impl, causal, blocks, **static)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, N, H), jnp.dtype(dtype)) for kk in keys)
    if mode == "fwd":
      f = jax.jit(lambda q, k, v, arrays: fn(q, k, v, **arrays))
    else:
      f = jax.jit(jax.grad(lambda q, k, v, arrays: (fn(q, k, v, **arrays).astype(jnp.float32) * ct).sum(),
                           argnums=(0, 1, 2)))
    compiled = f.lower(q, k, v, arrays).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      rec["memory_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                          - getattr(mem, "alias_size_in_bytes", 0)) / 2**20
      rec["temp_mb"] = mem.temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(q, k, v, arrays))                 # warm-up (and any lazy kernel compilation)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, arrays))
    once = time.perf_counter() - t0
    # Back-to-back calls per timed repeat, so that a short kernel's time is not dominated by the host's
    # dispatch and synchronisation latency (the calls queue on the device and run in order).
    inner = inner or max(1, min(MAX_INNER, math.ceil(MIN_REPEAT_S / max(once, 1e-6))))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(inner - 1):
        compiled(q, k, v, arrays)
      jax.block_until_ready(compiled(q, k, v, arrays))
      times.append((time.perf_counter() - t0) / inner)
    rec["inner"] = inner
    rec["time_ms"] = statistics.median(times) * 1e3
    rec["tflops"] = flops(B, N, T, valid_keys(T, padding), H, causal, mode) / statistics.median(times) / 1e12
    rec["status"] = "ok"
  except Exception as e:  # noqa: BLE001 -- a benchmark records why an implementation cannot run
    rec["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
  return rec


def mask_comparison(results: list[dict]) -> list[dict]:
  """Dense / structured time ratios of the same (implementation, T, causal, padding, mode), both measured."""
  key = lambda r: (r["implementation"], r["T"], r["causal"], r.get("padding", 0.0), r["mode"])
  structured = {key(r): r for r in results if r.get("mask_mode", "structured") == "structured"
                and r.get("status") == "ok"}
  out = []
  for r in results:
    s = structured.get(key(r))
    if r.get("mask_mode") == "dense" and r.get("status") == "ok" and s is not None:
      out.append(dict(zip(("implementation", "T", "causal", "padding", "mode"), key(r)), structured_ms=s["time_ms"],
                      dense_ms=r["time_ms"], dense_over_structured=r["time_ms"] / s["time_ms"]))
  return out


def _mask_label(r: dict) -> str:
  parts = (["causal"] if r["causal"] else []) + ([f"pad {r['padding']:g}"] if r.get("padding") else [])
  return (" + ".join(parts) or "none") + (f" ({r['mask_mode']})" if r.get("mask_mode") == "dense" else "")


def table(results: list[dict]) -> str:
  lines = ["| implementation | T | mask | mode | TFLOP/s | time (ms) | memory (MB) | status |",
           "|---|---:|---|---|---:|---:|---:|---|"]
  for r in results:
    head = f"| {r['implementation']} | {r['T']} | {_mask_label(r)} | {r['mode']} | "
    if r["status"] == "ok":
      lines.append(head + f"{r['tflops']:.1f} | {r['time_ms']:.2f} | {r.get('memory_mb', float('nan')):.0f} | ok |")
    else:
      lines.append(head + f"– | – | – | {r['status']} |")
  return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
  lines = ["| implementation | T | causal | padding | mode | structured (ms) | dense (ms) | dense / structured |",
           "|---|---:|---|---:|---|---:|---:|---:|"]
  for c in rows:
    lines.append(f"| {c['implementation']} | {c['T']} | {c['causal']} | {c['padding']:g} | {c['mode']} | "
                 f"{c['structured_ms']:.2f} | {c['dense_ms']:.2f} | {c['dense_over_structured']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.summarize:
    with open(FLAGS.summarize) as f:
      data = json.load(f)
    print(json.dumps(data["meta"]))
    print(table(data["results"]))
    comparison = data.get("mask_comparison") or mask_comparison(data["results"])
    if comparison:
      print(comparison_table(comparison))
    return
  import jax
  t_start = time.time()
  runs = []   # (impl, label, blocks)
  for impl in FLAGS.implementations:
    if impl == "pallas" and FLAGS.sweep:
      runs += [("pallas", "pallas[" + ",".join(map(str, b)) + "]", _blocks(b)) for b in SWEEP_BLOCKS]
    elif impl == "pallas" and FLAGS.block_sizes:
      runs.append(("pallas", f"pallas[{FLAGS.block_sizes}]", _blocks(FLAGS.block_sizes)))
    else:
      runs.append((impl, impl, None))
  results = []
  settings = []   # (causal, padding, mask_mode); a dense mode only where there is something to mask
  for causal in (c.lower() == "true" for c in FLAGS.causal):
    for padding in (float(x) for x in FLAGS.padding):
      for mask_mode in FLAGS.mask_modes:
        if mask_mode == "structured" or causal or padding:
          settings.append((causal, padding, mask_mode))
  for T in (int(t) for t in FLAGS.seq_lens):
    for causal, padding, mask_mode in settings:
      for mode in FLAGS.modes:
        for impl, label, blocks in runs:
          if FLAGS.budget_s and time.time() - t_start > FLAGS.budget_s:
            rec = dict(implementation=label, T=T, causal=causal, mode=mode, status="skipped: budget")
            if padding or mask_mode != "structured":
              rec.update(padding=padding, mask_mode=mask_mode)
            results.append(rec)
            continue
          r = bench_one(impl, T, causal, mode, B=FLAGS.batch, N=FLAGS.heads, H=FLAGS.head_dim, dtype=FLAGS.dtype,
                        repeats=FLAGS.repeats, blocks=blocks, label=label, inner=FLAGS.inner, padding=padding,
                        mask_mode=mask_mode)
          print(f"{label:28s} T={T:6d} {_mask_label(r):24s} {mode:8s} " +
                (f"{r['tflops']:7.1f} TFLOP/s {r['time_ms']:9.2f} ms" if r["status"] == "ok" else r["status"]),
                flush=True)
          results.append(r)
  meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__, device=str(jax.devices()[0]),
              device_kind=jax.devices()[0].device_kind, backend=jax.default_backend())
  print(json.dumps(meta))
  print(table(results))
  comparison = mask_comparison(results)
  if comparison:
    print(comparison_table(comparison))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(meta=meta, results=results, mask_comparison=comparison), f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
