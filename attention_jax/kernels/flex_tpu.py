"""``flex_attention`` as Pallas kernels for TPU (Mosaic lowering): ``implementation="pallas_tpu"``.

The tiles are the :class:`~attention_jax.flex.BlockMask`'s blocks (``bq x bk``). Layout as in
:mod:`attention_jax.kernels.flash_tpu`: head dims zero-padded to multiples of 128 (``Hp``, ``Hvp``), sequences to
whole blocks, ``[B, T, N, Hp]`` viewed as ``[B, Tp, N*Hp]``; per-query statistics stored as sublane-replicated
rows ``[B, N, 8, Tp]``.

* block lists: the BlockMask's counts and indices (int32, flattened) are scalar-prefetched into SMEM
  (``PrefetchScalarGridSpec``). One grid axis walks ``L`` list entries (``L`` = the number of blocks along the
  other sequence): entry ``t < full_count`` is full-list entry ``t`` (computed without ``mask_mod``), entry
  ``full_count <= t < full_count + partial_count`` is partial-list entry ``t - full_count`` (``mask_mod`` and the
  bounds ``q < T``, ``kv < S`` evaluated in the tile), later entries are skipped with ``pl.when``. The K/V (or, in
  the dK/dV pass, Q/dO) index maps return the block the entry lists; skipped entries repeat the last listed block,
  so the pipeline issues no DMA for them. Only listed blocks are ever read.
* forward: grid ``(B, N, query blocks, L)``; online softmax in float32 VMEM scratch, output and logsumexp written
  at the last entry (rows with no visible key: zeros and -inf).
* dK/dV: grid ``(B, K, key blocks, G * L)`` over the transposed lists (per query head ``n = h*G + g``), the tile
  computed transposed (``[bk, bq]``). The gradients of floating-point arrays the ``score_mod`` closes over are
  ``jax.vjp`` of the tile's ``score_mod`` with respect to (logits, arrays), accumulated per (batch, kv head, key
  block) into a float32 output ``[B, K, nk, *shape]`` that XLA sums. Integer arrays get no gradient.
* dQ: grid ``(B, N, query blocks, L)`` over the kv lists. Both backward kernels recompute P from the logsumexp;
  ``delta = rowsum(dO * O) - d_lse`` is computed by XLA.
* mods: ``score_mod`` gets the real ``(b, n)``; ``mask_mod`` gets ``(b, n)`` where the block mask varies along
  that axis and 0 where it is broadcast (as ``create_block_mask`` evaluates it). The arrays they close over enter
  as whole-array VMEM blocks (0-d arrays as ``[1]``, bools as int32, 64-bit arrays narrowed to 32 bits).
* hidden positions never reach a query: in partial tiles the logits are selected to -inf (the ``score_mod`` sees
  0 at hidden pairs), P @ V uses ``where(isfinite(v), v, 0)`` plus a per-row flag that turns rows seeing a
  non-finite value into NaN, and the backward selects P and dS and cleans q / k in the dK / dQ products.

Limits: float64 inputs, a traced scale and (when compiling) blocks that are not multiples of 128 raise
``core.UnsupportedError`` (dispatch then moves on to "blockwise"): the query block lies on lanes in the dK/dV
tile and in the logsumexp rows, the key block in the forward tile. The mods are traced into the kernel bodies as
vmapped scalar code. Arithmetic on the indices (causal, windows, ALiBi with slopes computed from ``n``) lowers to
Mosaic; a mod that indexes a captured array (``slopes[n]``, document ids ``doc[b, q_idx]``, a relative bias table)
becomes a dynamic slice or gather, which Mosaic does not lower. When compiling, the kernels are therefore first
lowered for one block, and such mods raise ``UnsupportedError`` (compiled TPU runs fall through to "blockwise");
they run in interpret mode. The kernels were developed with Pallas's interpreter on CPU (``interpret=True``,
chosen automatically there) and checked to lower to Mosaic, but have not been run on a TPU. The block lists live in
SMEM: ``Bm * Nm * nq * nk`` int32 entries per list.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention_jax import _numerics, _tiling, flex
from attention_jax._checks import UnsupportedError
from attention_jax.kernels._common import F32_0, F32_1, flash_custom_vjp
from attention_jax.kernels.flash_tpu import LANES, SUBLANES, _clean, _column, _dot, _finite, _resolve_interpret, _rows

_PATH = "flex_attention's Pallas TPU kernel"
_KERNEL_DTYPES = {jnp.dtype(jnp.bfloat16): jnp.bfloat16, jnp.dtype(jnp.float32): jnp.float32,
                  jnp.dtype(jnp.float16): jnp.float32}   # float16 is not a native TPU matmul type: upcast


class _Const(NamedTuple):
  """How a captured array is stored for the kernels and restored inside them."""
  shape: tuple[int, ...]
  is_bool: bool


class _Cfg(NamedTuple):
  """Static configuration of one call (hashable)."""
  scale: float
  T: int
  S: int
  bq: int
  bk: int
  nq: int
  nk: int
  Bm: int
  Nm: int
  G: int
  hp: int
  hvp: int
  score_fn: Callable | None
  mask_fn: Callable | None
  sc: tuple[_Const, ...]         # score_mod arrays, in order
  float_sc: tuple[int, ...]      # positions of the floating-point ones (differentiable)
  mc: tuple[_Const, ...]         # mask_mod arrays
  interpret: Any


# ----------------------------------------------------------------------------------------------------------
# Block lists (scalar code: runs in the index maps and in the kernels)
# ----------------------------------------------------------------------------------------------------------


def _entry(cfg: _Cfg, lists, b, n, blk, t, n_blocks: int, length: int):
  """``(block, full, partial)`` of list entry ``t`` of block ``blk`` for (batch ``b``, query head ``n``).

  ``lists`` are the refs ``(full counts, full indices, partial counts, partial indices)``, flattened from
  ``[Bm, Nm, n_blocks]`` and ``[Bm, Nm, n_blocks, length]``. Entries ``t < full_count`` are full, the next
  ``partial_count`` partial; past them the last listed block is returned again (no new DMA).
  """
  fn_ref, fi_ref, pn_ref, pi_ref = lists
  row = ((b if cfg.Bm > 1 else 0) * cfg.Nm + (n if cfg.Nm > 1 else 0)) * n_blocks + blk
  fc, pc = fn_ref[row], pn_ref[row]
  base = row * length
  full_j = fi_ref[base + t]
  part_j = pi_ref[base + jnp.minimum(jnp.maximum(t - fc, 0), length - 1)]
  last_full = fi_ref[base + length - 1]        # the padding repeats the last full block (0 when none)
  block = jnp.where(t < fc, full_j, jnp.where(pc > 0, part_j, last_full))
  return block, t < fc, (t >= fc) & (t < fc + pc)


def _flat_lists(bm: flex.BlockMask, transposed: bool) -> tuple[jax.Array, ...]:
  """``(full counts, full indices, partial counts, partial indices)`` as flat int32 arrays (SMEM)."""
  if transposed:
    ls = (bm.full_q_num_blocks, bm.full_q_indices, bm.q_num_blocks, bm.q_indices)
  else:
    ls = (bm.full_kv_num_blocks, bm.full_kv_indices, bm.kv_num_blocks, bm.kv_indices)
  return tuple(jnp.asarray(x, jnp.int32).reshape(-1) for x in ls)


# ----------------------------------------------------------------------------------------------------------
# Tile pieces
# ----------------------------------------------------------------------------------------------------------


def _read(refs, metas: tuple[_Const, ...]) -> list:
  return [r[...].reshape(m.shape) != 0 if m.is_bool else r[...].reshape(m.shape) for r, m in zip(refs, metas)]


def _with_floats(cfg: _Cfg, sc: list, floats) -> list:
  sc = list(sc)
  for pos, val in zip(cfg.float_sc, floats):
    sc[pos] = val
  return sc


def _swap_score(fn):
  return lambda s, b, n, kv_idx, q_idx, *c: fn(s, b, n, q_idx, kv_idx, *c)


def _swap_mask(fn):
  return lambda b, n, kv_idx, q_idx, *c: fn(b, n, q_idx, kv_idx, *c)


def _visible(cfg: _Cfg, mc, b, n, rows, cols, transposed: bool):
  """Bool visibility of a partial tile: bounds and ``mask_mod``. ``rows`` / ``cols`` index the tile's axes
  (queries x keys, or keys x queries when ``transposed``)."""
  q_idx, kv_idx = (cols, rows) if transposed else (rows, cols)
  mb, mn = (b if cfg.Bm > 1 else 0), (n if cfg.Nm > 1 else 0)
  q_ok, kv_ok = q_idx < cfg.T, kv_idx < cfg.S
  vis = (kv_ok[:, None] & q_ok[None, :]) if transposed else (q_ok[:, None] & kv_ok[None, :])
  if cfg.mask_fn is not None:
    fn = _swap_mask(cfg.mask_fn) if transposed else cfg.mask_fn
    vis = vis & flex.tile_mask(fn, mc, mb, mn, rows, cols)
  return vis


def _scores(cfg: _Cfg, sc, raw, b, n, rows, cols, transposed: bool):
  """``score_mod`` on a tile of scaled logits (identity without one)."""
  if cfg.score_fn is None:
    return raw
  fn = _swap_score(cfg.score_fn) if transposed else cfg.score_fn
  return flex.tile_scores(fn, sc, raw, b, n, rows, cols)


def _iota(start, size: int):
  return start + lax.iota(jnp.int32, size)


def _divmod(u, m: int):
  """``(u // m, u % m)`` of a non-negative int32 grid index (truncating ``lax`` ops, lowerable everywhere)."""
  u = jnp.asarray(u, jnp.int32)
  return lax.div(u, jnp.int32(m)), lax.rem(u, jnp.int32(m))


def _col(x_R128):
  """A lane-replicated ``[R, 128]`` statistic as ``[R, 1]`` (broadcasts against any tile width)."""
  return x_R128[:, :1]


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(fn_ref, fi_ref, pn_ref, pi_ref, q_ref, k_ref, v_ref, *refs, cfg: _Cfg):
  n_sc, n_mc = len(cfg.sc), len(cfg.mc)
  sc_refs, mc_refs = refs[:n_sc], refs[n_sc:n_sc + n_mc]
  o_ref, lse_ref, m_ref, l_ref, acc_ref, bad_ref = refs[n_sc + n_mc:]
  b, n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  j, is_full, is_part = _entry(cfg, (fn_ref, fi_ref, pn_ref, pi_ref), b, n, i, t, cfg.nq, cfg.nk)

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.float32)

  def step(masked: bool):
    sc, mc = _read(sc_refs, cfg.sc), _read(mc_refs, cfg.mc)
    rows, cols = _iota(i * cfg.bq, cfg.bq), _iota(j * cfg.bk, cfg.bk)
    raw = _dot(q_ref[...], k_ref[...], trans_b=True) * cfg.scale          # [bq, bk]
    v = v_ref[...]
    if masked:
      vis = _visible(cfg, mc, b, n, rows, cols, transposed=False)
      raw = jnp.where(vis, raw, F32_0)
    s = _scores(cfg, sc, raw, b, n, rows, cols, transposed=False)
    if masked:
      s = jnp.where(vis, s, -jnp.inf)
      # P @ V multiplies only finite values; rows that see a non-finite value are counted and become NaN.
      v_bad = jnp.logical_not(_finite(v))                                            # [bk, Hvp]
      v = jnp.where(v_bad, jnp.zeros_like(v), v)
      bad_keys = jnp.max(jnp.where(v_bad, F32_1, F32_0), axis=1, keepdims=True)      # [bk, 1]
      bad_ref[...] += _dot(jnp.where(vis, F32_1, F32_0).astype(jnp.bfloat16),        # exact 0/1 counts
                           jnp.broadcast_to(bad_keys, (cfg.bk, LANES)).astype(jnp.bfloat16))
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))     # [bq, 128]
    m_safe = jnp.where(m_next == -jnp.inf, F32_0, m_next)               # rows that have seen no key yet
    p = jnp.exp(s - _col(m_safe))
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _col(alpha) + _dot(p.astype(v.dtype), v)

  pl.when(is_full)(lambda: step(False))
  pl.when(is_part)(lambda: step(True))

  @pl.when(t == cfg.nk - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0                       # no visible key (a NaN sum is not empty: it propagates)
    l_safe = jnp.where(empty, F32_1, l)
    out = acc_ref[...] * _col(1.0 / l_safe)
    out = jnp.where(_col(bad_ref[...]) > 0.0, jnp.nan, out)
    o_ref[...] = out.astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))      # [bq, 128], equal lanes
    lse_ref[...] = lse.T[:SUBLANES, :]                                   # [8, bq], equal sublanes


def _call(cfg: _Cfg, kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, name, *args):
  # Interpret mode gets no dimension semantics (as in flash_tpu: they do not extend to axes jax.vmap prepends).
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=4, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=None if cfg.interpret else semantics),
      interpret=cfg.interpret, name=name,
  )(*args)


def _const_specs(consts) -> list:
  return [pl.BlockSpec(c.shape, functools.partial(lambda nd, *_: (0,) * nd, c.ndim)) for c in consts]


def _forward(cfg: _Cfg, q, k, v, fsc, fwd_lists, bwd_lists, osc, mc):
  del bwd_lists
  B, Tp, _ = q.shape
  N = q.shape[2] // cfg.hp
  bq, bk, G = cfg.bq, cfg.bk, cfg.G
  sc = _merge_consts(cfg, fsc, osc)

  def kv_block(b, n, i, t, *lists):
    return _entry(cfg, lists, b, n, i, t, cfg.nq, cfg.nk)[0]

  kv_head = lambda n: _tiling.floordiv(n, G)
  in_specs = [
      pl.BlockSpec((None, bq, cfg.hp), lambda b, n, i, t, *_: (b, i, n)),
      pl.BlockSpec((None, bk, cfg.hp), lambda b, n, i, t, *ls: (b, kv_block(b, n, i, t, *ls), kv_head(n))),
      pl.BlockSpec((None, bk, cfg.hvp), lambda b, n, i, t, *ls: (b, kv_block(b, n, i, t, *ls), kv_head(n))),
      *_const_specs(sc), *_const_specs(mc)]
  out_specs = [pl.BlockSpec((None, bq, cfg.hvp), lambda b, n, i, t, *_: (b, i, n)),
               pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, t, *_: (b, n, 0, i))]
  out, lse = _call(
      cfg, _fwd_kernel, (B, N, cfg.nq, cfg.nk), in_specs, out_specs,
      [jax.ShapeDtypeStruct((B, Tp, N * cfg.hvp), q.dtype), jax.ShapeDtypeStruct((B, N, SUBLANES, Tp), jnp.float32)],
      [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, cfg.hvp), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flex_tpu_fwd",
      *fwd_lists, q, k, v, *sc, *mc)
  return out, lse[:, :, 0, :]


def _merge_consts(cfg: _Cfg, fsc, osc) -> list:
  """The score_mod arrays in their original order from the floating-point and the other ones."""
  it_f, it_o = iter(fsc), iter(osc)
  return [next(it_f) if p in cfg.float_sc else next(it_o) for p in range(len(cfg.sc))]


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dkdv_kernel(fn_ref, fi_ref, pn_ref, pi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Cfg):
  n_sc, n_mc, n_f = len(cfg.sc), len(cfg.mc), len(cfg.float_sc)
  sc_refs, mc_refs = refs[:n_sc], refs[n_sc:n_sc + n_mc]
  dk_ref, dv_ref, *rest = refs[n_sc + n_mc:]
  dsc_refs, (dk_acc, dv_acc) = rest[:n_f], rest[n_f:]
  b, h, j, u = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  g, t = _divmod(u, cfg.nq)
  n = h * cfg.G + g
  i, is_full, is_part = _entry(cfg, (fn_ref, fi_ref, pn_ref, pi_ref), b, n, j, t, cfg.nk, cfg.nq)

  @pl.when(u == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
    for r in dsc_refs:
      r[...] = jnp.zeros(r.shape, jnp.float32)

  def step(masked: bool):
    sc, mc = _read(sc_refs, cfg.sc), _read(mc_refs, cfg.mc)
    rows, cols = _iota(j * cfg.bk, cfg.bk), _iota(i * cfg.bq, cfg.bq)          # keys x queries
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    raw_t = _dot(k, q, trans_b=True) * cfg.scale                               # [bk, bq]: S transposed
    if masked:
      vis = _visible(cfg, mc, b, n, rows, cols, transposed=True)
      raw_t = jnp.where(vis, raw_t, F32_0)
    floats = [sc[p] for p in cfg.float_sc]
    if cfg.score_fn is None:
      s_t = raw_t
    else:
      f = lambda r, fl: _scores(cfg, _with_floats(cfg, sc, fl), r, b, n, rows, cols, transposed=True)
      s_t, mod_vjp = jax.vjp(f, raw_t, floats)
    lse, delta = lse_ref[:1, :], delta_ref[:1, :]                               # [1, bq]
    dp_t = _dot(v, do, trans_b=True)                                           # [bk, bq]
    if masked:
      # Selects: a NaN logsumexp/delta (a row that sees a NaN) or a hidden NaN v never reaches a hidden pair.
      p_t = jnp.where(vis, jnp.exp(s_t - lse), F32_0)
      ds_t = jnp.where(vis, p_t * (dp_t - delta), F32_0)
      q = _clean(q)                      # a hidden query row may hold garbage: 0 * NaN must not happen
    else:
      p_t = jnp.exp(s_t - lse)
      ds_t = p_t * (dp_t - delta)
    dv_acc[...] += _dot(p_t.astype(do.dtype), do)
    if cfg.score_fn is not None:
      ds_t, d_floats = mod_vjp(ds_t)
      for r, d in zip(dsc_refs, d_floats):
        r[...] += d.astype(jnp.float32).reshape(r.shape)
    dk_acc[...] += _dot((ds_t * cfg.scale).astype(q.dtype), q)

  pl.when(is_full)(lambda: step(False))
  pl.when(is_part)(lambda: step(True))

  @pl.when(u == cfg.G * cfg.nq - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(fn_ref, fi_ref, pn_ref, pi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Cfg):
  n_sc, n_mc = len(cfg.sc), len(cfg.mc)
  sc_refs, mc_refs = refs[:n_sc], refs[n_sc:n_sc + n_mc]
  dq_ref, dq_acc, lse_col, delta_col = refs[n_sc + n_mc:]
  b, n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  j, is_full, is_part = _entry(cfg, (fn_ref, fi_ref, pn_ref, pi_ref), b, n, i, t, cfg.nq, cfg.nk)

  @pl.when(t == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    lse_col[...] = _column(lse_ref[...])
    delta_col[...] = _column(delta_ref[...])

  def step(masked: bool):
    sc, mc = _read(sc_refs, cfg.sc), _read(mc_refs, cfg.mc)
    rows, cols = _iota(i * cfg.bq, cfg.bq), _iota(j * cfg.bk, cfg.bk)
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    raw = _dot(q, k, trans_b=True) * cfg.scale                                 # [bq, bk]
    if masked:
      vis = _visible(cfg, mc, b, n, rows, cols, transposed=False)
      raw = jnp.where(vis, raw, F32_0)
    if cfg.score_fn is None:
      s = raw
    else:
      s, mod_vjp = jax.vjp(lambda r: _scores(cfg, sc, r, b, n, rows, cols, transposed=False), raw)
    lse, delta = _col(lse_col[...]), _col(delta_col[...])
    dp = _dot(do, v, trans_b=True)
    if masked:
      p = jnp.where(vis, jnp.exp(s - lse), F32_0)
      ds = jnp.where(vis, p * (dp - delta), F32_0)
      k = _clean(k)
    else:
      ds = jnp.exp(s - lse) * (dp - delta)
    if cfg.score_fn is not None:
      ds, = mod_vjp(ds)
    dq_acc[...] += _dot((ds * cfg.scale).astype(k.dtype), k)

  pl.when(is_full)(lambda: step(False))
  pl.when(is_part)(lambda: step(True))

  @pl.when(t == cfg.nk - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _backward(cfg: _Cfg, q, k, v, fsc, fwd_lists, bwd_lists, osc, mc, out, lse, d_out, d_lse):
  B, Tp, _ = q.shape
  hp, hvp, G, bq, bk = cfg.hp, cfg.hvp, cfg.G, cfg.bq, cfg.bk
  N, K = q.shape[2] // hp, k.shape[2] // hp
  heads = lambda x: x.reshape(B, Tp, N, hvp)
  delta = _rows(_numerics.backward_delta(heads(out), heads(d_out), d_lse, jnp.float32), B, N)
  lse = _rows(lse, B, N)          # finite: rows with no key hold 0 (their logits are all -inf, so P = 0)
  sc = _merge_consts(cfg, fsc, osc)
  nq = cfg.nq

  # dK, dV: one (b, kv head h, key block j) walks the G query heads' transposed lists, entry u = g * nq + t.
  def q_block(b, h, j, u, *lists):
    g, t = _divmod(u, nq)
    return _entry(cfg, lists, b, h * G + g, j, t, cfg.nk, nq)[0]

  q_head = lambda h, u: h * G + _tiling.floordiv(u, nq)
  q_spec = pl.BlockSpec((None, bq, hp), lambda b, h, j, u, *ls: (b, q_block(b, h, j, u, *ls), q_head(h, u)))
  do_spec = pl.BlockSpec((None, bq, hvp), lambda b, h, j, u, *ls: (b, q_block(b, h, j, u, *ls), q_head(h, u)))
  rows_spec = pl.BlockSpec((None, None, SUBLANES, bq),
                           lambda b, h, j, u, *ls: (b, q_head(h, u), 0, q_block(b, h, j, u, *ls)))
  k_spec = pl.BlockSpec((None, bk, hp), lambda b, h, j, u, *_: (b, j, h))
  v_spec = pl.BlockSpec((None, bk, hvp), lambda b, h, j, u, *_: (b, j, h))
  fsc_specs = [pl.BlockSpec((None, None, None, *c.shape), functools.partial(lambda nd, b, h, j, u, *_: (b, h, j)
                                                                            + (0,) * nd, c.ndim)) for c in fsc]
  dk, dv, *dsc = _call(
      cfg, _dkdv_kernel, (B, K, cfg.nk, G * nq),
      [q_spec, k_spec, v_spec, do_spec, rows_spec, rows_spec, *_const_specs(sc), *_const_specs(mc)],
      [k_spec, v_spec, *fsc_specs],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
       *(jax.ShapeDtypeStruct((B, K, cfg.nk, *c.shape), jnp.float32) for c in fsc)],
      [pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hvp), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flex_tpu_dkdv",
      *bwd_lists, q, k, v, d_out, lse, delta, *sc, *mc)
  d_fsc = tuple(jnp.sum(d, axis=(0, 1, 2)).astype(c.dtype) for d, c in zip(dsc, fsc))

  # dQ: one (b, query head n, query block i) walks its kv list.
  def kv_block(b, n, i, t, *lists):
    return _entry(cfg, lists, b, n, i, t, nq, cfg.nk)[0]

  kv_head = lambda n: _tiling.floordiv(n, G)
  qn_spec = pl.BlockSpec((None, bq, hp), lambda b, n, i, t, *_: (b, i, n))
  don_spec = pl.BlockSpec((None, bq, hvp), lambda b, n, i, t, *_: (b, i, n))
  dq = _call(
      cfg, _dq_kernel, (B, N, nq, cfg.nk),
      [qn_spec,
       pl.BlockSpec((None, bk, hp), lambda b, n, i, t, *ls: (b, kv_block(b, n, i, t, *ls), kv_head(n))),
       pl.BlockSpec((None, bk, hvp), lambda b, n, i, t, *ls: (b, kv_block(b, n, i, t, *ls), kv_head(n))),
       don_spec,
       pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, t, *_: (b, n, 0, i)),
       pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, t, *_: (b, n, 0, i)),
       *_const_specs(sc), *_const_specs(mc)],
      qn_spec, jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((bq, hp), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, LANES), jnp.float32)],
      ("parallel", "parallel", "parallel", "arbitrary"), "attention_jax_flex_tpu_dq",
      *fwd_lists, q, k, v, d_out, lse, delta, *sc, *mc)
  return dq, dk, dv, d_fsc


# (out, lse) with a recomputing backward; the floating-point score_mod arrays take the differentiable slot.
_flex = flash_custom_vjp(_forward, _backward, with_bias=True, finite_residuals=True)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def _kernel_const(c: jax.Array) -> tuple[jax.Array, _Const]:
  """A captured array as the kernels store it: bool -> int32, 64-bit -> 32-bit, 0-d -> ``[1]``."""
  c = jnp.asarray(c)
  meta = _Const(tuple(c.shape), c.dtype == jnp.bool_)
  if meta.is_bool:
    c = c.astype(jnp.int32)
  elif c.dtype.itemsize == 8:
    c = c.astype(jnp.float32 if jnp.issubdtype(c.dtype, jnp.floating) else jnp.int32)
  return c.reshape(c.shape or (1,)), meta


def _check_blocks(bq: int, bk: int, interpret) -> None:
  if interpret is False and (bq % LANES or bk % LANES):
    raise UnsupportedError(
        f"{_PATH} compiles for TPU with block_size multiples of {LANES} only (the query block lies on lanes in the "
        f"dK/dV tile and the logsumexp rows, the key block in the forward tile); got block_size=({bq}, {bk}). "
        "Build the BlockMask with block_size=128 (or a multiple), or use implementation='blockwise'")


def _check_lowers(cfg: _Cfg, kernel_dtype, fsc, osc, mc) -> None:
  """Lowers the three kernels for TPU on one block (the mods at their real array shapes); a mod Mosaic cannot lower
  (a gather or dynamic slice of a captured array, ...) raises ``UnsupportedError`` now, so that dispatch moves on,
  instead of failing later when an enclosing ``jit`` compiles."""
  one = cfg._replace(T=cfg.bq, S=cfg.bk, nq=1, nk=1, Bm=1, Nm=1)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  lists = tuple(jax.ShapeDtypeStruct((1,), jnp.int32) for _ in range(4))
  arrays = (jax.ShapeDtypeStruct((1, cfg.bq, cfg.G * cfg.hp), kernel_dtype),
            jax.ShapeDtypeStruct((1, cfg.bk, cfg.hp), kernel_dtype),
            jax.ShapeDtypeStruct((1, cfg.bk, cfg.hvp), kernel_dtype), tuple(spec(c) for c in fsc))
  aux = (lists, lists, tuple(spec(c) for c in osc), tuple(spec(c) for c in mc))

  def loss(q, k, v, fsc, aux):
    return jnp.sum(_flex(one, q, k, v, fsc, aux)[0].astype(jnp.float32))

  try:
    jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["tpu"])(*arrays, aux)
  except Exception as e:  # noqa: BLE001 -- any lowering failure means: not this implementation
    msg = (str(e).strip().splitlines() or [""])[0].split(" Please file")[0]
    raise UnsupportedError(
        f"{_PATH}: Mosaic cannot lower this score_mod / mask_mod ({type(e).__name__}: {msg}); mods that index "
        "captured arrays (gathers, dynamic slices) run compiled only in implementation='blockwise'") from e


def flex_tpu_core(f: flex.FlexInputs, interpret=None) -> tuple[jax.Array, jax.Array]:
  """``(out [B, T, N, Hv] in the input dtype, lse [B, N, T] float32, -inf on rows with no visible key)``,
  differentiable in q, k, v and the floating-point arrays ``score_mod`` closes over.

  ``interpret``: None compiles on TPU and interprets on CPU (see ``flash_tpu``). ``UnsupportedError`` for float64,
  a traced scale, blocks Mosaic cannot tile, or another backend.
  """
  q, k, v = f.query, f.key, f.value
  dtype = jnp.dtype(q.dtype)
  if dtype == jnp.float64:
    raise UnsupportedError(f"{_PATH} computes in float32 and cannot keep float64 inputs in float64 (query "
                           f"{q.shape}); use implementation='blockwise' or 'reference'")
  if dtype not in _KERNEL_DTYPES:
    raise UnsupportedError(f"{_PATH} takes bfloat16, float16 or float32 inputs; got {dtype}; use "
                           "implementation='blockwise' or 'reference'")
  kernel_dtype = _KERNEL_DTYPES[dtype]
  scale = _numerics.static_float("scale", f.scale, path=_PATH)
  interpret = _resolve_interpret(interpret)
  bm = f.block_mask
  T, S = bm.seq_lengths
  bq, bk = bm.block_size
  _check_blocks(bq, bk, interpret)
  B, _, N, H = q.shape
  K, Hv = v.shape[2], v.shape[3]
  if 0 in (B, T, N, S, Hv):
    return jnp.zeros((B, T, N, Hv), dtype), jnp.full((B, N, T), -jnp.inf, jnp.float32)
  nq, nk = bm.num_blocks
  Bm, Nm = bm.shape[:2]
  Tp, Sp = nq * bq, nk * bk
  hp, hvp = _numerics.round_up(H, LANES), _numerics.round_up(Hv, LANES)

  sc_in = () if f.score is None else f.score.consts
  mc_in = () if f.mask is None else f.mask.consts
  sc, sc_meta = zip(*(_kernel_const(c) for c in sc_in)) if sc_in else ((), ())
  mc, mc_meta = zip(*(_kernel_const(c) for c in mc_in)) if mc_in else ((), ())
  float_sc = tuple(p for p, c in enumerate(sc_in) if jnp.issubdtype(jnp.asarray(c).dtype, jnp.floating))
  cfg = _Cfg(scale=scale, T=T, S=S, bq=bq, bk=bk, nq=nq, nk=nk, Bm=Bm, Nm=Nm, G=N // K, hp=hp, hvp=hvp,
             score_fn=None if f.score is None else f.score.fn, mask_fn=None if f.mask is None else f.mask.fn,
             sc=tuple(sc_meta), float_sc=float_sc, mc=tuple(mc_meta), interpret=interpret)

  # [B, L, heads, H] -> [B, Lp, heads * Hp]: zero padding, then a free reshape.
  flat = lambda x, n, h: jnp.pad(x.astype(kernel_dtype), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, h - x.shape[3]))
                                 ).reshape(B, n, -1)
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  qf, kf = flat(_numerics.nan_rows(q), Tp, hp), flat(_numerics.nan_rows(k), Sp, hp)
  vf = flat(v, Sp, hvp)
  fsc = tuple(sc[p] for p in float_sc)
  osc = tuple(c for p, c in enumerate(sc) if p not in float_sc)
  if interpret is False and (f.score is not None or f.mask is not None):
    _check_lowers(cfg, kernel_dtype, fsc, osc, mc)
  aux = (_flat_lists(bm, transposed=False), _flat_lists(bm, transposed=True), osc, tuple(mc))
  out, lse = _flex(cfg, qf, kf, vf, fsc, aux)
  return out.reshape(B, Tp, N, hvp)[:, :T, :, :Hv].astype(dtype), lse[:, :, :T]

