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
mask, "pallas_tpu", "mosaic" -- the Hopper Mosaic-GPU kernel, "blockwise", "reference"), jax.nn
("xla", "cudnn"), and jax's bundled Triton Pallas kernel where importable ("jax_pallas" with its default blocks,
"jax_pallas_tuned" with the blocks tuned for an H200: forward 128 x 64, backward 64 x 64, 4 warps, 2 stages). One
that cannot run here is recorded with the reason and the run goes on. Programmable attention: "flex"
(``flex_attention`` with the causal mask as a mask_mod when causal) and "flex:window=W" (plus a sliding window of W
keys), each optionally "@<implementation>" (default: the backend's kernel), so that ``--implementations=pallas,flex
--causal=true`` compares flex with the built-in kernel in one run. (FLOPs of a window count the full causal work, so
compare times, not TFLOP/s, for windows.)
Linear recurrences (causal only): "retnet", "gla", "deltanet", "linear_elu", each optionally "@chunked" (default),
"@parallel" or "@recurrent" (the token-by-token scan); their TFLOP/s use softmax's FLOP count, so compare times:

  python -m experiments.bench_kernels --implementations=xla,retnet,gla,deltanet,deltanet@recurrent,linear_elu \
      --seq_lens=16384 --causal=true --modes=fwd_bwd --batch=1 --heads=1 --head_dim=64 --dtype=float32

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

from experiments import common
from experiments import config as config_lib
from experiments.config import setting

MASK_MODES = ("structured", "dense")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  implementations: tuple[str, ...] = setting(("pallas", "cudnn", "xla", "jax_pallas", "jax_pallas_tuned"),
                                             "What to benchmark.")
  seq_lens: tuple[int, ...] = setting((4096, 16384), "T (= S).")
  causal: tuple[bool, ...] = setting((False, True), "Causal settings to run.")
  padding: tuple[float, ...] = setting((0.0,), "Fractions of every key sequence hidden as padding at its end.")
  mask_modes: tuple[str, ...] = setting(("structured",), "How masks are given: 'structured' (is_causal / "
                                        "key_value_seq_lengths) and / or 'dense' (boolean mask arrays).",
                                        choices=MASK_MODES)
  modes: tuple[str, ...] = setting(("fwd", "fwd_bwd"), "Forward and / or forward + backward.",
                                   choices=("fwd", "fwd_bwd"))
  batch: int = setting(2, "B")
  heads: int = setting(16, "N (= K)")
  head_dim: int = setting(128, "H")
  dtype: str = setting("bfloat16", "Input dtype.")
  repeats: int = setting(5, "Timed repeats (median).")
  inner: int = setting(0, "Back-to-back calls per timed repeat (0: enough for ~20 ms).")
  block_sizes: str = setting("", "Override ours: 'bq,bk,bq_dkv,bk_dkv,bq_dq,bk_dq[,wf,sf,wb,sb]'.")
  sweep: bool = setting(False, "Benchmark 'pallas' over SWEEP_BLOCKS instead of its default blocks.")
  budget_s: float = setting(0.0, "Stop starting new measurements after this many seconds (0: no limit).")
  out: str = setting("", "Write results as JSON here.")
  summarize: str = setting("", "Print the table of an existing JSON file and exit.")


# Candidate tiles for --sweep (forward tile, backward tiles, warps/stages), around the settings tuned on an H200.
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
  if impl in ("pallas_tpu", "mosaic", "blockwise", "reference"):
    return lambda q, k, v, **arrays: aj.dot_product_attention(q, k, v, implementation=impl, **static, **arrays)
  if impl.startswith("flex"):
    return flex_fn(impl, static)
  if impl.partition("@")[0] in RECURRENT:
    return recurrent_fn(impl, static)
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


def flex_fn(impl: str, static: dict):
  """``flex`` / ``flex:window=W`` (optionally ``@<implementation>``, default the backend's kernel):
  flex_attention with the causal mask as a mask_mod (when causal) and, for ``window=W``, a sliding window of W
  keys to the left (and W to the right when not causal); block masks of 128."""
  from attention_jax import flex, mods
  spec, _, implementation = impl.partition("@")
  _, _, window = spec.partition(":window=")
  if set(static) - {"is_causal"}:
    raise NotImplementedError(f"{impl} takes no {sorted(set(static) - {'is_causal'})} here")
  causal = static["is_causal"]
  parts = [mods.causal()] if causal else []
  if window:
    parts.append(mods.sliding_window((int(window), 0 if causal else int(window))))
  mask_mod = None if not parts else flex.and_masks(*parts)

  def fn(q, k, v, **arrays):
    if arrays:
      raise NotImplementedError(f"{impl} takes no {sorted(arrays)}")
    bm = flex.create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], block_size=128)
    return flex.flex_attention(q, k, v, None, bm, implementation=implementation or None)
  return fn


# Causal linear recurrences (attention_jax.linear_rnn and linear attention), "<name>[@<form>]": the form is
# "chunked" (default), "parallel" or "recurrent" (the token-by-token scan). Gates come from the inputs as the
# models make them: RetNet's fixed per-head decays 1 - 2^(-5-n); GLA's per-channel log decay logsigmoid(q) / 16;
# DeltaNet's L2-normalised keys and beta = sigmoid(mean_h q); "linear_elu" is elu+1 linear attention (chunked).
RECURRENT = ("retnet", "gla", "deltanet", "linear_elu")


def recurrent_fn(impl: str, static: dict):
  import jax
  import jax.numpy as jnp
  from attention_jax import linear
  name, _, form = impl.partition("@")
  if set(static) - {"is_causal"} or not static["is_causal"]:
    raise NotImplementedError(f"{impl} is a causal recurrence (run it with --causal=true, no masks)")

  def fn(q, k, v, **arrays):
    if arrays:
      raise NotImplementedError(f"{impl} takes no {sorted(arrays)}")
    kw = dict(implementation=form or "chunked")
    if name == "linear_elu":
      return linear.linear_attention(q, k, v, is_causal=True)
    if name == "retnet":
      g = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(q.shape[2], dtype=jnp.float32)))).astype(q.dtype)
      return linear.decayed_linear_attention(q, k, v, g, **kw)
    if name == "gla":
      return linear.decayed_linear_attention(q, k, v, jax.nn.log_sigmoid(q) / 16, **kw)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return linear.delta_rule_attention(q, k, v, jax.nn.sigmoid(jnp.mean(q, axis=-1)), **kw)
  return fn


def record(label: str, T: int, causal: bool, mode: str, padding: float = 0.0, mask_mode: str = "structured",
           **fields) -> dict:
  """The identifying fields of a measurement (padding and mask mode only when they are not the plain default)."""
  rec = dict(implementation=label, T=T, causal=causal, mode=mode, **fields)
  if padding or mask_mode != "structured":
    rec.update(padding=padding, mask_mode=mask_mode)
  return rec


def blocks_label(values) -> str:
  """``pallas[bq,bk,...]``: how a run of the flash kernel with explicit block sizes is named."""
  return "pallas[" + ",".join(str(int(x)) for x in values) + "]"


def bench_one(impl, T, causal, mode, *, B, N, H, dtype, repeats, blocks=None, label=None, inner=0,
              padding: float = 0.0, mask_mode: str = "structured") -> dict:
  """One measurement record; ``inner`` calls per timed repeat (0: enough for ~MIN_REPEAT_S of device time).

  ``padding`` hides the last fraction of every key sequence; ``mask_mode`` gives the causal / padding mask
  structured or as a dense boolean array (:func:`mask_inputs`).
  """
  import jax
  import jax.numpy as jnp
  rec = record(label or impl, T, causal, mode, padding, mask_mode, B=B, N=N, H=H, dtype=dtype)
  if blocks is not None:
    rec["blocks"] = list(dataclasses.astuple(blocks))
  try:
    static, arrays = mask_inputs(B, T, T, causal, padding, mask_mode)
    fn = attention_fn(impl, causal, blocks, **static)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, N, H), jnp.dtype(dtype)) for kk in keys)
    compiled = common.attention_step(lambda q, k, v, arrays: fn(q, k, v, **arrays), mode, ct).lower(
        q, k, v, arrays).compile()
    memory_mb = common.compiled_memory_mb(compiled)
    if memory_mb is not None:
      rec.update(memory_mb=memory_mb, temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20)
    jax.block_until_ready(compiled(q, k, v, arrays))                 # warm-up (and any lazy kernel compilation)
    (once,) = common.time_calls(lambda: compiled(q, k, v, arrays), 1)
    # Back-to-back calls per timed repeat, so that a short kernel's time is not dominated by the host's
    # dispatch and synchronisation latency.
    inner = inner or max(1, min(MAX_INNER, math.ceil(MIN_REPEAT_S / max(once, 1e-6))))
    times = common.time_calls(lambda: compiled(q, k, v, arrays), repeats, inner)
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
  rows = []
  for r in results:
    head = [r["implementation"], r["T"], _mask_label(r), r["mode"]]
    if r["status"] == "ok":
      rows.append(head + [f"{r['tflops']:.1f}", f"{r['time_ms']:.2f}", f"{r.get('memory_mb', float('nan')):.0f}",
                          "ok"])
    else:
      rows.append(head + ["–"] * 3 + [r["status"]])
  header = ("implementation", "T", "mask", "mode", "TFLOP/s", "time (ms)", "memory (MB)", "status")
  return common.markdown_table(header, rows, "lrllrrrl")


def comparison_table(rows: list[dict]) -> str:
  header = ("implementation", "T", "causal", "padding", "mode", "structured (ms)", "dense (ms)", "dense / structured")
  return common.markdown_table(header, [
      (c["implementation"], c["T"], c["causal"], f"{c['padding']:g}", c["mode"], f"{c['structured_ms']:.2f}",
       f"{c['dense_ms']:.2f}", f"{c['dense_over_structured']:.2f}") for c in rows], "lrlrlrrr")


def summarize(data: dict) -> str:
  """The metadata line, the results table and the dense / structured comparison of a run's JSON data."""
  lines = [json.dumps(data["meta"]), table(data["results"])]
  comparison = data.get("mask_comparison") or mask_comparison(data["results"])
  if comparison:
    lines.append(comparison_table(comparison))
  return "\n".join(lines)


def main(config: BenchConfig) -> None:
  if config.summarize:
    print(summarize(common.read_json(config.summarize)))
    return
  t_start = time.time()
  runs = []   # (impl, label, blocks)
  for impl in config.implementations:
    if impl == "pallas" and config.sweep:
      runs += [("pallas", blocks_label(b), _blocks(b)) for b in SWEEP_BLOCKS]
    elif impl == "pallas" and config.block_sizes:
      runs.append(("pallas", f"pallas[{config.block_sizes}]", _blocks(config.block_sizes)))
    else:
      runs.append((impl, impl, None))
  results = []
  settings = []   # (causal, padding, mask_mode); a dense mode only where there is something to mask
  for causal in config.causal:
    for padding in config.padding:
      for mask_mode in config.mask_modes:
        if mask_mode == "structured" or causal or padding:
          settings.append((causal, padding, mask_mode))
  for T in config.seq_lens:
    for causal, padding, mask_mode in settings:
      for mode in config.modes:
        for impl, label, blocks in runs:
          if config.budget_s and time.time() - t_start > config.budget_s:
            results.append(dict(record(label, T, causal, mode, padding, mask_mode), status="skipped: budget"))
            continue
          r = bench_one(impl, T, causal, mode, B=config.batch, N=config.heads, H=config.head_dim, dtype=config.dtype,
                        repeats=config.repeats, blocks=blocks, label=label, inner=config.inner, padding=padding,
                        mask_mode=mask_mode)
          print(f"{label:28s} T={T:6d} {_mask_label(r):24s} {mode:8s} " +
                (f"{r['tflops']:7.1f} TFLOP/s {r['time_ms']:9.2f} ms" if r["status"] == "ok" else r["status"]),
                flush=True)
          results.append(r)
  data = dict(meta=common.run_metadata(), results=results, mask_comparison=mask_comparison(results))
  print(summarize(data))
  if config.out:
    common.write_json(config.out, data)


if __name__ == "__main__":
  config_lib.run(main, BenchConfig)
