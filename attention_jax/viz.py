"""Attention heatmaps, head grids and head statistics computed from attention weights.

Plots use matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), never ``pyplot``: they render headless on any machine, need no ``matplotlib.use("Agg")``,
leave a user's interactive backend and pyplot's figure registry untouched (nothing leaks between calls), and
still display in notebooks. A caller may pass an ``ax`` from pyplot (or anywhere) to draw into instead.

* :func:`plot_attention`  one weight matrix ``[T, S]`` as a heatmap, queries (targets) as rows and keys
  (sources) as columns, with token labels;
* :func:`plot_heads`      ``[N, T, S]`` as a grid with one panel per head.

Head statistics take weights ``[..., T, S]`` (any leading dims: batch, layer, head) and reduce over the query
and key axes only, returning ``[...]``; rows whose weights are all zero (queries with no visible key) are left
out of every mean. Positions are indices: query ``t`` and key ``s`` are the ``t``-th and ``s``-th tokens.

* :func:`attention_entropy`     mean over rows of ``-Σ_s w[t,s] log w[t,s]`` (nats); ``log S`` for a uniform head,
  0 for a head attending to one key per row;
* :func:`previous_token_score`  mean over ``t ≥ 1`` of ``w[t, t-1]``; 1 for a perfect previous-token head;
* :func:`induction_score`       mean over queries ``t`` whose token occurred before of ``w[t, j+1]``, ``j`` the
  latest ``j < t`` with ``tokens[j] == tokens[t]`` (Olsson et al. 2022's score on a repeated random sequence:
  attention from a token in the second copy to the token after its earlier occurrence); 1 for a perfect
  induction head;
* :func:`attention_distance`    mean over rows of ``Σ_s w[t,s] |t - s|``, the expected distance in positions
  attended over; 0 for a diagonal head, 1 for a previous-token head.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Above this many tokens an axis labels only every k-th one.
MAX_TICK_LABELS = 48


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _as_matrix(weights, name: str, ndim: int) -> np.ndarray:
  w = np.asarray(jax.device_get(weights), dtype=np.float32)
  if w.ndim != ndim:
    want = "[T, S]" if ndim == 2 else "[N, T, S]"
    raise ValueError(f"{name}: weights must be {want}; got shape {w.shape}")
  return w


def _labels(tokens: Sequence | None, n: int, what: str, name: str) -> list[str]:
  if tokens is None:
    return [str(i) for i in range(n)]
  tokens = [str(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
  if len(tokens) != n:
    raise ValueError(f"{name}: {len(tokens)} {what} tokens for a weight axis of length {n}")
  return tokens


def _set_ticks(ax, x_labels: list[str], y_labels: list[str], fontsize: float) -> None:
  for labels, set_ticks, set_labels, rotation in ((x_labels, ax.set_xticks, ax.set_xticklabels, 90),
                                                  (y_labels, ax.set_yticks, ax.set_yticklabels, 0)):
    step = max(1, math.ceil(len(labels) / MAX_TICK_LABELS))
    idx = list(range(0, len(labels), step))
    set_ticks(idx)
    set_labels([labels[i] for i in idx], rotation=rotation, fontsize=fontsize)


def _save(fig: Figure, save: str | os.PathLike | None) -> None:
  if save is not None:
    directory = os.path.dirname(os.fspath(save))
    if directory:
      os.makedirs(directory, exist_ok=True)
    fig.savefig(save, dpi=120)


def plot_attention(weights: jax.typing.ArrayLike, x_tokens: Sequence | None, y_tokens: Sequence | None = None,
                   ax=None, *, title: str | None = None, cmap: str = "viridis", colorbar: bool = True,
                   save: str | os.PathLike | None = None) -> Figure:
  """Heatmap of ``weights [T, S]``: row t is query (target) t, column s is key (source) s.

  ``x_tokens`` label the S columns (the attended-to sequence), ``y_tokens`` the T rows; ``y_tokens=None``
  reuses ``x_tokens`` when ``T == S`` (self-attention) and numbers the rows otherwise; ``x_tokens=None``
  numbers the columns. Draws into ``ax`` if given (returning its figure), else into a new Agg figure.
  ``save`` writes the figure (format from the extension). Returns the Figure.
  """
  w_TS = _as_matrix(weights, "plot_attention", 2)
  T, S = w_TS.shape
  x_labels = _labels(x_tokens, S, "x (key/source)", "plot_attention")
  if y_tokens is None and x_tokens is not None and T == S:
    y_tokens = x_tokens
  y_labels = _labels(y_tokens, T, "y (query/target)", "plot_attention")
  if ax is None:
    fig = _new_figure((max(3.0, 1.2 + 0.28 * S), max(2.5, 0.9 + 0.28 * T)))
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  image = ax.imshow(w_TS, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
  _set_ticks(ax, x_labels, y_labels, fontsize=8)
  ax.set_xlabel("key / source")
  ax.set_ylabel("query / target")
  if title:
    ax.set_title(title)
  if colorbar:
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
  _save(fig, save)
  return fig


def plot_heads(weights_NxTxS: jax.typing.ArrayLike, tokens: Sequence | None, y_tokens: Sequence | None = None, *,
               titles: Sequence[str] | None = None, ncols: int | None = None, cmap: str = "viridis",
               suptitle: str | None = None, save: str | os.PathLike | None = None) -> Figure:
  """Grid of heatmaps, one panel (axes) per head of ``weights [N, T, S]``; returns the Figure.

  ``tokens`` label the keys (and the queries, unless ``y_tokens`` is given and when ``T == S``); ``titles``
  (one per head, default ``"head n"``) go above the panels. The figure has exactly N axes (no colorbars;
  each panel's colour scale runs from 0 to that head's largest weight).
  """
  w_NTS = _as_matrix(weights_NxTxS, "plot_heads", 3)
  N, T, S = w_NTS.shape
  x_labels = _labels(tokens, S, "key", "plot_heads")
  if y_tokens is None and tokens is not None and T == S:
    y_tokens = tokens
  y_labels = _labels(y_tokens, T, "query", "plot_heads")
  if titles is None:
    titles = [f"head {n}" for n in range(N)]
  if len(titles) != N:
    raise ValueError(f"plot_heads: {len(titles)} titles for {N} heads (weights shape {w_NTS.shape})")
  ncols = min(N, 4) if ncols is None else max(1, min(ncols, N))
  nrows = math.ceil(N / ncols)
  panel = min(4.0, max(2.2, 0.12 * max(T, S)))
  fig = _new_figure((ncols * panel + 0.5, nrows * (panel + 0.4) + (0.4 if suptitle else 0.0)))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  fontsize = 8 if max(T, S) <= 24 else 6
  for n in range(N):
    ax = axes[n]
    ax.imshow(w_NTS[n], cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    _set_ticks(ax, x_labels, y_labels, fontsize=fontsize)
    ax.set_title(titles[n], fontsize=9)
  for ax in axes[N:]:
    fig.delaxes(ax)
  if suptitle:
    fig.suptitle(suptitle)
  _save(fig, save)
  return fig


# ----------------------------------------------------------------------------------------------------------
# Head statistics
# ----------------------------------------------------------------------------------------------------------


def _weights(weights: jax.typing.ArrayLike, name: str, square: bool = False) -> jax.Array:
  w = jnp.asarray(weights)
  if w.ndim < 2:
    raise ValueError(f"{name}: weights must be [..., T, S]; got shape {w.shape}")
  if square and w.shape[-1] != w.shape[-2]:
    raise ValueError(f"{name}: needs self-attention weights [..., T, T]; got shape {w.shape}")
  return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def _row_mean(values_T: jax.Array, valid_T: jax.Array) -> jax.Array:
  """Mean of ``values [..., T]`` over the entries where ``valid``; 0 where no entry is valid."""
  valid_T = jnp.broadcast_to(valid_T, values_T.shape)
  count = valid_T.sum(-1)
  total = jnp.where(valid_T, values_T, 0.0).sum(-1)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def _has_weight(w_TS: jax.Array) -> jax.Array:
  return w_TS.sum(-1) > 0


def attention_entropy(weights: jax.typing.ArrayLike) -> jax.Array:
  """Mean over query rows of the entropy ``-Σ_s w log w`` in nats: ``[..., T, S] -> [...]``.

  A uniform row over S keys has entropy ``log S`` (the maximum); a one-hot row has 0. All-zero rows are skipped.
  """
  w = _weights(weights, "attention_entropy")
  plogp = jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0)
  return _row_mean(-plogp.sum(-1), _has_weight(w))


def previous_token_score(weights: jax.typing.ArrayLike) -> jax.Array:
  """Mean over queries ``t = 1..T-1`` of ``w[t, t-1]``: ``[..., T, T] -> [...]``; 1 for a previous-token head."""
  w = _weights(weights, "previous_token_score", square=True)
  if w.shape[-1] < 2:
    raise ValueError(f"previous_token_score: needs T >= 2; got weights shape {w.shape}")
  prev = jnp.diagonal(w, offset=-1, axis1=-2, axis2=-1)            # [..., T-1]: w[t, t-1] for t = 1..T-1
  return _row_mean(prev, _has_weight(w)[..., 1:])


def induction_targets(tokens: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """For ``tokens [..., T]``: ``(target [..., T], valid [..., T])``, target ``j + 1`` with ``j`` the latest
  ``j < t`` holding the same token as ``t``; ``valid`` is False where the token has not occurred before."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim < 1:
    raise ValueError(f"induction_targets: tokens must be [..., T]; got shape {tokens.shape}")
  T = tokens.shape[-1]
  lead = (1,) * (tokens.ndim - 1)
  j_TT = jnp.broadcast_to(jnp.arange(T), (T, T)).reshape(lead + (T, T))   # [t, j] -> j
  t_TT = jnp.swapaxes(j_TT, -1, -2)                                         # [t, j] -> t
  same = (tokens[..., :, None] == tokens[..., None, :]) & (j_TT < t_TT)
  latest = jnp.max(jnp.where(same, j_TT, -1), axis=-1)              # -1 when the token is new
  return latest + 1, latest >= 0


def induction_score(weights: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike) -> jax.Array:
  """Mean attention from each repeated token to the token after its previous occurrence: ``[..., T, T] -> [...]``.

  ``tokens`` is ``[T]`` or has leading dims that are a prefix of ``weights``' leading dims (e.g. tokens
  ``[B, T]`` for weights ``[B, N, T, T]``). On a random sequence repeated twice, with period P and distinct
  tokens, the target of query ``t ≥ P`` is ``t - P + 1``. Queries whose token is new are skipped.
  """
  w = _weights(weights, "induction_score", square=True)
  tokens = jnp.asarray(tokens)
  lead_w, lead_tok = w.shape[:-2], tokens.shape[:-1]
  if tokens.ndim < 1 or tokens.shape[-1] != w.shape[-1] or lead_tok != lead_w[:len(lead_tok)]:
    raise ValueError(f"induction_score: tokens [..., T] must match weights [..., T, T] with leading dims a prefix; "
                     f"got tokens.shape={tokens.shape} weights.shape={w.shape}")
  target, valid = induction_targets(tokens)
  T = w.shape[-1]
  expand = (1,) * (len(lead_w) - len(lead_tok))
  target = jnp.broadcast_to(target.reshape(lead_tok + expand + (T,)), lead_w + (T,))
  valid = jnp.broadcast_to(valid.reshape(lead_tok + expand + (T,)), lead_w + (T,))
  picked = jnp.take_along_axis(w, jnp.minimum(target, T - 1)[..., None], axis=-1)[..., 0]
  return _row_mean(picked, valid & _has_weight(w))


def attention_distance(weights: jax.typing.ArrayLike) -> jax.Array:
  """Mean over query rows of ``Σ_s w[t, s] |t - s|`` (positions): ``[..., T, S] -> [...]``; 0 for a diagonal head.

  Rows are weighted as given; for rows that do not sum to 1 this is not an expectation. All-zero rows are skipped.
  """
  w = _weights(weights, "attention_distance")
  T, S = w.shape[-2:]
  dist_TS = jnp.abs(jnp.arange(T, dtype=w.dtype)[:, None] - jnp.arange(S, dtype=w.dtype)[None, :])
  dist_TS = dist_TS.reshape((1,) * (w.ndim - 2) + (T, S))
  return _row_mean((w * dist_TS).sum(-1), _has_weight(w))


def head_statistics(weights: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike | None = None
                    ) -> dict[str, jax.Array]:
  """All head statistics of ``weights [..., T, T]`` as ``{name: [...]}``; the induction score needs ``tokens``."""
  stats = {
      "entropy": attention_entropy(weights),
      "previous_token": previous_token_score(weights),
      "distance": attention_distance(weights),
  }
  if tokens is not None:
    stats["induction"] = induction_score(weights, tokens)
  return stats
