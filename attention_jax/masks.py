"""Boolean attention masks (True = attend), broadcastable to ``[B, N, T, S]``.

Conventions follow ``jax.nn.dot_product_attention``: causal is top-left aligned (query i sees keys
j <= i, also when T != S) and a local window ``(left, right)`` lets query i see ``i-left <= j <= i+right``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalize_window(window: int | tuple[int, int] | None) -> tuple[int, int] | None:
  """``int w -> (w, w)``; validates a ``(left, right)`` pair of non-negative ints."""
  if window is None:
    return None
  if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
    window = (int(window), int(window))
  try:
    left, right = (int(w) for w in window)
  except (TypeError, ValueError):
    raise ValueError(f"local window must be an int or a (left, right) pair of ints; got {window!r}") from None
  if left < 0 or right < 0:
    raise ValueError(f"local window sizes must be >= 0; got {window!r}")
  return left, right


def _positions(q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
  return (jnp.arange(q_len, dtype=jnp.int32)[:, None], jnp.arange(kv_len, dtype=jnp.int32)[None, :])


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """``[1, 1, T, S]``: query i sees keys ``j <= i``."""
  q_T1, k_1S = _positions(q_len, kv_len)
  return (k_1S <= q_T1)[None, None]


def local_mask(q_len: int, kv_len: int, window: int | tuple[int, int]) -> jax.Array:
  """``[1, 1, T, S]``: query i sees keys ``i - left <= j <= i + right``; an int is a symmetric window."""
  left, right = normalize_window(window)
  q_T1, k_1S = _positions(q_len, kv_len)
  return ((k_1S >= q_T1 - left) & (k_1S <= q_T1 + right))[None, None]


def _check_lengths(name: str, lengths: jax.Array) -> jax.Array:
  lengths = jnp.asarray(lengths)
  if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape [B]; got shape={lengths.shape} dtype={lengths.dtype}")
  return lengths.astype(jnp.int32)


def padding_mask(q_lengths: jax.Array | None, kv_lengths: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
  """``[B, 1, T, S]``: query ``t < q_lengths[b]`` sees key ``s < kv_lengths[b]``.

  Either lengths may be None (no padding on that side); with both None the mask is all True, ``[1, 1, T, S]``.
  """
  mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
  if q_lengths is not None:
    q_B = _check_lengths("q_lengths", q_lengths)
    mask = mask & (jnp.arange(q_len, dtype=jnp.int32)[None, :] < q_B[:, None])[:, None, :, None]
  if kv_lengths is not None:
    kv_B = _check_lengths("kv_lengths", kv_lengths)
    if q_lengths is not None and kv_B.shape != q_B.shape:
      raise ValueError(f"q_lengths and kv_lengths must have the same batch size; got {q_B.shape} and {kv_B.shape}")
    mask = mask & (jnp.arange(kv_len, dtype=jnp.int32)[None, :] < kv_B[:, None])[:, None, None, :]
  return mask


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """``[B, 1, T, S]``: query t sees key s when they carry the same segment id (packed sequences).

  ``kv_segment_ids=None`` reuses the query ids (self-attention).
  """
  q_BT = jnp.asarray(q_segment_ids)
  kv_BS = q_BT if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  for name, ids in (("q_segment_ids", q_BT), ("kv_segment_ids", kv_BS)):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array [B, length]; got shape={ids.shape} dtype={ids.dtype}")
  if q_BT.shape[0] != kv_BS.shape[0]:
    raise ValueError(f"segment ids disagree on batch size: {q_BT.shape=} {kv_BS.shape=}")
  return (q_BT[:, :, None] == kv_BS[:, None, :])[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of boolean masks, broadcasting; ``None`` entries are ignored (all None -> None)."""
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  for m in present:
    if m.dtype != jnp.bool_:
      raise ValueError(f"masks must be boolean (True = attend); got dtype={m.dtype} shape={m.shape}")
  rank = max(m.ndim for m in present)
  present = [m.reshape((1,) * (rank - m.ndim) + m.shape) for m in present]
  try:
    jnp.broadcast_shapes(*(m.shape for m in present))
  except ValueError:
    raise ValueError(f"masks do not broadcast together: {[m.shape for m in present]}") from None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out
