"""Split-K decode attention as a Pallas kernel for TPU (Mosaic lowering), over contiguous and paged KV caches.

Semantics: :mod:`attention_jax.decode` (query ``i`` of row ``b`` sits at ``kv_lengths[b] − Tq + i``; entries
beyond it or outside the window never reach an output; rows with no visible entry give zeros).

Layout (no transpose, no gather, no copy of the cache along its length):

* rows: the ``G = N // K`` query heads of a kv head and the ``Tq`` queries are packed into the rows of one tile,
  row ``r = g·Tq + i`` (``decode._rows``), padded to a multiple of the sublane tiling: each grid step reads a
  cache tile once for all the query heads that share it.
* cache: ``[B, S_max, K, H]`` is viewed as ``[B, S_max, K·Hp]`` (``Hp``: the head dim rounded up to the 128-lane
  width) and kv head ``h`` is the lane block ``[h·Hp, (h+1)·Hp)``, as in :mod:`flash_tpu`. With ``H`` (and ``Hv``) a
  multiple of 128 nothing is padded; otherwise the head dim is zero-padded, **which copies the cache on every
  call** (use head dims that are multiples of 128 for decoding on TPU). On TPU, XLA lays out ``[..., K, H]`` and
  ``[..., K·H]`` arrays with different (8, 128) tilings, so the view itself may also be materialised as a relayout
  copy unless the cache is already stored that way; this has not been measured (no TPU was available).
  The cache length is never padded: a last block that runs past ``S_max`` is a partial Pallas block whose
  out-of-range rows are hidden by the position mask (a select), whatever they hold.
* paged: pages ``[P, page_size, K, H]`` are viewed the same way and read **in place**: one grid step reads
  ``pages_per_block`` pages through as many BlockSpecs of the same pool, each index map looking its page id up in
  the scalar-prefetched page table. Compiled, ``page_size`` must be a multiple of the sublane tiling (8 rows for
  32-bit, 16 for 16-bit inputs; ``core.UnsupportedError`` otherwise); interpreted, any page size works.

Grid ``(B, K, num_splits, steps)``: the cache is cut into ``num_splits`` contiguous ranges of ``steps`` blocks;
the last axis is sequential ("arbitrary") and runs an online softmax in VMEM scratch (running max and sum
lane-replicated ``[R, 128]``, a float32 ``[R, Hvp]`` accumulator). Each split writes a normalised float32 partial
output and its logsumexp (-inf for rows with no visible entry); ``decode.merge_splits`` combines them in XLA.

* block skipping: ``kv_lengths`` (and the page table) are scalar-prefetched; the key/value index maps clamp a
  block index to the range of blocks the row needs (separately for each page slot of a step), so blocks past the
  length or before the window repeat the previous block index (no new DMA) and their compute is skipped with
  ``pl.when``. Blocks that every real row sees entirely run without a mask.
* hidden entries never reach a query: masked blocks select hidden logits to -inf and use
  ``where(isfinite(v), v, 0)`` in P @ V, with a per-row count of visible non-finite values that turns those rows
  into NaN. A non-finite logit (from a non-finite key entry; the query rows are NaN-ed up front) is turned into
  NaN before the soft-cap and the mask, so a visible one poisons its row (a -inf would silently drop the entry,
  the cap would flatten an inf) and a hidden one is selected away.
* block sizes: contiguous, 512 entries (256 when ``Hp + Hvp > 512``), or the whole cache when it is shorter;
  paged, ``pages_per_block = min(16, max(1, 512 // page_size))`` pages. ``num_splits=None``: 1 on a CPU backend
  (interpret mode), otherwise one split per 512 cache entries, at most 16 (a single-core TPU runs the grid
  sequentially, so splits only pay off on chips with several TensorCores; unmeasured).
* float32 statistics and accumulation; float32 inputs use full-precision matmuls; float64 is refused, and so is
  float16 when compiled (not a native TPU type; interpreted, its tiles are widened to float32 in the kernel).
  The scale and soft-cap must be static. No derivative: differentiating raises ``NotImplementedError``.

``interpret=None`` compiles on TPU and runs Pallas's interpreter on CPU; ``pltpu.InterpretParams()`` selects the
TPU interpret mode (simulated DMAs and VMEM). Other backends raise ``core.UnsupportedError``.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention_jax import _numerics, _tiling, core, decode
from attention_jax.kernels._common import F32_0, F32_1, compiled_on, not_differentiable

LANES = 128
SUBLANES = 8
BLOCK_K = 512                # default cache entries per grid step
SPLIT_ENTRIES = 512          # num_splits=None: one split per this many entries ...
MAX_SPLITS = 16              # ... and at most this many
MAX_PAGES_PER_BLOCK = 16
_NO_ROW = -(2 ** 30)         # position offset of padding rows: they see nothing
_NAN = np.float32(np.nan)
_PATH = "the Pallas TPU decode kernel"


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one kernel call (hashable)."""
  scale: float
  soft_cap: float | None
  window_left: int | None    # None also when the window reaches past the whole cache
  Tq: int
  page: int                  # cache entries per fetched tile: a block (contiguous) or a page (paged)
  tiles: int                 # tiles per grid step (1 for a contiguous cache)
  splits: int
  steps: int                 # grid steps per split
  slots: int                 # tile slots per row: blocks of the cache, or columns of the (padded) page table
  paged: bool
  hp: int
  hvp: int
  widen: bool                # float16 tiles widened to float32 in the kernel (interpret mode only)
  interpret: Any

  @property
  def block(self) -> int:
    """Cache entries per grid step."""
    return self.page * self.tiles


# ----------------------------------------------------------------------------------------------------------
# Geometry (plain jnp on int32 scalars: runs in the index maps and in the kernel)
# ----------------------------------------------------------------------------------------------------------


def _lowest_visible(cfg: _Config, kv_len):
  """The lowest cache position any query of the row sees."""
  if cfg.window_left is None:
    return jnp.int32(0)
  return jnp.maximum(kv_len - cfg.Tq - cfg.window_left, 0)


def _slot(cfg: _Config, t: int, b, s, u, lens_ref):
  """The tile slot that tile ``t`` of grid step ``(b, ·, s, u)`` reads: its own when the row needs it, else the
  nearest needed slot of the same tile position ``t`` (so that skipped steps repeat the previous block index and
  issue no DMA)."""
  kv_len = lens_ref[b]
  n = cfg.tiles
  hi = _tiling.cdiv(kv_len, cfg.page)                          # slots [lo, hi) hold entries the row sees
  lo = _tiling.floordiv(_lowest_visible(cfg, kv_len), cfg.page)
  g_hi = _tiling.floordiv(hi - 1 - t + n, n) - 1               # last step whose tile t is needed
  g_lo = _tiling.floordiv(lo - t + n - 1, n)                   # first one
  g = jnp.minimum(jnp.maximum(s * cfg.steps + u, g_lo), jnp.maximum(g_hi, g_lo))
  return jnp.minimum(g * n + t, cfg.slots - 1)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _dot(a, b, trans_b: bool = False):
  """float32-accumulated tile matmul ``a @ b`` (or ``a @ b.T``); float32 inputs use fp32 MXU passes."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _finite(x):
  return jnp.isfinite(x.astype(jnp.float32))


def _widen(x_R128, width: int):
  """A lane-replicated ``[R, 128]`` statistic (or row offset) as ``[R, width]``."""
  if width % LANES == 0:
    return x_R128 if width == LANES else jnp.tile(x_R128, (1, width // LANES))
  return jnp.broadcast_to(x_R128[:, :1], (x_R128.shape[0], width))


def _load(cfg: _Config, refs):
  """The step's cache tile ``[block, Hp]``: its ``tiles`` page tiles stacked along the rows."""
  x = refs[0][...] if len(refs) == 1 else jnp.concatenate([r[...] for r in refs], axis=0)
  return x.astype(jnp.float32) if cfg.widen else x


def _kernel(lens_ref, *refs, cfg: _Config):
  refs = refs[1:] if cfg.paged else refs                       # the page table is only read by the index maps
  off_ref, q_ref = refs[:2]
  k_refs, v_refs = refs[2:2 + cfg.tiles], refs[2 + cfg.tiles:2 + 2 * cfg.tiles]
  o_ref, lse_ref, m_ref, l_ref, acc_ref, bad_ref = refs[2 + 2 * cfg.tiles:]
  b, split, u = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_len = lens_ref[b]
  L = cfg.block
  start = (split * cfg.steps + u) * L

  @pl.when(u == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...]
    q = q.astype(jnp.float32) if cfg.widen else q
    k, v = _load(cfg, k_refs), _load(cfg, v_refs)
    s = _dot(q, k, trans_b=True)                                         # [R, L]
    # Non-finite logits come from non-finite keys: NaN, so that a visible one poisons its row (a -inf would
    # silently drop the entry, the soft-cap would flatten an inf) and a hidden one is selected away below.
    s = jnp.where(jnp.isfinite(s), s, _NAN)
    if cfg.soft_cap is None:
      s = s * cfg.scale
    else:
      s = jnp.tanh(s * (cfg.scale / cfg.soft_cap)) * cfg.soft_cap
    if masked:
      pos = kv_len + _widen(off_ref[...], L)                              # [R, L]
      col = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      vis = col <= pos
      if cfg.window_left is not None:
        vis = vis & (col >= pos - cfg.window_left)
      s = jnp.where(vis, s, -jnp.inf)
      # P @ V multiplies only finite values; rows that see a non-finite value are counted and become NaN.
      v_bad = jnp.logical_not(_finite(v))                                # [L, Hvp]
      v = jnp.where(v_bad, jnp.zeros_like(v), v)
      bad_keys = jnp.max(jnp.where(v_bad, F32_1, F32_0), axis=1, keepdims=True)   # [L, 1]
      bad_ref[...] += _dot(jnp.where(vis, F32_1, F32_0).astype(jnp.bfloat16),      # exact 0/1 counts
                           jnp.broadcast_to(bad_keys, (L, LANES)).astype(jnp.bfloat16))
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))     # [R, 128]
    m_safe = jnp.where(m_next == -jnp.inf, F32_0, m_next)               # rows that have seen no entry yet
    p = jnp.exp(s - _widen(m_safe, L))
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _widen(alpha, cfg.hvp) + _dot(p.astype(v.dtype), v)

  # The block's entries [start, start + L) against the rows' positions [kv_len - Tq, kv_len - 1].
  needed = (start < kv_len) & (start + L > _lowest_visible(cfg, kv_len))
  full = start + L <= kv_len - cfg.Tq + 1
  if cfg.window_left is not None:
    full = full & (start >= kv_len - 1 - cfg.window_left)
  pl.when(needed & full)(lambda: step(False))
  pl.when(needed & jnp.logical_not(full))(lambda: step(True))

  @pl.when(u == cfg.steps - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0                       # no visible entry in this split (a NaN sum is not empty: it propagates)
    l_safe = jnp.where(empty, F32_1, l)
    out = acc_ref[...] * _widen(1.0 / l_safe, cfg.hvp)
    o_ref[...] = jnp.where(_widen(bad_ref[...], cfg.hvp) > 0.0, _NAN, out)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))


def _partials(cfg: _Config, lens, table, off, q, k, v):
  """``(out [B, K, splits, R, Hvp], lse [B, K, splits, R, 128])`` float32, one normalised partial per split."""
  B, K, R, _ = q.shape

  def cache_spec(width: int, t: int):
    if cfg.paged:
      index = lambda b, h, s, u, lens_ref, table_ref: (
          table_ref[b * cfg.slots + _slot(cfg, t, b, s, u, lens_ref)], 0, h)
    else:
      index = lambda b, h, s, u, lens_ref: (b, _slot(cfg, t, b, s, u, lens_ref), h)
    return pl.BlockSpec((None, cfg.page, width), index)

  fixed = lambda *_: (0, 0)
  head = lambda b, h, s, u, *_: (b, h, 0, 0)
  split = lambda b, h, s, u, *_: (b, h, s, 0, 0)
  in_specs = [pl.BlockSpec((R, LANES), fixed), pl.BlockSpec((None, None, R, cfg.hp), head),
              *(cache_spec(cfg.hp, t) for t in range(cfg.tiles)), *(cache_spec(cfg.hvp, t) for t in range(cfg.tiles))]
  out_specs = [pl.BlockSpec((None, None, None, R, cfg.hvp), split), pl.BlockSpec((None, None, None, R, LANES), split)]
  out_shape = [jax.ShapeDtypeStruct((B, K, cfg.splits, R, cfg.hvp), jnp.float32),
               jax.ShapeDtypeStruct((B, K, cfg.splits, R, LANES), jnp.float32)]
  scratch = [pltpu.VMEM((R, LANES), jnp.float32), pltpu.VMEM((R, LANES), jnp.float32),
             pltpu.VMEM((R, cfg.hvp), jnp.float32), pltpu.VMEM((R, LANES), jnp.float32)]
  prefetch = (lens, table) if cfg.paged else (lens,)
  # Interpret mode gets no dimension semantics (as in flash_tpu: the TPU interpreter does not extend them to the
  # grid axes jax.vmap prepends).
  semantics = None if cfg.interpret else ("parallel", "parallel", "parallel", "arbitrary")
  return pl.pallas_call(
      functools.partial(_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=(B, K, cfg.splits, cfg.steps),
                                             in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=cfg.interpret, name="attention_jax_decode_tpu_paged" if cfg.paged else "attention_jax_decode_tpu",
  )(*prefetch, off, q, *(k,) * cfg.tiles, *(v,) * cfg.tiles)


_NO_DERIVATIVE = (f"{_PATH} has no derivative (decoding is inference); differentiate decode_attention / "
                  "paged_decode_attention with implementation='blockwise' or 'reference' instead")


_partials_no_grad = not_differentiable(_partials, "decode", _NO_DERIVATIVE)


# ----------------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------------


def _resolve_interpret(interpret):
  """None: compiled on TPU, Pallas's interpreter on CPU; a bool or ``pltpu.InterpretParams`` as given."""
  if interpret is None:
    return compiled_on("tpu", _PATH)
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret)
  raise ValueError(f"interpret must be None, a bool or a pltpu.InterpretParams; got {interpret!r}")


def _sublanes(dtype) -> int:
  """Rows of the TPU's native tile for ``dtype`` (8 for 32-bit, 16 for 16-bit)."""
  return SUBLANES * 4 // jnp.dtype(dtype).itemsize


def _check_dtype(dtype, interpret, shapes: str) -> bool:
  """Whether float16 tiles must be widened; ``core.UnsupportedError`` for dtypes the kernel cannot take."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    raise core.UnsupportedError(f"{_PATH} computes in float32 and cannot keep float64 inputs in float64 ({shapes}); "
                                "use implementation='blockwise' or 'reference'")
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
    raise core.UnsupportedError(f"{_PATH} takes bfloat16 or float32 inputs; got {dtype} ({shapes})")
  if dtype == jnp.float16:
    if interpret is False:
      raise core.UnsupportedError(f"{_PATH} does not take float16 when compiled (not a native TPU type) ({shapes}); "
                                  "store the cache in bfloat16 or use implementation='blockwise'")
    return True
  return False


def default_num_splits(cache_len: int, backend: str | None = None) -> int:
  """``num_splits=None``: one split on a CPU backend (interpret mode), otherwise one per ``SPLIT_ENTRIES`` cache
  entries, at most ``MAX_SPLITS``."""
  if (backend or jax.default_backend()) == "cpu":
    return 1
  return max(1, min(MAX_SPLITS, cache_len // SPLIT_ENTRIES))


def _plan(num_splits: int | None, groups: int, cache_len: int) -> tuple[int, int]:
  """``(splits, steps)`` covering ``groups`` grid steps: at most ``groups`` splits (more would be empty)."""
  n = default_num_splits(cache_len) if num_splits is None else num_splits
  n = max(1, min(n, groups))
  steps = -(-groups // n)
  return -(-groups // steps), steps


def _query_rows(q_BTNH: jax.Array, K: int, R: int, hp: int, dtype) -> tuple[jax.Array, jax.Array]:
  """Packed query rows ``[B, K, R, Hp]`` (a non-finite query row becomes NaN, zero padding) and the position offset
  of each row, ``[R, 128]`` int32 lane-replicated: row ``g·Tq + i`` sits at ``kv_length − Tq + i``."""
  B, Tq, N, H = q_BTNH.shape
  q = decode._rows(_numerics.nan_rows(q_BTNH), K).astype(dtype)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, R - q.shape[2]), (0, hp - H)))
  rows = np.arange(R)
  off = np.where(rows < (N // K) * Tq, rows % Tq - Tq, _NO_ROW).astype(np.int32)
  return q, jnp.asarray(np.broadcast_to(off[:, None], (R, LANES)))


def _flat(x: jax.Array, width: int) -> jax.Array:
  """``[A, L, K, H] -> [A, L, K·width]`` (the head dim zero-padded to ``width``: a copy only when ``H < width``)."""
  x = _numerics.pad_axis(x, 3, width)
  return x.reshape(*x.shape[:2], -1)


def _window(window_left: int | None, cache_len: int) -> int | None:
  """A window reaching past the whole cache hides nothing (and would not fit int32 arithmetic)."""
  return None if window_left is None or window_left >= cache_len else int(window_left)


def _merge(cfg: _Config, out, lse, G: int, Tq: int, Hv: int, dtype) -> jax.Array:
  """Merged splits -> ``[B, Tq, N, Hv]`` in ``dtype``."""
  out = out[:, :, 0] if cfg.splits == 1 else decode.merge_splits(out, lse[..., 0], axis=2)
  return decode._unrows(out[:, :, :G * Tq, :Hv], Tq).astype(dtype)


def _check_block(block_k, S: int, interpret) -> int:
  if block_k is None:
    return S
  if not isinstance(block_k, (int, np.integer)) or isinstance(block_k, bool) or block_k <= 0 or block_k % SUBLANES:
    raise ValueError(f"block_k must be a positive multiple of {SUBLANES}; got {block_k!r}")
  if interpret is False and block_k % LANES and block_k < S:
    raise core.UnsupportedError(f"{_PATH} needs block_k to be a multiple of {LANES} when compiled; got {block_k}")
  return int(block_k)


def decode_core(inp: decode.DecodeInputs, *, num_splits: int | None, interpret=None,
                block_k: int | None = None) -> jax.Array:
  """``decode.DecodeInputs`` -> ``[B, Tq, N, Hv]`` in the query dtype. ``block_k``: cache entries per grid step
  (default: ``BLOCK_K``, 256 for wide heads, or the whole cache when shorter). ``core.UnsupportedError`` for what
  the kernel cannot take."""
  q, k, v = inp.query, inp.key, inp.value
  B, Tq, N, H = q.shape
  S, K, Hv = v.shape[1:]
  interpret = _resolve_interpret(interpret)
  widen = _check_dtype(q.dtype, interpret, inp.shapes)
  scale = _numerics.static_float("scale", inp.scale, path=_PATH)
  if 0 in (B, Tq, N, Hv, S):
    return jnp.zeros((B, Tq, N, Hv), q.dtype)
  hp, hvp = _numerics.round_up(H, LANES), _numerics.round_up(Hv, LANES)
  if block_k is None:
    block_k = BLOCK_K if hp + hvp <= 4 * LANES else BLOCK_K // 2
  bk = min(_check_block(block_k, S, interpret), S)   # a block of the whole cache is legal whatever its length
  blocks = -(-S // bk)
  splits, steps = _plan(num_splits, blocks, S)
  G = N // K
  R = _numerics.round_up(G * Tq, _sublanes(q.dtype))
  cfg = _Config(scale=scale, soft_cap=inp.logits_soft_cap, window_left=_window(inp.window_left, S), Tq=Tq, page=bk,
                tiles=1, splits=splits, steps=steps, slots=blocks, paged=False, hp=hp, hvp=hvp, widen=widen,
                interpret=interpret)
  q_rows, off = _query_rows(q, K, R, hp, q.dtype)
  out, lse = _partials_no_grad(cfg, inp.kv_lengths.astype(jnp.int32), None, off, q_rows, _flat(k, hp), _flat(v, hvp))
  return _merge(cfg, out, lse, G, Tq, Hv, q.dtype)


def paged_decode_core(inp: decode.PagedInputs, *, num_splits: int | None, interpret=None,
                      pages_per_block: int | None = None) -> jax.Array:
  """``decode.PagedInputs`` -> ``[B, Tq, N, Hv]`` in the query dtype, the pages read in place.
  ``pages_per_block``: pages per grid step (default ``min(16, max(1, 512 // page_size))``)."""
  q, kp, vp, table = inp.query, inp.key_pages, inp.value_pages, inp.page_table
  B, Tq, N, H = q.shape
  P, ps, K, Hv = vp.shape
  M = table.shape[1]
  shapes = f"query.shape={q.shape} key_pages.shape={kp.shape} value_pages.shape={vp.shape}"
  interpret = _resolve_interpret(interpret)
  widen = _check_dtype(q.dtype, interpret, shapes)
  scale = _numerics.static_float("scale", inp.scale, path=_PATH)
  if 0 in (B, Tq, N, Hv, M):
    return jnp.zeros((B, Tq, N, Hv), q.dtype)
  if interpret is False and ps % _sublanes(q.dtype):
    raise core.UnsupportedError(
        f"{_PATH} needs page_size to be a multiple of {_sublanes(q.dtype)} (the TPU tile rows for {q.dtype}) when "
        f"compiled; got page_size={ps} ({shapes}); use implementation='blockwise'")
  if pages_per_block is None:
    pages_per_block = min(MAX_PAGES_PER_BLOCK, max(1, BLOCK_K // ps))
  elif not isinstance(pages_per_block, (int, np.integer)) or isinstance(pages_per_block, bool) or pages_per_block < 1:
    raise ValueError(f"pages_per_block must be a positive int; got {pages_per_block!r}")
  ppb = min(int(pages_per_block), M)
  splits, steps = _plan(num_splits, -(-M // ppb), M * ps)
  W = splits * steps * ppb                              # page-table columns the grid reaches (padding: page 0)
  G = N // K
  R = _numerics.round_up(G * Tq, _sublanes(q.dtype))
  hp, hvp = _numerics.round_up(H, LANES), _numerics.round_up(Hv, LANES)
  cfg = _Config(scale=scale, soft_cap=inp.logits_soft_cap, window_left=_window(inp.window_left, M * ps), Tq=Tq,
                page=ps, tiles=ppb, splits=splits, steps=steps, slots=W, paged=True, hp=hp, hvp=hvp, widen=widen,
                interpret=interpret)
  q_rows, off = _query_rows(q, K, R, hp, q.dtype)
  table = _numerics.pad_axis(table.astype(jnp.int32), 1, W).reshape(-1)
  out, lse = _partials_no_grad(cfg, inp.kv_lengths.astype(jnp.int32), table, off, q_rows, _flat(kp, hp),
                               _flat(vp, hvp))
  return _merge(cfg, out, lse, G, Tq, Hv, q.dtype)
