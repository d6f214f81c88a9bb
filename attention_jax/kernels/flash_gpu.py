"""Flash attention as Pallas kernels for GPU (Triton lowering), forward and backward.

* forward: grid ``(query blocks, B, N)``; each program keeps a query tile and loops over the key blocks its rows
  can see (causal / window blocks outside the band are skipped, and fully visible blocks run without a mask),
  with an online softmax in base 2 and a float32 accumulator; writes the output and the logsumexp.
* backward: a dK/dV kernel, grid ``(key blocks, B, K)``, looping over the G query heads that share each kv head
  (GQA without repeating K/V) and the query blocks that see the key block; and a dQ kernel, grid
  ``(query blocks, B, N)``. Both recompute P from the logsumexp; ``delta = rowsum(dO * O)`` is computed by XLA.
* any T and S: the wrapper pads to whole blocks and masks inside the kernel; head dims are zero-padded to a power
  of two; key/value lengths, query lengths, segment ids, a local window and a logits soft-cap are handled in the
  kernel from positions and ids, never by materialising a T x S mask.

``flash_attention_reference`` has the same signature and computes the same function plainly.
On CPU the kernels run in Pallas interpret mode (``interpret=None`` decides by backend).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention_jax import _tiling, core
from attention_jax.kernels._common import flash_custom_vjp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of the three kernels.

  ``longest_first``: under a causal mask, launch the forward and dQ programs of the last query blocks (which see
  the most key blocks) first, so that the grid does not end on its heaviest programs (FlashAttention-2's
  ordering; the dK/dV grid already starts with its heaviest key blocks). Off by default until measured
  (``bench_kernels --implementations=pallas,pallas_longest_first`` times both orders in one run).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_fwd: int = 4
  num_stages_fwd: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  longest_first: bool = False

  def __post_init__(self):
    for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
      b = getattr(self, f)
      if b < 16 or b & (b - 1):
        raise ValueError(f"BlockSizes.{f}={b} must be a power of two >= 16")

  @classmethod
  def get_default(cls, head_dim: int, dtype: Any = jnp.bfloat16) -> "BlockSizes":
    """Defaults from the table below, keyed by the padded head dim and the dtype's width.

    The bf16, H = 128 row (forward 128 x 64, 4 warps, 2 stages; backward 64 x 64, 4 warps) was the best of six
    forward configurations measured on an H200 at T = 16384 (docs/BENCHMARKS.md: 449 TFLOP/s forward, 383
    fwd+bwd). The other rows are unmeasured: they scale the tiles so that a tile's shared memory stays similar.
    ``python -m experiments.tune_blocks`` measures candidates per head dim and dtype and prints rows for this
    table (``TUNE_BUDGET_S=... bash experiments/gpu_check.sh`` on the GPU machine).
    """
    return _DEFAULT_BLOCKS.get(cls.table_key(head_dim, dtype), cls())

  @staticmethod
  def table_key(head_dim: int, dtype: Any) -> tuple[int, bool]:
    """The default table's row for a head dim and dtype: (padded head dim, at most 256; 4-byte dtype)."""
    return min(padded_head_dim(head_dim), 256), jnp.dtype(dtype).itemsize >= 4


def padded_head_dim(head_dim: int) -> int:
  """The head dim the kernels run at: the next power of two, at least 16 (inputs are zero-padded to it)."""
  return max(16, pl.next_power_of_2(head_dim))


_DEFAULT_BLOCKS = {
    # (padded head dim, 4-byte dtype): BlockSizes
    (16, False): BlockSizes(128, 128, 64, 128, 128, 64, 4, 3, 4, 2),
    (32, False): BlockSizes(128, 128, 64, 128, 128, 64, 4, 3, 4, 2),
    (64, False): BlockSizes(128, 128, 64, 64, 64, 64, 4, 3, 4, 2),
    (128, False): BlockSizes(128, 64, 64, 64, 64, 64, 4, 2, 4, 2),
    (256, False): BlockSizes(64, 32, 32, 32, 32, 32, 4, 2, 4, 1),
    (16, True): BlockSizes(64, 64, 32, 64, 64, 32, 4, 2, 4, 2),
    (32, True): BlockSizes(64, 64, 32, 64, 64, 32, 4, 2, 4, 2),
    (64, True): BlockSizes(64, 64, 32, 32, 32, 32, 4, 2, 4, 2),
    (128, True): BlockSizes(64, 32, 32, 32, 32, 32, 4, 2, 4, 1),
    (256, True): BlockSizes(32, 16, 16, 16, 16, 16, 4, 1, 4, 1),
}


class _Config(NamedTuple):
  """Static configuration shared by the three kernels (hashable)."""
  scale: float
  soft_cap: float | None
  is_causal: bool
  window: tuple[int, int] | None
  T: int                 # true lengths; Tp / Sp are the padded ones
  S: int
  Tp: int
  Sp: int
  groups: int            # G = N // K
  has_q_len: bool
  has_kv_len: bool
  has_seg: bool
  blocks: BlockSizes
  interpret: Any
  debug: bool


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the kernels (all lowerable by Triton)
# ----------------------------------------------------------------------------------------------------------


def _dot(a, b):
  """float32-accumulated tile matmul; float32 inputs use IEEE products (Triton's default would be TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _scores(cfg: _Config, q, k):
  """Tile logits in the log2 domain (float32) and, with a soft-cap, the tanh needed by the backward."""
  s = _dot(q, k.T)
  if cfg.soft_cap is None:
    return s * (cfg.scale * LOG2E), None
  t = jnp.tanh(s * (cfg.scale / cfg.soft_cap))
  return t * (cfg.soft_cap * LOG2E), t


def _kv_limit(cfg: _Config, kv_len_ref):
  """Exclusive bound on visible keys: the true S, or the per-example length."""
  if cfg.has_kv_len:
    return jnp.minimum(kv_len_ref[()], cfg.S)
  return cfg.S


def _needs_mask(cfg: _Config) -> bool:
  return (cfg.is_causal or cfg.window is not None or cfg.has_q_len or cfg.has_kv_len or cfg.has_seg
          or cfg.Sp != cfg.S)


def _tile_mask(cfg: _Config, q0, k0, bq: int, bk: int, q_len, kv_limit, q_seg, kv_seg):
  rows = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
  cols = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
  kv_lim = kv_limit if (cfg.has_kv_len or cfg.Sp != cfg.S) else None
  mask = _tiling.position_mask(rows, cols, is_causal=cfg.is_causal, window=cfg.window, kv_limit=kv_lim,
                               q_limit=q_len)
  if cfg.has_seg:
    seg = q_seg[:, None] == kv_seg[None, :]
    mask = seg if mask is None else mask & seg
  return mask


def _split_loops(cfg: _Config, lo, hi, u_lo, u_hi, masked_body, unmasked_body, carry):
  """Runs blocks [lo, hi): the fully visible [u_lo, u_hi) without a mask, the rest with one."""
  if not _needs_mask(cfg):
    return lax.fori_loop(lo, hi, unmasked_body, carry)
  if cfg.has_seg or cfg.has_q_len:   # ids and query lengths can mask inside any block
    return lax.fori_loop(lo, hi, masked_body, carry)
  carry = lax.fori_loop(lo, u_lo, masked_body, carry)
  carry = lax.fori_loop(u_lo, u_hi, unmasked_body, carry)
  return lax.fori_loop(u_hi, hi, masked_body, carry)


def _q_block(cfg: _Config, i, bq: int):
  """The query block that grid index ``i`` computes (reversed under a causal mask with ``longest_first``)."""
  if cfg.is_causal and cfg.blocks.longest_first:
    return cfg.Tp // bq - 1 - i
  return i


def _kv_range(cfg: _Config, q0, bq: int, bk: int, q_len, kv_limit):
  lo, hi = _tiling.kv_block_range(q0, bq, bk, kv_len=kv_limit, is_causal=cfg.is_causal, window=cfg.window,
                                  q_limit=q_len)
  u_lo, u_hi = _tiling.unmasked_kv_block_range(q0, bq, bk, lo, hi, kv_len=kv_limit, is_causal=cfg.is_causal,
                                               window=cfg.window)
  return lo, hi, u_lo, u_hi


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                cfg: _Config):
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  q0 = _q_block(cfg, pl.program_id(0), bq) * bq
  q = q_ref[...]
  q_len = q_len_ref[()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, kv_len_ref)
  q_seg = q_seg_ref[...] if cfg.has_seg else None

  def body(j, carry, masked):
    acc, m, l = carry
    k0 = j * bk
    k = k_ref[pl.ds(k0, bk), :]
    s, _ = _scores(cfg, q, k)
    if masked:
      kv_seg = kv_seg_ref[pl.ds(k0, bk)] if cfg.has_seg else None
      s = jnp.where(_tile_mask(cfg, q0, k0, bq, bk, q_len, kv_limit, q_seg, kv_seg), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)     # rows that have seen no key yet
    p = jnp.exp2(s - m_safe[:, None])
    correction = jnp.exp2(m - m_safe)
    l = l * correction + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(k0, bk), :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  lo, hi, u_lo, u_hi = _kv_range(cfg, q0, bq, bk, q_len, kv_limit)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                           functools.partial(body, masked=False), init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _specs_q(cfg: _Config, bq: int, hp: int):
  """BlockSpecs of a program over (query block i, batch b, query head n)."""
  G = cfg.groups
  qb = lambda i: _q_block(cfg, i, bq)
  return dict(
      q=pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, qb(i), n, 0)),
      kv=pl.BlockSpec((None, cfg.Sp, None, hp), lambda i, b, n: (b, 0, n // G, 0)),
      scalar=pl.BlockSpec((None,), lambda i, b, n: (b,)),
      q_seg=pl.BlockSpec((None, bq), lambda i, b, n: (b, qb(i))),
      kv_seg=pl.BlockSpec((None, cfg.Sp), lambda i, b, n: (b, 0)),
      row=pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qb(i))),
  )


def _forward(cfg: _Config, q, k, v, q_len, kv_len, q_seg, kv_seg):
  B, Tp, N, hp = q.shape
  bq = cfg.blocks.block_q
  sp = _specs_q(cfg, bq, hp)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(Tp // bq, B, N),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["scalar"], sp["scalar"], sp["q_seg"], sp["kv_seg"]],
      out_specs=[sp["q"], sp["row"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_fwd,
                                           num_stages=cfg.blocks.num_stages_fwd),
      interpret=cfg.interpret, debug=cfg.debug, name="attention_jax_flash_fwd",
  )(q, k, v, q_len, kv_len, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref,
                 dk_ref, dv_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  k0 = pl.program_id(0) * bk
  k, v = k_ref[...], v_ref[...]
  q_len = q_len_ref[()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, kv_len_ref)
  kv_seg = kv_seg_ref[...] if cfg.has_seg else None
  q_bound = cfg.T if q_len is None else jnp.minimum(q_len, cfg.T)
  lo, hi = _tiling.q_block_range(k0, bk, bq, q_len=q_bound, is_causal=cfg.is_causal, window=cfg.window,
                                 kv_limit=kv_limit)
  u_lo, u_hi = _tiling.unmasked_q_block_range(k0, bk, bq, lo, hi, kv_len=kv_limit, is_causal=cfg.is_causal,
                                              window=cfg.window)

  def head(g, carry):
    def body(i, c, masked):
      dk, dv = c
      q0 = i * bq
      q = q_ref[pl.ds(q0, bq), g, :]
      do = do_ref[pl.ds(q0, bq), g, :]
      lse2 = lse2_ref[g, pl.ds(q0, bq)]
      delta = delta_ref[g, pl.ds(q0, bq)]
      s, tanh = _scores(cfg, q, k)
      if masked:
        q_seg = q_seg_ref[pl.ds(q0, bq)] if cfg.has_seg else None
        s = jnp.where(_tile_mask(cfg, q0, k0, bq, bk, q_len, kv_limit, q_seg, kv_seg), s, -jnp.inf)
      p = jnp.exp2(s - lse2[:, None])
      dv = dv + _dot(p.astype(do.dtype).T, do)
      dp = _dot(do, v.T)
      ds = p * (dp - delta[:, None])
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      ds = ds * cfg.scale
      dk = dk + _dot(ds.astype(q.dtype).T, q)
      return dk, dv

    return _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                        functools.partial(body, masked=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref,
               dq_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  q0 = _q_block(cfg, pl.program_id(0), bq) * bq
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse2_ref[...], delta_ref[...]
  q_len = q_len_ref[()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, kv_len_ref)
  q_seg = q_seg_ref[...] if cfg.has_seg else None

  def body(j, dq, masked):
    k0 = j * bk
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    s, tanh = _scores(cfg, q, k)
    if masked:
      kv_seg = kv_seg_ref[pl.ds(k0, bk)] if cfg.has_seg else None
      s = jnp.where(_tile_mask(cfg, q0, k0, bq, bk, q_len, kv_limit, q_seg, kv_seg), s, -jnp.inf)
    p = jnp.exp2(s - lse2[:, None])
    dp = _dot(do, v.T)
    ds = p * (dp - delta[:, None])
    if tanh is not None:
      ds = ds * (1.0 - tanh * tanh)
    ds = ds * cfg.scale
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi, u_lo, u_hi = _kv_range(cfg, q0, bq, bk, q_len, kv_limit)
  dq = _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                    functools.partial(body, masked=False), jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse, d_out, d_lse):
  B, Tp, N, hp = q.shape
  Sp, K = k.shape[1:3]
  G = cfg.groups
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - d_lse.astype(jnp.float32)             # a logsumexp cotangent enters as -d_lse
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)   # rows with no key: P = 0
  blk = cfg.blocks
  params = plgpu.CompilerParams(num_warps=blk.num_warps_bwd, num_stages=blk.num_stages_bwd)

  # dK, dV: one program per (key block, batch, kv head); the G query heads of that kv head are looped inside.
  bq, bk = blk.block_q_dkv, blk.block_k_dkv
  q_heads = pl.BlockSpec((None, Tp, None, G, hp), lambda j, b, h: (b, 0, h, 0, 0))
  kv_blk = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
  rows = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      grid=(Sp // bk, B, K),
      in_specs=[q_heads, kv_blk, kv_blk, q_heads, rows, rows,
                pl.BlockSpec((None,), lambda j, b, h: (b,)), pl.BlockSpec((None,), lambda j, b, h: (b,)),
                pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0)), pl.BlockSpec((None, bk), lambda j, b, h: (b, j))],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=cfg.interpret, debug=cfg.debug, name="attention_jax_flash_dkdv",
  )(q.reshape(B, Tp, K, G, hp), k, v, d_out.reshape(B, Tp, K, G, hp), lse2.reshape(B, K, G, Tp),
    delta.reshape(B, K, G, Tp), q_len, kv_len, q_seg, kv_seg)

  # dQ: one program per (query block, batch, query head).
  bq = blk.block_q_dq
  sp = _specs_q(cfg, bq, hp)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(Tp // bq, B, N),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["q"], sp["row"], sp["row"], sp["scalar"], sp["scalar"],
                sp["q_seg"], sp["kv_seg"]],
      out_specs=sp["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=cfg.interpret, debug=cfg.debug, name="attention_jax_flash_dq",
  )(q, k, v, d_out, lse2, delta, q_len, kv_len, q_seg, kv_seg)
  return dq, dk, dv


# (out, lse) with a recomputing backward: saves q, k, v, aux, out and lse only.
_flash = flash_custom_vjp(_forward, _backward)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _resolve_interpret(interpret):
  if interpret is None:
    backend = jax.default_backend()
    if backend == "cpu":
      return True
    if backend != "gpu":
      raise ValueError(f"the Triton flash kernel runs on GPU (or interpreted on CPU); backend is {backend!r}. "
                       "Use implementation='pallas_tpu' on TPU or 'blockwise' anywhere")
    return False
  return interpret


def flash_core(inp: core.AttentionInputs, block_sizes: BlockSizes | None = None, interpret=None,
               debug: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the kernels: ``(output [B,T,N,H], lse [B,N,T])`` (lse differentiable)."""
  if inp.bias is not None or inp.mask is not None:
    raise ValueError("the Pallas flash kernel takes no dense bias/mask arrays (they would cost O(T x S) memory); "
                     "express masks with is_causal, local_window_size, sequence lengths or segment ids, or use "
                     "implementation='blockwise' / 'reference'")
  from attention_jax.blockwise import _static_float   # shared helper; blockwise is pure JAX and light
  B, T, N, H = inp.query.shape
  S, K = inp.key.shape[1:3]
  blocks = BlockSizes.get_default(H, inp.query.dtype) if block_sizes is None else block_sizes
  # Tiles no larger than the (power-of-two padded) sequences, then pad the sequences to whole tiles.
  fit = lambda b, n: min(b, max(16, pl.next_power_of_2(n)))
  blocks = dataclasses.replace(
      blocks, block_q=fit(blocks.block_q, T), block_q_dkv=fit(blocks.block_q_dkv, T),
      block_q_dq=fit(blocks.block_q_dq, T), block_k=fit(blocks.block_k, S), block_k_dkv=fit(blocks.block_k_dkv, S),
      block_k_dq=fit(blocks.block_k_dq, S))
  tq = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
  tk = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
  Tp, Sp = _tiling.cdiv(T, tq) * tq, _tiling.cdiv(S, tk) * tk
  hp = padded_head_dim(H)
  cfg = _Config(scale=_static_float("scale", inp.scale),
                soft_cap=_static_float("logits_soft_cap", inp.logits_soft_cap), is_causal=inp.is_causal,
                window=inp.window, T=T, S=S, Tp=Tp, Sp=Sp, groups=N // K, has_q_len=inp.q_lengths is not None,
                has_kv_len=inp.kv_lengths is not None, has_seg=inp.q_segment_ids is not None, blocks=blocks,
                interpret=_resolve_interpret(interpret), debug=debug)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, hp - H)))
  q, k, v = pad(inp.query, Tp), pad(inp.key, Sp), pad(inp.value, Sp)
  full = lambda x, n: jnp.full((B,), n, jnp.int32) if x is None else x
  seg = lambda x, n, fill: (jnp.zeros((B, n), jnp.int32) if x is None
                            else jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=fill))
  aux = (full(inp.q_lengths, T), full(inp.kv_lengths, S), seg(inp.q_segment_ids, Tp, -1),
         seg(inp.kv_segment_ids, Sp, -2))
  out, lse = _flash(cfg, q, k, v, aux)
  return out[:, :T, :, :H], lse[:, :, :T]


def flash_attention(query, key, value, *, scale=None, is_causal=False, query_seq_lengths=None,
                    key_value_seq_lengths=None, local_window_size=None, q_segment_ids=None, kv_segment_ids=None,
                    logits_soft_cap=None, block_sizes: BlockSizes | None = None, interpret=None,
                    return_residual: bool = False, debug: bool = False):
  """Flash attention (Pallas, Triton lowering); semantics of :func:`attention_jax.dot_product_attention`.

  ``query [B, T, N, H]``, ``key/value [B, S, K, H]``, any T and S, ``N % K == 0``. ``block_sizes`` overrides
  :meth:`BlockSizes.get_default`; ``interpret=None`` interprets on CPU and compiles on GPU.
  """
  inp = core.prepare_inputs(query, key, value, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap)
  out, lse = flash_core(inp, block_sizes, interpret, debug)
  return (out, lax.stop_gradient(lse)) if return_residual else out


def flash_attention_reference(query, key, value, *, scale=None, is_causal=False, query_seq_lengths=None,
                              key_value_seq_lengths=None, local_window_size=None, q_segment_ids=None,
                              kv_segment_ids=None, logits_soft_cap=None, block_sizes: BlockSizes | None = None,
                              interpret=None, return_residual: bool = False, debug: bool = False):
  """The plain algorithm with :func:`flash_attention`'s signature (tiling arguments are ignored)."""
  del block_sizes, interpret, debug
  return core.reference_attention(query, key, value, scale=scale, is_causal=is_causal,
                                  query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                                  local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
                                  return_residual=return_residual)


def _dispatch(inp: core.AttentionInputs) -> tuple[jax.Array, jax.Array]:
  out, lse = flash_core(inp)
  return out, lax.stop_gradient(lse)


core.register_implementation("pallas", _dispatch)
