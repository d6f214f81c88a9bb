"""Block-sparse attention: sparsity patterns, and attention that computes only their non-empty blocks.

Patterns (frozen, hashable dataclasses) say which key j query i may see: :class:`LocalPattern`,
:class:`StridedPattern` and :class:`FixedPattern` (Child et al. 2019), :class:`BigBirdPattern` (Zaheer et al.
2020) and :class:`GlobalTokensPattern` (Longformer, Beltagy et al. 2020). Each gives ``.dense_mask(T, S)`` (the
definition, for the reference and plots) and ``.block_layout(T, S, block_size)``. ``is_causal=True`` intersects
any pattern with ``j <= i`` (top-left aligned, as everywhere in the library).

Algorithm of :func:`sparse_attention`. At trace time (NumPy, cached per pattern and shape) a pattern is split into
a few *components* whose key sets are disjoint and whose union is the pattern. A component orders, and may
subset, the queries and the keys so that in its ordering every query row sees one contiguous interval of keys,
minus at most one contiguous excluded interval:

* local / band parts keep the natural order (row i sees ``[i - left, i + right]``);
* the strided part ``(i - j) mod l = 0`` groups queries and keys by residue mod l (the "transpose" trick of the
  Sparse Transformer), so each residue class becomes a contiguous run;
* fixed "summary" columns and global-token columns keep only those keys; global rows keep only those queries;
* BigBird's window + global + random blocks are a per-query-block list of key blocks at the pattern's own block.

From the intervals come the component's block layout (which ``[bq, bk]`` tiles hold a visible pair) and, per query
block, the list of its key blocks padded to the longest list. A ``lax.scan`` over groups of query blocks gathers
those key/value blocks, computes a masked softmax over only those tiles and the weighted sum (in float32, float64
for float64 inputs). No T x S array is formed: work and memory are proportional to the non-empty tiles. Components
are merged exactly by their logsumexps (their key sets are disjoint). The backward is a ``jax.custom_vjp`` that
keeps only q, k, v, the output and the logsumexp, recomputes each step's probabilities, writes dQ per query block
and scatter-adds dK/dV into the gathered key blocks. Hidden pairs are removed with selects (logits, ``ds``) and
values / q / k enter the products cleaned, so a NaN or Inf at a position the pattern hides from a query never
reaches it, forward or backward.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _autodiff, _numerics, _tiling, core

# "gather" visits only the pattern's non-empty tiles; "reference" is the dense masked formula (the oracle).
IMPLEMENTATIONS = ("gather", "flex", "reference")
# Elements (B * N * rows * gathered keys) of one scan step's logits: 256 KiB of float32.
_STEP_ELEMENTS = 2**16


def _int_field(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  return int(value)


def _set_ints(obj, **minimums: int) -> None:
  for name, minimum in minimums.items():
    object.__setattr__(obj, name, _int_field(f"{type(obj).__name__}.{name}", getattr(obj, name), minimum))


# ----------------------------------------------------------------------------------------------------------
# Components: the trace-time description of what the kernel computes
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Component:
  """One disjoint part of a pattern, in its own query/key order (NumPy arrays, all in component coordinates).

  Row ``a`` (original query ``q_pos[a]``) sees component keys ``c`` (original key ``k_pos[c]``) with
  ``lo[a] <= c <= hi[a]`` and not ``ex_lo[a] <= c <= ex_hi[a]``; ``lo > hi`` means none. ``allowed`` (bool
  ``[num_q_tiles, num_k_tiles]``) further restricts which ``[bq, bk]`` tiles count (BigBird's block lists).
  """
  q_pos: np.ndarray | None      # [Tc]; None = all queries in natural order
  k_pos: np.ndarray | None      # [Sc]; None = all keys in natural order
  lo: np.ndarray                # [Tc]
  hi: np.ndarray                # [Tc]
  ex_lo: np.ndarray | None = None
  ex_hi: np.ndarray | None = None
  allowed: np.ndarray | None = None
  tile: int | None = None       # tile size fixed by the pattern (BigBird's block), else the caller's block_size


def _empty_rows(lo: np.ndarray, hi: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows where ``rows`` is True see nothing."""
  return np.where(rows, 1, lo), np.where(rows, 0, hi)


def _band(T: int, S: int, left: int, right: int, is_causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """Row i sees ``[i - left, i + right]`` (and ``j <= i`` when causal), natural order."""
  i = np.arange(T)
  lo, hi = np.maximum(i - left, 0), np.minimum(i + right, S - 1)
  return lo, (np.minimum(hi, i) if is_causal else hi)


def _all_keys(q_pos: np.ndarray, k_pos: np.ndarray, is_causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """Rows at original positions ``q_pos`` see every key of the sorted ``k_pos`` (``k_pos <= i`` if causal)."""
  hi = np.full(len(q_pos), len(k_pos) - 1)
  if is_causal:
    hi = np.searchsorted(k_pos, q_pos, side="right") - 1
  return np.zeros(len(q_pos), np.int64), hi


def _range_in(k_pos: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Component indices of the sorted keys ``k_pos`` that lie in ``[first, last]`` (a contiguous run)."""
  return np.searchsorted(k_pos, first, side="left"), np.searchsorted(k_pos, last, side="right") - 1


# ----------------------------------------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------------------------------------


class Pattern:
  """Base class. Subclasses define ``_visible(i [R, 1], j [1, C], T, S, is_causal)`` (the definition) and
  ``_components(T, S, is_causal)`` (how the kernel covers it)."""

  def _visible(self, i: np.ndarray, j: np.ndarray, T: int, S: int, is_causal: bool) -> np.ndarray:
    raise NotImplementedError

  def _components(self, T: int, S: int, is_causal: bool) -> list[_Component]:
    raise NotImplementedError

  def _rows_mask(self, rows: np.ndarray, T: int, S: int, is_causal: bool) -> np.ndarray:
    i, j = rows[:, None], np.arange(S)[None, :]
    m = np.broadcast_to(self._visible(i, j, T, S, is_causal), (len(rows), S))
    return m & (j <= i) if is_causal else m

  def dense_mask(self, T: int, S: int, *, is_causal: bool = False) -> np.ndarray:
    """Bool ``[T, S]`` NumPy array, True where query i sees key j (O(T x S): for references and plots)."""
    return np.array(self._rows_mask(np.arange(T), T, S, is_causal))

  def block_layout(self, T: int, S: int, block_size: int, *, is_causal: bool = False) -> np.ndarray:
    """Bool ``[cdiv(T, block_size), cdiv(S, block_size)]``: blocks (natural order) holding a visible pair.

    Built one block row at a time from the definition (O(T x S) time, O(block_size x S) memory). The kernel does
    not use it: it works from the components, whose reorderings make strided/fixed/global parts compact.
    """
    bs = _int_field("block_size", block_size, 1)
    nk = _tiling.cdiv(S, bs)
    out = np.zeros((_tiling.cdiv(T, bs), nk), bool)
    for qb in range(out.shape[0]):
      m = self._rows_mask(np.arange(qb * bs, min(T, (qb + 1) * bs)), T, S, is_causal)
      out[qb] = np.pad(m, ((0, 0), (0, nk * bs - S))).reshape(-1, nk, bs).any(axis=(0, 2))
    return out


@dataclasses.dataclass(frozen=True)
class LocalPattern(Pattern):
  """Sliding window: query i sees keys ``|i - j| <= window`` (``window`` each side); causal: ``i - window <= j <= i``.

  The local attention of Parmar et al. (2018) / Longformer's sliding window with Longformer's ``w = 2 * window``.
  """
  window: int

  def __post_init__(self):
    _set_ints(self, window=0)

  def _visible(self, i, j, T, S, is_causal):
    return np.abs(i - j) <= self.window

  def _components(self, T, S, is_causal):
    return [_Component(None, None, *_band(T, S, self.window, self.window, is_causal))]


@dataclasses.dataclass(frozen=True)
class StridedPattern(Pattern):
  """Strided attention (Child et al. 2019, "Generating long sequences with sparse transformers", eq. for A^(1), A^(2)).

  With causal, query i sees ``{j : i - l < j <= i} U {j <= i : (i - j) mod l = 0}`` (``l = stride``), exactly the
  paper's two heads merged. The paper defines only this autoregressive form; without causal we use its symmetric
  extension ``{|i - j| < l} U {(i - j) mod l = 0}``. With ``l ~ sqrt(T)`` a row sees O(sqrt(T)) keys.
  """
  stride: int

  def __post_init__(self):
    _set_ints(self, stride=1)

  def _visible(self, i, j, T, S, is_causal):
    return (np.abs(i - j) < self.stride) | ((i - j) % self.stride == 0)

  def _components(self, T, S, is_causal):
    l = self.stride
    band = _Component(None, None, *_band(T, S, l - 1, l - 1, is_causal))
    # Residue classes: queries and keys sorted by (position mod l, position), so class r is a contiguous run.
    q_pos = np.argsort(np.arange(T) % l, kind="stable")
    k_pos = np.argsort(np.arange(S) % l, kind="stable")
    counts = np.bincount(np.arange(S) % l, minlength=l)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    r, m = q_pos % l, q_pos // l                       # query i = r + m * l
    lo = starts[r]
    hi = lo + counts[r] - 1
    if is_causal:
      hi = np.minimum(hi, lo + m)                      # keys r + m' * l with m' <= m
    own = lo + m                                       # key j = i, already in the band
    has_own = q_pos < S
    return [band, _Component(q_pos, k_pos, lo, hi, np.where(has_own, own, 1), np.where(has_own, own, 0))]


@dataclasses.dataclass(frozen=True)
class FixedPattern(Pattern):
  """Fixed attention (Child et al. 2019): ``{j : floor(j / l) = floor(i / l)} U {j : j mod l >= l - c}``.

  ``l = block``, ``c = num_global`` "summary" positions at the end of every block; with causal also ``j <= i``
  (the paper's autoregressive form; without causal the same sets, as the paper's bidirectional variant).
  """
  block: int
  num_global: int = 1

  def __post_init__(self):
    _set_ints(self, block=1, num_global=0)
    if self.num_global > self.block:
      raise ValueError(f"FixedPattern: num_global={self.num_global} must be <= block={self.block}")

  def _visible(self, i, j, T, S, is_causal):
    l = self.block
    return (i // l == j // l) | (j % l >= l - self.num_global)

  def _components(self, T, S, is_causal):
    l, i = self.block, np.arange(T)
    first = (i // l) * l
    hi = np.minimum(first + l - 1, S - 1)
    comps = [_Component(None, None, first, np.minimum(hi, i) if is_causal else hi)]
    k_pos = np.flatnonzero(np.arange(S) % l >= l - self.num_global)
    if len(k_pos):
      ex_lo, ex_hi = _range_in(k_pos, first, first + l - 1)   # summary keys of i's own block: already counted
      comps.append(_Component(None, k_pos, *_all_keys(i, k_pos, is_causal), ex_lo, ex_hi))
    return comps


@functools.lru_cache(maxsize=32)
def _bigbird_blocks(pattern: BigBirdPattern, T: int, S: int, is_causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(layout [nq, nk] bool, global_query_blocks [nq] bool)`` at the pattern's block granularity."""
  b = pattern.block
  nq, nk = _tiling.cdiv(T, b), _tiling.cdiv(S, b)

  def global_blocks(n):
    first, last = _tiling.cdiv(pattern.global_blocks, 2), pattern.global_blocks // 2
    g = np.arange(n)
    return (g < first) | (g >= n - last)

  gq, gk = global_blocks(nq), global_blocks(nk)
  qb, kb = np.arange(nq)[:, None], np.arange(nk)[None, :]
  layout = (np.abs(qb - kb) <= (pattern.window_blocks - 1) // 2) & (pattern.window_blocks > 0)
  layout |= gq[:, None] | gk[None, :]
  rng = np.random.default_rng(pattern.seed)
  last_row = np.minimum((np.arange(nq) + 1) * b, T) - 1
  for q in np.flatnonzero(~gq):
    cand = ~layout[q]
    if is_causal:
      cand &= np.arange(nk) * b <= last_row[q]
    cand = np.flatnonzero(cand)
    layout[q, rng.choice(cand, size=min(pattern.random_blocks, len(cand)), replace=False)] = True
  return layout, gq


@dataclasses.dataclass(frozen=True)
class BigBirdPattern(Pattern):
  """BigBird block sparsity (Zaheer et al. 2020, "Big Bird: transformers for longer sequences", ITC form).

  Positions are cut into blocks of ``block`` tokens (the paper's base model: 64). Global blocks are the first
  ``ceil(g / 2)`` and the last ``floor(g / 2)`` blocks (``g = global_blocks``; g = 2 gives the first and last block,
  as the paper's implementation): a global query block sees every key, every query sees the global key blocks.
  Every other query block ``q`` also sees the ``window_blocks`` (odd, or 0) blocks ``|q - k| <= (w - 1) / 2`` and
  ``random_blocks`` blocks drawn uniformly without replacement from the rest (only from blocks holding a visible key
  when causal), with ``numpy.random.default_rng(seed)``, query block by query block. ``sparse_attention`` runs this
  pattern in tiles of ``block`` whatever its ``block_size``.
  """
  window_blocks: int = 3
  global_blocks: int = 2
  random_blocks: int = 3
  seed: int = 0
  block: int = 64

  def __post_init__(self):
    _set_ints(self, window_blocks=0, global_blocks=0, random_blocks=0, seed=0, block=1)
    if self.window_blocks % 2 == 0 and self.window_blocks:
      raise ValueError(f"BigBirdPattern: window_blocks={self.window_blocks} must be odd (centred) or 0")

  def _visible(self, i, j, T, S, is_causal):
    layout, _ = _bigbird_blocks(self, T, S, is_causal)
    return layout[i // self.block, j // self.block]

  def _components(self, T, S, is_causal):
    layout, gq = _bigbird_blocks(self, T, S, is_causal)
    i = np.arange(T)
    g_rows = gq[i // self.block]
    lo, hi = _all_keys(i, np.arange(S), is_causal)
    rest = _Component(None, None, *_empty_rows(lo, hi, g_rows), allowed=layout & ~gq[:, None], tile=self.block)
    q_pos = np.flatnonzero(g_rows)
    return [rest, _Component(q_pos, None, *_all_keys(q_pos, np.arange(S), is_causal))]


@dataclasses.dataclass(frozen=True)
class GlobalTokensPattern(Pattern):
  """Longformer (Beltagy et al. 2020): sliding window plus global tokens.

  Query i sees ``|i - j| <= window`` (Longformer's ``w = 2 * window``), every query sees the keys at
  ``global_tokens`` and the queries at ``global_tokens`` see every key: ``|i - j| <= window or i in G or j in G``.
  Positions beyond T (queries) or S (keys) are ignored.
  """
  window: int
  global_tokens: tuple[int, ...] = (0,)

  def __post_init__(self):
    _set_ints(self, window=0)
    try:
      tokens = tuple(sorted({_int_field("global token", t, 0) for t in self.global_tokens}))
    except TypeError:
      raise ValueError(f"GlobalTokensPattern: global_tokens must be ints >= 0; got {self.global_tokens!r}") from None
    object.__setattr__(self, "global_tokens", tokens)

  def _visible(self, i, j, T, S, is_causal):
    g = np.asarray(self.global_tokens, np.int64)
    return (np.abs(i - j) <= self.window) | np.isin(i, g) | np.isin(j, g)

  def _components(self, T, S, is_causal):
    g = np.asarray(self.global_tokens, np.int64)
    g_q, g_k = g[g < T], g[g < S]
    i = np.arange(T)
    g_row = np.isin(i, g_q)
    comps = [_Component(None, None, *_empty_rows(*_band(T, S, self.window, self.window, is_causal), g_row))]
    if len(g_k):   # global columns outside the window, for ordinary rows
      ex = _range_in(g_k, i - self.window, i + self.window)
      comps.append(_Component(None, g_k, *_empty_rows(*_all_keys(i, g_k, is_causal), g_row), *ex))
    if len(g_q):   # global rows see everything
      comps.append(_Component(g_q, None, *_all_keys(g_q, np.arange(S), is_causal)))
    return comps


# ----------------------------------------------------------------------------------------------------------
# Plans: a component's tiles as padded per-query-block lists (NumPy, cached)
# ----------------------------------------------------------------------------------------------------------


class _Tables(NamedTuple):
  """Per-step kernel tables (int32/bool arrays; ``steps`` leading, ``P`` query blocks per step)."""
  idx: Any     # [steps, P, maxk] key-tile indices
  valid: Any   # [steps, P, maxk] False on padding slots
  lo: Any      # [steps, P, bq] row intervals in component key coordinates
  hi: Any
  ex_lo: Any
  ex_hi: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  comp: _Component
  Tc: int
  Sc: int
  bq: int
  bk: int
  P: int
  steps: int
  maxk: int
  num_k_tiles: int
  tiles: int            # non-empty tiles computed (padding slots excluded)
  tables: _Tables       # NumPy


def _interval_layout(lo, hi, bq: int, bk: int, nq: int, nk: int) -> np.ndarray:
  """Bool ``[nq, nk]``: tiles that some row's interval touches (difference array per query tile)."""
  rows = np.flatnonzero(lo <= hi)
  diff = np.zeros((nq, nk + 1), np.int32)
  np.add.at(diff, (rows // bq, lo[rows] // bk), 1)
  np.add.at(diff, (rows // bq, hi[rows] // bk + 1), -1)
  return np.cumsum(diff[:, :nk], axis=1) > 0


def _make_plan(comp: _Component, T: int, S: int, block_size: int, rows_x_heads: int) -> _Plan | None:
  Tc = T if comp.q_pos is None else len(comp.q_pos)
  Sc = S if comp.k_pos is None else len(comp.k_pos)
  if Tc == 0 or Sc == 0:
    return None
  tile = comp.tile or block_size
  bq, bk = min(tile, Tc), min(tile, Sc)
  nq, nk = _tiling.cdiv(Tc, bq), _tiling.cdiv(Sc, bk)
  layout = _interval_layout(comp.lo, comp.hi, bq, bk, nq, nk)
  if comp.allowed is not None:
    layout &= comp.allowed
  counts = layout.sum(axis=1)
  maxk = int(counts.max())
  if maxk == 0:
    return None
  order = np.argsort(~layout, axis=1, kind="stable")[:, :maxk]   # each row's tiles first, in order
  valid = np.take_along_axis(layout, order, axis=1)
  P = max(1, min(nq, _STEP_ELEMENTS // (rows_x_heads * bq * maxk * bk)))
  steps = _tiling.cdiv(nq, P)
  P = _tiling.cdiv(nq, steps)

  def rows(x, fill):
    x = np.full(steps * P * bq, fill, np.int32) if x is None else np.pad(x, (0, steps * P * bq - Tc),
                                                                            constant_values=fill)
    return x.astype(np.int32).reshape(steps, P, bq)

  def blocks(x, fill):
    return np.pad(x, ((0, steps * P - nq), (0, 0)), constant_values=fill).reshape(steps, P, maxk)

  tables = _Tables(blocks(order.astype(np.int32), 0), blocks(valid, False), rows(comp.lo, 1), rows(comp.hi, 0),
                   rows(comp.ex_lo, 1), rows(comp.ex_hi, 0))
  return _Plan(comp, Tc, Sc, bq, bk, P, steps, maxk, nk, int(counts.sum()), tables)


@functools.lru_cache(maxsize=64)
def _plans(pattern: Pattern, T: int, S: int, block_size: int, is_causal: bool, rows_x_heads: int
           ) -> tuple[_Plan, ...]:
  plans = (_make_plan(c, T, S, block_size, rows_x_heads) for c in pattern._components(T, S, is_causal))
  return tuple(p for p in plans if p is not None)


def plan_cost(pattern: Pattern, T: int, S: int, *, block_size: int = 128, is_causal: bool = False) -> dict:
  """What :func:`sparse_attention` computes for this pattern and shape.

  Returns ``tiles`` (non-empty tiles over all components), ``computed_scores`` (their query x key entries) and
  ``dense_scores`` (``T * S``), so the cost can be compared with a dense masked softmax.
  """
  plans = _plans(_check_pattern(pattern), int(T), int(S), _int_field("block_size", block_size, 1),
                 bool(is_causal), 1)
  return dict(tiles=sum(p.tiles for p in plans), computed_scores=sum(p.tiles * p.bq * p.bk for p in plans),
              dense_scores=int(T) * int(S), components=len(plans))


# ----------------------------------------------------------------------------------------------------------
# The kernel: scan over groups of query tiles, gathered key tiles, custom_vjp recomputing backward
# ----------------------------------------------------------------------------------------------------------


class _Config(NamedTuple):
  scale: float
  bk: int
  has_exclusion: bool
  mm_precision: Any
  out_dtype: Any
  compute_dtype: Any = np.dtype(np.float32)   # promote_types(input dtype, float32)


def _mm(cfg: _Config, spec: str, a, b):
  return _numerics.einsum(spec, a, b, dtype=cfg.compute_dtype, precision=cfg.mm_precision)


def _gather_tiles(x_tiles, idx):
  """``x_tiles [B, K, nk, bk, D]``, ``idx [P, maxk]`` -> ``[B, K, P, maxk * bk, D]``."""
  B, K, _, bk, D = x_tiles.shape
  P, maxk = idx.shape
  return jnp.take(x_tiles, idx.reshape(-1), axis=2).reshape(B, K, P, maxk * bk, D)


def _step_logits(cfg: _Config, q_s, k_g, t: _Tables, G: int):
  """``(s [B, K, P, G, bq, C], mask [P, bq, C])``: one step's scaled logits in the compute dtype, ``-inf`` (a
  select) where not visible (C = maxk * bk). A non-finite query or key row makes its logits NaN (an Inf could give
  a -inf logit and silently hide a key the row sees); hidden pairs then become -inf."""
  B, K, P, M, _ = q_s.shape
  bq = M // G
  s = _mm(cfg, "bkpmh,bkpch->bkpmc", q_s, k_g) * cfg.scale
  bad = ~_numerics.finite_rows(q_s)[..., None] | ~_numerics.finite_rows(k_g)[:, :, :, None, :]  # [B, K, P, M, C]
  s = jnp.where(bad, jnp.nan, s)
  cols = (t.idx[:, :, None] * cfg.bk + jnp.arange(cfg.bk, dtype=jnp.int32)[None, None, :]).reshape(P, 1, -1)
  ok = jnp.repeat(t.valid, cfg.bk, axis=1)[:, None, :]
  mask = ok & (cols >= t.lo[:, :, None]) & (cols <= t.hi[:, :, None])              # [P, bq, C]
  if cfg.has_exclusion:
    mask = mask & ~((cols >= t.ex_lo[:, :, None]) & (cols <= t.ex_hi[:, :, None]))
  s = s.reshape(B, K, P, G, bq, -1)
  # The barrier keeps XLA:CPU (jax 0.12) from fusing these logits into the softmax: fused, a query row holding a
  # NaN came out as zeros, or as the clean row's result, on some executions of one executable.
  return lax.optimization_barrier(jnp.where(mask[None, None, :, None], s, -jnp.inf)), mask


def _forward(cfg: _Config, q_steps, k_tiles, v_tiles, tabs: _Tables):
  """``q_steps [steps, B, K, P, G*bq, H]`` -> ``(out [steps, B, K, P, G*bq, Hv], lse [steps, B, K, P, G, bq])``.

  Gathered tiles hold keys some rows may not see (other rows' keys, padding slots): the values enter cleaned and
  rows that see a non-finite value are set to NaN, so hidden garbage never meets a multiply.
  """
  G = q_steps.shape[4] // tabs.lo.shape[2]

  def step(_, xs):
    q_s, t = xs
    B, K, P, M, _ = q_s.shape
    s, mask = _step_logits(cfg, q_s, _gather_tiles(k_tiles, t.idx), t, G)
    w, lse = core.masked_softmax(s)
    w = w.reshape(B, K, P, M, -1).astype(v_tiles.dtype)
    v_g = _gather_tiles(v_tiles, t.idx)                                           # [B, K, P, C, Hv]
    v_bad = ~_numerics.finite_rows(v_g)                                                   # [B, K, P, C]
    sees_bad = jnp.any(mask[None, None, :, None] & v_bad[:, :, :, None, None, :], axis=-1)   # [B, K, P, G, bq]
    out = _mm(cfg, "bkpmc,bkpch->bkpmh", w, _numerics.clean(v_g))
    sees_bad = jnp.broadcast_to(sees_bad, (B, K, P, G, M // G)).reshape(B, K, P, M)
    out = jnp.where(sees_bad[..., None], jnp.nan, out)
    return None, (out.astype(cfg.out_dtype), lse)

  return lax.scan(step, None, (q_steps, tabs))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(cfg: _Config, q_steps, k_tiles, v_tiles, tabs: _Tables):
  return _forward(cfg, q_steps, k_tiles, v_tiles, tabs)


def _kernel_fwd(cfg, q_steps, k_tiles, v_tiles, tabs):
  out, lse = _forward(cfg, q_steps, k_tiles, v_tiles, tabs)
  # Finite residuals on valid inputs (jax.debug_infs checks them): rows with no key store 0; their logits are all
  # -inf, so the backward's p = exp(-inf - 0) = 0 all the same.
  lse_res = jnp.where(jnp.isneginf(lse), jnp.zeros_like(lse), lse)
  return (out, lse), (q_steps, k_tiles, v_tiles, tabs, out, lse_res)


def _kernel_bwd(cfg, res, cts):
  q_steps, k_tiles, v_tiles, tabs, out, lse = res
  d_out, d_lse = cts
  steps, B, K, P, M, H = q_steps.shape
  G = M // tabs.lo.shape[2]
  dtype = q_steps.dtype
  cd = cfg.compute_dtype
  rows = lambda x: x.reshape(lse.shape + x.shape[-1:])
  delta = _numerics.backward_delta(rows(out), rows(d_out), d_lse, cd, spec="...h,...h->...")
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(cd))

  def step(carry, xs):
    dk_acc, dv_acc = carry
    q_s, do_s, lse_s, delta_s, t = xs
    k_g, v_g = _gather_tiles(k_tiles, t.idx), _gather_tiles(v_tiles, t.idx)
    s, mask = _step_logits(cfg, q_s, k_g, t, G)
    # A select, not exp(-inf - lse) alone: that is NaN at hidden pairs of a row whose lse is NaN (a NaN query).
    p = jnp.where(mask[None, None, :, None], jnp.exp(s - lse_s[..., None]), 0.0)     # [B, K, P, G, bq, C]
    do_s = do_s.astype(dtype)
    dv_g = _mm(cfg, "bkpmc,bkpmh->bkpch", p.reshape(B, K, P, M, -1).astype(dtype), do_s)
    dp = _mm(cfg, "bkpmh,bkpch->bkpmc", do_s, v_g).reshape(p.shape)
    # Selects, not multiplies by p = 0: a non-finite value (dp) or delta at a hidden pair stays there, and ds meets
    # only cleaned q / k.
    ds = jnp.where(mask[None, None, :, None], p * (dp - delta_s[..., None]), 0.0)
    ds = (ds * cfg.scale).reshape(B, K, P, M, -1).astype(dtype)
    dq_s = _mm(cfg, "bkpmc,bkpch->bkpmh", ds, _numerics.clean(k_g))
    dk_g = _mm(cfg, "bkpmc,bkpmh->bkpch", ds, _numerics.clean(q_s))
    flat = t.idx.reshape(-1)
    dk_acc = dk_acc.at[:, :, flat].add(dk_g.reshape(dk_acc.shape[:2] + (-1,) + dk_acc.shape[3:]))
    dv_acc = dv_acc.at[:, :, flat].add(dv_g.reshape(dv_acc.shape[:2] + (-1,) + dv_acc.shape[3:]))
    return (dk_acc, dv_acc), dq_s.astype(dtype)

  init = (jnp.zeros(k_tiles.shape, cd), jnp.zeros(v_tiles.shape, cd))
  (dk, dv), dq = lax.scan(step, init, (q_steps, d_out, lse, delta, tabs))
  return dq, dk.astype(k_tiles.dtype), dv.astype(v_tiles.dtype), None


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _run_plan(plan: _Plan, q, k, v, scale: float, out_dtype) -> tuple[jax.Array, jax.Array]:
  """One component: ``(out [B, T, N, Hv] in out_dtype, lse [B, N, T])`` in original query order."""
  B, T, N, H = q.shape
  K, Hv = v.shape[2:]
  G = N // K
  comp, bq, bk, P, steps = plan.comp, plan.bq, plan.bk, plan.P, plan.steps
  if comp.q_pos is not None:
    q = jnp.take(q, jnp.asarray(comp.q_pos, jnp.int32), axis=1)
  if comp.k_pos is not None:
    k_pos = jnp.asarray(comp.k_pos, jnp.int32)
    k, v = jnp.take(k, k_pos, axis=1), jnp.take(v, k_pos, axis=1)
  Tp = steps * P * bq
  q_steps = _numerics.pad_axis(q, 1, Tp).reshape(B, steps, P, bq, K, G, H)
  q_steps = jnp.transpose(q_steps, (1, 0, 4, 2, 5, 3, 6)).reshape(steps, B, K, P, G * bq, H)

  def key_tiles(x):
    x = _numerics.pad_axis(x, 1, plan.num_k_tiles * bk).reshape(B, plan.num_k_tiles, bk, K, x.shape[-1])
    return jnp.transpose(x, (0, 3, 1, 2, 4))

  cfg = _Config(scale=scale, bk=bk, has_exclusion=comp.ex_lo is not None,
                mm_precision=_numerics.matmul_precision(q.dtype), out_dtype=out_dtype,
                compute_dtype=_numerics.compute_dtype(q.dtype))
  tabs = _Tables(*(jnp.asarray(x) for x in plan.tables))
  out, lse = _kernel(cfg, q_steps, key_tiles(k), key_tiles(v), tabs)
  out = jnp.transpose(out.reshape(steps, B, K, P, G, bq, Hv), (1, 0, 3, 5, 2, 4, 6)).reshape(B, Tp, N, Hv)
  lse = jnp.transpose(lse, (1, 2, 4, 0, 3, 5)).reshape(B, N, Tp)
  if comp.q_pos is None:
    return out[:, :T], lse[:, :, :T]
  # Back to original rows; rows outside the component read padding row Tp (zeros, -inf).
  inverse = np.full(T, Tp, np.int32)
  inverse[comp.q_pos] = np.arange(plan.Tc, dtype=np.int32)
  out = jnp.concatenate([out, jnp.zeros((B, 1, N, Hv), out.dtype)], axis=1)
  lse = jnp.concatenate([lse, jnp.full((B, N, 1), -jnp.inf, lse.dtype)], axis=2)
  inverse = jnp.asarray(inverse)
  return jnp.take(out, inverse, axis=1), jnp.take(lse, inverse, axis=2)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


def _check_pattern(pattern) -> Pattern:
  if not isinstance(pattern, Pattern):
    raise ValueError(f"pattern must be an attention_jax.sparse pattern (LocalPattern, StridedPattern, FixedPattern, "
                     f"BigBirdPattern, GlobalTokensPattern); got {type(pattern).__name__}: {pattern!r}")
  return pattern


def _validate(query, key, value, pattern, block_size, implementation, is_causal, scale
              ) -> tuple[core.AttentionInputs, str, int]:
  inp = core.prepare_inputs(query, key, value, scale=scale, is_causal=is_causal)
  _check_pattern(pattern)
  block_size = _int_field("block_size", block_size, 1)
  if implementation is None or implementation == "auto":
    implementation = "gather"
  if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation={implementation!r} for sparse_attention; choose one of "
                     f"{('auto',) + IMPLEMENTATIONS}")
  return inp, implementation, block_size


def _sparse_core(inp: core.AttentionInputs, pattern: Pattern, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Validated, non-empty inputs through the block gather: ``(out [B,T,N,Hv], lse [B,N,T], -inf: no key)``."""
  B, T, N, _ = inp.query.shape
  S, Hv = inp.value.shape[1], inp.value.shape[-1]
  cd = _numerics.compute_dtype(inp.query.dtype)
  scale = _numerics.static_float("scale", inp.scale, path="sparse_attention's gather path")
  plans = _plans(pattern, T, S, block_size, inp.is_causal, B * N)
  if not plans:
    return jnp.zeros((B, T, N, Hv), inp.query.dtype), jnp.full((B, N, T), -jnp.inf, cd)
  if len(plans) == 1:
    return _run_plan(plans[0], inp.query, inp.key, inp.value, scale, inp.query.dtype)
  out, lse = _numerics.merge_partials([_run_plan(p, inp.query, inp.key, inp.value, scale, cd) for p in plans])
  return out.astype(inp.query.dtype), lse


def sparse_attention(query, key, value, pattern: Pattern, *, is_causal: bool = False, block_size: int = 128,
                     implementation: str | None = None, scale: float | None = None,
                     return_residual: bool = False):
  """Softmax attention restricted to ``pattern``, computing only its non-empty ``block_size`` tiles.

  Args:
    query: ``[*B, T, N, H]``; key: ``[*B, S, K, H]``; value: ``[*B, S, K, Hv]`` with ``N % K == 0`` (GQA; K/V are
      not repeated). ``*B`` is zero or more batch dims; ``Hv`` may differ from H.
    pattern: a :class:`Pattern`; query i sees key j where ``pattern.dense_mask(T, S, is_causal=...)`` is True.
    is_causal: also require ``j <= i``.
    block_size: query/key tile length, a positive int (BigBird uses its own ``block``). T and S need not be
      multiples of it.
    implementation: None/"auto" or "gather" (block gather, O(non-empty tiles)); "flex" (the pattern as a mask_mod
      through :func:`attention_jax.flex.flex_attention` with blocks of ``block_size``: the backend's flex kernel
      on GPU / TPU, the blockwise path elsewhere); "reference" (the dense masked formula, O(T x S)).
    scale: logit scale, default ``1/sqrt(H)`` (a concrete number for "gather").
    return_residual: also return the logsumexp as ``jax.nn`` does: ``[*B, T, N]``, input dtype, no gradient;
      rows with no visible key report the dtype's most negative finite value.

  Returns:
    ``[*B, T, N, Hv]`` in the input dtype (rows with no visible key are zeros), or ``(output, logsumexp)``.
    A NaN/Inf at a position the pattern hides from a query never reaches that query, forward or backward.
    Forward-mode and second-order derivatives are computed through :func:`sparse_attention_reference`.
  """
  inp, implementation, block_size = _validate(query, key, value, pattern, block_size, implementation, is_causal,
                                              scale)
  if implementation == "reference" or _autodiff.needs_plain_path(inp.query, inp.key, inp.value):
    # The dense formula: also what forward-mode / second-order differentiation needs (the gather's custom VJP
    # cannot be differentiated in forward mode).
    return sparse_attention_reference(query, key, value, pattern, is_causal=is_causal, block_size=block_size,
                                      scale=scale, return_residual=return_residual)
  if implementation == "flex":
    from attention_jax import flex, mods
    T, S = inp.query.shape[1], inp.key.shape[1]
    if 0 in (T, S):
      return sparse_attention_reference(query, key, value, pattern, is_causal=is_causal, block_size=block_size,
                                        scale=scale, return_residual=return_residual)
    bm = flex.create_block_mask(mods.from_pattern(pattern, T, S, is_causal=inp.is_causal), None, None, T, S,
                                block_size=block_size)
    return flex.flex_attention(query, key, value, None, bm, scale=scale, return_residual=return_residual)
  return core.run_custom(_sparse_core, inp, options=(("pattern", pattern), ("block_size", block_size)),
                         return_residual=return_residual, custom_vjp=False)


def sparse_attention_reference(query, key, value, pattern: Pattern, *, is_causal: bool = False,
                               block_size: int = 128, implementation: str | None = None,
                               scale: float | None = None, return_residual: bool = False):
  """Dense masked softmax with ``pattern.dense_mask`` (O(T x S)); :func:`sparse_attention`'s signature.

  Differentiable to any order (forward mode, Hessians).
  """
  inp, _, _ = _validate(query, key, value, pattern, block_size, implementation, is_causal, scale)
  T, S = inp.query.shape[1], inp.key.shape[1]
  mask = None if 0 in (T, S) else jnp.asarray(pattern.dense_mask(T, S, is_causal=inp.is_causal))   # [T, S]
  return core.reference_attention(query, key, value, mask=mask, scale=scale, return_residual=return_residual)
