"""Flash attention as Pallas kernels for TPU (Mosaic lowering), forward and backward.

Layout: the wrapper zero-pads the query/key head dim and the value head dim each to a multiple of 128 (the TPU
lane width; ``Hp``, ``Hvp``) and sequences to whole blocks, then views ``[B, T, N, Hp]`` as ``[B, T, N*Hp]`` (a
free reshape). The tile of query block i and head n is then the rectangle ``[i*bq:(i+1)*bq, n*Hp:(n+1)*Hp]``:
aligned to the 8 x 128 TPU tiling, with no transpose to a head-major layout. Kernels see 2-D tiles only.

* forward: grid ``(B, N, query blocks, key blocks)``, the key axis sequential ("arbitrary"), the others
  parallel. A running max and sum (lane-replicated ``[bq, 128]``) and a float32 ``[bq, Hvp]`` accumulator live in
  VMEM scratch across the key steps (online softmax); the last step normalises and writes the output and the
  logsumexp. Rows with no visible key give zeros and a logsumexp of -inf.
* dK/dV: grid ``(B, K, key blocks, G, query blocks)``; the G query heads sharing a kv head and the query blocks
  are both sequential and accumulate into float32 VMEM scratch (GQA without repeating K/V). The tile is computed
  transposed, ``S^T = K Q^T`` of shape ``[bk, bq]``, so the per-query logsumexp and ``delta = rowsum(dO * O)``
  enter as lane-major rows.
* dQ: grid ``(B, N, query blocks, key blocks)``, key axis sequential, float32 scratch. Both backward kernels
  recompute P from the logsumexp; ``delta`` is computed by XLA.
* dense ``mask`` / ``bias`` arrays ``[B|1, N|1, T|1, S|1]`` are read tile by tile beside K. A size-1 (broadcast)
  batch or head axis is indexed at 0 and never materialised; a broadcast T (S) axis is stored sublane-
  (lane-) replicated as ``[8, S]`` rows (``[T, 128]`` columns), the tile layout TPU memory uses for such arrays
  anyway. Masks enter as bfloat16 0/1 (bool tiles are awkward in Mosaic), biases as float32 (bfloat16 biases stay
  bfloat16); every tile is widened to float32 in VMEM, and the dK/dV kernel transposes it with 32-bit transposes.
  The bias gradient has the bias's own shape: a fourth kernel, whose grid is the bias's tiles followed by the axes
  the bias broadcasts over (sequential), recomputes each tile's dS and sums it in a VMEM accumulator, so no
  ``B x N x T x S`` temporary exists; it is dropped (DCE) when nothing asks for the bias gradient.
* block skipping: key (query) blocks outside the causal / local-window band, past a per-example key length or
  wholly in query padding are skipped with ``pl.when``, and their index_map is clamped to a block that is needed
  anyway, so the pipeline issues no DMA for them either. Blocks that every row sees fully run without a mask
  (with a dense mask or bias, or segment ids or query lengths, every computed block runs masked).
* hidden positions never reach a query: in masked tiles the logits are selected (``where``) to -inf, P @ V uses
  ``where(isfinite(v), v, 0)`` plus a per-row count of visible non-finite values (turning those rows into NaN),
  and the backward selects P and dS and cleans q / k in the dK / dQ products. Fully visible tiles run unchanged.
* per-example lengths are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``) and read by the index maps and
  the kernels; segment ids enter lane- or sublane-replicated (``[bq, 128]`` columns, ``[8, bk]`` rows).
* statistics and accumulation in float32; float32 inputs use full-precision (fp32) matmuls; float16 inputs are
  computed as float32 (float16 is not a native TPU matmul type); float64 is refused (``core.UnsupportedError``).

``flash_attention_tpu_reference`` has the same signature and computes the same function plainly.
``interpret=None`` compiles the kernels on TPU and, on a CPU backend, runs them through Pallas's interpreter
(``interpret=True``, which has no side effects and so composes with ``jax.checkpoint``); pass
``interpret=pltpu.InterpretParams()`` for the TPU interpret mode, which simulates TPU memory and DMAs (stale VMEM
buffers, out-of-bounds checks) but carries IO effects that ``jax.checkpoint`` cannot differentiate.

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
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention_jax import _numerics, _tiling, core
from attention_jax.kernels._common import (F32_0, F32_1, KernelConfig, compiled_on, flash_custom_vjp,
                                           masks_every_block, needs_mask)

LANES = 128      # TPU vector register: 8 sublanes x 128 lanes (of 32-bit values)
SUBLANES = 8
_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile lengths of the forward, dK/dV and dQ kernels: powers of two, multiples of the 128-lane tiling.

  The bias-gradient kernel uses the dQ tiles.
  """
  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      b = getattr(self, f.name)
      if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < LANES or b & (b - 1):
        raise ValueError(f"BlockSizes.{f.name}={b!r} must be a power of two >= {LANES} (the TPU lane tiling)")

  @classmethod
  def get_default(cls, head_dim: int, dtype: Any = jnp.bfloat16) -> BlockSizes:
    """512-long tiles for 2-byte inputs with ``H <= 128``, 256 otherwise (VMEM grows with H and the dtype).

    Provisional and unmeasured (no TPU was available): 512 follows MaxText's splash-attention defaults; on TPU,
    ``experiments/bench_kernels.py --implementations=pallas_tpu`` is the place to re-tune them.
    """
    if _numerics.round_up(head_dim, LANES) <= 128 and jnp.dtype(dtype).itemsize <= 2:
      return cls()
    return cls(*(256,) * 6)


def check_block_sizes(block_sizes: BlockSizes | int | None) -> BlockSizes | None:
  """``None`` (per-call default), a ``BlockSizes``, or a plain int meaning that tile length everywhere."""
  if block_sizes is None or isinstance(block_sizes, BlockSizes):
    return block_sizes
  if isinstance(block_sizes, (int, np.integer)) and not isinstance(block_sizes, bool):
    try:
      return BlockSizes(*(int(block_sizes),) * len(_FIELDS))
    except ValueError:
      raise ValueError(f"block_sizes={block_sizes!r} must be a power of two >= {LANES} (the TPU lane tiling)"
                       ) from None
  raise ValueError(f"block_sizes must be a flash_tpu.BlockSizes, a power of two >= {LANES} or None; "
                   f"got {block_sizes!r}")


class _Dense(NamedTuple):
  """A dense mask or bias ``[B|1, N|1, T|1, S|1]``: which axes vary, and its dtype inside the kernels.

  In HBM it is ``[B|1, N|1, Tp | R, Sp | 128]``: a broadcast T axis is stored as ``R`` equal rows (R = the dtype's
  sublane tiling) and a broadcast S axis as 128 equal lanes, so every tile is aligned to the TPU tiling.
  """
  batch: bool
  heads: bool
  rows: bool       # varies along T
  cols: bool       # varies along S
  dtype: str

  @classmethod
  def of(cls, x: jax.Array | None, dtype) -> _Dense | None:
    return None if x is None else cls(*(d != 1 for d in x.shape), jnp.dtype(dtype).name)

  @property
  def sublanes(self) -> int:
    return SUBLANES * 4 // jnp.dtype(self.dtype).itemsize

  def block(self, bq: int, bk: int) -> tuple:
    return (None, None, bq if self.rows else self.sublanes, bk if self.cols else LANES)

  def index(self, b, n, i, j) -> tuple:
    """Block index of tile ``(b, n, i, j)``: 0 on the broadcast axes."""
    return (b if self.batch else 0, n if self.heads else 0, i if self.rows else 0, j if self.cols else 0)

  def layout(self, x: jax.Array, Tp: int, Sp: int) -> jax.Array:
    """The natural ``[B|1, N|1, T|1, S|1]`` array in its HBM layout (zero padding)."""
    x = x.astype(self.dtype)
    Db, Dn, Tx, Sx = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, Tp - Tx), (0, 0))) if self.rows else jnp.broadcast_to(
        x, (Db, Dn, self.sublanes, Sx))
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Sp - Sx))) if self.cols else jnp.broadcast_to(
        x, x.shape[:3] + (LANES,))

  def natural(self, x: jax.Array, T: int, S: int) -> jax.Array:
    """Inverse of :meth:`layout` (for the bias gradient)."""
    return x[:, :, :T if self.rows else 1, :S if self.cols else 1]


@dataclasses.dataclass(frozen=True)
class _Config(KernelConfig):
  """:class:`KernelConfig` (``mask`` / ``bias``: :class:`_Dense`; ``interpret``: False, True or a
  ``pltpu.InterpretParams``) and the padded head dims."""
  hp: int                # query/key head dim padded to a multiple of 128
  hvp: int               # value head dim padded to a multiple of 128


# ----------------------------------------------------------------------------------------------------------
# Block geometry (plain jnp on int32 scalars: runs in the index maps and in the kernels)
# ----------------------------------------------------------------------------------------------------------


def _blocks(cfg: _Config, range_fn, unmasked_fn, start, own: int, other: int, limits: dict, kv_len):
  """The blocks ``[lo, hi)`` along the other axis that a block ``[start, start + own)`` meets, and the fully
  visible sub-range ``[u_lo, u_hi)``."""
  band = dict(is_causal=cfg.is_causal, window=cfg.window)
  lo, hi = range_fn(start, own, other, **limits, **band)
  if masks_every_block(cfg):
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
  if not needs_mask(cfg):
    pl.when(run)(lambda: step(False))
    return
  if masks_every_block(cfg):
    pl.when(run)(lambda: step(True))
    return
  full = (idx >= u_lo) & (idx < u_hi)
  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))


# ----------------------------------------------------------------------------------------------------------
# Tile pieces shared by the kernels
# ----------------------------------------------------------------------------------------------------------


class _Extra(NamedTuple):
  """The optional input refs of a kernel, in their fixed order after the required ones."""
  seg: tuple | None      # (ids of the tile's row axis as [rows, 128] columns, of its column axis as [8, cols] rows)
  mask: Any
  bias: Any


def _split_refs(cfg: _Config, refs) -> tuple[_Extra, list]:
  """``refs`` after the required inputs -> (optional input refs, [outputs and scratch])."""
  it = iter(refs)
  seg = (next(it), next(it)) if cfg.has_seg else None
  mask = next(it) if cfg.mask is not None else None
  bias = next(it) if cfg.bias is not None else None
  return _Extra(seg, mask, bias), list(it)


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


def _finite(x):
  """Bool: finite entries of ``x`` (tested in float32, which every TPU generation has vector support for)."""
  return jnp.isfinite(x.astype(jnp.float32))


def _clean(x):
  """Non-finite entries replaced by 0 (a select: hidden garbage never meets a multiply)."""
  return jnp.where(_finite(x), x, jnp.zeros_like(x))


def _structure_mask(cfg: _Config, shape, seg, q0, k0, q_len, kv_len, q_axis: int):
  """Visibility of a tile from absolute positions and segment ids (None if nothing masks it)."""
  q_ids = kv_ids = None
  if cfg.has_seg:
    col_ids = jnp.tile(seg[0][...], (1, shape[1] // LANES))     # [rows, cols]
    row_ids = seg[1][:1, :]                                      # [1, cols]
    q_ids, kv_ids = (col_ids, row_ids) if q_axis == 0 else (row_ids, col_ids)
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = k0 + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  kv_limit = kv_len if (cfg.has_kv_len or cfg.Sp != cfg.S) else None
  mask = _tiling.position_mask(q_pos, k_pos, is_causal=cfg.is_causal, window=cfg.window, kv_limit=kv_limit,
                               q_limit=q_len if cfg.has_q_len else None)
  if cfg.has_seg:
    same = q_ids == kv_ids
    mask = same if mask is None else mask & same
  return mask


def _dense_tile(ref, d: _Dense, shape, q_axis: int):
  """The float32 tile of a dense mask/bias for a logits tile of ``shape`` whose query axis is ``q_axis``.

  The block read is always query-major (``[bq|R, bk|128]``); the transposed dK/dV tile transposes it (32-bit).
  """
  x = ref[...].astype(jnp.float32)
  rows, cols = shape
  if q_axis == 0:                                             # [bq, bk]
    if d.rows and d.cols:
      return x
    if d.rows:
      return _lanes(x, cols)                                  # [bq, 128] lane-replicated
    if d.cols:
      return jnp.broadcast_to(x[:1, :], shape)                # [R, bk] sublane-replicated
    return jnp.broadcast_to(_lanes(x[:1, :], cols), shape)    # [R, 128]: one value
  if d.rows and d.cols:                                       # [bk, bq]
    return x.T
  if d.rows:
    return jnp.broadcast_to(x.T[:1, :], shape)
  if d.cols:
    return _lanes(_column(x), cols)
  return jnp.broadcast_to(_lanes(x[:1, :], cols), shape)


def _masked_scores(cfg: _Config, s, tanh, extra: _Extra, q0, k0, q_len, kv_len, q_axis: int):
  """Bias added, hidden pairs selected to -inf: ``(s, visible, tanh)`` with ``tanh`` 0 on hidden pairs."""
  vis = _structure_mask(cfg, s.shape, extra.seg, q0, k0, q_len, kv_len, q_axis)
  if cfg.mask is not None:
    shown = _dense_tile(extra.mask, cfg.mask, s.shape, q_axis) > 0.5
    vis = shown if vis is None else vis & shown
  if cfg.bias is not None:
    bias = _dense_tile(extra.bias, cfg.bias, s.shape, q_axis)
    s = s + bias
    shown = jnp.logical_not(bias == -jnp.inf)    # not `!=`: Mosaic's float != is ordered (NaN != x is False)
    vis = shown if vis is None else vis & shown
  assert vis is not None, "a masked tile without a mask"
  s = jnp.where(vis, s, -jnp.inf)
  if tanh is not None:
    tanh = jnp.where(vis, tanh, 0.0)
  return s, vis, tanh


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
  extra, (o_ref, lse_ref, m_ref, l_ref, acc_ref, bad_ref) = _split_refs(cfg, refs)
  bq, bk, hvp = cfg.blocks.block_q, cfg.blocks.block_k, cfg.hvp
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.float32)

  def step(masked: bool):
    s, _ = _logits(cfg, q_ref[...], k_ref[...])                  # [bq, bk]
    v = v_ref[...]
    if masked:
      s, vis, _ = _masked_scores(cfg, s, None, extra, i * bq, j * bk, q_len, kv_len, q_axis=0)
      # P @ V multiplies only finite values; rows that see a non-finite value are counted and become NaN.
      v_bad = jnp.logical_not(_finite(v))                                          # [bk, Hvp]
      v = jnp.where(v_bad, jnp.zeros_like(v), v)
      bad_keys = jnp.max(jnp.where(v_bad, F32_1, F32_0), axis=1, keepdims=True)    # [bk, 1]
      bad_ref[...] += _dot(jnp.where(vis, F32_1, F32_0).astype(jnp.bfloat16),      # exact 0/1 counts
                           jnp.broadcast_to(bad_keys, (bk, LANES)).astype(jnp.bfloat16))
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))   # [bq, 128]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)               # rows that have seen no key yet
    p = jnp.exp(s - _lanes(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _lanes(alpha, hvp) + _dot(p.astype(v.dtype), v)

  _run_blocks(cfg, j, *_kv_blocks(cfg, i, bq, bk, q_len, kv_len), step)

  @pl.when(j == cfg.Sp // bk - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0                       # no visible key (a NaN sum is not empty: it propagates)
    l_safe = jnp.where(empty, 1.0, l)
    out = acc_ref[...] * _lanes(1.0 / l_safe, hvp)
    out = jnp.where(_lanes(bad_ref[...], hvp) > 0.0, jnp.nan, out)
    o_ref[...] = out.astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))    # [bq, 128], equal lanes
    lse_ref[...] = lse.T[:SUBLANES, :]                                 # [8, bq], equal sublanes


def _rows(x_BNT, B: int, N: int):
  """``[B, N, T]`` -> sublane-replicated ``[B, N, 8, T]`` (the layout of per-query statistics in HBM)."""
  return jnp.broadcast_to(x_BNT[:, :, None, :], (B, N, SUBLANES, x_BNT.shape[-1]))


def _seg_column(ids_BL):
  return jnp.broadcast_to(ids_BL[:, :, None], (*ids_BL.shape, LANES))


def _seg_rows(ids_BL):
  return jnp.broadcast_to(ids_BL[:, None, :], (ids_BL.shape[0], SUBLANES, ids_BL.shape[1]))


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, name, *args, **kw):
  # Interpret mode gets no dimension semantics: they only matter there when simulating several cores, and jax's
  # TPU interpreter does not extend them to the grid axes that jax.vmap prepends (Mosaic lowering does).
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=None if cfg.interpret else semantics),
      interpret=cfg.interpret, debug=cfg.debug, name=name,
  )(*args)


class _Operands(NamedTuple):
  """The optional kernel inputs in their HBM layouts (None when absent)."""
  q_seg: jax.Array | None     # [B, Tp] padded ids
  kv_seg: jax.Array | None    # [B, Sp]
  mask: jax.Array | None      # _Dense layout
  bias: jax.Array | None


def _on_tile(tile, fn):
  """An index map: ``fn(b, n, i, j)`` of the tile ``tile(*grid_ids, *prefetch_refs)`` that a grid step reads."""
  return lambda *a: fn(*tile(*a))


def _extra_inputs(cfg: _Config, ops: _Operands, tile, bq: int, bk: int, transposed: bool = False):
  """BlockSpecs and arrays of the optional inputs for a grid whose step reads tile ``tile(*ids, *lens) -> (b, n,
  i, j)`` (query block i, key block j). ``transposed``: the kernel's tile is ``[bk, bq]`` (ids swap layouts)."""
  specs, args = [], []
  if cfg.has_seg:
    q_col = pl.BlockSpec((None, bq, LANES), _on_tile(tile, lambda b, n, i, j: (b, i, 0)))
    kv_row = pl.BlockSpec((None, SUBLANES, bk), _on_tile(tile, lambda b, n, i, j: (b, 0, j)))
    kv_col = pl.BlockSpec((None, bk, LANES), _on_tile(tile, lambda b, n, i, j: (b, j, 0)))
    q_row = pl.BlockSpec((None, SUBLANES, bq), _on_tile(tile, lambda b, n, i, j: (b, 0, i)))
    if transposed:
      specs += [kv_col, q_row]
      args += [_seg_column(ops.kv_seg), _seg_rows(ops.q_seg)]
    else:
      specs += [q_col, kv_row]
      args += [_seg_column(ops.q_seg), _seg_rows(ops.kv_seg)]
  for d, x in ((cfg.mask, ops.mask), (cfg.bias, ops.bias)):
    if d is not None:
      specs.append(pl.BlockSpec(d.block(bq, bk), _on_tile(tile, d.index)))
      args.append(x)
  return specs, args


def _specs_q_major(cfg: _Config, bq: int, bk: int):
  """BlockSpecs of a grid ``(b, n, query block i, key block j)`` (forward and dQ); key blocks clamped."""
  G, hp, hvp, nk = cfg.groups, cfg.hp, cfg.hvp, cfg.Sp // bk

  def kv_block(b, i, j, q_len_ref, kv_len_ref):
    lo, hi, _, _ = _kv_blocks(cfg, i, bq, bk, q_len_ref[b], kv_len_ref[b])
    return _clamp(j, lo, hi, nk)

  kv_head = lambda n: _tiling.floordiv(n, G)
  return dict(
      q=pl.BlockSpec((None, bq, hp), lambda b, n, i, j, *_: (b, i, n)),
      o=pl.BlockSpec((None, bq, hvp), lambda b, n, i, j, *_: (b, i, n)),
      k=pl.BlockSpec((None, bk, hp), lambda b, n, i, j, *lens: (b, kv_block(b, i, j, *lens), kv_head(n))),
      v=pl.BlockSpec((None, bk, hvp), lambda b, n, i, j, *lens: (b, kv_block(b, i, j, *lens), kv_head(n))),
      rows=pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, j, *_: (b, n, 0, i)),
      tile=lambda b, n, i, j, *lens: (b, n, i, kv_block(b, i, j, *lens)),
  )


def _operands(cfg: _Config, q_seg, kv_seg, mask, bias) -> _Operands:
  layout = lambda d, x: None if d is None else d.layout(x, cfg.Tp, cfg.Sp)
  return _Operands(q_seg, kv_seg, layout(cfg.mask, mask), layout(cfg.bias, bias))


def _forward(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask):
  B, Tp, _ = q.shape
  N = q.shape[2] // cfg.hp
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  sp = _specs_q_major(cfg, bq, bk)
  extra_specs, extra_args = _extra_inputs(cfg, _operands(cfg, q_seg, kv_seg, mask, bias), sp["tile"], bq, bk)
  out, lse = _call(
      cfg, _fwd_kernel, (B, N, Tp // bq, cfg.Sp // bk), [sp["q"], sp["k"], sp["v"], *extra_specs],
      [sp["o"], sp["rows"]],
      [jax.ShapeDtypeStruct((B, Tp, N * cfg.hvp), q.dtype), jax.ShapeDtypeStruct((B, N, SUBLANES, Tp), jnp.float32)],
      [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, cfg.hvp), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flash_tpu_fwd", q_len, kv_len, q, k, v,
      *extra_args)
  return out, lse[:, :, 0, :]


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dkdv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  extra, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_refs(cfg, refs)
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
    dp_t = _dot(v, do, trans_b=True)
    lse, delta = lse_ref[:1, :], delta_ref[:1, :]                  # [1, bq]
    if masked:
      s_t, vis, tanh = _masked_scores(cfg, s_t, tanh, extra, i * bq, j * bk, q_len, kv_len, q_axis=1)
      # Selects: a NaN logsumexp/delta (a row that sees a NaN) or a hidden NaN v never reaches a hidden pair.
      p_t = jnp.where(vis, jnp.exp(s_t - lse), 0.0)
      ds_t = jnp.where(vis, p_t * (dp_t - delta), 0.0)
      q = _clean(q)                      # a hidden query row may hold garbage: 0 * NaN must not happen
    else:
      p_t = jnp.exp(s_t - lse)
      ds_t = p_t * (dp_t - delta)
    dv_acc[...] += _dot(p_t.astype(do.dtype), do)
    if tanh is not None:
      ds_t = ds_t * (1.0 - tanh * tanh)
    dk_acc[...] += _dot((ds_t * cfg.scale).astype(q.dtype), q)

  _run_blocks(cfg, i, *_q_blocks(cfg, j, bk, bq, q_len, kv_len), step)

  @pl.when((g == cfg.groups - 1) & (i == cfg.Tp // bq - 1))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  extra, (dq_ref, dq_acc, lse_col, delta_col) = _split_refs(cfg, refs)
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
    dp = _dot(do, v, trans_b=True)
    lse, delta = _lanes(lse_col[...], bk), _lanes(delta_col[...], bk)
    if masked:
      s, vis, tanh = _masked_scores(cfg, s, tanh, extra, i * bq, j * bk, q_len, kv_len, q_axis=0)
      p = jnp.where(vis, jnp.exp(s - lse), 0.0)
      ds = jnp.where(vis, p * (dp - delta), 0.0)
      k = _clean(k)
    else:
      ds = jnp.exp(s - lse) * (dp - delta)
    if tanh is not None:
      ds = ds * (1.0 - tanh * tanh)
    dq_acc[...] += _dot((ds * cfg.scale).astype(k.dtype), k)

  _run_blocks(cfg, j, *_kv_blocks(cfg, i, bq, bk, q_len, kv_len), step)

  @pl.when(j == cfg.Sp // bk - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _dbias_axes(cfg: _Config, B: int, N: int, nq: int, nk: int) -> tuple[tuple[str, bool, int], ...]:
  """Grid of the bias-gradient kernel: ``(name, is_reduction, extent)``. The bias's own tiles first (parallel),
  then the axes it broadcasts over (sequential, summed in VMEM); axes of extent 1 are left out."""
  d = cfg.bias
  extents = dict(b=B, n=N, i=nq, j=nk)
  varies = dict(b=d.batch, n=d.heads, i=d.rows, j=d.cols)
  axes = [(a, False, extents[a]) for a in "bnij" if varies[a] and extents[a] > 1]
  reductions = [(a, True, extents[a]) for a in "bnij" if not varies[a] and extents[a] > 1]
  return tuple(axes + (reductions or [("r", True, 1)]))   # "r": a dummy sequential axis


def _dbias_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config,
                  axes):
  extra, (db_ref, acc_ref) = _split_refs(cfg, refs)
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  ids = [pl.program_id(a) for a in range(len(axes))]
  pos = {name: idx for (name, _, _), idx in zip(axes, ids)}
  b, i, j = pos.get("b", 0), pos.get("i", 0), pos.get("j", 0)
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]
  reductions = [(idx, extent) for (_, red, extent), idx in zip(axes, ids) if red]
  first = functools.reduce(jnp.logical_and, [idx == 0 for idx, _ in reductions])
  last = functools.reduce(jnp.logical_and, [idx == extent - 1 for idx, extent in reductions])

  @pl.when(first)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  lo, hi, _, _ = _kv_blocks(cfg, i, bq, bk, q_len, kv_len)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    s, _ = _logits(cfg, q_ref[...], k_ref[...])                   # [bq, bk]
    s, vis, _ = _masked_scores(cfg, s, None, extra, i * bq, j * bk, q_len, kv_len, q_axis=0)
    p = jnp.where(vis, jnp.exp(s - _lanes(_column(lse_ref[...]), bk)), 0.0)
    dp = _dot(do_ref[...], v_ref[...], trans_b=True)
    ds = jnp.where(vis, p * (dp - _lanes(_column(delta_ref[...]), bk)), 0.0)   # d logits, before the soft-cap
    d = cfg.bias
    if not d.cols:
      ds = jnp.sum(ds, axis=1, keepdims=True)                                   # [bq, 1]
    if not d.rows:
      ds = jnp.sum(ds, axis=0, keepdims=True)                                   # [1, bk | 1]
    acc_ref[...] += jnp.broadcast_to(ds, acc_ref.shape)

  @pl.when(last)
  def _finish():
    db_ref[...] = acc_ref[...]


def _dbias(cfg: _Config, q, k, v, d_out, lse, delta, q_len, kv_len, ops: _Operands, B: int, N: int):
  """The bias gradient in the bias's own (broadcast) shape, float32."""
  G, hp, hvp = cfg.groups, cfg.hp, cfg.hvp
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  nq, nk = cfg.Tp // bq, cfg.Sp // bk
  axes = _dbias_axes(cfg, B, N, nq, nk)
  out_d = cfg.bias._replace(dtype="float32")

  def step(*args):
    """(b, n, i, j) of a grid step."""
    pos = {name: idx for (name, _, _), idx in zip(axes, args[:len(axes)])}
    return tuple(pos.get(a, 0) for a in "bnij")

  def tile(*args):
    """:func:`step` with the key block clamped to the blocks query block i sees (no DMA for skipped steps)."""
    b, n, i, j = step(*args)
    q_len_ref, kv_len_ref = args[len(axes):]
    lo, hi, _, _ = _kv_blocks(cfg, i, bq, bk, q_len_ref[b], kv_len_ref[b])
    return b, n, i, _clamp(j, lo, hi, nk)

  rows = pl.BlockSpec((None, None, SUBLANES, bq), _on_tile(tile, lambda b, n, i, j: (b, n, 0, i)))
  in_specs = [
      pl.BlockSpec((None, bq, hp), _on_tile(tile, lambda b, n, i, j: (b, i, n))),
      pl.BlockSpec((None, bk, hp), _on_tile(tile, lambda b, n, i, j: (b, j, _tiling.floordiv(n, G)))),
      pl.BlockSpec((None, bk, hvp), _on_tile(tile, lambda b, n, i, j: (b, j, _tiling.floordiv(n, G)))),
      pl.BlockSpec((None, bq, hvp), _on_tile(tile, lambda b, n, i, j: (b, i, n))),
      rows, rows,
  ]
  extra_specs, extra_args = _extra_inputs(cfg, ops, tile, bq, bk)
  out_spec = pl.BlockSpec(out_d.block(bq, bk), _on_tile(step, out_d.index))
  out_shape = (B if out_d.batch else 1, N if out_d.heads else 1, cfg.Tp if out_d.rows else out_d.sublanes,
               cfg.Sp if out_d.cols else LANES)
  scratch_shape = tuple(s for s in out_d.block(bq, bk) if s is not None)
  dbias = _call(
      cfg, _dbias_kernel, tuple(extent for _, _, extent in axes), in_specs + extra_specs, out_spec,
      jax.ShapeDtypeStruct(out_shape, jnp.float32), [pltpu.VMEM(scratch_shape, jnp.float32)],
      tuple("arbitrary" if red else "parallel" for _, red, _ in axes), "attention_jax_flash_tpu_dbias",
      q_len, kv_len, q, k, v, d_out, lse, delta, *extra_args, axes=axes)
  return out_d.natural(dbias, cfg.T, cfg.S)


def _backward(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, mask, out, lse, d_out, d_lse):
  B, Tp, _ = q.shape
  hp, hvp, G = cfg.hp, cfg.hvp, cfg.groups
  N, K = q.shape[2] // hp, k.shape[2] // hp
  heads = lambda x: x.reshape(B, Tp, N, hvp)
  delta = _rows(_numerics.backward_delta(heads(out), heads(d_out), d_lse, jnp.float32), B, N)
  lse = _rows(lse, B, N)          # finite: rows with no key hold 0 (their logits are all -inf, so P = 0)
  ops = _operands(cfg, q_seg, kv_seg, mask, bias)
  blk = cfg.blocks

  # dK, dV: one (b, kv head h, key block j) accumulates over the G query heads g and the query blocks i.
  bq, bk = blk.block_q_dkv, blk.block_k_dkv
  nq = Tp // bq

  def q_block(b, j, i, q_len_ref, kv_len_ref):
    lo, hi, _, _ = _q_blocks(cfg, j, bk, bq, q_len_ref[b], kv_len_ref[b])
    return _clamp(i, lo, hi, nq)

  q_spec = pl.BlockSpec((None, bq, hp), lambda b, h, j, g, i, *lens: (b, q_block(b, j, i, *lens), h * G + g))
  do_spec = pl.BlockSpec((None, bq, hvp), lambda b, h, j, g, i, *lens: (b, q_block(b, j, i, *lens), h * G + g))
  k_spec = pl.BlockSpec((None, bk, hp), lambda b, h, j, g, i, *_: (b, j, h))
  v_spec = pl.BlockSpec((None, bk, hvp), lambda b, h, j, g, i, *_: (b, j, h))
  rows_spec = pl.BlockSpec((None, None, SUBLANES, bq),
                           lambda b, h, j, g, i, *lens: (b, h * G + g, 0, q_block(b, j, i, *lens)))
  tile = lambda b, h, j, g, i, *lens: (b, h * G + g, q_block(b, j, i, *lens), j)
  extra_specs, extra_args = _extra_inputs(cfg, ops, tile, bq, bk, transposed=True)
  dk, dv = _call(
      cfg, _dkdv_kernel, (B, K, cfg.Sp // bk, G, nq),
      [q_spec, k_spec, v_spec, do_spec, rows_spec, rows_spec, *extra_specs], [k_spec, v_spec],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hvp), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), "attention_jax_flash_tpu_dkdv",
      q_len, kv_len, q, k, v, d_out, lse, delta, *extra_args)

  # dQ: one (b, query head n, query block i) accumulates over the key blocks j.
  bq, bk = blk.block_q_dq, blk.block_k_dq
  sp = _specs_q_major(cfg, bq, bk)
  extra_specs, extra_args = _extra_inputs(cfg, ops, sp["tile"], bq, bk)
  dq = _call(
      cfg, _dq_kernel, (B, N, Tp // bq, cfg.Sp // bk),
      [sp["q"], sp["k"], sp["v"], sp["o"], sp["rows"], sp["rows"], *extra_specs], sp["q"],
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((bq, hp), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, LANES), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flash_tpu_dq", q_len, kv_len, q, k, v,
      d_out, lse, delta, *extra_args)

  dbias = None
  if bias is not None:
    dbias = _dbias(cfg, q, k, v, d_out, lse, delta, q_len, kv_len, ops, B, N).astype(bias.dtype)
  return dq, dk, dv, dbias


# (out, lse) with a recomputing backward: saves q, k, v, the bias, aux, out and a finite lse only. Forward and
# backward raise a clear NotImplementedError if differentiated again.
_flash = flash_custom_vjp(_forward, _backward, with_bias=True, finite_residuals=True)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_interpret(interpret):
  """None, a bool, or a ``pltpu.InterpretParams`` (the TPU interpret mode); anything else is a ``ValueError``."""
  if interpret is None or isinstance(interpret, pltpu.InterpretParams):
    return interpret
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret)
  raise ValueError(f"interpret must be None, a bool or a pltpu.InterpretParams; got {interpret!r}")


def _resolve_interpret(interpret):
  """None: compiled on TPU, Pallas's interpreter (``True``) on CPU. A ``pltpu.InterpretParams`` selects the TPU
  interpret mode. ``core.UnsupportedError`` on other backends."""
  interpret = _check_interpret(interpret)
  return compiled_on("tpu", "the Mosaic TPU flash kernel") if interpret is None else interpret


_PATH = "the Pallas TPU flash kernel"


_KERNEL_DTYPES = {jnp.dtype(jnp.bfloat16): jnp.bfloat16, jnp.dtype(jnp.float32): jnp.float32,
                  jnp.dtype(jnp.float16): jnp.float32}   # float16 is not a native TPU matmul type: upcast


def _check_supported(inp: core.AttentionInputs):
  """The kernels' input dtype; ``core.UnsupportedError`` for calls they cannot take."""
  dtype = jnp.dtype(inp.query.dtype)
  if dtype == jnp.float64:
    raise core.UnsupportedError(
        f"the Pallas TPU flash kernel computes in float32 and cannot keep float64 inputs in float64 ({inp.shapes}); "
        "use implementation='blockwise' or 'reference'")
  if dtype not in _KERNEL_DTYPES:
    raise core.UnsupportedError(f"the Pallas TPU flash kernel takes bfloat16, float16 or float32 inputs; got "
                                f"{dtype} ({inp.shapes}); use implementation='blockwise' or 'reference'")
  return _KERNEL_DTYPES[dtype]


def flash_tpu_core(inp: core.AttentionInputs, block_sizes: BlockSizes | int | None = None, interpret=None,
                   debug: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs validated inputs through the kernels: ``(output [B,T,N,Hv], lse [B,N,T] float32, -inf on rows with no
  key)``, differentiable (also with respect to the bias). ``core.UnsupportedError`` for what they cannot take."""
  kernel_dtype = _check_supported(inp)
  B, T, N, H = inp.query.shape
  S, K, Hv = inp.value.shape[1:]
  dtype = inp.query.dtype
  if 0 in (B, T, N, S, Hv):
    return jnp.zeros((B, T, N, Hv), dtype), jnp.full((B, N, T), -jnp.inf, jnp.float32)
  blocks = check_block_sizes(block_sizes) or BlockSizes.get_default(max(H, Hv), kernel_dtype)
  # Tiles no longer than the (padded) sequences, then the sequences padded to whole tiles.
  fit = lambda b, n: min(b, max(LANES, pl.next_power_of_2(n)))
  blocks = BlockSizes(fit(blocks.block_q, T), fit(blocks.block_k, S), fit(blocks.block_q_dkv, T),
                      fit(blocks.block_k_dkv, S), fit(blocks.block_q_dq, T), fit(blocks.block_k_dq, S))
  Tp = _numerics.round_up(T, max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
  Sp = _numerics.round_up(S, max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
  hp, hvp = _numerics.round_up(H, LANES), _numerics.round_up(Hv, LANES)
  bias = None
  if inp.bias is not None:   # float32 in the kernels (a bfloat16 bias stays bfloat16)
    bias = inp.bias.astype(jnp.bfloat16 if inp.bias.dtype == jnp.bfloat16 else jnp.float32)
  cfg = _Config.of(inp, path=_PATH, Tp=Tp, Sp=Sp, hp=hp, hvp=hvp, mask=_Dense.of(inp.mask, jnp.bfloat16),
                   bias=_Dense.of(bias, None if bias is None else bias.dtype), blocks=blocks,
                   interpret=_resolve_interpret(interpret), debug=debug)
  # [B, L, heads, H] -> [B, Lp, heads * Hp]: zero padding, then a free reshape.
  flat = lambda x, n, h: jnp.pad(x.astype(kernel_dtype), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, h - x.shape[3]))
                                 ).reshape(B, n, -1)
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  q, k = flat(_numerics.nan_rows(inp.query), Tp, hp), flat(_numerics.nan_rows(inp.key), Sp, hp)
  v = flat(inp.value, Sp, hvp)
  length = lambda x, n: jnp.full((B,), n, jnp.int32) if x is None else jnp.clip(x, 0, n).astype(jnp.int32)
  pad_ids = lambda x, n, fill: None if x is None else jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=fill)
  aux = (length(inp.q_lengths, T), length(inp.kv_lengths, S), pad_ids(inp.q_segment_ids, Tp, -1),
         pad_ids(inp.kv_segment_ids, Sp, -2), inp.mask)
  out, lse = _flash(cfg, q, k, v, bias, aux)
  return out.reshape(B, Tp, N, hvp)[:, :T, :, :Hv].astype(dtype), lse[:, :, :T]


flash_attention_tpu = core.implementation_function(
    flash_tpu_core, name="flash_attention_tpu", module=__name__,
    options={"block_sizes": core.Option(None, check_block_sizes), "interpret": core.Option(None, _check_interpret),
             "debug": core.Option(False, bool)},
    doc="""Flash attention (Pallas, Mosaic TPU lowering); semantics of :func:`attention_jax.dot_product_attention`.

  ``query [*B, T, N, H]``, ``key [*B, S, K, H]``, ``value [*B, S, K, Hv]``, any T, S, H and Hv, ``N % K == 0``;
  dense ``bias`` / ``mask`` arrays broadcastable to ``[*B, N, T, S]`` (differentiable bias). ``block_sizes``
  overrides :meth:`BlockSizes.get_default` (a plain int: that tile length everywhere). ``interpret=None`` compiles
  on TPU and interprets on CPU (``interpret=True``: Pallas's interpreter; ``pltpu.InterpretParams()``: the TPU
  interpret mode, which ``jax.checkpoint`` cannot differentiate). ``return_residual=True`` also returns the
  logsumexp ``[*B, T, N]`` as ``jax.nn`` does. float64 raises ``core.UnsupportedError``.
  """)
flash_attention_tpu_reference = core.reference_function(flash_attention_tpu, module=__name__)
