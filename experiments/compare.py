"""The main job: train attention variants on synthetic long-sequence tasks and compare them.

  python -m experiments.compare                                 # default preset: small, <= 10 min on 2 CPU cores
  python -m experiments.compare --preset=smoke                  # seconds; what CI runs
  python -m experiments.compare --preset=full --workdir=runs/full   # the committed results (hours on CPU)
  python -m experiments.compare --tasks=mqar --variants=softmax,linear_elu --seq_lens=64,128 --steps=3000

For every task x sequence length x variant x seed it trains a fresh model (experiments/train.py) and records
the final test accuracy, the steps taken, steps/s and the XLA memory of one train step; then writes
``results.json``, ``results.md`` (tables) and ``accuracy_vs_length_<task>.png`` into ``--workdir``.
Variants this backend cannot train (the Pallas GPU kernel and cuDNN off the GPU) are listed as skipped.
Settings: :class:`CompareConfig` and its ``PRESETS`` (experiments/config.py); every field is a flag, and
``--workdir`` (default ``WORKDIR``) says where the outputs go.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import flags, logging

from experiments import common, tasks, train, variants
from experiments import config as config_lib
from experiments.config import setting

WORKDIR = "/tmp/attention_jax_compare"   # --workdir's default


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """The comparison grid (tasks x lengths x variants x seeds), the task sizes and the training settings."""
  tasks: tuple[str, ...] | None = setting(None, "Tasks to run (default: every task of task_lens).",
                                          choices=tuple(tasks.TASKS))
  seq_lens: tuple[int, ...] | None = setting(None, "Sequence lengths of every task (default: task_lens).")
  task_lens: Mapping[str, tuple[int, ...]] = setting(
      help="Lengths per task; a task not listed runs at 64.", flag=False,
      default_factory=lambda: {"mqar": (64,), "selective_copy": (64,), "induction": (64,), "listops": (64,)})
  variants: tuple[str, ...] = setting(variants.ALL, "Attention variants (experiments/variants.py specs).")
  seeds: tuple[int, ...] = setting((0,), "Seeds.")
  steps: int | None = setting(None, "Training steps per run, for every task (default: train and task_train's).")
  train: Mapping[str, Any] = setting(
      help="TrainConfig settings of every run.", flag=False,
      default_factory=lambda: dict(steps=150, d_model=64, num_heads=2, num_layers=2, batch_size=32, lr=3e-3,
                                   warmup_steps=20, eval_every=150, eval_batches=2, eval_batch_size=128,
                                   log_every=50))
  task_train: Mapping[str, Mapping[str, Any]] = setting(help="Per-task overrides of train.", flag=False,
                                                        default_factory=dict)
  mqar_vocab: int = setting(128, "MQAR vocabulary (at least 2 T).")
  selective_copy_data: int | None = setting(None, "Selective copy data tokens (default: 8 up to T = 128, else 16).")
  listops_train: int = setting(2000, "ListOps training pool size.")
  listops_test: int = setting(256, "ListOps test pool size.")
  budget_s: float | None = setting(None, "Start no new run after this many seconds (the rest are listed as not "
                                         "run); results are rewritten after every run, so an interrupted grid "
                                         "keeps what finished.")


PRESETS = {
    "smoke": dict(
        task_lens={"mqar": (32,), "listops": (32,)}, variants=("softmax", "linear_elu"), mqar_vocab=64,
        selective_copy_data=4, listops_train=200, listops_test=50,
        train=dict(steps=12, d_model=32, num_heads=2, num_layers=1, batch_size=16, lr=3e-3, warmup_steps=2,
                   eval_every=12, eval_batches=1, eval_batch_size=32, log_every=6),
    ),
    "default": {},
    # Zoology-style MQAR (2 layers, d=64, kv pairs = T/16) plus the other tasks; stops a run early once its
    # test accuracy reaches 99.5% (the steps taken are reported). Hours on a 2-core CPU, minutes on a GPU.
    "full": dict(
        task_lens={"mqar": (64, 128, 256), "selective_copy": (256,), "listops": (512,), "induction": (256,)},
        variants=("softmax", "linear_elu", "favor", "local", "bigbird"), mqar_vocab=256, listops_train=20000,
        listops_test=1000,
        train=dict(steps=4000, d_model=64, num_heads=2, num_layers=2, batch_size=64, lr=3e-3, warmup_steps=200,
                   eval_every=250, eval_batches=4, eval_batch_size=256, log_every=250, target_accuracy=0.995),
        task_train={"listops": dict(steps=3000, lr=1e-3, target_accuracy=None)},
    ),
}


def task_kwargs(task: str, seq_len: int, config: CompareConfig) -> dict:
  """The task instance used at a given length (the knobs that scale with it)."""
  if task == "mqar":
    return dict(seq_len=seq_len, num_kv_pairs=max(seq_len // 16, 2), vocab_size=max(config.mqar_vocab, 2 * seq_len))
  if task == "selective_copy":
    n = config.selective_copy_data or (8 if seq_len <= 128 else 16)
    return dict(vocab_size=16, context_len=seq_len - n, num_data=n)
  if task == "induction":
    return dict(vocab_size=16, seq_len=seq_len)
  if task == "listops":
    depth, args = (8, 8) if seq_len >= 512 else ((6, 5) if seq_len >= 256 else (4, 5))
    return dict(max_depth=depth, max_args=args, min_length=seq_len // 4, max_length=seq_len + 1,
                num_train=config.listops_train, num_test=config.listops_test)
  if task == "copy":
    return dict(vocab_size=30, length=(seq_len - 2) // 2)
  raise ValueError(f"unknown task {task!r}")


def _variant_spec(variant: str, seq_len: int) -> str:
  """Scale the sparse patterns with the sequence: windows / strides of about sqrt(T) or T/8."""
  name, arg = variants.parse(variant)
  if arg is not None or name not in variants.SPARSE_KINDS:
    return variant
  if name == "local":
    return f"local:{max(seq_len // 8, 4)}"
  if name in ("strided", "fixed"):
    return f"{name}:{max(int(seq_len ** 0.5), 4)}"
  # BigBird needs many blocks to be sparse: its own block + 1 global + 2 random of 16 blocks (with the default
  # quarter-length blocks these 4 would be every block, i.e. dense attention).
  return f"bigbird:1@{max(seq_len // 16, 8)}"


def runnable_variants(requested: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
  """The requested variants that can train on this backend, and why the others are skipped."""
  keep, skipped = [], {}
  for v in requested:
    name = variants.parse(v)[0]
    if name == "pallas" and jax.default_backend() != "gpu":
      skipped[v] = "Pallas GPU kernel runs only in interpret mode on this backend (tested, too slow to train)"
    elif name == "cudnn" and jax.default_backend() != "gpu":
      skipped[v] = "needs a GPU"
    else:
      keep.append(v)
  return keep, skipped


def run_comparison(config: CompareConfig, workdir: str | os.PathLike, preset: str = "custom") -> dict:
  """Runs the grid, writes results.json / results.md / plots and every run's logs (``runs/``) into ``workdir``,
  returns the results dict.

  ``preset`` names the configuration in the reports. The outputs are rewritten after every run; with
  ``budget_s`` no run starts after that many seconds and the runs left out are listed in ``results["not_run"]``.
  """
  workdir = os.fspath(workdir)
  task_lens = {t: config.seq_lens or config.task_lens.get(t, (64,)) for t in (config.tasks or config.task_lens)}
  names, skipped = runnable_variants(config.variants)
  for v, why in skipped.items():
    logging.warning("skipping variant %s: %s", v, why)
  runs, not_run = [], []
  t0 = time.time()
  results = dict(preset=preset, runs=runs, skipped_variants=skipped, not_run=not_run, wall_s=0.0,
                 **common.run_metadata(), train_settings=dict(config.train), task_train=dict(config.task_train))
  for task, lens in task_lens.items():
    for seq_len in lens:
      for variant in names:
        for seed in config.seeds:
          if config.budget_s is not None and time.time() - t0 > config.budget_s:
            not_run.append(dict(task=task, seq_len=seq_len, variant=variant, seed=seed))
            continue
          overrides = dict(config.train, **config.task_train.get(task, {}))
          if config.steps is not None:
            overrides["steps"] = config.steps
            overrides["eval_every"] = min(overrides["eval_every"], config.steps)
          spec = _variant_spec(variant, seq_len)
          tc = train.TrainConfig(task=task, task_kwargs=task_kwargs(task, seq_len, config), variant=spec,
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
  common.write_json(os.path.join(workdir, "results.json"), results)
  common.write_text(os.path.join(workdir, "results.md"), markdown(results))
  if plots:
    plot(results, workdir)


def markdown(results: dict) -> str:
  device = results.get("device_kind", results.get("device", "?"))   # older results: "device" is the kind
  lines = [f"Preset `{results['preset']}`, {results['date']}, jax {results['jax']} ({results['backend']}: "
           f"{device}), wall time {results['wall_s'] / 60:.1f} min.", ""]
  if results["skipped_variants"]:
    lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped_variants"].items()), ""]
  if results.get("not_run"):
    lines += ["Not run (time budget): " + ", ".join(f"{r['task']} T={r['seq_len']} {r['variant']}"
                                                   for r in results["not_run"]), ""]
  nan = float("nan")
  rows = [(r["task"], r["seq_len"], r["spec"], r["seed"], f"{r.get('accuracy', nan):.3f}", f"{r.get('loss', nan):.3f}",
           f"{r['first_train_loss']:.3f} → {r['last_train_loss']:.3f}", r["steps"], f"{r['steps_per_sec']:.1f}",
           "–" if r.get("step_memory_mb") is None else f"{r['step_memory_mb']:.0f}") for r in results["runs"]]
  header = ("task", "T", "variant", "seed", "test accuracy", "test loss", "first → last train loss", "steps",
            "steps/s", "train-step memory (MB)")
  return "\n".join(lines) + "\n" + common.markdown_table(header, rows, "lrlrrrlrrr") + "\n"


def plot(results: dict, workdir: str) -> list[str]:
  """``accuracy_vs_length_<task>.png``: test accuracy (mean over seeds) against T, one line per variant."""
  paths = []
  for task in sorted({r["task"] for r in results["runs"]}):
    series = {}
    for variant in sorted({r["variant"] for r in results["runs"] if r["task"] == task}):
      pts = [(r["seq_len"], r.get("accuracy", float("nan"))) for r in results["runs"]
             if r["task"] == task and r["variant"] == variant]
      lens = sorted({t for t, _ in pts})
      series[variant] = (lens, [sum(a for t, a in pts if t == L) / sum(1 for t, _ in pts if t == L) for L in lens])
    fig, (ax,) = common.new_figure((5, 3.5))
    common.line_plot(ax, series, xlabel="sequence length T", ylabel="test accuracy", title=task, ylim=(-0.02, 1.02),
                     fontsize=7)
    path = os.path.join(workdir, f"accuracy_vs_length_{task}.png")
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def main(config: CompareConfig, workdir: str) -> None:
  logging.set_verbosity(logging.INFO)
  results = run_comparison(config, workdir, preset=flags.FLAGS.preset)
  print(markdown(results))
  print(f"wrote {workdir}/results.json, results.md and accuracy_vs_length_*.png")


if __name__ == "__main__":
  config_lib.run(main, CompareConfig, PRESETS, workdir=WORKDIR)
