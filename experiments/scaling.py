"""Time and peak memory of attention variants against sequence length (forward, and forward + backward).

Every (variant, length, mode) runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``, what
``/usr/bin/time -v`` reports as "Maximum resident set size") is its own. The child also reports the RSS it had
before running attention (jax runtime + inputs), so the table shows the attention's own share too.
Times are the median of ``--repeats`` runs after a compile-and-warm-up run, with ``block_until_ready``.

  python -m experiments.scaling --variants=xla,blockwise --seq_lens=4096,16384 --modes=fwd_bwd \
      --out=docs/scaling_cpu.json

Writes the JSON list, a markdown table next to it (.md) and a log-log plot (.png).

Variants are experiments/variants.py specs, plus programmable-attention specs that carry their own mask (the
``--causal`` flag does not apply to them): ``flex:none``, ``flex:causal``, ``flex:window=W`` (W keys each side),
``flex:docs=D`` (D documents of random lengths, seed 0; the record holds the lengths and sum(len^2)), each
``flex_attention(implementation="blockwise")`` with a block mask of ``--flex_block_size``, and
``dpa:causal`` (``dot_product_attention(is_causal=True, implementation="blockwise")``) to compare with:

  python -m experiments.scaling --variants=flex:none,flex:window=256,flex:causal,dpa:causal,flex:docs=16 \
      --seq_lens=16384 --modes=fwd_bwd --out=docs/scaling_flex_cpu.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from experiments import common
from experiments import config as config_lib
from experiments.config import setting


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
  variants: tuple[str, ...] = setting(("xla", "blockwise"), "Attention variants (experiments/variants.py specs).")
  seq_lens: tuple[int, ...] = setting((1024, 2048, 4096, 8192, 16384), "Sequence lengths T (= S).")
  modes: tuple[str, ...] = setting(("fwd", "fwd_bwd"), "Forward and / or forward + backward.",
                                   choices=("fwd", "fwd_bwd"))
  batch: int = setting(1, "B")
  devices: tuple[int, ...] = setting((1,), "Virtual CPU device counts to run each measurement with (ring).")
  heads: int = setting(1, "N (= K)")
  head_dim: int = setting(64, "H")
  dtype: str = setting("float32", "Input dtype.")
  causal: bool = setting(False, "Causal attention.")
  repeats: int = setting(3, "Timed runs per measurement (median reported).")
  max_dense_gb: float = setting(20.0, "Skip dense (T x S materialising) variants estimated above this.")
  timeout_s: int = setting(1800, "Per-measurement subprocess timeout.")
  baseline: str | None = setting(None, "Variant the relative (LRA Table 2 layout) table divides by; default: the "
                                       "first of --variants.")
  flex_block_size: int = setting(128, "Block size of the flex:* variants' block masks.")
  out: str = setting("", "JSON output path (.md table and .png plot are written beside it).")


def dense_bytes_estimate(cfg: dict) -> float:
  """Rough peak of a dense fwd+bwd: logits, probabilities and their gradient, float32, B*N*T*S each."""
  n = cfg["batch"] * cfg["heads"] * cfg["seq_len"] ** 2
  return n * 4 * (3 if cfg["mode"] == "fwd_bwd" else 2)


def document_lengths(T: int, docs: int, seed: int = 0) -> list[int]:
  """``docs`` positive lengths summing to ``T``: cut points drawn uniformly without replacement."""
  import numpy as np
  cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, T), size=docs - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [T]])).tolist()


def flex_variant(spec: str, T: int, block_size: int):
  """``(attention(q, k, v), extra record fields)`` for a ``flex:*`` or ``dpa:causal`` spec."""
  import jax.numpy as jnp
  import numpy as np

  from attention_jax import core, flex, mods
  if spec == "dpa:causal":
    return lambda q, k, v: core.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise"), {}
  kind, _, arg = spec.removeprefix("flex:").partition("=")
  extra = {}
  if kind == "none":
    mask_mod = None
  elif kind == "causal":
    mask_mod = mods.causal()
  elif kind == "window":
    mask_mod = mods.sliding_window(int(arg))
  elif kind == "docs":
    lengths = document_lengths(T, int(arg))
    mask_mod = mods.document(jnp.asarray(np.repeat(np.arange(len(lengths)), lengths), jnp.int32))
    extra = dict(doc_lengths=lengths, sum_len_sq_fraction=float(sum(l * l for l in lengths)) / T ** 2)
  else:
    raise ValueError(f"unknown flex variant {spec!r}: flex:none, flex:causal, flex:window=W, flex:docs=D")
  bm = flex.create_block_mask(mask_mod, None, None, T, T, block_size=block_size)
  extra.update(block_fraction=1 - bm.sparsity() / 100, block_size=block_size)
  return lambda q, k, v: flex.flex_attention(q, k, v, None, bm, implementation="blockwise"), extra


def measure_in_process(cfg: dict) -> dict:
  """One measurement in this process (the subprocess :func:`measure` starts runs it)."""
  if cfg.get("devices", 1) > 1:   # virtual CPU devices must be requested before jax initialises
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={cfg['devices']}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import variants
  B, T, N, H = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["head_dim"]
  dtype = jnp.dtype(cfg["dtype"])
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.standard_normal((B, T, N, H)), dtype) for _ in range(3))
  ct = jnp.asarray(r.standard_normal((B, T, N, H)), dtype)
  extra = {}
  if cfg["variant"].startswith(("flex:", "dpa:")):
    attention, extra = flex_variant(cfg["variant"], T, cfg.get("flex_block_size", 128))
    run = common.attention_step(attention, cfg["mode"], ct)
  else:
    attention = variants.make_attention(cfg["variant"])
    run = common.attention_step(lambda q, k, v: attention(q, k, v, is_causal=cfg["causal"]), cfg["mode"], ct)
  jax.block_until_ready((q, k, v, ct))
  compiled_mb = None
  try:
    compiled_mb = common.compiled_memory_mb(run.lower(q, k, v).compile())
  except Exception:  # noqa: BLE001 -- not every backend reports it
    pass
  rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  jax.block_until_ready(run(q, k, v))
  first_s = time.perf_counter() - t0
  times = common.time_calls(lambda: run(q, k, v), cfg["repeats"])
  return dict(cfg, **extra, status="ok", time_s=statistics.median(times), times_s=times, compile_and_first_s=first_s,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              rss_before_attention_mb=rss_before_mb, compiled_memory_mb=compiled_mb,
              device=str(jax.devices()[0]), num_devices=len(jax.devices()), jax=jax.__version__)


def child(cfg_json: str) -> None:
  """The measurement subprocess: prints :func:`measure_in_process`'s record as one JSON line."""
  print(json.dumps(measure_in_process(json.loads(cfg_json))), flush=True)


def measure(cfg: dict, timeout_s: int = 1800, max_dense_gb: float = 20.0) -> dict:
  """Runs one measurement in a fresh subprocess; failures and skips come back as a status."""
  from experiments import variants
  dense = not cfg["variant"].startswith(("flex:", "dpa:")) and variants.parse(cfg["variant"])[0] in variants.DENSE_KINDS
  if dense and dense_bytes_estimate(cfg) > max_dense_gb * 2**30:
    return dict(cfg, status=f"skipped: dense logits need ~{dense_bytes_estimate(cfg) / 2**30:.0f} GB "
                            f"(> --max_dense_gb={max_dense_gb:g})")
  cmd = [sys.executable, "-c", "import sys; from experiments import scaling; scaling.child(sys.argv[1])",
         json.dumps(cfg)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  except subprocess.TimeoutExpired:
    return dict(cfg, status=f"timeout after {timeout_s}s")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return dict(cfg, status=f"failed (exit {proc.returncode}): {tail[0][:200]}")
  return json.loads(lines[-1])


def markdown_table(results: list[dict]) -> str:
  rows = []
  for r in results:
    head = [r["variant"], r["mode"], r["seq_len"], r.get("devices", 1)]
    if r["status"] == "ok":
      cm = r.get("compiled_memory_mb")
      rows.append(head + [f"{r['time_s']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{r['rss_before_attention_mb']:.0f}",
                          "–" if cm is None else f"{cm:.1f}", "ok"])
    else:
      rows.append(head + ["–"] * 4 + [r["status"]])
  header = ("variant", "mode", "T", "devices", "time (s)", "peak RSS (MB)", "RSS before attention (MB)",
            "XLA compiled memory (MB)", "status")
  return common.markdown_table(header, rows, "llrrrrrrl")


def _ratio(x: float) -> str:
  return f"{x:.0f}×" if x >= 10 else (f"{x:.2g}×" if x >= 0.01 else f"{x:.1g}×")


def relative_table(results: list[dict], baseline: str | None = None) -> str:
  """The LRA Table 2 layout: per mode, each variant's speed and memory relative to ``baseline`` per length.

  Speed is baseline time / variant time (> 1: faster); memory is the variant's XLA compiled memory / the
  baseline's (< 1: smaller). Where the baseline did not run (skipped as too large, or failed), the cell shows
  the variant's absolute time and compiled memory instead. ``baseline`` defaults to the first variant measured.
  """
  if not results:
    return ""
  baseline = baseline or results[0]["variant"]
  rows = []
  for mode in dict.fromkeys(r["mode"] for r in results):
    lens = sorted({r["seq_len"] for r in results if r["mode"] == mode})
    get = {(r["variant"], r["seq_len"], r.get("devices", 1)): r for r in results
           if r["mode"] == mode and r["status"] == "ok"}
    table = []
    for variant, dev in dict.fromkeys((r["variant"], r.get("devices", 1)) for r in results if r["mode"] == mode):
      cells = []
      for t in lens:
        r, b = get.get((variant, t, dev)), get.get((baseline, t, 1))
        if r is None:
          cells.append("–")
        elif b is None or not b.get("compiled_memory_mb") or not r.get("compiled_memory_mb"):
          cells.append(f"{r['time_s']:.3g} s / {r.get('compiled_memory_mb') or float('nan'):.0f} MB")
        else:
          mem_ratio = r['compiled_memory_mb'] / b['compiled_memory_mb']
          cells.append(f"{_ratio(b['time_s'] / r['time_s'])} / {_ratio(mem_ratio)}")
      table.append([variant if dev == 1 else f"{variant} ({dev} devices)", *cells])
    rows += [f"**{mode}** — speed× / memory× relative to `{baseline}` (absolute s / MB where it did not run)", "",
             common.markdown_table(["variant", *(f"T={t}" for t in lens)], table, "l" + "r" * len(lens)), ""]
  return "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
  """Time and peak RSS against T, log-log, one line per (variant, mode)."""
  time_s, rss_mb = {}, {}
  for variant, mode in sorted({(r["variant"], r["mode"]) for r in results}):
    pts = [r for r in results if (r["variant"], r["mode"]) == (variant, mode) and r["status"] == "ok"]
    if pts:
      T = [r["seq_len"] for r in pts]
      time_s[f"{variant} {mode}"] = (T, [r["time_s"] for r in pts])
      rss_mb[f"{variant} {mode}"] = (T, [r["peak_rss_mb"] for r in pts])
  fig, (ax_time, ax_mem) = common.new_figure((11, 4), ncols=2)
  common.line_plot(ax_time, time_s, xlabel="sequence length T", ylabel="time (s)", title="time", logy=True)
  common.line_plot(ax_mem, rss_mb, xlabel="sequence length T", ylabel="peak RSS (MB)",
                   title="peak memory (whole process)", logy=True)
  fig.savefig(path, dpi=120)


def run_all(config: ScalingConfig, log=print) -> list[dict]:
  """Every (mode, length, variant, device count) of ``config``, each measured in its own subprocess."""
  results = []
  for mode in config.modes:
    for T in config.seq_lens:
      for variant in config.variants:
        for n_dev in config.devices:
          cfg = dict(variant=variant, mode=mode, seq_len=T, batch=config.batch, heads=config.heads,
                     head_dim=config.head_dim, dtype=config.dtype, causal=config.causal, repeats=config.repeats,
                     devices=n_dev, flex_block_size=config.flex_block_size)
          res = measure(cfg, config.timeout_s, config.max_dense_gb)
          log(f"{variant:10s} {mode:8s} T={T:>6} dev={n_dev}: " +
              (f"{res['time_s']:.3f}s peak {res['peak_rss_mb']:.0f} MB" if res["status"] == "ok" else res["status"]))
          results.append(res)
  return results


def main(config: ScalingConfig) -> None:
  results = run_all(config)
  table = markdown_table(results) + "\n\n" + relative_table(results, config.baseline)
  print(table)
  if config.out:
    common.write_json(config.out, dict(meta=common.run_metadata(), results=results))
    base = os.path.splitext(config.out)[0]
    common.write_text(base + ".md", table + "\n")
    plot(results, base + ".png")


if __name__ == "__main__":
  config_lib.run(main, ScalingConfig)
