"""Training loop for the synthetic tasks: optax AdamW with warmup + cosine decay and gradient clipping, a
jitted train step, periodic evaluation, JSON-lines metrics and progress lines (steps/s, ETA) via absl logging.

``train_and_evaluate(config, workdir)`` is what scripts and tests call; it returns a :class:`TrainResult`
with the trained model and the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from experiments import common
from experiments import tasks as tasks_lib
from experiments.models import TransformerLM


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run; compare.py and analyze_heads.py build it from their own configs."""
  task: str = "mqar"
  task_kwargs: dict = dataclasses.field(default_factory=dict)
  variant: str = "softmax"
  d_model: int = 128
  num_heads: int = 2
  num_layers: int = 2
  num_kv_heads: int | None = None
  steps: int = 2000
  batch_size: int = 64
  lr: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  eval_every: int = 500
  eval_batches: int = 4
  eval_batch_size: int = 128
  log_every: int = 100
  seed: int = 0
  target_accuracy: float | None = None   # stop early once eval accuracy reaches this (steps are reported)


class TrainResult(NamedTuple):
  model: Any
  metrics: dict          # final eval metrics plus run statistics
  history: list          # every logged record


def _loss_and_accuracy(logits, batch):
  """Masked mean cross-entropy and accuracy (per target token, or per example for classification)."""
  if "label" in batch:
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = (logits.argmax(-1) == labels).mean()
    return loss, acc
  targets = batch["targets"]
  valid = targets != tasks_lib.IGNORE
  safe = jnp.where(valid, targets, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  n = jnp.maximum(valid.sum(), 1)
  loss = jnp.where(valid, ce, 0.0).sum() / n
  acc = jnp.where(valid, logits.argmax(-1) == safe, False).sum() / n
  return loss, acc


def make_model(config: TrainConfig, task) -> TransformerLM:
  causal = task.num_classes is None
  return TransformerLM(task.vocab_size, config.d_model, config.num_heads, config.num_layers, task.seq_len,
                       attention=config.variant, causal=causal, num_kv_heads=config.num_kv_heads,
                       num_classes=task.num_classes, rngs=nnx.Rngs(config.seed))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, min(config.warmup_steps, max(config.steps - 1, 1)),
                                                max(config.steps, 2), end_value=0.1 * config.lr)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)   # no decay on biases / norms
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=config.weight_decay, mask=decay_mask))


def train_and_evaluate(config: TrainConfig, workdir: str | None = None) -> TrainResult:
  """Trains ``config.variant`` on ``config.task``; writes config.json and metrics.jsonl into ``workdir``."""
  task = tasks_lib.make_task(config.task, **config.task_kwargs)
  model = make_model(config, task)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(config)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"])
    return _loss_and_accuracy(logits, batch)

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return optax.apply_updates(params, updates), opt_state, loss, acc, grad_norm

  eval_step = jax.jit(loss_fn)

  def evaluate(params):
    out = [eval_step(params, task.batch(config.seed, i, config.eval_batch_size, "test"))
           for i in range(config.eval_batches)]
    return {"loss": float(np.mean([o[0] for o in out])), "accuracy": float(np.mean([o[1] for o in out]))}

  history, log_file = [], None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    common.write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(config))
    log_file = open(os.path.join(workdir, "metrics.jsonl"), "w")

  def record(entry):
    history.append(entry)
    if log_file:
      log_file.write(json.dumps(entry) + "\n")
      log_file.flush()

  first = task.batch(config.seed, 0, config.batch_size)
  compiled = train_step.lower(params, opt_state, first).compile()
  step_memory_mb = common.compiled_memory_mb(compiled)
  t_start = time.time()
  t_window, window_steps, step = time.time(), 0, 0
  losses, accs = [], []
  final_eval = None
  for step in range(1, config.steps + 1):
    batch = first if step == 1 else task.batch(config.seed, step - 1, config.batch_size)
    params, opt_state, loss, acc, gnorm = compiled(params, opt_state, batch)
    losses.append(loss)
    accs.append(acc)
    window_steps += 1
    if step % config.log_every == 0 or step == config.steps:
      jax.block_until_ready(loss)
      now = time.time()
      sps = window_steps / max(now - t_window, 1e-9)
      entry = dict(step=step, split="train", loss=float(np.mean(losses)), accuracy=float(np.mean(accs)),
                   grad_norm=float(gnorm), steps_per_sec=sps, elapsed_s=now - t_start)
      record(entry)
      eta = (config.steps - step) / max(sps, 1e-9)
      logging.info("%s/%s %s step %d/%d  loss %.4f  acc %.3f  %.1f steps/s  ETA %.0fs", config.task,
                   config.variant, config.task_kwargs, step, config.steps, entry["loss"], entry["accuracy"], sps, eta)
      losses, accs, t_window, window_steps = [], [], time.time(), 0
    if step % config.eval_every == 0 or step == config.steps:
      final_eval = evaluate(params)
      record(dict(step=step, split="eval", **final_eval, elapsed_s=time.time() - t_start))
      logging.info("%s/%s eval step %d  loss %.4f  acc %.3f", config.task, config.variant, step,
                   final_eval["loss"], final_eval["accuracy"])
      if config.target_accuracy is not None and final_eval["accuracy"] >= config.target_accuracy:
        break
  wall = time.time() - t_start
  if log_file:
    log_file.close()
  train_records = [h for h in history if h["split"] == "train"]
  metrics = dict(final_eval or {}, steps=step, wall_s=wall, steps_per_sec=step / max(wall, 1e-9),
                 step_memory_mb=step_memory_mb,
                 first_train_loss=train_records[0]["loss"] if train_records else None,
                 last_train_loss=train_records[-1]["loss"] if train_records else None)
  return TrainResult(nnx.merge(graphdef, params), metrics, history)
