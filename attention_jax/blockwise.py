"""Memory-efficient attention in pure JAX: online softmax over key chunks, for any backend.

The forward maps over query chunks; for each it loops over only the key chunks its rows can see (causal and
local-window chunks outside the band are skipped), keeping a running max, sum and accumulator in the compute dtype
(float32, or float64 for float64 inputs) (Rabe & Staats 2021; Dao et al. 2022). Memory is
O(query_chunk x key_chunk) per step instead of O(T x S).

The backward is a ``jax.custom_vjp`` that saves only the output and the logsumexp and recomputes each tile's
probabilities: one pass over key chunks, an inner loop over the query chunks that see them, accumulating
dK/dV per key chunk and dQ into a compute-dtype buffer. Nothing of size T x S is ever stored. Its loops have
data-dependent bounds, so the backward itself is not differentiable: the public entry points compute forward-mode
and second-order derivatives through the reference formula instead (``core.run_custom``).

Masked tiles use selects, never multiplies by zero, so a NaN/Inf at a position a query cannot see (a key beyond
the lengths, hidden by the mask, causality, the window, segments or a ``-inf`` bias) never reaches that query's
output or any gradient through it: logits are selected to ``-inf``, values enter cleaned with a per-row flag for
visible non-finite ones, and the backward selects ``ds`` and multiplies by cleaned q / k.

``blockwise_attention`` has the arguments and semantics of :func:`attention_jax.dot_product_attention`
(including ``bias`` and ``mask`` arrays, which are sliced per tile, and a gradient for ``bias``);
``blockwise_attention_reference`` is the plain algorithm with the same signature.

``block_forward`` / ``block_backward`` expose one key block's partial result (output and logsumexp in the compute
dtype, to be combined with other blocks' by the logsumexp rule) and that block's share of the gradients given the
*global* logsumexp and ``delta``; ring attention (attention_jax/ring.py) composes them across devices.

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

from attention_jax import _numerics, _tiling, core
from attention_jax._checks import positive_int


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
  """Query / key chunk lengths. Larger chunks mean bigger matmuls and more memory per step."""
  query: int = 512
  key: int = 512

  def __post_init__(self):
    for name in ("query", "key"):
      object.__setattr__(self, name, positive_int(f"ChunkSizes.{name}", getattr(self, name)))

  @classmethod
  def get_default(cls) -> ChunkSizes:
    # Measured on a 2-core CPU (experiments/scaling.py, docs/BENCHMARKS.md): 512 x 512 tiles are within a few
    # percent of the best of {256, 512, 1024}^2 for H = 64 and keep a tile at 1 MiB.
    return cls(512, 512)

  @classmethod
  def resolve(cls, chunk_sizes: ChunkSizes | int | None) -> ChunkSizes:
    """``None`` -> the default; a positive int ``c`` -> ``ChunkSizes(c, c)``; anything else -> ``ValueError``."""
    if chunk_sizes is None:
      return cls.get_default()
    if isinstance(chunk_sizes, cls):
      return chunk_sizes
    if isinstance(chunk_sizes, (int, np.integer)) and not isinstance(chunk_sizes, bool):
      size = positive_int("chunk_sizes", chunk_sizes)
      return cls(size, size)
    raise ValueError(f"chunk_sizes must be a blockwise.ChunkSizes, a positive int or None; got {chunk_sizes!r}")


_PATH = "the blockwise path"


class _Config(NamedTuple):
  """Static (hashable) configuration of one call."""
  scale: float
  soft_cap: float | None
  is_causal: bool
  window: tuple[int, int] | None
  T: int               # true lengths (before padding to whole chunks)
  S: int
  cq: int
  ck: int
  mm_precision: Any    # matmul precision: HIGHEST for float32 / float64 inputs
  compute_dtype: Any = np.dtype(np.float32)   # accumulators and softmax: promote_types(dtype, float32)


class _Aux(NamedTuple):
  """Non-differentiable per-call arrays (each may be None)."""
  q_len: jax.Array | None    # int32 [B]
  kv_len: jax.Array | None   # int32 [B]
  q_seg: jax.Array | None    # int32 [B, Tp]
  kv_seg: jax.Array | None   # int32 [B, Sp]
  mask: jax.Array | None     # bool [Bm, Nm, Tm, Sm], padded like bias
  bias_visible: jax.Array | None = None   # bool, bias.shape: False where the bias is -inf (hides its key)


def _tile(x: jax.Array, q0, cq: int, k0, ck: int) -> jax.Array:
  """Slice rows [q0, q0+cq) and cols [k0, k0+ck) of a [.., .., T|1, S|1] array (broadcast dims kept)."""
  if x.shape[2] != 1:
    x = lax.dynamic_slice_in_dim(x, q0, cq, axis=2)
  if x.shape[3] != 1:
    x = lax.dynamic_slice_in_dim(x, k0, ck, axis=3)
  return x


def _heads5(x: jax.Array, K: int, G: int) -> jax.Array:
  """[B|1, N|1, r, c] -> [B|1, K|1, G|1, r, c]."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], K, G, *x.shape[2:])


def _mm(cfg: _Config, spec: str, a, b):
  return _numerics.einsum(spec, a, b, dtype=cfg.compute_dtype, precision=cfg.mm_precision)


def _has_mask(cfg: _Config, aux: _Aux) -> bool:
  """Whether tiles need a mask (static): some pair of real positions is hidden, or keys are padded."""
  return bool(aux.kv_len is not None or cfg.S % cfg.ck or aux.q_len is not None or cfg.is_causal
              or cfg.window is not None or aux.q_seg is not None or aux.mask is not None
              or aux.bias_visible is not None)


def _tile_mask(cfg: _Config, aux: _Aux, q0, k0, K: int, G: int):
  """Bool mask broadcastable to ``[B, K, G, cq, ck]``, or None when no tile needs one.

  When any masking applies, padded query rows (``T`` rounded up to whole chunks) are hidden too, so that they
  never add to dK / dV.
  """
  if not _has_mask(cfg, aux):
    return None
  rows = (q0 + jnp.arange(cfg.cq, dtype=jnp.int32))[:, None]
  cols = (k0 + jnp.arange(cfg.ck, dtype=jnp.int32))[None, :]
  kv_limit = None
  if aux.kv_len is not None:
    kv_limit = jnp.minimum(aux.kv_len, cfg.S)[:, None, None, None, None]
  elif cfg.S % cfg.ck:
    kv_limit = cfg.S
  q_limit = None
  if aux.q_len is not None:
    q_limit = jnp.minimum(aux.q_len, cfg.T)[:, None, None, None, None]
  elif cfg.T % cfg.cq:
    q_limit = cfg.T
  mask = _tiling.position_mask(rows[None, None, None], cols[None, None, None], is_causal=cfg.is_causal,
                               window=cfg.window, kv_limit=kv_limit, q_limit=q_limit)
  parts = [] if mask is None else [mask]
  if aux.q_seg is not None:
    q_seg = lax.dynamic_slice_in_dim(aux.q_seg, q0, cfg.cq, axis=1)
    kv_seg = lax.dynamic_slice_in_dim(aux.kv_seg, k0, cfg.ck, axis=1)
    parts.append((q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None])
  for user in (aux.mask, aux.bias_visible):
    if user is not None:
      parts.append(_heads5(_tile(user, q0, cfg.cq, k0, cfg.ck), K, G))
  return functools.reduce(jnp.logical_and, parts)


def _tile_scores(cfg: _Config, aux: _Aux, q_i, k_j, bias, q0, k0):
  """``(s, tanh, mask)`` of one tile: ``[B, K, G, cq, ck]`` logits (scaled, soft-capped, biased, ``-inf`` where
  hidden) in the compute dtype, the soft-cap's tanh (or None) and the tile's mask (or None).

  ``q_i [B, K, G, cq, H]``, ``k_j [B, K, ck, H]``: head-major tiles, so the matmul is a plain batched
  ``[G*cq, H] x [H, ck]`` (about twice as fast on CPU as contracting the [B, T, N, H] layout directly).
  """
  B, K, G, cq, H = q_i.shape
  s = _mm(cfg, "bkmh,bksh->bkms", q_i.reshape(B, K, G * cq, H), k_j).reshape(B, K, G, cq, -1)
  s = s * cfg.scale
  tanh = None
  if cfg.soft_cap is not None:
    tanh = jnp.tanh(s / cfg.soft_cap)
    s = cfg.soft_cap * tanh
  if bias is not None:
    s = s + _heads5(_tile(bias, q0, cfg.cq, k0, cfg.ck), K, G).astype(s.dtype)
  mask = _tile_mask(cfg, aux, q0, k0, K, G)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)     # a select: NaN/Inf logits at hidden pairs are dropped here
  return s, tanh, mask


def _limits(cfg: _Config, aux: _Aux):
  kv_max = cfg.S if aux.kv_len is None else jnp.minimum(jnp.max(aux.kv_len), cfg.S)
  q_max = None if aux.q_len is None else jnp.max(aux.q_len)
  return kv_max, q_max


def _head_major(q, k, v):
  """[B, Tp, N, H] -> [B, K, G, Tp, H]; [B, Sp, K, H] -> [B, K, Sp, H] (v: [B, Sp, K, Hv] -> [B, K, Sp, Hv])."""
  B, Tp, N, H = q.shape
  K = k.shape[2]
  q_h = jnp.transpose(q.reshape(B, Tp, K, N // K, H), (0, 2, 3, 1, 4))
  return q_h, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _forward(cfg: _Config, q, k, v, bias, aux: _Aux, out_dtype=None):
  """``(out [B, Tp, N, Hv] in out_dtype (default q's), lse [B, N, Tp] in the compute dtype, -inf: no key)``."""
  B, Tp, N, H = q.shape
  K, Hv = v.shape[2:]
  G = N // K
  cd = cfg.compute_dtype
  masked = _has_mask(cfg, aux)
  q_h, k_h, v_h = _head_major(q, k, v)
  kv_max, q_max = _limits(cfg, aux)

  def query_chunk(i):
    q0 = i * cfg.cq
    q_i = lax.dynamic_slice_in_dim(q_h, q0, cfg.cq, axis=3)
    lo, hi = _tiling.kv_block_range(q0, cfg.cq, cfg.ck, kv_len=kv_max, is_causal=cfg.is_causal,
                                    window=cfg.window, q_limit=q_max)

    def body(j, carry):
      acc, m, l, bad = carry
      k0 = j * cfg.ck
      k_j = lax.dynamic_slice_in_dim(k_h, k0, cfg.ck, axis=2)
      v_j = lax.dynamic_slice_in_dim(v_h, k0, cfg.ck, axis=2)
      s, _, mask = _tile_scores(cfg, aux, q_i, k_j, bias, q0, k0)
      m_new = jnp.maximum(m, s.max(axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)      # rows that have seen no key yet
      p = jnp.exp(s - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = correction * l + p.sum(axis=-1)
      if mask is not None:
        # p is exactly 0 at hidden pairs, but 0 * NaN is NaN: clean the values and flag the rows that do see a
        # non-finite one.
        v_bad = ~_numerics.finite_rows(v_j)                                               # [B, K, ck]
        bad = bad | jnp.any(mask & v_bad[:, :, None, None, :], axis=-1)
        v_j = _numerics.clean(v_j)
      pv = _mm(cfg, "bkms,bksh->bkmh", p.astype(v.dtype).reshape(B, K, G * cfg.cq, cfg.ck), v_j)
      return correction[..., None] * acc + pv.reshape(acc.shape), m_new, l, bad

    init = (jnp.zeros((B, K, G, cfg.cq, Hv), cd), jnp.full((B, K, G, cfg.cq), -jnp.inf, cd),
            jnp.zeros((B, K, G, cfg.cq), cd), jnp.zeros((B, K, G, cfg.cq), bool))
    acc, m, l, bad = lax.fori_loop(lo, hi, body, init)
    empty = l == 0                  # no visible key (a NaN sum is not empty: it propagates)
    safe = jnp.where(empty, jnp.ones_like(l), l)
    out = acc / safe[..., None]
    if masked:
      out = jnp.where(bad[..., None], jnp.nan, out)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
    return out.astype(out_dtype or q.dtype), lse

  out, lse = lax.map(query_chunk, jnp.arange(Tp // cfg.cq))   # [nq, B, K, G, cq, Hv], [nq, B, K, G, cq]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(B, Tp, N, Hv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, N, Tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, bias, aux: _Aux):
  return _forward(cfg, q, k, v, bias, aux)


def _attention_fwd(cfg, q, k, v, bias, aux):
  out, lse = _forward(cfg, q, k, v, bias, aux)
  # Residuals stay finite on valid inputs (jax.debug_infs checks them): rows with no key store 0, which the
  # backward never needs (their logits are all -inf, so p = exp(-inf - 0) = 0).
  lse_res = jnp.where(jnp.isneginf(lse), jnp.zeros_like(lse), lse)
  return (out, lse), (q, k, v, bias, aux, out, lse_res)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the axes where ``shape`` has size 1 (the broadcast axes), keeping dims."""
  axes = tuple(a for a, (d, t) in enumerate(zip(shape, x.shape)) if d == 1 and t != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


_SECOND_ORDER_MESSAGE = (
    "the blockwise attention backward pass cannot be differentiated again (second-order reverse mode, or forward "
    "mode over a gradient): its loops have data-dependent bounds. Use implementation='reference' or 'xla' "
    "(blockwise_attention_reference) for higher-order derivatives. dot_product_attention and blockwise_attention "
    "switch to the reference by themselves when the higher-order differentiation is visible at the call; here the "
    "first derivative was taken inside a separately jitted function.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_backward(cfg: _Config, q, k, v, bias, aux: _Aux, out, lse, d_out, d_lse):
  delta = _numerics.backward_delta(out, d_out, d_lse, cfg.compute_dtype)
  return _backward(cfg, q, k, v, bias, aux, d_out, lse, delta)


@_first_order_backward.defjvp
def _first_order_backward_jvp(cfg, primals, tangents):
  raise NotImplementedError(_SECOND_ORDER_MESSAGE)


def _attention_bwd(cfg, res, cts):
  q, k, v, bias, aux, out, lse = res
  d_out, d_lse = cts
  dq, dk, dv, dbias = _first_order_backward(cfg, q, k, v, bias, aux, out, lse, d_out, d_lse)
  return dq, dk, dv, dbias, None


def _backward(cfg: _Config, q, k, v, bias, aux: _Aux, d_out, lse, delta, grad_dtype=None):
  """dq, dk, dv, dbias from the logsumexp ``lse`` and ``delta = rowsum(dO * O) [B, N, Tp]`` (both given).

  ``lse`` may be ``-inf`` (or anything finite) on rows with no visible key: their probabilities are 0 either way.
  """
  B, Tp, N, H = q.shape
  Sp, K, Hv = v.shape[1:]
  G = N // K
  cd = cfg.compute_dtype
  q_h, k_h, v_h = _head_major(q, k, v)
  do_h = _head_major(d_out, k, v)[0]                                        # [B, K, G, Tp, Hv]
  delta = delta.astype(cd).reshape(B, K, G, Tp)
  lse = lse.astype(cd)
  lse_b = jnp.where(jnp.isneginf(lse), jnp.inf, lse).reshape(B, K, G, Tp)  # rows with no key: P = 0
  kv_max, q_max = _limits(cfg, aux)
  q_lim = cfg.T if q_max is None else jnp.minimum(q_max, cfg.T)
  M = G * cfg.cq

  def key_chunk(j, carry):
    dq, dk_all, dv_all, dbias = carry
    k0 = j * cfg.ck
    k_j = lax.dynamic_slice_in_dim(k_h, k0, cfg.ck, axis=2)
    v_j = lax.dynamic_slice_in_dim(v_h, k0, cfg.ck, axis=2)
    lo, hi = _tiling.q_block_range(k0, cfg.ck, cfg.cq, q_len=q_lim, is_causal=cfg.is_causal, window=cfg.window,
                                   kv_limit=kv_max)

    def body(i, c):
      dk, dv, dq, dbias = c
      q0 = i * cfg.cq
      q_i = lax.dynamic_slice_in_dim(q_h, q0, cfg.cq, axis=3)
      do_i = lax.dynamic_slice_in_dim(do_h, q0, cfg.cq, axis=3).reshape(B, K, M, Hv)
      lse_i = lax.dynamic_slice_in_dim(lse_b, q0, cfg.cq, axis=3)
      delta_i = lax.dynamic_slice_in_dim(delta, q0, cfg.cq, axis=3)
      s, tanh, mask = _tile_scores(cfg, aux, q_i, k_j, bias, q0, k0)
      p = jnp.exp(s - lse_i[..., None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)               # exp(-inf - lse) is NaN where a NaN query row's lse is NaN
      dv = dv + _mm(cfg, "bkms,bkmh->bksh", p.astype(v.dtype).reshape(B, K, M, cfg.ck), do_i)
      dp = _mm(cfg, "bkmh,bksh->bkms", do_i, v_j).reshape(p.shape)
      ds = p * (dp - delta_i[..., None])          # d loss / d (final logits)
      if mask is not None:
        ds = jnp.where(mask, ds, 0.0)             # a NaN/Inf value or delta at a hidden pair stays there
      if dbias is not None:
        db = _reduce_to(ds.reshape(B, N, cfg.cq, cfg.ck), (dbias.shape[0], dbias.shape[1],
                                                          1 if dbias.shape[2] == 1 else cfg.cq,
                                                          1 if dbias.shape[3] == 1 else cfg.ck))
        starts = tuple(jnp.asarray(x, jnp.int32) for x in (0, 0, 0 if dbias.shape[2] == 1 else q0,
                                                             0 if dbias.shape[3] == 1 else k0))
        dbias = lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, starts, db.shape) + db, starts)
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
        if mask is not None:
          ds = jnp.where(mask, ds, 0.0)           # tanh of a hidden non-finite logit
      ds = (ds * cfg.scale).astype(q.dtype).reshape(B, K, M, cfg.ck)
      q_m = q_i.reshape(B, K, M, H)
      k_m = k_j
      if mask is not None:                        # ds is 0 at hidden pairs, but 0 * NaN is NaN
        q_m, k_m = _numerics.clean(q_m), _numerics.clean(k_m)
      dk = dk + _mm(cfg, "bkms,bkmh->bksh", ds, q_m)
      dq_i = _mm(cfg, "bkms,bksh->bkmh", ds, k_m).reshape(B, K, G, cfg.cq, H)
      dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, q0, cfg.cq, axis=3) + dq_i, q0, axis=3)
      return dk, dv, dq, dbias

    dk, dv, dq, dbias = lax.fori_loop(lo, hi, body, (jnp.zeros((B, K, cfg.ck, H), cd),
                                                     jnp.zeros((B, K, cfg.ck, Hv), cd), dq, dbias))
    dk_all = lax.dynamic_update_slice_in_dim(dk_all, dk.astype(dk_all.dtype), k0, axis=2)
    dv_all = lax.dynamic_update_slice_in_dim(dv_all, dv.astype(dv_all.dtype), k0, axis=2)
    return dq, dk_all, dv_all, dbias

  init = (jnp.zeros((B, K, G, Tp, H), cd), jnp.zeros(k_h.shape, grad_dtype or k.dtype),
          jnp.zeros(v_h.shape, grad_dtype or v.dtype), None if bias is None else jnp.zeros(bias.shape, cd))
  dq, dk, dv, dbias = lax.fori_loop(0, Sp // cfg.ck, key_chunk, init)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  dq = jnp.transpose(dq, (0, 3, 1, 2, 4)).reshape(B, Tp, N, H).astype(grad_dtype or q.dtype)
  return dq, jnp.transpose(dk, (0, 2, 1, 3)), jnp.transpose(dv, (0, 2, 1, 3)), dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


def _setup(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | int | None):
  """Static config and the inputs padded to whole chunks: ``(cfg, q, k, v, bias, aux)``.

  A ``-inf`` bias entry hides its key like a mask: it moves into ``aux.bias_visible`` and the bias keeps a 0 there
  (finite custom-VJP residuals, and a select instead of ``-inf + NaN`` when q or k is not finite).
  """
  chunk_sizes = ChunkSizes.resolve(chunk_sizes)
  B, T, N, H = inp.query.shape
  S = inp.key.shape[1]
  cq, ck = min(chunk_sizes.query, T), min(chunk_sizes.key, S)
  Tp, Sp = _numerics.round_up(T, cq), _numerics.round_up(S, ck)
  dtype = inp.query.dtype
  cfg = _Config(scale=_numerics.static_float("scale", inp.scale, path=_PATH),
                soft_cap=_numerics.static_float("logits_soft_cap", inp.logits_soft_cap, path=_PATH),
                is_causal=inp.is_causal, window=inp.window, T=T, S=S, cq=cq, ck=ck,
                mm_precision=_numerics.matmul_precision(dtype), compute_dtype=_numerics.compute_dtype(dtype))

  def pad_rows_cols(x):
    if x is None:
      return None
    if x.shape[2] != 1:
      x = _numerics.pad_axis(x, 2, Tp)
    if x.shape[3] != 1:
      x = _numerics.pad_axis(x, 3, Sp)
    return x

  bias, bias_visible = inp.bias, None
  if bias is not None:
    hidden = jnp.isneginf(bias)
    bias_visible = pad_rows_cols(~hidden)
    bias = pad_rows_cols(jnp.where(hidden, jnp.zeros_like(bias), bias))
  aux = _Aux(inp.q_lengths, inp.kv_lengths,
             None if inp.q_segment_ids is None else _numerics.pad_axis(inp.q_segment_ids, 1, Tp, -1),
             None if inp.kv_segment_ids is None else _numerics.pad_axis(inp.kv_segment_ids, 1, Sp, -2),
             pad_rows_cols(inp.mask), bias_visible)
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  q = _numerics.pad_axis(_numerics.nan_rows(inp.query), 1, Tp)
  k, v = _numerics.pad_axis(_numerics.nan_rows(inp.key), 1, Sp), _numerics.pad_axis(inp.value, 1, Sp)
  return cfg, q, k, v, bias, aux


def _empty(inp: core.AttentionInputs, out_dtype) -> tuple[jax.Array, jax.Array]:
  B, T, N, _ = inp.query.shape
  cd = _numerics.compute_dtype(inp.query.dtype)
  return (jnp.zeros((B, T, N, inp.value.shape[-1]), out_dtype or inp.query.dtype),
          jnp.full((B, N, T), -jnp.inf, cd))


def blockwise_core(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | int | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the blockwise algorithm: ``(output [B,T,N,Hv], lse [B,N,T])``.

  The internal logsumexp (compute dtype, ``-inf`` on rows with no key) is differentiable here (its cotangent
  enters the backward); the public API stops it.
  """
  ChunkSizes.resolve(chunk_sizes)
  if core.is_empty(inp):
    return _empty(inp, None)
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  out, lse = _attention(cfg, q, k, v, bias, aux)
  T = inp.query.shape[1]
  return out[:, :T], lse[:, :, :T]


# ----------------------------------------------------------------------------------------------------------
# One block of a larger attention (ring attention runs these per pair of sequence shards)
# ----------------------------------------------------------------------------------------------------------


def block_forward(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Attention of ``inp``'s queries over only its keys: ``(out [B,T,N,Hv], lse [B,N,T])`` in the compute dtype
  (float32; float64 for float64 inputs), ``lse = -inf`` on rows with no key.

  A partial result: results over disjoint key sets combine with the logsumexp rule
  (``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``). The output
  stays in the compute dtype so that combining does not round. Plain forward, no custom gradient: pair it with
  :func:`block_backward`.
  """
  cd = _numerics.compute_dtype(inp.query.dtype)
  if core.is_empty(inp):
    return _empty(inp, cd)
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  out, lse = _forward(cfg, q, k, v, bias, aux, out_dtype=cd)
  T = inp.query.shape[1]
  return out[:, :T], lse[:, :, :T]


def block_backward(inp: core.AttentionInputs, d_out: jax.Array, lse: jax.Array, delta: jax.Array,
                   chunk_sizes: ChunkSizes | int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This block's share of ``(dq, dk, dv)`` (compute dtype) when its keys are part of a larger attention.

  ``lse [B, N, T]`` is the logsumexp of the *whole* attention (over every key block; ``-inf`` on rows with no
  key) and ``delta [B, N, T] = rowsum(d_out * out)`` with the whole attention's output: then each tile's
  probabilities ``exp(s - lse)`` are the global ones and the per-block gradients sum to the exact gradient. With
  this block's own ``lse``/``delta`` it is the ordinary backward. ``inp`` may not carry a bias (its gradient is
  not returned).
  """
  if inp.bias is not None:
    raise ValueError(f"block_backward does not return a bias gradient; got bias.shape={inp.bias.shape}")
  cd = _numerics.compute_dtype(inp.query.dtype)
  if core.is_empty(inp):
    return (jnp.zeros(inp.query.shape, cd), jnp.zeros(inp.key.shape, cd), jnp.zeros(inp.value.shape, cd))
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  Tp, T = q.shape[1], inp.query.shape[1]
  d_out = _numerics.pad_axis(d_out, 1, Tp)
  lse = _numerics.pad_axis(lse.astype(cd), 2, Tp, -jnp.inf)
  delta = _numerics.pad_axis(delta.astype(cd), 2, Tp)
  dq, dk, dv, _ = _backward(cfg, q, k, v, bias, aux, d_out, lse, delta, grad_dtype=cd)
  S = inp.key.shape[1]
  return dq[:, :T], dk[:, :S], dv[:, :S]


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


blockwise_attention = core.implementation_function(
    blockwise_core, name="blockwise_attention", module=__name__,
    options={"chunk_sizes": core.Option(None, ChunkSizes.resolve)},
    doc="""Memory-efficient attention; arguments and semantics of :func:`attention_jax.dot_product_attention`.

  ``chunk_sizes`` sets the query / key tile lengths: a :class:`ChunkSizes`, a positive int (the same for both) or
  None (:meth:`ChunkSizes.get_default`). ``scale`` and ``logits_soft_cap`` must be concrete numbers.
  ``return_residual=True`` also returns the logsumexp as ``jax.nn`` does (``[*B, T, N]``, input dtype, no
  gradient). Forward-mode and second-order derivatives are computed through the reference formula.
  """)
blockwise_attention_reference = core.reference_function(blockwise_attention, module=__name__)
