"""A library of ``score_mod`` / ``mask_mod`` functions for :func:`attention_jax.flex.flex_attention`.

Mask mods return a :class:`attention_jax.flex.MaskMod`: the definition on scalar indices plus a block classifier,
so :func:`attention_jax.flex.create_block_mask` classifies whole blocks from their corner positions (or per-block
document ranges, or a summed-area table of a pattern's layout) without evaluating elements. They compose with
``&`` and ``|``::

    bm = flex.create_block_mask(mods.causal() & mods.sliding_window((256, 0)), None, None, T, T)
    out = flex.flex_attention(q, k, v, mods.alibi(mods.alibi_slopes(N)), bm)

Score mods are plain functions ``(score, b, n, q_idx, kv_idx) -> score``; arrays they close over (ALiBi slopes,
a T5 bias table) receive gradients through ``flex_attention``.

``dot_product_attention``'s built-in options map to mods: ``is_causal`` -> :func:`causal`, ``local_window_size``
-> :func:`sliding_window`, ``query_seq_lengths`` / ``key_value_seq_lengths`` -> :func:`lengths`, segment ids ->
:func:`document`, ``logits_soft_cap`` -> :func:`soft_cap`, ``bias`` -> :func:`bias`. The patterns of
:mod:`attention_jax.sparse` become mask mods with :func:`from_pattern`.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks as masks_lib
from attention_jax import sparse
from attention_jax._checks import positive_int
from attention_jax.flex import MaskMod


def _bounds(qb, kb, bq: int, bk: int, T: int, S: int):
  """First and last real positions of query block ``qb`` and key block ``kb``."""
  q_lo, k_lo = qb * bq, kb * bk
  return q_lo, jnp.minimum(q_lo + bq, T) - 1, k_lo, jnp.minimum(k_lo + bk, S) - 1


def _classifier(rule: Callable) -> Callable:
  """A block classifier from ``rule(b, n, q_lo, q_hi, k_lo, k_hi) -> (may, all)`` on real block bounds."""
  def blocks(bq, bk, T, S):
    def classify(b, n, qb, kb):
      return rule(b, n, *_bounds(qb, kb, bq, bk, T, S))
    return classify
  return blocks


# ----------------------------------------------------------------------------------------------------------
# Mask mods
# ----------------------------------------------------------------------------------------------------------


def causal() -> MaskMod:
  """Query i sees keys ``j <= i`` (top-left aligned, as ``is_causal=True``)."""
  return MaskMod(lambda b, n, i, j: j <= i,
                 _classifier(lambda b, n, ql, qh, kl, kh: (kl <= qh, kh <= ql)), "causal")


def sliding_window(window: int | tuple[int, int]) -> MaskMod:
  """Query i sees ``i - left <= j <= i + right`` (``window`` int: ``left = right = window``), as
  ``local_window_size``. ``causal() & sliding_window((w, 0))`` is a causal window of ``w + 1`` keys."""
  left, right = masks_lib.normalize_window(window)

  def rule(b, n, ql, qh, kl, kh):
    may = (kl <= qh + right) & (kh >= ql - left)
    return may, (kh <= ql + right) & (kl >= qh - left)
  return MaskMod(lambda b, n, i, j: (j >= i - left) & (j <= i + right), _classifier(rule),
                 f"sliding_window({left}, {right})")


def _per_batch(name: str, x) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim > 1 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an int or an integer array [B]; got shape={x.shape} dtype={x.dtype}")
  return x.astype(jnp.int32)


def _at(x: jax.Array, b):
  return x if x.ndim == 0 else x[b]


def lengths(q_lengths=None, kv_lengths=None) -> MaskMod:
  """Padding: query i of row b exists when ``i < q_lengths[b]``, key j when ``j < kv_lengths[b]`` (ints or
  ``[B]`` arrays, as ``query_seq_lengths`` / ``key_value_seq_lengths``)."""
  ql_ = None if q_lengths is None else _per_batch("q_lengths", q_lengths)
  kl_ = None if kv_lengths is None else _per_batch("kv_lengths", kv_lengths)

  def fn(b, n, i, j):
    ok = jnp.asarray(True)
    if ql_ is not None:
      ok = ok & (i < _at(ql_, b))
    if kl_ is not None:
      ok = ok & (j < _at(kl_, b))
    return ok

  def rule(b, n, ql, qh, kl, kh):
    may, every = jnp.asarray(True), jnp.asarray(True)
    if ql_ is not None:
      may, every = may & (ql < _at(ql_, b)), every & (qh < _at(ql_, b))
    if kl_ is not None:
      may, every = may & (kl < _at(kl_, b)), every & (kh < _at(kl_, b))
    return may, every
  return MaskMod(fn, _classifier(rule), "lengths")


def prefix_lm(prefix_lengths) -> MaskMod:
  """Prefix-LM: every query sees the first ``prefix_lengths[b]`` keys (bidirectional prefix), and keys ``j <= i``
  (causal) after them. ``prefix_lengths``: an int or ``[B]`` array."""
  prefix = _per_batch("prefix_lengths", prefix_lengths)

  def rule(b, n, ql, qh, kl, kh):
    p = _at(prefix, b)
    return (kl <= qh) | (kl < p), (kh <= ql) | (kh < p)
  return MaskMod(lambda b, n, i, j: (j <= i) | (j < _at(prefix, b)), _classifier(rule), "prefix_lm")


def _block_min_max(ids: jax.Array, block: int, length: int):
  """Per-block min and max of ``ids [Bi, length]`` over real positions: ``[Bi, blocks]`` each."""
  nb = -(-length // block)
  pad = nb * block - length
  info = jnp.iinfo(jnp.int32)
  lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=info.max).reshape(ids.shape[0], nb, block).min(-1)
  hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=info.min).reshape(ids.shape[0], nb, block).max(-1)
  return lo, hi


def document(q_doc_ids, kv_doc_ids=None) -> MaskMod:
  """Document masking (packed sequences): query i sees key j when they carry the same id. Ids are ``[T]`` (shared
  by the batch; build the mask with ``B=None``) or ``[B, T]``, traced or not; ``kv_doc_ids`` default to the query
  ids (self-attention). Blocks are classified from each block's id range: a query and key block whose ranges do
  not meet are empty, a pair of blocks holding one same id is full (exact for sorted ids, safe for any)."""
  q_ids = jnp.asarray(q_doc_ids)
  kv_ids = q_ids if kv_doc_ids is None else jnp.asarray(kv_doc_ids)
  for name, x in (("q_doc_ids", q_ids), ("kv_doc_ids", kv_ids)):
    if x.ndim not in (1, 2) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array [T] or [B, T]; got shape={x.shape} dtype={x.dtype}")
  if q_ids.ndim != kv_ids.ndim or (q_ids.ndim == 2 and q_ids.shape[0] != kv_ids.shape[0]):
    raise ValueError(f"q_doc_ids {q_ids.shape} and kv_doc_ids {kv_ids.shape} must both be [T] / [S] or [B, T] / "
                     "[B, S] with the same B")
  batched = q_ids.ndim == 2
  q2, kv2 = q_ids.astype(jnp.int32).reshape(-1, q_ids.shape[-1]), kv_ids.astype(jnp.int32).reshape(
      -1, kv_ids.shape[-1])

  def fn(b, n, i, j):
    row = b if batched else 0
    return q2[row, i] == kv2[row, j]

  def blocks(bq, bk, T, S):
    if (q2.shape[1], kv2.shape[1]) != (T, S):
      raise ValueError(f"document ids of lengths (T, S)=({q2.shape[1]}, {kv2.shape[1]}) do not match the block "
                       f"mask's (T, S)=({T}, {S})")
    q_lo, q_hi = _block_min_max(q2, bq, T)
    k_lo, k_hi = _block_min_max(kv2, bk, S)

    def classify(b, n, qb, kb):
      row = b if batched else 0
      a, c, d, e = q_lo[row, qb], q_hi[row, qb], k_lo[row, kb], k_hi[row, kb]
      return (a <= e) & (d <= c), (a == c) & (d == e) & (a == d)
    return classify
  return MaskMod(fn, blocks, "document")


def from_pattern(pattern: sparse.Pattern, T: int, S: int, *, is_causal: bool = False) -> MaskMod:
  """A pattern of :mod:`attention_jax.sparse` (Local, Strided, Fixed, BigBird, GlobalTokens) as a mask mod on a
  ``T x S`` grid, ``& causal()`` when ``is_causal`` (BigBird's random blocks then come from visible blocks, as
  in ``sparse_attention``). Its visibility equals ``pattern.dense_mask(T, S, is_causal=is_causal)``."""
  T, S = positive_int("T", T), positive_int("S", S)
  if isinstance(pattern, sparse.LocalPattern):
    mod = local(pattern.window)
  elif isinstance(pattern, sparse.StridedPattern):
    mod = strided(pattern.stride)
  elif isinstance(pattern, sparse.FixedPattern):
    mod = fixed(pattern.block, pattern.num_global)
  elif isinstance(pattern, sparse.BigBirdPattern):
    mod = bigbird(pattern, T, S, is_causal=is_causal)
  elif isinstance(pattern, sparse.GlobalTokensPattern):
    mod = global_tokens(pattern.window, pattern.global_tokens)
  else:
    raise TypeError(f"from_pattern takes a pattern of attention_jax.sparse; got {type(pattern).__name__}")
  return mod & causal() if is_causal else mod


def local(window: int) -> MaskMod:
  """``sparse.LocalPattern``: ``|i - j| <= window``."""
  return sliding_window(positive_int("window", window + 1) - 1)


def strided(stride: int) -> MaskMod:
  """``sparse.StridedPattern`` (Child et al. 2019): ``|i - j| < stride`` or ``(i - j) mod stride == 0``."""
  l = positive_int("stride", stride)

  def rule(b, n, ql, qh, kl, kh):
    lo_d, hi_d = ql - kh, qh - kl                      # every difference i - j of the block lies in [lo_d, hi_d]
    multiple = jnp.floor_divide(hi_d, l) * l >= lo_d   # some multiple of l in the range
    near = (hi_d > -l) & (lo_d < l)
    return multiple | near, (jnp.maximum(hi_d, -lo_d) < l) | (l == 1)
  return MaskMod(lambda b, n, i, j: (jnp.abs(i - j) < l) | ((i - j) % l == 0), _classifier(rule),
                 f"strided({l})")


def fixed(block: int, num_global: int = 1) -> MaskMod:
  """``sparse.FixedPattern`` (Child et al. 2019): ``i // l == j // l`` or ``j mod l >= l - c``."""
  l, c = positive_int("block", block), int(num_global)
  if not 0 <= c <= l:
    raise ValueError(f"fixed: num_global={num_global} must lie in [0, block={block}]")

  def rule(b, n, ql, qh, kl, kh):
    same = (ql // l <= kh // l) & (kl // l <= qh // l)
    summary = (c > 0) & ((kh - kl + 1 >= l) | (kl % l >= l - c) | ((kl // l) * l + l - c <= kh))
    one_block = (ql // l == qh // l) & (kl // l == kh // l) & (ql // l == kl // l)
    all_summary = (kl // l == kh // l) & (kl % l >= l - c)
    return same | summary, one_block | all_summary
  return MaskMod(lambda b, n, i, j: (i // l == j // l) | (j % l >= l - c), _classifier(rule),
                 f"fixed({l}, {c})")


def _table_blocks(table: np.ndarray, unit_q: int, unit_k: int):
  """A classifier for ``visible[i, j] = table[i // unit_q, j // unit_k]`` (a concrete bool table), from a
  summed-area table: a block is may-visible when its sub-rectangle of ``table`` holds a True, full when it holds
  only Trues."""
  sat = np.zeros((table.shape[0] + 1, table.shape[1] + 1), np.int64)
  sat[1:, 1:] = np.cumsum(np.cumsum(table.astype(np.int64), 0), 1)
  sat = jnp.asarray(sat, jnp.int32 if sat.max() < 2 ** 31 else jnp.int64)

  def rule(b, n, ql, qh, kl, kh):
    r0, r1, c0, c1 = ql // unit_q, qh // unit_q + 1, kl // unit_k, kh // unit_k + 1
    count = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return count > 0, count == (r1 - r0) * (c1 - c0)
  return _classifier(rule)


def bigbird(pattern: sparse.BigBirdPattern, T: int, S: int, *, is_causal: bool = False) -> MaskMod:
  """``sparse.BigBirdPattern`` on a ``T x S`` grid: its block layout (window, global and random blocks, drawn
  exactly as ``sparse_attention`` draws them) as a table lookup. Add ``& causal()`` for the causal form (or use
  :func:`from_pattern`)."""
  layout, _ = sparse._bigbird_blocks(pattern, T, S, is_causal)
  unit = pattern.block
  table = jnp.asarray(layout)
  return MaskMod(lambda b, n, i, j: table[i // unit, j // unit], _table_blocks(layout, unit, unit),
                 f"bigbird(block={unit})")


def global_tokens(window: int, tokens) -> MaskMod:
  """``sparse.GlobalTokensPattern`` (Longformer): ``|i - j| <= window``, or ``i`` or ``j`` a global token."""
  g = np.unique(np.asarray(tokens, np.int64))
  g_arr = jnp.asarray(g, jnp.int32)
  band = local(window)

  def is_global(x):
    return jnp.any(x == g_arr) if len(g) else jnp.asarray(False)

  def blocks(bq, bk, T, S):
    def flags(length, block):
      nb = -(-length // block)
      out = np.zeros(nb, bool)
      out[g[g < length] // block] = True
      return jnp.asarray(out)
    gq, gk = flags(T, bq), flags(S, bk)
    band_cls = band.blocks(bq, bk, T, S)

    def classify(b, n, qb, kb):
      may, every = band_cls(b, n, qb, kb)
      return may | gq[qb] | gk[kb], every
    return classify
  return MaskMod(lambda b, n, i, j: band(b, n, i, j) | is_global(i) | is_global(j), blocks,
                 f"global_tokens({window}, {len(g)} tokens)")


def from_mask(mask) -> MaskMod:
  """A boolean array broadcastable to ``[B, N, T, S]`` (True = attend) as a mask mod (a lookup per pair).

  Blocks are classified by evaluating the mask (no structure to exploit); use it for masks that have none."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_ or mask.ndim > 4:
    raise ValueError(f"from_mask takes a bool array broadcastable to [B, N, T, S]; got shape={mask.shape} "
                     f"dtype={mask.dtype}")
  m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)

  def fn(b, n, i, j):
    return m4[tuple(0 if d == 1 else x for d, x in zip(m4.shape, (b, n, i, j)))]
  return MaskMod(fn, None, f"from_mask{tuple(m4.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Score mods
# ----------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes (Press et al. 2022): ``2^(-8 i / N)`` for ``i = 1..N`` when N is a power of two;
  otherwise the slopes of the nearest smaller power of two followed by every other slope of the next one."""
  num_heads = positive_int("num_heads", num_heads)

  def powers(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  p = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(p) + powers(2 * p)[0::2][:num_heads - p]
  return np.asarray(slopes, np.float32)


def alibi(slopes) -> Callable:
  """ALiBi (Press et al. 2022): ``score - slopes[n] * |q_idx - kv_idx|`` (the causal form's ``m (j - i)`` for
  ``j <= i``, symmetric beyond). ``slopes`` ``[N]`` may be learned: gradients reach it."""
  slopes = jnp.asarray(slopes)

  def score_mod(score, b, n, i, j):
    return score - slopes[n] * jnp.abs(i - j).astype(score.dtype)
  return score_mod


def relative_bucket(relative_position, *, num_buckets: int, bidirectional: bool = True,
                    max_distance: int = 128):
  """T5's bucket of ``relative_position = kv_idx - q_idx`` (Raffel et al. 2020): exact buckets for small
  distances, logarithmic ones up to ``max_distance``, then the last bucket; half the buckets per direction when
  ``bidirectional``."""
  n = -relative_position
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  safe = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


def relative_position_bias(table, *, bidirectional: bool = True, max_distance: int = 128) -> Callable:
  """T5's relative position bias: ``score + table[bucket(kv_idx - q_idx), n]`` with ``table [num_buckets, N]``
  (learned: gradients reach it)."""
  num_buckets = int(np.shape(table)[0])
  table = jnp.asarray(table)

  def score_mod(score, b, n, i, j):
    bucket = relative_bucket(j - i, num_buckets=num_buckets, bidirectional=bidirectional, max_distance=max_distance)
    return score + table[bucket, n].astype(score.dtype)
  return score_mod


def soft_cap(cap: float) -> Callable:
  """Logit soft-capping (Gemma 2): ``cap * tanh(score / cap)``, as ``logits_soft_cap``."""
  if not cap > 0:
    raise ValueError(f"soft_cap: cap must be positive; got {cap!r}")

  def score_mod(score, b, n, i, j):
    return cap * jnp.tanh(score / cap)
  return score_mod


def bias(bias_array) -> Callable:
  """An additive bias array broadcastable to ``[B, N, T, S]`` as a score mod (a lookup per pair; gradients reach
  it)."""
  x = jnp.asarray(bias_array)
  if x.ndim > 4:
    raise ValueError(f"bias must be broadcastable to [B, N, T, S]; got shape={x.shape}")
  x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)

  def score_mod(score, b, n, i, j):
    return score + x4[tuple(0 if d == 1 else v for d, v in zip(x4.shape, (b, n, i, j)))].astype(score.dtype)
  return score_mod


def compose(*score_mods: Callable) -> Callable:
  """Score mods applied in order (the first to the scaled logit, each next to the previous one's result)."""
  def score_mod(score, b, n, i, j):
    for mod in score_mods:
      score = mod(score, b, n, i, j)
    return score
  return score_mod
