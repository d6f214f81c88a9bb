"""The main job: train every available attention variant on synthetic long-sequence tasks and compare them.

  python -m experiments.compare                                 # default preset: small, <= 10 min on 2 CPU cores
  python -m experiments.compare --preset=smoke                  # seconds; what CI runs
  python -m experiments.compare --preset=full --workdir=runs/full   # the committed results (hours on CPU)
  python -m experiments.compare --tasks=mqar --variants=softmax,linear_elu --seq_lens=64,128 --steps=3000

For every task x sequence length x variant x seed it trains a fresh model (experiments/train.py) and records
the final test accuracy, the steps taken, steps/s and the XLA memory of one train step; then writes
``results.json``, ``results.md`` (tables) and ``accuracy_vs_length_<task>.png`` into ``--workdir``.
Variants whose modules have not landed are listed as unavailable and skipped.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
from absl import app, flags, logging

from experiments import train, variants

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script, so that importing this module never clashes
  with another experiment's flags of the same name)."""
  flags.DEFINE_enum("preset", "default", ["smoke", "default", "full"], "Size of the comparison.")
  flags.DEFINE_list("tasks", None, "Tasks to run (default: the preset's).")
  flags.DEFINE_list("variants", None, "Attention variants (default: every available one in the preset).")
  flags.DEFINE_list("seq_lens", None, "Sequence lengths (default: the preset's, per task).")
  flags.DEFINE_integer("steps", None, "Training steps per run (default: the preset's).")
  flags.DEFINE_list("seeds", None, "Seeds (default: the preset's).")
  flags.DEFINE_string("workdir", "/tmp/attention_jax_compare", "Where results, tables, plots and run logs go.")
  flags.DEFINE_float("budget_s", None, "Start no new run after this many seconds (the rest are listed as not run); "
                     "results are rewritten after every run, so an interrupted grid keeps what finished.")


def task_kwargs(task: str, seq_len: int, preset: str) -> dict:
  """The task instance used at a given length (the knobs that scale with it)."""
  if task == "mqar":
    vocab = {"smoke": 64, "default": 128, "full": 256}[preset]
    return dict(seq_len=seq_len, num_kv_pairs=max(seq_len // 16, 2), vocab_size=max(vocab, 2 * seq_len))
  if task == "selective_copy":
    n = 4 if preset == "smoke" else (8 if seq_len <= 128 else 16)
    return dict(vocab_size=16, context_len=seq_len - n, num_data=n)
  if task == "induction":
    return dict(vocab_size=16, seq_len=seq_len)
  if task == "listops":
    size = {"smoke": (200, 50), "default": (2000, 256), "full": (20000, 1000)}[preset]
    depth, args = (8, 8) if seq_len >= 512 else ((6, 5) if seq_len >= 256 else (4, 5))
    return dict(max_depth=depth, max_args=args, min_length=seq_len // 4, max_length=seq_len + 1,
                num_train=size[0], num_test=size[1])
  if task == "copy":
    return dict(vocab_size=30, length=(seq_len - 2) // 2)
  raise ValueError(f"unknown task {task!r}")


# Per preset: the tasks with their lengths, the variants, training settings (per task overrides), seeds.
PRESETS = {
    "smoke": dict(
        tasks={"mqar": [32], "listops": [32]},
        variants=["softmax", "linear_elu"],
        seeds=[0],
        train=dict(steps=12, d_model=32, num_heads=2, num_layers=1, batch_size=16, lr=3e-3, warmup_steps=2,
                   eval_every=12, eval_batches=1, eval_batch_size=32, log_every=6),
        task_train={},
    ),
    "default": dict(
        tasks={"mqar": [64], "selective_copy": [64], "induction": [64], "listops": [64]},
        variants=list(variants.ALL),
        seeds=[0],
        train=dict(steps=150, d_model=64, num_heads=2, num_layers=2, batch_size=32, lr=3e-3, warmup_steps=20,
                   eval_every=150, eval_batches=2, eval_batch_size=128, log_every=50),
        task_train={},
    ),
    # Zoology-style MQAR (2 layers, d=64, kv pairs = T/16) plus the other tasks; stops a run early once its
    # test accuracy reaches 99.5% (the steps taken are reported). Hours on a 2-core CPU, minutes on a GPU.
    "full": dict(
        tasks={"mqar": [64, 128, 256], "selective_copy": [256], "listops": [512], "induction": [256]},
        variants=["softmax", "linear_elu", "favor", "local", "bigbird"],
        seeds=[0],
        train=dict(steps=4000, d_model=64, num_heads=2, num_layers=2, batch_size=64, lr=3e-3, warmup_steps=200,
                   eval_every=250, eval_batches=4, eval_batch_size=256, log_every=250, target_accuracy=0.995),
        task_train={"listops": dict(steps=3000, lr=1e-3, target_accuracy=None)},
    ),
}


def _variant_spec(variant: str, seq_len: int) -> str:
  """Scale the sparse patterns with the sequence: windows / strides of about sqrt(T) or T/8."""
  name, arg = variants.parse(variant)
  if arg is not None or name not in ("local", "strided", "fixed", "bigbird"):
    return variant
  if name == "local":
    return f"local:{max(seq_len // 8, 4)}"
  if name in ("strided", "fixed"):
    return f"{name}:{max(int(seq_len ** 0.5), 4)}"
  # BigBird needs many blocks to be sparse: its own block + 1 global + 2 random of 16 blocks (with the default
  # quarter-length blocks these 4 would be every block, i.e. dense attention).
  return f"bigbird:1@{max(seq_len // 16, 8)}"


def runnable_variants(requested: list[str]) -> tuple[list[str], dict[str, str]]:
  """The requested variants that can train here, and why the others are skipped."""
  keep, skipped = [], {}
  for v in requested:
    if not variants.is_available(v):
      skipped[v] = "module not available yet"
    elif variants.parse(v)[0] == "pallas" and jax.default_backend() != "gpu":
      skipped[v] = "Pallas GPU kernel runs only in interpret mode on this backend (tested, too slow to train)"
    elif variants.parse(v)[0] == "cudnn" and jax.default_backend() != "gpu":
      skipped[v] = "needs a GPU"
    else:
      keep.append(v)
  return keep, skipped


def run_comparison(preset: str, workdir: str, *, tasks=None, variant_names=None, seq_lens=None, steps=None,
                   seeds=None, budget_s=None) -> dict:
  """Runs the grid, writes results.json / results.md / plots into ``workdir``, returns the results dict.

  The outputs are rewritten after every run; with ``budget_s`` no run starts after that many seconds and the
  runs left out are listed in ``results["not_run"]``.
  """
  cfg = copy.deepcopy(PRESETS[preset])
  task_lens = {t: (seq_lens or cfg["tasks"].get(t, [64])) for t in (tasks or cfg["tasks"])}
  names, skipped = runnable_variants(variant_names or cfg["variants"])
  for v, why in skipped.items():
    logging.warning("skipping variant %s: %s", v, why)
  runs, not_run = [], []
  t0 = time.time()
  results = dict(preset=preset, runs=runs, skipped_variants=skipped, not_run=not_run, wall_s=0.0,
                 jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                 date=time.strftime("%Y-%m-%d %H:%M"), train_settings=dict(cfg["train"]),
                 task_train=cfg["task_train"])
  for task, lens in task_lens.items():
    for seq_len in (int(t) for t in lens):
      for variant in names:
        for seed in (int(s) for s in (seeds or cfg["seeds"])):
          if budget_s is not None and time.time() - t0 > budget_s:
            not_run.append(dict(task=task, seq_len=seq_len, variant=variant, seed=seed))
            continue
          overrides = dict(cfg["train"], **cfg["task_train"].get(task, {}))
          if steps is not None:
            overrides["steps"] = steps
            overrides["eval_every"] = min(overrides["eval_every"], steps)
          spec = _variant_spec(variant, seq_len)
          tc = train.TrainConfig(task=task, task_kwargs=task_kwargs(task, seq_len, preset), variant=spec,
                                 seed=seed, **overrides)
          run_dir = os.path.join(workdir, "runs", f"{task}_T{seq_len}_{spec.replace(':', '-')}_s{seed}")
          result = train.train_and_evaluate(tc, run_dir)
          rec = dict(task=task, seq_len=seq_len, variant=variant, spec=spec, seed=seed,
                     task_kwargs=tc.task_kwargs, **result.metrics)
          runs.append(rec)
          logging.info("[%s T=%d %s seed %d] accuracy %.3f after %d steps (%.1f steps/s)", task, seq_len, spec,
                       seed, rec.get("accuracy", float("nan")), rec["steps"], rec["steps_per_sec"])
          results["wall_s"] = time.time() - t0
          write_outputs(results, workdir, plots=False)
  results["wall_s"] = time.time() - t0
  write_outputs(results, workdir)
  return results


def write_outputs(results: dict, workdir: str, plots: bool = True) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results))
  if plots:
    plot(results, workdir)


def markdown(results: dict) -> str:
  lines = [f"Preset `{results['preset']}`, {results['date']}, jax {results['jax']} ({results['backend']}: "
           f"{results.get('device', '?')}), wall time {results['wall_s'] / 60:.1f} min.", ""]
  if results["skipped_variants"]:
    lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped_variants"].items()), ""]
  if results.get("not_run"):
    lines += ["Not run (time budget): " + ", ".join(f"{r['task']} T={r['seq_len']} {r['variant']}"
                                                   for r in results["not_run"]), ""]
  lines += ["| task | T | variant | seed | test accuracy | test loss | first → last train loss | steps | steps/s | "
            "train-step memory (MB) |", "|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
  for r in results["runs"]:
    mem = "–" if r.get("step_memory_mb") is None else f"{r['step_memory_mb']:.0f}"
    acc = r.get('accuracy', float('nan'))
    lines.append(f"| {r['task']} | {r['seq_len']} | {r['spec']} | {r['seed']} | {acc:.3f} | "
                 f"{r.get('loss', float('nan')):.3f} | {r['first_train_loss']:.3f} → {r['last_train_loss']:.3f} | "
                 f"{r['steps']} | {r['steps_per_sec']:.1f} | {mem} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, workdir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for task in sorted({r["task"] for r in results["runs"]}):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant in sorted({r["variant"] for r in results["runs"] if r["task"] == task}):
      pts = sorted((r["seq_len"], r.get("accuracy", float("nan"))) for r in results["runs"]
                   if r["task"] == task and r["variant"] == variant)
      lens = sorted({p[0] for p in pts})
      mean = [sum(a for t, a in pts if t == L) / sum(1 for t, _ in pts if t == L) for L in lens]
      ax.plot(lens, mean, "o-", label=variant)
    ax.set(xscale="log", xlabel="sequence length T", ylabel="test accuracy", title=task, ylim=(-0.02, 1.02))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, f"accuracy_vs_length_{task}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  results = run_comparison(FLAGS.preset, FLAGS.workdir, tasks=FLAGS.tasks, variant_names=FLAGS.variants,
                           seq_lens=FLAGS.seq_lens, steps=FLAGS.steps, seeds=FLAGS.seeds,
                           budget_s=FLAGS.budget_s)
  print(markdown(results))
  print(f"wrote {FLAGS.workdir}/results.json, results.md and accuracy_vs_length_*.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
