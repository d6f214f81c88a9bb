"""Block geometry shared by the blockwise path and the Pallas kernels.

Everything here is plain ``jnp`` on integers so it runs inside Pallas kernels (Triton / Mosaic lowering,
``program_id`` indices) as well as in ordinary traced JAX. Positions are absolute: row ``i`` is query ``i``,
column ``j`` is key ``j``; visibility follows docs/DESIGN.md (causal ``j <= i``, window ``i-left <= j <= i+right``,
``j < kv_length``, ``i < q_length``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def floordiv(a, b):
  """``a // b`` for non-negative ``a`` and positive ``b``: Python ints stay ints; traced scalars use ``lax.div``
  (truncation, equal to floor here), which every Pallas lowering supports, unlike ``jnp.floor_divide``'s
  sign-correcting select chain."""
  if isinstance(a, int) and isinstance(b, int):
    return a // b
  return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def cdiv(a, b):
  """Ceil division of a non-negative ``a`` by a positive ``b`` (Python ints or traced int scalars)."""
  return floordiv(a + b - 1, b)


def position_mask(rows, cols, *, is_causal=False, window=None, kv_limit=None, q_limit=None):
  """Visibility from positions alone: ``rows [..., R, 1]``, ``cols [..., 1, C]`` -> bool ``[..., R, C]``.

  ``kv_limit`` / ``q_limit`` are exclusive bounds (sequence length or per-example lengths) broadcastable to the
  result. Returns None when nothing is masked.
  """
  conds = []
  if kv_limit is not None:
    conds.append(cols < kv_limit)
  if q_limit is not None:
    conds.append(rows < q_limit)
  if is_causal:
    conds.append(cols <= rows)
  if window is not None:
    left, right = window
    conds.append(cols >= rows - left)
    conds.append(cols <= rows + right)
  if not conds:
    return None
  out = conds[0]
  for c in conds[1:]:
    out = out & c
  return out


def _band(is_causal: bool, window, *, keys: bool) -> tuple[tuple, tuple]:
  """``(below, above)``: index ``i`` of one axis reaches index ``o`` of the other when ``i - b <= o`` for every
  ``b`` in ``below`` and ``o <= i + a`` for every ``a`` in ``above``. ``keys=True``: from query rows to key
  columns (causal ``j <= i``, window ``i - left <= j <= i + right``); ``keys=False``: the transpose."""
  below, above = (), ()
  if is_causal:
    above += (0,)
  if window is not None:
    left, right = window
    below, above = below + (left,), above + (right,)
  return (below, above) if keys else (above, below)


def _reach(start, size: int, other_block: int, band, *, length, limit=None):
  """Blocks ``[lo, hi)`` of the other axis (blocks of ``other_block``, indices below ``length``) that some index
  in ``[start, start + size)`` reaches; empty when ``start >= limit``."""
  below, above = band
  lo = jnp.zeros_like(jnp.asarray(start))
  hi = jnp.asarray(length) + lo
  for b in below:
    lo = jnp.maximum(lo, start - b)
  for a in above:
    hi = jnp.minimum(hi, start + size + a)
  if limit is not None:
    hi = jnp.where(start < limit, hi, lo)
  lo_blk = floordiv(lo, other_block)
  return lo_blk, jnp.maximum(cdiv(hi, other_block), lo_blk)


def _full_reach(start, size: int, other_block: int, lo_blk, hi_blk, band, *, end):
  """The sub-range of ``[lo_blk, hi_blk)`` whose blocks every index in ``[start, start + size)`` reaches (the other
  axis' indices below ``end``)."""
  below, above = band
  first = jnp.zeros_like(jnp.asarray(start))       # smallest index every one reaches
  stop = end + first                               # exclusive bound
  for b in below:
    first = jnp.maximum(first, start + size - 1 - b)
  for a in above:
    stop = jnp.minimum(stop, start + a + 1)
  u_lo = jnp.clip(cdiv(first, other_block), lo_blk, hi_blk)
  return u_lo, jnp.clip(floordiv(stop, other_block), u_lo, hi_blk)


def kv_block_range(q_start, q_block: int, k_block: int, *, kv_len, is_causal=False, window=None, q_limit=None):
  """Key blocks ``[lo, hi)`` that rows ``[q_start, q_start + q_block)`` can see.

  ``kv_len``: keys at or after it are never visible (static length or a traced per-example length).
  ``q_limit``: rows at or after it are padding (the range is empty when the whole block is).
  """
  return _reach(q_start, q_block, k_block, _band(is_causal, window, keys=True), length=kv_len, limit=q_limit)


def q_block_range(k_start, k_block: int, q_block: int, *, q_len, is_causal=False, window=None, kv_limit=None):
  """Query blocks ``[lo, hi)`` whose rows can see some key in ``[k_start, k_start + k_block)``."""
  return _reach(k_start, k_block, q_block, _band(is_causal, window, keys=False), length=q_len, limit=kv_limit)


def unmasked_kv_block_range(q_start, q_block: int, k_block: int, lo_blk, hi_blk, *, kv_len, is_causal=False,
                            window=None):
  """The sub-range ``[u_lo, u_hi)`` of ``[lo_blk, hi_blk)`` whose blocks are fully visible to every row.

  Kernels run those blocks without computing a mask. Segment ids and query lengths are not considered: callers
  with either pass an empty range.
  """
  return _full_reach(q_start, q_block, k_block, lo_blk, hi_blk, _band(is_causal, window, keys=True), end=kv_len)


def unmasked_q_block_range(k_start, k_block: int, q_block: int, lo_blk, hi_blk, *, kv_len, is_causal=False,
                           window=None):
  """The sub-range of query blocks ``[lo_blk, hi_blk)`` whose every row sees every key of this key block."""
  u_lo, u_hi = _full_reach(k_start, k_block, q_block, lo_blk, hi_blk, _band(is_causal, window, keys=False),
                           end=jnp.iinfo(jnp.int32).max)
  return u_lo, jnp.where(k_start + k_block <= kv_len, u_hi, u_lo)    # a key block past kv_len is never full
