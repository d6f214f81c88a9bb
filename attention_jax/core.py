"""Softmax attention: ``attend`` for any score function, and the multi-backend ``dot_product_attention``.

Semantics shared by every implementation (docs/DESIGN.md):

* layout ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Hv]``, output ``[B, T, N, Hv]``;
  ``N % K == 0`` (GQA/MQA, query head n uses kv head ``n // (N // K)``). As in ``jax.nn``, rank-3 inputs (no batch
  dim) are accepted, and as in tokamax so are extra leading batch dims ``[*B, T, N, H]``; ``Hv`` may differ from H;
* logits ``= scale * q·k`` (``scale=None`` -> ``1/sqrt(H)``), then ``logits_soft_cap * tanh(logits / cap)`` if a cap
  is given, then ``+ bias``, then masking;
* boolean masks (True = attend) combine with ``is_causal`` (top-left aligned), ``local_window_size``,
  ``query_seq_lengths`` / ``key_value_seq_lengths`` and segment ids (query t sees key s iff same id); masks and
  biases of lower rank get leading axes prepended, as in ``jax.nn``; a bias of ``-inf`` hides its key like a mask;
* softmax and accumulation in float32 (float64 for float64 inputs); output in the input dtype;
* a query row with no visible key returns zeros with finite gradients;
* positions a query cannot see never influence it: a NaN or Inf in a hidden key, value or bias entry changes
  neither that query's output nor any gradient flowing through it. A non-finite query, key or value entry it *can*
  see makes its output NaN;
* ``return_residual=True`` also returns the logsumexp of the masked logits exactly as ``jax.nn`` does: shape
  ``query.shape[:-1]`` (``[B, T, N]``), the input dtype, no gradient. Rows with no visible key report the dtype's
  most negative finite value. Internally (ring merges, kernels) the logsumexp is a float32 ``[B, N, T]`` array with
  ``-inf`` on rows with no key.

Every public entry point validates its arguments eagerly (``ValueError`` naming the shapes), then runs under one
``jax.jit`` boundary per static configuration, so eager calls are compiled once and ``jax.debug_infs`` /
``jax.debug_nans`` see only the finite outputs, never the ``-inf`` used internally for masking.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attention_jax import _autodiff
from attention_jax import masks as masks_lib
from attention_jax._checks import UnsupportedError
from attention_jax._numerics import HIGHEST as _HIGHEST
from attention_jax._numerics import clean as _clean
from attention_jax._numerics import compute_dtype as _compute_dtype
from attention_jax._numerics import finite_rows as _finite_rows

# The one table of implementations: ``implementation=name`` runs ``module.function(inp: AttentionInputs) ->
# (out [B, T, N, Hv], lse [B, N, T])``, the module imported on first use (``import attention_jax`` stays light).
# A function raises ``UnsupportedError`` for calls it cannot take; docs/DESIGN.md says how to add one.
_DISPATCH: dict[str, tuple[str, str]] = {
    "reference": ("attention_jax.core", "reference_impl"),
    "xla": ("attention_jax.core", "xla_impl"),
    "cudnn": ("attention_jax.core", "cudnn_impl"),
    "blockwise": ("attention_jax.blockwise", "blockwise_core"),
    "pallas": ("attention_jax.kernels.flash_gpu", "flash_core"),
    "pallas_tpu": ("attention_jax.kernels.flash_tpu", "flash_tpu_core"),
    "mosaic": ("attention_jax.kernels.flash_mosaic_gpu", "mosaic_core"),
}
IMPLEMENTATIONS = tuple(_DISPATCH)
# Implementations with a custom VJP: under forward-mode or second-order differentiation they step aside for the
# reference formula (attention_jax/_autodiff.py).
_CUSTOM_VJP = ("blockwise", "pallas", "pallas_tpu", "mosaic")


# ----------------------------------------------------------------------------------------------------------
# attend: softmax over any logits
# ----------------------------------------------------------------------------------------------------------


def masked_softmax(logits: jax.Array, mask: jax.Array | None = None, axis: int = -1
                   ) -> tuple[jax.Array, jax.Array]:
  """Softmax in float32 where ``mask`` is True; returns ``(weights, logsumexp)``.

  Rows with no visible entry (or only ``-inf`` logits) get all-zero weights and logsumexp ``-inf``; gradients stay
  finite. NaN logits in visible entries propagate to their row; hidden entries never matter.
  """
  logits = logits.astype(_compute_dtype(logits.dtype))
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  # Softmax is shift-invariant, so stopping the max's gradient is exact (also for the logsumexp).
  row_max = jnp.where(jnp.isfinite(row_max), row_max, jnp.zeros_like(row_max))
  unnormalized = jnp.exp(logits - row_max)
  denom = jnp.sum(unnormalized, axis=axis, keepdims=True)
  empty = denom == 0       # no visible entry; a NaN denominator is not empty and propagates
  safe = jnp.where(empty, jnp.ones_like(denom), denom)
  weights = unnormalized / safe
  if mask is not None:   # a NaN row sum must not reach hidden entries through 0 / NaN
    weights = jnp.where(mask, weights, jnp.zeros_like(weights))
  lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(safe))
  return weights, jnp.squeeze(lse, axis)


def _attend(logits, value, mask):
  cd = _compute_dtype(jnp.promote_types(logits.dtype, value.dtype))
  weights, _ = masked_softmax(logits.astype(cd), mask)
  rank = max(weights.ndim, value.ndim)
  w = weights.reshape((1,) * (rank - weights.ndim) + weights.shape)
  v = value.reshape((1,) * (rank - value.ndim) + value.shape)
  out = jnp.einsum("...ts,...sd->...td", w, _clean(v).astype(cd), precision=_HIGHEST)
  # A non-finite value a row can see makes that row non-finite; hidden ones never reach it.
  v_bad_S = ~_finite_rows(v)                                        # [..., S]: value row s non-finite
  visible = jnp.ones(w.shape, bool) if mask is None else jnp.broadcast_to(
      mask.reshape((1,) * (rank - mask.ndim) + mask.shape), w.shape)
  sees_bad = jnp.any(visible & v_bad_S[..., None, :], axis=-1, keepdims=True)
  out = jnp.where(sees_bad, jnp.nan, out)
  return out.astype(value.dtype), weights.astype(value.dtype)


_attend_jit = jax.jit(_attend)


def attend(logits: jax.typing.ArrayLike, value: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Masked softmax over ``logits [..., T, S]`` and the weighted sum of ``value [..., S, Dv]``.

  Returns ``(output [..., T, Dv], weights [..., T, S])``, both in ``value``'s dtype; softmax and the sum run in
  float32 (float64 for float64). ``mask`` (bool, True = attend) broadcasts to ``logits``; a row with no visible
  key gives zeros, and hidden entries of ``value`` never reach a row.
  """
  logits, value = jnp.asarray(logits), jnp.asarray(value)
  if logits.ndim < 2 or value.ndim < 2:
    raise ValueError(f"attend: need logits [..., T, S] and value [..., S, Dv]; got {logits.shape=} {value.shape=}")
  for name, x in (("logits", logits), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"attend: {name} must be a real floating-point array; got {name}.dtype={x.dtype} "
                       f"{name}.shape={x.shape}")
  if logits.shape[-1] != value.shape[-2]:
    raise ValueError(f"attend: logits' S={logits.shape[-1]} != value's S={value.shape[-2]}; "
                     f"got {logits.shape=} {value.shape=}")
  try:
    jnp.broadcast_shapes(logits.shape[:-2], value.shape[:-2])
  except ValueError:
    raise ValueError(f"attend: leading dims do not broadcast; got {logits.shape=} {value.shape=}") from None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"attend: mask must be boolean (True = attend); got {mask.dtype=} {mask.shape=}")
    if mask.ndim > logits.ndim or any(m not in (1, l) for m, l in zip(mask.shape[::-1], logits.shape[::-1])):
      raise ValueError(f"attend: mask of shape {mask.shape} does not broadcast to logits {logits.shape}")
    mask = mask.reshape((1,) * (logits.ndim - mask.ndim) + mask.shape)
  return _attend_jit(logits, value, mask)


# ----------------------------------------------------------------------------------------------------------
# Validated inputs shared by every dot-product implementation
# ----------------------------------------------------------------------------------------------------------


class AttentionInputs(NamedTuple):
  """Validated, normalised arguments of :func:`dot_product_attention` (what every backend receives)."""
  query: jax.Array            # [B, T, N, H]
  key: jax.Array              # [B, S, K, H]
  value: jax.Array            # [B, S, K, Hv]
  bias: jax.Array | None      # broadcastable to [B, N, T, S]
  mask: jax.Array | None      # bool, broadcastable to [B, N, T, S]
  scale: Any                  # float (or a traced scalar)
  is_causal: bool
  q_lengths: jax.Array | None   # int32 [B]
  kv_lengths: jax.Array | None  # int32 [B]
  window: tuple[int, int] | None
  q_segment_ids: jax.Array | None   # int32 [B, T]
  kv_segment_ids: jax.Array | None  # int32 [B, S]
  logits_soft_cap: float | None
  batch_shape: tuple[int, ...] | None = None   # the caller's leading dims (None: plain [B, ...] inputs)

  @property
  def shapes(self) -> str:
    return f"query.shape={self.query.shape} key.shape={self.key.shape} value.shape={self.value.shape}"


def restore_batch(x: jax.Array, inp: AttentionInputs) -> jax.Array:
  """``[B, ...]`` -> the caller's leading dims (``[...]`` for rank-3 inputs, ``[*B, ...]`` for extra batch dims)."""
  if inp.batch_shape is None:
    return x
  return x.reshape(inp.batch_shape + x.shape[1:])


def public_residual(lse_BNT: jax.Array, inp: AttentionInputs) -> jax.Array:
  """The internal float32 ``[B, N, T]`` logsumexp as ``jax.nn`` returns it: ``[B, T, N]`` (caller's batch dims),
  input dtype, no gradient; rows with no visible key (``-inf``) become the dtype's most negative finite value."""
  dtype = inp.query.dtype
  lse = jax.lax.stop_gradient(jnp.swapaxes(lse_BNT, 1, 2))
  lse = jnp.where(jnp.isneginf(lse), jnp.finfo(dtype).min, lse).astype(dtype)
  return restore_batch(lse, inp)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _static_number(name: str, x):
  """Concrete scalars become Python floats (static, hashable); traced ones stay arrays."""
  if x is None:
    return None
  if isinstance(x, (bool, str, bytes)) or (hasattr(x, "dtype") and (
      not jnp.issubdtype(jnp.asarray(x).dtype, jnp.number) or jnp.iscomplexobj(x))):
    raise ValueError(f"{name} must be a real number; got {x!r}")
  if isinstance(x, (int, float, np.number)) or (_is_concrete(x) and jnp.ndim(x) == 0):
    try:
      value = float(x)
    except (TypeError, ValueError):
      raise ValueError(f"{name} must be a real scalar; got {x!r}") from None
    if not math.isfinite(value):
      raise ValueError(f"{name} must be finite; got {value!r}")
    return value
  x = jnp.asarray(x)
  if x.ndim != 0:
    raise ValueError(f"{name} must be a scalar; got shape={x.shape}")
  return x


def _align(name: str, x: jax.Array, batch: tuple[int, ...], N: int, T: int, S: int) -> jax.Array:
  """A mask or bias of rank <= len(batch) + 3 -> rank 4 ``[B|1, N|1, T|1, S|1]`` (leading axes prepended as in
  jax.nn; batch dims flattened, broadcast across the batch only where they differ from 1)."""
  nb = len(batch)
  target = (*batch, N, T, S)
  if x.ndim > nb + 3:
    raise ValueError(f"{name} of shape {x.shape} has more dims than [*B, N, T, S] = {target}")
  x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
  if any(d not in (1, t) for d, t in zip(x.shape, target)):
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to [*B, N, T, S] = {target}")
  lead, tail = x.shape[:nb], x.shape[nb:]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + tail)
  return jnp.broadcast_to(x, batch + tail).reshape((math.prod(batch),) + tail)


def prepare_inputs(query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
                   mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None, is_causal: bool = False,
                   query_seq_lengths: ArrayLike | None = None, key_value_seq_lengths: ArrayLike | None = None,
                   local_window_size: int | tuple[int, int] | None = None, q_segment_ids: ArrayLike | None = None,
                   kv_segment_ids: ArrayLike | None = None, logits_soft_cap: float | ArrayLike | None = None
                   ) -> AttentionInputs:
  """Checks shapes, dtypes and values (``ValueError`` naming them) and normalises every argument.

  Rank-3 inputs and extra leading batch dims are flattened to one batch dim (``restore_batch`` undoes it).
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  shapes = f"query.shape={query.shape} key.shape={key.shape} value.shape={value.shape}"
  if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
    raise ValueError(f"query must be [*B, T, N, H] and key/value [*B, S, K, H] / [*B, S, K, Hv] of the same rank "
                     f"(>= 3; rank 3 means no batch dim); got {shapes}")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      raise ValueError(f"{name} is complex ({x.dtype}): softmax attention needs real logits, so complex inputs are "
                       "refused (jax.nn silently drops the imaginary part of the logits)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"query/key/value must be floating point; got {name}.dtype={x.dtype} ({shapes})")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
  batch_shape = query.shape[:-3]
  if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
    raise ValueError(f"batch sizes differ: query batch dims {batch_shape}, key {key.shape[:-3]}, "
                     f"value {value.shape[:-3]}; got {shapes}")
  T, N, H = query.shape[-3:]
  S, K, Hk = key.shape[-3:]
  if value.shape[-3:-1] != (S, K):
    raise ValueError(f"key and value must agree on [S, K] (value's head dim may differ); got {shapes}")
  if Hk != H:
    raise ValueError(f"head dims differ: query H={H}, key H={Hk}; got {shapes}")
  if H == 0:
    raise ValueError(f"the query/key head dim must be positive; got {shapes}")
  if K == 0 or N % K != 0:
    raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}; got {shapes}")
  batch = batch_shape or (1,)
  B = math.prod(batch)
  query, key, value = (x.reshape((B,) + x.shape[-3:]) for x in (query, key, value))

  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.dtype == jnp.bool_ or not jnp.issubdtype(bias.dtype, jnp.number) or jnp.issubdtype(
        bias.dtype, jnp.complexfloating):
      raise ValueError(f"bias must be a real numeric array added to the logits; got dtype={bias.dtype} "
                       f"shape={bias.shape}" + (" (pass boolean masks as `mask`)" if bias.dtype == jnp.bool_ else ""))
    bias = _align("bias", bias, batch, N, T, S)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend); got dtype={mask.dtype} shape={mask.shape}. "
                       "Pass additive masks as `bias`.")
    mask = _align("mask", mask, batch, N, T, S)

  def lengths(name, x, limit):
    if x is None:
      return None
    x = jnp.asarray(x)
    ok_shapes = (batch_shape, (1,)) if not batch_shape else (batch_shape,)
    if x.shape not in ok_shapes or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape [*B]={batch_shape}; got shape={x.shape} "
                       f"dtype={x.dtype}")
    if _is_concrete(x):
      values = np.asarray(x)
      if values.size and (values.min() < 0 or values.max() > limit):
        raise ValueError(f"{name} must lie in [0, {limit}]; got {values.tolist()}")
    return jnp.clip(x.reshape(B).astype(jnp.int32), 0, limit)   # traced lengths are clamped

  def segments(name, x, length):
    x = jnp.asarray(x)
    want = (*batch_shape, length)
    ok = x.shape == want or (not batch_shape and x.shape == (1, length))
    if not ok or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape {want}; got shape={x.shape} dtype={x.dtype}")
    return x.reshape(B, length).astype(jnp.int32)

  if (q_segment_ids is None) != (kv_segment_ids is None):
    if T != S:
      raise ValueError(f"pass both q_segment_ids and kv_segment_ids when T != S (T={T}, S={S})")
    q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
    kv_segment_ids = q_segment_ids
  if q_segment_ids is not None:
    q_segment_ids = segments("q_segment_ids", q_segment_ids, T)
    kv_segment_ids = segments("kv_segment_ids", kv_segment_ids, S)
  scale = 1.0 / math.sqrt(H) if scale is None else _static_number("scale", scale)
  logits_soft_cap = _static_number("logits_soft_cap", logits_soft_cap)
  if isinstance(logits_soft_cap, float) and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive; got {logits_soft_cap!r}")
  window = masks_lib.normalize_window(local_window_size)
  if window is not None:   # a window wider than both sequences is no window; clamping keeps int32 math exact
    bound = max(T, S)
    window = (min(window[0], bound), min(window[1], bound))
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a Python bool; got {is_causal!r}")
  return AttentionInputs(
      query, key, value, bias, mask, scale, bool(is_causal),
      lengths("query_seq_lengths", query_seq_lengths, T), lengths("key_value_seq_lengths", key_value_seq_lengths, S),
      window, q_segment_ids, kv_segment_ids, logits_soft_cap,
      None if len(batch_shape) == 1 else tuple(batch_shape))


def combined_mask(inp: AttentionInputs) -> jax.Array | None:
  """Every masking option of ``inp`` as one bool array broadcastable to ``[B, N, T, S]`` (None if unmasked)."""
  T, S = inp.query.shape[1], inp.key.shape[1]
  parts = [inp.mask]
  if inp.is_causal:
    parts.append(masks_lib.causal_mask(T, S))
  if inp.window is not None:
    parts.append(masks_lib.local_mask(T, S, inp.window))
  if inp.q_lengths is not None or inp.kv_lengths is not None:
    parts.append(masks_lib.padding_mask(inp.q_lengths, inp.kv_lengths, T, S))
  if inp.q_segment_ids is not None:
    parts.append(masks_lib.segment_mask(inp.q_segment_ids, inp.kv_segment_ids))
  return masks_lib.combine_masks(*parts)


def visible_mask(inp: AttentionInputs) -> jax.Array | None:
  """:func:`combined_mask` with the pairs a ``-inf`` bias hides removed (None if every pair is visible)."""
  mask = combined_mask(inp)
  if inp.bias is not None:
    mask = masks_lib.combine_masks(mask, ~jnp.isneginf(inp.bias))
  return mask


def rows_with_keys(inp: AttentionInputs) -> jax.Array | None:
  """Bool ``[B|1, N|1, T]``: query rows that see at least one key (None when every row does).

  Structured masks (causal, window, lengths) are solved in O(T); a user mask, a bias or segment ids need a
  reduction.
  """
  B, T = inp.query.shape[:2]
  S = inp.key.shape[1]
  if inp.mask is not None or inp.q_segment_ids is not None or inp.bias is not None:
    visible = visible_mask(inp)
    return None if visible is None else jnp.any(visible, axis=-1)
  if not (inp.is_causal or inp.window or inp.q_lengths is not None or inp.kv_lengths is not None) and S > 0:
    return None
  i = jnp.arange(T, dtype=jnp.int32)[None, :]               # [1, T]
  lo = jnp.zeros_like(i)
  hi = jnp.full_like(i, S - 1)
  if inp.is_causal:
    hi = jnp.minimum(hi, i)
  if inp.window is not None:
    lo = jnp.maximum(lo, i - inp.window[0])
    hi = jnp.minimum(hi, i + inp.window[1])
  if inp.kv_lengths is not None:
    hi = jnp.minimum(hi, inp.kv_lengths[:, None] - 1)       # [B, T]
  visible = lo <= hi
  if inp.q_lengths is not None:
    visible = visible & (i < inp.q_lengths[:, None])
  return visible[:, None, :]


def _per_query_head(x_BSK: jax.Array, N: int) -> jax.Array:
  """``[B, S, K]`` -> ``[B, N, 1, S]`` (kv head of each query head)."""
  B, S, K = x_BSK.shape
  return jnp.broadcast_to(jnp.transpose(x_BSK, (0, 2, 1))[:, :, None, None, :], (B, K, N // K, 1, S)
                          ).reshape(B, N, 1, S)


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------


def _logits(inp: AttentionInputs, q, k) -> jax.Array:
  """``[B, N, T, S]`` logits in the compute dtype, before bias and masks."""
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  cd = _compute_dtype(q.dtype)
  q_BTKGH = q.astype(cd).reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k.astype(cd), precision=_HIGHEST)
  logits_BNTS = logits_BKGTS.reshape(B, N, T, S) * jnp.asarray(inp.scale, cd)
  if inp.logits_soft_cap is not None:
    cap = jnp.asarray(inp.logits_soft_cap, cd)
    logits_BNTS = cap * jnp.tanh(logits_BNTS / cap)
  return logits_BNTS


def reference_core(inp: AttentionInputs, weights_fn: Callable[[jax.Array], jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The plain algorithm: ``(output [B,T,N,Hv] in the input dtype, lse [B,N,T], weights [B,N,T,S])``.

  ``weights_fn`` (e.g. attention dropout) transforms the weights before they multiply the values; the returned
  weights are the ones before it. Hidden non-finite entries never meet a multiply: q, k and v enter cleaned, a
  non-finite q or k makes exactly the logits it touches NaN, and rows that see a non-finite value become NaN.
  """
  B, T, N, _ = inp.query.shape
  S, K, Hv = inp.value.shape[1:]
  visible = visible_mask(inp)
  logits = _logits(inp, _clean(inp.query), _clean(inp.key))
  q_bad = jnp.transpose(~_finite_rows(inp.query), (0, 2, 1))[..., None]                 # [B, N, T, 1]
  k_bad = _per_query_head(~_finite_rows(inp.key), N)                                   # [B, N, 1, S]
  logits = jnp.where(q_bad | k_bad, jnp.nan, logits)        # exactly the pairs a non-finite q or k touches
  if inp.bias is not None:
    logits = logits + inp.bias.astype(logits.dtype)
  weights_BNTS, lse_BNT = masked_softmax(logits, visible)
  applied = weights_BNTS if weights_fn is None else weights_fn(weights_BNTS).astype(weights_BNTS.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", applied.reshape(B, K, N // K, T, S),
                         _clean(inp.value).astype(weights_BNTS.dtype), precision=_HIGHEST)
  out_BTNH = out_BTKGH.reshape(B, T, N, Hv)
  v_bad = _per_query_head(~_finite_rows(inp.value), N)                                 # [B, N, 1, S]
  sees_bad_v = jnp.any(v_bad if visible is None else visible & v_bad, axis=-1)        # [B, N, T] (or broadcast)
  sees_bad_v = jnp.transpose(jnp.broadcast_to(sees_bad_v, (B, N, T)), (0, 2, 1))[..., None]
  out_BTNH = jnp.where(sees_bad_v, jnp.nan, out_BTNH)
  return out_BTNH.astype(inp.query.dtype), jax.lax.stop_gradient(lse_BNT), weights_BNTS


def reference_impl(inp: AttentionInputs) -> tuple[jax.Array, jax.Array]:
  """``implementation="reference"``: :func:`reference_core` without the weights."""
  out, lse, _ = reference_core(inp)
  return out, lse


def xla_impl(inp: AttentionInputs) -> tuple[jax.Array, jax.Array]:
  """``implementation="xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` within our contract."""
  return _jax_nn_impl(inp, "xla")


def cudnn_impl(inp: AttentionInputs) -> tuple[jax.Array, jax.Array]:
  """``implementation="cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` within our contract."""
  return _jax_nn_impl(inp, "cudnn")


def _jax_nn_impl(inp: AttentionInputs, implementation: str) -> tuple[jax.Array, jax.Array]:
  """Delegates to ``jax.nn.dot_product_attention`` and enforces our contract around it.

  Segment ids and ``-inf`` biases are folded into the boolean mask; rows with no visible key return zeros (jax.nn
  averages the values). Calls whose q, k or v hold a non-finite entry run the plain formula (jax.nn would let a
  hidden NaN through ``0 * NaN``), and so do float64 inputs (jax.nn rounds its softmax through float32).
  """
  if inp.logits_soft_cap is not None:
    raise UnsupportedError(f"implementation={implementation!r} (jax.nn.dot_product_attention) has no "
                           "logits_soft_cap; use 'reference', 'blockwise' or 'pallas'")
  if inp.value.shape[-1] != inp.query.shape[-1]:
    raise UnsupportedError(f"implementation={implementation!r} (jax.nn.dot_product_attention) needs the value "
                           f"head dim to equal the query/key head dim; got {inp.shapes}. Use 'reference', "
                           "'blockwise' or a Pallas kernel")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise UnsupportedError(f"implementation='cudnn' needs a CUDA GPU; the default backend is "
                           f"{jax.default_backend()!r}")
  if inp.query.dtype == jnp.float64:
    return reference_impl(inp)
  all_finite = jnp.all(jnp.isfinite(inp.query)) & jnp.all(jnp.isfinite(inp.key)) & jnp.all(jnp.isfinite(inp.value))
  # jax.nn lets a hidden NaN through 0 * NaN; inputs with a non-finite entry take the plain formula, which does not.
  return jax.lax.cond(all_finite, lambda: _jax_nn_call(inp, implementation), lambda: reference_impl(inp))


def _jax_nn_call(inp: AttentionInputs, implementation: str) -> tuple[jax.Array, jax.Array]:
  mask = inp.mask
  if inp.q_segment_ids is not None:
    mask = masks_lib.combine_masks(mask, masks_lib.segment_mask(inp.q_segment_ids, inp.kv_segment_ids))
  if inp.bias is not None:
    mask = masks_lib.combine_masks(mask, ~jnp.isneginf(inp.bias))
  bias = None if inp.bias is None else jnp.where(jnp.isneginf(inp.bias), 0, inp.bias)
  q, k, v = inp.query, inp.key, inp.value
  if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))    # XLA:CPU has no compiled f16 x f16 -> f32 dot
  out, lse_BTN = jax.nn.dot_product_attention(
      q, k, v, bias, mask, scale=inp.scale, is_causal=inp.is_causal,
      query_seq_lengths=inp.q_lengths, key_value_seq_lengths=inp.kv_lengths, local_window_size=inp.window,
      implementation=implementation, return_residual=True)
  out = out.astype(inp.query.dtype)
  lse = jnp.transpose(lse_BTN, (0, 2, 1)).astype(_compute_dtype(inp.query.dtype))
  visible = rows_with_keys(inp)
  if visible is not None:
    # jax.nn returns the mean of the values on fully masked rows; our contract says zeros.
    out = jnp.where(jnp.transpose(visible, (0, 2, 1))[..., None], out, jnp.zeros_like(out))
    lse = jnp.where(visible, lse, -jnp.inf)
  return out, jax.lax.stop_gradient(lse)


def _auto_implementations(inp: AttentionInputs | None) -> tuple[str, ...]:
  """"auto": the Pallas flash kernel on GPU ("pallas") and TPU ("pallas_tpu"), then "blockwise", then "reference".

  Each candidate that cannot take the call (a kernel and float64, a traced ``scale``) raises ``UnsupportedError``
  and the next one runs.
  """
  kernel = {"gpu": ("pallas",), "tpu": ("pallas_tpu",)}.get(jax.default_backend(), ())
  return kernel + ("blockwise", "reference")


def resolve_implementations(implementation: str | Sequence[str] | None, inp: AttentionInputs | None = None
                            ) -> tuple[str, ...]:
  """The implementations to try in order (``ValueError`` for an unknown name)."""
  return resolve_names(implementation, IMPLEMENTATIONS, _auto_implementations(inp), "")


def resolve_names(implementation: str | Sequence[str] | None, choices: Sequence[str], auto: tuple[str, ...],
                  what: str) -> tuple[str, ...]:
  """``implementation`` (None/"auto", a name or a sequence of names from ``choices``) as the names to try in order;
  None/"auto" -> ``auto``. ``ValueError`` naming ``what`` (e.g. "flex_attention ") for an unknown name."""
  if implementation is None or implementation == "auto":
    return auto
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  if not names:
    raise ValueError("implementation: an empty sequence; name at least one implementation")
  for name in names:
    if name not in choices:
      raise ValueError(f"unknown {what}implementation={name!r}; choose one of {('auto',) + tuple(choices)} "
                       "(or a sequence of them)")
  return names


def first_that_runs(names: Sequence[str], call: Callable[[str], Any], what: str = "") -> Any:
  """``call(name)`` for the first of ``names`` that does not raise ``NotImplementedError`` (one name: its error
  propagates; several: ``UnsupportedError`` listing every refusal)."""
  errors = []
  for name in names:
    try:
      return call(name)
    except NotImplementedError as e:
      if len(names) == 1:
        raise
      errors.append(f"{name}: {e}")
  raise UnsupportedError(f"no {what}implementation takes this call -- " + "; ".join(errors))


def resolve_implementation(implementation: str | None, inp: AttentionInputs | None = None) -> str:
  """The first implementation :func:`resolve_implementations` would try."""
  return resolve_implementations(implementation, inp)[0]


def _get_impl(name: str) -> Callable[[AttentionInputs], tuple[jax.Array, jax.Array]]:
  """The function behind ``implementation=name`` (a name :func:`resolve_implementations` accepted), its module
  imported on first use."""
  module, function = _DISPATCH[name]
  return getattr(importlib.import_module(module), function)


def attention_core(inp: AttentionInputs, implementations: str | Sequence[str] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """``(output [B, T, N, Hv], lse [B, N, T] float32, -inf on rows with no key)`` from the first implementation that
  takes the call, its logsumexp without a gradient (the custom-VJP paths' own ``*_core`` functions differentiate
  it). For library code (ring merges, split-K); users call :func:`dot_product_attention`."""
  names = resolve_implementations(implementations, inp)

  def call(name):
    out, lse = _get_impl(name)(inp)
    return out, jax.lax.stop_gradient(lse)
  return first_that_runs(names, call)


_STATIC_FIELDS = ("scale", "is_causal", "window", "logits_soft_cap", "batch_shape")


def split_static(inp: AttentionInputs) -> tuple[tuple, dict]:
  """Static (hashable) and array parts of ``inp``, to cross a ``jax.jit`` boundary: the static part keys the
  compilation cache, ``AttentionInputs(**dict(static), **arrays)`` rebuilds ``inp`` inside. A traced scale or
  soft-cap stays an array."""
  static, arrays = [], {}
  for name, value in inp._asdict().items():
    if name in _STATIC_FIELDS and not isinstance(value, jax.Array):
      static.append((name, value))
    else:
      arrays[name] = value
  return tuple(static), arrays


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run(names: tuple[str, ...] | Callable, options: tuple, static: tuple, return_residual: bool,
         return_weights: bool, arrays: dict):
  inp = AttentionInputs(**dict(static), **arrays)
  if return_weights:
    out, lse, weights = reference_core(inp)
    extras = ((public_residual(lse, inp),) if return_residual else ()) + (restore_batch(weights, inp),)
    return (restore_batch(out, inp), *extras)
  if callable(names):
    out, lse = names(inp, **dict(options))
  else:
    out, lse = attention_core(inp, names)
  out = restore_batch(out, inp)
  return (out, public_residual(lse, inp)) if return_residual else out


def is_empty(inp: AttentionInputs) -> bool:
  """A zero-size call (B, T, N or Hv = 0) or one with no keys (S = 0): every row is without a key."""
  B, T, N, _ = inp.query.shape
  S, Hv = inp.value.shape[1], inp.value.shape[-1]
  return 0 in (B, T, N, S, Hv)


def _empty_result(inp: AttentionInputs, return_residual: bool, return_weights: bool):
  """Zero-size calls (B, T, N or Hv = 0) and calls with no keys (S = 0): zeros, every row without a key."""
  B, T, N, _ = inp.query.shape
  S, Hv = inp.value.shape[1], inp.value.shape[-1]
  out = restore_batch(jnp.zeros((B, T, N, Hv), inp.query.dtype), inp)
  extras = ()
  if return_residual:
    extras += (restore_batch(jnp.full((B, T, N), jnp.finfo(inp.query.dtype).min, inp.query.dtype), inp),)
  if return_weights:
    extras += (restore_batch(jnp.zeros((B, N, T, S), _compute_dtype(inp.query.dtype)), inp),)
  return (out, *extras) if extras else out


def run(inp: AttentionInputs, implementation=None, *, return_residual: bool = False, return_weights: bool = False):
  """Runs validated inputs: dispatch, the jit boundary, the caller's batch dims and the public residual."""
  names = resolve_implementations(implementation, inp)
  if is_empty(inp):
    return _empty_result(inp, return_residual, return_weights)
  if names[0] in _CUSTOM_VJP and _autodiff.needs_plain_path(inp.query, inp.key, inp.value, inp.bias):
    names = ("reference",)   # forward-mode / higher-order differentiation: the differentiable formula
  static, arrays = split_static(inp)
  return _run(names, (), static, return_residual, return_weights, arrays)


def run_custom(fn: Callable[..., tuple[jax.Array, jax.Array]], inp: AttentionInputs, *, options: tuple = (),
               return_residual: bool = False, custom_vjp: bool = True):
  """Like :func:`run` for an implementation's own public entry point (``flash_attention``, ``blockwise_attention``).

  ``fn(inp, **dict(options)) -> (out [B, T, N, Hv], lse [B, N, T])`` must be a module-level function and
  ``options`` a hashable tuple of ``(name, value)`` pairs (block sizes, interpret mode): together they key the
  compilation cache. With ``custom_vjp``, forward-mode or second-order differentiation runs the reference instead.
  """
  if is_empty(inp):
    return _empty_result(inp, return_residual, False)
  names = fn
  if custom_vjp and _autodiff.needs_plain_path(inp.query, inp.key, inp.value, inp.bias):
    names, options = ("reference",), ()
  static, arrays = split_static(inp)
  return _run(names, options, static, return_residual, False, arrays)


# ----------------------------------------------------------------------------------------------------------
# Public entry points: prepare_inputs' signature, written once, plus each entry point's own keyword options
# ----------------------------------------------------------------------------------------------------------


class AttentionFunction(Protocol):
  """The type of every dot-product attention entry point (:func:`dot_product_attention`, ``blockwise_attention``,
  the Pallas kernels and their ``*_reference``): :func:`prepare_inputs`' arguments, the entry point's own
  keyword options (``implementation``, ``chunk_sizes``, ``block_sizes``, ...) and ``return_residual``."""

  @overload
  def __call__(self, query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
               mask: ArrayLike | None = None, *, return_residual: Literal[False] = False,
               **options: Any) -> jax.Array: ...

  @overload
  def __call__(self, query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
               mask: ArrayLike | None = None, *, return_residual: Literal[True],
               **options: Any) -> tuple[jax.Array, jax.Array]: ...


class Option(NamedTuple):
  """An entry point's own keyword argument: its default and the check that validates and normalises it (to a
  hashable value: options key the compilation cache)."""
  default: Any = None
  check: Callable[[Any], Any] = lambda x: x


_INPUT_PARAMETERS = tuple(inspect.signature(prepare_inputs).parameters.values())
# The keyword arguments every dot-product entry point takes (scale, is_causal, lengths, window, segments, soft-cap).
ATTENTION_KEYWORDS = tuple(p.name for p in _INPUT_PARAMETERS if p.kind is inspect.Parameter.KEYWORD_ONLY)


def attention_function(run_fn: Callable[..., Any], *, name: str, module: str, doc: str,
                       options: dict[str, Option] | None = None) -> AttentionFunction:
  """A public entry point: ``name(query, key, value, bias=None, mask=None, *, <prepare_inputs' keywords>,
  <options>, return_residual=False)``.

  It validates with :func:`prepare_inputs` and each option's check, then returns
  ``run_fn(inp, return_residual=..., **checked_options)``. ``help()`` and ``inspect.signature`` show the whole
  signature; unknown keywords raise ``TypeError`` as for any Python function.
  """
  options = dict(options or {})
  kw = inspect.Parameter.KEYWORD_ONLY
  signature = inspect.Signature(
      [*_INPUT_PARAMETERS, *(inspect.Parameter(k, kw, default=o.default) for k, o in options.items()),
       inspect.Parameter("return_residual", kw, default=False, annotation="bool")],
      return_annotation="jax.Array | tuple[jax.Array, jax.Array]")
  input_names = tuple(p.name for p in _INPUT_PARAMETERS)

  def fn(*args, **kwargs):
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError as e:
      raise TypeError(f"{name}(): {e}") from None
    bound.apply_defaults()
    arguments = bound.arguments
    checked = {k: o.check(arguments[k]) for k, o in options.items()}
    inp = prepare_inputs(**{k: arguments[k] for k in input_names})
    return run_fn(inp, return_residual=arguments["return_residual"], **checked)

  fn.__name__ = fn.__qualname__ = name
  fn.__module__ = module
  fn.__doc__ = doc
  fn.__signature__ = signature
  fn.options = options
  return fn


def implementation_function(impl: Callable[..., tuple[jax.Array, jax.Array]], *, name: str, module: str, doc: str,
                            options: dict[str, Option] | None = None) -> AttentionFunction:
  """:func:`attention_function` for an implementation with a custom VJP: the entry point runs
  ``impl(inp, **checked_options) -> (out, lse)`` through :func:`run_custom` (``impl`` module-level)."""

  def run_impl(inp: AttentionInputs, *, return_residual: bool, **checked):
    return run_custom(impl, inp, options=tuple(checked.items()), return_residual=return_residual)

  return attention_function(run_impl, name=name, module=module, doc=doc, options=options)


def reference_function(fn: AttentionFunction, *, module: str) -> AttentionFunction:
  """``fn``'s plain counterpart, ``<fn>_reference``: the same signature and checks, computed by the reference
  formula (its own options, such as tile sizes, are validated and then ignored). Differentiable to any order."""
  name = f"{fn.__name__}_reference"
  doc = (f"The plain O(T x S) algorithm with :func:`{fn.__name__}`'s signature: the arguments are validated the same "
         "way, tiling options are then ignored. Differentiable to any order.")

  def run_reference(inp: AttentionInputs, *, return_residual: bool, **_):
    return run_custom(reference_impl, inp, return_residual=return_residual, custom_vjp=False)

  return attention_function(run_reference, name=name, module=module, doc=doc, options=fn.options)


def _check_implementation(implementation):
  resolve_implementations(implementation)   # ValueError for unknown names, before any work
  return implementation if implementation is None or isinstance(implementation, str) else tuple(implementation)


def _run_dispatch(inp: AttentionInputs, *, return_residual: bool, implementation):
  return run(inp, implementation, return_residual=return_residual)


dot_product_attention = attention_function(
    _run_dispatch, name="dot_product_attention", module=__name__,
    options={"implementation": Option(None, _check_implementation)},
    doc="""Scaled dot-product attention; a superset of ``jax.nn.dot_product_attention``.

  Args:
    query: ``[*B, T, N, H]``; key: ``[*B, S, K, H]``; value: ``[*B, S, K, Hv]`` with ``N % K == 0`` (GQA/MQA).
      ``*B`` is zero or more batch dims (rank-3 inputs have none).
    bias: additive, broadcastable to ``[*B, N, T, S]`` (leading axes prepended as needed; added after scaling and
      soft-capping; ``-inf`` hides a key).
    mask: bool, broadcastable to ``[*B, N, T, S]`` the same way, True = attend.
    scale: logit scale, default ``1/sqrt(H)``.
    is_causal: query i sees keys j <= i (top-left aligned).
    query_seq_lengths, key_value_seq_lengths: int ``[*B]``; padded queries return zeros.
    local_window_size: int or ``(left, right)``; query i sees ``i-left <= j <= i+right``.
    q_segment_ids, kv_segment_ids: int ``[*B, T]`` / ``[*B, S]``; attend only within equal ids (packing).
    logits_soft_cap: ``cap * tanh(logits / cap)`` before bias and masks (Gemma 2).
    implementation: None/"auto", "reference", "xla", "cudnn", "blockwise", "pallas", "pallas_tpu", "mosaic", or a
      sequence of them: the first that takes the call runs.
    return_residual: also return the logsumexp ``[*B, T, N]`` as jax.nn does (input dtype, no gradient).

  Returns:
    ``[*B, T, N, Hv]`` in the input dtype, or ``(output, logsumexp)``.
  """)


def _run_reference(inp: AttentionInputs, *, return_residual: bool, return_weights: bool):
  return run(inp, "reference", return_residual=return_residual, return_weights=return_weights)


reference_attention = attention_function(
    _run_reference, name="reference_attention", module=__name__, options={"return_weights": Option(False, bool)},
    doc="""The oracle: same arguments and semantics as :func:`dot_product_attention`, computed plainly in float32.

  Returns the output, followed by the logsumexp ``[*B, T, N]`` if ``return_residual`` and the softmax weights
  ``[*B, N, T, S]`` (float32) if ``return_weights``.
  """)
