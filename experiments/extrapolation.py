"""Length extrapolation: learned absolute positions vs ALiBi (``flex_attention`` score_mod) vs no positions.

  python -m experiments.extrapolation                        # default preset: ~3 min on 2 CPU cores
  python -m experiments.extrapolation --preset=smoke         # seconds; what the test runs
  python -m experiments.extrapolation --preset=full --workdir=docs/results/extrapolation   # 3 seeds, committed

Every position scheme trains the same small causal Transformer (experiments/models.py) at one length ``L`` and is
then tested, without further training, at ``L``, ``2L`` and ``4L``:

* ``learned`` -- softmax attention plus a learned absolute position table of ``4L`` rows (``max_len``); rows past
  ``L`` never receive a gradient (they keep their initialisation, shrunk only by AdamW's weight decay), which is
  the point: they are what the model meets at the longer lengths;
* ``alibi`` -- :func:`attention_jax.flex.flex_attention` with ``mods.alibi`` (``score - m_n |i - j|``, the paper's
  geometric slopes per head) as ``score_mod`` and ``mods.causal()`` as the block mask; no position embeddings
  (Press et al. 2022, "Train Short, Test Long");
* ``none`` -- softmax attention with no position information at all (NoPE; a causal mask alone still lets a
  model infer order, Haviv et al. 2022; Kazemnejad et al. 2023).

**Task: induction heads** (experiments/tasks.py, the Mamba paper's setting). Random tokens; a trigger token appears
once at a random position followed by a random token x, and again at the last position, where the target is x.
Solving it takes a previous-token head (attend to position ``i - 1``: a purely *relative* offset) feeding an
induction head (attend to the token after the earlier trigger: found by content, at any distance). The answer
stays well defined at every length -- the trigger occurs exactly twice, nothing else changes -- and the task's
statistics do not depend on the length except for how far back the first trigger lies, so a drop at ``2L`` /
``4L`` is a failure to generalise over positions, not a harder task. MQAR was not chosen: with a fixed number of
pairs its queries sit at lengths-dependent power-law gaps, and the copy task's answer offset grows with the
length. Accuracy is also reported by how far back the first trigger lies (in units of ``L``), which separates
"unseen absolute positions" from "unseen distances".

Outputs in ``--workdir``: ``results.json`` (config, machine, every run's accuracies), ``results.md`` (tables) and
``accuracy_vs_length.png`` (accuracy against the evaluation length, one line per scheme, mean over seeds).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from experiments import common, train
from experiments import config as config_lib
from experiments import tasks as tasks_lib
from experiments.config import setting
from experiments.models import TransformerLM

WORKDIR = "/tmp/attention_jax_extrapolation"   # --workdir's default
# scheme -> (attention variant of experiments/variants.py, position embeddings)
SCHEMES = {"learned": ("softmax", "learned"), "alibi": ("alibi", "none"), "none": ("nope", "none")}
LABELS = {"learned": "learned absolute positions", "alibi": "ALiBi (flex_attention)", "none": "no positions (NoPE)"}


@dataclasses.dataclass(frozen=True)
class Config:
  """Training length, the schemes and seeds compared, the model and its training."""
  train_len: int = setting(32, "L: the training sequence length.")
  eval_factors: tuple[int, ...] = setting((1, 2, 4), "Evaluation lengths as multiples of L.")
  schemes: tuple[str, ...] = setting(tuple(SCHEMES), "Position schemes.", choices=tuple(SCHEMES))
  seeds: tuple[int, ...] = setting((0,), "Seeds (parameters and data).")
  vocab_size: int = setting(16, "Induction-heads vocabulary (the last token is the trigger).")
  d_model: int = setting(64, "Model width.")
  num_heads: int = setting(2, "Heads per layer.")
  num_layers: int = setting(2, "Layers.")
  steps: int = setting(800, "Training steps.")
  batch_size: int = setting(64, "Training batch size.")
  lr: float = setting(3e-3, "Peak learning rate (AdamW, warmup + cosine, as experiments/train.py).")
  warmup_steps: int = setting(50, "Warm-up steps.")
  eval_batches: int = setting(4, "Test batches per evaluation length.")
  eval_batch_size: int = setting(256, "Test batch size.")
  alibi_implementation: str | None = setting(None, "flex_attention implementation for ALiBi (default: the "
                                                   "backend's kernel, then blockwise).")
  log_every: int = setting(200, "Progress line every this many steps.")


PRESETS = {
    "smoke": dict(train_len=8, steps=4, d_model=16, num_layers=1, batch_size=8, warmup_steps=1, eval_batches=1,
                  eval_batch_size=16, log_every=2),
    "default": {},
    "full": dict(seeds=(0, 1, 2)),
}


def _loss_and_accuracy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over the target positions, and each example's correctness ``[B]`` (the
  induction task has one target per example)."""
  valid = targets_BT != tasks_lib.IGNORE
  safe = jnp.where(valid, targets_BT, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), safe)
  n = jnp.maximum(valid.sum(), 1)
  right = valid & (logits_BTV.argmax(-1) == safe)
  per_example = right.sum(-1) / jnp.maximum(valid.sum(-1), 1)
  return jnp.where(valid, ce, 0.0).sum() / n, right.sum() / n, per_example


def make_model(config: Config, scheme: str, seed: int) -> TransformerLM:
  variant, positions = SCHEMES[scheme]
  if scheme == "alibi" and config.alibi_implementation:
    variant = f"alibi:{config.alibi_implementation}"
  max_len = config.train_len * max(config.eval_factors)   # the learned table covers the longest evaluation
  return TransformerLM(config.vocab_size, config.d_model, config.num_heads, config.num_layers, max_len,
                       attention=variant, causal=True, positions=positions, rngs=nnx.Rngs(seed))


def _trigger_distance(inputs_BT: np.ndarray, trigger: int) -> np.ndarray:
  """How far back the first trigger lies from the last position (the query): ``T - 1 - first``."""
  T = inputs_BT.shape[1]
  return T - 1 - np.argmax(inputs_BT == trigger, axis=1)


def train_and_test(config: Config, scheme: str, seed: int) -> dict:
  """Trains one scheme at ``L``, tests it at every ``k L``; returns the run's record."""
  task = tasks_lib.make_task("induction", vocab_size=config.vocab_size, seq_len=config.train_len)
  model = make_model(config, scheme, seed)
  graphdef, params = nnx.split(model)
  tc = train.TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps)
  tx = train.make_optimizer(tc)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    loss, acc, _ = _loss_and_accuracy(nnx.merge(graphdef, params)(batch["inputs"]), batch["targets"])
    return loss, acc

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  @jax.jit
  def eval_step(params, batch):
    return _loss_and_accuracy(nnx.merge(graphdef, params)(batch["inputs"]), batch["targets"])

  t0 = time.time()
  losses, curve = [], []
  for step in range(1, config.steps + 1):
    params, opt_state, loss, acc = train_step(params, opt_state, task.batch(seed, step - 1, config.batch_size))
    losses.append(loss)
    if step % config.log_every == 0 or step == config.steps:
      mean = float(np.mean(losses))
      curve.append(dict(step=step, train_loss=mean))
      sps = step / max(time.time() - t0, 1e-9)
      logging.info("%s seed %d step %d/%d  loss %.4f  acc %.3f  %.1f steps/s", scheme, seed, step, config.steps, mean,
                   float(acc), sps)
      losses = []
  train_s = time.time() - t0
  L, trigger = config.train_len, config.vocab_size - 1
  lengths, accuracy, loss, by_position, by_distance = [], [], [], {}, {}
  for factor in config.eval_factors:
    T = factor * L
    test = tasks_lib.make_task("induction", vocab_size=config.vocab_size, seq_len=T)
    right, dist, ls = [], [], []
    for i in range(config.eval_batches):
      batch = test.batch(seed, i, config.eval_batch_size, "test")
      b_loss, _, per_example = eval_step(params, batch)
      right.append(np.asarray(per_example))
      dist.append(_trigger_distance(batch["inputs"], trigger))
      ls.append(float(b_loss))
    right, dist = np.concatenate(right), np.concatenate(dist)
    lengths.append(T)
    accuracy.append(float(right.mean()))
    loss.append(float(np.mean(ls)))
    # Accuracy by where the first trigger lies (position, and distance back from the query), in units of L.
    by_position[str(T)] = _binned(right, T - 1 - dist, L, factor)
    by_distance[str(T)] = _binned(right, dist, L, factor)
    logging.info("%s seed %d: test accuracy %.3f at T=%d", scheme, seed, accuracy[-1], T)
  return dict(scheme=scheme, variant=SCHEMES[scheme][0], positions=SCHEMES[scheme][1], seed=seed, lengths=lengths,
              accuracy=accuracy, loss=loss, accuracy_by_position=by_position,
              accuracy_by_distance=by_distance, train_curve=curve, train_s=train_s,
              steps_per_sec=config.steps / max(train_s, 1e-9))


def _binned(right: np.ndarray, where: np.ndarray, L: int, factor: int) -> dict:
  """Accuracy and count of the examples whose ``where`` lies in ``[lo L, hi L)``, per bin of :func:`_bins`."""
  out = {}
  for lo, hi in _bins(factor):
    sel = (where >= lo * L) & (where < hi * L)
    if sel.any():
      out[f"{lo}-{hi}L"] = dict(accuracy=float(right[sel].mean()), count=int(sel.sum()))
  return out


def _bins(factor: int) -> list[tuple[int, int]]:
  """``[(0, 1), (1, 2), (2, 4), (4, 8), ...]`` (in units of L) up to ``factor``."""
  edges = [0, 1] + [2 ** i for i in range(1, max(factor, 1).bit_length() + 1)]
  edges = [e for e in edges if e <= factor] + ([factor] if factor not in edges else [])
  return [(a, b) for a, b in zip(edges, edges[1:])]


def summarize(results: dict) -> dict:
  """Per scheme: the evaluation lengths and the accuracy per length, mean / min / max over seeds."""
  out = {}
  for scheme in dict.fromkeys(r["scheme"] for r in results["runs"]):
    runs = [r for r in results["runs"] if r["scheme"] == scheme]
    acc = np.array([r["accuracy"] for r in runs])
    out[scheme] = dict(lengths=runs[0]["lengths"], mean=acc.mean(0).tolist(), min=acc.min(0).tolist(),
                       max=acc.max(0).tolist(), seeds=[r["seed"] for r in runs])
  return out


def markdown(results: dict) -> str:
  config = results["config"]
  L = config["train_len"]
  summary = results["summary"]
  lines = [f"Induction heads (vocabulary {config['vocab_size']}), trained at L = {L} for {config['steps']} steps, "
           f"tested at {', '.join(str(f * L) for f in config['eval_factors'])}; "
           f"{len(config['seeds'])} seed(s) {list(config['seeds'])}; {results['date']}, jax {results['jax']} "
           f"({results['backend']}: {results['device_kind']}), wall time {results['wall_s'] / 60:.1f} min. "
           f"Test accuracy (chance {1 / (config['vocab_size'] - 1):.3f}); with several seeds: mean [min–max].", ""]
  lengths = next(iter(summary.values()))["lengths"] if summary else []
  header = ("positions", "attention") + tuple(f"T = {T}" + (" (= L)" if T == L else f" ({T // L}L)")
                                              for T in lengths)
  variants = {r["scheme"]: r["variant"] for r in results["runs"]}

  def cell(s, i):
    if len(s["seeds"]) == 1:
      return f"{s['mean'][i]:.3f}"
    return f"{s['mean'][i]:.3f} [{s['min'][i]:.3f}–{s['max'][i]:.3f}]"
  rows = [(scheme, f"`{variants[scheme]}`", *(cell(s, i) for i in range(len(lengths))))
          for scheme, s in summary.items()]
  lines.append(common.markdown_table(header, rows, "ll" + "r" * len(lengths)))
  # Accuracy by where the first trigger lies, at the longest length (mean over seeds).
  if lengths:
    T = str(lengths[-1])
    for key, what, col in (("accuracy_by_position", "the position of the first trigger", "position"),
                           ("accuracy_by_distance", "the distance from the query back to the first trigger",
                            "distance")):
      bins = list(next(iter(results["runs"]))[key][T])
      rows = []
      for scheme in summary:
        runs = [r for r in results["runs"] if r["scheme"] == scheme]
        rows.append((scheme, *(f"{np.mean([r[key][T][b]['accuracy'] for r in runs]):.3f}"
                               if all(b in r[key][T] for r in runs) else "–" for b in bins)))
      lines += ["", f"At T = {T}: accuracy by {what} (in units of L):", "",
                common.markdown_table(("positions",) + tuple(f"{col} {b}" for b in bins), rows,
                                      "l" + "r" * len(bins))]
  speed = ", ".join(f"{r['scheme']} (seed {r['seed']}) {r['steps_per_sec']:.1f}" for r in results["runs"])
  lines += ["", f"Training steps/s: {speed}."]
  return "\n".join(lines) + "\n"


def plot(results: dict, workdir: str) -> str:
  """``accuracy_vs_length.png``: test accuracy (mean over seeds, shaded min-max) against the evaluation length,
  one line per scheme; dotted: the training length, dashed: chance."""
  L = results["config"]["train_len"]
  series = {LABELS.get(scheme, scheme): (s["lengths"], s["mean"]) for scheme, s in results["summary"].items()}
  fig, (ax,) = common.new_figure((5, 3.5))
  common.line_plot(ax, series, xlabel="evaluation length T", ylabel="test accuracy",
                   title=f"induction heads, trained at L = {L}", ylim=(-0.02, 1.02))
  for line, s in zip(ax.lines, results["summary"].values()):   # the spread over seeds
    if len(s["seeds"]) > 1:
      ax.fill_between(s["lengths"], s["min"], s["max"], color=line.get_color(), alpha=0.2, linewidth=0)
  ax.axvline(L, color="gray", linestyle=":", linewidth=1)
  ax.axhline(1 / (results["config"]["vocab_size"] - 1), color="gray", linestyle="--", linewidth=1)
  lengths = next(iter(results["summary"].values()))["lengths"]
  ax.set_xticks(lengths, [str(T) for T in lengths])
  ax.minorticks_off()
  path = os.path.join(workdir, "accuracy_vs_length.png")
  fig.savefig(path, dpi=120)
  return path


def write_outputs(results: dict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  results["summary"] = summarize(results)
  common.write_json(os.path.join(workdir, "results.json"), results)
  common.write_text(os.path.join(workdir, "results.md"), markdown(results))
  plot(results, workdir)


def train_and_evaluate(config: Config, workdir: str | os.PathLike) -> dict:
  """Every scheme x seed: train at L, test at each k L; writes results.json, results.md and the plot."""
  workdir = os.fspath(workdir)
  logging.set_verbosity(logging.INFO)
  t0 = time.time()
  results = dict(config=dataclasses.asdict(config), runs=[], **common.run_metadata())
  for seed in config.seeds:
    for scheme in config.schemes:
      results["runs"].append(train_and_test(config, scheme, seed))
      results["wall_s"] = time.time() - t0
      write_outputs(results, workdir)
  print(markdown(results))
  print(f"wrote {workdir}/results.json, results.md and accuracy_vs_length.png")
  return results


if __name__ == "__main__":
  config_lib.run(train_and_evaluate, Config, PRESETS, workdir=WORKDIR)
