"""Attention heatmaps, head grids and head statistics computed from attention weights.

Plots use matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), never ``pyplot``: they render headless on any machine, need no ``matplotlib.use("Agg")``,
leave a user's interactive backend and pyplot's figure registry untouched (nothing leaks between calls), and
still display in notebooks. A caller may pass an ``ax`` from pyplot (or anywhere) to draw into instead.

* :func:`plot_attention`  one weight matrix ``[T, S]`` as a heatmap, queries (targets) as rows and keys
  (sources) as columns, with token labels;
* :func:`plot_heads`      ``[N, T, S]`` as a grid with one panel per head.
* :func:`plot_block_mask` a ``flex.BlockMask``'s block layout (empty / partial / full blocks) for one row and head.

Figures grow with the sequence, ``INCHES_PER_TOKEN`` per token, up to ``MAX_FIGURE_INCHES`` on a side (a whole
head grid too): long sequences give a bounded figure (and bounded memory) whatever T and S are. Tick labels are
thinned to what fits at their font size (at most ``MAX_TICK_LABELS`` per axis) and per-cell annotations
(``annotate=True``) are only drawn up to ``MAX_ANNOTATED_TOKENS`` tokens per axis. Weights must be real numbers
of the right rank with at least one row and column (else ``ValueError`` / ``TypeError``); non-finite entries
(NaN, +-Inf: a bug upstream, usually) are drawn in grey, as masked cells, rather than refused, so the plot shows
where they are.

Head statistics take weights ``[..., T, S]`` (any leading dims: batch, layer, head) and reduce over the query
and key axes only, returning ``[...]``; rows whose weights are all zero (queries with no visible key) are left
out of every mean, and a mean over no rows is 0 (e.g. ``T = 0``, or ``T < 2`` for the previous-token score). Zero
leading dims give empty results; a NaN in a weight a statistic reads makes that statistic NaN (never silently
skipped). Positions are indices: query ``t`` and key ``s`` are the ``t``-th and ``s``-th tokens.

* :func:`attention_entropy`     mean over rows of ``-Σ_s w[t,s] log w[t,s]`` (nats); ``log S`` for a uniform head,
  0 for a head attending to one key per row;
* :func:`previous_token_score`  mean over ``t ≥ 1`` of ``w[t, t-1]``; 1 for a perfect previous-token head;
* :func:`induction_score`       mean over queries ``t`` whose token occurred before of ``w[t, j+1]``, ``j`` the
  latest ``j < t`` with ``tokens[j] == tokens[t]`` (Olsson et al. 2022's score on a repeated random sequence:
  attention from a token in the second copy to the token after its earlier occurrence); 1 for a perfect
  induction head;
* :func:`attention_distance`    mean over rows of ``Σ_s w[t,s] |t - s|``, the expected distance in positions
  attended over; 0 for a diagonal head, 1 for a previous-token head.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# An axis labels at most this many tokens (fewer when its font does not fit): every k-th one.
MAX_TICK_LABELS = 48
# Figure size per token, and the cap on each side of any figure (in inches).
INCHES_PER_TOKEN = 0.28
MAX_FIGURE_INCHES = 12.0
# ``annotate=True`` writes each weight in its cell only up to this many tokens per axis.
MAX_ANNOTATED_TOKENS = 20
_BAD_COLOR = "0.75"   # grey, for non-finite weights


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _as_matrix(weights, name: str, ndim: int) -> np.ndarray:
  """Weights as a float32 NumPy array of rank ``ndim`` with no empty axis; non-finite entries are kept."""
  want = "[T, S]" if ndim == 2 else "[N, T, S]"
  try:
    w = np.asarray(jax.device_get(weights))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name}: weights must be a real array {want}; got {type(weights).__name__} ({e})") from None
  if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) or w.dtype == np.bool_):
    raise TypeError(f"{name}: weights must be real numbers {want}; got dtype={w.dtype} shape={w.shape}")
  if w.ndim != ndim:
    raise ValueError(f"{name}: weights must be {want}; got shape {w.shape}")
  if w.size == 0:
    raise ValueError(f"{name}: nothing to draw, weights {want} have an empty axis; got shape {w.shape}")
  return w.astype(np.float32)


def _image(ax, w_TS: np.ndarray, cmap: str):
  """``imshow`` with non-finite cells masked (drawn grey) and the colour scale from 0 to the largest finite weight."""
  finite = np.isfinite(w_TS)
  vmax = float(w_TS[finite].max()) if finite.any() else 1.0
  colormap = cmap if isinstance(cmap, matplotlib.colors.Colormap) else matplotlib.colormaps[cmap]
  colormap = colormap.with_extremes(bad=_BAD_COLOR)
  return ax.imshow(np.ma.masked_invalid(w_TS), cmap=colormap, vmin=0.0, vmax=vmax if vmax > 0 else 1.0,
                   aspect="auto", interpolation="nearest")


def _labels(tokens: Sequence | None, n: int, what: str, name: str) -> list[str]:
  if tokens is None:
    return [str(i) for i in range(n)]
  tokens = [str(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
  if len(tokens) != n:
    raise ValueError(f"{name}: {len(tokens)} {what} tokens for a weight axis of length {n}")
  return tokens


def _fitting_labels(length_in: float, fontsize: float) -> int:
  """How many tick labels fit along ``length_in`` inches at ``fontsize`` points (one line pitch apart)."""
  return max(1, min(MAX_TICK_LABELS, int(length_in * 72 / (1.4 * fontsize))))


def _axes_inches(ax) -> tuple[float, float]:
  box = ax.get_position()
  fig_w, fig_h = ax.figure.get_size_inches()
  return box.width * fig_w, box.height * fig_h


def _set_ticks(ax, x_labels: list[str], y_labels: list[str], fontsize: float) -> None:
  """Label every k-th token, k chosen so the labels fit the axes (and number at most ``MAX_TICK_LABELS``)."""
  width_in, height_in = _axes_inches(ax)
  for labels, set_ticks, set_labels, rotation, length_in in (
      (x_labels, ax.set_xticks, ax.set_xticklabels, 90, width_in),
      (y_labels, ax.set_yticks, ax.set_yticklabels, 0, height_in)):
    step = max(1, math.ceil(len(labels) / _fitting_labels(length_in, fontsize)))
    idx = list(range(0, len(labels), step))
    set_ticks(idx)
    set_labels([labels[i] for i in idx], rotation=rotation, fontsize=fontsize)


def _annotate(ax, w_TS: np.ndarray, image) -> None:
  """Writes each weight in its cell, dark on light cells and light on dark ones."""
  T, S = w_TS.shape
  fontsize = 7 if max(T, S) <= 12 else 5
  for t in range(T):
    for s in range(S):
      value = w_TS[t, s]
      light = not np.isfinite(value) or image.norm(value) > 0.5
      ax.text(s, t, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color="black" if light else "white")


def _save(fig: Figure, save: str | os.PathLike | None) -> None:
  if save is not None:
    directory = os.path.dirname(os.fspath(save))
    if directory:
      os.makedirs(directory, exist_ok=True)
    fig.savefig(save, dpi=120)


def plot_attention(weights: jax.typing.ArrayLike, x_tokens: Sequence | None, y_tokens: Sequence | None = None,
                   ax=None, *, title: str | None = None, cmap: str = "viridis", colorbar: bool = True,
                   annotate: bool = False, save: str | os.PathLike | None = None) -> Figure:
  """Heatmap of ``weights [T, S]``: row t is query (target) t, column s is key (source) s.

  ``x_tokens`` label the S columns (the attended-to sequence), ``y_tokens`` the T rows; ``y_tokens=None``
  reuses ``x_tokens`` when ``T == S`` (self-attention) and numbers the rows otherwise; ``x_tokens=None``
  numbers the columns. Draws into ``ax`` if given (returning its figure), else into a new Agg figure of
  ``INCHES_PER_TOKEN`` per token, at most ``MAX_FIGURE_INCHES`` a side. Tick labels are thinned to fit;
  ``annotate`` writes each weight in its cell when ``max(T, S) <= MAX_ANNOTATED_TOKENS`` (larger matrices are
  drawn without). Non-finite weights are drawn grey. ``save`` writes the figure (format from the extension).
  Returns the Figure.
  """
  w_TS = _as_matrix(weights, "plot_attention", 2)
  T, S = w_TS.shape
  x_labels = _labels(x_tokens, S, "x (key/source)", "plot_attention")
  if y_tokens is None and x_tokens is not None and T == S:
    y_tokens = x_tokens
  y_labels = _labels(y_tokens, T, "y (query/target)", "plot_attention")
  if ax is None:
    width = min(MAX_FIGURE_INCHES, max(3.0, 1.2 + INCHES_PER_TOKEN * S))
    height = min(MAX_FIGURE_INCHES, max(2.5, 0.9 + INCHES_PER_TOKEN * T))
    fig = _new_figure((width, height))
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  image = _image(ax, w_TS, cmap)
  _set_ticks(ax, x_labels, y_labels, fontsize=8)
  if annotate and max(T, S) <= MAX_ANNOTATED_TOKENS:
    _annotate(ax, w_TS, image)
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
  each panel's colour scale runs from 0 to that head's largest finite weight; non-finite weights are grey).
  ``ncols`` defaults to ``max(4, ceil(sqrt(N)))`` (at most N); panels shrink so that the whole grid stays within
  ``MAX_FIGURE_INCHES`` a side, and tick labels are thinned to fit each panel.
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
  if ncols is None:
    ncols = min(N, max(4, math.ceil(math.sqrt(N))))
  else:
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)):
      raise TypeError(f"plot_heads: ncols must be a positive int; got {ncols!r}")
    ncols = max(1, min(int(ncols), N))
  nrows = math.ceil(N / ncols)
  extra = 0.4 if suptitle else 0.0
  panel = min(4.0, max(2.2, 0.12 * max(T, S)),
              (MAX_FIGURE_INCHES - 0.5) / ncols, (MAX_FIGURE_INCHES - extra) / nrows - 0.4)
  panel = max(panel, 0.3)
  fig = _new_figure((min(MAX_FIGURE_INCHES, ncols * panel + 0.5),
                     min(MAX_FIGURE_INCHES, nrows * (panel + 0.4) + extra)))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  fontsize = 8 if max(T, S) <= 24 and panel >= 2.0 else 6
  for n in range(N):
    ax = axes[n]
    _image(ax, w_NTS[n], cmap)
    _set_ticks(ax, x_labels, y_labels, fontsize=fontsize)
    ax.set_title(titles[n], fontsize=9 if panel >= 1.5 else 6)
  for ax in axes[N:]:
    fig.delaxes(ax)
  if suptitle:
    fig.suptitle(suptitle)
  _save(fig, save)
  return fig


# ----------------------------------------------------------------------------------------------------------
# Head statistics
# ----------------------------------------------------------------------------------------------------------


def plot_block_mask(block_mask, b: int = 0, n: int = 0, ax=None, *, title: str | None = None,
                    save: str | os.PathLike | None = None) -> Figure:
  """The block layout of a :class:`attention_jax.flex.BlockMask` for batch row ``b`` and head ``n``: one cell per
  (query block, key block), white = empty (skipped), light = partial (``mask_mod`` evaluated in the tile), dark =
  full. The title reports the sparsity. Returns the Figure."""
  state = np.asarray(block_mask.state())
  Bm, Nm = state.shape[:2]
  if (Bm > 1 and not 0 <= b < Bm) or (Nm > 1 and not 0 <= n < Nm):
    raise ValueError(f"plot_block_mask: (b={b}, n={n}) outside the mask's (B={Bm}, N={Nm})")
  grid = state[b if Bm > 1 else 0, n if Nm > 1 else 0]
  nq, nk = grid.shape
  if ax is None:
    fig = _new_figure((min(MAX_FIGURE_INCHES, max(3.0, 1.5 + 0.12 * nk)),
                       min(MAX_FIGURE_INCHES, max(2.5, 1.0 + 0.12 * nq))))
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  cmap = matplotlib.colors.ListedColormap(["#ffffff", "#9ecae1", "#08519c"])
  ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
  bq, bk = block_mask.block_size
  ax.set_xlabel(f"key block ({bk} keys)")
  ax.set_ylabel(f"query block ({bq} queries)")
  full, partial = int(np.sum(grid == 2)), int(np.sum(grid == 1))
  ax.set_title(title or f"{full} full, {partial} partial of {nq * nk} blocks "
                        f"({100 * (1 - (full + partial) / max(nq * nk, 1)):.1f}% skipped)", fontsize=9)
  _save(fig, save)
  return fig


def _weights(weights: jax.typing.ArrayLike, name: str, square: bool = False) -> jax.Array:
  try:
    w = jnp.asarray(weights)
  except TypeError:
    raise TypeError(f"{name}: weights must be a real array [..., T, S]; got {type(weights).__name__}") from None
  if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer) or w.dtype == jnp.bool_):
    raise TypeError(f"{name}: weights must be real numbers [..., T, S]; got dtype={w.dtype} shape={w.shape}")
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
  """Rows with any non-zero (or NaN) entry: all-zero rows are queries with no visible key."""
  return jnp.any(w_TS != 0, axis=-1)


def attention_entropy(weights: jax.typing.ArrayLike) -> jax.Array:
  """Mean over query rows of the entropy ``-Σ_s w log w`` in nats: ``[..., T, S] -> [...]``.

  A uniform row over S keys has entropy ``log S`` (the maximum); a one-hot row has 0. All-zero rows are skipped.
  """
  w = _weights(weights, "attention_entropy")
  plogp = jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), jnp.where(jnp.isnan(w), jnp.nan, 0.0))
  return _row_mean(-plogp.sum(-1), _has_weight(w))


def previous_token_score(weights: jax.typing.ArrayLike) -> jax.Array:
  """Mean over queries ``t = 1..T-1`` of ``w[t, t-1]``: ``[..., T, T] -> [...]``; 1 for a previous-token head.

  With ``T < 2`` there is no such query and the score is 0.
  """
  w = _weights(weights, "previous_token_score", square=True)
  if w.shape[-1] < 2:
    return jnp.zeros(w.shape[:-2], w.dtype)
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
  latest = jnp.max(jnp.where(same, j_TT, -1), axis=-1, initial=-1)  # -1 when the token is new (or T = 0)
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
  if T == 0:
    return jnp.zeros(lead_w, w.dtype)
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
