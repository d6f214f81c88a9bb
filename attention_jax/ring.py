"""Ring attention: softmax attention with the sequence sharded over one mesh axis (sequence parallelism).

Each of the P devices on ``axis_name`` keeps its block of queries and passes its key/value block around the ring
with ``jax.lax.ppermute`` (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers"): after P
steps every query block has met every key block, and no device ever holds more than two key/value blocks.

* forward: device d accumulates, for its queries, a float32 output and logsumexp over the key blocks it has seen,
  merging each block's partial result with the logsumexp rule
  ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``;
* backward (``jax.custom_vjp``): saves only the local q, k, v, output and logsumexp. The key/value blocks go
  around the ring again together with float32 dK/dV accumulators; each device adds its queries' share to the
  block it holds (computed with the *global* logsumexp, so the shares sum to the exact gradient) and keeps dQ.
  After P steps every dK/dV accumulator is back on the device that owns its keys. Nothing per step is stored
  for autodiff;
* causal: a (query chunk, key chunk) pair is computed in full when the key chunk comes earlier, with the causal
  mask on the diagonal, and skipped when the key chunk comes later. With contiguous shards device d would do
  d + 1 pairs, so by default the sequence is split into 2P chunks and device d holds chunks d and 2P-1-d
  ("zig-zag", Brandon et al. 2023 / ring-flash-attention): every device then computes 2P + 1 pairs, two of them
  diagonal. Each step is one call: the device's own keys (causal), keys from an earlier device (both query
  chunks, the keys' first chunk) or from a later one (the second query chunk, both key chunks). The reordering
  is two half-shard ``ppermute`` s per array on the way in and out, inside ``shard_map``;
  ``sequence_order="zigzag"`` skips them for models that keep activations in zig-zag order (:func:`to_zigzag`);
* per-block compute: ``attention_jax.blockwise`` (any backend; :func:`attention_jax.blockwise.block_forward` and
  ``block_backward``) or the Pallas flash kernel on GPU; ``implementation=None`` picks by the mesh's platform.
  Within a block the per-tile causal / length ranges skip masked tiles as usual;
* GQA: K/V rotate with their K heads, never repeated; key/value (and query) lengths are global positions,
  turned into per-block limits; T and S that do not divide into the chunks are padded and the padding masked.
  Rows beyond the lengths are zeroed by a select on each device first, so a NaN/Inf there reaches nothing;
* meshes: ``Mesh`` (Auto axes), ``jax.make_mesh`` (Explicit axes), either set with ``jax.set_mesh``; inputs
  uncommitted, committed to one device (eager calls move them onto the mesh) or sharded;
* forward-mode and second-order differentiation (which a ``custom_vjp`` cannot serve) compute
  ``ring_attention_reference`` when they are visible at the call.

``ring_attention_reference`` has the same signature and computes the same function on gathered arrays.
See docs/RING.md for multi-host use.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import _autodiff, _numerics, blockwise, core

IMPLEMENTATIONS = ("blockwise", "pallas")
SEQUENCE_ORDERS = ("natural", "zigzag")
# Kinds of a (query chunk, key chunk) pair; also the columns of ring_block_counts.
SKIP, FULL, DIAGONAL = 0, 1, 2


class _Config(NamedTuple):
  """Static configuration of one call (hashable)."""
  axis_name: Any         # a mesh axis name, or a tuple of them (the ring runs over their product)
  num_shards: int        # P, devices on axis_name
  zigzag: bool           # device d holds chunks d and 2P-1-d (else chunk d)
  is_causal: bool
  q_chunk: int           # rows per chunk (a device holds 1 or 2 chunks)
  kv_chunk: int
  scale: float
  soft_cap: float | None
  implementation: str    # per-block compute: "blockwise" | "pallas"
  chunk_sizes: Any       # blockwise.ChunkSizes | None
  block_sizes: Any       # kernels.flash_gpu.BlockSizes | None
  reorder: bool = False  # q/k/v arrive in natural order and are reordered to zig-zag inside

  @property
  def chunks_per_shard(self) -> int:
    return 2 if self.zigzag else 1

  @property
  def axes(self) -> tuple[str, ...]:
    return self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)


# ----------------------------------------------------------------------------------------------------------
# Per-block compute (local query chunks against chunks of the key/value block held, on one device)
# ----------------------------------------------------------------------------------------------------------


def _block_forward(cfg: _Config, inp: core.AttentionInputs) -> tuple[jax.Array, jax.Array]:
  """``(out float32 [B, Tb, N, H], lse [B, N, Tb])``: the block's partial result."""
  if cfg.implementation == "pallas":
    from attention_jax.kernels import flash_gpu
    out, lse = flash_gpu.flash_core(inp, cfg.block_sizes)
    return out.astype(jnp.float32), lse
  return blockwise.block_forward(inp, cfg.chunk_sizes)


def _rows(x_BNT: jax.Array) -> jax.Array:
  """``[B, N, T]`` -> ``[B, T, N, 1]``, to scale ``[B, T, N, H]`` rows."""
  return jnp.transpose(x_BNT, (0, 2, 1))[..., None]


def _block_backward(cfg: _Config, inp: core.AttentionInputs, d_out, lse, delta):
  """The block's float32 share of ``(dq, dk, dv)``, given the global ``lse`` and ``delta = rowsum(dO * O)``."""
  if cfg.implementation != "pallas":
    return blockwise.block_backward(inp, d_out, lse, delta, cfg.chunk_sizes)
  # The flash kernel's backward uses its own logsumexp, so recompute the block's (o_i, lse_i) and pull back the
  # cotangents of the merge out = sum_i w_i o_i, w_i = exp(lse_i - lse):
  #   d o_i = w_i dO,   d lse_i = w_i (rowsum(dO * o_i) - delta)   (exact; costs one block forward more).
  from attention_jax.kernels import flash_gpu

  def pair(q, k, v):
    return flash_gpu.flash_core(inp._replace(query=q, key=k, value=v), cfg.block_sizes)

  (o_i, lse_i), pull_back = jax.vjp(pair, inp.query, inp.key, inp.value)
  finite = jnp.isfinite(lse_i) & jnp.isfinite(lse)
  w = jnp.where(finite, jnp.exp(jnp.where(finite, lse_i - lse, 0.0)), 0.0)
  d_out = d_out.astype(jnp.float32)
  d_o_i = (_rows(w) * d_out).astype(o_i.dtype)
  d_lse_i = w * (jnp.einsum("btnh,btnh->bnt", d_out, o_i.astype(jnp.float32)) - delta)
  return tuple(g.astype(jnp.float32) for g in pull_back((d_o_i, d_lse_i)))


# ----------------------------------------------------------------------------------------------------------
# The ring, per device (inside shard_map)
# ----------------------------------------------------------------------------------------------------------


class _Block(NamedTuple):
  """Queries in local chunks ``[q[0], q[1])`` against keys in local chunks ``[kv[0], kv[1])`` of the held block."""
  q: tuple[int, int]
  kv: tuple[int, int]
  causal: bool


def _chunk_index(cfg: _Config, device, u: int):
  """Global chunk index of local chunk ``u`` of ``device``."""
  return device if u == 0 else 2 * cfg.num_shards - 1 - device


def _local_length(cfg: _Config, length, device, chunks: tuple[int, int], chunk: int):
  """How many of ``device``'s local positions in ``chunks`` lie before the global ``length`` ([B] int32).

  A device's chunks are in increasing global order, so those positions are a prefix of the local ones.
  """
  if length is None:
    return None
  return sum(jnp.clip(length - _chunk_index(cfg, device, u) * chunk, 0, chunk) for u in range(*chunks))


def _plan(cfg: _Config) -> tuple[_Block | None, list[_Block | None], Callable]:
  """``(local, remote, pick)``: the block computed with the device's own keys (None: same as remote), the
  blocks for keys from another device and ``pick(me, src)`` -> index into ``remote`` (None entries: skip).

  Causal, zig-zag (device d holds chunks d and 2P-1-d): keys from ``src < me`` are seen in full by both local
  query chunks except the keys' second chunk (later than both); keys from ``src > me`` only by the second query
  chunk, which sees both of their chunks. Either way two chunk pairs, so every device does the same work.
  """
  n = cfg.chunks_per_shard
  every = ((0, n), (0, n))
  if not cfg.is_causal:
    return None, [_Block(*every, False)], lambda me, src: 0
  later_keys = _Block((1, 2), (0, 2), False) if cfg.zigzag else None
  earlier_keys = _Block((0, 2), (0, 1), False) if cfg.zigzag else _Block(*every, False)
  return _Block(*every, True), [later_keys, earlier_keys], lambda me, src: (src < me).astype(jnp.int32)


def _block_counts(block: _Block) -> jax.Array:
  """Chunk pairs ``[0, full, diagonal]`` that ``block`` computes."""
  pairs = (block.q[1] - block.q[0]) * (block.kv[1] - block.kv[0])
  diagonal = block.q[1] - block.q[0] if block.causal else 0
  full = (pairs - diagonal) // 2 if block.causal else pairs    # causal blocks are a device's own chunks
  return jnp.asarray([0, full, diagonal], jnp.int32)


def _take(x: jax.Array, lo: int, hi: int, axis: int) -> jax.Array:
  """Static rows ``[lo, hi)`` of ``axis`` (``x`` itself when that is all of them)."""
  return x if (lo, hi) == (0, x.shape[axis]) else lax.slice_in_dim(x, lo, hi, axis=axis)


def _put(x: jax.Array, rows: jax.Array, lo: int, axis: int) -> jax.Array:
  """``x`` with ``rows`` written at ``lo`` along ``axis``. Slices and dynamic_update_slice rather than
  ``x.at[...]`` (a scatter, which jaxlib 0.11.2's CPU compiler crashes on inside this sharded loop)."""
  return rows if rows.shape == x.shape else lax.dynamic_update_slice_in_dim(x, rows, lo, axis)


def _block_inputs(cfg: _Config, block: _Block, q, k, v, lengths: dict, me, src) -> core.AttentionInputs:
  """The block's slices of the local q and held k/v, with the global lengths turned into local ones."""
  rows = lambda x, r, c: _take(x, r[0] * c, r[1] * c, 1)
  return core.AttentionInputs(
      rows(q, block.q, cfg.q_chunk), rows(k, block.kv, cfg.kv_chunk), rows(v, block.kv, cfg.kv_chunk),
      bias=None, mask=None, scale=cfg.scale, is_causal=block.causal,
      q_lengths=_local_length(cfg, lengths.get("q"), me, block.q, cfg.q_chunk),
      kv_lengths=_local_length(cfg, lengths.get("kv"), src, block.kv, cfg.kv_chunk),
      window=None, q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=cfg.soft_cap)


def _run_blocks(blocks: list[_Block | None], index, fn: Callable, *carry):
  """``fn(block, *carry)`` for ``blocks[index]`` (carry unchanged for None); a ``lax.switch`` unless static."""
  branch = lambda block: (lambda *c: c) if block is None else functools.partial(fn, block)
  if len(blocks) == 1:
    return branch(blocks[0])(*carry)
  return lax.switch(index, [branch(b) for b in blocks], *carry)


def _rotate(cfg: _Config, tree):
  """Sends ``tree`` to the next device on the ring (device d receives from d - 1)."""
  n = cfg.num_shards
  if n == 1:
    return tree
  return lax.ppermute(tree, cfg.axis_name, [(i, (i + 1) % n) for i in range(n)])


def _ring_loop(cfg: _Config, step: Callable, local_step: Callable, carry):
  """Runs the device's own block (``local_step``, or ``step(0, ...)``) and then ``step(s, ...)`` for the keys
  that arrive at s = 1 .. P-1."""
  local, _, _ = _plan(cfg)
  if local is None:
    return lax.fori_loop(0, cfg.num_shards, step, carry)
  return lax.fori_loop(1, cfg.num_shards, step, local_step(carry))


def _ring_forward(cfg: _Config, q, k, v, lengths: dict):
  """Local ``(out [B, Tl, N, H] in q's dtype, lse [B, N, Tl], counts int32 [3])``.

  ``counts``: chunk pairs this device skipped / computed in full / computed with the causal mask (of the
  n x n pairs of each of the P steps, n = chunks per device).
  """
  n_dev, me = cfg.num_shards, lax.axis_index(cfg.axis_name)
  local, remote, pick = _plan(cfg)
  B, Tl, N, H = q.shape

  def attend(block, k_cur, v_cur, src, o, lse, counts):
    inputs = _block_inputs(cfg, block, q, k_cur, v_cur, lengths, me, src)
    lo, hi = block.q[0] * cfg.q_chunk, block.q[1] * cfg.q_chunk
    o_b, lse_b = _numerics.merge_partials([(_take(o, lo, hi, 1), _take(lse, lo, hi, 2)), _block_forward(cfg, inputs)])
    return _put(o, o_b, lo, 1), _put(lse, lse_b, lo, 2), counts + _block_counts(block)

  def step(s, carry):
    k_cur, v_cur, acc = carry
    k_next, v_next = _rotate(cfg, (k_cur, v_cur))    # in flight while this step computes
    src = (me - s) % n_dev                           # the device these keys came from
    acc = _run_blocks(remote, pick(me, src), lambda block, *c: attend(block, k_cur, v_cur, src, *c), *acc)
    return k_next, v_next, acc

  def local_step(carry):
    k_cur, v_cur, acc = carry
    k_next, v_next = _rotate(cfg, (k_cur, v_cur))
    return k_next, v_next, attend(local, k_cur, v_cur, me, *acc)

  init = (jnp.zeros((B, Tl, N, H), jnp.float32), jnp.full((B, N, Tl), -jnp.inf, jnp.float32),
          jnp.zeros((3,), jnp.int32))
  _, _, (out, lse, counts) = _ring_loop(cfg, step, local_step, (k, v, init))
  counts = counts.at[0].set(cfg.chunks_per_shard ** 2 * n_dev - counts[1] - counts[2])
  return out.astype(q.dtype), lse, counts


def _ring_backward(cfg: _Config, q, k, v, lengths: dict, d_out, lse, delta):
  """Local ``(dq, dk, dv)``: float32 dK/dV accumulators travel with their key/value blocks and arrive home."""
  n_dev, me = cfg.num_shards, lax.axis_index(cfg.axis_name)
  local, remote, pick = _plan(cfg)

  def grads(block, k_cur, v_cur, src, dq, dk, dv):
    inputs = _block_inputs(cfg, block, q, k_cur, v_cur, lengths, me, src)
    lo, hi = block.q[0] * cfg.q_chunk, block.q[1] * cfg.q_chunk
    klo, khi = block.kv[0] * cfg.kv_chunk, block.kv[1] * cfg.kv_chunk
    g_q, g_k, g_v = _block_backward(cfg, inputs, _take(d_out, lo, hi, 1), _take(lse, lo, hi, 2),
                                   _take(delta, lo, hi, 2))
    add = lambda acc, g, lo, hi: _put(acc, _take(acc, lo, hi, 1) + g, lo, 1)
    return add(dq, g_q, lo, hi), add(dk, g_k, klo, khi), add(dv, g_v, klo, khi)

  def step(s, carry):
    k_cur, v_cur, dk, dv, dq = carry
    src = (me - s) % n_dev
    dq, dk, dv = _run_blocks(remote, pick(me, src), lambda block, *c: grads(block, k_cur, v_cur, src, *c),
                             dq, dk, dv)
    k_cur, v_cur, dk, dv = _rotate(cfg, (k_cur, v_cur, dk, dv))   # dK/dV go on with their keys
    return k_cur, v_cur, dk, dv, dq

  def local_step(carry):
    k_cur, v_cur, dk, dv, dq = carry
    dq, dk, dv = grads(local, k_cur, v_cur, me, dq, dk, dv)
    k_cur, v_cur, dk, dv = _rotate(cfg, (k_cur, v_cur, dk, dv))
    return k_cur, v_cur, dk, dv, dq

  f32 = lambda x: jnp.zeros(x.shape, jnp.float32)
  _, _, dk, dv, dq = _ring_loop(cfg, step, local_step, (k, v, f32(k), f32(v), f32(q)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Config, q, k, v, lengths: dict):
  out, lse, _ = _ring_forward(cfg, q, k, v, lengths)
  return out, lse


def _ring_fwd(cfg, q, k, v, lengths):
  out, lse, _ = _ring_forward(cfg, q, k, v, lengths)
  return (out, lse), (q, k, v, lengths, out, lse)


@jax.custom_jvp
def _not_differentiable(tree):
  """Identity whose derivative raises: marks the ring's backward pass, which JAX cannot differentiate."""
  return tree


@_not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
  raise NotImplementedError(
      "ring_attention's backward pass is not differentiable (second-order or forward-mode differentiation through "
      "a jax.jit that contains the first derivative). Call ring_attention outside that jit boundary, where it "
      "switches to the differentiable plain formula itself, or use attention_jax.ring.ring_attention_reference "
      "(or implementation='reference' / 'xla' in dot_product_attention).")


def _ring_bwd(cfg, res, cts):
  q, k, v, lengths, out, lse = res
  d_out, d_lse = cts
  delta = _numerics.backward_delta(out, d_out, d_lse, jnp.float32)
  dq, dk, dv = _not_differentiable(_ring_backward(cfg, q, k, v, lengths, d_out, lse, delta))
  return dq, dk, dv, jax.tree.map(lambda _: None, lengths)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------------------------------------
# Zig-zag order
# ----------------------------------------------------------------------------------------------------------


def _zigzag_owner(chunk: int, num_shards: int) -> int:
  return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk


def _zigzag_perms(num_shards: int):
  """ppermute pairs moving natural chunks 2d (even) and 2d+1 (odd) of device d to their zig-zag owners."""
  return ([(d, _zigzag_owner(2 * d, num_shards)) for d in range(num_shards)],
          [(d, _zigzag_owner(2 * d + 1, num_shards)) for d in range(num_shards)])


def _natural_to_zigzag(cfg: _Config, x: jax.Array, axis: int) -> jax.Array:
  """Local shard [chunk 2d, chunk 2d+1] -> [chunk d, chunk 2P-1-d] (one even and one odd chunk each)."""
  if cfg.num_shards == 1:
    return x
  even_perm, odd_perm = _zigzag_perms(cfg.num_shards)
  first, second = jnp.split(x, 2, axis=axis)
  even = lax.ppermute(first, cfg.axis_name, even_perm)
  odd = lax.ppermute(second, cfg.axis_name, odd_perm)
  me_even = lax.axis_index(cfg.axis_name) % 2 == 0      # device d's first chunk, d, has d's parity
  return jnp.where(me_even, jnp.concatenate([even, odd], axis), jnp.concatenate([odd, even], axis))


def _zigzag_to_natural(cfg: _Config, x: jax.Array, axis: int) -> jax.Array:
  """Inverse of :func:`_natural_to_zigzag`."""
  if cfg.num_shards == 1:
    return x
  even_perm, odd_perm = _zigzag_perms(cfg.num_shards)
  first, second = jnp.split(x, 2, axis=axis)
  me_even = lax.axis_index(cfg.axis_name) % 2 == 0
  even, odd = jnp.where(me_even, first, second), jnp.where(me_even, second, first)
  back = lambda perm: [(dst, src) for src, dst in perm]
  return jnp.concatenate([lax.ppermute(even, cfg.axis_name, back(even_perm)),
                          lax.ppermute(odd, cfg.axis_name, back(odd_perm))], axis)


def zigzag_indices(seq_len: int, num_shards: int) -> jax.Array:
  """Positions in zig-zag order: 2 * num_shards equal chunks, shard d holding chunks d and 2*num_shards-1-d."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"zig-zag order needs seq_len divisible by 2 * num_shards; got {seq_len=} {num_shards=}")
  c = seq_len // (2 * num_shards)
  order = [ch for d in range(num_shards) for ch in (d, 2 * num_shards - 1 - d)]
  return (jnp.asarray(order, jnp.int32)[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None, :]).reshape(-1)


def to_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  """Reorders ``axis`` of ``x`` from natural to zig-zag order (see ``sequence_order="zigzag"``)."""
  return jnp.take(x, zigzag_indices(x.shape[axis], num_shards), axis=axis)


def from_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  """Inverse of :func:`to_zigzag`."""
  return jnp.take(x, jnp.argsort(zigzag_indices(x.shape[axis], num_shards)), axis=axis)


# ----------------------------------------------------------------------------------------------------------
# Meshes (Explicit or Auto axes, with or without a jax.set_mesh context) and input placement
# ----------------------------------------------------------------------------------------------------------


def _check_mesh(mesh, axis_name) -> tuple[Any, int]:
  """``(axis_name normalised: a str or a tuple of >= 2 str, P = devices on those axes)``."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((n,), ('seq',))); got {type(mesh)}")
  names = (axis_name,) if isinstance(axis_name, str) else axis_name
  if not (isinstance(names, tuple) and names and all(isinstance(a, str) for a in names)):
    raise ValueError(f"axis_name must be a mesh axis name (str) or a non-empty tuple of them; got {axis_name!r} "
                     f"of type {type(axis_name).__name__}; the mesh's axes are {mesh.axis_names}")
  if len(set(names)) != len(names):
    raise ValueError(f"axis_name={axis_name!r} repeats an axis")
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh ({missing} missing); its axes are "
                     f"{mesh.axis_names} with sizes {mesh.axis_sizes}")
  return (names[0] if len(names) == 1 else names), math.prod(mesh.shape[a] for a in names)


def _explicit_spec(x, mesh: Mesh) -> P | None:
  """The PartitionSpec in ``x``'s type when ``x`` is typed with Explicit mesh axes (which must be ``mesh``'s),
  else None (NumPy, single-device, Auto-sharded arrays and their tracers)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  typed_mesh = getattr(sharding, "mesh", None)
  if typed_mesh is None or typed_mesh.empty or AxisType.Explicit not in typed_mesh.axis_types:
    return None
  if typed_mesh.axis_names != mesh.axis_names or typed_mesh.axis_sizes != mesh.axis_sizes:
    raise ValueError(f"an input of shape {x.shape} is explicitly sharded over mesh axes {typed_mesh.axis_names} "
                     f"with sizes {typed_mesh.axis_sizes}, but mesh= has axes {mesh.axis_names} with sizes "
                     f"{mesh.axis_sizes}; reshard it onto mesh= first")
  return sharding.spec


def _auto_twin(mesh: Mesh) -> Mesh:
  if AxisType.Explicit not in mesh.axis_types:
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _on_mesh(mesh: Mesh, fn: Callable, args: tuple, out_specs) -> Any:
  """``fn(shard_mesh, *args)`` with every axis of ``mesh`` of Auto type (what ``shard_map`` over the ring axes and
  the per-shard code need), whatever the caller's mesh setup.

  * a ``jax.set_mesh`` context (which must be ``mesh``): used as it is when its axes are Auto; with Explicit axes
    ``jax.sharding.auto_axes`` switches them to Auto inside and types the outputs with ``out_specs``;
  * no context, inputs explicitly typed on ``mesh`` (``jax.make_mesh`` + ``device_put``): ``auto_axes`` likewise;
  * no context, untyped inputs (NumPy, single-device, Auto-sharded): runs on ``mesh``'s Auto twin (same
    devices), so jit may pick the input sharding.
  """
  ctx = jax.sharding.get_abstract_mesh()
  in_auto = lambda *a: fn(jax.sharding.get_abstract_mesh(), *a)
  if not ctx.empty:
    if ctx.axis_names != mesh.axis_names or ctx.axis_sizes != mesh.axis_sizes:
      raise ValueError(f"the jax.set_mesh context mesh {ctx.axis_names} {ctx.axis_sizes} differs from mesh= "
                       f"{mesh.axis_names} {mesh.axis_sizes}")
    if AxisType.Explicit not in ctx.axis_types:
      return fn(ctx, *args)
    return jax.sharding.auto_axes(in_auto, out_sharding=out_specs)(*args)
  typed = [x for x in jax.tree.leaves(args) if _explicit_spec(x, mesh) is not None]
  if typed:
    typed_mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=jax.typeof(typed[0]).sharding.mesh.axis_types)
    out_shardings = jax.tree.map(lambda s: NamedSharding(typed_mesh, s), out_specs)
    return jax.sharding.auto_axes(in_auto, out_sharding=out_shardings)(*args)
  return fn(_auto_twin(mesh), *args)


def _concrete_value(x):
  """``(array, batched)``: the concrete array under eager autodiff / vmap tracers, or ``(None, False)`` for traced
  values with none (inside jax.jit) and for non-arrays."""
  batched = False
  for _ in range(64):   # nesting depth is bounded by the number of active transformations
    if not isinstance(x, jax.core.Tracer):
      return (x, batched) if isinstance(x, jax.Array) else (None, False)
    inner = getattr(x, "primal", None)   # JVP / linearize tracers
    if inner is None:
      inner, batched = getattr(x, "val", None), True   # vmap tracers
    x = inner
  return None, False


def _onto_mesh(x, mesh: Mesh, axis_name, num_shards: int):
  """An array held outside ``mesh``'s devices (committed to one device, say) moved onto them, q/k/v sharded
  along T over ``axis_name`` when that divides. ``jax.jit`` cannot do this move for a committed argument (it refuses
  arguments committed to other devices), so eager calls do it here; values traced by jit pass through. Outside a
  ``jax.set_mesh`` context the moved array is not explicitly typed (as an uncommitted one would be)."""
  concrete, batched = _concrete_value(x)
  if concrete is None or concrete.sharding.device_set == set(mesh.devices.flat):
    return x
  seq_axis = x.ndim - 3   # T's axis in [*B, T, N, H]
  sharded = seq_axis >= 0 and x.shape[seq_axis] % num_shards == 0 and not batched
  spec = P(*(None,) * seq_axis, axis_name) if sharded else P()
  target = mesh if not jax.sharding.get_abstract_mesh().empty else _auto_twin(mesh)
  return jax.device_put(x, NamedSharding(target, spec))


def _other_axes(spec: P | None, ndim: int, axis_name) -> list:
  """Per-dim spec entries of ``spec`` with the ring's axes removed (None where unsharded)."""
  ring_axes = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
  entries = list(spec or ()) + [None] * (ndim - len(spec or ()))
  uses_ring = lambda e: bool(ring_axes & (set(e) if isinstance(e, tuple) else {e}))
  return [None if uses_ring(e) else e for e in entries[:ndim]]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _prepare(query, key, value, mesh, axis_name, *, is_causal, scale, query_seq_lengths, key_value_seq_lengths,
             logits_soft_cap, load_balance, sequence_order, implementation, chunk_sizes, block_sizes):
  """Validates the call: ``(AttentionInputs, _Config)``."""
  axis_name, n_dev = _check_mesh(mesh, axis_name)
  query, key, value, query_seq_lengths, key_value_seq_lengths = (
      _onto_mesh(x, mesh, axis_name, n_dev) for x in (query, key, value, query_seq_lengths, key_value_seq_lengths))
  inp = core.prepare_inputs(query, key, value, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            logits_soft_cap=logits_soft_cap)
  T, S = inp.query.shape[1], inp.key.shape[1]
  if sequence_order not in SEQUENCE_ORDERS:
    raise ValueError(f"sequence_order must be one of {SEQUENCE_ORDERS}; got {sequence_order!r}")
  if not isinstance(load_balance, (bool, np.bool_)):
    raise ValueError(f"load_balance must be a Python bool; got {load_balance!r}")
  if inp.is_causal and T != S:
    raise ValueError(f"causal ring attention needs T == S (self-attention); got {inp.shapes}")
  zigzag = sequence_order == "zigzag" or (inp.is_causal and bool(load_balance))
  per = n_dev * (2 if zigzag else 1)
  if sequence_order == "zigzag" and (T % per or S % per):
    raise ValueError(f"sequence_order='zigzag' needs T and S divisible by 2 * {n_dev} devices on "
                     f"{axis_name!r} (inputs from to_zigzag); got {inp.shapes}")
  if implementation is None or implementation == "auto":
    implementation = "pallas" if mesh.devices.flat[0].platform == "gpu" else "blockwise"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None/'auto' or one of {IMPLEMENTATIONS}; got {implementation!r}")
  Tp, Sp = _numerics.round_up(T, per), _numerics.round_up(S, per)
  cfg = _Config(axis_name=axis_name, num_shards=n_dev, zigzag=zigzag, is_causal=inp.is_causal,
                q_chunk=Tp // per, kv_chunk=Sp // per,
                scale=_numerics.static_float("scale", inp.scale, path="ring_attention"),
                soft_cap=_numerics.static_float("logits_soft_cap", inp.logits_soft_cap, path="ring_attention"),
                implementation=implementation, chunk_sizes=chunk_sizes, block_sizes=block_sizes,
                reorder=zigzag and sequence_order == "natural")
  return inp, cfg


def _ring_args(inp: core.AttentionInputs, cfg: _Config) -> tuple:
  """``(q, k, v, lengths)``: ``lengths`` are what the ring masks with (keys padded up to whole chunks are masked
  by a key length)."""
  S = inp.key.shape[1]
  lengths = {}
  if inp.q_lengths is not None:
    lengths["q"] = inp.q_lengths
  if inp.kv_lengths is not None or cfg.kv_chunk * cfg.num_shards * cfg.chunks_per_shard != S:
    lengths["kv"] = (jnp.full((inp.key.shape[0],), S, jnp.int32) if inp.kv_lengths is None
                     else jnp.minimum(inp.kv_lengths, S))
  return inp.query, inp.key, inp.value, lengths


def _zero_beyond(cfg: _Config, x: jax.Array, length) -> jax.Array:
  """Global ``x`` [B, L, ...] with positions at or beyond ``length`` [B] set to zero by a select, so that a NaN/Inf
  there cannot reach any result or gradient (their gradient is exactly zero)."""
  if length is None:
    return x
  L = x.shape[1]
  positions = jnp.arange(L, dtype=jnp.int32) if cfg.reorder or not cfg.zigzag else zigzag_indices(L, cfg.num_shards)
  keep = positions[None, :] < length[:, None]
  return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def _pad_heads(x: jax.Array, size: int) -> jax.Array:
  return x if x.shape[-1] == size else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, size - x.shape[-1]),))


def _sharded(cfg: _Config, body: Callable, out_specs, shard_mesh, q, k, v, lengths: dict):
  """Pads q/k/v to whole chunks and runs ``body(q, k, v, lengths)`` per device under ``shard_map`` (on local
  shards in the ring's layout, zig-zag when ``cfg.zigzag``)."""
  per = cfg.num_shards * cfg.chunks_per_shard
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))) if n != x.shape[1] else x

  def per_device(q, k, v, lengths):
    if cfg.reorder:
      q, k, v = (_natural_to_zigzag(cfg, x, 1) for x in (q, k, v))
    return body(q, k, v, lengths)

  seq = P(None, cfg.axis_name)
  return jax.shard_map(per_device, mesh=shard_mesh, in_specs=(seq, seq, seq, P()), out_specs=out_specs,
                       axis_names=set(cfg.axes), check_vma=False)(
                           pad(q, cfg.q_chunk * per), pad(k, cfg.kv_chunk * per), pad(v, cfg.kv_chunk * per),
                           lengths)


def _attention_on(cfg: _Config, shard_mesh, q, k, v, lengths: dict):
  """Global ``(out [B, T, N, Hv], lse [B, N, T])`` of the ring on ``shard_mesh`` (Auto axes)."""
  T, H, Hv = q.shape[1], q.shape[-1], v.shape[-1]

  def body(q, k, v, lengths):
    # A value head dim that differs from the query/key one: zero columns (exact) make them equal per block.
    width = max(H, Hv)
    out, lse = _ring(cfg, _pad_heads(q, width), _pad_heads(k, width), _pad_heads(v, width), lengths)
    out = out[..., :Hv]
    if cfg.reorder:
      out, lse = _zigzag_to_natural(cfg, out, 1), _zigzag_to_natural(cfg, lse, 2)
    return out, lse

  q = _zero_beyond(cfg, q, lengths.get("q"))
  k, v = (_zero_beyond(cfg, x, lengths.get("kv")) for x in (k, v))
  out, lse = _sharded(cfg, body, (P(None, cfg.axis_name), P(None, None, cfg.axis_name)), shard_mesh, q, k, v,
                      lengths)
  return out[:, :T], lse[:, :, :T]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ring_call(cfg: _Config, mesh: Mesh, out_specs, q, k, v, lengths: dict):
  return _on_mesh(mesh, functools.partial(_attention_on, cfg), (q, k, v, lengths), out_specs)


def ring_attention(query, key, value, *, mesh: Mesh, axis_name, is_causal: bool = False, scale=None,
                   query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None,
                   load_balance: bool = True, sequence_order: str = "natural", implementation: str | None = None,
                   chunk_sizes: blockwise.ChunkSizes | None = None, block_sizes=None,
                   return_residual: bool = False):
  """Softmax attention with the sequence sharded over ``mesh`` axis ``axis_name`` (ring attention).

  Args:
    query: ``[*B, T, N, H]``; key: ``[*B, S, K, H]``; value: ``[*B, S, K, Hv]``, ``N % K == 0`` — *global*
      arrays, sharded or not: inputs already sharded along the sequence over ``axis_name``
      (``P(None, axis_name)``) are used in place, anything else is resharded (eager calls first move arrays
      committed to other devices onto the mesh). Batch / head sharding over other mesh axes is kept. Jit-able;
      ``mesh`` and ``axis_name`` are static.
    mesh: a ``jax.sharding.Mesh`` (Explicit or Auto axes; inside ``jax.set_mesh`` it must be that mesh).
    axis_name: the mesh axis to shard the sequence over (P devices), or a tuple of axes (P = their product).
    is_causal: query i sees keys j <= i; needs T == S.
    scale, logits_soft_cap, query_seq_lengths, key_value_seq_lengths: as
      :func:`attention_jax.dot_product_attention` (lengths are global positions).
    load_balance: causal only — zig-zag chunks so that every device computes the same number of blocks
      (``False``: contiguous shards, device d computes d + 1 blocks).
    sequence_order: "natural", or "zigzag" when q/k/v (and the output) are already in :func:`to_zigzag` order
      (T, S divisible by 2P), which saves the reordering ``ppermute`` s.
    implementation: per-shard compute, None/"auto" (Pallas on GPU, blockwise elsewhere), "blockwise", "pallas".
    chunk_sizes / block_sizes: tiles of the blockwise path / the Pallas kernel.
    return_residual: also return the logsumexp ``[*B, T, N]`` as ``jax.nn`` does (input dtype, no gradient).

  Returns:
    ``[*B, T, N, Hv]`` in the input dtype, sharded along T over ``axis_name`` (when P divides T), or
    ``(output, logsumexp)``. Any T and S: they are padded internally to whole chunks and the padding masked.
    Under forward-mode or second-order differentiation it computes :func:`ring_attention_reference` instead.
  """
  options = dict(is_causal=is_causal, scale=scale, query_seq_lengths=query_seq_lengths,
                 key_value_seq_lengths=key_value_seq_lengths, logits_soft_cap=logits_soft_cap,
                 load_balance=load_balance, sequence_order=sequence_order, implementation=implementation,
                 chunk_sizes=chunk_sizes, block_sizes=block_sizes)
  inp, cfg = _prepare(query, key, value, mesh, axis_name, **options)
  B, T, N, _ = inp.query.shape
  S, Hv = inp.value.shape[1], inp.value.shape[-1]
  if 0 in (B, T, N, S, Hv):   # nothing to compute, or no keys: every row is empty
    out, lse = jnp.zeros((B, T, N, Hv), inp.query.dtype), jnp.full((B, N, T), -jnp.inf, jnp.float32)
  elif _autodiff.needs_plain_path(inp.query, inp.key, inp.value):
    # Forward-mode / second-order differentiation: the custom-VJP ring cannot serve it; the plain formula can.
    return ring_attention_reference(query, key, value, mesh=mesh, axis_name=axis_name,
                                    return_residual=return_residual, **options)
  else:
    b, _, n, _ = _other_axes(_explicit_spec(inp.query, mesh), 4, cfg.axis_name)
    seq = cfg.axis_name if T % cfg.num_shards == 0 else None
    out, lse = _ring_call(cfg, mesh, (P(b, seq, n, None), P(b, n, seq)), *_ring_args(inp, cfg))
  out = core.restore_batch(out, inp)
  return (out, core.public_residual(lse, inp)) if return_residual else out


def ring_attention_reference(query, key, value, *, mesh: Mesh, axis_name, is_causal: bool = False, scale=None,
                             query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None,
                             load_balance: bool = True, sequence_order: str = "natural",
                             implementation: str | None = None,
                             chunk_sizes: blockwise.ChunkSizes | None = None, block_sizes=None,
                             return_residual: bool = False):
  """The plain algorithm with :func:`ring_attention`'s signature: gathers q/k/v (replicated on every device of
  ``mesh``) and calls :func:`attention_jax.reference_attention` (differentiable to any order, O(T S) memory).
  Tiling and balancing arguments are ignored."""
  del load_balance, implementation, chunk_sizes, block_sizes
  axis_name, num_shards = _check_mesh(mesh, axis_name)
  if sequence_order not in SEQUENCE_ORDERS:
    raise ValueError(f"sequence_order must be one of {SEQUENCE_ORDERS}; got {sequence_order!r}")
  zigzag = sequence_order == "zigzag"
  place = lambda x: None if x is None else jnp.asarray(_onto_mesh(x, mesh, axis_name, num_shards))
  args = tuple(place(x) for x in (query, key, value, query_seq_lengths, key_value_seq_lengths))

  def run(shard_mesh, query, key, value, q_lengths, kv_lengths):
    seq_axis = query.ndim - 3    # T's axis in q/k/v [*B, T, N, H] and in the residual [*B, T, N]
    gather = lambda x: lax.with_sharding_constraint(x, NamedSharding(shard_mesh, P()))
    q, k, v = (gather(from_zigzag(x, num_shards, seq_axis) if zigzag else x) for x in (query, key, value))
    out, lse = core.reference_attention(q, k, v, scale=scale, is_causal=is_causal, query_seq_lengths=q_lengths,
                                        key_value_seq_lengths=kv_lengths, logits_soft_cap=logits_soft_cap,
                                        return_residual=True)
    if zigzag:
      out, lse = to_zigzag(out, num_shards, seq_axis), to_zigzag(lse, num_shards, seq_axis)
    return out, lse

  out, lse = _on_mesh(mesh, run, args, (P(), P()))
  return (out, lse) if return_residual else out


def ring_block_counts(query, key, value, *, mesh: Mesh, axis_name, is_causal: bool = False,
                      query_seq_lengths=None, key_value_seq_lengths=None, load_balance: bool = True,
                      sequence_order: str = "natural") -> jax.Array:
  """The work per device of :func:`ring_attention`'s forward, counted inside the ring as it runs.

  Returns int32 ``[P, 3]``: per device, how many (query chunk, key chunk) pairs it skipped, computed in full
  and computed with the causal mask (columns ``SKIP``, ``FULL``, ``DIAGONAL``), out of ``n * n * P`` (n = 1, or
  2 chunks per device in zig-zag order). Arguments as :func:`ring_attention`.
  """
  inp, cfg = _prepare(query, key, value, mesh, axis_name, is_causal=is_causal, scale=None,
                      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                      logits_soft_cap=None, load_balance=load_balance, sequence_order=sequence_order,
                      implementation="blockwise", chunk_sizes=None, block_sizes=None)
  width = max(inp.query.shape[-1], inp.value.shape[-1])
  body = lambda q, k, v, lengths: _ring_forward(cfg, *(_pad_heads(x, width) for x in (q, k, v)), lengths)[2][None]
  run = functools.partial(_sharded, cfg, body, P(cfg.axis_name))
  return _on_mesh(mesh, run, _ring_args(inp, cfg), P(cfg.axis_name))
