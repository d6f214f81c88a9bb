"""Time and peak memory of attention variants against sequence length (forward, and forward + backward).

Every (variant, length, mode) runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``, what
``/usr/bin/time -v`` reports as "Maximum resident set size") is its own. The child also reports the RSS it had
before running attention (jax runtime + inputs), so the table shows the attention's own share too.
Times are the median of ``--repeats`` runs after a compile-and-warm-up run, with ``block_until_ready``.

  python -m experiments.scaling --variants=xla,blockwise --seq_lens=4096,16384 --modes=fwd_bwd \
      --out=docs/scaling_cpu.json

Writes the JSON list, a markdown table next to it (.md) and a log-log plot (.png).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script, so that importing this module never clashes
  with another experiment's flags of the same name)."""
  flags.DEFINE_list("variants", ["xla", "blockwise"], "Attention variants to measure (see VARIANTS).")
  flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths T (= S).")
  flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
  flags.DEFINE_integer("batch", 1, "B")
  flags.DEFINE_list("devices", ["1"], "Virtual CPU device counts to run each measurement with (ring attention).")
  flags.DEFINE_integer("heads", 1, "N (= K)")
  flags.DEFINE_integer("head_dim", 64, "H")
  flags.DEFINE_string("dtype", "float32", "Input dtype.")
  flags.DEFINE_bool("causal", False, "Causal attention.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
  flags.DEFINE_float("max_dense_gb", 20.0, "Skip dense (T x S materialising) variants estimated above this.")
  flags.DEFINE_integer("timeout_s", 1800, "Per-measurement subprocess timeout.")
  flags.DEFINE_string("baseline", None, "Variant the relative (LRA Table 2 layout) table divides by; default: "
                      "the first of --variants.")
  flags.DEFINE_string("out", "", "JSON output path (.md table and .png plot are written beside it).")
  flags.DEFINE_string("child", "", "Internal: run one measurement given as JSON and print the result.")


def _attention_fn(variant: str, causal: bool) -> Callable:
  from experiments import variants
  fn = variants.make_attention(variant)
  return lambda q, k, v: fn(q, k, v, is_causal=causal)


def _is_dense(variant: str) -> bool:
  from experiments import variants
  return variants.parse(variant)[0] in variants.DENSE_KINDS


def dense_bytes_estimate(cfg: dict) -> float:
  """Rough peak of a dense fwd+bwd: logits, probabilities and their gradient, float32, B*N*T*S each."""
  n = cfg["batch"] * cfg["heads"] * cfg["seq_len"] ** 2
  return n * 4 * (3 if cfg["mode"] == "fwd_bwd" else 2)


def measure_in_process(cfg: dict) -> dict:
  """One measurement in this process (used by the child)."""
  if cfg.get("devices", 1) > 1:   # virtual CPU devices must be requested before jax initialises
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={cfg['devices']}")
  import jax
  import jax.numpy as jnp
  import numpy as np
  B, T, N, H = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["head_dim"]
  dtype = jnp.dtype(cfg["dtype"])
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.standard_normal((B, T, N, H)), dtype) for _ in range(3))
  ct = jnp.asarray(r.standard_normal((B, T, N, H)), dtype)
  fn = _attention_fn(cfg["variant"], cfg["causal"])
  if cfg["mode"] == "fwd":
    run = jax.jit(fn)
  else:
    run = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * ct).sum(), argnums=(0, 1, 2)))
  jax.block_until_ready((q, k, v, ct))
  compiled_mb = None
  try:
    mem = run.lower(q, k, v).compile().memory_analysis()
    compiled_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001 -- not every backend reports it
    pass
  rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  jax.block_until_ready(run(q, k, v))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    jax.block_until_ready(run(q, k, v))
    times.append(time.perf_counter() - t0)
  return dict(cfg, status="ok", time_s=statistics.median(times), times_s=times, compile_and_first_s=first_s,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              rss_before_attention_mb=rss_before_mb, compiled_memory_mb=compiled_mb,
              device=str(jax.devices()[0]), num_devices=len(jax.devices()), jax=jax.__version__)


def measure(cfg: dict, timeout_s: int = 1800, max_dense_gb: float = 20.0) -> dict:
  """Runs one measurement in a fresh subprocess; failures and skips come back as a status."""
  if _is_dense(cfg["variant"]) and dense_bytes_estimate(cfg) > max_dense_gb * 2**30:
    return dict(cfg, status=f"skipped: dense logits need ~{dense_bytes_estimate(cfg) / 2**30:.0f} GB "
                            f"(> --max_dense_gb={max_dense_gb:g})")
  cmd = [sys.executable, "-m", "experiments.scaling", f"--child={json.dumps(cfg)}"]
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
  rows = ["| variant | mode | T | devices | time (s) | peak RSS (MB) | RSS before attention (MB) | "
          "XLA compiled memory (MB) | status |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in results:
    ok = r["status"] == "ok"
    dev = r.get("devices", 1)
    cm = r.get("compiled_memory_mb")
    cm = "–" if cm is None else f"{cm:.1f}"
    rows.append(f"| {r['variant']} | {r['mode']} | {r['seq_len']} | {dev} | {r['time_s']:.3f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_before_attention_mb']:.0f} | {cm} | ok |" if ok else
                f"| {r['variant']} | {r['mode']} | {r['seq_len']} | {dev} | – | – | – | – | {r['status']} |")
  return "\n".join(rows)


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
    rows += [f"**{mode}** — speed× / memory× relative to `{baseline}` (absolute s / MB where it did not run)", "",
             "| variant | " + " | ".join(f"T={t}" for t in lens) + " |", "|---|" + "---:|" * len(lens)]
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
      name = variant if dev == 1 else f"{variant} ({dev} devices)"
      rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("")
  return "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  keys = sorted({(r["variant"], r["mode"]) for r in results})
  for variant, mode in keys:
    pts = [r for r in results if (r["variant"], r["mode"]) == (variant, mode) and r["status"] == "ok"]
    if not pts:
      continue
    T = [r["seq_len"] for r in pts]
    axes[0].loglog(T, [r["time_s"] for r in pts], "o-", label=f"{variant} {mode}")
    axes[1].loglog(T, [r["peak_rss_mb"] for r in pts], "o-", label=f"{variant} {mode}")
  axes[0].set(xlabel="sequence length T", ylabel="time (s)", title="time")
  axes[1].set(xlabel="sequence length T", ylabel="peak RSS (MB)", title="peak memory (whole process)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_all(variants, seq_lens, modes, *, batch=1, heads=1, head_dim=64, dtype="float32", causal=False,
            repeats=3, timeout_s=1800, max_dense_gb=20.0, devices=(1,), log=print) -> list[dict]:
  results = []
  for mode in modes:
    for T in seq_lens:
      for variant in variants:
        for n_dev in devices:
          cfg = dict(variant=variant, mode=mode, seq_len=int(T), batch=batch, heads=heads, head_dim=head_dim,
                     dtype=dtype, causal=causal, repeats=repeats, devices=int(n_dev))
          res = measure(cfg, timeout_s, max_dense_gb)
          log(f"{variant:10s} {mode:8s} T={T:>6} dev={n_dev}: " +
              (f"{res['time_s']:.3f}s peak {res['peak_rss_mb']:.0f} MB" if res["status"] == "ok" else res["status"]))
          results.append(res)
  return results


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(measure_in_process(json.loads(FLAGS.child))), flush=True)
    return
  import platform
  results = run_all(FLAGS.variants, [int(t) for t in FLAGS.seq_lens], FLAGS.modes, batch=FLAGS.batch,
                    heads=FLAGS.heads, head_dim=FLAGS.head_dim, dtype=FLAGS.dtype, causal=FLAGS.causal,
                    repeats=FLAGS.repeats, timeout_s=FLAGS.timeout_s, max_dense_gb=FLAGS.max_dense_gb,
                    devices=[int(d) for d in FLAGS.devices])
  table = markdown_table(results) + "\n\n" + relative_table(results, FLAGS.baseline)
  print(table)
  if FLAGS.out:
    import jax
    meta = dict(argv=sys.argv, date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.platform(),
                processor=platform.processor(), cpu_count=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__)
    with open(FLAGS.out, "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=1)
    base = os.path.splitext(FLAGS.out)[0]
    with open(base + ".md", "w") as f:
      f.write(table + "\n")
    plot(results, base + ".png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
