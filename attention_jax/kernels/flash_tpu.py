"""Flash attention as Pallas kernels for TPU (Mosaic lowering), forward and backward.

Layout: the wrapper zero-pads head dims to a multiple of 128 (the TPU lane width, ``Hp``) and sequences to whole
blocks, then views ``[B, T, N, Hp]`` as ``[B, T, N*Hp]`` (a free reshape). The tile of query block i and head n is
then the rectangle ``[i*bq:(i+1)*bq, n*Hp:(n+1)*Hp]``: aligned to the 8 x 128 TPU tiling, with no transpose to a
head-major layout. Kernels see 2-D tiles only.

* forward: grid ``(B, N, query blocks, key blocks)``, the key axis sequential ("arbitrary"), the others
  parallel. A running max and sum (lane-replicated ``[bq, 128]``) and a float32 ``[bq, Hp]`` accumulator live in
  VMEM scratch across the key steps (online softmax); the last step normalises and writes the output and the
  logsumexp. Rows with no visible key give zeros and a logsumexp of -inf.
* dK/dV: grid ``(B, K, key blocks, G, query blocks)``; the G query heads sharing a kv head and the query blocks
  are both sequential and accumulate into float32 VMEM scratch (GQA without repeating K/V). The tile is computed
  transposed, ``S^T = K Q^T`` of shape ``[bk, bq]``, so the per-query logsumexp and ``delta = rowsum(dO * O)``
  enter as lane-major rows.
* dQ: grid ``(B, N, query blocks, key blocks)``, key axis sequential, float32 scratch. Both backward kernels
  recompute P from the logsumexp; ``delta`` is computed by XLA.
* block skipping: key (query) blocks outside the causal / local-window band, past a per-example key length or
  wholly in query padding are skipped with ``pl.when``, and their index_map is clamped to a block that is needed
  anyway, so the pipeline issues no DMA for them either. Blocks that every row sees fully run without a mask.
* per-example lengths are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``) and read by the index maps and
  the kernels; segment ids enter lane- or sublane-replicated (``[bq, 128]`` columns, ``[8, bk]`` rows).
* statistics and accumulation in float32; float32 inputs use full-precision (fp32) matmuls; float16 inputs are
  computed as float32 (float16 is not a native TPU matmul type).

``flash_attention_tpu_reference`` has the same signature and computes the same function plainly.
``interpret=None`` runs the kernels in Pallas TPU interpret mode on a CPU backend and compiles them on TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention_jax import _tiling, core
from attention_jax.kernels._common import flash_custom_vjp

LANES = 128      # TPU vector register: 8 sublanes x 128 lanes
SUBLANES = 8


def _round_up(n: int, m: int) -> int:
  return _tiling.cdiv(n, m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile lengths of the forward, dK/dV and dQ kernels: powers of two, multiples of the 128-lane tiling."""
  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      b = getattr(self, f.name)
      if not isinstance(b, int) or b < LANES or b & (b - 1):
        raise ValueError(f"BlockSizes.{f.name}={b} must be a power of two >= {LANES} (the TPU lane tiling)")

  @classmethod
  def get_default(cls, head_dim: int, dtype: Any = jnp.bfloat16) -> "BlockSizes":
    """512-long tiles for 2-byte inputs with ``H <= 128``, 256 otherwise (VMEM grows with H and the dtype).

    Provisional and unmeasured (no TPU was available): 512 follows MaxText's splash-attention defaults; on TPU,
    ``experiments/bench_kernels.py --implementations=pallas_tpu`` is the place to re-tune them.
    """
    if _round_up(head_dim, LANES) <= 128 and jnp.dtype(dtype).itemsize <= 2:
      return cls()
    return cls(*(256,) * 6)


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
  hp: int                # head dim padded to a multiple of 128
  groups: int            # G = N // K
  has_q_len: bool
  has_kv_len: bool
  has_seg: bool
  blocks: BlockSizes
  interpret: Any         # False, or pltpu.InterpretParams
  debug: bool


# ----------------------------------------------------------------------------------------------------------
# Block geometry (plain jnp on int32 scalars: runs in the index maps and in the kernels)
# ----------------------------------------------------------------------------------------------------------


def _needs_mask(cfg: _Config) -> bool:
  return (cfg.is_causal or cfg.window is not None or cfg.has_q_len or cfg.has_kv_len or cfg.has_seg
          or cfg.Sp != cfg.S)


def _blocks(cfg: _Config, range_fn, unmasked_fn, start, own: int, other: int, limits: dict, kv_len):
  """The blocks ``[lo, hi)`` along the other axis that a block ``[start, start + own)`` meets, and the fully
  visible sub-range ``[u_lo, u_hi)`` (empty with segment ids or query lengths, which can mask inside any block)."""
  band = dict(is_causal=cfg.is_causal, window=cfg.window)
  lo, hi = range_fn(start, own, other, **limits, **band)
  if cfg.has_seg or cfg.has_q_len:
    return lo, hi, lo, lo
  return (lo, hi, *unmasked_fn(start, own, other, lo, hi, kv_len=kv_len, **band))


def _kv_blocks(cfg: _Config, q_block, bq: int, bk: int, q_len, kv_len):
  """Key blocks seen by query block ``q_block``: ``(lo, hi, u_lo, u_hi)``."""
  return _blocks(cfg, _tiling.kv_block_range, _tiling.unmasked_kv_block_range, q_block * bq, bq, bk,
                 dict(kv_len=kv_len, q_limit=q_len), kv_len)


def _q_blocks(cfg: _Config, k_block, bk: int, bq: int, q_len, kv_len):
  """Query blocks that see key block ``k_block``: ``(lo, hi, u_lo, u_hi)``."""
  return _blocks(cfg, _tiling.q_block_range, _tiling.unmasked_q_block_range, k_block * bk, bk, bq,
                 dict(q_len=q_len, kv_limit=kv_len), kv_len)


def _clamp(idx, lo, hi, n: int):
  """The block to fetch at grid step ``idx``: itself inside ``[lo, hi)``, else the nearest needed one.

  Consecutive steps that map to the same block index issue no new DMA, so skipped blocks cost no bandwidth.
  """
  idx = jnp.minimum(jnp.maximum(idx, lo), jnp.maximum(hi - 1, lo))
  return jnp.minimum(idx, n - 1)


def _run_blocks(cfg: _Config, idx, lo, hi, u_lo, u_hi, step) -> None:
  """Runs ``step(masked)`` when grid step ``idx`` is in ``[lo, hi)``; unmasked inside ``[u_lo, u_hi)``."""
  run = (idx >= lo) & (idx < hi)
  if not _needs_mask(cfg):
    pl.when(run)(lambda: step(False))
    return
  if cfg.has_seg or cfg.has_q_len:
    pl.when(run)(lambda: step(True))
    return
  full = (idx >= u_lo) & (idx < u_hi)
  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))


# ----------------------------------------------------------------------------------------------------------
# Tile pieces shared by the kernels
# ----------------------------------------------------------------------------------------------------------


def _dot(a, b, trans_b: bool = False):
  """float32-accumulated tile matmul ``a @ b`` (or ``a @ b.T``); float32 inputs use fp32 MXU passes."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(cfg: _Config, a, b):
  """Scaled (and soft-capped) logits ``a @ b.T`` in float32, and the tanh the backward needs with a cap."""
  s = _dot(a, b, trans_b=True)
  if cfg.soft_cap is None:
    return s * cfg.scale, None
  t = jnp.tanh(s * (cfg.scale / cfg.soft_cap))
  return t * cfg.soft_cap, t


def _lanes(x_R128, width: int):
  """A lane-replicated ``[R, 128]`` statistic tiled to ``[R, width]``."""
  return x_R128 if width == LANES else jnp.tile(x_R128, (1, width // LANES))


def _column(rows_8xR):
  """Sublane-replicated rows ``[8, R]`` -> lane-replicated column ``[R, 128]`` (one aligned 32-bit transpose)."""
  return jnp.broadcast_to(rows_8xR[:1, :], (LANES, rows_8xR.shape[1])).T


def _tile_mask(cfg: _Config, q_pos, k_pos, q_len, kv_len, q_ids, kv_ids):
  """Visibility of a tile from absolute positions (same-shape int32 arrays) and segment ids."""
  kv_limit = kv_len if (cfg.has_kv_len or cfg.Sp != cfg.S) else None
  mask = _tiling.position_mask(q_pos, k_pos, is_causal=cfg.is_causal, window=cfg.window, kv_limit=kv_limit,
                               q_limit=q_len if cfg.has_q_len else None)
  if cfg.has_seg:
    same = q_ids == kv_ids
    mask = same if mask is None else mask & same
  return mask


def _mask_tile(cfg: _Config, s, seg_refs, q0, k0, q_len, kv_len, q_axis: int):
  """``s`` with -inf where not visible; the tile's query axis is ``q_axis`` (0, or 1 for a transposed tile).

  ``seg_refs`` (with segment ids): the ids of the tile's row axis as a lane-replicated ``[rows, 128]`` column
  and those of its column axis as sublane-replicated ``[8, cols]`` rows.
  """
  q_ids = kv_ids = None
  if cfg.has_seg:
    col_ids = jnp.tile(seg_refs[0][...], (1, s.shape[1] // LANES))   # [rows, cols]
    row_ids = seg_refs[1][:1, :]                                      # [1, cols]
    q_ids, kv_ids = (col_ids, row_ids) if q_axis == 0 else (row_ids, col_ids)
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, s.shape, q_axis)
  k_pos = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1 - q_axis)
  return jnp.where(_tile_mask(cfg, q_pos, k_pos, q_len, kv_len, q_ids, kv_ids), s, -jnp.inf)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
  seg_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:-5], refs[-5:]
  bq, bk, hp = cfg.blocks.block_q, cfg.blocks.block_k, cfg.hp
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    s, _ = _logits(cfg, q_ref[...], k_ref[...])                  # [bq, bk]
    if masked:
      s = _mask_tile(cfg, s, seg_refs, i * bq, j * bk, q_len, kv_len, q_axis=0)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))   # [bq, 128]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)               # rows that have seen no key yet
    p = jnp.exp(s - _lanes(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * _lanes(alpha, hp) + _dot(p.astype(v.dtype), v)

  _run_blocks(cfg, j, *_kv_blocks(cfg, i, bq, bk, q_len, kv_len), step)

  @pl.when(j == cfg.Sp // bk - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_ref[...] * _lanes(1.0 / l_safe, hp)).astype(o_ref.dtype)
    lse = jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf)     # [bq, 128], equal lanes
    lse_ref[...] = lse.T[:SUBLANES, :]                                 # [8, bq], equal sublanes


def _rows(x_BNT, B: int, N: int):
  """``[B, N, T]`` -> sublane-replicated ``[B, N, 8, T]`` (the layout of per-query statistics in HBM)."""
  return jnp.broadcast_to(x_BNT[:, :, None, :], (B, N, SUBLANES, x_BNT.shape[-1]))


def _seg_column(ids_BL):
  return jnp.broadcast_to(ids_BL[:, :, None], (*ids_BL.shape, LANES))


def _seg_rows(ids_BL):
  return jnp.broadcast_to(ids_BL[:, None, :], (ids_BL.shape[0], SUBLANES, ids_BL.shape[1]))


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, name, *args):
  # Interpret mode gets no dimension semantics: they only matter there when simulating several cores, and jax's
  # TPU interpreter does not extend them to the grid axes that jax.vmap prepends (Mosaic lowering does).
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=None if cfg.interpret else semantics),
      interpret=cfg.interpret, debug=cfg.debug, name=name,
  )(*args)


def _specs_q_major(cfg: _Config, bq: int, bk: int):
  """BlockSpecs of a grid ``(b, n, query block i, key block j)`` (forward and dQ); key blocks clamped."""
  G, hp, nk = cfg.groups, cfg.hp, cfg.Sp // bk

  def kv_block(b, i, j, q_len_ref, kv_len_ref):
    lo, hi, _, _ = _kv_blocks(cfg, i, bq, bk, q_len_ref[b], kv_len_ref[b])
    return _clamp(j, lo, hi, nk)

  return dict(
      q=pl.BlockSpec((None, bq, hp), lambda b, n, i, j, *_: (b, i, n)),
      kv=pl.BlockSpec((None, bk, hp), lambda b, n, i, j, *lens: (b, kv_block(b, i, j, *lens), lax.div(n, G))),
      rows=pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, j, *_: (b, n, 0, i)),
      q_seg=pl.BlockSpec((None, bq, LANES), lambda b, n, i, j, *_: (b, i, 0)),
      kv_seg=pl.BlockSpec((None, SUBLANES, bk), lambda b, n, i, j, *lens: (b, 0, kv_block(b, i, j, *lens))),
  )


def _forward(cfg: _Config, q, k, v, q_len, kv_len, seg):
  B, Tp, _ = q.shape
  N = q.shape[2] // cfg.hp
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  sp = _specs_q_major(cfg, bq, bk)
  in_specs, args = [sp["q"], sp["kv"], sp["kv"]], [q, k, v]
  if cfg.has_seg:
    in_specs += [sp["q_seg"], sp["kv_seg"]]
    args += [_seg_column(seg[0]), _seg_rows(seg[1])]
  out, lse = _call(
      cfg, _fwd_kernel, (B, N, Tp // bq, cfg.Sp // bk), in_specs, [sp["q"], sp["rows"]],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, SUBLANES, Tp), jnp.float32)],
      [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, cfg.hp), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flash_tpu_fwd", q_len, kv_len, *args)
  return out, lse[:, :, 0, :]


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dkdv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  seg_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = refs[:-4], refs[-4:]
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked: bool):
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    s_t, tanh = _logits(cfg, k, q)                                 # [bk, bq]: S transposed
    if masked:
      s_t = _mask_tile(cfg, s_t, seg_refs, i * bq, j * bk, q_len, kv_len, q_axis=1)
    p_t = jnp.exp(s_t - lse_ref[:1, :])          # lse is +inf on rows with no key: P = 0 there
    dv_acc[...] += _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v, do, trans_b=True) - delta_ref[:1, :])
    if tanh is not None:
      ds_t = ds_t * (1.0 - tanh * tanh)
    dk_acc[...] += _dot((ds_t * cfg.scale).astype(q.dtype), q)

  _run_blocks(cfg, i, *_q_blocks(cfg, j, bk, bq, q_len, kv_len), step)

  @pl.when((g == cfg.groups - 1) & (i == cfg.Tp // bq - 1))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  seg_refs, (dq_ref, dq_acc, lse_col, delta_col) = refs[:-4], refs[-4:]
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    lse_col[...] = _column(lse_ref[...])
    delta_col[...] = _column(delta_ref[...])

  def step(masked: bool):
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    s, tanh = _logits(cfg, q, k)                                   # [bq, bk]
    if masked:
      s = _mask_tile(cfg, s, seg_refs, i * bq, j * bk, q_len, kv_len, q_axis=0)
    p = jnp.exp(s - _lanes(lse_col[...], bk))
    ds = p * (_dot(do, v, trans_b=True) - _lanes(delta_col[...], bk))
    if tanh is not None:
      ds = ds * (1.0 - tanh * tanh)
    dq_acc[...] += _dot((ds * cfg.scale).astype(k.dtype), k)

  _run_blocks(cfg, j, *_kv_blocks(cfg, i, bq, bk, q_len, kv_len), step)

  @pl.when(j == cfg.Sp // bk - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, q_len, kv_len, seg, out, lse, d_out, d_lse):
  B, Tp, _ = q.shape
  hp, G = cfg.hp, cfg.groups
  N, K = q.shape[2] // hp, k.shape[2] // hp
  heads = lambda x: x.reshape(B, Tp, N, hp).astype(jnp.float32)
  delta = jnp.einsum("btnh,btnh->bnt", heads(d_out), heads(out))
  delta = _rows(delta - d_lse.astype(jnp.float32), B, N)         # a logsumexp cotangent enters as -d_lse
  lse = _rows(jnp.where(jnp.isfinite(lse), lse, jnp.inf), B, N)  # rows with no key: P = 0
  blk = cfg.blocks

  # dK, dV: one (b, kv head h, key block j) accumulates over the G query heads g and the query blocks i.
  bq, bk = blk.block_q_dkv, blk.block_k_dkv
  nq = Tp // bq

  def q_block(b, j, i, q_len_ref, kv_len_ref):
    lo, hi, _, _ = _q_blocks(cfg, j, bk, bq, q_len_ref[b], kv_len_ref[b])
    return _clamp(i, lo, hi, nq)

  q_spec = pl.BlockSpec((None, bq, hp), lambda b, h, j, g, i, *lens: (b, q_block(b, j, i, *lens), h * G + g))
  kv_spec = pl.BlockSpec((None, bk, hp), lambda b, h, j, g, i, *_: (b, j, h))
  rows_spec = pl.BlockSpec((None, None, SUBLANES, bq),
                           lambda b, h, j, g, i, *lens: (b, h * G + g, 0, q_block(b, j, i, *lens)))
  in_specs, args = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec], [q, k, v, d_out, lse, delta]
  if cfg.has_seg:
    in_specs += [pl.BlockSpec((None, bk, LANES), lambda b, h, j, g, i, *_: (b, j, 0)),
                 pl.BlockSpec((None, SUBLANES, bq), lambda b, h, j, g, i, *lens: (b, 0, q_block(b, j, i, *lens)))]
    args += [_seg_column(seg[1]), _seg_rows(seg[0])]
  dk, dv = _call(
      cfg, _dkdv_kernel, (B, K, cfg.Sp // bk, G, nq), in_specs, [kv_spec, kv_spec],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hp), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), "attention_jax_flash_tpu_dkdv",
      q_len, kv_len, *args)

  # dQ: one (b, query head n, query block i) accumulates over the key blocks j.
  bq, bk = blk.block_q_dq, blk.block_k_dq
  sp = _specs_q_major(cfg, bq, bk)
  in_specs = [sp["q"], sp["kv"], sp["kv"], sp["q"], sp["rows"], sp["rows"]]
  args = [q, k, v, d_out, lse, delta]
  if cfg.has_seg:
    in_specs += [sp["q_seg"], sp["kv_seg"]]
    args += [_seg_column(seg[0]), _seg_rows(seg[1])]
  dq = _call(
      cfg, _dq_kernel, (B, N, Tp // bq, cfg.Sp // bk), in_specs, sp["q"], jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((bq, hp), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, LANES), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flash_tpu_dq", q_len, kv_len, *args)
  return dq, dk, dv


# (out, lse) with a recomputing backward: saves q, k, v, aux, out and lse only.
_flash = flash_custom_vjp(_forward, _backward)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _resolve_interpret(interpret):
  """None: TPU interpret mode on CPU, compiled on TPU. True: interpret mode. Or a ``pltpu.InterpretParams``."""
  if interpret is None:
    backend = jax.default_backend()
    if backend == "tpu":
      return False
    if backend != "cpu":
      raise ValueError(f"the Mosaic TPU flash kernel runs on TPU (or interpreted on CPU); backend is {backend!r}. "
                       "Use implementation='pallas' on GPU or 'blockwise' anywhere")
    return pltpu.InterpretParams()
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def flash_tpu_core(inp: core.AttentionInputs, block_sizes: BlockSizes | None = None, interpret=None,
                   debug: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the kernels: ``(output [B,T,N,H], lse [B,N,T])`` (lse differentiable)."""
  if inp.bias is not None or inp.mask is not None:
    raise ValueError("the Pallas TPU flash kernel takes no dense bias/mask arrays (they would cost O(T x S) "
                     "memory); express masks with is_causal, local_window_size, sequence lengths or segment ids, "
                     "or use implementation='blockwise' / 'reference'")
  from attention_jax.blockwise import _static_float   # shared helper; blockwise is pure JAX and light
  B, T, N, H = inp.query.shape
  S, K = inp.key.shape[1:3]
  dtype = inp.query.dtype
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"the Pallas TPU flash kernel takes bfloat16, float16 or float32 inputs; got {dtype} "
                     f"({inp.shapes}); use implementation='blockwise' or 'reference'")
  kernel_dtype = jnp.float32 if dtype == jnp.float16 else dtype   # not a native TPU matmul type: upcast
  if T == 0 or S == 0:
    return jnp.zeros_like(inp.query), jnp.full((B, N, T), -jnp.inf, jnp.float32)
  blocks = BlockSizes.get_default(H, kernel_dtype) if block_sizes is None else block_sizes
  # Tiles no longer than the (padded) sequences, then the sequences padded to whole tiles.
  fit = lambda b, n: min(b, max(LANES, pl.next_power_of_2(n)))
  blocks = BlockSizes(fit(blocks.block_q, T), fit(blocks.block_k, S), fit(blocks.block_q_dkv, T),
                      fit(blocks.block_k_dkv, S), fit(blocks.block_q_dq, T), fit(blocks.block_k_dq, S))
  Tp = _round_up(T, max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
  Sp = _round_up(S, max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
  hp = _round_up(H, LANES)
  cfg = _Config(scale=_static_float("scale", inp.scale),
                soft_cap=_static_float("logits_soft_cap", inp.logits_soft_cap), is_causal=inp.is_causal,
                window=inp.window, T=T, S=S, Tp=Tp, Sp=Sp, hp=hp, groups=N // K,
                has_q_len=inp.q_lengths is not None, has_kv_len=inp.kv_lengths is not None,
                has_seg=inp.q_segment_ids is not None, blocks=blocks, interpret=_resolve_interpret(interpret),
                debug=debug)
  # [B, L, heads, H] -> [B, Lp, heads * Hp]: zero padding, then a free reshape.
  flat = lambda x, n: jnp.pad(x.astype(kernel_dtype), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, hp - H))
                              ).reshape(B, n, -1)
  q, k, v = flat(inp.query, Tp), flat(inp.key, Sp), flat(inp.value, Sp)
  length = lambda x, n: jnp.full((B,), n, jnp.int32) if x is None else jnp.clip(x, 0, n).astype(jnp.int32)
  seg = None
  if cfg.has_seg:
    pad_ids = lambda x, n, fill: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=fill)
    seg = (pad_ids(inp.q_segment_ids, Tp, -1), pad_ids(inp.kv_segment_ids, Sp, -2))
  out, lse = _flash(cfg, q, k, v, (length(inp.q_lengths, T), length(inp.kv_lengths, S), seg))
  return out.reshape(B, Tp, N, hp)[:, :T, :, :H].astype(dtype), lse[:, :, :T]


def flash_attention_tpu(query, key, value, *, scale=None, is_causal=False, query_seq_lengths=None,
                        key_value_seq_lengths=None, local_window_size=None, q_segment_ids=None, kv_segment_ids=None,
                        logits_soft_cap=None, block_sizes: BlockSizes | None = None, interpret=None,
                        return_residual: bool = False, debug: bool = False):
  """Flash attention (Pallas, Mosaic TPU lowering); semantics of :func:`attention_jax.dot_product_attention`.

  ``query [B, T, N, H]``, ``key/value [B, S, K, H]``, any T, S and H, ``N % K == 0``. ``block_sizes`` overrides
  :meth:`BlockSizes.get_default`; ``interpret=None`` interprets on CPU (TPU interpret mode) and compiles on TPU;
  ``interpret`` may also be a ``pltpu.InterpretParams``. ``return_residual`` adds the logsumexp ``[B, N, T]``.
  """
  inp = core.prepare_inputs(query, key, value, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap)
  out, lse = flash_tpu_core(inp, block_sizes, interpret, debug)
  return (out, lax.stop_gradient(lse)) if return_residual else out


def flash_attention_tpu_reference(query, key, value, *, scale=None, is_causal=False, query_seq_lengths=None,
                                  key_value_seq_lengths=None, local_window_size=None, q_segment_ids=None,
                                  kv_segment_ids=None, logits_soft_cap=None, block_sizes: BlockSizes | None = None,
                                  interpret=None, return_residual: bool = False, debug: bool = False):
  """The plain algorithm with :func:`flash_attention_tpu`'s signature (tiling arguments are ignored)."""
  del block_sizes, interpret, debug
  return core.reference_attention(query, key, value, scale=scale, is_causal=is_causal,
                                  query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                                  local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
                                  return_residual=return_residual)


def _dispatch(inp: core.AttentionInputs) -> tuple[jax.Array, jax.Array]:
  out, lse = flash_tpu_core(inp)
  return out, lax.stop_gradient(lse)


core.register_implementation("pallas_tpu", _dispatch)
