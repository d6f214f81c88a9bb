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


def kv_block_range(q_start, q_block: int, k_block: int, *, kv_len, is_causal=False, window=None, q_limit=None):
  """Key blocks ``[lo, hi)`` that rows ``[q_start, q_start + q_block)`` can see.

  ``kv_len``: keys at or after it are never visible (static length or a traced per-example length).
  ``q_limit``: rows at or after it are padding (the range is empty when the whole block is).
  """
  lo = jnp.zeros_like(jnp.asarray(q_start))
  hi = jnp.asarray(kv_len) + lo
  last_row = q_start + q_block - 1
  if is_causal:
    hi = jnp.minimum(hi, last_row + 1)
  if window is not None:
    left, right = window
    lo = jnp.maximum(lo, q_start - left)
    hi = jnp.minimum(hi, last_row + right + 1)
  if q_limit is not None:
    hi = jnp.where(q_start < q_limit, hi, lo)
  lo_blk = floordiv(lo, k_block)
  hi_blk = jnp.maximum(cdiv(hi, k_block), lo_blk)
  return lo_blk, hi_blk


def q_block_range(k_start, k_block: int, q_block: int, *, q_len, is_causal=False, window=None, kv_limit=None):
  """Query blocks ``[lo, hi)`` whose rows can see some key in ``[k_start, k_start + k_block)``."""
  lo = jnp.zeros_like(jnp.asarray(k_start))
  hi = jnp.asarray(q_len) + lo
  last_col = k_start + k_block - 1
  if is_causal:
    lo = jnp.maximum(lo, k_start)
  if window is not None:
    left, right = window
    lo = jnp.maximum(lo, k_start - right)
    hi = jnp.minimum(hi, last_col + left + 1)
  if kv_limit is not None:
    hi = jnp.where(k_start < kv_limit, hi, lo)
  lo_blk = floordiv(lo, q_block)
  hi_blk = jnp.maximum(cdiv(hi, q_block), lo_blk)
  return lo_blk, hi_blk


def unmasked_kv_block_range(q_start, q_block: int, k_block: int, lo_blk, hi_blk, *, kv_len, is_causal=False,
                            window=None):
  """The sub-range ``[u_lo, u_hi)`` of ``[lo_blk, hi_blk)`` whose blocks are fully visible to every row.

  Kernels run those blocks without computing a mask. Segment ids and query lengths are not considered: callers
  with either pass an empty range.
  """
  first_col_ok = jnp.zeros_like(jnp.asarray(q_start))     # smallest column every row sees
  end_col_ok = jnp.asarray(kv_len) + first_col_ok         # exclusive largest
  last_row = q_start + q_block - 1
  if is_causal:
    end_col_ok = jnp.minimum(end_col_ok, q_start + 1)
  if window is not None:
    left, right = window
    first_col_ok = jnp.maximum(first_col_ok, last_row - left)
    end_col_ok = jnp.minimum(end_col_ok, q_start + right + 1)
  u_lo = jnp.clip(cdiv(first_col_ok, k_block), lo_blk, hi_blk)
  u_hi = jnp.clip(floordiv(end_col_ok, k_block), u_lo, hi_blk)
  return u_lo, u_hi


def unmasked_q_block_range(k_start, k_block: int, q_block: int, lo_blk, hi_blk, *, kv_len, is_causal=False,
                           window=None):
  """The sub-range of query blocks ``[lo_blk, hi_blk)`` whose every row sees every key of this key block."""
  zero = jnp.zeros_like(jnp.asarray(k_start))
  last_col = k_start + k_block - 1
  first_row_ok = zero                                 # smallest first row of a fully visible query block
  end_row_ok = zero + jnp.iinfo(jnp.int32).max        # exclusive bound on the last row
  if is_causal:
    first_row_ok = jnp.maximum(first_row_ok, last_col)
  if window is not None:
    left, right = window
    first_row_ok = jnp.maximum(first_row_ok, last_col - right)
    end_row_ok = jnp.minimum(end_row_ok, k_start + left + 1)
  full_cols = k_start + k_block <= kv_len
  u_lo = jnp.clip(cdiv(first_row_ok, q_block), lo_blk, hi_blk)
  u_hi = jnp.clip(floordiv(end_row_ok, q_block), u_lo, hi_blk)
  u_hi = jnp.where(full_cols, u_hi, u_lo)
  return u_lo, u_hi
