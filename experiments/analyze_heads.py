"""What each head learns: train a small Transformer on induction heads (or MQAR), then measure and plot its heads.

Training is ``experiments/train.py`` on ``experiments/tasks.py``'s task with the softmax ``TransformerLM``. The
heads are then read on two kinds of input:

* **repeated random sequences** — ``P`` distinct random tokens, then the same ``P`` tokens again (Olsson et al.
  2022). On these, :mod:`attention_jax.viz` computes per head: entropy, previous-token score, induction score
  (attention from a token in the second copy to the token after its first occurrence) and mean attention
  distance, averaged over ``num_sequences`` sequences. Reference values for a uniform causal head (attending
  equally to every visible position) are computed by the same functions.
* **task examples** (test split) — the *answer attention*: at each position that carries a loss (the second
  trigger of the induction task, the queried key of MQAR), the weight on the token after the earlier occurrence of
  the current token, i.e. on the answer. A head that solves the task by induction puts most weight there.

  python -m experiments.analyze_heads --workdir=/tmp/heads                  # default: a few minutes on 2 cores
  python -m experiments.analyze_heads --task=mqar --seq_len=64 --workdir=/tmp/heads_mqar
  python -m experiments.analyze_heads --workdir=/tmp/heads --reuse              # re-analyse the saved model

Writes ``train/`` (train.py's config and metrics, and the parameters ``params.msgpack``, which ``--reuse``
analyses again without training), ``head_stats.json``, ``head_stats.md``,
``heads_layer<l>.png`` (repeated sequence) and ``task_heads_layer<l>.png`` (one task example).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from attention_jax import viz
from experiments import common
from experiments import config as config_lib
from experiments import tasks as tasks_lib
from experiments import train as train_lib
from experiments.config import setting

STATS = ("entropy", "previous_token", "induction", "distance")
WORKDIR = "/tmp/analyze_heads"   # --workdir's default


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  task: str = setting("induction", "Task to train on.", choices=("induction", "mqar"))
  seq_len: int = setting(32, "Task sequence length.")
  vocab_size: int | None = setting(None, "Task vocabulary (default: 16 for induction, the Mamba setting; "
                                         "max(128, 2 T) for MQAR).")
  num_kv_pairs: int = setting(4, "MQAR key-value pairs.")
  d_model: int = setting(64, "Model width.")
  num_heads: int = setting(2, "Heads per layer.")
  num_layers: int = setting(2, "Layers.")
  steps: int = setting(2000, "Training steps.")
  batch_size: int = setting(64, "Batch size.")
  lr: float = setting(3e-3, "Peak learning rate.")
  seed: int = setting(0, "Seed (parameters, data).")
  period: int | None = setting(None, "Repeated-sequence period P (default: as long as distinct tokens allow).")
  num_sequences: int = setting(64, "Repeated sequences averaged over.")
  eval_batches: int = setting(2, "Task test batches (of 128) for the answer attention.")
  reuse: bool = setting(False, "Analyse the model a previous run saved in --workdir instead of training one.")


PRESETS = {
    "smoke": dict(seq_len=16, d_model=16, num_heads=2, num_layers=2, steps=6, batch_size=8, num_sequences=4,
                  eval_batches=1),
    "default": {},
}


def vocab_size(config: HeadsConfig) -> int:
  if config.vocab_size is not None:
    return config.vocab_size
  return 16 if config.task == "induction" else max(128, 2 * config.seq_len)


def task_kwargs(config: HeadsConfig) -> dict:
  if config.task == "induction":
    return dict(vocab_size=vocab_size(config), seq_len=config.seq_len)
  if config.task == "mqar":
    return dict(vocab_size=vocab_size(config), seq_len=config.seq_len, num_kv_pairs=config.num_kv_pairs)
  raise ValueError(f"analyze_heads: task must be 'induction' or 'mqar'; got {config.task!r}")


def token_range(config: HeadsConfig) -> tuple[int, int]:
  """Tokens the repeated sequences are drawn from: the induction task's non-trigger tokens, MQAR's keys."""
  if config.task == "induction":
    return 0, vocab_size(config) - 1
  return 1, vocab_size(config) // 2


def repeated_random_tokens(seed: int, batch: int, period: int, low: int, high: int) -> np.ndarray:
  """``[batch, 2 * period]``: ``period`` distinct tokens from ``[low, high)``, then the same tokens again."""
  if period > high - low:
    raise ValueError(f"period={period} needs that many distinct tokens; [low, high) = [{low}, {high}) has {high - low}")
  rng = np.random.default_rng(seed)
  first = low + np.argsort(rng.random((batch, high - low)), axis=1)[:, :period]
  return np.concatenate([first, first], axis=1).astype(np.int32)


def context_len(config: HeadsConfig) -> int | None:
  """Positions that hold MQAR's key-value pairs (None for the induction task)."""
  return 2 * config.num_kv_pairs if config.task == "mqar" else None


def default_period(config: HeadsConfig) -> int:
  low, high = token_range(config)
  return config.period or min(config.seq_len // 2, high - low)


def attention_weights(model, tokens_BT: jax.typing.ArrayLike) -> jax.Array:
  """Every layer's attention ``[L, B, N, T, T]`` for ``tokens [B, T]``."""
  _, weights = model(jnp.asarray(tokens_BT), return_attention=True)
  return jnp.stack(weights)


def induction_attention(weights_LBNTT: jax.Array, tokens_BT: jax.Array, query_BT: jax.Array) -> jax.Array:
  """Mean over the queries marked in ``query_BT`` of the weight on the token after the query token's latest
  earlier occurrence (queries whose token is new are skipped): ``[L, B, N, T, T] -> [L, N]``.

  With ``query_BT`` the loss positions of a task example this is the *answer attention*; with all positions of
  a repeated random sequence it is the induction score of :func:`attention_jax.viz.induction_score`.
  """
  target_BT, seen_BT = viz.induction_targets(tokens_BT)
  T = tokens_BT.shape[-1]
  L, B, N = weights_LBNTT.shape[:3]
  idx = jnp.broadcast_to(jnp.minimum(target_BT, T - 1)[None, :, None, :, None], (L, B, N, T, 1))
  picked_LBNT = jnp.take_along_axis(weights_LBNTT, idx, axis=-1)[..., 0]
  use_BT = (seen_BT & query_BT).astype(picked_LBNT.dtype)
  use = jnp.broadcast_to(use_BT[None, :, None, :], picked_LBNT.shape)
  return (picked_LBNT * use).sum((1, 3)) / jnp.maximum(use.sum((1, 3)), 1.0)


def uniform_causal_reference(tokens_BT: np.ndarray) -> dict[str, float]:
  """The statistics of a head attending uniformly to every visible (causal) position, on the same tokens."""
  T = tokens_BT.shape[-1]
  w_TT = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  stats = viz.head_statistics(np.broadcast_to(w_TT, tokens_BT.shape[:1] + (T, T)), tokens_BT)
  return {k: float(np.mean(v)) for k, v in stats.items()}


def analyze(model, config: HeadsConfig, task) -> dict:
  """Head statistics on repeated random sequences and answer attention on task examples (see module docstring)."""
  period = default_period(config)
  low, high = token_range(config)
  rep_BT = repeated_random_tokens(config.seed + 1, config.num_sequences, period, low, high)
  w_rep = attention_weights(model, rep_BT)                                    # [L, B, N, T, T]
  per_sequence = viz.head_statistics(jnp.swapaxes(w_rep, 0, 1), rep_BT)        # each [B, L, N]
  stats = {k: np.asarray(v).mean(axis=0) for k, v in per_sequence.items()}
  answer = []
  for i in range(config.eval_batches):
    batch = task.batch(config.seed, i, 128, "test")
    tokens = jnp.asarray(batch["inputs"])
    answer.append(np.asarray(induction_attention(attention_weights(model, tokens), tokens,
                                                 jnp.asarray(batch["targets"] != tasks_lib.IGNORE))))
  stats["answer_attention"] = np.mean(answer, axis=0)
  context = context_len(config)
  if context:   # MQAR keeps its key-value pairs in the first `context` positions
    target_BT, _ = viz.induction_targets(jnp.asarray(rep_BT))
    stats["induction_in_context"] = np.asarray(induction_attention(w_rep, jnp.asarray(rep_BT), target_BT < context))
    stats["induction_beyond_context"] = np.asarray(
        induction_attention(w_rep, jnp.asarray(rep_BT), target_BT >= context))
  L, N = stats["entropy"].shape
  heads = [dict(layer=l, head=n, **{k: float(v[l, n]) for k, v in stats.items()}) for l in range(L)
           for n in range(N)]
  return dict(period=period, context_len=context, repeated_tokens_example=rep_BT[0].tolist(), heads=heads,
              uniform_causal=uniform_causal_reference(rep_BT))


def markdown_table(result: dict, metrics: dict) -> str:
  u, context = result["uniform_causal"], result["context_len"]
  split = [f"induction, target < {context}", f"induction, target ≥ {context}"] if context else []
  columns = ["entropy (nats)", "previous-token", "induction", *split, "distance", "answer attention"]
  intro = (f"Repeated random sequences of period P = {result['period']} (length {2 * result['period']}); "
           f"answer attention on task test examples. Task test accuracy after training: "
           f"{100 * metrics.get('accuracy', float('nan')):.1f}% ({metrics.get('steps')} steps).")
  rows = []
  for h in result["heads"]:
    split_cells = [f"{h['induction_in_context']:.3f}", f"{h['induction_beyond_context']:.3f}"] if context else []
    rows.append([h["layer"], h["head"], f"{h['entropy']:.2f}", f"{h['previous_token']:.3f}", f"{h['induction']:.3f}",
                 *split_cells, f"{h['distance']:.1f}", f"{h['answer_attention']:.3f}"])
  rows.append(["uniform causal head", "–", f"{u['entropy']:.2f}", f"{u['previous_token']:.3f}",
               f"{u['induction']:.3f}", *(["–"] * len(split)), f"{u['distance']:.1f}", "–"])
  table = common.markdown_table(["layer", "head", *columns], rows, "r" * (len(columns) + 2))
  return intro + "\n\n" + table + "\n"


def head_title(h: dict) -> str:
  return (f"L{h['layer']} H{h['head']}: ent {h['entropy']:.2f}, prev {h['previous_token']:.2f}\n"
          f"ind {h['induction']:.2f}, dist {h['distance']:.1f}")


def plot(model, result: dict, config: HeadsConfig, task, workdir: str) -> list[str]:
  """Per layer: heads on one repeated sequence (titles: statistics over all sequences) and on one task example."""
  paths = []
  rep = np.asarray([result["repeated_tokens_example"]])
  w_rep = np.asarray(attention_weights(model, rep))[:, 0]                      # [L, N, T, T]
  example = task.batch(config.seed, 0, 1, "test")["inputs"]
  w_task = np.asarray(attention_weights(model, example))[:, 0]
  for l in range(w_rep.shape[0]):
    heads = [h for h in result["heads"] if h["layer"] == l]
    path = os.path.join(workdir, f"heads_layer{l}.png")
    viz.plot_heads(w_rep[l], rep[0], titles=[head_title(h) for h in heads], save=path,
                   suptitle=f"Layer {l} on a repeated random sequence (P = {result['period']})")
    paths.append(path)
    path = os.path.join(workdir, f"task_heads_layer{l}.png")
    viz.plot_heads(w_task[l], example[0], titles=[f"L{l} H{h['head']}: answer attn {h['answer_attention']:.2f}"
                                                  for h in heads], save=path,
                   suptitle=f"Layer {l} on a {config.task} test example")
    paths.append(path)
  return paths


def train_config(config: HeadsConfig) -> train_lib.TrainConfig:
  return train_lib.TrainConfig(
      task=config.task, task_kwargs=task_kwargs(config), variant="softmax", d_model=config.d_model,
      num_heads=config.num_heads, num_layers=config.num_layers, steps=config.steps, batch_size=config.batch_size,
      lr=config.lr, warmup_steps=min(100, max(config.steps // 10, 1)), eval_every=max(config.steps // 4, 1),
      eval_batches=config.eval_batches, eval_batch_size=128, log_every=max(config.steps // 10, 1), seed=config.seed)


def save_params(model, path: str) -> None:
  with open(path, "wb") as f:
    f.write(serialization.to_bytes(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def load_model(config: HeadsConfig, task, path: str):
  """A model built for ``config`` with the parameters saved by :func:`save_params`."""
  model = train_lib.make_model(train_config(config), task)
  state = nnx.state(model, nnx.Param)
  with open(path, "rb") as f:
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), f.read()))
  nnx.update(model, state)
  return model


def train_or_load(config: HeadsConfig, task, workdir: str | os.PathLike):
  """Trains (train.py) and saves the model into ``workdir``/train, or with ``config.reuse`` loads the one a
  previous run saved there."""
  train_dir = os.path.join(workdir, "train")
  checkpoint = os.path.join(train_dir, "params.msgpack")
  if config.reuse:
    saved = common.read_json(os.path.join(train_dir, "config.json"))
    if saved != json.loads(json.dumps(dataclasses.asdict(train_config(config)))):
      raise ValueError(f"--reuse: {train_dir}/config.json was written for another configuration: {saved}")
    with open(os.path.join(train_dir, "metrics.jsonl")) as f:
      evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    return load_model(config, task, checkpoint), dict(evals[-1], steps=evals[-1]["step"])
  trained = train_lib.train_and_evaluate(train_config(config), train_dir)
  save_params(trained.model, checkpoint)
  return trained.model, trained.metrics


def train_and_evaluate(config: HeadsConfig, workdir: str | os.PathLike, verbose: bool = True) -> dict:
  """Trains (or with ``config.reuse`` reloads) the model, analyses its heads, writes the tables and plots into
  ``workdir``; returns the results."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  task = tasks_lib.make_task(config.task, **task_kwargs(config))
  model, train_metrics = train_or_load(config, task, workdir)
  result = analyze(model, config, task)
  plots = plot(model, result, config, task, workdir)
  wall_s = time.perf_counter() - t0
  metrics = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, type(None)))}
  out = dict(config=dataclasses.asdict(config), train_metrics=metrics, wall_s=wall_s, **common.run_metadata(),
             **result)
  common.write_json(os.path.join(workdir, "head_stats.json"), out)
  table = markdown_table(result, metrics)
  common.write_text(os.path.join(workdir, "head_stats.md"), table)
  if verbose:
    print(table)
    print(f"wall time {wall_s:.0f}s; wrote {', '.join(os.path.basename(p) for p in plots)} to {workdir}")
  return out


if __name__ == "__main__":
  config_lib.run(train_and_evaluate, HeadsConfig, PRESETS, workdir=WORKDIR)
