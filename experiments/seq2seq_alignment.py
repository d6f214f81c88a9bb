"""RNN encoder-decoder on sequence reversal: the fixed-vector bottleneck vs Bahdanau and Luong attention.

Task: a source of L random symbols (lengths drawn uniformly from ``[min_len, max_len]``, padded) is mapped to
the same symbols reversed, then ``<eos>``. Reversal makes the ideal alignment the anti-diagonal: output step t
copies source position ``L - 1 - t``.

Model (Flax NNX): a bidirectional GRU (or LSTM) encoder with ``hidden / 2`` units per direction, so every
source state ``h̄_s`` has ``hidden`` features, and a ``hidden``-unit decoder initialised from
``tanh(W [h→_last; h←_first])``. The decoder differs by ``--attention``:

* ``none``          Cho et al. 2014: the fixed summary ``c = [h→_last; h←_first]`` is the decoder's only view of the
                    source, fed at every step: ``s_t = RNN(s_{t-1}, [y_{t-1}; c])``, output from ``[s_t; c]``.
* ``bahdanau``      Bahdanau et al. 2015: ``e_ts = vᵀ tanh(W s_{t-1} + U h̄_s)`` scored from the *previous* decoder
                    state (``U h̄_s`` projected once per sequence), ``c_t = Σ_s α_ts h̄_s``,
                    ``s_t = RNN(s_{t-1}, [y_{t-1}; c_t])``, output from ``[s_t; c_t]``.
* ``luong_dot`` / ``luong_general`` / ``luong_concat``   Luong et al. 2015: ``h_t = RNN(h_{t-1}, [y_{t-1}; h̃_{t-1}])``
                    (input feeding), then score the *current* state ``h_t`` (``h_tᵀ h̄_s``, ``h_tᵀ W h̄_s`` or
                    ``vᵀ tanh(W h_t + U h̄_s)``), ``c_t = Σ_s α_ts h̄_s``, the attentional state
                    ``h̃_t = tanh(W_c [c_t; h_t])``, output from ``h̃_t``.

Attention uses :class:`attention_jax.nn.AdditiveAttention` / :class:`attention_jax.nn.LuongAttention` (built on
:mod:`attention_jax.scores`), with padded source positions masked out. Training: teacher forcing, token
cross-entropy, Adam with gradient clipping; batches are generated on device inside the jitted train step.
Evaluation: greedy decoding on fresh sequences of each length; a sequence counts as correct only if every
symbol and the ``<eos>`` are right. The alignment accuracy is the fraction of output symbols whose largest
attention weight sits on the anti-diagonal source position.

  python -m experiments.seq2seq_alignment --workdir=/tmp/seq2seq                  # default: a few minutes
  python -m experiments.seq2seq_alignment --preset=full --workdir=docs/seq2seq    # the committed results

Settings: :class:`Config` and its ``PRESETS`` (experiments/config.py); every field is a flag, and ``--workdir``
(default ``WORKDIR``) says where the outputs go.

Writes ``config.json``, ``train_log.jsonl``, ``results.json`` (one row per attention/seed/length),
``results.md`` (tables), ``accuracy_vs_length.png``, ``alignment_<attention>.png`` and ``alignments.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attention_jax as aj
from experiments import common
from experiments import config as config_lib
from experiments.config import setting

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
ATTENTIONS = ("none", "bahdanau", "luong_dot", "luong_general", "luong_concat")
CELLS = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell}
WORKDIR = "/tmp/seq2seq_alignment"   # --workdir's default


@dataclasses.dataclass(frozen=True)
class Config:
  attentions: tuple[str, ...] = setting(ATTENTIONS, "Attention kinds to train.", choices=ATTENTIONS)
  cell: str = setting("gru", "Recurrent cell.", choices=tuple(CELLS))
  num_symbols: int = setting(16, "Vocabulary of the sequences (plus PAD, BOS, EOS).")
  min_len: int = setting(4, "Shortest training sequence.")
  max_len: int = setting(24, "Longest training sequence.")
  embed_dim: int = setting(32, "Token embedding width.")
  hidden: int = setting(64, "Decoder units (encoder: hidden / 2 per direction).")
  attn_dim: int = setting(64, "Additive / concat score width.")
  batch_size: int = setting(64, "Batch size.")
  steps: int = setting(1000, "Training steps per model.", aliases=("num_steps",))
  lr: float = setting(3e-3, "Adam learning rate.", aliases=("learning_rate",))
  grad_clip: float = setting(1.0, "Global gradient-norm clip.")
  seeds: tuple[int, ...] = setting((0,), "Seeds (parameter init and data).")
  eval_lengths: tuple[int, ...] | None = setting(None, "Lengths to evaluate (default: min_len..max_len).")
  eval_examples: int = setting(256, "Fresh sequences per evaluated length.")
  heatmap_length: int = setting(12, "Source length of the alignment heatmaps.")
  log_every: int = setting(250, "Steps between loss log lines.")


PRESETS = {
    "smoke": dict(attentions=("none", "bahdanau"), num_symbols=8, min_len=2, max_len=6, embed_dim=8, hidden=16,
                  attn_dim=16, batch_size=16, steps=30, eval_examples=16, heatmap_length=5, log_every=10),
    "default": {},
    "full": dict(max_len=30, steps=1500, seeds=(0, 1), eval_examples=512, heatmap_length=16, log_every=500),
}


def eval_lengths(config: Config) -> tuple[int, ...]:
  return config.eval_lengths or tuple(range(config.min_len, config.max_len + 1))


# ----------------------------------------------------------------------------------------------------------
# Data: sequence reversal, generated on device
# ----------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
  src: jax.Array        # [B, W]     symbols, PAD after the length
  tgt_in: jax.Array     # [B, W + 1] BOS, reversed symbols (teacher forcing input)
  tgt_out: jax.Array    # [B, W + 1] reversed symbols, EOS, PAD
  lengths: jax.Array    # [B]


def make_batch(key: jax.Array, batch_size: int, min_len, max_len, num_symbols: int, width: int) -> Batch:
  """Random reversal examples with lengths uniform in ``[min_len, max_len]`` (may be traced), padded to ``width``."""
  k_len, k_sym = jax.random.split(key)
  lengths_B = jax.random.randint(k_len, (batch_size,), min_len, max_len + 1)
  sym_BW = jax.random.randint(k_sym, (batch_size, width), NUM_SPECIAL, NUM_SPECIAL + num_symbols)
  pos_W = jnp.arange(width)[None, :]
  len_B1 = lengths_B[:, None]
  src = jnp.where(pos_W < len_B1, sym_BW, PAD)
  reversed_BW = jnp.take_along_axis(sym_BW, jnp.clip(len_B1 - 1 - pos_W, 0, width - 1), axis=1)
  pos_O = jnp.arange(width + 1)[None, :]
  reversed_BO = jnp.pad(reversed_BW, ((0, 0), (0, 1)))
  tgt_out = jnp.where(pos_O < len_B1, reversed_BO, jnp.where(pos_O == len_B1, EOS, PAD))
  tgt_in = jnp.concatenate([jnp.full((batch_size, 1), BOS, tgt_out.dtype), tgt_out[:, :-1]], axis=1)
  return Batch(src, tgt_in, tgt_out, lengths_B)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def _hidden(carry: Any) -> jax.Array:
  """The hidden state h of a GRU carry (h) or an LSTM carry (c, h)."""
  return carry[1] if isinstance(carry, tuple) else carry


def _masked_scan(cell, carry, x_BSE: jax.Array, valid_BS: jax.Array, reverse: bool):
  """Runs ``cell`` over time; the carry stays frozen on padded steps, so a reverse scan starts at each length."""
  def step(carry, inputs):
    x_BE, valid_B = inputs
    new_carry, out = cell(carry, x_BE)
    keep = lambda new, old: jnp.where(valid_B[:, None], new, old)
    return jax.tree.map(keep, new_carry, carry), jnp.where(valid_B[:, None], out, 0.0)
  carry, out_SBH = jax.lax.scan(step, carry, (jnp.swapaxes(x_BSE, 0, 1), jnp.swapaxes(valid_BS, 0, 1)),
                                reverse=reverse)
  return carry, jnp.swapaxes(out_SBH, 0, 1)


class Memory(NamedTuple):
  """What the decoder reads: encoder states, the valid-source mask, the summary and (Bahdanau) ``U h̄``."""
  keys_BSH: jax.Array
  valid_BS: jax.Array
  summary_BH: jax.Array
  projected_BSA: jax.Array | None


class Seq2Seq(nnx.Module):
  """Bidirectional-RNN encoder, RNN decoder with the attention named by ``attention`` (module docstring)."""

  def __init__(self, vocab_size: int, *, attention: str, cell: str = "gru", embed_dim: int = 32, hidden: int = 64,
               attn_dim: int = 64, rngs: nnx.Rngs):
    if attention not in ATTENTIONS:
      raise ValueError(f"unknown attention={attention!r}; choose one of {ATTENTIONS}")
    if cell not in CELLS:
      raise ValueError(f"unknown cell={cell!r}; choose one of {tuple(CELLS)}")
    if hidden % 2:
      raise ValueError(f"hidden={hidden} must be even (the encoder has hidden / 2 units per direction)")
    self.attention, self.cell_name, self.hidden, self.vocab_size = attention, cell, hidden, vocab_size
    Cell = CELLS[cell]
    self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    self.enc_fwd = Cell(embed_dim, hidden // 2, rngs=rngs)
    self.enc_bwd = Cell(embed_dim, hidden // 2, rngs=rngs)
    self.init_state = nnx.Linear(hidden, hidden, rngs=rngs)
    self.dec_cell = Cell(embed_dim + hidden, hidden, rngs=rngs)
    if attention == "bahdanau":
      self.attn = aj.nn.AdditiveAttention(hidden, hidden, attn_dim, rngs=rngs)
    elif attention.startswith("luong_"):
      self.attn = aj.nn.LuongAttention(hidden, hidden, score=attention.removeprefix("luong_"),
                                       attn_features=attn_dim, rngs=rngs)
      self.combine = nnx.Linear(2 * hidden, hidden, use_bias=False, rngs=rngs)   # W_c of h̃ = tanh(W_c [c; h])
    self.out = nnx.Linear(hidden if attention.startswith("luong_") else 2 * hidden, vocab_size, rngs=rngs)

  def _zero_carry(self, batch: int, features: int):
    h = jnp.zeros((batch, features))
    return (h, h) if self.cell_name == "lstm" else h

  def encode(self, src_BS: jax.Array) -> tuple[Memory, Any]:
    """Encoder states and the decoder's initial carry."""
    B = src_BS.shape[0]
    valid_BS = src_BS != PAD
    emb = self.embed(src_BS)
    last_fwd, fwd = _masked_scan(self.enc_fwd, self._zero_carry(B, self.hidden // 2), emb, valid_BS, reverse=False)
    first_bwd, bwd = _masked_scan(self.enc_bwd, self._zero_carry(B, self.hidden // 2), emb, valid_BS, reverse=True)
    keys = jnp.concatenate([fwd, bwd], axis=-1)
    summary = jnp.concatenate([_hidden(last_fwd), _hidden(first_bwd)], axis=-1)
    s0 = jnp.tanh(self.init_state(summary))
    carry = (jnp.zeros_like(s0), s0) if self.cell_name == "lstm" else s0
    projected = self.attn.project_keys(keys) if self.attention == "bahdanau" else None
    return Memory(keys, valid_BS, summary, projected), carry

  def step(self, memory: Memory, state, y_prev_B: jax.Array):
    """One decoder step: ``(state, y_{t-1}) -> (state, logits [B, V], weights [B, S] or None)``.

    ``state = (rnn carry, h̃_{t-1})``; h̃ is the Luong attentional state (unused by the other kinds).
    """
    carry, h_tilde = state
    emb = self.embed(y_prev_B)
    mask_B1S = memory.valid_BS[:, None, :]
    weights = None
    if self.attention == "none":
      carry, h = self.dec_cell(carry, jnp.concatenate([emb, memory.summary_BH], -1))
      features = jnp.concatenate([h, memory.summary_BH], -1)
    elif self.attention == "bahdanau":
      context, weights = self.attn(_hidden(carry)[:, None, :], memory.keys_BSH, mask=mask_B1S,
                                   projected_keys=memory.projected_BSA)
      context, weights = context[:, 0], weights[:, 0]
      carry, h = self.dec_cell(carry, jnp.concatenate([emb, context], -1))
      features = jnp.concatenate([h, context], -1)
    else:
      carry, h = self.dec_cell(carry, jnp.concatenate([emb, h_tilde], -1))
      context, weights = self.attn(h[:, None, :], memory.keys_BSH, mask=mask_B1S)
      context, weights = context[:, 0], weights[:, 0]
      h_tilde = jnp.tanh(self.combine(jnp.concatenate([context, h], -1)))
      features = h_tilde
    return (carry, h_tilde), self.out(features), weights

  def _initial_state(self, carry, batch: int):
    return carry, jnp.zeros((batch, self.hidden))

  def __call__(self, src_BS: jax.Array, tgt_in_BT: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Teacher forcing: ``logits [B, T, V]`` and attention ``weights [B, T, S]`` (None without attention)."""
    memory, carry = self.encode(src_BS)
    def body(state, y_B):
      state, logits, weights = self.step(memory, state, y_B)
      return state, (logits, weights)
    _, (logits_TBV, weights_TBS) = jax.lax.scan(body, self._initial_state(carry, src_BS.shape[0]),
                                                jnp.swapaxes(tgt_in_BT, 0, 1))
    weights = None if weights_TBS is None else jnp.swapaxes(weights_TBS, 0, 1)
    return jnp.swapaxes(logits_TBV, 0, 1), weights

  def greedy(self, src_BS: jax.Array, steps: int) -> tuple[jax.Array, jax.Array | None]:
    """Greedy decoding from BOS for ``steps`` steps: ``tokens [B, steps]``, ``weights [B, steps, S]`` or None."""
    memory, carry = self.encode(src_BS)
    B = src_BS.shape[0]
    def body(loop, _):
      state, y_B = loop
      state, logits, weights = self.step(memory, state, y_B)
      y_B = jnp.argmax(logits, -1).astype(src_BS.dtype)
      return (state, y_B), (y_B, weights)
    init = (self._initial_state(carry, B), jnp.full((B,), BOS, src_BS.dtype))
    _, (tokens_TB, weights_TBS) = jax.lax.scan(body, init, None, length=steps)
    weights = None if weights_TBS is None else jnp.swapaxes(weights_TBS, 0, 1)
    return jnp.swapaxes(tokens_TB, 0, 1), weights


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------


def sequence_loss(logits_BTV: jax.Array, tgt_out_BT: jax.Array) -> jax.Array:
  """Mean token cross-entropy over non-PAD targets (the EOS included)."""
  keep = (tgt_out_BT != PAD).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), tgt_out_BT)
  return (ce * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def make_model(config: Config, attention: str, seed: int) -> Seq2Seq:
  return Seq2Seq(NUM_SPECIAL + config.num_symbols, attention=attention, cell=config.cell,
                 embed_dim=config.embed_dim, hidden=config.hidden, attn_dim=config.attn_dim,
                 rngs=nnx.Rngs(params=seed))


def make_optimizer(config: Config) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(config.lr))


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "width"))
def train_step(params, opt_state, key: jax.Array, *, graphdef, config: Config, width: int):
  """One Adam step on a fresh batch drawn from ``key``: ``-> (params, opt_state, loss)``.

  Static ``graphdef`` / ``config`` / ``width`` key the compilation cache, so seeds of one model share a compile.
  """
  batch = make_batch(key, config.batch_size, config.min_len, config.max_len, config.num_symbols, width)
  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(batch.src, batch.tgt_in)
    return sequence_loss(logits, batch.tgt_out)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train(config: Config, attention: str, seed: int, log=None) -> tuple[Seq2Seq, list[dict]]:
  """Trains one model; returns it and its loss log (``{"step", "loss", "steps_per_s"}`` every ``log_every``)."""
  width = max(config.max_len, *eval_lengths(config))
  model = make_model(config, attention, seed)
  graphdef, params = nnx.split(model)
  opt_state = make_optimizer(config).init(params)
  key = jax.random.key(10_000 + seed)
  history, t0, window_loss = [], time.perf_counter(), []
  for step in range(1, config.steps + 1):
    params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, step), graphdef=graphdef,
                                         config=config, width=width)
    window_loss.append(loss)
    if step % config.log_every == 0 or step == config.steps:
      elapsed = time.perf_counter() - t0
      row = dict(attention=attention, seed=seed, step=step, loss=float(np.mean(jax.device_get(window_loss))),
                 steps_per_s=step / elapsed, eta_s=(config.steps - step) * elapsed / step)
      history.append(row)
      window_loss = []
      if log:
        log(row)
  return nnx.merge(graphdef, params), history


def alignment_accuracy(weights_BTS: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Fraction of output symbols t < L whose argmax attention is source position ``L - 1 - t`` (per example)."""
  T = weights_BTS.shape[1]
  t_T = jnp.arange(T)[None, :]
  hit = jnp.argmax(weights_BTS, -1) == lengths_B[:, None] - 1 - t_T
  counted = t_T < lengths_B[:, None]
  return (hit & counted).sum(-1) / lengths_B


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "width"))
def evaluate_length(params, key: jax.Array, length, *, graphdef, config: Config, width: int):
  """Greedy decoding of ``eval_examples`` fresh length-``length`` sources: ``(seq_acc, token_acc, align_acc)``."""
  batch = make_batch(key, config.eval_examples, length, length, config.num_symbols, width)
  tokens, weights = nnx.merge(graphdef, params).greedy(batch.src, width + 1)
  counted = batch.tgt_out != PAD
  right = tokens == batch.tgt_out
  seq_acc = jnp.all(right | ~counted, axis=-1).mean()
  token_acc = (right & counted).sum() / counted.sum()
  align = jnp.nan if weights is None else alignment_accuracy(weights, batch.lengths).mean()
  return seq_acc, token_acc, align


def evaluate(model: Seq2Seq, config: Config, seed: int) -> list[dict]:
  """Greedy-decoding accuracy on ``eval_examples`` fresh sequences of each length in ``eval_lengths``."""
  lengths = eval_lengths(config)
  width = max(config.max_len, *lengths)
  graphdef, params = nnx.split(model)
  rows = []
  for length in lengths:
    key = jax.random.fold_in(jax.random.key(20_000 + seed), length)
    seq_acc, token_acc, align = jax.device_get(
        evaluate_length(params, key, length, graphdef=graphdef, config=config, width=width))
    rows.append(dict(attention=model.attention, seed=seed, length=length, seq_acc=float(seq_acc),
                     token_acc=float(token_acc), align_acc=None if np.isnan(align) else float(align)))
  return rows


def alignment_example(model: Seq2Seq, config: Config, length: int, seed: int = 0):
  """One greedy decode of a random length-``length`` source: ``(src_tokens, out_tokens, weights [L+1, L])``."""
  width = max(config.max_len, *eval_lengths(config))
  batch = make_batch(jax.random.key(30_000 + seed), 1, length, length, config.num_symbols, width)
  tokens, weights = model.greedy(batch.src, length + 1)
  names = lambda ids: [symbol_name(int(i)) for i in ids]
  src = names(batch.src[0, :length])
  out = names(tokens[0])
  return src, out, None if weights is None else np.asarray(weights[0, :, :length])


def symbol_name(token: int) -> str:
  if token < NUM_SPECIAL:
    return ("<pad>", "<bos>", "<eos>")[token]
  return chr(ord("a") + token - NUM_SPECIAL) if token - NUM_SPECIAL < 26 else str(token)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
  """``{attention: {length: {metric: mean over seeds, metric_min, metric_max}}}``."""
  out: dict[str, dict[int, dict[str, float]]] = {}
  for attention in dict.fromkeys(r["attention"] for r in rows):
    out[attention] = {}
    for length in sorted({r["length"] for r in rows if r["attention"] == attention}):
      rs = [r for r in rows if r["attention"] == attention and r["length"] == length]
      entry = {}
      for metric in ("seq_acc", "token_acc", "align_acc"):
        vals = [r[metric] for r in rs if r[metric] is not None]
        if vals:
          entry.update({metric: float(np.mean(vals)), f"{metric}_min": float(np.min(vals)),
                        f"{metric}_max": float(np.max(vals))})
      out[attention][length] = entry
  return out


def markdown_tables(rows: list[dict]) -> str:
  """Sequence accuracy (and token accuracy) per length, one column per attention kind; then alignment accuracy."""
  summary = summarize(rows)
  kinds = list(summary)
  lengths = sorted({r["length"] for r in rows})
  seeds = sorted({r["seed"] for r in rows})
  intro = (f"Greedy-decoding sequence accuracy (all symbols and `<eos>` right), % — mean over seeds {seeds} "
           "(min–max across seeds in brackets when more than one); token accuracy after the slash.")
  def cell(entry, metric):
    if metric not in entry:
      return "–"
    s = f"{100 * entry[metric]:.1f}"
    if len(seeds) > 1:
      s += f" [{100 * entry[metric + '_min']:.1f}–{100 * entry[metric + '_max']:.1f}]"
    return s
  rows = [[length, *(f"{cell(summary[k][length], 'seq_acc')} / {100 * summary[k][length]['token_acc']:.1f}"
                      for k in kinds)] for length in lengths]
  rows.append(["**mean**", *(f"{100 * np.mean([summary[k][l]['seq_acc'] for l in lengths]):.1f}" for k in kinds)])
  lines = [intro, "", common.markdown_table(["length", *kinds], rows, "r" * (len(kinds) + 1))]
  attn_kinds = [k for k in kinds if any("align_acc" in e for e in summary[k].values())]
  if attn_kinds:
    rows = [[length, *(cell(summary[k][length], "align_acc") for k in attn_kinds)] for length in lengths]
    lines += ["", "Alignment accuracy: % of output symbols whose largest attention weight is on the anti-diagonal "
              "source position L−1−t.", "", common.markdown_table(["length", *attn_kinds], rows,
                                                                  "r" * (len(attn_kinds) + 1))]
  return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], path: str, config: Config) -> None:
  from matplotlib.ticker import MaxNLocator
  summary = summarize(rows)
  fig, (ax,) = common.new_figure((6.5, 4))
  for attention, per_length in summary.items():
    lengths = sorted(per_length)
    mean = [100 * per_length[l]["seq_acc"] for l in lengths]
    ax.plot(lengths, mean, marker="o", ms=3, label=attention)
    ax.fill_between(lengths, [100 * per_length[l]["seq_acc_min"] for l in lengths],
                    [100 * per_length[l]["seq_acc_max"] for l in lengths], alpha=0.2)
  ax.axvspan(config.min_len, config.max_len, color="0.9", zorder=0, label="training lengths")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("source length L")
  ax.set_ylabel("sequence accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.set_title(f"Reversal, {config.cell.upper()} {config.hidden} units, {config.steps} steps, "
               f"seeds {list(config.seeds)}", fontsize=10)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)


def plot_alignments(examples: dict[str, tuple], workdir: str) -> None:
  """One PNG per attention kind, and all kinds side by side in ``alignments.png``."""
  kinds = [k for k, (_, _, w) in examples.items() if w is not None]
  for kind in kinds:
    src, out, weights = examples[kind]
    aj.viz.plot_attention(weights, src, out, title=f"{kind}: reversal alignment",
                          save=os.path.join(workdir, f"alignment_{kind}.png"))
  if kinds:
    L = len(examples[kinds[0]][0])
    fig, axes = common.new_figure((3.2 * len(kinds), 3.4), ncols=len(kinds))
    for ax, kind in zip(axes, kinds):
      src, out, weights = examples[kind]
      aj.viz.plot_attention(weights, src, out, ax=ax, title=kind, colorbar=False)
    fig.suptitle(f"Attention while reversing a length-{L} sequence (rows: greedy outputs, columns: source)")
    fig.savefig(os.path.join(workdir, "alignments.png"), dpi=120)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def write_tables(workdir: str) -> str:
  """(Re)writes ``results.md`` from ``results.json``; returns the tables."""
  tables = markdown_tables(common.read_json(os.path.join(workdir, "results.json"))["rows"])
  common.write_text(os.path.join(workdir, "results.md"), tables)
  return tables


def train_and_evaluate(config: Config, workdir: str | os.PathLike, verbose: bool = True) -> list[dict]:
  """Trains every attention kind with every seed, evaluates per length, writes the reports into ``workdir``;
  returns the rows."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  common.write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(config), indent=2)
  log_path = os.path.join(workdir, "train_log.jsonl")
  common.write_text(log_path, "")
  def log(row):
    with open(log_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if verbose:
      print(f"[{row['attention']} seed {row['seed']}] step {row['step']}/{config.steps} loss {row['loss']:.4f} "
            f"{row['steps_per_s']:.1f} steps/s, ETA {row['eta_s']:.0f}s", flush=True)
  rows, examples, t_start = [], {}, time.perf_counter()
  for attention in config.attentions:
    for seed in config.seeds:
      t0 = time.perf_counter()
      model, _ = train(config, attention, seed, log)
      result = evaluate(model, config, seed)
      rows += result
      if seed == config.seeds[0]:
        examples[attention] = alignment_example(model, config, config.heatmap_length)
      if verbose:
        acc = np.mean([r["seq_acc"] for r in result])
        print(f"[{attention} seed {seed}] mean sequence accuracy {100 * acc:.1f}% "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
  wall_s = time.perf_counter() - t_start
  common.write_json(os.path.join(workdir, "results.json"),
                    dict(config=dataclasses.asdict(config), wall_s=wall_s, **common.run_metadata(), rows=rows))
  tables = write_tables(workdir)
  plot_accuracy(rows, os.path.join(workdir, "accuracy_vs_length.png"), config)
  plot_alignments(examples, workdir)
  if verbose:
    print(tables)
    print(f"total wall time {wall_s:.0f}s; wrote {workdir}")
  return rows


if __name__ == "__main__":
  config_lib.run(train_and_evaluate, Config, PRESETS, workdir=WORKDIR)
