"""Memory-efficient attention in pure JAX: online softmax over key chunks, for any backend.

The forward maps over query chunks; for each it loops over only the key chunks its rows can see (causal and
local-window chunks outside the band are skipped), keeping a running max, sum and float32 accumulator
(Rabe & Staats 2021; Dao et al. 2022). Memory is O(query_chunk x key_chunk) per step instead of O(T x S).

The backward is a ``jax.custom_vjp`` that saves only the output and the logsumexp and recomputes each tile's
probabilities: one pass over key chunks, an inner loop over the query chunks that see them, accumulating
dK/dV per key chunk and dQ into a float32 buffer. Nothing of size T x S is ever stored.

``blockwise_attention`` has the arguments and semantics of :func:`attention_jax.dot_product_attention`
(including ``bias`` and ``mask`` arrays, which are sliced per tile, and a gradient for ``bias``);
``blockwise_attention_reference`` is the plain algorithm with the same signature.

``block_forward`` / ``block_backward`` expose one key block's partial result (float32 output and logsumexp, to be
combined with other blocks' by the logsumexp rule) and that block's share of the gradients given the *global*
logsumexp and ``delta``; ring attention (attention_jax/ring.py) composes them across devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax import _tiling, core


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
  """Query / key chunk lengths. Larger chunks mean bigger matmuls and more memory per step."""
  query: int = 512
  key: int = 512

  def __post_init__(self):
    if self.query <= 0 or self.key <= 0:
      raise ValueError(f"chunk sizes must be positive; got {self}")

  @classmethod
  def get_default(cls) -> "ChunkSizes":
    # Measured on a 2-core CPU (experiments/scaling.py, docs/BENCHMARKS.md): 512 x 512 tiles are within a few
    # percent of the best of {256, 512, 1024}^2 for H = 64 and keep a tile at 1 MiB.
    return cls(512, 512)


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
  mm_precision: Any    # matmul precision: HIGHEST for float32 inputs


class _Aux(NamedTuple):
  """Non-differentiable per-call arrays (each may be None)."""
  q_len: jax.Array | None    # int32 [B]
  kv_len: jax.Array | None   # int32 [B]
  q_seg: jax.Array | None    # int32 [B, Tp]
  kv_seg: jax.Array | None   # int32 [B, Sp]
  mask: jax.Array | None     # bool [Bm, Nm, Tm, Sm], padded like bias


def _static_float(name: str, x) -> float | None:
  if x is None:
    return None
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"{name} must be a Python/concrete number for the blockwise and Pallas paths; got {x!r}"
                     ) from None


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


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
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=cfg.mm_precision)


def _tile_logits(cfg: _Config, q_i, k_j, bias, q0, k0):
  """``[B, K, G, cq, ck]`` float32 logits of one tile (scaled, soft-capped, biased) and the pre-cap tanh.

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
    s = s + _heads5(_tile(bias, q0, cfg.cq, k0, cfg.ck), K, G).astype(jnp.float32)
  return s, tanh


def _tile_mask(cfg: _Config, aux: _Aux, q0, k0, K: int, G: int):
  """Bool mask broadcastable to ``[B, K, G, cq, ck]``, or None when the tile needs none."""
  rows = (q0 + jnp.arange(cfg.cq, dtype=jnp.int32))[:, None]
  cols = (k0 + jnp.arange(cfg.ck, dtype=jnp.int32))[None, :]
  kv_limit = None
  if aux.kv_len is not None:
    kv_limit = jnp.minimum(aux.kv_len, cfg.S)[:, None, None, None, None]
  elif cfg.S % cfg.ck:
    kv_limit = cfg.S
  q_limit = None if aux.q_len is None else aux.q_len[:, None, None, None, None]
  mask = _tiling.position_mask(rows[None, None, None], cols[None, None, None], is_causal=cfg.is_causal,
                               window=cfg.window, kv_limit=kv_limit, q_limit=q_limit)
  if aux.q_seg is not None:
    q_seg = lax.dynamic_slice_in_dim(aux.q_seg, q0, cfg.cq, axis=1)
    kv_seg = lax.dynamic_slice_in_dim(aux.kv_seg, k0, cfg.ck, axis=1)
    seg = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
    mask = seg if mask is None else mask & seg
  if aux.mask is not None:
    user = _heads5(_tile(aux.mask, q0, cfg.cq, k0, cfg.ck), K, G)
    mask = user if mask is None else mask & user
  return mask


def _limits(cfg: _Config, aux: _Aux):
  kv_max = cfg.S if aux.kv_len is None else jnp.minimum(jnp.max(aux.kv_len), cfg.S)
  q_max = None if aux.q_len is None else jnp.max(aux.q_len)
  return kv_max, q_max


def _head_major(q, k, v):
  """[B, Tp, N, H] -> [B, K, G, Tp, H]; [B, Sp, K, H] -> [B, K, Sp, H]."""
  B, Tp, N, H = q.shape
  K = k.shape[2]
  q_h = jnp.transpose(q.reshape(B, Tp, K, N // K, H), (0, 2, 3, 1, 4))
  return q_h, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _forward(cfg: _Config, q, k, v, bias, aux: _Aux, out_dtype=None):
  B, Tp, N, H = q.shape
  K = k.shape[2]
  G = N // K
  q_h, k_h, v_h = _head_major(q, k, v)
  kv_max, q_max = _limits(cfg, aux)

  def query_chunk(i):
    q0 = i * cfg.cq
    q_i = lax.dynamic_slice_in_dim(q_h, q0, cfg.cq, axis=3)
    lo, hi = _tiling.kv_block_range(q0, cfg.cq, cfg.ck, kv_len=kv_max, is_causal=cfg.is_causal,
                                    window=cfg.window, q_limit=q_max)

    def body(j, carry):
      acc, m, l = carry
      k0 = j * cfg.ck
      k_j = lax.dynamic_slice_in_dim(k_h, k0, cfg.ck, axis=2)
      v_j = lax.dynamic_slice_in_dim(v_h, k0, cfg.ck, axis=2)
      s, _ = _tile_logits(cfg, q_i, k_j, bias, q0, k0)
      mask = _tile_mask(cfg, aux, q0, k0, K, G)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)      # rows that have seen no key yet
      p = jnp.exp(s - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = correction * l + p.sum(axis=-1)
      pv = _mm(cfg, "bkms,bksh->bkmh", p.astype(v.dtype).reshape(B, K, G * cfg.cq, cfg.ck), v_j)
      return correction[..., None] * acc + pv.reshape(acc.shape), m_new, l

    init = (jnp.zeros((B, K, G, cfg.cq, H), jnp.float32), jnp.full((B, K, G, cfg.cq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, cfg.cq), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out.astype(out_dtype or q.dtype), lse

  out, lse = lax.map(query_chunk, jnp.arange(Tp // cfg.cq))   # [nq, B, K, G, cq, H], [nq, B, K, G, cq]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(B, Tp, N, H)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, N, Tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, bias, aux: _Aux):
  return _forward(cfg, q, k, v, bias, aux)


def _attention_fwd(cfg, q, k, v, bias, aux):
  out, lse = _forward(cfg, q, k, v, bias, aux)
  return (out, lse), (q, k, v, bias, aux, out, lse)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the axes where ``shape`` has size 1 (the broadcast axes), keeping dims."""
  axes = tuple(a for a, (d, t) in enumerate(zip(shape, x.shape)) if d == 1 and t != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


def _attention_bwd(cfg, res, cts):
  q, k, v, bias, aux, out, lse = res
  d_out, d_lse = cts
  # delta_i = rowsum(dO * O); a cotangent on the logsumexp enters as -d_lse (d lse / d s = P).
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv, dbias = _backward(cfg, q, k, v, bias, aux, d_out, lse, delta - d_lse.astype(jnp.float32))
  return dq, dk, dv, dbias, None


def _backward(cfg: _Config, q, k, v, bias, aux: _Aux, d_out, lse, delta, grad_dtype=None):
  """dq, dk, dv, dbias from the logsumexp ``lse`` and ``delta = rowsum(dO * O) [B, N, Tp]`` (both given)."""
  B, Tp, N, H = q.shape
  Sp, K = k.shape[1:3]
  G = N // K
  q_h, k_h, v_h = _head_major(q, k, v)
  do_h = _head_major(d_out, k, v)[0]
  delta = delta.reshape(B, K, G, Tp)
  lse_b = jnp.where(jnp.isfinite(lse), lse, jnp.inf).reshape(B, K, G, Tp)   # rows with no key: P = 0
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
      do_i = lax.dynamic_slice_in_dim(do_h, q0, cfg.cq, axis=3).reshape(B, K, M, H)
      lse_i = lax.dynamic_slice_in_dim(lse_b, q0, cfg.cq, axis=3)
      delta_i = lax.dynamic_slice_in_dim(delta, q0, cfg.cq, axis=3)
      s, tanh = _tile_logits(cfg, q_i, k_j, bias, q0, k0)
      mask = _tile_mask(cfg, aux, q0, k0, K, G)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      p = jnp.exp(s - lse_i[..., None])
      dv = dv + _mm(cfg, "bkms,bkmh->bksh", p.astype(q.dtype).reshape(B, K, M, cfg.ck), do_i)
      dp = _mm(cfg, "bkmh,bksh->bkms", do_i, v_j).reshape(p.shape)
      ds = p * (dp - delta_i[..., None])          # d loss / d (final logits)
      if dbias is not None:
        db = _reduce_to(ds.reshape(B, N, cfg.cq, cfg.ck), (dbias.shape[0], dbias.shape[1],
                                                          1 if dbias.shape[2] == 1 else cfg.cq,
                                                          1 if dbias.shape[3] == 1 else cfg.ck))
        starts = (0, 0, 0 if dbias.shape[2] == 1 else q0, 0 if dbias.shape[3] == 1 else k0)
        dbias = lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, starts, db.shape) + db, starts)
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      ds = (ds * cfg.scale).astype(q.dtype).reshape(B, K, M, cfg.ck)
      dk = dk + _mm(cfg, "bkms,bkmh->bksh", ds, q_i.reshape(B, K, M, H))
      dq_i = _mm(cfg, "bkms,bksh->bkmh", ds, k_j).reshape(B, K, G, cfg.cq, H)
      dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, q0, cfg.cq, axis=3) + dq_i, q0, axis=3)
      return dk, dv, dq, dbias

    zeros = jnp.zeros((B, K, cfg.ck, H), jnp.float32)
    dk, dv, dq, dbias = lax.fori_loop(lo, hi, body, (zeros, zeros, dq, dbias))
    dk_all = lax.dynamic_update_slice_in_dim(dk_all, dk.astype(dk_all.dtype), k0, axis=2)
    dv_all = lax.dynamic_update_slice_in_dim(dv_all, dv.astype(dv_all.dtype), k0, axis=2)
    return dq, dk_all, dv_all, dbias

  init = (jnp.zeros((B, K, G, Tp, H), jnp.float32), jnp.zeros(k_h.shape, grad_dtype or k.dtype),
          jnp.zeros(v_h.shape, grad_dtype or v.dtype), None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  dq, dk, dv, dbias = lax.fori_loop(0, Sp // cfg.ck, key_chunk, init)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  dq = jnp.transpose(dq, (0, 3, 1, 2, 4)).reshape(B, Tp, N, H).astype(grad_dtype or q.dtype)
  return dq, jnp.transpose(dk, (0, 2, 1, 3)), jnp.transpose(dv, (0, 2, 1, 3)), dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


def _setup(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | None):
  """Static config and the inputs padded to whole chunks: ``(cfg, q, k, v, bias, aux)``."""
  chunk_sizes = ChunkSizes.get_default() if chunk_sizes is None else chunk_sizes
  B, T, N, H = inp.query.shape
  S = inp.key.shape[1]
  cq, ck = min(chunk_sizes.query, T), min(chunk_sizes.key, S)
  Tp, Sp = _tiling.cdiv(T, cq) * cq, _tiling.cdiv(S, ck) * ck
  cfg = _Config(scale=_static_float("scale", inp.scale),
                soft_cap=_static_float("logits_soft_cap", inp.logits_soft_cap), is_causal=inp.is_causal,
                window=inp.window, T=T, S=S, cq=cq, ck=ck,
                mm_precision=lax.Precision.HIGHEST if inp.query.dtype == jnp.float32 else None)

  def pad_rows_cols(x):
    if x is None:
      return None
    if x.shape[2] != 1:
      x = _pad_axis(x, 2, Tp)
    if x.shape[3] != 1:
      x = _pad_axis(x, 3, Sp)
    return x

  aux = _Aux(inp.q_lengths, inp.kv_lengths,
             None if inp.q_segment_ids is None else _pad_axis(inp.q_segment_ids, 1, Tp, -1),
             None if inp.kv_segment_ids is None else _pad_axis(inp.kv_segment_ids, 1, Sp, -2),
             pad_rows_cols(inp.mask))
  q = _pad_axis(inp.query, 1, Tp)
  k, v = _pad_axis(inp.key, 1, Sp), _pad_axis(inp.value, 1, Sp)
  return cfg, q, k, v, pad_rows_cols(inp.bias), aux


def blockwise_core(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the blockwise algorithm: ``(output [B,T,N,H], lse [B,N,T])``.

  The logsumexp is differentiable here (its cotangent enters the backward); the public API stops it.
  """
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  out, lse = _attention(cfg, q, k, v, bias, aux)
  T = inp.query.shape[1]
  return out[:, :T], lse[:, :, :T]


# ----------------------------------------------------------------------------------------------------------
# One block of a larger attention (ring attention runs these per pair of sequence shards)
# ----------------------------------------------------------------------------------------------------------


def block_forward(inp: core.AttentionInputs, chunk_sizes: ChunkSizes | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Attention of ``inp``'s queries over only its keys: ``(out [B,T,N,H] float32, lse [B,N,T] float32)``.

  A partial result: results over disjoint key sets combine with the logsumexp rule
  (``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``). The output
  stays float32 so that combining does not round. Plain forward, no custom gradient: pair it with
  :func:`block_backward`.
  """
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  out, lse = _forward(cfg, q, k, v, bias, aux, out_dtype=jnp.float32)
  T = inp.query.shape[1]
  return out[:, :T], lse[:, :, :T]


def block_backward(inp: core.AttentionInputs, d_out: jax.Array, lse: jax.Array, delta: jax.Array,
                   chunk_sizes: ChunkSizes | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This block's share of ``(dq, dk, dv)`` (float32) when its keys are part of a larger attention.

  ``lse [B, N, T]`` is the logsumexp of the *whole* attention (over every key block) and
  ``delta [B, N, T] = rowsum(d_out * out)`` with the whole attention's output: then each tile's probabilities
  ``exp(s - lse)`` are the global ones and the per-block gradients sum to the exact gradient. With this block's
  own ``lse``/``delta`` it is the ordinary backward. ``inp`` may not carry a bias (its gradient is not returned).
  """
  if inp.bias is not None:
    raise ValueError(f"block_backward does not return a bias gradient; got bias.shape={inp.bias.shape}")
  cfg, q, k, v, bias, aux = _setup(inp, chunk_sizes)
  Tp, T = q.shape[1], inp.query.shape[1]
  d_out = _pad_axis(d_out, 1, Tp)
  lse = _pad_axis(lse.astype(jnp.float32), 2, Tp, -jnp.inf)
  delta = _pad_axis(delta.astype(jnp.float32), 2, Tp)
  dq, dk, dv, _ = _backward(cfg, q, k, v, bias, aux, d_out, lse, delta, grad_dtype=jnp.float32)
  S = inp.key.shape[1]
  return dq[:, :T], dk[:, :S], dv[:, :S]


def blockwise_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                        query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                        q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                        chunk_sizes: ChunkSizes | None = None, return_residual: bool = False):
  """Memory-efficient attention; arguments and semantics of :func:`attention_jax.dot_product_attention`.

  ``chunk_sizes`` sets the query / key tile lengths (default :meth:`ChunkSizes.get_default`). ``scale`` and
  ``logits_soft_cap`` must be concrete numbers.
  """
  inp = core.prepare_inputs(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap)
  out, lse = blockwise_core(inp, chunk_sizes)
  return (out, lax.stop_gradient(lse)) if return_residual else out


def blockwise_attention_reference(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                                  query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                                  q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                                  chunk_sizes: ChunkSizes | None = None, return_residual: bool = False):
  """The plain O(T x S) algorithm with :func:`blockwise_attention`'s signature (``chunk_sizes`` is ignored)."""
  del chunk_sizes
  return core.reference_attention(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                                  query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                                  local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
                                  return_residual=return_residual)


def _dispatch(inp: core.AttentionInputs) -> tuple[jax.Array, jax.Array]:
  out, lse = blockwise_core(inp)
  return out, lax.stop_gradient(lse)


core.register_implementation("blockwise", _dispatch)
