"""Flash attention as Pallas kernels for GPU (Triton lowering), forward and backward.

* forward: grid ``(query blocks, B, N)``; each program keeps a query tile and loops over the key blocks its rows
  can see (causal / window blocks outside the band are skipped, and fully visible blocks run without a mask),
  with an online softmax in base 2 and a float32 accumulator; writes the output and the logsumexp.
* backward: a dK/dV kernel, grid ``(key blocks, B, K)``, looping over the G query heads that share each kv head
  (GQA without repeating K/V) and the query blocks that see the key block; and a dQ kernel, grid
  ``(query blocks, B, N)``. Both recompute P from the logsumexp; ``delta = rowsum(dO * O)`` is computed by XLA.
  With a ``bias``, a fourth kernel computes its gradient over the bias's own grid (see below).
* any T and S: the wrapper pads to whole blocks and masks inside the kernel; the query/key head dim and the value
  head dim are each zero-padded to a power of two; key/value lengths, query lengths, segment ids, a local window
  and a logits soft-cap are handled in the kernel from positions and ids, never by materialising a T x S mask.
* dense ``mask`` / ``bias`` arrays ``[B|1, N|1, T|1, S|1]`` are read tile by tile beside K; a size-1 (broadcast)
  axis is indexed at 0, never broadcast in memory. Tiles with a dense mask or bias always run masked (structured
  masks still skip whole blocks). The bias gradient has the bias's own shape: a separate kernel over query blocks
  and the bias's batch/head axes recomputes each tile's ``dS`` and sums it over the axes the bias broadcasts
  (looping over them), so no ``B x N x T x S`` temporary exists; XLA drops that kernel when ``dbias`` is unused.
* hidden positions never reach a query: masked tiles multiply only cleaned values (``where(isfinite(v), v, 0)``
  plus a per-row flag that turns rows seeing a non-finite value into NaN; the backward selects ``dS`` and cleans q
  / k in the dK / dQ products). Fully visible tiles run unchanged.

``flash_attention_reference`` has the same signature and computes the same function plainly.
On CPU the kernels run in Pallas interpret mode (``interpret=None`` decides by backend). float64 is refused
(``core.UnsupportedError``); ``dot_product_attention``'s automatic choice then moves on to "blockwise".

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention_jax import _numerics, _tiling, core
from attention_jax.kernels._common import (F32_0, F32_1, KernelConfig, compiled_on, flash_custom_vjp,
                                           masks_every_block, needs_mask)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

_TILE_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of the kernels.

  ``longest_first``: under a causal mask, launch the forward and dQ programs of the last query blocks (which see
  the most key blocks) first, so that the grid does not end on its heaviest programs (FlashAttention-2's
  ordering; the dK/dV grid already starts with its heaviest key blocks). Off by default until measured
  (``bench_kernels --implementations=pallas,pallas_longest_first`` times both orders in one run).
  The bias-gradient kernel uses the dQ tiles.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  num_warps_fwd: int = 4
  num_stages_fwd: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  longest_first: bool = False

  def __post_init__(self):
    for f in _TILE_FIELDS:
      b = getattr(self, f)
      if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
        raise ValueError(f"BlockSizes.{f}={b!r} must be a power of two >= 16")
    for f in ("num_warps_fwd", "num_stages_fwd", "num_warps_bwd", "num_stages_bwd"):
      n = getattr(self, f)
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"BlockSizes.{f}={n!r} must be a positive int")

  @classmethod
  def get_default(cls, head_dim: int, dtype: Any = jnp.bfloat16) -> BlockSizes:
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
    """The default table's row for a head dim and dtype: (padded head dim, 32 to 256; 4-byte dtype)."""
    return min(max(padded_head_dim(head_dim), 32), 256), jnp.dtype(dtype).itemsize >= 4


def padded_head_dim(head_dim: int) -> int:
  """The head dim the kernels run at: the next power of two, at least 16 (inputs are zero-padded to it)."""
  return max(16, pl.next_power_of_2(head_dim))


_DEFAULT_BLOCKS = {
    # (padded head dim, 4-byte dtype): BlockSizes
    (32, False): BlockSizes(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=128, block_q_dq=128,
                            block_kv_dq=64, num_warps_fwd=4, num_stages_fwd=3, num_warps_bwd=4, num_stages_bwd=2),
    (64, False): BlockSizes(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                            block_kv_dq=64, num_warps_fwd=4, num_stages_fwd=3, num_warps_bwd=4, num_stages_bwd=2),
    (128, False): BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                             block_kv_dq=64, num_warps_fwd=4, num_stages_fwd=2, num_warps_bwd=4, num_stages_bwd=2),
    (256, False): BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                             block_kv_dq=32, num_warps_fwd=4, num_stages_fwd=2, num_warps_bwd=4, num_stages_bwd=1),
    (32, True): BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=64, block_q_dq=64,
                           block_kv_dq=32, num_warps_fwd=4, num_stages_fwd=2, num_warps_bwd=4, num_stages_bwd=2),
    (64, True): BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                           block_kv_dq=32, num_warps_fwd=4, num_stages_fwd=2, num_warps_bwd=4, num_stages_bwd=2),
    (128, True): BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                            block_kv_dq=32, num_warps_fwd=4, num_stages_fwd=2, num_warps_bwd=4, num_stages_bwd=1),
    (256, True): BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16,
                            block_kv_dq=16, num_warps_fwd=4, num_stages_fwd=1, num_warps_bwd=4, num_stages_bwd=1),
}


def check_block_sizes(block_sizes: Any) -> BlockSizes | int | None:
  """``None`` (the table's default), a :class:`BlockSizes`, or a plain int meaning that tile size everywhere
  (with the table's warps and stages); anything else is a ``ValueError``."""
  if block_sizes is None or isinstance(block_sizes, BlockSizes):
    return block_sizes
  if isinstance(block_sizes, int) and not isinstance(block_sizes, bool):
    if block_sizes < 16 or block_sizes & (block_sizes - 1):
      raise ValueError(f"block_sizes={block_sizes} must be a power of two >= 16 (or a BlockSizes)")
    return block_sizes
  raise ValueError(f"block_sizes must be None, an int or a flash_gpu.BlockSizes; got {block_sizes!r}")


def _resolve_block_sizes(block_sizes: BlockSizes | int | None, head_dim: int, dtype: Any) -> BlockSizes:
  block_sizes = check_block_sizes(block_sizes)
  if isinstance(block_sizes, BlockSizes):
    return block_sizes
  default = BlockSizes.get_default(head_dim, dtype)
  if block_sizes is None:
    return default
  return dataclasses.replace(default, **{f: block_sizes for f in _TILE_FIELDS})


Dims = tuple[bool, bool, bool, bool]   # which axes of a [B|1, N|1, T|1, S|1] mask/bias are full (not broadcast)


_Config = KernelConfig   # mask / bias: the Dims of a dense mask / bias array


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


def _clean(x):
  """Non-finite entries replaced by 0 (a select, so hidden garbage never meets a multiply)."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _kv_limit(cfg: _Config, kv_len):
  """Exclusive bound on visible keys: the true S, or the per-example length."""
  if cfg.has_kv_len:
    return jnp.minimum(kv_len, cfg.S)
  return cfg.S


def _and(a, b):
  return b if a is None else a & b


def _masked_scores(cfg: _Config, s, q0, k0, q_len, kv_limit, q_seg, kv_seg, mask, bias):
  """Applies every mask to the tile logits ``s [bq, bk]`` (and adds the bias): ``(s, visible)``.

  ``mask`` / ``bias`` are the dense tiles (``[bq|1, bk|1]``, broadcast here) or None; a ``-inf`` bias hides its
  pair like a mask does.
  """
  bq, bk = s.shape
  rows = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
  cols = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
  kv_lim = kv_limit if (cfg.has_kv_len or cfg.Sp != cfg.S) else None
  vis = _tiling.position_mask(rows, cols, is_causal=cfg.is_causal, window=cfg.window, kv_limit=kv_lim,
                              q_limit=q_len)
  if cfg.has_seg:
    vis = _and(vis, q_seg[:, None] == kv_seg[None, :])
  if bias is not None:
    bias = bias.astype(jnp.float32)
    s = s + bias * LOG2E
    vis = _and(vis, bias != -jnp.inf)
  if mask is not None:
    vis = _and(vis, mask)
  vis = jnp.broadcast_to(vis, s.shape)
  return jnp.where(vis, s, -jnp.inf), vis


def _split_loops(cfg: _Config, lo, hi, u_lo, u_hi, masked_body, unmasked_body, carry):
  """Runs blocks [lo, hi): the fully visible [u_lo, u_hi) without a mask, the rest with one."""
  if not needs_mask(cfg):
    return lax.fori_loop(lo, hi, unmasked_body, carry)
  if masks_every_block(cfg):
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


def _cols_tile(r: dict, name: str, dims: Dims | None, k0, bk: int):
  """The ``[bq|1, bk|1]`` tile of a dense mask/bias whose program block is ``[bq|1, Sp|1]`` (None if absent)."""
  if dims is None:
    return None
  return r[name][:, pl.ds(k0, bk)] if dims[3] else r[name][...]


def _cols_tiles(cfg: _Config, r: dict, k0, bk: int):
  """The dense mask and bias tiles (each None if absent) of a program over query blocks."""
  return _cols_tile(r, "mask", cfg.mask, k0, bk), _cols_tile(r, "bias", cfg.bias, k0, bk)


def _dense_5d(x, dims: Dims, K: int):
  """``[B|1, N|1, T', S']`` -> ``[B|1, K|1, G|1, T', S']`` (a free reshape: kv head, then group)."""
  Bx, Nx, Tx, Sx = x.shape
  return x.reshape(Bx, K, Nx // K, Tx, Sx) if dims[1] else x.reshape(Bx, 1, 1, Tx, Sx)


def _pallas(kernel: Callable, cfg: _Config, name: str, grid, inputs, out_specs, out_shape, params):
  """``pallas_call`` over the inputs that are present: ``inputs`` lists ``(name, array or None, BlockSpec)``; the
  kernel gets a dict of the present refs by name, then the output refs."""
  present = [(n, x, s) for n, x, s in inputs if x is not None]
  names = tuple(n for n, _, _ in present)

  def body(*refs):
    kernel(dict(zip(names, refs[:len(names)])), *refs[len(names):], cfg=cfg)

  return pl.pallas_call(
      body, grid=grid, in_specs=[s for _, _, s in present], out_specs=out_specs, out_shape=out_shape,
      compiler_params=params, interpret=cfg.interpret, debug=cfg.debug, name=name,
  )(*[x for _, x, _ in present])


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(r: dict, o_ref, lse_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  q0 = _q_block(cfg, pl.program_id(0), bq) * bq
  q = r["q"][...]
  q_len = r["q_len"][()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, r["kv_len"][()] if cfg.has_kv_len else None)
  q_seg = r["q_seg"][...] if cfg.has_seg else None
  flags = needs_mask(cfg)   # rows that see a non-finite value in a masked tile are flagged, then set to NaN

  def body(j, carry, masked):
    acc, m, l, bad = carry
    k0 = j * bk
    k = r["k"][pl.ds(k0, bk), :]
    v = r["v"][pl.ds(k0, bk), :]
    s, _ = _scores(cfg, q, k)
    if masked:
      kv_seg = r["kv_seg"][pl.ds(k0, bk)] if cfg.has_seg else None
      s, vis = _masked_scores(cfg, s, q0, k0, q_len, kv_limit, q_seg, kv_seg, *_cols_tiles(cfg, r, k0, bk))
      v_ok = jnp.isfinite(v)
      v_bad = jnp.max(jnp.where(v_ok, F32_0, F32_1), axis=1)                          # [bk]
      bad = jnp.maximum(bad, jnp.max(jnp.where(vis & (v_bad[None, :] > 0.0), F32_1, F32_0), axis=1))
      v = jnp.where(v_ok, v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)     # rows that have seen no key yet
    p = jnp.exp2(s - m_safe[:, None])
    correction = jnp.exp2(m - m_safe)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l, bad

  lo, hi, u_lo, u_hi = _kv_range(cfg, q0, bq, bk, q_len, kv_limit)
  init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l, bad = _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                                functools.partial(body, masked=False), init)
  empty = l == 0.0            # no visible key (a NaN sum is not empty: it propagates)
  l_safe = jnp.where(empty, 1.0, l)
  out = acc / l_safe[:, None]
  if flags:
    out = jnp.where(bad[:, None] > 0.0, jnp.nan, out)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _specs_q(cfg: _Config, bq: int, hp: int, hvp: int):
  """BlockSpecs of a program over (query block i, batch b, query head n)."""
  G = cfg.groups
  qb = lambda i: _q_block(cfg, i, bq)

  def dense(dims):
    if dims is None:
      return None
    fb, fn, ft, fs = dims
    head = lambda n: (_tiling.floordiv(n, G), lax.rem(n, G)) if fn else (0, 0)
    return pl.BlockSpec((None, None, None, bq if ft else 1, cfg.Sp if fs else 1),
                        lambda i, b, n: (b if fb else 0, *head(n), qb(i) if ft else 0, 0))

  return dict(
      q=pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, qb(i), n, 0)),
      o=pl.BlockSpec((None, bq, None, hvp), lambda i, b, n: (b, qb(i), n, 0)),
      k=pl.BlockSpec((None, cfg.Sp, None, hp), lambda i, b, n: (b, 0, n // G, 0)),
      v=pl.BlockSpec((None, cfg.Sp, None, hvp), lambda i, b, n: (b, 0, n // G, 0)),
      scalar=pl.BlockSpec((None,), lambda i, b, n: (b,)),
      q_seg=pl.BlockSpec((None, bq), lambda i, b, n: (b, qb(i))),
      kv_seg=pl.BlockSpec((None, cfg.Sp), lambda i, b, n: (b, 0)),
      row=pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qb(i))),
      mask=dense(cfg.mask),
      bias=dense(cfg.bias),
  )


def _forward(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask):
  B, Tp, N, hp = q.shape
  K, hvp = v.shape[2:]
  bq = cfg.blocks.block_q
  sp = _specs_q(cfg, bq, hp, hvp)
  mask5 = None if mask is None else _dense_5d(mask, cfg.mask, K)
  bias5 = None if bias is None else _dense_5d(bias, cfg.bias, K)
  inputs = [("q", q, sp["q"]), ("k", k, sp["k"]), ("v", v, sp["v"]), ("q_len", q_len, sp["scalar"]),
            ("kv_len", kv_len, sp["scalar"]), ("q_seg", q_seg, sp["q_seg"]), ("kv_seg", kv_seg, sp["kv_seg"]),
            ("mask", mask5, sp["mask"]), ("bias", bias5, sp["bias"])]
  return _pallas(
      _fwd_kernel, cfg, "attention_jax_flash_fwd", (Tp // bq, B, N), inputs,
      out_specs=[sp["o"], sp["row"]],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, hvp), q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_fwd, num_stages=cfg.blocks.num_stages_fwd))


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _probs(s, lse2, vis):
  """A tile's probabilities from the row logsumexp (base 2); in masked tiles a select, so that hidden pairs are
  exactly 0 whatever their logits or the row's logsumexp hold."""
  p = jnp.exp2(s - lse2[:, None])
  return p if vis is None else jnp.where(vis, p, 0.0)


def _dlogits(cfg: _Config, p, dp, delta, tanh, vis):
  """dS with respect to the raw products ``q·k``: ``P (dP - delta)`` through the soft-cap and the scale; selected
  in masked tiles (a NaN in a hidden v, or a hidden pair's tanh, must not reach dQ / dK)."""
  ds = p * (dp - delta[:, None])
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  if vis is not None:
    ds = jnp.where(vis, ds, 0.0)
  return ds * cfg.scale


def _dkdv_kernel(r: dict, dk_ref, dv_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
  k0 = pl.program_id(0) * bk
  k, v = r["k"][...], r["v"][...]
  q_len = r["q_len"][()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, r["kv_len"][()] if cfg.has_kv_len else None)
  kv_seg = r["kv_seg"][...] if cfg.has_seg else None
  q_bound = cfg.T if q_len is None else jnp.minimum(q_len, cfg.T)
  lo, hi = _tiling.q_block_range(k0, bk, bq, q_len=q_bound, is_causal=cfg.is_causal, window=cfg.window,
                                 kv_limit=kv_limit)
  u_lo, u_hi = _tiling.unmasked_q_block_range(k0, bk, bq, lo, hi, kv_len=kv_limit, is_causal=cfg.is_causal,
                                              window=cfg.window)

  def rows_tile(name, dims, g, q0):
    """The ``[bq|1, bk|1]`` tile of a dense mask/bias whose program block is ``[G|1, Tp|1, bk|1]``."""
    if dims is None:
      return None
    gi = g if dims[1] else 0
    return r[name][gi, pl.ds(q0, bq), :] if dims[2] else r[name][gi, :, :]

  def head(g, carry):
    def body(i, c, masked):
      dk, dv = c
      q0 = i * bq
      q = r["q"][pl.ds(q0, bq), g, :]
      do = r["do"][pl.ds(q0, bq), g, :]
      lse2 = r["lse2"][g, pl.ds(q0, bq)]
      delta = r["delta"][g, pl.ds(q0, bq)]
      s, tanh = _scores(cfg, q, k)
      vis = None
      if masked:
        q_seg = r["q_seg"][pl.ds(q0, bq)] if cfg.has_seg else None
        s, vis = _masked_scores(cfg, s, q0, k0, q_len, kv_limit, q_seg, kv_seg,
                                rows_tile("mask", cfg.mask, g, q0), rows_tile("bias", cfg.bias, g, q0))
        q = _clean(q)        # a hidden query row may hold garbage; ds is 0 there, and 0 * NaN must not happen
      p = _probs(s, lse2, vis)
      dv = dv + _dot(p.astype(do.dtype).T, do)
      ds = _dlogits(cfg, p, _dot(do, v.T), delta, tanh, vis)
      dk = dk + _dot(ds.astype(q.dtype).T, q)
      return dk, dv

    return _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                        functools.partial(body, masked=False), carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.groups, head, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(r: dict, dq_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
  q0 = _q_block(cfg, pl.program_id(0), bq) * bq
  q, do = r["q"][...], r["do"][...]
  lse2, delta = r["lse2"][...], r["delta"][...]
  q_len = r["q_len"][()] if cfg.has_q_len else None
  kv_limit = _kv_limit(cfg, r["kv_len"][()] if cfg.has_kv_len else None)
  q_seg = r["q_seg"][...] if cfg.has_seg else None

  def body(j, dq, masked):
    k0 = j * bk
    k = r["k"][pl.ds(k0, bk), :]
    v = r["v"][pl.ds(k0, bk), :]
    s, tanh = _scores(cfg, q, k)
    vis = None
    if masked:
      kv_seg = r["kv_seg"][pl.ds(k0, bk)] if cfg.has_seg else None
      s, vis = _masked_scores(cfg, s, q0, k0, q_len, kv_limit, q_seg, kv_seg, *_cols_tiles(cfg, r, k0, bk))
      k = _clean(k)
    ds = _dlogits(cfg, _probs(s, lse2, vis), _dot(do, v.T), delta, tanh, vis)
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi, u_lo, u_hi = _kv_range(cfg, q0, bq, bk, q_len, kv_limit)
  dq = _split_loops(cfg, lo, hi, u_lo, u_hi, functools.partial(body, masked=True),
                    functools.partial(body, masked=False), jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dbias_kernel(r: dict, dbias_ref, *, cfg: _Config):
  """One program per (query block, bias batch row, bias head): loops over the key blocks its rows can see and over
  the (batch, head) pairs the bias broadcasts over, recomputing each tile's dS and summing it into the bias's
  shape (rows / columns summed where the bias broadcasts over T / S)."""
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
  fb, fn, ft, fs = cfg.bias
  B, _, N, _ = r["q"].shape
  G = cfg.groups
  q0 = pl.program_id(0) * bq
  bb, nb = pl.program_id(1), pl.program_id(2)
  nb_loop = 1 if fb else B          # batch rows summed into this program's bias entries
  nn_loop = 1 if fn else N          # heads summed likewise

  def lengths(b):
    q_len = r["q_len"][b] if cfg.has_q_len else None
    return q_len, _kv_limit(cfg, r["kv_len"][b] if cfg.has_kv_len else None)

  # Key blocks the rows can see: from this batch row's lengths, or from the positions alone when looping over rows.
  if fb:
    q_len, kv_limit = lengths(bb)
    lo, hi = _tiling.kv_block_range(q0, bq, bk, kv_len=kv_limit, is_causal=cfg.is_causal, window=cfg.window,
                                    q_limit=q_len)
  else:
    lo, hi = _tiling.kv_block_range(q0, bq, bk, kv_len=cfg.S, is_causal=cfg.is_causal, window=cfg.window)

  def tile_ds(k0, b, n):
    q_len, kv_limit = lengths(b)
    q = r["q"][b, :, n, :]
    do = r["do"][b, :, n, :]
    lse2, delta = r["lse2"][b, n, :], r["delta"][b, n, :]
    h = _tiling.floordiv(n, G)
    k = r["k"][b, pl.ds(k0, bk), h, :]
    v = r["v"][b, pl.ds(k0, bk), h, :]
    q_seg = r["q_seg"][b, :] if cfg.has_seg else None
    kv_seg = r["kv_seg"][b, pl.ds(k0, bk)] if cfg.has_seg else None
    mask = None
    if cfg.mask is not None:
      mb, mn, _, ms = cfg.mask
      idx = (b if mb else 0, _tiling.floordiv(n, G) if mn else 0, lax.rem(n, G) if mn else 0, slice(None))
      mask = r["mask"][idx + ((pl.ds(k0, bk),) if ms else (slice(None),))]
    s, _ = _scores(cfg, q, k)
    s, vis = _masked_scores(cfg, s, q0, k0, q_len, kv_limit, q_seg, kv_seg, mask,
                            _cols_tile(r, "bias", cfg.bias, k0, bk))
    ds = _probs(s, lse2, vis) * (_dot(do, v.T) - delta[:, None])    # d logits, before the soft-cap
    return jnp.where(vis, ds, 0.0)

  def reduce(ds):
    if not ft:
      ds = jnp.sum(ds, axis=0, keepdims=True)
    if not fs:
      ds = jnp.sum(ds, axis=1, keepdims=True)
    return ds

  def key_block(j, acc):
    k0 = j * bk

    def pair(t, tile):
      b = bb if fb else _tiling.floordiv(t, nn_loop)
      n = nb if fn else lax.rem(t, nn_loop)
      return tile + tile_ds(k0, b, n)

    tile = lax.fori_loop(0, nb_loop * nn_loop, pair, jnp.zeros((bq, bk), jnp.float32))
    if fs:
      dbias_ref[:, pl.ds(k0, bk)] = reduce(tile).astype(dbias_ref.dtype)
      return acc
    return acc + reduce(tile)

  if fs:
    def zero_block(j, carry):   # key blocks no row sees
      dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((dbias_ref.shape[0], bk), dbias_ref.dtype)
      return carry

    done = lax.fori_loop(0, lo, zero_block, jnp.int32(0))
    done = lax.fori_loop(hi, cfg.Sp // bk, zero_block, done)
    lax.fori_loop(lo, hi, key_block, done)
  else:
    acc = lax.fori_loop(lo, hi, key_block, jnp.zeros(dbias_ref.shape, jnp.float32))   # [bq|1, 1]
    dbias_ref[...] = acc.astype(dbias_ref.dtype)


def _dbias(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask, d_out, lse2, delta):
  """The bias gradient in the padded bias's shape ``[B|1, N|1, Tp|1, Sp|1]``, from a kernel over its own grid."""
  B, Tp, N, hp = q.shape
  Sp, K, hvp = v.shape[1:]
  Bb, Nb = bias.shape[:2]
  fb, fn, ft, fs = cfg.bias
  bq = cfg.blocks.block_q_dq
  nq = Tp // bq
  full = lambda shape: pl.BlockSpec(shape, lambda i, b, n: (0,) * len(shape))
  mask_spec = None
  if mask is not None:
    mask = _dense_5d(mask, cfg.mask, K)
    mt = cfg.mask[2]
    mask_spec = pl.BlockSpec(mask.shape[:3] + (bq if mt else 1, mask.shape[4]),
                             lambda i, b, n: (0, 0, 0, i if mt else 0, 0))
  bias_spec = pl.BlockSpec((None, None, bq if ft else 1, Sp if fs else 1),
                           lambda i, b, n: (b, n, i if ft else 0, 0))
  rows = pl.BlockSpec((B, N, bq), lambda i, b, n: (0, 0, i))
  inputs = [("q", q, pl.BlockSpec((B, bq, N, hp), lambda i, b, n: (0, i, 0, 0))),
            ("k", k, full(k.shape)), ("v", v, full(v.shape)),
            ("do", d_out, pl.BlockSpec((B, bq, N, hvp), lambda i, b, n: (0, i, 0, 0))),
            ("lse2", lse2, rows), ("delta", delta, rows),
            ("q_len", q_len, full((B,))), ("kv_len", kv_len, full((B,))),
            ("q_seg", q_seg, pl.BlockSpec((B, bq), lambda i, b, n: (0, i))), ("kv_seg", kv_seg, full((B, Sp))),
            ("mask", mask, mask_spec), ("bias", bias, bias_spec)]
  if ft:    # each program owns its rows of dbias
    out_shape = jax.ShapeDtypeStruct(bias.shape, bias.dtype)
    out_spec = pl.BlockSpec((None, None, bq, Sp if fs else 1), lambda i, b, n: (b, n, i, 0))
  else:     # each program writes its query block's column sums; XLA adds them up
    out_shape = jax.ShapeDtypeStruct((nq,) + bias.shape, jnp.float32)
    out_spec = pl.BlockSpec((None, None, None, 1, Sp if fs else 1), lambda i, b, n: (i, b, n, 0, 0))
  blk = cfg.blocks
  dbias = _pallas(_dbias_kernel, cfg, "attention_jax_flash_dbias", (nq, Bb, Nb), inputs, out_spec, out_shape,
                  plgpu.CompilerParams(num_warps=blk.num_warps_bwd, num_stages=blk.num_stages_bwd))
  return dbias if ft else jnp.sum(dbias, axis=0).astype(bias.dtype)


def _backward(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask, out, lse, d_out, d_lse):
  B, Tp, N, hp = q.shape
  Sp, K, hvp = v.shape[1:]
  G = cfg.groups
  delta = _numerics.backward_delta(out, d_out, d_lse, jnp.float32)
  # Rows with no visible key have lse 0 in the residuals (or -inf): either way every logit of theirs is masked.
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
  blk = cfg.blocks
  params = plgpu.CompilerParams(num_warps=blk.num_warps_bwd, num_stages=blk.num_stages_bwd)

  # dK, dV: one program per (key block, batch, kv head); the G query heads of that kv head are looped inside.
  bk = blk.block_kv_dkv

  def dense_kv(dims):
    if dims is None:
      return None
    fb, fn, ft, fs = dims
    return pl.BlockSpec((None, None, G if fn else 1, Tp if ft else 1, bk if fs else 1),
                        lambda j, b, h: (b if fb else 0, h if fn else 0, 0, 0, j if fs else 0))

  scalar = pl.BlockSpec((None,), lambda j, b, h: (b,))
  rows = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
  k_blk = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
  v_blk = pl.BlockSpec((None, bk, None, hvp), lambda j, b, h: (b, j, h, 0))
  mask5 = None if mask is None else _dense_5d(mask, cfg.mask, K)
  bias5 = None if bias is None else _dense_5d(bias, cfg.bias, K)
  inputs = [("q", q.reshape(B, Tp, K, G, hp), pl.BlockSpec((None, Tp, None, G, hp), lambda j, b, h: (b, 0, h, 0, 0))),
            ("k", k, k_blk), ("v", v, v_blk),
            ("do", d_out.reshape(B, Tp, K, G, hvp),
             pl.BlockSpec((None, Tp, None, G, hvp), lambda j, b, h: (b, 0, h, 0, 0))),
            ("lse2", lse2.reshape(B, K, G, Tp), rows), ("delta", delta.reshape(B, K, G, Tp), rows),
            ("q_len", q_len, scalar), ("kv_len", kv_len, scalar),
            ("q_seg", q_seg, pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0))),
            ("kv_seg", kv_seg, pl.BlockSpec((None, bk), lambda j, b, h: (b, j))),
            ("mask", mask5, dense_kv(cfg.mask)), ("bias", bias5, dense_kv(cfg.bias))]
  dk, dv = _pallas(_dkdv_kernel, cfg, "attention_jax_flash_dkdv", (Sp // bk, B, K), inputs,
                   out_specs=[k_blk, v_blk],
                   out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   params=params)

  # dQ: one program per (query block, batch, query head).
  bq = blk.block_q_dq
  sp = _specs_q(cfg, bq, hp, hvp)
  inputs = [("q", q, sp["q"]), ("k", k, sp["k"]), ("v", v, sp["v"]), ("do", d_out, sp["o"]),
            ("lse2", lse2, sp["row"]), ("delta", delta, sp["row"]), ("q_len", q_len, sp["scalar"]),
            ("kv_len", kv_len, sp["scalar"]), ("q_seg", q_seg, sp["q_seg"]), ("kv_seg", kv_seg, sp["kv_seg"]),
            ("mask", mask5, sp["mask"]), ("bias", bias5, sp["bias"])]
  dq = _pallas(_dq_kernel, cfg, "attention_jax_flash_dq", (Tp // bq, B, N), inputs, out_specs=sp["q"],
               out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), params=params)

  dbias = None
  if bias is not None:
    dbias = _dbias(cfg, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask, d_out, lse2, delta)
  return dq, dk, dv, dbias


# (out, lse) with a recomputing backward: saves q, k, v, bias, aux, out and lse only (lse finite).
_flash = flash_custom_vjp(_forward, _backward, with_bias=True, finite_residuals=True)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _resolve_interpret(interpret):
  """None: interpreted on CPU, compiled on GPU; ``core.UnsupportedError`` on other backends."""
  return compiled_on("gpu", "the Triton flash kernel") if interpret is None else interpret


_PATH = "the Pallas flash kernel (Triton)"
MAX_HEAD_DIM = 256   # a tile holds a whole (padded) head dim; beyond this it would not fit the GPU's on-chip memory


def _check_supported(inp: core.AttentionInputs) -> None:
  """``core.UnsupportedError`` for calls the kernel cannot take (dispatch then tries the next implementation)."""
  dtype = inp.query.dtype
  if dtype == jnp.float64:
    raise core.UnsupportedError(
        f"the Pallas flash kernel computes in float32 and cannot keep float64 inputs in float64 ({inp.shapes}); use "
        "implementation='blockwise' or 'reference'")
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise core.UnsupportedError(f"the Pallas flash kernel takes float32, bfloat16 or float16 inputs; got {dtype} "
                                f"({inp.shapes}); use implementation='blockwise' or 'reference'")
  H, Hv = inp.query.shape[-1], inp.value.shape[-1]
  if max(padded_head_dim(H), padded_head_dim(Hv)) > MAX_HEAD_DIM:
    raise core.UnsupportedError(f"the Pallas flash kernel takes head dims up to {MAX_HEAD_DIM}; got H={H}, Hv={Hv} "
                                f"({inp.shapes}); use implementation='blockwise' or 'reference'")


def _dense_dims(x: jax.Array | None) -> Dims | None:
  return None if x is None else tuple(d != 1 for d in x.shape)


def _pad_dense(x: jax.Array | None, Tp: int, Sp: int, fill):
  """A ``[B|1, N|1, T|1, S|1]`` mask/bias padded along its full T and S axes (size-1 axes stay size 1)."""
  if x is None:
    return None
  pad_t = Tp - x.shape[2] if x.shape[2] != 1 else 0
  pad_s = Sp - x.shape[3] if x.shape[3] != 1 else 0
  if pad_t == 0 and pad_s == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=fill)


def flash_core(inp: core.AttentionInputs, block_sizes: BlockSizes | int | None = None, interpret=None,
               debug: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the kernels: ``(output [B,T,N,Hv], lse [B,N,T])`` (differentiable, also with
  respect to the bias). ``core.UnsupportedError`` for what the kernel cannot take."""
  _check_supported(inp)
  B, T, N, H = inp.query.shape
  S, K, Hv = inp.value.shape[1:]
  blocks = _resolve_block_sizes(block_sizes, max(H, Hv), inp.query.dtype)
  # Tiles no larger than the (power-of-two padded) sequences, then pad the sequences to whole tiles.
  fit = lambda b, n: min(b, max(16, pl.next_power_of_2(n)))
  blocks = dataclasses.replace(
      blocks, block_q=fit(blocks.block_q, T), block_q_dkv=fit(blocks.block_q_dkv, T),
      block_q_dq=fit(blocks.block_q_dq, T), block_k=fit(blocks.block_k, S), block_kv_dkv=fit(blocks.block_kv_dkv, S),
      block_kv_dq=fit(blocks.block_kv_dq, S))
  tq = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
  tk = max(blocks.block_k, blocks.block_kv_dkv, blocks.block_kv_dq)
  Tp, Sp = _numerics.round_up(T, tq), _numerics.round_up(S, tk)
  hp, hvp = padded_head_dim(H), padded_head_dim(Hv)
  cfg = _Config.of(inp, path=_PATH, Tp=Tp, Sp=Sp, mask=_dense_dims(inp.mask), bias=_dense_dims(inp.bias),
                   blocks=blocks, interpret=_resolve_interpret(interpret), debug=debug)
  pad = lambda x, n, h: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, h - x.shape[3])))
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  q, k = pad(_numerics.nan_rows(inp.query), Tp, hp), pad(_numerics.nan_rows(inp.key), Sp, hp)
  v = pad(inp.value, Sp, hvp)
  seg = lambda x, n, fill: None if x is None else jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=fill)
  aux = (inp.q_lengths, inp.kv_lengths, seg(inp.q_segment_ids, Tp, -1), seg(inp.kv_segment_ids, Sp, -2),
         _pad_dense(inp.mask, Tp, Sp, False))
  out, lse = _flash(cfg, q, k, v, _pad_dense(inp.bias, Tp, Sp, 0), aux)
  return out[:, :T, :, :Hv], lse[:, :, :T]


flash_attention = core.implementation_function(
    flash_core, name="flash_attention", module=__name__,
    options={"block_sizes": core.Option(None, check_block_sizes), "interpret": core.Option(None),
             "debug": core.Option(False, bool)},
    doc="""Flash attention (Pallas, Triton lowering); semantics of :func:`attention_jax.dot_product_attention`.

  ``query [*B, T, N, H]``, ``key [*B, S, K, H]``, ``value [*B, S, K, Hv]``, any T and S, ``N % K == 0``; dense
  ``bias`` / ``mask`` arrays broadcastable to ``[*B, N, T, S]`` (differentiable bias). ``block_sizes`` overrides
  :meth:`BlockSizes.get_default` (a plain int: that tile size everywhere); ``interpret=None`` interprets on CPU and
  compiles on GPU. ``return_residual=True`` also returns the logsumexp ``[*B, T, N]`` as ``jax.nn`` does.
  float64 raises ``core.UnsupportedError`` (use ``blockwise_attention`` or the reference).
  """)
flash_attention_reference = core.reference_function(flash_attention, module=__name__)
