"""Split-K decode attention as a Pallas kernel for GPU (Triton lowering), contiguous and paged KV caches.

Flash-decoding: grid ``(B, K, num_splits)``. Each program takes one kv head's query rows (the ``G`` query heads
of the GQA group times the ``Tq`` queries, packed into the rows of one tile, so the cache is read once per kv
head), loops over the key blocks of its range of the cache that some row can see (blocks past ``kv_lengths[b]``
or before every query's window are never read), and writes a normalised partial output and its logsumexp
(float32). One logsumexp merge in XLA follows (``decode.merge_splits``).

* Any cache length ``S_max >= 16`` without a copy: the last key block is shifted back to end at ``S_max`` and its
  columns that the previous block already covered are masked. Caches shorter than 16 entries, and head dims that
  are not a power of two >= 16, are zero-padded (a copy; allocate caches with power-of-two head dims).
* Paged caches: the pool ``[P, page_size, K, H]`` is read in place, one page per key block, the page id loaded
  from the row's page table; ``page_size`` must be a power of two >= 16 and ``H`` a power of two >= 16 (padding
  would copy the pool), else ``core.UnsupportedError`` and dispatch moves on.
* Hidden entries never reach a query: logits are selected to ``-inf``, values are cleaned with a select, and a
  row that sees a non-finite value is set to NaN (as in ``flash_gpu``).
* float64 and traced scales raise ``core.UnsupportedError``. The kernel has no derivative (decoding is inference):
  differentiating it raises ``NotImplementedError``.

On CPU the kernels run in Pallas interpret mode (``interpret=None`` decides by backend).
The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention_jax import core, decode
from attention_jax.kernels._common import F32_0, F32_1, compiled_on, not_differentiable

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_BLOCK = 16          # Triton's smallest dot operand side
MAX_HEAD_DIM = 256
# Programs per SM that keep a card busy when picking num_splits (flash-decoding's rule: enough programs to fill
# every SM about twice); the SM count comes from the device when it reports one.
_PROGRAMS_PER_SM = 2
_DEFAULT_SMS = 132


@dataclasses.dataclass(frozen=True)
class _Config:
  Tq: int
  R: int          # real rows: G * Tq
  Rp: int         # rows padded to a power of two >= 16
  bk: int         # key block (contiguous) or page size (paged)
  S: int          # cache length (contiguous) or max_pages * page_size (paged)
  n_blocks: int
  splits: int
  per_split: int  # key blocks per split
  scale: float
  soft_cap: float | None
  window_left: int | None
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2


def _pow2(n: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(n))


def _resolve_interpret(interpret):
  return compiled_on("gpu", "the Triton decode kernel") if interpret is None else bool(interpret)


def _check_supported(query, value, scale, shapes: str) -> None:
  if query.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise core.UnsupportedError(f"the Pallas decode kernel takes float32, bfloat16 or float16; got {query.dtype} "
                                f"({shapes}); use implementation='blockwise' or 'reference'")
  if not isinstance(scale, float):
    raise core.UnsupportedError("the Pallas decode kernel needs a static (concrete) scale; use 'blockwise'")
  H, Hv = query.shape[-1], value.shape[-1]
  if max(_pow2(H), _pow2(Hv)) > MAX_HEAD_DIM:
    raise core.UnsupportedError(f"the Pallas decode kernel takes head dims up to {MAX_HEAD_DIM}; got H={H}, Hv={Hv} "
                                f"({shapes}); use implementation='blockwise'")


def default_splits(B: int, K: int, n_blocks: int) -> int:
  """Enough programs to fill the card about twice over, never more splits than key blocks."""
  sms = _DEFAULT_SMS
  try:
    sms = int(getattr(jax.devices()[0], "core_count", 0)) or _DEFAULT_SMS
  except Exception:   # noqa: BLE001 -- any backend without the attribute
    pass
  return max(1, min(n_blocks, -(-(_PROGRAMS_PER_SM * sms) // max(B * K, 1))))


def _dot(a, b):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _row_positions(cfg: _Config, kv_len):
  """``[Rp, 1]`` position of each packed row (``-1`` on padding rows: they see nothing)."""
  r = jnp.arange(cfg.Rp, dtype=jnp.int32)[:, None]
  pos = kv_len - cfg.Tq + lax.rem(r, jnp.int32(cfg.Tq))
  return jnp.where(r < cfg.R, pos, -1)


def _block_range(cfg: _Config, kv_len):
  """Key blocks ``[lo, hi)`` of this program's split that some row can see."""
  s = pl.program_id(2)
  lo = s * cfg.per_split
  if cfg.window_left is not None:   # the first query's window starts here; earlier blocks are not read
    lo = jnp.maximum(lo, jnp.maximum(kv_len - cfg.Tq - cfg.window_left, 0) // cfg.bk)
  hi = jnp.minimum(jnp.minimum((s + 1) * cfg.per_split, cfg.n_blocks), (kv_len + cfg.bk - 1) // cfg.bk)
  return lo, hi


def _update(cfg: _Config, q, pos, k, v, cols, carry):
  """One key block of the online softmax (base 2); ``cols [1, bk]`` are the block's cache positions (entries
  ``< 0`` are columns to skip)."""
  acc, m, l, bad = carry
  s = _dot(q, k.T)
  s = jnp.where(jnp.isfinite(s), s, jnp.nan)   # a visible non-finite key poisons its row (hidden ones: selected away)
  if cfg.soft_cap is None:
    s = s * (cfg.scale * LOG2E)
  else:
    s = jnp.tanh(s * (cfg.scale / cfg.soft_cap)) * (cfg.soft_cap * LOG2E)
  vis = (cols <= pos) & (cols >= 0)
  if cfg.window_left is not None:
    vis = vis & (cols >= pos - cfg.window_left)
  s = jnp.where(vis, s, -jnp.inf)
  v_ok = jnp.isfinite(v)
  v_bad = jnp.max(jnp.where(v_ok, F32_0, F32_1), axis=1)                             # [bk]
  bad = jnp.maximum(bad, jnp.max(jnp.where(vis & (v_bad[None, :] > 0.0), F32_1, F32_0), axis=1))
  v = jnp.where(v_ok, v, jnp.zeros_like(v))
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp2(s - m_safe[:, None])
  correction = jnp.exp2(m - m_safe)
  l = l * correction + jnp.sum(p, axis=1)
  acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
  return acc, m_new, l, bad


def _finish(cfg: _Config, carry, o_ref, lse_ref):
  acc, m, l, bad = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  out = acc / l_safe[:, None]
  o_ref[...] = jnp.where(bad[:, None] > 0.0, jnp.nan, out)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _init(cfg: _Config, hvp: int):
  return (jnp.zeros((cfg.Rp, hvp), jnp.float32), jnp.full((cfg.Rp,), -jnp.inf, jnp.float32),
          jnp.zeros((cfg.Rp,), jnp.float32), jnp.zeros((cfg.Rp,), jnp.float32))


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  kv_len = len_ref[()]
  q = q_ref[...]
  pos = _row_positions(cfg, kv_len)
  lo, hi = _block_range(cfg, kv_len)

  def body(j, carry):
    # The last block is shifted back to end at S (no read past the cache); columns before j * bk were the
    # previous block's and are skipped.
    start = jnp.minimum(j * cfg.bk, cfg.S - cfg.bk)
    cols = start + jnp.arange(cfg.bk, dtype=jnp.int32)[None, :]
    cols = jnp.where(cols >= j * cfg.bk, cols, -1)
    k = k_ref[pl.ds(start, cfg.bk), :]
    v = v_ref[pl.ds(start, cfg.bk), :]
    return _update(cfg, q, pos, k, v, cols, carry)

  _finish(cfg, lax.fori_loop(lo, hi, body, _init(cfg, o_ref.shape[-1])), o_ref, lse_ref)


def _paged_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  kv_len = len_ref[()]
  q = q_ref[...]
  pos = _row_positions(cfg, kv_len)
  lo, hi = _block_range(cfg, kv_len)

  def body(j, carry):
    page = table_ref[j]
    cols = j * cfg.bk + jnp.arange(cfg.bk, dtype=jnp.int32)[None, :]
    return _update(cfg, q, pos, k_ref[page], v_ref[page], cols, carry)

  _finish(cfg, lax.fori_loop(lo, hi, body, _init(cfg, o_ref.shape[-1])), o_ref, lse_ref)


_NO_DERIVATIVE = ("the Pallas decode kernel has no derivative (decoding is inference); differentiate "
                  "decode_attention with implementation='blockwise' or 'reference'")


def _out_specs(cfg: _Config, hvp: int, B: int, K: int):
  specs = [pl.BlockSpec((None, None, None, cfg.Rp, hvp), lambda b, h, s: (b, h, s, 0, 0)),
           pl.BlockSpec((None, None, None, cfg.Rp), lambda b, h, s: (b, h, s, 0))]
  shapes = [jax.ShapeDtypeStruct((B, K, cfg.splits, cfg.Rp, hvp), jnp.float32),
            jax.ShapeDtypeStruct((B, K, cfg.splits, cfg.Rp), jnp.float32)]
  return specs, shapes


def _decode_call(cfg: _Config, lens, q, k, v):
  B, K, _, hp = q.shape
  hvp = v.shape[-1]
  out_specs, out_shape = _out_specs(cfg, hvp, B, K)
  return pl.pallas_call(
      functools.partial(_kernel, cfg=cfg), grid=(B, K, cfg.splits),
      in_specs=[pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, None, cfg.Rp, hp), lambda b, h, s: (b, h, 0, 0)),
                pl.BlockSpec((None, cfg.S, None, hp), lambda b, h, s: (b, 0, h, 0)),
                pl.BlockSpec((None, cfg.S, None, hvp), lambda b, h, s: (b, 0, h, 0))],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="attention_jax_decode")(lens, q, k, v)


def _paged_call(cfg: _Config, lens, table, q, k, v):
  B, K, _, hp = q.shape
  P, ps = k.shape[:2]
  hvp = v.shape[-1]
  out_specs, out_shape = _out_specs(cfg, hvp, B, K)
  return pl.pallas_call(
      functools.partial(_paged_kernel, cfg=cfg), grid=(B, K, cfg.splits),
      in_specs=[pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, table.shape[1]), lambda b, h, s: (b, 0)),
                pl.BlockSpec((None, None, cfg.Rp, hp), lambda b, h, s: (b, h, 0, 0)),
                pl.BlockSpec((P, ps, None, hp), lambda b, h, s: (0, 0, h, 0)),
                pl.BlockSpec((P, ps, None, hvp), lambda b, h, s: (0, 0, h, 0))],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="attention_jax_paged_decode")(lens, table, q, k, v)


_decode_call = not_differentiable(_decode_call, "decode", _NO_DERIVATIVE)
_paged_call = not_differentiable(_paged_call, "decode", _NO_DERIVATIVE)


def _packed_query(query, K: int, Rp: int, hp: int):
  """``[B, Tq, N, H] -> [B, K, Rp, hp]``: the GQA group's rows packed and zero-padded (a small copy)."""
  q = decode._rows(query, K)
  return jnp.pad(q, ((0, 0), (0, 0), (0, Rp - q.shape[2]), (0, hp - q.shape[3])))


def _merge(cfg: _Config, o, lse, query, Hv: int) -> jax.Array:
  out = decode.merge_splits(o, lse, axis=2)[:, :, :cfg.R, :Hv]     # [B, K, R, Hv]
  return decode._unrows(out, cfg.Tq).astype(query.dtype)


def _block_size(H: int) -> int:
  return 64 if H > 128 else 128


def decode_core(inp: decode.DecodeInputs, *, num_splits: int | None = None, interpret=None,
                block_k: int | None = None) -> jax.Array:
  """``[B, Tq, N, Hv]`` from validated inputs (``core.UnsupportedError`` for what the kernel cannot take)."""
  q, k, v = inp.query, inp.key, inp.value
  _check_supported(q, v, inp.scale, inp.shapes)
  interpret = _resolve_interpret(interpret)
  B, Tq, N, H = q.shape
  S, K, Hv = v.shape[1:]
  hp, hvp = _pow2(H), _pow2(Hv)
  if S < MIN_BLOCK or hp != H or hvp != Hv:   # tiny caches and odd head dims: zero-padded (a copy)
    Sp = max(S, MIN_BLOCK)
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, hp - H)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, hvp - Hv)))
    S = Sp
  bk = block_k or _block_size(max(hp, hvp))
  bk = min(bk, 1 << (S.bit_length() - 1))   # a power of two <= S
  n_blocks = -(-S // bk)
  splits = min(num_splits or default_splits(B, K, n_blocks), n_blocks)
  per_split = -(-n_blocks // splits)
  R = (N // K) * Tq
  cfg = _Config(Tq=Tq, R=R, Rp=_pow2(R), bk=bk, S=S, n_blocks=n_blocks, splits=-(-n_blocks // per_split),
                per_split=per_split, scale=inp.scale, soft_cap=inp.logits_soft_cap, window_left=inp.window_left,
                interpret=interpret)
  o, lse = _decode_call(cfg, inp.kv_lengths, _packed_query(q, K, cfg.Rp, hp), k, v)
  return _merge(cfg, o, lse, q, Hv)


def paged_decode_core(inp: decode.PagedInputs, *, num_splits: int | None = None, interpret=None) -> jax.Array:
  """The paged cache read in place (see the module docstring)."""
  q, kp, vp, table = inp.query, inp.key_pages, inp.value_pages, inp.page_table
  shapes = f"query.shape={q.shape} key_pages.shape={kp.shape} value_pages.shape={vp.shape}"
  _check_supported(q, vp, inp.scale, shapes)
  interpret = _resolve_interpret(interpret)
  B, Tq, N, H = q.shape
  P, ps, K, Hv = vp.shape
  if ps < MIN_BLOCK or ps != pl.next_power_of_2(ps) or H != _pow2(H) or Hv != _pow2(Hv):
    raise core.UnsupportedError(f"the Pallas paged decode kernel reads whole pages as tiles: page_size and the "
                                f"head dims must be powers of two >= {MIN_BLOCK}; got page_size={ps}, H={H}, "
                                f"Hv={Hv} ({shapes}); use implementation='blockwise'")
  M = table.shape[1]
  splits = min(num_splits or default_splits(B, K, M), M)
  per_split = -(-M // splits)
  R = (N // K) * Tq
  cfg = _Config(Tq=Tq, R=R, Rp=_pow2(R), bk=ps, S=M * ps, n_blocks=M, splits=-(-M // per_split),
                per_split=per_split, scale=inp.scale, soft_cap=inp.logits_soft_cap, window_left=inp.window_left,
                interpret=interpret)
  o, lse = _paged_call(cfg, inp.kv_lengths, table, _packed_query(q, K, cfg.Rp, H), kp, vp)
  return _merge(cfg, o, lse, q, Hv)

