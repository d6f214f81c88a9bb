"""``flex_attention``'s ``implementation="pallas"``: Pallas kernels for GPU (Triton lowering), forward and
backward, with ``score_mod`` / ``mask_mod`` traced into the tiles and the :class:`~attention_jax.flex.BlockMask`'s
block lists driving the loops.

* tiles are the block mask's blocks ``(bq, bk)``; the wrapper pads T and S to whole blocks and the query/key and
  value head dims each to a power of two (zeros), as the flash kernel does.
* forward: grid ``(query blocks, B, N)``; program ``(i, b, n)`` reads its query block's lists (at ``b`` / ``n``, or 0
  where the mask does not depend on them), visits the full key blocks without ``mask_mod`` and the partial ones with
  it (and ``q < T``, ``kv < S``), loading each key block with a dynamic slice; online softmax in float32; writes
  the output and the logsumexp.
* backward: a dK/dV kernel, grid ``(key blocks, B, K)``, looping over the G query heads of its kv head and, for
  each, over the query blocks of the transposed lists; a dQ kernel, grid ``(query blocks, B, N)``, over the key
  lists. ``delta = rowsum(dO * O) - d_lse`` comes from XLA. Gradients of the floating-point arrays a ``score_mod``
  closes over come from ``jax.vjp`` of the tile's ``score_mod`` inside the dK/dV kernel (each program writes its
  partial sums; XLA adds them up); integer arrays get none.
* ``score_mod`` sees the scaled logit in float32 with the real ``b`` and ``n``; ``mask_mod`` gets ``b`` / ``n`` as
  the block mask was built (0 on an axis it does not depend on). The arrays the mods close over enter each
  program whole.
* semantics of :func:`attention_jax.flex.blockwise_impl`: hidden pairs never reach a query (masked tiles select,
  clean values with a per-row flag for visible non-finite ones, select ``dS`` and clean q / k in the dK / dQ
  products; a hidden pair's logit is 0 when the ``score_mod`` and its derivative see it); a row with no visible key
  gives zeros and a ``-inf`` logsumexp, with finite gradients. A non-finite query or key row makes every logit it
  enters NaN (as the flash kernel does), so a query that sees it comes out NaN.

On CPU the kernels run in Pallas interpret mode; that is what the tests check numerically. The compiled GPU path
is unverified here (no GPU): the tests only lower it to Triton IR for an abstract H100. Triton lowers neither
gathers nor scatters, so the mods are re-evaluated with every element lookup in a captured array (``slopes[n]``,
``table[bucket, n]``, ``ids[b, q_idx]``) computed as a one-hot select and sum over that array, and their
derivatives as selects; this is exact, but costs ``O(tile x array size)`` where the index varies over the tile, so
it suits small arrays (slopes, a bias table, short document ids), not ``[B, T]`` ids of long sequences. float64, a
traced scale, head dims above 256, other backends and, when compiling, block sizes that are not powers of two >= 16
or captured arrays whose dims are not powers of two raise ``core.UnsupportedError``, so ``flex_attention``'s
automatic choice moves on to "blockwise".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention_jax import _numerics, flex
from attention_jax._checks import UnsupportedError
from attention_jax.kernels._common import F32_0, F32_1, compiled_on, flash_custom_vjp
from attention_jax.kernels.flash_gpu import MAX_HEAD_DIM, padded_head_dim

_PATH = "flex_attention's Pallas GPU kernel (implementation='pallas')"
_ALTERNATIVES = "use implementation='blockwise' or 'reference'"


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: a custom-VJP static argument)."""
  scale: float
  T: int                 # true lengths; Tp / Sp are the padded ones (whole blocks)
  S: int
  Tp: int
  Sp: int
  bq: int
  bk: int
  groups: int            # G = N // K
  Bm: int                # the block mask's batch / head sizes (1: it does not depend on that axis)
  Nm: int
  score_fn: Callable | None
  mask_fn: Callable | None
  score_shapes: tuple[tuple[int, ...], ...]   # shapes of the arrays score_mod closes over
  score_float: tuple[bool, ...]               # which of them are floating point (they get gradients)
  mask_shapes: tuple[tuple[int, ...], ...]
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the kernels
# ----------------------------------------------------------------------------------------------------------


def _dot(a, b):
  """float32-accumulated tile matmul; float32 inputs use IEEE products (Triton's default would be TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _clean(x):
  """Non-finite entries replaced by 0 (a select, so hidden garbage never meets a multiply)."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _const_block(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The block a captured array travels in: itself, a scalar as ``(1,)``."""
  return shape if shape else (1,)


def _read_consts(r: dict, prefix: str, shapes) -> list:
  """The captured arrays, loaded whole from their refs (scalars from their ``(1,)`` block)."""
  return [r[f"{prefix}{c}"][0] if not shape else r[f"{prefix}{c}"][...] for c, shape in enumerate(shapes)]


def _visible(cfg: _Config, b_m, n_m, rows, cols, mc):
  """A partial tile's visibility: real positions and ``mask_mod`` (at the block mask's ``b_m``, ``n_m``)."""
  vis = (rows < cfg.T)[:, None] & (cols < cfg.S)[None, :]
  if cfg.mask_fn is not None:
    vis = vis & flex.tile_mask(cfg.mask_fn, mc, b_m, n_m, rows, cols)
  return vis


def _raw(cfg: _Config, q, k, vis):
  """Scaled tile logits before ``score_mod``; 0 at hidden pairs (so the mod and its derivative see finite input)."""
  raw = _dot(q, k.T) * cfg.scale
  return raw if vis is None else jnp.where(vis, raw, F32_0)


def _float_positions(cfg: _Config) -> list[int]:
  return [c for c, is_float in enumerate(cfg.score_float) if is_float]


def _score_with(cfg: _Config, sc, b, n, rows, cols):
  """``g(raw, float_consts) -> scores``: the tile's ``score_mod`` as a function of what gets gradients."""
  pos = _float_positions(cfg)

  def g(raw, float_consts):
    consts = list(sc)
    for p, val in zip(pos, float_consts):
      consts[p] = val
    return flex.tile_scores(cfg.score_fn, consts, raw, b, n, rows, cols)
  return g, [sc[p] for p in pos]


def _one_hot_slice(x, *starts, slice_sizes):
  """``dynamic_slice(x, starts, (1, ..., 1))`` without indexing: ``x`` selected where every axis's iota equals its
  (clamped, as ``dynamic_slice`` does) start, then summed. Exact; its derivative is a select, never a scatter."""
  del slice_sizes
  hit = None
  for axis, (d, start) in enumerate(zip(x.shape, starts)):
    at = lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.clip(start, 0, d - 1).astype(jnp.int32)
    hit = at if hit is None else hit & at
  if x.dtype == jnp.bool_:
    picked = jnp.any(hit & x)
  else:
    picked = jnp.where(hit, x, jnp.zeros_like(x))
    for axis in reversed(range(x.ndim)):
      picked = jnp.sum(picked, axis=axis, dtype=x.dtype)
  return picked.reshape((1,) * x.ndim)


_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_and", "reduce_or")


def _eval_lowerable(jaxpr, consts, *args):
  """``jax.core.eval_jaxpr`` rewritten for Triton, same values: element lookups (``dynamic_slice`` of size 1 on
  every axis, what indexing an array by scalars traces to) by :func:`_one_hot_slice`, and reductions over several
  axes as one reduction per axis; nested ``jit``\\ s likewise. Triton lowers no ``dynamic_slice`` or ``gather``
  (what such a lookup becomes once vmapped over a tile) and no scatter (its derivative); selects and sums it does."""
  env = {}
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name, params = eqn.primitive.name, eqn.params
    if name == "dynamic_slice" and all(s == 1 for s in params["slice_sizes"]):
      outs = [_one_hot_slice(*invals, slice_sizes=params["slice_sizes"])]
    elif name in _REDUCTIONS and len(params["axes"]) > 1:
      x = invals[0]
      for axis in sorted(params["axes"], reverse=True):
        x = eqn.primitive.bind(x, **{**params, "axes": (axis,)})
      outs = [x]
    elif name in ("pjit", "jit") and "jaxpr" in params:
      inner = params["jaxpr"]
      outs = _eval_lowerable(inner.jaxpr, inner.consts, *invals)
    else:
      ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
      outs = ans if eqn.primitive.multiple_results else [ans]
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _lowerable(fn: Callable) -> Callable:
  """``fn`` (arrays in, a pytree of arrays out) traced and evaluated by :func:`_eval_lowerable`."""
  def run(*args):
    leaves, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True)(*leaves)
    outs = _eval_lowerable(closed.jaxpr, closed.consts, *leaves)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  return run


def _gather_free(conv: flex._Converted | None) -> Callable | None:
  """A converted mod evaluated by :func:`_eval_lowerable` (same arguments, same values), before any vmap."""
  return None if conv is None else _lowerable(conv.fn)


def _mask_indices(cfg: _Config, b, n):
  """``(b, n)`` as ``mask_mod`` and the block lists see them: 0 on an axis the block mask does not have."""
  zero = jnp.int32(0)
  return (b if cfg.Bm > 1 else zero), (n if cfg.Nm > 1 else zero)


def _pallas(kernel: Callable, cfg: _Config, name: str, grid, inputs, out_specs, out_shape):
  """``pallas_call`` with named inputs: ``inputs`` lists ``(name, array, BlockSpec)``; the kernel gets a dict of the
  input refs by name, then the output refs."""
  names = tuple(n for n, _, _ in inputs)

  def body(*refs):
    kernel(dict(zip(names, refs[:len(names)])), *refs[len(names):], cfg=cfg)

  return pl.pallas_call(
      body, grid=grid, in_specs=[s for _, _, s in inputs], out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name=name,
  )(*[x for _, x, _ in inputs])


def _const_inputs(prefix: str, consts):
  """Captured arrays as whole-array pallas inputs (a scalar as ``(1,)``)."""
  out = []
  for c, x in enumerate(consts):
    shape = _const_block(x.shape)
    out.append((f"{prefix}{c}", x.reshape(shape),
                pl.BlockSpec(shape, lambda *g, _n=len(shape): (0,) * _n)))
  return out


def _q_program_inputs(cfg: _Config, q, k, v, sc, mc, lists, hp: int, hvp: int):
  """Inputs of a program over (query block i, batch b, query head n): its query rows, its kv head's keys and
  values whole, its query block's key lists, the captured arrays."""
  G, Bm, Nm = cfg.groups, cfg.Bm, cfg.Nm
  nk = cfg.Sp // cfg.bk
  part_num, part_idx, full_num, full_idx = lists
  sel = lambda b, n: (b if Bm > 1 else 0, n if Nm > 1 else 0)
  count = pl.BlockSpec((None, None, None), lambda i, b, n: (*sel(b, n), i))
  index = pl.BlockSpec((None, None, None, nk), lambda i, b, n: (*sel(b, n), i, 0))
  return [("q", q, pl.BlockSpec((None, cfg.bq, None, hp), lambda i, b, n: (b, i, n, 0))),
          ("k", k, pl.BlockSpec((None, cfg.Sp, None, hp), lambda i, b, n: (b, 0, n // G, 0))),
          ("v", v, pl.BlockSpec((None, cfg.Sp, None, hvp), lambda i, b, n: (b, 0, n // G, 0))),
          ("part_num", part_num, count), ("part_idx", part_idx, index),
          ("full_num", full_num, count), ("full_idx", full_idx, index),
          *_const_inputs("sc", sc), *_const_inputs("mc", mc)]


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _key_block(cfg: _Config, r: dict, t, masked: bool, q, rows, b_m, n_m, mc):
  """Entry ``t`` of a query block's full or partial key list: ``(k, v, cols, visible or None, raw logits)``."""
  k0 = r["part_idx" if masked else "full_idx"][t] * cfg.bk
  k, v = r["k"][pl.ds(k0, cfg.bk), :], r["v"][pl.ds(k0, cfg.bk), :]
  cols = k0 + jnp.arange(cfg.bk, dtype=jnp.int32)
  vis = _visible(cfg, b_m, n_m, rows, cols, mc) if masked else None
  return k, v, cols, vis, _raw(cfg, q, k, vis)


def _fwd_kernel(r: dict, o_ref, lse_ref, *, cfg: _Config):
  bq = cfg.bq
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b_m, n_m = _mask_indices(cfg, b, n)
  q = r["q"][...]
  rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
  sc, mc = _read_consts(r, "sc", cfg.score_shapes), _read_consts(r, "mc", cfg.mask_shapes)

  def body(t, carry, masked):
    acc, m, l, bad = carry
    k, v, cols, vis, s = _key_block(cfg, r, t, masked, q, rows, b_m, n_m, mc)
    if cfg.score_fn is not None:
      s = flex.tile_scores(cfg.score_fn, sc, s, b, n, rows, cols)
    if masked:   # hidden values never meet a multiply; visible non-finite ones poison their rows
      s = jnp.where(vis, s, -jnp.inf)
      v_ok = jnp.isfinite(v)
      v_bad = jnp.max(jnp.where(v_ok, F32_0, F32_1), axis=1)                           # [bk]
      bad = jnp.maximum(bad, jnp.max(jnp.where(vis & (v_bad[None, :] > 0.0), F32_1, F32_0), axis=1))
      v = jnp.where(v_ok, v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, F32_0, m_new)     # rows that have seen no key yet
    p = jnp.exp(s - m_safe[:, None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l, bad

  init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32), jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, r["full_num"][()], functools.partial(body, masked=False), init)
  acc, m, l, bad = lax.fori_loop(0, r["part_num"][()], functools.partial(body, masked=True), carry)
  empty = l == 0.0            # no visible key (a NaN sum is not empty: it propagates)
  l_safe = jnp.where(empty, F32_1, l)
  out = jnp.where(bad[:, None] > 0.0, jnp.nan, acc / l_safe[:, None])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _forward(cfg: _Config, q, k, v, sc, mc, lists):
  B, Tp, N, hp = q.shape
  hvp = v.shape[-1]
  inputs = _q_program_inputs(cfg, q, k, v, sc, mc, lists, hp, hvp)
  return _pallas(
      _fwd_kernel, cfg, "attention_jax_flex_fwd", (Tp // cfg.bq, B, N), inputs,
      out_specs=[pl.BlockSpec((None, cfg.bq, None, hvp), lambda i, b, n: (b, i, n, 0)),
                 pl.BlockSpec((None, None, cfg.bq), lambda i, b, n: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, hvp), q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)])


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dlogits(cfg: _Config, s, lse, dp, delta, vis, vjp):
  """``(p, dS w.r.t. the raw products q.k, d float consts or None)`` of a tile. ``lse`` of a row with no visible key
  is finite (0) in the residuals: its logits are all ``-inf``, so ``p`` is 0 either way."""
  p = jnp.exp(s - lse[:, None])
  if vis is not None:
    p = jnp.where(vis, p, F32_0)
  ds = p * (dp - delta[:, None])
  if vis is not None:
    ds = jnp.where(vis, ds, F32_0)
  d_consts = None
  if vjp is not None:
    ds, d_consts = vjp(ds)
    if vis is not None:
      ds = jnp.where(vis, ds, F32_0)
  return p, ds * cfg.scale, d_consts


def _dkdv_kernel(r: dict, dk_ref, dv_ref, *dsc_refs, cfg: _Config):
  bq, bk, G = cfg.bq, cfg.bk, cfg.groups
  j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, v = r["k"][...], r["v"][...]
  cols = j * bk + jnp.arange(bk, dtype=jnp.int32)
  sc, mc = _read_consts(r, "sc", cfg.score_shapes), _read_consts(r, "mc", cfg.mask_shapes)
  pos = _float_positions(cfg)

  def head(g, carry):
    n = h * G + g
    b_m, n_m = _mask_indices(cfg, b, n)
    g_l = g if cfg.Nm > 1 else jnp.int32(0)     # the head's row of this kv head's lists

    def body(t, c, masked):
      dk, dv, dsc = c
      i = r["part_idx" if masked else "full_idx"][g_l, t]
      q0 = i * bq
      q = r["q"][pl.ds(q0, bq), g, :]
      do = r["do"][pl.ds(q0, bq), g, :]
      lse = r["lse"][g, pl.ds(q0, bq)]
      delta = r["delta"][g, pl.ds(q0, bq)]
      rows = q0 + jnp.arange(bq, dtype=jnp.int32)
      vis = _visible(cfg, b_m, n_m, rows, cols, mc) if masked else None
      s = _raw(cfg, q, k, vis)
      vjp = None
      if cfg.score_fn is not None:
        g_fn, float_consts = _score_with(cfg, sc, b, n, rows, cols)
        raw = s
        s = g_fn(raw, float_consts)
        vjp = lambda ds: _lowerable(lambda r_, c_, d_: jax.vjp(g_fn, r_, c_)[1](d_))(raw, float_consts, ds)
      if masked:
        s = jnp.where(vis, s, -jnp.inf)
        q = _clean(q)        # a hidden query row may hold garbage; dS is 0 there, and 0 * NaN must not happen
      p, ds, d_consts = _dlogits(cfg, s, lse, _dot(do, v.T), delta, vis, vjp)
      dv = dv + _dot(p.astype(do.dtype).T, do)
      dk = dk + _dot(ds.astype(q.dtype).T, q)
      if d_consts is not None:
        dsc = tuple(a + d.astype(jnp.float32).reshape(a.shape) for a, d in zip(dsc, d_consts))
      return dk, dv, dsc

    carry = lax.fori_loop(0, r["full_num"][g_l], functools.partial(body, masked=False), carry)
    return lax.fori_loop(0, r["part_num"][g_l], functools.partial(body, masked=True), carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          tuple(jnp.zeros(_const_block(cfg.score_shapes[p]), jnp.float32) for p in pos))
  dk, dv, dsc = lax.fori_loop(0, G, head, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for ref, d in zip(dsc_refs, dsc):
    ref[...] = d


def _dq_kernel(r: dict, dq_ref, *, cfg: _Config):
  bq = cfg.bq
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b_m, n_m = _mask_indices(cfg, b, n)
  q, do = r["q"][...], r["do"][...]
  lse, delta = r["lse"][...], r["delta"][...]
  rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
  sc, mc = _read_consts(r, "sc", cfg.score_shapes), _read_consts(r, "mc", cfg.mask_shapes)

  def body(t, dq, masked):
    k, v, cols, vis, s = _key_block(cfg, r, t, masked, q, rows, b_m, n_m, mc)
    vjp = None
    if cfg.score_fn is not None:
      g_fn = lambda x: flex.tile_scores(cfg.score_fn, sc, x, b, n, rows, cols)
      raw = s
      s = g_fn(raw)
      vjp = lambda ds: (_lowerable(lambda r_, d_: jax.vjp(g_fn, r_)[1](d_)[0])(raw, ds), None)
    if masked:
      s = jnp.where(vis, s, -jnp.inf)
      k = _clean(k)
    _, ds, _ = _dlogits(cfg, s, lse, _dot(do, v.T), delta, vis, vjp)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, r["full_num"][()], functools.partial(body, masked=False), jnp.zeros(q.shape, jnp.float32))
  dq = lax.fori_loop(0, r["part_num"][()], functools.partial(body, masked=True), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, sc, mc, lists, out, lse, d_out, d_lse):
  """``(dq, dk, dv, d score consts)`` on the padded layout."""
  q_lists, kv_lists = lists
  B, Tp, N, hp = q.shape
  Sp, K, hvp = v.shape[1:]
  G, Bm, Nm, bq, bk = cfg.groups, cfg.Bm, cfg.Nm, cfg.bq, cfg.bk
  nq, nk = Tp // bq, Sp // bk
  delta = _numerics.backward_delta(out, d_out, d_lse, jnp.float32)           # [B, N, Tp]

  # dK, dV and the score consts' gradients: one program per (key block, batch, kv head); the G query heads of that
  # kv head are looped inside, each over its transposed lists ([Bm, K, G, ...] when the mask has heads).
  Gl, Kl = (G, K) if Nm > 1 else (1, 1)
  sel = lambda b, h: (b if Bm > 1 else 0, h if Nm > 1 else 0)
  part_num, part_idx, full_num, full_idx = (x.reshape((Bm, Kl, Gl) + x.shape[2:]) for x in q_lists)
  count = pl.BlockSpec((None, None, Gl, None), lambda j, b, h: (*sel(b, h), 0, j))
  index = pl.BlockSpec((None, None, Gl, None, nq), lambda j, b, h: (*sel(b, h), 0, j, 0))
  rows = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
  k_blk = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
  v_blk = pl.BlockSpec((None, bk, None, hvp), lambda j, b, h: (b, j, h, 0))
  inputs = [("q", q.reshape(B, Tp, K, G, hp), pl.BlockSpec((None, Tp, None, G, hp), lambda j, b, h: (b, 0, h, 0, 0))),
            ("k", k, k_blk), ("v", v, v_blk),
            ("do", d_out.reshape(B, Tp, K, G, hvp),
             pl.BlockSpec((None, Tp, None, G, hvp), lambda j, b, h: (b, 0, h, 0, 0))),
            ("lse", lse.reshape(B, K, G, Tp), rows), ("delta", delta.reshape(B, K, G, Tp), rows),
            ("part_num", part_num, count), ("part_idx", part_idx, index),
            ("full_num", full_num, count), ("full_idx", full_idx, index),
            *_const_inputs("sc", sc), *_const_inputs("mc", mc)]
  float_shapes = [_const_block(cfg.score_shapes[p]) for p in _float_positions(cfg)]
  dsc_specs = [pl.BlockSpec((None, None, None, *s), lambda j, b, h, _n=len(s): (j, b, h) + (0,) * _n)
               for s in float_shapes]
  dsc_shapes = [jax.ShapeDtypeStruct((nk, B, K, *s), jnp.float32) for s in float_shapes]
  dk, dv, *dsc = _pallas(
      _dkdv_kernel, cfg, "attention_jax_flex_dkdv", (nk, B, K), inputs,
      out_specs=[k_blk, v_blk, *dsc_specs],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), *dsc_shapes])

  # dQ: one program per (query block, batch, query head), over the key lists.
  inputs = _q_program_inputs(cfg, q, k, v, sc, mc, kv_lists, hp, hvp)
  row = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  inputs += [("do", d_out, pl.BlockSpec((None, bq, None, hvp), lambda i, b, n: (b, i, n, 0))),
             ("lse", lse, row), ("delta", delta, row)]
  q_blk = pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0))
  dq = _pallas(_dq_kernel, cfg, "attention_jax_flex_dq", (nq, B, N), inputs, out_specs=q_blk,
               out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype))

  d_sc, it = [], iter(dsc)
  for c in sc:
    if jnp.issubdtype(c.dtype, jnp.floating):
      d_sc.append(jnp.sum(next(it), axis=(0, 1, 2)).reshape(c.shape).astype(c.dtype))
    else:
      d_sc.append(None)
  return dq, dk, dv, tuple(d_sc)


def _forward_call(cfg: _Config, q, k, v, sc, mc, lists):
  return _forward(cfg, q, k, v, sc, mc, lists[1])


# (out, lse) with a recomputing backward; the score consts play the differentiable "bias" (lse finite when saved).
_flex = flash_custom_vjp(_forward_call, _backward, with_bias=True, finite_residuals=True)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def _resolve_interpret(interpret) -> bool:
  """None: interpreted on CPU, compiled on GPU; ``UnsupportedError`` on other backends."""
  return compiled_on("gpu", _PATH) if interpret is None else bool(interpret)


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _check_supported(f: flex.FlexInputs, interpret: bool) -> None:
  dtype = f.query.dtype
  shapes = f"query {f.query.shape}, key {f.key.shape}, value {f.value.shape}"
  if dtype == jnp.float64:
    raise UnsupportedError(f"{_PATH} computes in float32 and cannot keep float64 inputs in float64 ({shapes}); "
                           f"{_ALTERNATIVES}")
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise UnsupportedError(f"{_PATH} takes float32, bfloat16 or float16 inputs; got {dtype} ({shapes}); "
                           f"{_ALTERNATIVES}")
  H, Hv = f.query.shape[-1], f.value.shape[-1]
  if max(padded_head_dim(H), padded_head_dim(Hv)) > MAX_HEAD_DIM:
    raise UnsupportedError(f"{_PATH} takes head dims up to {MAX_HEAD_DIM}; got H={H}, Hv={Hv} ({shapes}); "
                           f"{_ALTERNATIVES}")
  if interpret:
    return
  bq, bk = f.block_mask.block_size
  if not (_is_pow2(bq) and _is_pow2(bk) and min(bq, bk) >= 16):
    raise UnsupportedError(f"{_PATH} compiles block sizes that are powers of two >= 16; the block mask has "
                           f"block_size=({bq}, {bk}). Build it with such a block_size, or {_ALTERNATIVES}")
  consts = [*(() if f.score is None else f.score.consts), *(() if f.mask is None else f.mask.consts)]
  for c in consts:
    if not all(_is_pow2(d) for d in c.shape):
      raise UnsupportedError(f"{_PATH} loads the arrays a score_mod / mask_mod closes over whole, and Triton "
                             f"needs power-of-two dims; got an array of shape {c.shape}. Pad it, or "
                             f"{_ALTERNATIVES}")


def flex_gpu_core(f: flex.FlexInputs, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """``(out [B, T, N, Hv] in the input dtype, lse [B, N, T] float32, -inf on rows with no visible key)``;
  differentiable in q, k, v and the floating-point arrays ``score_mod`` closes over. ``interpret=None``: Pallas
  interpret mode on CPU, compiled on GPU."""
  interpret = _resolve_interpret(interpret)
  _check_supported(f, interpret)
  scale = _numerics.static_float("scale", f.scale, path=_PATH)
  bm = f.block_mask
  B, T, N, H = f.query.shape
  S, K, Hv = f.value.shape[1:]
  bq, bk = bm.block_size
  Tp, Sp = _numerics.round_up(T, bq), _numerics.round_up(S, bk)
  hp, hvp = padded_head_dim(H), padded_head_dim(Hv)
  sc = tuple(() if f.score is None else f.score.consts)
  mc = tuple(() if f.mask is None else f.mask.consts)
  cfg = _Config(scale=scale, T=T, S=S, Tp=Tp, Sp=Sp, bq=bq, bk=bk, groups=N // K, Bm=bm.shape[0], Nm=bm.shape[1],
                score_fn=_gather_free(f.score), mask_fn=_gather_free(f.mask),
                score_shapes=tuple(tuple(c.shape) for c in sc),
                score_float=tuple(bool(jnp.issubdtype(c.dtype, jnp.floating)) for c in sc),
                mask_shapes=tuple(tuple(c.shape) for c in mc), interpret=interpret)
  pad = lambda x, n, h: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, h - x.shape[3])))
  # A non-finite query or key row makes every logit it enters NaN (an Inf must not yield a -inf that hides a key).
  q, k = pad(_numerics.nan_rows(f.query), Tp, hp), pad(_numerics.nan_rows(f.key), Sp, hp)
  v = pad(f.value, Sp, hvp)
  q_lists = (bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
  kv_lists = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
  out, lse = _flex(cfg, q, k, v, sc, (mc, (q_lists, kv_lists)))
  return out[:, :T, :, :Hv], lse[:, :, :T]
