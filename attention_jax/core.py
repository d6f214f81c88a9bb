"""Softmax attention: ``attend`` for any score function, and the multi-backend ``dot_product_attention``.

Semantics shared by every implementation (see DESIGN.md):

* layout ``query [B, T, N, H]``, ``key/value [B, S, K, H]``, output ``[B, T, N, H]``; ``N % K == 0`` (GQA/MQA,
  query head n uses kv head ``n // (N // K)``);
* logits ``= scale * q·k`` (``scale=None`` -> ``1/sqrt(H)``), then ``logits_soft_cap * tanh(logits / cap)`` if a cap
  is given, then ``+ bias``, then masking;
* boolean masks (True = attend) combine with ``is_causal`` (top-left aligned), ``local_window_size``,
  ``query_seq_lengths`` / ``key_value_seq_lengths`` and segment ids (query t sees key s iff same id);
* softmax and accumulation in float32 (float64 for float64 inputs); output in the input dtype;
* a query row with no visible key returns zeros with finite gradients;
* ``return_residual=True`` also returns the logsumexp of the masked logits, ``[B, N, T]`` float32, ``-inf`` on
  rows with no visible key; the residual carries no gradient (as in ``jax.nn``).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib

_HIGHEST = jax.lax.Precision.HIGHEST

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "blockwise", "pallas", "pallas_tpu")
# Implementations that live in their own module, imported on first use (keeps `import attention_jax` light).
_LAZY_IMPLEMENTATIONS = {
    "blockwise": "attention_jax.blockwise",
    "pallas": "attention_jax.kernels.flash_gpu",
    "pallas_tpu": "attention_jax.kernels.flash_tpu",
}


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# attend: softmax over any logits
# ----------------------------------------------------------------------------------------------------------


def masked_softmax(logits: jax.Array, mask: jax.Array | None = None, axis: int = -1
                   ) -> tuple[jax.Array, jax.Array]:
  """Softmax in float32 where ``mask`` is True; returns ``(weights, logsumexp)``.

  Rows with no visible entry get all-zero weights and logsumexp ``-inf``; gradients stay finite.
  """
  logits = logits.astype(_compute_dtype(logits.dtype))
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  # Softmax is shift-invariant, so stopping the max's gradient is exact (also for the logsumexp).
  row_max = jnp.where(jnp.isfinite(row_max), row_max, jnp.zeros_like(row_max))
  unnormalized = jnp.exp(logits - row_max)
  denom = jnp.sum(unnormalized, axis=axis, keepdims=True)
  has_key = denom > 0
  weights = unnormalized / jnp.where(has_key, denom, jnp.ones_like(denom))
  lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, denom, jnp.ones_like(denom))), -jnp.inf)
  return weights, jnp.squeeze(lse, axis)


def attend(logits: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Masked softmax over ``logits [..., T, S]`` and the weighted sum of ``value [..., S, Dv]``.

  Returns ``(output [..., T, Dv], weights [..., T, S])``, both in ``value``'s dtype; softmax and the sum run in
  float32. ``mask`` (bool, True = attend) broadcasts to ``logits``; a row with no visible key gives zeros.
  """
  logits, value = jnp.asarray(logits), jnp.asarray(value)
  if logits.ndim < 2 or value.ndim < 2:
    raise ValueError(f"attend: need logits [..., T, S] and value [..., S, Dv]; got {logits.shape=} {value.shape=}")
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
  weights, _ = masked_softmax(logits, mask)
  rank = max(weights.ndim, value.ndim)
  w = weights.reshape((1,) * (rank - weights.ndim) + weights.shape)
  v = value.reshape((1,) * (rank - value.ndim) + value.shape)
  out = jnp.einsum("...ts,...sd->...td", w, v.astype(weights.dtype), precision=_HIGHEST)
  return out.astype(value.dtype), weights.astype(value.dtype)


# ----------------------------------------------------------------------------------------------------------
# Validated inputs shared by every dot-product implementation
# ----------------------------------------------------------------------------------------------------------


class AttentionInputs(NamedTuple):
  """Validated, normalised arguments of :func:`dot_product_attention` (what every backend receives)."""
  query: jax.Array            # [B, T, N, H]
  key: jax.Array              # [B, S, K, H]
  value: jax.Array            # [B, S, K, H]
  bias: jax.Array | None      # broadcastable to [B, N, T, S]
  mask: jax.Array | None      # bool, broadcastable to [B, N, T, S]
  scale: Any                  # float (or scalar array)
  is_causal: bool
  q_lengths: jax.Array | None   # int32 [B]
  kv_lengths: jax.Array | None  # int32 [B]
  window: tuple[int, int] | None
  q_segment_ids: jax.Array | None   # int32 [B, T]
  kv_segment_ids: jax.Array | None  # int32 [B, S]
  logits_soft_cap: float | None

  @property
  def shapes(self) -> str:
    return f"query.shape={self.query.shape} key.shape={self.key.shape} value.shape={self.value.shape}"


def _check_broadcastable(name: str, x: jax.Array, target: tuple[int, ...]) -> None:
  if x.ndim != len(target) or any(d not in (1, t) for d, t in zip(x.shape, target)):
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {target}")


def prepare_inputs(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                   query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                   q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None) -> AttentionInputs:
  """Checks shapes and dtypes (``ValueError`` naming them) and normalises optional arguments."""
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  shapes = f"query.shape={query.shape} key.shape={key.shape} value.shape={value.shape}"
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"query must be [B, T, N, H] and key/value [B, S, K, H] (rank 4; use jax.vmap for extra "
                     f"batch dims); got {shapes}")
  B, T, N, H = query.shape
  _, S, K, _ = key.shape
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape [B, S, K, H]; got {shapes}")
  if key.shape[0] != B:
    raise ValueError(f"batch sizes differ: query B={B}, key/value B={key.shape[0]}; got {shapes}")
  if key.shape[3] != H:
    raise ValueError(f"head dims differ: query H={H}, key/value H={key.shape[3]}; got {shapes}")
  if K == 0 or N % K != 0:
    raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}; got {shapes}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
  if not jnp.issubdtype(query.dtype, jnp.floating):
    raise ValueError(f"query/key/value must be floating point; got {query.dtype}")
  target = (B, N, T, S)
  if bias is not None:
    bias = jnp.asarray(bias)
    _check_broadcastable("bias", bias, target)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend); got dtype={mask.dtype} shape={mask.shape}. "
                       "Pass additive masks as `bias`.")
    _check_broadcastable("mask", mask, target)

  def lengths(name, x):
    if x is None:
      return None
    x = jnp.asarray(x)
    if x.shape != (B,) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape [B]=({B},); got shape={x.shape} dtype={x.dtype}")
    return x.astype(jnp.int32)

  def segments(name, x, length):
    x = jnp.asarray(x)
    if x.shape != (B, length) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape {(B, length)}; got shape={x.shape} dtype={x.dtype}")
    return x.astype(jnp.int32)

  if (q_segment_ids is None) != (kv_segment_ids is None):
    if T != S:
      raise ValueError(f"pass both q_segment_ids and kv_segment_ids when T != S (T={T}, S={S})")
    q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
    kv_segment_ids = q_segment_ids
  if q_segment_ids is not None:
    q_segment_ids = segments("q_segment_ids", q_segment_ids, T)
    kv_segment_ids = segments("kv_segment_ids", kv_segment_ids, S)
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  if logits_soft_cap is not None and not isinstance(logits_soft_cap, jax.Array) and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive; got {logits_soft_cap!r}")
  return AttentionInputs(
      query, key, value, bias, mask, scale, bool(is_causal),
      lengths("query_seq_lengths", query_seq_lengths), lengths("key_value_seq_lengths", key_value_seq_lengths),
      masks_lib.normalize_window(local_window_size), q_segment_ids, kv_segment_ids, logits_soft_cap)


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


def rows_with_keys(inp: AttentionInputs) -> jax.Array | None:
  """Bool ``[B|1, N|1, T]``: query rows that see at least one key (None when every row does).

  Structured masks (causal, window, lengths) are solved in O(T); a user mask or segment ids need a reduction.
  """
  B, T = inp.query.shape[:2]
  S = inp.key.shape[1]
  if inp.mask is not None or inp.q_segment_ids is not None:
    return jnp.any(combined_mask(inp), axis=-1)
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


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------


def _scaled_capped_logits(inp: AttentionInputs) -> jax.Array:
  """``[B, N, T, S]`` logits in the compute dtype, before bias and masks."""
  B, T, N, H = inp.query.shape
  S, K = inp.key.shape[1:3]
  cd = _compute_dtype(inp.query.dtype)
  q_BTKGH = inp.query.astype(cd).reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, inp.key.astype(cd), precision=_HIGHEST)
  logits_BNTS = logits_BKGTS.reshape(B, N, T, S) * jnp.asarray(inp.scale, cd)
  if inp.logits_soft_cap is not None:
    cap = jnp.asarray(inp.logits_soft_cap, cd)
    logits_BNTS = cap * jnp.tanh(logits_BNTS / cap)
  return logits_BNTS


def reference_core(inp: AttentionInputs, weights_fn: Callable[[jax.Array], jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The plain algorithm: ``(output [B,T,N,H] in the input dtype, lse [B,N,T], weights [B,N,T,S])``.

  ``weights_fn`` (e.g. attention dropout) transforms the weights before they multiply the values; the returned
  weights are the ones before it.
  """
  B, T, N, H = inp.query.shape
  S, K = inp.key.shape[1:3]
  logits = _scaled_capped_logits(inp)
  if inp.bias is not None:
    logits = logits + inp.bias.astype(logits.dtype)
  weights_BNTS, lse_BNT = masked_softmax(logits, combined_mask(inp))
  applied = weights_BNTS if weights_fn is None else weights_fn(weights_BNTS).astype(weights_BNTS.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", applied.reshape(B, K, N // K, T, S),
                         inp.value.astype(weights_BNTS.dtype), precision=_HIGHEST)
  out = out_BTKGH.reshape(B, T, N, H).astype(inp.query.dtype)
  return out, jax.lax.stop_gradient(lse_BNT), weights_BNTS


def _reference_impl(inp: AttentionInputs) -> tuple[jax.Array, jax.Array]:
  out, lse, _ = reference_core(inp)
  return out, lse


def _jax_nn_impl(inp: AttentionInputs, implementation: str) -> tuple[jax.Array, jax.Array]:
  """Delegates to ``jax.nn.dot_product_attention``; segment ids are folded into the boolean mask."""
  if inp.logits_soft_cap is not None:
    raise ValueError(f"implementation={implementation!r} (jax.nn.dot_product_attention) has no logits_soft_cap; "
                     "use 'reference', 'blockwise' or 'pallas'")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"implementation='cudnn' needs a CUDA GPU; the default backend is {jax.default_backend()!r}")
  mask = inp.mask
  if inp.q_segment_ids is not None:
    mask = masks_lib.combine_masks(mask, masks_lib.segment_mask(inp.q_segment_ids, inp.kv_segment_ids))
  out, lse_BTN = jax.nn.dot_product_attention(
      inp.query, inp.key, inp.value, inp.bias, mask, scale=inp.scale, is_causal=inp.is_causal,
      query_seq_lengths=inp.q_lengths, key_value_seq_lengths=inp.kv_lengths, local_window_size=inp.window,
      implementation=implementation, return_residual=True)
  lse = jnp.transpose(lse_BTN, (0, 2, 1)).astype(_compute_dtype(inp.query.dtype))
  visible = rows_with_keys(inp)
  if visible is not None:
    # jax.nn returns the mean of the values on fully masked rows; our contract says zeros.
    out = jnp.where(jnp.transpose(visible, (0, 2, 1))[..., None], out, jnp.zeros_like(out))
    lse = jnp.where(visible, lse, -jnp.inf)
  return out, jax.lax.stop_gradient(lse)


_IMPLS: dict[str, Callable[[AttentionInputs], tuple[jax.Array, jax.Array]]] = {
    "reference": _reference_impl,
    "xla": lambda inp: _jax_nn_impl(inp, "xla"),
    "cudnn": lambda inp: _jax_nn_impl(inp, "cudnn"),
}


def register_implementation(name: str, fn: Callable[[AttentionInputs], tuple[jax.Array, jax.Array]]) -> None:
  """Registers ``fn(AttentionInputs) -> (output, lse [B, N, T])`` under ``implementation=name``."""
  _IMPLS[name] = fn


def _is_concrete_number(x) -> bool:
  if x is None or isinstance(x, (int, float)):
    return True
  try:
    float(x)
    return True
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def _auto_implementation(inp: AttentionInputs | None) -> str:
  """"auto": the Pallas flash kernel on GPU ("pallas") and TPU ("pallas_tpu"), "blockwise" elsewhere.

  Calls the kernels cannot take (dense bias/mask arrays) go to "blockwise"; traced (non-concrete) ``scale`` or
  ``logits_soft_cap`` go to "reference".
  """
  if inp is not None and not (_is_concrete_number(inp.scale) and _is_concrete_number(inp.logits_soft_cap)):
    return "reference"
  kernel = {"gpu": "pallas", "tpu": "pallas_tpu"}.get(jax.default_backend())
  if kernel is not None and (inp is None or (inp.bias is None and inp.mask is None)):
    return kernel
  return "blockwise"


def resolve_implementation(implementation: str | None, inp: AttentionInputs | None = None) -> str:
  """Maps ``None``/"auto" to a concrete implementation and checks the name (``ValueError`` if unknown)."""
  if implementation is None or implementation == "auto":
    return _auto_implementation(inp)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation={implementation!r}; choose one of {('auto',) + IMPLEMENTATIONS}")
  return implementation


def _get_impl(name: str) -> Callable[[AttentionInputs], tuple[jax.Array, jax.Array]]:
  if name not in _IMPLS and name in _LAZY_IMPLEMENTATIONS:
    try:
      importlib.import_module(_LAZY_IMPLEMENTATIONS[name])   # registers itself on import
    except ModuleNotFoundError as e:
      if e.name != _LAZY_IMPLEMENTATIONS[name]:
        raise
  if name not in _IMPLS:
    raise NotImplementedError(f"implementation={name!r} is not available in this version of attention_jax")
  return _IMPLS[name]


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                          implementation: str | None = None, return_residual: bool = False):
  """Scaled dot-product attention; a superset of ``jax.nn.dot_product_attention``.

  Args:
    query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA).
    bias: additive, broadcastable to ``[B, N, T, S]`` (added after scaling and soft-capping).
    mask: bool, broadcastable to ``[B, N, T, S]``, True = attend.
    scale: logit scale, default ``1/sqrt(H)``.
    is_causal: query i sees keys j <= i (top-left aligned).
    query_seq_lengths, key_value_seq_lengths: int ``[B]``; padded queries return zeros.
    local_window_size: int or ``(left, right)``; query i sees ``i-left <= j <= i+right``.
    q_segment_ids, kv_segment_ids: int ``[B, T]`` / ``[B, S]``; attend only within equal ids (packing).
    logits_soft_cap: ``cap * tanh(logits / cap)`` before bias and masks (Gemma 2).
    implementation: None/"auto", "reference", "xla", "cudnn", "blockwise", "pallas", "pallas_tpu".
    return_residual: also return the logsumexp ``[B, N, T]`` (float32, -inf on rows with no key).

  Returns:
    ``[B, T, N, H]`` in the input dtype, or ``(output, logsumexp)``.
  """
  inp = prepare_inputs(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                       query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                       local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap)
  out, lse = _get_impl(resolve_implementation(implementation, inp))(inp)
  return (out, lse) if return_residual else out


def reference_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                        query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                        q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                        return_residual: bool = False, return_weights: bool = False):
  """The oracle: same arguments and semantics as :func:`dot_product_attention`, computed plainly in float32.

  Returns the output, followed by the logsumexp ``[B, N, T]`` if ``return_residual`` and the softmax weights
  ``[B, N, T, S]`` (float32) if ``return_weights``.
  """
  inp = prepare_inputs(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                       query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                       local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap)
  out, lse, weights = reference_core(inp)
  extras = ((lse,) if return_residual else ()) + ((weights,) if return_weights else ())
  return (out, *extras) if extras else out
