"""Boolean attention masks (True = attend), broadcastable to ``[B, N, T, S]``.

Conventions follow ``jax.nn.dot_product_attention``: causal is top-left aligned (query i sees keys
j <= i, also when T != S) and a local window ``(left, right)`` lets query i see ``i-left <= j <= i+right``.

Sequence lengths (``q_len``, ``kv_len``) are static: non-negative Python or NumPy integers (not bool), below
``2**31``. Zero lengths give empty masks of the right shape.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Window sides above this are clipped to it: equivalent for any sequence shorter than 2**30 tokens (every mask
# that fits in memory) and keeps ``position +- window`` inside int32.
MAX_WINDOW = 2**30
_MAX_LEN = 2**31 - 1


def _as_int(name: str, value: Any) -> int:
  """A static integer (Python int, NumPy integer, 0-d concrete integer array); bool and floats are refused."""
  if isinstance(value, (bool, np.bool_)) or (hasattr(value, "dtype") and np.dtype(value.dtype) == np.bool_):
    raise ValueError(f"{name} must be an integer, not a bool; got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static integer (Python or NumPy int); got {value!r} "
                     f"of type {type(value).__name__}") from None


def _check_len(name: str, value: Any) -> int:
  n = _as_int(name, value)
  if not 0 <= n <= _MAX_LEN:
    raise ValueError(f"{name} must be an integer in [0, 2**31 - 1]; got {name}={n}")
  return n


def normalize_window(window: int | tuple[int, int] | None) -> tuple[int, int] | None:
  """``int w -> (w, w)``; validates a ``(left, right)`` pair of non-negative ints.

  Accepts Python ints, NumPy integer scalars and 2-sequences of them; bools, floats, strings, negative entries
  and sequences of another length raise ``ValueError``. Sides above ``MAX_WINDOW`` (``2**30``) are clipped to it,
  which sees the same keys for any realistic length.
  """
  if window is None:
    return None
  if isinstance(window, (str, bytes)):
    raise ValueError(f"local window must be an int or a (left, right) pair of ints; got the string {window!r}")
  if np.ndim(window) == 0:
    pair = (window, window)
  else:
    try:
      pair = tuple(window)
    except TypeError:
      raise ValueError(f"local window must be an int or a (left, right) pair of ints; got {window!r}") from None
    if len(pair) != 2:
      raise ValueError(f"local window must be an int or a (left, right) pair; got {len(pair)} entries: {window!r}")
  try:
    left, right = (_as_int("local window", w) for w in pair)
  except ValueError:
    raise ValueError(f"local window must be an int or a (left, right) pair of ints (not bool/float/str); "
                     f"got {window!r}") from None
  if left < 0 or right < 0:
    raise ValueError(f"local window sizes must be >= 0; got {window!r}")
  return min(left, MAX_WINDOW), min(right, MAX_WINDOW)


def _positions(q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
  return (jnp.arange(q_len, dtype=jnp.int32)[:, None], jnp.arange(kv_len, dtype=jnp.int32)[None, :])


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """``[1, 1, T, S]``: query i sees keys ``j <= i``."""
  q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
  q_T1, k_1S = _positions(q_len, kv_len)
  return (k_1S <= q_T1)[None, None]


def local_mask(q_len: int, kv_len: int, window: int | tuple[int, int]) -> jax.Array:
  """``[1, 1, T, S]``: query i sees keys ``i - left <= j <= i + right``; an int is a symmetric window."""
  q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
  if window is None:
    raise ValueError("local_mask: window must be an int or a (left, right) pair; got None")
  left, right = normalize_window(window)
  q_T1, k_1S = _positions(q_len, kv_len)
  offset_TS = k_1S - q_T1   # j - i, within int32 for any length below 2**30
  return ((offset_TS >= -left) & (offset_TS <= right))[None, None]


def _check_lengths(name: str, lengths: jax.typing.ArrayLike, limit: int) -> jax.Array:
  """Integer ``[B]``; concrete values must lie in ``[0, limit]`` (traced ones are taken as given)."""
  try:
    lengths = jnp.asarray(lengths)
  except TypeError:
    raise ValueError(f"{name} must be an integer array of shape [B]; got {lengths!r}") from None
  if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape [B]; got shape={lengths.shape} dtype={lengths.dtype}")
  if not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > limit):
      raise ValueError(f"{name} must lie in [0, {limit}] (the sequence length); got {values.tolist()}")
  return lengths.astype(jnp.int32)


def padding_mask(q_lengths: jax.typing.ArrayLike | None, kv_lengths: jax.typing.ArrayLike | None, q_len: int,
                 kv_len: int) -> jax.Array:
  """``[B, 1, T, S]``: query ``t < q_lengths[b]`` sees key ``s < kv_lengths[b]``.

  Either lengths may be None (no padding on that side); with both None the mask is all True, ``[1, 1, T, S]``.
  Lengths are integer ``[B]``; concrete ones must lie in ``[0, q_len]`` / ``[0, kv_len]``.
  """
  q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
  mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
  if q_lengths is not None:
    q_B = _check_lengths("q_lengths", q_lengths, q_len)
    mask = mask & (jnp.arange(q_len, dtype=jnp.int32)[None, :] < q_B[:, None])[:, None, :, None]
  if kv_lengths is not None:
    kv_B = _check_lengths("kv_lengths", kv_lengths, kv_len)
    if q_lengths is not None and kv_B.shape != q_B.shape:
      raise ValueError(f"q_lengths and kv_lengths must have the same batch size; got {q_B.shape} and {kv_B.shape}")
    mask = mask & (jnp.arange(kv_len, dtype=jnp.int32)[None, :] < kv_B[:, None])[:, None, None, :]
  return mask


def segment_mask(q_segment_ids: jax.typing.ArrayLike, kv_segment_ids: jax.typing.ArrayLike | None = None
                 ) -> jax.Array:
  """``[B, 1, T, S]``: query t sees key s when they carry the same segment id (packed sequences).

  Ids are integer ``[B, T]`` / ``[B, S]`` with the same B; ``kv_segment_ids=None`` reuses the query ids
  (self-attention).
  """
  q_BT = jnp.asarray(q_segment_ids)
  kv_BS = q_BT if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  for name, ids in (("q_segment_ids", q_BT), ("kv_segment_ids", kv_BS)):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array [B, length]; got shape={ids.shape} dtype={ids.dtype}")
  if q_BT.shape[0] != kv_BS.shape[0]:
    raise ValueError(f"segment ids disagree on batch size: q_segment_ids.shape={q_BT.shape} "
                     f"kv_segment_ids.shape={kv_BS.shape}")
  return (q_BT[:, :, None] == kv_BS[:, None, :])[:, None]


def combine_masks(*masks: jax.typing.ArrayLike | None) -> jax.Array | None:
  """Logical AND of boolean masks, broadcasting (leading axes prepended); ``None`` entries are ignored (all None ->
  None). Non-boolean or mutually unbroadcastable masks raise ``ValueError`` naming their shapes."""
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  for i, m in enumerate(present):
    if m.dtype != jnp.bool_:
      raise ValueError(f"masks must be boolean (True = attend); mask {i} has dtype={m.dtype} shape={m.shape}")
  shapes = [m.shape for m in present]
  rank = max(m.ndim for m in present)
  present = [m.reshape((1,) * (rank - m.ndim) + m.shape) for m in present]
  try:
    jnp.broadcast_shapes(*(m.shape for m in present))
  except ValueError:
    raise ValueError(f"masks do not broadcast together: shapes {shapes}") from None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out
