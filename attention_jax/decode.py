"""Decode attention: a few query tokens against a long KV cache, contiguous or paged.

At inference one query token (or a few, for speculative decoding) attends to a cache of ``S_max`` entries of
which the first ``kv_lengths[b]`` are valid. A training kernel wastes that call (one query block, all the work on
one core), so the work is split over the keys instead (*split-K*, flash-decoding): the cache is cut into
``num_splits`` contiguous ranges, each range gives a partial output and its logsumexp, and one merge
``out = Σ_s exp(lse_s − lse) out_s`` follows. The query heads of one GQA group share their kv head, so they are
packed into the rows of one tile: the cache is read once per kv head, not once per query head.

Semantics (shared by every implementation):

* ``query [B, Tq, N, H]`` are the **last** ``Tq`` valid positions of each row: query ``i`` of row ``b`` sits at
  position ``p = kv_lengths[b] − Tq + i`` and sees cache entries ``j <= p`` (so ``j < kv_lengths[b]``);
  ``key_cache [B, S_max, K, H]``, ``value_cache [B, S_max, K, Hv]``, ``N % K == 0`` (GQA/MQA).
* ``local_window_size=w`` (or ``(left, right)``): query at ``p`` also needs ``j >= p − left``; decoding is causal,
  so ``right`` has no further effect.
* A query with no visible entry (``p < 0``, e.g. ``kv_lengths[b] == 0``) returns zeros.
* Entries beyond ``kv_lengths`` (and outside every window) never reach an output, whatever they hold (NaN
  included): stale or uninitialised cache memory is harmless. A non-finite entry a query *can* see makes that
  query's output NaN.
* logits ``= scale · q·k`` (``scale=None``: ``1/√H``), then ``cap · tanh(logits / cap)`` with ``logits_soft_cap``;
  softmax and accumulation in float32 (float64 for float64 inputs); output in the query dtype.

Implementations: ``"reference"`` (the dense formula), ``"xla"`` / ``"cudnn"`` (the same call through
``jax.nn.dot_product_attention``: the dense baseline; like jax.nn they drop a visible ``-inf`` key entry instead
of returning NaN), ``"blockwise"`` (split-K in pure JAX, any backend),
``"pallas"`` (GPU, Triton lowering) and ``"pallas_tpu"`` (TPU, Mosaic lowering); the Pallas kernels run in
interpret mode on CPU. ``paged_decode_attention`` takes a page pool ``[P, page_size, K, H]`` and a page table
``[B, max_pages]`` instead of a contiguous cache.

Decoding is inference: the pure-JAX implementations differentiate like any JAX code, the Pallas kernels have no
derivative (differentiating them raises ``NotImplementedError``).

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _numerics, core
from attention_jax import masks as masks_lib
from attention_jax._checks import UnsupportedError, positive_int

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "blockwise", "pallas", "pallas_tpu")


class DecodeInputs(NamedTuple):
  """Validated, normalised arguments of :func:`decode_attention` (what every implementation receives)."""
  query: jax.Array        # [B, Tq, N, H]
  key: jax.Array          # [B, S, K, H]
  value: jax.Array        # [B, S, K, Hv]
  kv_lengths: jax.Array   # int32 [B], in [0, S]
  scale: Any              # float, or a traced scalar
  logits_soft_cap: float | None
  window_left: int | None
  batch_shape: tuple[int, ...] | None = None   # the caller's leading dims (None: plain [B, ...] inputs)

  @property
  def shapes(self) -> str:
    return f"query.shape={self.query.shape} key_cache.shape={self.key.shape} value_cache.shape={self.value.shape}"


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


def _check_qkv(fn: str, query, key, value, *, key_name: str, value_name: str, paged: bool):
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  shapes = f"query.shape={query.shape} {key_name}.shape={key.shape} {value_name}.shape={value.shape}"
  for name, x in (("query", query), (key_name, key), (value_name, value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fn}: query/{key_name}/{value_name} must be real floating point; got "
                       f"{name}.dtype={x.dtype} ({shapes})")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"{fn}: query, {key_name} and {value_name} must share a dtype; got {query.dtype}, {key.dtype}, "
                     f"{value.dtype}")
  if query.ndim < 3 or key.ndim != (4 if paged else query.ndim) or value.ndim != key.ndim:
    want = "[P, page_size, K, H]" if paged else "[*B, S_max, K, H] (the same rank as the query)"
    raise ValueError(f"{fn}: query must be [*B, Tq, N, H] and {key_name}/{value_name} {want}; got {shapes}")
  Tq, N, H = query.shape[-3:]
  S, K, Hk = key.shape[-3:]
  if value.shape[:-1] != key.shape[:-1]:
    raise ValueError(f"{fn}: {key_name} and {value_name} must agree on every dim but the last (the value head "
                     f"dim may differ); got {shapes}")
  if Hk != H or H == 0:
    raise ValueError(f"{fn}: head dims differ or are zero: query H={H}, {key_name} H={Hk}; got {shapes}")
  if K == 0 or N % K != 0:
    raise ValueError(f"{fn}: query heads N={N} must be a multiple of kv heads K={K}; got {shapes}")
  if not paged and key.shape[:-3] != query.shape[:-3]:
    raise ValueError(f"{fn}: batch dims differ: query {query.shape[:-3]}, {key_name} {key.shape[:-3]}; got {shapes}")
  return query, key, value, shapes


def _check_lengths(fn: str, kv_lengths, batch_shape: tuple[int, ...], limit: int, B: int) -> jax.Array:
  if kv_lengths is None:
    raise ValueError(f"{fn}: kv_lengths is required (the number of valid cache entries of each row)")
  x = jnp.asarray(kv_lengths)
  ok = (batch_shape,) if batch_shape else ((), (1,))
  if x.shape not in ok or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{fn}: kv_lengths must be an integer array of shape [*B]={batch_shape}; got "
                     f"shape={x.shape} dtype={x.dtype}")
  if not isinstance(x, jax.core.Tracer):
    values = np.asarray(x)
    if values.size and (values.min() < 0 or values.max() > limit):
      raise ValueError(f"{fn}: kv_lengths must lie in [0, {limit}] (the cache length); got {values.tolist()}")
  return jnp.clip(x.reshape(B).astype(jnp.int32), 0, limit)   # traced lengths are clamped


def _check_options(fn: str, H: int, scale, logits_soft_cap, local_window_size):
  scale = 1.0 / math.sqrt(H) if scale is None else core._static_number("scale", scale)
  cap = core._static_number("logits_soft_cap", logits_soft_cap)
  if isinstance(cap, float) and not cap > 0:
    raise ValueError(f"{fn}: logits_soft_cap must be positive; got {cap!r}")
  if cap is not None and not isinstance(cap, float):
    raise ValueError(f"{fn}: logits_soft_cap must be a static (concrete) number; got a traced value")
  window = masks_lib.normalize_window(local_window_size)
  return scale, cap, None if window is None else window[0]


def _check_splits(fn: str, num_splits) -> int | None:
  return None if num_splits is None else positive_int("num_splits", num_splits, context=fn)


def prepare(query, key_cache, value_cache, *, kv_lengths, scale=None, logits_soft_cap=None,
            local_window_size=None, fn: str = "decode_attention") -> DecodeInputs:
  """Checks shapes, dtypes and values (``ValueError`` naming them); rank-3 inputs and extra leading batch dims
  become one batch dim."""
  query, key, value, _ = _check_qkv(fn, query, key_cache, value_cache, key_name="key_cache",
                                    value_name="value_cache", paged=False)
  batch_shape = query.shape[:-3]
  B = math.prod(batch_shape or (1,))
  query, key, value = (x.reshape((B,) + x.shape[-3:]) for x in (query, key, value))
  lengths = _check_lengths(fn, kv_lengths, batch_shape, key.shape[1], B)
  scale, cap, left = _check_options(fn, query.shape[-1], scale, logits_soft_cap, local_window_size)
  return DecodeInputs(query, key, value, lengths, scale, cap, left,
                      None if len(batch_shape) == 1 else tuple(batch_shape))


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def query_positions(kv_lengths: jax.Array, Tq: int) -> jax.Array:
  """``[B, Tq]`` int32: the cache position of each query, ``kv_lengths[b] − Tq + i`` (negative: no entry yet)."""
  return kv_lengths[:, None] - Tq + jnp.arange(Tq, dtype=jnp.int32)[None, :]


def visible(pos: jax.Array, j: jax.Array, window_left: int | None) -> jax.Array:
  """Whether a query at ``pos`` sees cache entry ``j`` (broadcasting)."""
  ok = (j <= pos) & (j >= 0)
  if window_left is not None:
    ok &= j >= pos - window_left
  return ok


def _logits(inp: DecodeInputs, s: jax.Array) -> jax.Array:
  """Scaled (and soft-capped) logits; a non-finite one (a non-finite query or cache entry) becomes NaN, so a visible
  ``-inf`` key poisons its query instead of silently dropping out, and the cap cannot flatten an ``inf``. Hidden
  entries are selected away afterwards, NaN or not."""
  s = jnp.where(jnp.isfinite(s), s, jnp.nan)
  s = s * jnp.asarray(inp.scale, s.dtype)
  if inp.logits_soft_cap is not None:
    cap = jnp.asarray(inp.logits_soft_cap, s.dtype)
    s = cap * jnp.tanh(s / cap)
  return s


def _rows(q_BTNH: jax.Array, K: int) -> jax.Array:
  """``[B, Tq, N, H] -> [B, K, G·Tq, H]``: a GQA group's query heads packed into rows (row ``g·Tq + i``)."""
  B, Tq, N, H = q_BTNH.shape
  G = N // K
  return q_BTNH.reshape(B, Tq, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * Tq, H)


def _unrows(o_BKRE: jax.Array, Tq: int) -> jax.Array:
  """``[B, K, G·Tq, Hv] -> [B, Tq, N, Hv]`` (the inverse of :func:`_rows`)."""
  B, K, R, E = o_BKRE.shape
  G = R // Tq
  return o_BKRE.reshape(B, K, G, Tq, E).transpose(0, 3, 1, 2, 4).reshape(B, Tq, K * G, E)


def _row_positions(inp: DecodeInputs) -> jax.Array:
  """``[B, 1, G·Tq]``: the position of each packed row."""
  B, Tq, N, _ = inp.query.shape
  G = N // inp.key.shape[2]
  return jnp.tile(query_positions(inp.kv_lengths, Tq), (1, G))[:, None, :]


def merge_splits(out_s: jax.Array, lse_s: jax.Array, axis: int) -> jax.Array:
  """``Σ_s exp(lse_s − lse) out_s`` over ``axis`` (``out_s [..., S, ..., R, Hv]`` normalised per split, ``lse_s``
  the same without ``Hv``). Splits with ``lse = −inf`` (no visible entry) take weight 0 by a select, so whatever
  their output holds stays out; a row no split sees is 0."""
  m = jnp.max(lse_s, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)
  live = ~jnp.isneginf(lse_s)
  w = jnp.where(live, jnp.exp(lse_s - m), 0)
  denom = jnp.sum(w, axis=axis, keepdims=True)
  w = w / jnp.where(denom > 0, denom, 1)
  return jnp.sum(jnp.where(live[..., None], w[..., None] * out_s, 0), axis=axis)


def _guarded(inp: DecodeInputs, fast: jax.Array) -> jax.Array:
  """``fast`` unless it holds a non-finite entry, then :func:`_clean_core`: the fast paths multiply probabilities
  into the raw cache, where a NaN behind a zero probability would leak (0 · NaN). Only the small output is
  checked, never the cache; the fallback works chunk by chunk, so it adds no cache-sized temporary."""
  return lax.cond(jnp.all(jnp.isfinite(fast)), lambda: fast, lambda: _clean_core(inp))


_CLEAN_CHUNK = 2048


def _clean_core(inp: DecodeInputs, chunk: int = _CLEAN_CHUNK) -> jax.Array:
  """Online softmax over cache chunks that cleans each value chunk with a select and flags the rows that see a
  non-finite value (they become NaN), so a hidden NaN never meets a multiply. A loop of ``ceil(S / chunk)``
  steps; the last chunk is shifted back to end at ``S`` and skips the columns its predecessor covered."""
  q, k, v = inp.query, inp.key, inp.value
  B, Tq, N, H = q.shape
  S, K, Hv = v.shape[1:]
  cd = _numerics.compute_dtype(q.dtype)
  prec = _numerics.matmul_precision(q.dtype)
  C = min(chunk, S)
  q_r = _rows(q, K)                                                          # [B, K, R, H]
  R = q_r.shape[2]
  pos = _row_positions(inp)[..., None]                                       # [B, 1, R, 1]

  def body(c, carry):
    acc, m, l, bad = carry
    start = jnp.minimum(c * C, S - C)
    k_c = lax.dynamic_slice_in_dim(k, start, C, axis=1)                      # [B, C, K, H]
    v_c = lax.dynamic_slice_in_dim(v, start, C, axis=1)
    cols = start + jnp.arange(C, dtype=jnp.int32)
    cols = jnp.where(cols >= c * C, cols, -1)[None, None, None, :]           # [1, 1, 1, C]
    vis = visible(pos, cols, inp.window_left)                                # [B, 1, R, C]
    s = _logits(inp, jnp.einsum("bkrh,bckh->bkrc", q_r, k_c, preferred_element_type=cd, precision=prec))
    s = jnp.where(vis, s, -jnp.inf)
    v_ok = jnp.isfinite(v_c)
    v_bad = jnp.transpose(~jnp.all(v_ok, axis=-1), (0, 2, 1))[:, :, None, :]  # [B, K, 1, C]
    bad = bad | jnp.any(vis & v_bad, axis=-1)
    v_c = jnp.where(v_ok, v_c, jnp.zeros_like(v_c))
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0)
    p = jnp.where(vis, jnp.exp(s - m_safe[..., None]), 0)
    corr = jnp.where(jnp.isneginf(m), 0, jnp.exp(m - m_safe))
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("bkrc,bcke->bkre", p.astype(v.dtype), v_c, preferred_element_type=cd,
                                             precision=prec)
    return acc, m_new, l, bad

  init = (jnp.zeros((B, K, R, Hv), cd), jnp.full((B, K, R), -jnp.inf, cd), jnp.zeros((B, K, R), cd),
          jnp.zeros((B, K, R), bool))
  acc, _, l, bad = lax.fori_loop(0, -(-S // C), body, init)
  out = acc / jnp.where(l > 0, l, 1)[..., None]
  out = jnp.where(bad[..., None], jnp.nan, out)
  return _unrows(out, Tq).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Implementations: each maps DecodeInputs -> [B, Tq, N, Hv] in the query dtype
# ----------------------------------------------------------------------------------------------------------


def reference_core(inp: DecodeInputs) -> jax.Array:
  """The dense formula: every logit, a masked softmax, selects (never multiplies) around hidden entries."""
  q, k, v = inp.query, inp.key, inp.value
  B, Tq, N, H = q.shape
  S, K = k.shape[1:3]
  cd = _numerics.compute_dtype(q.dtype)
  prec = lax.Precision.HIGHEST
  kh = jnp.repeat(k, N // K, axis=2).astype(cd)      # [B, S, N, H]
  vh = jnp.repeat(v, N // K, axis=2).astype(cd)
  s = _logits(inp, jnp.einsum("btnh,bsnh->bnts", q.astype(cd), kh, precision=prec))
  pos = query_positions(inp.kv_lengths, Tq)           # [B, Tq]
  vis = visible(pos[:, None, :, None], jnp.arange(S)[None, None, None, :], inp.window_left)   # [B, 1, Tq, S]
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1)
  # Selects per (query, entry): a hidden entry's value, NaN or not, contributes exactly nothing.
  contrib = jnp.where(vis[..., None], p[..., None] * jnp.swapaxes(vh, 1, 2)[:, :, None], 0)   # [B, N, Tq, S, Hv]
  return jnp.swapaxes(jnp.sum(contrib, axis=3), 1, 2).astype(q.dtype)


def _jax_nn(inp: DecodeInputs, implementation: str) -> jax.Array:
  """The same call through ``jax.nn.dot_product_attention``: the dense baseline."""
  if inp.logits_soft_cap is not None:
    raise UnsupportedError(f"decode implementation={implementation!r} (jax.nn.dot_product_attention) has no "
                           "logits_soft_cap; use 'blockwise' or a Pallas kernel")
  if inp.value.shape[-1] != inp.query.shape[-1]:
    raise UnsupportedError(f"decode implementation={implementation!r} needs the value head dim to equal the "
                           f"query head dim; got {inp.shapes}")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise UnsupportedError("decode implementation='cudnn' needs a CUDA GPU")
  if not isinstance(inp.scale, float) or inp.query.dtype == jnp.float64:
    raise UnsupportedError(f"decode implementation={implementation!r} needs a static scale and 16/32-bit inputs")
  q, k, v = inp.query, inp.key, inp.value
  B, Tq = q.shape[:2]
  S = k.shape[1]
  if implementation == "cudnn":
    if Tq != 1 or inp.window_left is not None:
      raise UnsupportedError("decode implementation='cudnn' takes one query token without a window (it has no "
                             "bottom-right causal alignment); use 'pallas' or 'blockwise'")
    fast = jax.nn.dot_product_attention(q, k, v, scale=inp.scale, key_value_seq_lengths=inp.kv_lengths,
                                        implementation="cudnn")
  else:
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))   # XLA:CPU has no compiled f16 x f16 -> f32 dot
    pos = query_positions(inp.kv_lengths, Tq)
    vis = visible(pos[:, None, :, None], jnp.arange(S)[None, None, None, :], inp.window_left)   # [B, 1, Tq, S]
    fast = jax.nn.dot_product_attention(q, k, v, mask=vis, scale=inp.scale, implementation="xla")
  # jax.nn averages the values on rows with no visible entry; ours are zeros.
  has_key = (query_positions(inp.kv_lengths, Tq) >= 0)[:, :, None, None]
  fast = jnp.where(has_key, fast, 0).astype(inp.query.dtype)
  return _guarded(inp, fast)


def default_num_splits(S: int, backend: str | None = None) -> int:
  """Splits of the cache when ``num_splits=None``. On CPU, XLA already spreads one einsum over the cores and the
  merge is extra work, so one split (measured: docs/BENCHMARKS.md "CPU: decode attention"); on accelerators,
  ranges of about 1024 entries."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return 1
  return max(1, min(S // 1024, 64))


def _split_partials(inp: DecodeInputs, num_splits: int, reduce_form: bool | None = None):
  """Per split: the normalised partial output ``[B, K, n, R, Hv]`` and logsumexp ``[B, K, n, R]`` (compute dtype),
  rows ``R = G·Tq`` packed per kv head. ``reduce_form`` computes the products as fused multiply-reductions instead
  of dots (None: on CPU when there are several kv heads)."""
  q, k, v = inp.query, inp.key, inp.value
  B, Tq, N, H = q.shape
  S, K = k.shape[1:3]
  cd = _numerics.compute_dtype(q.dtype)
  n = max(1, min(num_splits, S))
  L = -(-S // n)
  Sp = n * L
  if Sp != S:   # only when the splits do not divide the cache; the padding is never visible (j >= kv_lengths)
    k, v = (_numerics.pad_axis(x, 1, Sp) for x in (k, v))
  k_s, v_s = k.reshape(B, n, L, K, H), v.reshape(B, n, L, K, -1)
  q_r = _rows(q, K)                                                       # [B, K, R, H]
  j = (jnp.arange(n, dtype=jnp.int32)[:, None] * L + jnp.arange(L, dtype=jnp.int32)[None, :])   # [n, L]
  pos = _row_positions(inp)                                                # [B, 1, R]
  if reduce_form is None:   # measured on XLA:CPU (docs/BENCHMARKS.md): dots win only with one contiguous kv head
    reduce_form = jax.default_backend() == "cpu" and K > 1
  if reduce_form:
    return _split_partials_reduce(inp, q_r, k_s, v_s, j, pos, cd)
  prec = _numerics.matmul_precision(q.dtype)
  s = jnp.einsum("bkrh,bnlkh->bknrl", q_r, k_s, preferred_element_type=cd, precision=prec)
  s = _logits(inp, s)
  vis = visible(pos[:, :, None, :, None], j[None, None, :, None, :], inp.window_left)   # [B, 1, n, R, L]
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0)
  p = jnp.where(vis, jnp.exp(s - m_safe[..., None]), 0)
  denom = jnp.sum(p, axis=-1)
  # As in flash attention: 16-bit values meet probabilities rounded to their dtype, accumulated in float32.
  o = jnp.einsum("bknrl,bnlke->bknre", p.astype(v.dtype), v_s, preferred_element_type=cd, precision=prec)
  o = o / jnp.where(denom > 0, denom, 1)[..., None]
  lse = jnp.where(denom > 0, m_safe + jnp.log(jnp.where(denom > 0, denom, 1)), -jnp.inf)
  return o, lse


def _split_partials_reduce(inp: DecodeInputs, q_r, k_s, v_s, j, pos, cd):
  """:func:`_split_partials` as broadcast multiplies fused into reductions, in the cache's own layout
  ``[B, n, L, K, ...]``: XLA:CPU reads the cache once this way, where its dot with the kv heads strided in the
  cache is 2-6x slower; with one kv head the dot is about 2x faster (measured: docs/BENCHMARKS.md "CPU: decode
  attention")."""
  qb = q_r.astype(cd)[:, None, None]                                      # [B, 1, 1, K, R, H]
  s = _logits(inp, jnp.sum(k_s.astype(cd)[:, :, :, :, None, :] * qb, axis=-1))   # [B, n, L, K, R]
  vis = visible(pos[:, :, None, None, :], j[None, :, :, None, None], inp.window_left)   # [B, n, L, 1, R]
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=2)                                                  # [B, n, K, R]
  m_safe = jnp.where(jnp.isfinite(m), m, 0)
  p = jnp.where(vis, jnp.exp(s - m_safe[:, :, None]), 0)
  denom = jnp.sum(p, axis=2)
  o = jnp.sum(p.astype(v_s.dtype).astype(cd)[..., None] * v_s.astype(cd)[:, :, :, :, None, :], axis=2)  # [B,n,K,R,E]
  o = o / jnp.where(denom > 0, denom, 1)[..., None]
  lse = jnp.where(denom > 0, m_safe + jnp.log(jnp.where(denom > 0, denom, 1)), -jnp.inf)
  return jnp.transpose(o, (0, 2, 1, 3, 4)), jnp.transpose(lse, (0, 2, 1, 3))


def blockwise_core(inp: DecodeInputs, num_splits: int | None = None, reduce_form: bool | None = None) -> jax.Array:
  """Split-K in pure JAX: the splits are one batched computation, then one logsumexp merge."""
  B, Tq = inp.query.shape[:2]
  n = default_num_splits(inp.key.shape[1]) if num_splits is None else num_splits
  o, lse = _split_partials(inp, n, reduce_form)
  fast = _unrows(merge_splits(o, lse, axis=2), Tq).astype(inp.query.dtype)
  return _guarded(inp, fast)


def _pallas(inp: DecodeInputs, num_splits: int | None, interpret=None) -> jax.Array:
  from attention_jax.kernels import decode_gpu
  return decode_gpu.decode_core(inp, num_splits=num_splits, interpret=interpret)


def _pallas_tpu(inp: DecodeInputs, num_splits: int | None, interpret=None) -> jax.Array:
  from attention_jax.kernels import decode_tpu
  return decode_tpu.decode_core(inp, num_splits=num_splits, interpret=interpret)


def _auto(backend: str) -> tuple[str, ...]:
  """``implementation=None``: the Pallas decode kernel on GPU / TPU, falling through to blockwise (which takes
  every call); blockwise on CPU (measured within a few percent of the dense XLA call, docs/BENCHMARKS.md)."""
  kernel = {"gpu": ("pallas",), "tpu": ("pallas_tpu",)}.get(backend, ())
  return kernel + ("blockwise",)


def _call(name: str, inp: DecodeInputs, num_splits: int | None) -> jax.Array:
  if name == "reference":
    return reference_core(inp)
  if name in ("xla", "cudnn"):
    return _jax_nn(inp, name)
  if name == "blockwise":
    return blockwise_core(inp, num_splits)
  if name == "pallas":
    return _pallas(inp, num_splits)
  return _pallas_tpu(inp, num_splits)


_STATIC = ("scale", "logits_soft_cap", "window_left", "batch_shape")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(names: tuple[str, ...], num_splits: int | None, static: tuple, arrays: dict) -> jax.Array:
  inp = DecodeInputs(**dict(static), **arrays)
  out = core.first_that_runs(names, lambda name: _call(name, inp, num_splits), "decode_attention ")
  return out if inp.batch_shape is None else out.reshape(inp.batch_shape + out.shape[1:])


def run(inp: DecodeInputs, implementation, num_splits: int | None) -> jax.Array:
  """Dispatch and the jit boundary (static options key the compilation cache)."""
  names = core.resolve_names(implementation, IMPLEMENTATIONS, _auto(jax.default_backend()), "decode_attention ")
  B, Tq, N, _ = inp.query.shape
  if 0 in (B, Tq, N, inp.value.shape[-1]) or inp.key.shape[1] == 0:
    out = jnp.zeros((B, Tq, N, inp.value.shape[-1]), inp.query.dtype)
    return out if inp.batch_shape is None else out.reshape(inp.batch_shape + out.shape[1:])
  static, arrays = [], {}
  for name, value in inp._asdict().items():
    if name in _STATIC and not isinstance(value, jax.Array):
      static.append((name, value))
    else:
      arrays[name] = value
  return _run(names, num_splits, tuple(static), arrays)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def decode_attention(query, key_cache, value_cache, *, kv_lengths, scale=None, logits_soft_cap=None,
                     local_window_size=None, num_splits: int | None = None,
                     implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Attention of the last ``Tq`` positions of each row against its KV cache (see the module docstring).

  Args:
    query: ``[B, Tq, N, H]`` (``[Tq, N, H]`` without a batch dim; extra leading batch dims are accepted).
    key_cache, value_cache: ``[B, S_max, K, H]`` / ``[B, S_max, K, Hv]``; entries ``[:kv_lengths[b]]`` are valid.
    kv_lengths: int ``[B]``, in ``[0, S_max]``: query ``i`` of row ``b`` sees entries ``j <= kv_lengths[b] − Tq + i``.
    scale: logit scale, default ``1/√H``.
    logits_soft_cap: ``cap · tanh(logits / cap)`` if given.
    local_window_size: ``w`` or ``(left, right)``: also ``j >= position − left``.
    num_splits: cache ranges computed in parallel and merged by logsumexp (split-K); None picks per backend.
    implementation: ``None``/"auto", "reference", "xla", "cudnn", "blockwise", "pallas", "pallas_tpu", or a
      sequence of them (the first that takes the call runs).

  Returns:
    ``[B, Tq, N, Hv]`` in the query dtype.
  """
  inp = prepare(query, key_cache, value_cache, kv_lengths=kv_lengths, scale=scale, logits_soft_cap=logits_soft_cap,
                local_window_size=local_window_size)
  return run(inp, implementation, _check_splits("decode_attention", num_splits))


def decode_attention_reference(query, key_cache, value_cache, *, kv_lengths, scale=None, logits_soft_cap=None,
                               local_window_size=None, num_splits=None, implementation=None) -> jax.Array:
  """:func:`decode_attention` by the dense formula (``num_splits`` and ``implementation`` are ignored)."""
  del num_splits, implementation
  return decode_attention(query, key_cache, value_cache, kv_lengths=kv_lengths, scale=scale,
                          logits_soft_cap=logits_soft_cap, local_window_size=local_window_size,
                          implementation="reference")


# ----------------------------------------------------------------------------------------------------------
# Paged caches
# ----------------------------------------------------------------------------------------------------------

PAGED_IMPLEMENTATIONS = ("reference", "blockwise", "pallas", "pallas_tpu")


class PagedInputs(NamedTuple):
  query: jax.Array        # [B, Tq, N, H]
  key_pages: jax.Array    # [P, page_size, K, H]
  value_pages: jax.Array  # [P, page_size, K, Hv]
  page_table: jax.Array   # int32 [B, max_pages], entries in [0, P)
  kv_lengths: jax.Array   # int32 [B], in [0, max_pages · page_size]
  scale: Any
  logits_soft_cap: float | None
  window_left: int | None


def prepare_paged(query, key_pages, value_pages, page_table, *, kv_lengths, scale=None, logits_soft_cap=None,
                  local_window_size=None) -> PagedInputs:
  fn = "paged_decode_attention"
  query, key_pages, value_pages, shapes = _check_qkv(fn, query, key_pages, value_pages, key_name="key_pages",
                                                     value_name="value_pages", paged=True)
  if query.ndim != 4:
    raise ValueError(f"{fn}: query must be [B, Tq, N, H]; got {shapes}")
  B = query.shape[0]
  table = jnp.asarray(page_table)
  if table.ndim != 2 or table.shape[0] != B or not jnp.issubdtype(table.dtype, jnp.integer):
    raise ValueError(f"{fn}: page_table must be an integer array [B={B}, max_pages]; got shape={table.shape} "
                     f"dtype={table.dtype} ({shapes})")
  P, page_size = key_pages.shape[:2]
  if page_size == 0 or P == 0:
    raise ValueError(f"{fn}: the page pool is empty; got {shapes}")
  lengths = _check_lengths(fn, kv_lengths, (B,), table.shape[1] * page_size, B)
  if not isinstance(table, jax.core.Tracer) and table.size:
    values = np.asarray(table)
    if values.min() < 0 or values.max() >= P:
      raise ValueError(f"{fn}: page_table entries must lie in [0, {P}) (the pool has P={P} pages); got "
                       f"min={values.min()} max={values.max()}")
  scale, cap, left = _check_options(fn, query.shape[-1], scale, logits_soft_cap, local_window_size)
  return PagedInputs(query, key_pages, value_pages, jnp.clip(table.astype(jnp.int32), 0, P - 1), lengths, scale,
                     cap, left)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """``[P, page_size, K, H]`` gathered by ``page_table [B, max_pages]`` -> the contiguous ``[B, max_pages · page_size,
  K, H]`` cache (a copy)."""
  B, M = page_table.shape
  g = jnp.take(pages, page_table.reshape(-1), axis=0)          # [B · M, page_size, K, H]
  return g.reshape(B, M * pages.shape[1], *pages.shape[2:])


def _contiguous(inp: PagedInputs) -> DecodeInputs:
  return DecodeInputs(inp.query, gather_pages(inp.key_pages, inp.page_table),
                      gather_pages(inp.value_pages, inp.page_table), inp.kv_lengths, inp.scale, inp.logits_soft_cap,
                      inp.window_left)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_paged(names: tuple[str, ...], num_splits: int | None, static: tuple, arrays: dict) -> jax.Array:
  inp = PagedInputs(**dict(static), **arrays)

  def call(name):
    if name == "pallas":
      from attention_jax.kernels import decode_gpu
      return decode_gpu.paged_decode_core(inp, num_splits=num_splits)
    if name == "pallas_tpu":
      from attention_jax.kernels import decode_tpu
      return decode_tpu.paged_decode_core(inp, num_splits=num_splits)
    # Pure JAX: gather the row's pages into a contiguous cache, then decode it.
    return _call(name, _contiguous(inp), num_splits)
  return core.first_that_runs(names, call, "paged_decode_attention ")


def paged_decode_attention(query, key_pages, value_pages, page_table, *, kv_lengths, scale=None,
                           logits_soft_cap=None, local_window_size=None, num_splits: int | None = None,
                           implementation: str | Sequence[str] | None = None) -> jax.Array:
  """:func:`decode_attention` over a paged cache.

  Args:
    query: ``[B, Tq, N, H]``.
    key_pages, value_pages: the page pool, ``[P, page_size, K, H]`` / ``[P, page_size, K, Hv]``.
    page_table: int ``[B, max_pages]``: row ``b``'s entry ``j`` lives at ``page_table[b, j // page_size]``, offset
      ``j % page_size``. Entries past a row's length may name any page.
    kv_lengths: int ``[B]``, in ``[0, max_pages · page_size]``.
    scale, logits_soft_cap, local_window_size, num_splits: as in :func:`decode_attention`.
    implementation: ``None``/"auto", "reference", "blockwise" (both gather the pages into a contiguous copy
      first), "pallas", "pallas_tpu" (the kernels read the pages in place), or a sequence of them.

  Returns:
    ``[B, Tq, N, Hv]`` in the query dtype.
  """
  inp = prepare_paged(query, key_pages, value_pages, page_table, kv_lengths=kv_lengths, scale=scale,
                      logits_soft_cap=logits_soft_cap, local_window_size=local_window_size)
  names = core.resolve_names(implementation, PAGED_IMPLEMENTATIONS, _auto(jax.default_backend()),
                             "paged_decode_attention ")
  splits = _check_splits("paged_decode_attention", num_splits)
  B, Tq, N, _ = inp.query.shape
  if 0 in (B, Tq, N, inp.value_pages.shape[-1]) or inp.page_table.shape[1] == 0:
    return jnp.zeros((B, Tq, N, inp.value_pages.shape[-1]), inp.query.dtype)
  static = tuple((n, getattr(inp, n)) for n in ("scale", "logits_soft_cap", "window_left")
                 if not isinstance(getattr(inp, n), jax.Array))
  arrays = {n: v for n, v in inp._asdict().items() if n not in dict(static)}
  return _run_paged(names, splits, static, arrays)


def paged_decode_attention_reference(query, key_pages, value_pages, page_table, *, kv_lengths, scale=None,
                                     logits_soft_cap=None, local_window_size=None, num_splits=None,
                                     implementation=None) -> jax.Array:
  """:func:`paged_decode_attention` by the dense formula on the gathered cache."""
  del num_splits, implementation
  return paged_decode_attention(query, key_pages, value_pages, page_table, kv_lengths=kv_lengths, scale=scale,
                                logits_soft_cap=logits_soft_cap, local_window_size=local_window_size,
                                implementation="reference")
