"""The main job: train attention variants on synthetic long-sequence tasks and compare them.

  python -m experiments.compare                                 # default preset: small, <= 10 min on 2 CPU cores
  python -m experiments.compare --preset=smoke                  # seconds; what CI runs
  python -m experiments.compare --preset=full --workdir=runs/full   # the committed results (hours on CPU)
  python -m experiments.compare --tasks=mqar --variants=softmax,linear_elu --seq_lens=64,128 --steps=3000
  python -m experiments.compare --preset=zoology --workdir=runs/zoology   # MQAR recall vs state size (GPU)

For every task x sequence length x model width (``--d_models``, default: the training settings' d_model) x
variant x seed it trains a fresh model (experiments/train.py) and records the final test accuracy, the steps
taken, steps/s, the XLA memory of one train step and the variant's decoding state size
(``variants.state_size``); then writes ``results.json``, ``results.md`` (per-run table; mean ± std over seeds
with the state size; accuracy against width), ``accuracy_vs_length_<task>.png`` and
``recall_vs_state_<task>_T<T>.png`` (accuracy against state size, one line per variant across the widths: Zoology's
Figure 3) into ``--workdir``. Variants this backend cannot train (the Pallas GPU kernel and cuDNN off the GPU) are
listed as skipped.

**Resuming** (``--resume``, the default): runs already in ``workdir/results.json`` with the settings the current
configuration gives them (spec, task instance and training settings) are kept, not rerun; so an interrupted or
``--budget_s``-limited sweep continues where it stopped, and narrowing the grid (``--variants=...``) keeps the
other recorded runs. Records whose settings differ from the current configuration's are dropped (rerun when in
the grid). ``--noresume`` starts from an empty results.json.
Settings: :class:`CompareConfig` and its ``PRESETS`` (experiments/config.py); every field is a flag, and
``--workdir`` (default ``WORKDIR``) says where the outputs go.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
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
  d_models: tuple[int, ...] | None = setting(None, "Model widths d_model to compare, one run each (default: the "
                                                   "training settings' d_model).")
  steps: int | None = setting(None, "Training steps per run, for every task (default: train and task_train's).")
  train: Mapping[str, Any] = setting(
      help="TrainConfig settings of every run.", flag=False,
      default_factory=lambda: dict(steps=150, d_model=64, num_heads=2, num_layers=2, batch_size=32, lr=3e-3,
                                   warmup_steps=20, eval_every=150, eval_batches=2, eval_batch_size=128,
                                   log_every=50))
  task_train: Mapping[str, Mapping[str, Any]] = setting(help="Per-task overrides of train.", flag=False,
                                                        default_factory=dict)
  mqar_vocab: int = setting(128, "MQAR vocabulary (at least 2 T).")
  mqar_kv_pairs: int | None = setting(None, "MQAR key-value pairs at every length (default: T / 16, at least 2, "
                                            "as in Zoology).")
  selective_copy_data: int | None = setting(None, "Selective copy data tokens (default: 8 up to T = 128, else 16).")
  listops_train: int = setting(2000, "ListOps training pool size.")
  listops_test: int = setting(256, "ListOps test pool size.")
  budget_s: float | None = setting(None, "Start no new run after this many seconds (the rest are listed as not "
                                         "run); results are rewritten after every run, so an interrupted grid "
                                         "keeps what finished.")
  resume: bool = setting(True, "Keep the runs already in workdir/results.json whose settings match this "
                               "configuration instead of rerunning them.")


PRESETS = {
    "smoke": dict(
        task_lens={"mqar": (32,), "listops": (32,)}, variants=("softmax", "linear_elu"), mqar_vocab=64,
        selective_copy_data=4, listops_train=200, listops_test=50,
        train=dict(steps=12, d_model=32, num_heads=2, num_layers=1, batch_size=16, lr=3e-3, warmup_steps=2,
                   eval_every=12, eval_batches=1, eval_batch_size=32, log_every=6),
    ),
    # The headline in minutes on a CPU: MQAR with 8 key-value pairs at T = 32 and 64 (2 layers, d_model 64, one
    # seed; a run stops once its test accuracy reaches 99%). Softmax attention learns to recall every pair; linear
    # attention (elu+1) and FAVOR+ stall near one pair. Measured at 7-8 minutes on 2 CPU cores.
    "default": dict(
        task_lens={"mqar": (32, 64)}, variants=("softmax", "linear_elu", "favor"), mqar_kv_pairs=8,
        train=dict(steps=1500, d_model=64, num_heads=2, num_layers=2, batch_size=32, lr=3e-3, warmup_steps=50,
                   eval_every=100, eval_batches=2, eval_batch_size=128, log_every=100, target_accuracy=0.99),
    ),
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
    # Zoology (Arora et al. 2023, Figure 3): MQAR recall against each variant's decoding state size, over model
    # widths (kv pairs = T/16); a run stops once its test accuracy reaches 99%. One learning rate (Zoology swept
    # several). 144 runs at T = 64 and 128; experiments/gpu_check.sh runs it on a GPU at T = 64..512 (resumable).
    # The CPU part in docs/RESULTS.md: --seq_lens=64 --mqar_kv_pairs=8 --d_models=64,128
    # --variants=softmax,local,linear_elu,favor:64,based,retnet,gla,deltanet.
    "zoology": dict(
        task_lens={"mqar": (64, 128)},
        variants=("softmax", "local", "linear_elu", "favor", "based", "retnet", "gla", "deltanet"),
        d_models=(64, 128, 256), seeds=(0, 1, 2), mqar_vocab=128,
        train=dict(steps=2000, d_model=128, num_heads=2, num_layers=2, batch_size=32, lr=3e-3, warmup_steps=50,
                   eval_every=100, eval_batches=2, eval_batch_size=256, log_every=100, target_accuracy=0.99),
    ),
}


def task_kwargs(task: str, seq_len: int, config: CompareConfig) -> dict:
  """The task instance used at a given length (the knobs that scale with it)."""
  if task == "mqar":
    pairs = config.mqar_kv_pairs or max(seq_len // 16, 2)
    return dict(seq_len=seq_len, num_kv_pairs=pairs, vocab_size=max(config.mqar_vocab, 2 * seq_len))
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
  """Scale the sparse patterns with the sequence: windows / strides of about sqrt(T) or T/8 (``local`` and
  Based's sliding window: T/8, so at T = 64 Based's window is not the whole sequence)."""
  name, arg = variants.parse(variant)
  if arg is not None or name not in (*variants.SPARSE_KINDS, "based"):
    return variant
  if name == "based":
    return f"based:{max(seq_len // 8, 4)}"
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


def _run_key(rec: Mapping[str, Any]) -> tuple:
  """``(task, seq_len, d_model, variant, seed)`` of a record."""
  return (rec.get("task"), rec.get("seq_len"), rec.get("d_model"), rec.get("variant"), rec.get("seed"))


def _jsonable(x: Any) -> Any:
  """``x`` as it reads back from results.json (tuples become lists)."""
  return json.loads(json.dumps(x))


def run_settings(config: CompareConfig, task: str, seq_len: int, d_model: int | None, variant: str) -> dict:
  """What a run of the grid trains: its variant ``spec``, ``task_kwargs`` and TrainConfig ``settings`` (the
  training settings with the task's overrides, ``--steps`` and the width); ``d_model=None``: the settings' own."""
  settings = dict(config.train, **config.task_train.get(task, {}))
  if config.steps is not None:
    settings["steps"] = config.steps
    settings["eval_every"] = min(settings.get("eval_every", config.steps), config.steps)
  if d_model is not None:
    settings["d_model"] = d_model
  settings.setdefault("d_model", train.TrainConfig.d_model)
  settings.setdefault("num_heads", train.TrainConfig.num_heads)
  return dict(spec=_variant_spec(variant, seq_len), task_kwargs=task_kwargs(task, seq_len, config),
              settings=settings)


def _recorded_runs(config: CompareConfig, workdir: str) -> dict[tuple, dict]:
  """With ``config.resume``: the runs of ``workdir/results.json`` whose spec, task instance and settings are the
  ones the current configuration gives their (task, T, d_model, variant) -- by key."""
  path = os.path.join(workdir, "results.json")
  if not config.resume or not os.path.exists(path):
    return {}
  kept, dropped = {}, 0
  for rec in common.read_json(path).get("runs", []):
    try:
      want = run_settings(config, rec["task"], rec["seq_len"], rec["d_model"], rec["variant"])
    except (KeyError, ValueError):   # an older record (no d_model) or a task this version does not know
      want = None
    if want is not None and all(_jsonable(want[k]) == rec.get(k) for k in want):
      kept[_run_key(rec)] = rec
    else:
      dropped += 1
  if dropped:
    logging.warning("%s: %d recorded run(s) have other settings than this configuration; they are dropped", path,
                    dropped)
  return kept


def run_comparison(config: CompareConfig, workdir: str | os.PathLike, preset: str = "custom") -> dict:
  """Runs the grid, writes results.json / results.md / plots and every run's logs (``runs/``) into ``workdir``,
  returns the results dict.

  ``preset`` names the configuration in the reports. The outputs are rewritten after every run; with
  ``budget_s`` no run starts after that many seconds and the runs left out are listed in ``results["not_run"]``.
  With ``resume``, runs recorded in ``workdir/results.json`` with the same settings are kept instead of rerun
  (``results["reused_runs"]`` counts them; recorded runs outside the grid are kept too, after the grid's).
  """
  workdir = os.fspath(workdir)
  task_lens = {t: config.seq_lens or config.task_lens.get(t, (64,)) for t in (config.tasks or config.task_lens)}
  names, skipped = runnable_variants(config.variants)
  for v, why in skipped.items():
    logging.warning("skipping variant %s: %s", v, why)
  recorded = _recorded_runs(config, workdir)
  runs, not_run = [], []
  t0 = time.time()
  results = dict(preset=preset, runs=[], skipped_variants=skipped, not_run=not_run, reused_runs=0, wall_s=0.0,
                 **common.run_metadata(), train_settings=dict(config.train), task_train=dict(config.task_train))
  grid = []
  for task, lens in task_lens.items():
    for seq_len in lens:
      for width in config.d_models or (None,):
        for variant in names:
          plan = run_settings(config, task, seq_len, width, variant)
          grid += [((task, seq_len, plan["settings"]["d_model"], variant, seed), plan) for seed in config.seeds]
  in_grid = {key for key, _ in grid}
  others = [rec for key, rec in recorded.items() if key not in in_grid]   # kept after the grid's runs
  results["runs"] = runs + others
  for key, plan in grid:
    task, seq_len, d_model, variant, seed = key
    settings, spec = plan["settings"], plan["spec"]
    if key in recorded:
      runs.append(recorded[key])
      results["reused_runs"] += 1
      continue
    if config.budget_s is not None and time.time() - t0 > config.budget_s:
      not_run.append(dict(task=task, seq_len=seq_len, d_model=d_model, variant=variant, seed=seed))
      continue
    tc = train.TrainConfig(task=task, task_kwargs=plan["task_kwargs"], variant=spec, seed=seed, **settings)
    run_dir = os.path.join(workdir, "runs", f"{task}_T{seq_len}_d{d_model}_{spec.replace(':', '-')}_s{seed}")
    result = train.train_and_evaluate(tc, run_dir)
    size = variants.state_size(spec, seq_len=seq_len, d_model=d_model, num_heads=settings["num_heads"])
    rec = dict(task=task, seq_len=seq_len, d_model=d_model, variant=variant, spec=spec, seed=seed, state_size=size,
               task_kwargs=tc.task_kwargs, settings=settings, **result.metrics)
    runs.append(_jsonable(rec))
    logging.info("[%s T=%d d=%d %s seed %d] accuracy %.3f after %d steps (%.1f steps/s)", task, seq_len, d_model,
                 spec, seed, rec.get("accuracy", float("nan")), rec["steps"], rec["steps_per_sec"])
    results.update(runs=runs + others, wall_s=time.time() - t0)
    write_outputs(results, workdir, plots=False)
  if results["reused_runs"]:
    logging.info("kept %d run(s) recorded in %s/results.json", results["reused_runs"], workdir)
  results.update(runs=runs + others, wall_s=time.time() - t0)
  write_outputs(results, workdir)
  return results


def write_outputs(results: dict, workdir: str, plots: bool = True) -> None:
  os.makedirs(workdir, exist_ok=True)
  common.write_json(os.path.join(workdir, "results.json"), results)
  common.write_text(os.path.join(workdir, "results.md"), markdown(results))
  if plots:
    plot(results, workdir)


def _fmt(x: float | None, digits: int = 3) -> str:
  return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def summarize(runs: list[dict]) -> list[dict]:
  """Per (task, T, d_model, variant), in the order of ``runs``: the spec, the state size, the number of seeds,
  test accuracy mean and std over seeds (sample std, ddof = 1; 0 for a single seed) and the mean steps taken."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r["task"], r["seq_len"], r.get("d_model"), r["variant"]), []).append(r)
  rows = []
  for (task, seq_len, d_model, variant), rs in groups.items():
    acc = np.array([r.get("accuracy", np.nan) for r in rs], np.float64)
    rows.append(dict(task=task, seq_len=seq_len, d_model=d_model, variant=variant, spec=rs[0].get("spec", variant),
                     state_size=rs[0].get("state_size"), seeds=len(rs), accuracy_mean=float(acc.mean()),
                     accuracy_std=float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                     steps_mean=float(np.mean([r["steps"] for r in rs]))))
  return rows


def _mean_std(row: dict) -> str:
  text = _fmt(row["accuracy_mean"])
  return text if row["seeds"] == 1 else f"{text} ± {_fmt(row['accuracy_std'])}"


def markdown(results: dict) -> str:
  device = results.get("device_kind", results.get("device", "?"))   # older results: "device" is the kind
  lines = [f"Preset `{results['preset']}`, {results['date']}, jax {results['jax']} ({results['backend']}: "
           f"{device}), wall time {results['wall_s'] / 60:.1f} min.", ""]
  if results.get("reused_runs"):
    lines += [f"{results['reused_runs']} run(s) kept from an earlier results.json (same settings).", ""]
  if results["skipped_variants"]:
    lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped_variants"].items()), ""]
  if results.get("not_run"):
    lines += ["Not run (time budget): " + ", ".join(
        f"{r['task']} T={r['seq_len']}" + (f" d={r['d_model']}" if r.get("d_model") else "") + f" {r['variant']}"
        for r in results["not_run"]), ""]
  nan = float("nan")
  dash = lambda x: "–" if x is None else x
  rows = [(r["task"], r["seq_len"], dash(r.get("d_model")), r["spec"], r["seed"], dash(r.get("state_size")),
           _fmt(r.get("accuracy", nan)), _fmt(r.get("loss", nan)),
           f"{_fmt(r['first_train_loss'])} → {_fmt(r['last_train_loss'])}", r["steps"], f"{r['steps_per_sec']:.1f}",
           "–" if r.get("step_memory_mb") is None else f"{r['step_memory_mb']:.0f}") for r in results["runs"]]
  header = ("task", "T", "d_model", "variant", "seed", "state size", "test accuracy", "test loss",
            "first → last train loss", "steps", "steps/s", "train-step memory (MB)")
  lines += [common.markdown_table(header, rows, "lrrlrrrrlrrr"), ""]
  summary = summarize(results["runs"])
  if summary:
    lines += ["Test accuracy over seeds (mean ± sample std), with the decoding state of one layer in floats:", ""]
    rows = [(s["task"], s["seq_len"], dash(s["d_model"]), s["variant"], s["spec"], dash(s["state_size"]), s["seeds"],
             _mean_std(s), f"{s['steps_mean']:.0f}") for s in summary]
    header = ("task", "T", "d_model", "variant", "spec", "state size", "seeds", "test accuracy", "steps (mean)")
    lines += [common.markdown_table(header, rows, "lrrllrrrr"), ""]
    for (task, seq_len), block in _by_task_length(summary).items():
      widths = sorted({s["d_model"] for s in block if s["d_model"] is not None})
      cells = {(s["variant"], s["d_model"]): _mean_std(s) for s in block}
      names = list(dict.fromkeys(s["variant"] for s in block))
      lines += [f"Test accuracy against width, {task} T={seq_len}:", ""]
      lines += [common.markdown_table(("variant", *(f"d_model={d}" for d in widths)),
                                      [(v, *(cells.get((v, d), "–") for d in widths)) for v in names],
                                      "l" + "r" * len(widths)), ""]
  return "\n".join(lines)


def _by_task_length(summary: list[dict]) -> dict[tuple[str, int], list[dict]]:
  out: dict[tuple[str, int], list[dict]] = {}
  for s in summary:
    out.setdefault((s["task"], s["seq_len"]), []).append(s)
  return out


def plot(results: dict, workdir: str) -> list[str]:
  """``accuracy_vs_length_<task>.png``: test accuracy (mean over seeds) against T, one line per variant, at the
  task's widest d_model (the other widths are in the tables and the state plots); and
  ``recall_vs_state_<task>_T<T>.png``: accuracy (mean, error bars: sample std over seeds) against the decoding
  state size (log scale), one line per variant through its widths (Zoology's Figure 3)."""
  paths = []
  summary = summarize(results["runs"])
  for task in dict.fromkeys(s["task"] for s in summary):
    rows = [s for s in summary if s["task"] == task]
    widths = {s["d_model"] for s in rows if s["d_model"] is not None}
    if widths:
      rows = [s for s in rows if s["d_model"] == max(widths)]
    series = {}
    for variant in dict.fromkeys(s["variant"] for s in rows):
      pts = sorted((s["seq_len"], s["accuracy_mean"]) for s in rows if s["variant"] == variant)
      series[variant] = ([t for t, _ in pts], [a for _, a in pts])
    fig, (ax,) = common.new_figure((5, 3.5))
    title = task if len(widths) < 2 else f"{task}, d_model={max(widths)}"
    common.line_plot(ax, series, xlabel="sequence length T", ylabel="test accuracy", title=title, ylim=(-0.02, 1.02),
                     fontsize=7)
    path = os.path.join(workdir, f"accuracy_vs_length_{task}.png")
    fig.savefig(path, dpi=120)
    paths.append(path)
  for (task, seq_len), block in _by_task_length(summary).items():
    block = [s for s in block if s["state_size"]]
    if not block:
      continue
    fig, (ax,) = common.new_figure((5.5, 3.8))
    for variant in dict.fromkeys(s["variant"] for s in block):
      pts = sorted((s["state_size"], s["accuracy_mean"], s["accuracy_std"]) for s in block if s["variant"] == variant)
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=3,
                  label=variant)
    ax.set(xscale="log", xlabel="state size (floats per layer)", ylabel="test accuracy", title=f"{task} T={seq_len}",
           ylim=(-0.02, 1.02))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path = os.path.join(workdir, f"recall_vs_state_{task}_T{seq_len}.png")
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def main(config: CompareConfig, workdir: str) -> None:
  logging.set_verbosity(logging.INFO)
  results = run_comparison(config, workdir, preset=flags.FLAGS.preset)
  print(markdown(results))
  print(f"wrote {workdir}/results.json, results.md, accuracy_vs_length_*.png and recall_vs_state_*.png")


if __name__ == "__main__":
  config_lib.run(main, CompareConfig, PRESETS, workdir=WORKDIR)
