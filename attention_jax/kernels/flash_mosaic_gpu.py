"""Flash attention forward for Hopper (sm90) as a Pallas Mosaic GPU kernel: TMA, mbarriers, wgmma, warp specialisation.

One program per (query head, query tile of ``2 * block_q`` rows, batch), three warpgroups:

* warpgroups 0 and 1 (consumers) each own ``block_q = 64`` query rows (the M of one wgmma). Each loads its Q tile
  by TMA, then for every key block it can see: ``S = Q Kᵀ`` by wgmma into a scoped accumulator, the mask (causal
  diagonal, key lengths, padded keys; only on the blocks that need it), an online softmax in base 2 in registers,
  ``P`` stored to its own SMEM tile and ``O += P V`` by a second wgmma. It then writes O (through the SMEM tile
  that held Q when ``H == Hv``) and the logsumexp by TMA.
* warpgroup 2 (producer) streams K and V blocks through a ring of ``num_stages`` SMEM slots by TMA
  (``copy_gmem_to_smem``), each slot guarded by a "loaded" barrier (TMA arrival) and a "consumed" barrier that both
  consumers arrive on. The producer only refills a slot after both consumers freed it. Under a causal mask the
  producer streams the blocks consumer 1 (the later rows) needs; consumer 0, which needs fewer, still waits for each
  remaining block before freeing it (so that an early arrival can never complete the wrong phase).

Two formulations differ from FlashAttention-3 on purpose, because Pallas' GPU interpret mode (the CPU simulator the
tests run in) lacks what the faster ones need:

* ``P`` goes through SMEM for the ``P V`` wgmma: interpret mode takes wgmma operands only from SMEM refs (a register
  LHS ``plgpu.wgmma(acc, p_regs, v_smem)`` fails there with "Expected shape (6,) but got (64, 64)").
* ``O`` is accumulated in registers as ``O * alpha + (P V)`` with the wgmma writing a fresh scoped accumulator:
  interpret mode does not handle ``pl.run_state(...)(plgpu.ACC.init(o))`` (it reaches XLA: "MLIR translation rule
  for primitive 'wgmma' not found for platform cpu").

Both are the next things to measure on a GPU (register-LHS wgmma and a ``run_state`` accumulator save SMEM traffic
and registers), as is FA3's ping-pong scheduling of the two consumers, which this kernel does not do.

Backward (``flash_mosaic_gpu_bwd.py``, a custom VJP that saves q, k, v, out and the logsumexp): a dK/dV kernel over
key blocks looping over the GQA group's query heads and the query blocks that see each key block, and a dQ kernel
over query blocks, in the same warpgroup layout; head dims 64 and 128 (256 raises ``core.UnsupportedError`` when
the gradient is traced).

Scope: bfloat16 / float16; head dims H and Hv in {64, 128, 256} (the backward: 64 and 128); GQA; causal
(top-left aligned); ``key_value_seq_lengths`` (in the kernel) and ``query_seq_lengths`` (those rows' queries are
zeroed before the kernel and their outputs set to zero / ``-inf`` after it). Any T and S: the wrapper pads to
whole tiles. A non-finite value at a position a query cannot see would reach that query through ``0 * NaN`` in the
``P V`` wgmma, so a call whose output is not finite reruns through the blockwise path (which selects around hidden
positions). Everything else (dense masks and biases, segment ids, windows, soft-cap, float32 / float64) raises
``core.UnsupportedError``.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attention_jax import _numerics, core
from attention_jax.kernels._common import compiled_on, flash_custom_vjp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CONSUMERS = 2                 # consumer warpgroups per program (each owns block_q query rows)
SMEM_BYTES = 227 * 1024       # shared memory one Hopper block may use
_PATH = "the Mosaic GPU flash kernel"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward kernel.

  ``block_q``: query rows per consumer warpgroup (a program covers ``2 * block_q``); 64, the M of one wgmma.
  ``block_k``: keys per K/V block, a multiple of 64. ``num_stages``: K/V blocks in flight in the SMEM ring (>= 2).
  """
  block_q: int = 64
  block_k: int = 64
  num_stages: int = 2

  def __post_init__(self):
    for f in ("block_q", "block_k", "num_stages"):
      n = getattr(self, f)
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"BlockSizes.{f}={n!r} must be a positive int")
    if self.block_q != 64:
      raise ValueError(f"BlockSizes.block_q={self.block_q} must be 64 (one wgmma's M per consumer warpgroup)")
    if self.block_k % 64:
      raise ValueError(f"BlockSizes.block_k={self.block_k} must be a multiple of 64")
    if self.num_stages < 2:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be at least 2")

  @classmethod
  def get_default(cls, head_dim: int, dtype: Any = jnp.bfloat16) -> BlockSizes:
    """The table's row for ``max(H, Hv)`` (bf16 and f16 share rows: same width)."""
    del dtype   # both supported dtypes are 2 bytes wide
    return _DEFAULT_BLOCKS[min(h for h in HEAD_DIMS if h >= head_dim)]

  def smem_bytes(self, H: int, Hv: int, itemsize: int) -> int:
    """Shared memory of one program: Q (reused for O when H == Hv), the K/V ring, P tiles and the logsumexp."""
    q = CONSUMERS * self.block_q * H
    o = 0 if H == Hv else CONSUMERS * self.block_q * Hv
    kv = self.num_stages * self.block_k * (H + Hv)
    p = CONSUMERS * self.block_q * self.block_k
    return (q + o + kv + p) * itemsize + CONSUMERS * self.block_q * 4


# Unmeasured guesses (no Hopper run yet): each row keeps a program's SMEM well under 227 KiB and the consumers'
# registers (S tile, P V tile and O accumulator, float32) within what a 3-warpgroup program can hold.
_DEFAULT_BLOCKS = {
    64: BlockSizes(block_q=64, block_k=128, num_stages=3),
    128: BlockSizes(block_q=64, block_k=64, num_stages=3),
    256: BlockSizes(block_q=64, block_k=64, num_stages=2),
}


def check_block_sizes(block_sizes: Any) -> BlockSizes | int | None:
  """``None`` (the table's default), a :class:`BlockSizes`, or a plain int: that ``block_k`` with the table's
  other fields; anything else is a ``ValueError``."""
  if block_sizes is None or isinstance(block_sizes, BlockSizes):
    return block_sizes
  if isinstance(block_sizes, int) and not isinstance(block_sizes, bool):
    if block_sizes < 64 or block_sizes % 64:
      raise ValueError(f"block_sizes={block_sizes} must be a positive multiple of 64 (or a BlockSizes)")
    return block_sizes
  raise ValueError(f"block_sizes must be None, an int or a flash_mosaic_gpu.BlockSizes; got {block_sizes!r}")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one kernel call (hashable)."""
  scale: float
  is_causal: bool
  T: int
  S: int
  Tp: int
  Sp: int
  groups: int
  has_kv_len: bool
  blocks: BlockSizes
  interpret: Any


def _smem(shape, dtype):
  """An SMEM tile in the layout wgmma reads: (8, swizzle) tiling with the widest swizzle the minor dim allows."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = 128 if shape[-1] * itemsize % 128 == 0 else 64
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle)))


def _kernel(cfg: _Config, q_ref, k_ref, v_ref, *rest):
  """The body run by each of the three warpgroups (``wg`` 0, 1: consumers; 2: producer)."""
  if cfg.has_kv_len:
    kv_len_ref, out_ref, lse_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
  else:
    kv_len_ref, (out_ref, lse_ref), scratch = None, rest[:2], rest[2:]
  (q_smem, o_smem, k_smem, v_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free) = scratch
  blk = cfg.blocks
  bq, bk, stages = blk.block_q, blk.block_k, blk.num_stages
  dtype = q_ref.dtype
  head, qi, b = lax.axis_index("heads"), lax.axis_index("q_seq"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(cfg.groups))

  # Keys any row may see: [0, kv_limit). Under a causal mask rows [q0, q0 + bq) also stop at q0 + bq.
  kv_limit = jnp.int32(cfg.S)
  if cfg.has_kv_len:
    kv_limit = jnp.minimum(kv_len_ref[b], kv_limit)

  def num_blocks(q0):
    """Key blocks rows [q0, q0 + bq) visit, and how many of those (from the start) need no mask."""
    hi = jnp.minimum(kv_limit, q0 + bq) if cfg.is_causal else kv_limit
    full = lax.div(kv_limit, jnp.int32(bk))
    if cfg.is_causal:
      full = jnp.minimum(full, lax.div(q0 + 1, jnp.int32(bk)))
    return lax.div(hi + (bk - 1), jnp.int32(bk)), full

  # Consumer 1 (the later rows) sees the most blocks: the producer streams exactly those.
  steps_max, _ = num_blocks(qi * (CONSUMERS * bq) + (CONSUMERS - 1) * bq)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    q0 = qi * (CONSUMERS * bq) + wg * bq
    steps, full = num_blocks(q0)
    q_tile, p_tile = q_smem.at[wg], p_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), head], q_tile, q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
    l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.full((bq, o_smem.shape[-1]), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step(j, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_bar.at[slot])

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].T)
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      s = s * np.float32(cfg.scale * LOG2E)           # logits in the log2 domain
      if masked:
        rows = q0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
        cols = j * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
        visible = cols < kv_limit
        if cfg.is_causal:
          visible = visible & (cols <= rows)
        s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      # Rows with nothing visible yet keep m = -inf; shifting them by 0 keeps exp2 finite (p = 0, alpha = 0).
      m_shift = jnp.where(m_new == -jnp.inf, np.float32(0.0), m_new)
      alpha = jnp.exp2(m - m_shift)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_shift, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      p_tile[...] = p.astype(dtype)
      plgpu.commit_smem()                              # make P visible to the wgmma (async proxy)
      plgpu.barrier_wait(v_bar.at[slot])

      def pv(o_ref):
        plgpu.wgmma(o_ref, p_tile, v_smem.at[slot])
        return o_ref[...]

      o = pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o
      return acc, m_new, l

    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
    acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

    empty = l == 0.0                                   # no visible key: zeros and lse = -inf
    l_safe = jnp.where(empty, np.float32(1.0), l)
    out_tile = o_smem.at[wg] if o_smem is not q_smem else q_tile
    out_tile[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
    lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * np.float32(LN2))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_tile, out_ref.at[b, pl.ds(q0, bq), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(q0, bq)])

    @pl.loop(steps, steps_max)
    def _free_unused(j):   # blocks streamed for the other consumer: wait for each (keeps phases right), free it
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_arrive(k_free.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])

    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    def load(j, slot):
      keys = (b, pl.ds(j * bk, bk), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

    for j in range(min(stages, cfg.Sp // bk)):   # fill the ring
      pl.when(j < steps_max)(functools.partial(load, j, j))

    def wait_free(j):   # both consumers freed step j's slot
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      return slot

    @pl.loop(stages, steps_max)
    def _refill(j):
      load(j, wait_free(j - stages))

    # Observe that the last blocks were freed too: no barrier phase may complete unobserved (the interpreter of
    # jax 0.11 rejects that when the barriers are freed; on hardware it only costs the idle producer a wait).
    @pl.loop(jnp.maximum(steps_max - stages, 0), steps_max)
    def _last_blocks_freed(j):
      wait_free(j)


def _forward_impl(cfg: _Config, q, k, v, kv_len):
  """Padded ``q [B, Tp, N, H]``, ``k [B, Sp, K, H]``, ``v [B, Sp, K, Hv]`` -> ``(out [B, Tp, N, Hv], lse [B, N,
  Tp])``."""
  B, Tp, N, H = q.shape
  Hv = v.shape[-1]
  blk = cfg.blocks
  bq, bk, stages = blk.block_q, blk.block_k, blk.num_stages
  q_smem = _smem((CONSUMERS, bq, H), q.dtype)
  o_smem = q_smem if H == Hv else _smem((CONSUMERS, bq, Hv), q.dtype)
  scratch = [
      q_smem, o_smem,
      _smem((stages, bk, H), q.dtype), _smem((stages, bk, Hv), q.dtype),
      _smem((CONSUMERS, bq, bk), q.dtype),
      plgpu.SMEM((CONSUMERS, bq), jnp.float32),
      plgpu.Barrier(num_barriers=CONSUMERS),                              # Q loaded (one per consumer)
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),   # K, V slot loaded
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),        # K slot freed by both consumers
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),        # V slot freed
  ]

  def body(*refs):
    n_in = 4 if cfg.has_kv_len else 3
    ins, outs = refs[:n_in], refs[n_in:n_in + 2]
    scoped = list(scratch)
    if o_smem is q_smem:   # O reuses Q's tile: allocate it once, hand the same ref to both names
      scoped.pop(1)

      def run(q_s, *others):
        _kernel(cfg, *ins, *outs, q_s, q_s, *others)
    else:
      def run(*allocated):
        _kernel(cfg, *ins, *outs, *allocated)
    pl.run_scoped(run, *scoped, collective_axes="wg")

  call = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((B, Tp, N, Hv), q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
      grid=(N, Tp // (CONSUMERS * bq), B), grid_names=("heads", "q_seq", "batch"),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=cfg.interpret)
  args = (q, k, v) + ((kv_len,) if cfg.has_kv_len else ())
  return call(*args)


def _backward(cfg: _Config, q, k, v, kv_len, out, lse, d_out, d_lse):
  from attention_jax.kernels import flash_mosaic_gpu_bwd as bwd   # it imports this module
  return bwd.mosaic_backward(cfg, q, k, v, kv_len, out, lse, d_out, d_lse)


# Residuals: the padded q, k, v, the lengths, out and the logsumexp (0 instead of -inf on rows with no key).
_flash = flash_custom_vjp(_forward_impl, _backward, finite_residuals=True)


def _resolve_interpret(interpret):
  """None: GPU interpret mode on CPU, compiled on GPU; ``core.UnsupportedError`` on other backends. ``True`` means
  the default interpret parameters."""
  if interpret is None:
    return plgpu.InterpretGPUParams() if compiled_on("gpu", _PATH) else None
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret or None


def _check_supported(inp: core.AttentionInputs) -> None:
  """``core.UnsupportedError`` for calls the kernel cannot take (dispatch then tries the next implementation)."""
  alt = "use implementation='pallas' (Triton), 'blockwise' or 'reference'"
  dtype = jnp.dtype(inp.query.dtype)
  if dtype not in DTYPES:
    raise core.UnsupportedError(f"{_PATH} takes bfloat16 or float16 inputs (wgmma operands); got {dtype} "
                                f"({inp.shapes}); {alt}")
  H, Hv = inp.query.shape[-1], inp.value.shape[-1]
  if H not in HEAD_DIMS or Hv not in HEAD_DIMS:
    raise core.UnsupportedError(f"{_PATH} takes head dims H, Hv in {HEAD_DIMS}; got H={H}, Hv={Hv} ({inp.shapes}); "
                                f"{alt}")
  refused = {"a mask array": inp.mask is not None, "a bias array": inp.bias is not None,
             "segment ids": inp.q_segment_ids is not None, "a local window": inp.window is not None,
             "a logits soft-cap": inp.logits_soft_cap is not None}
  for what, present in refused.items():
    if present:
      raise core.UnsupportedError(f"{_PATH} does not take {what} yet ({inp.shapes}); {alt}")


def mosaic_core(inp: core.AttentionInputs, *, block_sizes: BlockSizes | int | None = None, interpret=None
                ) -> tuple[jax.Array, jax.Array]:
  """Validated inputs through the forward kernel: ``(out [B, T, N, Hv], lse [B, N, T] float32)``, ``lse = -inf``
  and zeros on rows with no visible key. ``core.UnsupportedError`` for what the kernel cannot take; differentiating
  raises ``NotImplementedError``.

  ``interpret=None``: GPU interpret mode (``plgpu.InterpretGPUParams()``) on CPU, compiled on GPU; ``True`` or an
  ``InterpretGPUParams`` forces interpret mode, ``False`` compiles.
  """
  _check_supported(inp)
  B, T, N, H = inp.query.shape
  S, K, Hv = inp.value.shape[1:]
  block_sizes = check_block_sizes(block_sizes)
  blocks = BlockSizes.get_default(max(H, Hv), inp.query.dtype)
  if isinstance(block_sizes, BlockSizes):
    blocks = block_sizes
  elif block_sizes is not None:
    blocks = dataclasses.replace(blocks, block_k=block_sizes)
  smem = blocks.smem_bytes(H, Hv, inp.query.dtype.itemsize)
  if smem > SMEM_BYTES:
    raise core.UnsupportedError(f"{_PATH}: {blocks} needs {smem} bytes of shared memory at H={H}, Hv={Hv} "
                                f"(at most {SMEM_BYTES}); use smaller block_k or num_stages ({inp.shapes})")
  Tp = _numerics.round_up(max(T, 1), CONSUMERS * blocks.block_q)
  Sp = _numerics.round_up(max(S, 1), blocks.block_k)
  cfg = _Config(scale=_numerics.static_float("scale", inp.scale, path=_PATH), is_causal=inp.is_causal, T=T, S=S,
                Tp=Tp, Sp=Sp, groups=N // K, has_kv_len=inp.kv_lengths is not None, blocks=blocks,
                interpret=_resolve_interpret(interpret))
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  query = inp.query
  if inp.q_lengths is not None:   # rows beyond a query length: zeros in, so nothing of theirs reaches dK / dV
    query = jnp.where((jnp.arange(T)[None, :] < inp.q_lengths[:, None])[:, :, None, None], query, 0)
  q = _numerics.pad_axis(_numerics.nan_rows(query), 1, Tp)
  k = _numerics.pad_axis(_numerics.nan_rows(inp.key), 1, Sp)
  v = _numerics.pad_axis(inp.value, 1, Sp)
  kv_len = None if inp.kv_lengths is None else inp.kv_lengths.astype(jnp.int32)
  out, lse = _flash(cfg, q, k, v, (kv_len,))
  out, lse = out[:, :T], lse[:, :, :T]
  if inp.q_lengths is not None:   # rows at or beyond a query length see no key
    live_BT = jnp.arange(T)[None, :] < inp.q_lengths[:, None]
    out = jnp.where(live_BT[:, :, None, None], out, jnp.zeros_like(out))
    lse = jnp.where(live_BT[:, None, :], lse, -jnp.inf)
  # The P V product multiplies probabilities into the raw values, so a non-finite value a row cannot see would
  # reach it through 0 * NaN. Only the (small) output is checked; a non-finite one reruns the call through the
  # blockwise path, which selects around hidden positions.
  return lax.cond(jnp.all(jnp.isfinite(out)), lambda: (out, lse), lambda: _selecting_forward(inp))


def _selecting_forward(inp: core.AttentionInputs) -> tuple[jax.Array, jax.Array]:
  from attention_jax import blockwise
  out, lse = blockwise.blockwise_core(inp)
  return out.astype(inp.query.dtype), lax.stop_gradient(lse).astype(jnp.float32)


flash_attention_mosaic = core.implementation_function(
    mosaic_core, name="flash_attention_mosaic", module=__name__,
    options={"block_sizes": core.Option(None, check_block_sizes), "interpret": core.Option(None)},
    doc="""Flash attention for Hopper (Pallas Mosaic GPU); semantics of :func:`attention_jax.dot_product_attention`.

  ``query [*B, T, N, H]``, ``key [*B, S, K, H]``, ``value [*B, S, K, Hv]`` in bfloat16 / float16, H and Hv in
  {64, 128, 256} (the backward: 64, 128), ``N % K == 0``, causal, key / query lengths. ``block_sizes`` overrides
  :meth:`BlockSizes.get_default` (a plain int: ``block_k``); ``interpret=None`` runs GPU interpret mode on CPU and
  compiles on GPU. Other options raise ``core.UnsupportedError``.
  """)
flash_attention_mosaic_reference = core.reference_function(flash_attention_mosaic, module=__name__)
