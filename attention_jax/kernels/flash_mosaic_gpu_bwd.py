"""Backward of the Hopper flash-attention kernel (``flash_mosaic_gpu``) as two Pallas Mosaic GPU kernels.

Both recompute the probabilities from the forward's logsumexp, ``P = exp2(S scale log2(e) - lse log2(e))``, and use
``delta = rowsum(dO * O) - d_lse`` computed by XLA in float32. Each runs three warpgroups, like the forward:
two consumers (wgmma) and one producer streaming tiles by TMA through a ring of SMEM slots guarded by "loaded"
barriers (TMA arrival) and a "freed" barrier both consumers arrive on.

* dK / dV: one program per (``2 * 64`` keys, kv head, batch). Each consumer keeps its 64-key K and V tiles in SMEM
  and works transposed (keys are the wgmma M): ``Sᵀ = K Qᵀ``, ``Pᵀ``, ``dV += Pᵀ dO``, ``dPᵀ = V dOᵀ``,
  ``dSᵀ = Pᵀ (dPᵀ - delta)``, ``dK += dSᵀ Q``. The producer streams Q, dO, the logsumexp and delta of every
  (query head of the GQA group, query block that sees the program's keys) pair; under a causal mask query blocks
  entirely above the diagonal are not streamed, and the later consumer skips (waits for and frees) the blocks only
  the earlier one needs. dK / dV of keys no query sees are exactly zero.
* dQ: one program per (``2 * 64`` query rows, query head, batch), the forward's structure: the producer streams
  K / V blocks, each consumer computes ``dS`` for its 64 rows and ``dQ += dS K``.

Interpret-mode formulations (as in the forward): ``Pᵀ`` and ``dS`` go through SMEM before the wgmma that reads them
(interpret mode takes wgmma operands only from SMEM), and every product writes a fresh scoped accumulator added in
registers (``pl.run_state(...)(plgpu.ACC.init(x))`` does not run in interpret mode).

Scope: bfloat16 / float16, head dims H, Hv in {64, 128}; GQA; causal; key lengths; ``d_lse`` (a cotangent on the
logsumexp). Masked tiles select (``where``) around hidden pairs, so an empty row (no visible key) gets zero
gradients whatever the saved logsumexp holds there (0 or ``-inf``), and multiply a cleaned copy of Q (dK) / K (dQ)
(non-finite entries selected to 0, through a per-consumer SMEM tile), so a hidden non-finite query or key never
reaches dK / dQ through ``0 * NaN``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attention_jax import _numerics, core
from attention_jax.kernels.flash_mosaic_gpu import CONSUMERS, SMEM_BYTES, _Config, _smem

LOG2E = math.log2(math.e)
BLOCK = 64            # rows of every tile: the wgmma M of one consumer (keys in dK / dV, queries in dQ)
NUM_STAGES = 2        # tiles in flight in each kernel's SMEM ring
HEAD_DIMS = (64, 128)
_PATH = "the Mosaic GPU flash kernel's backward"


def smem_bytes(H: int, Hv: int, itemsize: int) -> int:
  """Shared memory of the larger of the two backward programs."""
  b, st = BLOCK, NUM_STAGES
  dkdv = (CONSUMERS * b * (2 * H + Hv) + st * b * (H + Hv) + CONSUMERS * b * b) * itemsize + 2 * st * b * 4
  dq = (CONSUMERS * b * (2 * H + Hv) + st * b * (H + Hv) + CONSUMERS * b * b) * itemsize + 2 * CONSUMERS * b * 4
  return max(dkdv, dq)


def check_supported(H: int, Hv: int, itemsize: int = 2) -> None:
  """``core.UnsupportedError`` for head dims the backward cannot take."""
  if H not in HEAD_DIMS or Hv not in HEAD_DIMS or smem_bytes(H, Hv, itemsize) > SMEM_BYTES:
    raise core.UnsupportedError(f"{_PATH} takes head dims H, Hv in {HEAD_DIMS}; got H={H}, Hv={Hv}; differentiate "
                                "implementation='pallas' (Triton), 'blockwise' or 'reference' instead")


def _scoped_wgmma(lhs, rhs, shape):
  """``lhs @ rhs`` (SMEM operands) into a fresh float32 accumulator, returned as a register array."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, lhs, rhs)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _cleaned(src, dst):
  """``dst``: the SMEM tile ``src`` with non-finite entries replaced by 0 (a select), ready for a wgmma."""
  x = src[...].astype(jnp.float32)
  dst[...] = jnp.where(jnp.abs(x) < np.float32(np.inf), x, np.float32(0.0)).astype(dst.dtype)
  plgpu.commit_smem()
  return dst


def _zeros(shape):
  return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def _kv_limit(cfg: _Config, kv_len_ref, b):
  limit = jnp.int32(cfg.S)
  if cfg.has_kv_len:
    limit = jnp.minimum(kv_len_ref[b], limit)
  return limit


# ----------------------------------------------------------------------------------------------------------
# dK / dV
# ----------------------------------------------------------------------------------------------------------


def _dkdv_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *rest):
  if cfg.has_kv_len:
    kv_len_ref, dk_ref, dv_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
  else:
    kv_len_ref, (dk_ref, dv_ref), scratch = None, rest[:2], rest[2:]
  (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, t_smem, clean_smem, kv_bar, q_bar, do_bar, lse_bar, delta_bar,
   freed) = scratch
  b_, st, G = BLOCK, NUM_STAGES, cfg.groups
  dtype = q_ref.dtype
  kb, kv_head, b = lax.axis_index("kv_seq"), lax.axis_index("kv_heads"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  kv_limit = _kv_limit(cfg, kv_len_ref, b)
  n_q = (cfg.T + b_ - 1) // b_          # query blocks holding real rows (later ones are padding: zero dO)

  def first_q_block(k0):
    """The first query block that sees keys [k0, k0 + 64), or ``n_q`` when none does."""
    lo = lax.div(k0, jnp.int32(b_)) if cfg.is_causal else jnp.int32(0)
    return jnp.where(k0 < kv_limit, jnp.minimum(lo, n_q), n_q)

  k0_prog = kb * (CONSUMERS * b_)
  lo_prog = first_q_block(k0_prog)      # consumer 0 sees the most query blocks: the producer streams those
  per_head = n_q - lo_prog
  total = G * per_head

  def slot_of(t):
    return lax.rem(t, jnp.int32(st))

  @pl.when(wg < CONSUMERS)
  def _consumer():
    k0 = k0_prog + wg * b_
    k_tile, v_tile, t_tile = k_smem.at[wg], v_smem.at[wg], t_smem.at[wg]
    rows = (b, pl.ds(k0, b_), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_tile, kv_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_tile, kv_bar.at[CONSUMERS + wg])
    plgpu.barrier_wait(kv_bar.at[wg])
    plgpu.barrier_wait(kv_bar.at[CONSUMERS + wg])
    lo = first_q_block(k0)
    # Blocks [lo, full) need a mask (the causal diagonal; every block when the keys cross the key limit).
    full = jnp.minimum(lo + 1, n_q) if cfg.is_causal else lo
    full = jnp.where(k0 + b_ > kv_limit, n_q, full)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def wait_loaded(slot):
      for bar in (q_bar, do_bar, lse_bar, delta_bar):
        plgpu.barrier_wait(bar.at[slot])

    def skip(t, carry):
      slot = slot_of(t)
      wait_loaded(slot)
      plgpu.barrier_arrive(freed.at[slot])
      return carry

    def step(t, carry, qb, masked: bool):
      dk, dv = carry
      slot = slot_of(t)
      wait_loaded(slot)
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      s = _scoped_wgmma(k_tile, q_tile.T, (b_, b_)) * np.float32(cfg.scale * LOG2E)   # Sᵀ: keys x queries
      lse2 = plgpu.load(lse_smem.at[slot], layout=col_layout)
      delta = plgpu.load(delta_smem.at[slot], layout=col_layout)
      p = jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [1]))
      if masked:
        keys = k0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        queries = qb * b_ + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        visible = keys < kv_limit
        if cfg.is_causal:
          visible = visible & (keys <= queries)
        p = jnp.where(visible, p, np.float32(0.0))
      t_tile[...] = p.astype(dtype)
      plgpu.commit_smem()
      dv = dv + _scoped_wgmma(t_tile, do_tile, dv.shape)                          # dV += Pᵀ dO
      dp = _scoped_wgmma(v_tile, do_tile.T, s.shape)                              # dPᵀ = V dOᵀ
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [1]))
      if masked:
        ds = jnp.where(visible, ds, np.float32(0.0))
      t_tile[...] = ds.astype(dtype)
      plgpu.commit_smem()
      # A query row hidden from these keys may hold a non-finite value: its dS is 0, and 0 * NaN must not reach dK.
      q_use = _cleaned(q_tile, clean_smem.at[wg]) if masked else q_tile
      dk = dk + _scoped_wgmma(t_tile, q_use, dk.shape)                            # dK += dSᵀ Q
      plgpu.barrier_arrive(freed.at[slot])
      return dk, dv

    def head(g, carry):
      base = g * per_head - lo_prog         # the step of query block qb is base + qb
      lax.fori_loop(lo_prog, lo, lambda qb, c: skip(base + qb, c), jnp.int32(0))
      carry = lax.fori_loop(lo, full, lambda qb, c: step(base + qb, c, qb, masked=True), carry)
      return lax.fori_loop(full, n_q, lambda qb, c: step(base + qb, c, qb, masked=False), carry)

    dk, dv = lax.fori_loop(0, G, head, (_zeros(k_tile.shape), _zeros(v_tile.shape)))
    k_tile[...] = (dk * np.float32(cfg.scale)).astype(dtype)
    v_tile[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    def load(t, slot):
      g = lax.div(t, per_head)
      q0 = (lo_prog + lax.rem(t, per_head)) * b_
      head = kv_head * G + g
      rows = (b, pl.ds(q0, b_), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse2_ref.at[b, head, pl.ds(q0, b_)], lse_smem.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(q0, b_)], delta_smem.at[slot], delta_bar.at[slot])

    for j in range(st):   # fill the ring
      pl.when(j < total)(functools.partial(load, j, j))

    @pl.loop(st, total)
    def _refill(t):
      slot = slot_of(t - st)
      plgpu.barrier_wait(freed.at[slot])
      load(t, slot)

    @pl.loop(jnp.maximum(total - st, 0), total)
    def _last_freed(t):   # observe every phase (see the forward)
      plgpu.barrier_wait(freed.at[slot_of(t)])


def _dkdv(cfg: _Config, q, k, v, do, lse2, delta, kv_len):
  B, Tp, N, H = q.shape
  Sp, K, Hv = v.shape[1:]
  b_, st = BLOCK, NUM_STAGES
  scratch = [
      _smem((CONSUMERS, b_, H), q.dtype), _smem((CONSUMERS, b_, Hv), q.dtype),       # K, V (then dK, dV)
      _smem((st, b_, H), q.dtype), _smem((st, b_, Hv), q.dtype),                     # Q, dO ring
      plgpu.SMEM((st, b_), jnp.float32), plgpu.SMEM((st, b_), jnp.float32),         # lse2, delta ring
      _smem((CONSUMERS, b_, b_), q.dtype),                                           # Pᵀ, then dSᵀ
      _smem((CONSUMERS, b_, H), q.dtype),                                            # Q cleaned (masked tiles)
      plgpu.Barrier(num_barriers=2 * CONSUMERS),                                     # K, V loaded
      plgpu.Barrier(num_barriers=st), plgpu.Barrier(num_barriers=st),                # Q, dO slot loaded
      plgpu.Barrier(num_barriers=st), plgpu.Barrier(num_barriers=st),                # lse2, delta slot loaded
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=st),                       # slot freed by both
  ]
  n_in = 7 if cfg.has_kv_len else 6

  def body(*refs):
    pl.run_scoped(lambda *s: _dkdv_kernel(cfg, *refs[:n_in + 2], *s), *scratch, collective_axes="wg")

  call = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(Sp // (CONSUMERS * b_), K, B), grid_names=("kv_seq", "kv_heads", "batch"),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=cfg.interpret)
  return call(q, k, v, do, lse2, delta, *(() if kv_len is None else (kv_len,)))


# ----------------------------------------------------------------------------------------------------------
# dQ
# ----------------------------------------------------------------------------------------------------------


def _dq_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *rest):
  if cfg.has_kv_len:
    kv_len_ref, dq_ref, scratch = rest[0], rest[1], rest[2:]
  else:
    kv_len_ref, dq_ref, scratch = None, rest[0], rest[1:]
  (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, ds_smem, clean_smem, row_bar, k_bar, v_bar, freed) = scratch
  b_, st = BLOCK, NUM_STAGES
  dtype = q_ref.dtype
  head, qi, b = lax.axis_index("heads"), lax.axis_index("q_seq"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(cfg.groups))
  kv_limit = _kv_limit(cfg, kv_len_ref, b)

  def num_blocks(q0):
    """Key blocks rows [q0, q0 + 64) visit, and how many of those (from the start) need no mask."""
    hi = jnp.minimum(kv_limit, q0 + b_) if cfg.is_causal else kv_limit
    full = lax.div(kv_limit, jnp.int32(b_))
    if cfg.is_causal:
      full = jnp.minimum(full, lax.div(q0 + 1, jnp.int32(b_)))
    return lax.div(hi + (b_ - 1), jnp.int32(b_)), full

  steps_max, _ = num_blocks(qi * (CONSUMERS * b_) + (CONSUMERS - 1) * b_)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    q0 = qi * (CONSUMERS * b_) + wg * b_
    steps, full = num_blocks(q0)
    q_tile, do_tile, ds_tile = q_smem.at[wg], do_smem.at[wg], ds_smem.at[wg]
    rows = (b, pl.ds(q0, b_), head)
    loads = ((q_ref.at[rows], q_tile), (do_ref.at[rows], do_tile),
             (lse2_ref.at[b, head, pl.ds(q0, b_)], lse_smem.at[wg]),
             (delta_ref.at[b, head, pl.ds(q0, b_)], delta_smem.at[wg]))
    for i, (src, dst) in enumerate(loads):
      plgpu.copy_gmem_to_smem(src, dst, row_bar.at[i * CONSUMERS + wg])
    for i in range(len(loads)):
      plgpu.barrier_wait(row_bar.at[i * CONSUMERS + wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse2 = plgpu.load(lse_smem.at[wg], layout=row_layout)
    delta = plgpu.load(delta_smem.at[wg], layout=row_layout)

    def step(j, dq, masked: bool):
      slot = lax.rem(j, jnp.int32(st))
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      s = _scoped_wgmma(q_tile, k_smem.at[slot].T, (b_, b_)) * np.float32(cfg.scale * LOG2E)
      p = jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [0]))
      dp = _scoped_wgmma(do_tile, v_smem.at[slot].T, s.shape)
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
      if masked:
        r = q0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        c = j * b_ + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        visible = c < kv_limit
        if cfg.is_causal:
          visible = visible & (c <= r)
        ds = jnp.where(visible, ds, np.float32(0.0))
      ds_tile[...] = ds.astype(dtype)
      plgpu.commit_smem()
      k_use = _cleaned(k_smem.at[slot], clean_smem.at[wg]) if masked else k_smem.at[slot]   # hidden keys: as above
      dq = dq + _scoped_wgmma(ds_tile, k_use, dq.shape)                           # dQ += dS K
      plgpu.barrier_arrive(freed.at[slot])
      return dq

    dq = lax.fori_loop(0, full, functools.partial(step, masked=False), _zeros(q_tile.shape))
    dq = lax.fori_loop(full, steps, functools.partial(step, masked=True), dq)
    q_tile[...] = (dq * np.float32(cfg.scale)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[rows])

    @pl.loop(steps, steps_max)
    def _free_unused(j):   # blocks streamed for the other consumer
      slot = lax.rem(j, jnp.int32(st))
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_arrive(freed.at[slot])

    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    def load(j, slot):
      keys = (b, pl.ds(j * b_, b_), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

    for j in range(min(st, cfg.Sp // b_)):
      pl.when(j < steps_max)(functools.partial(load, j, j))

    @pl.loop(st, steps_max)
    def _refill(j):
      slot = lax.rem(j - st, jnp.int32(st))
      plgpu.barrier_wait(freed.at[slot])
      load(j, slot)

    @pl.loop(jnp.maximum(steps_max - st, 0), steps_max)
    def _last_freed(j):
      plgpu.barrier_wait(freed.at[lax.rem(j, jnp.int32(st))])


def _dq(cfg: _Config, q, k, v, do, lse2, delta, kv_len):
  B, Tp, N, H = q.shape
  Hv = v.shape[-1]
  b_, st = BLOCK, NUM_STAGES
  scratch = [
      _smem((CONSUMERS, b_, H), q.dtype), _smem((CONSUMERS, b_, Hv), q.dtype),       # Q (then dQ), dO
      plgpu.SMEM((CONSUMERS, b_), jnp.float32), plgpu.SMEM((CONSUMERS, b_), jnp.float32),   # lse2, delta
      _smem((st, b_, H), q.dtype), _smem((st, b_, Hv), q.dtype),                     # K, V ring
      _smem((CONSUMERS, b_, b_), q.dtype),                                           # dS
      _smem((CONSUMERS, b_, H), q.dtype),                                            # K cleaned (masked tiles)
      plgpu.Barrier(num_barriers=4 * CONSUMERS),                                     # Q, dO, lse2, delta loaded
      plgpu.Barrier(num_barriers=st), plgpu.Barrier(num_barriers=st),                # K, V slot loaded
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=st),                       # slot freed by both
  ]
  n_in = 7 if cfg.has_kv_len else 6

  def body(*refs):
    pl.run_scoped(lambda *s: _dq_kernel(cfg, *refs[:n_in + 1], *s), *scratch, collective_axes="wg")

  call = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(N, Tp // (CONSUMERS * b_), B), grid_names=("heads", "q_seq", "batch"),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=cfg.interpret)
  return call(q, k, v, do, lse2, delta, *(() if kv_len is None else (kv_len,)))


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def mosaic_backward(cfg: _Config, q, k, v, kv_len, out, lse, d_out, d_lse=None):
  """Gradients of the forward kernel on its padded arrays: ``q [B, Tp, N, H]``, ``k [B, Sp, K, H]``, ``v [B, Sp,
  K, Hv]``, ``kv_len [B]`` or None, ``out [B, Tp, N, Hv]``, ``lse [B, N, Tp]`` (float32; 0 or ``-inf`` on rows
  with no visible key), ``d_out`` like ``out``, ``d_lse`` like ``lse`` or None -> ``(dq, dk, dv)`` like ``q, k,
  v``."""
  B, Tp, N, H = q.shape
  Sp, K, Hv = v.shape[1:]
  check_supported(H, Hv, jnp.dtype(q.dtype).itemsize)
  if Tp % (CONSUMERS * BLOCK) or Sp % BLOCK:
    raise ValueError(f"mosaic_backward: padded q {q.shape} / k {k.shape} must have Tp % {CONSUMERS * BLOCK} == 0 "
                     f"and Sp % {BLOCK} == 0")
  d_lse = jnp.zeros_like(lse) if d_lse is None else d_lse
  d_out = d_out.astype(q.dtype)
  delta = _numerics.backward_delta(out, d_out, d_lse, jnp.float32)
  # Rows with no visible key: every pair of theirs is masked (selected away), so any stand-in works; +inf keeps
  # exp2 at 0 even before the select.
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * np.float32(LOG2E)).astype(jnp.float32)
  kv_len = None if kv_len is None else kv_len.astype(jnp.int32)
  # The dK / dV programs take 128 keys: pad the keys further (the extra keys are beyond S, hence masked).
  Sp2 = _numerics.round_up(Sp, CONSUMERS * BLOCK)
  k2, v2 = _numerics.pad_axis(k, 1, Sp2), _numerics.pad_axis(v, 1, Sp2)
  dk, dv = _dkdv(cfg, q, k2, v2, d_out, lse2, delta, kv_len)
  dq = _dq(cfg, q, k, v, d_out, lse2, delta, kv_len)
  return dq, dk[:, :Sp], dv[:, :Sp]
