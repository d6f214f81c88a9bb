"""Programmable attention: ``score_mod`` / ``mask_mod`` and block-sparse masks (FlexAttention's model, our layout).

A variant is a few lines of ``jnp`` on scalar indices::

    def alibi(score, b, n, q_idx, kv_idx):          # score_mod: the scaled logit -> a new logit
      return score - slopes[n] * jnp.abs(q_idx - kv_idx)

    def causal(b, n, q_idx, kv_idx):                # mask_mod: True = attend
      return kv_idx <= q_idx

    bm = create_block_mask(causal, None, None, T, S)              # B / N None: the mask does not depend on them
    out = flex_attention(q, k, v, score_mod=alibi, block_mask=bm)

Both mods are vmapped by the library over the tiles it computes. They may close over arrays (``slopes`` above,
document ids, a learned relative-bias table), traced or not: the closure is converted to explicit arguments, and
gradients flow to the floating-point arrays a ``score_mod`` closes over as they do to q, k and v.

``create_block_mask`` classifies every ``block_size`` tile of the ``T x S`` grid, per (batch, head) where the mask
depends on them, as **empty** (skipped), **full** (computed without calling ``mask_mod``) or **partial**
(``mask_mod`` evaluated inside the tile). The result, a :class:`BlockMask`, holds per query block the lists of its
full and partial key blocks (and per key block the transposed lists the backward walks). A mask built from
:mod:`attention_jax.mods` classifies blocks from their corner positions (or per-block document ranges) without
evaluating a single element; any other ``mask_mod`` is evaluated one query block at a time, ``O(block x S)``
memory, never the ``T x S`` mask. It works under ``jit`` with traced data (document ids that differ per row).

Implementations (``implementation=``): ``"reference"`` (dense, the oracle), ``"blockwise"`` (pure JAX, visits only
the non-empty blocks, custom VJP; any backend), ``"pallas"`` (the GPU kernel) and ``"pallas_tpu"`` (the TPU kernel,
block lists as scalar prefetch); Pallas kernels run in interpret mode on CPU. ``None`` picks the backend's kernel,
then "blockwise", then "reference", as :func:`attention_jax.dot_product_attention` does.

Semantics: the usual layout (``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``, GQA with ``N % K == 0``);
``score_mod`` sees the scaled logit in float32 (float64 for float64 inputs); a query row with no visible key returns
zeros with finite gradients; positions a ``mask_mod`` hides never influence a query, even holding NaN. A
``score_mod`` that returns ``-inf`` gives weight 0 but does not hide non-finite values the way a mask does. The
shared semantics (layout, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _autodiff, _numerics, core
from attention_jax._checks import positive_int

ScoreMod = Callable[..., jax.Array]   # (score, b, n, q_idx, kv_idx) -> score
MaskModFn = Callable[..., jax.Array]  # (b, n, q_idx, kv_idx) -> bool

EMPTY, PARTIAL, FULL = 0, 1, 2
DEFAULT_BLOCK_SIZE = 128


# ----------------------------------------------------------------------------------------------------------
# Mask mods that know their block structure
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MaskMod:
  """A ``mask_mod`` with an optional block classifier, so :func:`create_block_mask` never evaluates elements.

  ``fn(b, n, q_idx, kv_idx) -> bool`` is the definition. ``blocks(bq, bk, T, S)`` (optional) returns a function of
  ``(b, n, q_block, kv_block)`` giving two bools: ``(may_attend, attends_all)``. It must be conservative: ``False``
  for ``may_attend`` promises that no pair of the block is visible, ``True`` for ``attends_all`` that every pair of
  real positions (``q < T``, ``kv < S``) is. Anything in between is a partial block, where ``fn`` decides.
  ``&`` and ``|`` compose mask mods (and their classifiers).
  """
  fn: MaskModFn
  blocks: Callable[[int, int, int, int], Callable[..., tuple[jax.Array, jax.Array]]] | None = None
  name: str = "mask_mod"

  def __call__(self, b, n, q_idx, kv_idx):
    return self.fn(b, n, q_idx, kv_idx)

  def __and__(self, other):
    return and_masks(self, other)

  def __or__(self, other):
    return or_masks(self, other)

  def __repr__(self):
    return self.name


def _as_mask_mod(m) -> MaskMod:
  if isinstance(m, MaskMod):
    return m
  if not callable(m):
    raise TypeError(f"a mask_mod must be callable (b, n, q_idx, kv_idx) -> bool; got {m!r}")
  return MaskMod(m, None, getattr(m, "__name__", "mask_mod"))


def _combine(mods, op, name: str) -> MaskMod:
  mods = [_as_mask_mod(m) for m in mods]
  if not mods:
    raise ValueError(f"{name} needs at least one mask_mod")

  def fn(b, n, q_idx, kv_idx):
    return functools.reduce(op, [jnp.asarray(m(b, n, q_idx, kv_idx), bool) for m in mods])

  blocks = None
  if all(m.blocks is not None for m in mods):
    def blocks(bq, bk, T, S):
      parts = [m.blocks(bq, bk, T, S) for m in mods]

      def classify(b, n, qb, kb):
        res = [p(b, n, qb, kb) for p in parts]
        return (functools.reduce(op, [jnp.asarray(r[0], bool) for r in res]),
                functools.reduce(op, [jnp.asarray(r[1], bool) for r in res]))
      return classify
  sym = " & " if op is jnp.logical_and else " | "
  return MaskMod(fn, blocks, "(" + sym.join(repr(m) for m in mods) + ")")


def and_masks(*mask_mods) -> MaskMod:
  """The intersection of mask mods: a pair is visible when every mod allows it."""
  return _combine(mask_mods, jnp.logical_and, "and_masks")


def or_masks(*mask_mods) -> MaskMod:
  """The union of mask mods: a pair is visible when any mod allows it."""
  return _combine(mask_mods, jnp.logical_or, "or_masks")


# ----------------------------------------------------------------------------------------------------------
# Closure conversion: the arrays a mod closes over become explicit arguments
# ----------------------------------------------------------------------------------------------------------


class _Converted(NamedTuple):
  """A mod as a pure function of its scalar arguments followed by the arrays it closed over."""
  fn: Callable
  consts: tuple


def _convert(mod: Callable, *example) -> _Converted:
  """``mod`` traced once on scalar examples; every array it reads (traced or concrete) becomes an argument."""
  closed = jax.make_jaxpr(mod)(*example)
  if len(closed.out_avals) != 1 or closed.out_avals[0].shape != ():
    raise ValueError(f"{getattr(mod, '__name__', mod)!r} must return one scalar per (b, n, q_idx, kv_idx); got "
                     f"outputs {[a.str_short() for a in closed.out_avals]} (write it on scalars; the library vmaps it)")
  jaxpr, n_args = closed.jaxpr, len(example)

  def fn(*args):
    return jax.core.eval_jaxpr(jaxpr, list(args[n_args:]), *args[:n_args])[0]
  return _Converted(fn, tuple(jnp.asarray(c) for c in closed.consts))


_I32 = np.int32(0)


def convert_score_mod(score_mod: ScoreMod | None, dtype: Any) -> _Converted | None:
  if score_mod is None:
    return None
  return _convert(score_mod, jnp.zeros((), dtype), _I32, _I32, _I32, _I32)


def convert_mask_mod(mask_mod: MaskModFn | None) -> _Converted | None:
  if mask_mod is None:
    return None
  closed = jax.make_jaxpr(mask_mod)(_I32, _I32, _I32, _I32)
  if closed.out_avals[0].dtype != jnp.bool_:
    raise ValueError(f"mask_mod {mask_mod!r} must return a bool (True = attend); got {closed.out_avals[0].dtype}")
  return _convert(mask_mod, _I32, _I32, _I32, _I32)


def tile_scores(fn: Callable, consts: Sequence, s: jax.Array, b, n, q_idx: jax.Array, kv_idx: jax.Array):
  """A converted ``score_mod`` on a tile: ``s [R, C]``, ``q_idx [R]``, ``kv_idx [C]``, scalar ``b``, ``n``.

  Plain ``jnp`` (nested ``vmap``), usable inside Pallas kernels as well as in traced JAX.
  """
  f = lambda s_, qi, kj: fn(s_, b, n, qi, kj, *consts)
  f = jax.vmap(jax.vmap(f, in_axes=(0, None, 0)), in_axes=(0, 0, None))
  return f(s, q_idx, kv_idx).astype(s.dtype)


def tile_mask(fn: Callable, consts: Sequence, b, n, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
  """A converted ``mask_mod`` on a tile: bool ``[R, C]`` for ``q_idx [R]``, ``kv_idx [C]``."""
  f = lambda qi, kj: jnp.asarray(fn(b, n, qi, kj, *consts), bool)
  f = jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))
  return jnp.broadcast_to(f(q_idx, kv_idx), (q_idx.shape[0], kv_idx.shape[0]))


# ----------------------------------------------------------------------------------------------------------
# BlockMask
# ----------------------------------------------------------------------------------------------------------


def _lists(state: jax.Array, value: int) -> tuple[jax.Array, jax.Array]:
  """``(count [...], indices [..., n])``: the positions along the last axis where ``state == value``, ascending,
  then padded with the last of them (0 when none), so that a kernel re-reading the padding fetches nothing new."""
  n = state.shape[-1]
  sel = state == value
  count = jnp.sum(sel, axis=-1, dtype=jnp.int32)
  j = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), state.shape)
  order = jnp.argsort(jnp.where(sel, j, n + j), axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  return count, jnp.where(j < count[..., None], order, jnp.where(count[..., None] > 0, last, 0))


def _scatter_state(count, indices, value, n) -> jax.Array:
  """The inverse of :func:`_lists`: int8 ``[..., n]`` with ``value`` at the listed positions."""
  valid = jnp.broadcast_to(jnp.arange(indices.shape[-1]), indices.shape) < count[..., None]
  hit = jax.nn.one_hot(jnp.where(valid, indices, n), n + 1, dtype=jnp.int8)[..., :n]
  return jnp.max(hit, axis=-2) * jnp.int8(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """Which ``block_size`` tiles of the ``T x S`` grid each (batch, head) computes, and how.

  Per query block: ``kv_num_blocks`` partial key blocks (``mask_mod`` evaluated in the tile) listed first in
  ``kv_indices``, and ``full_kv_num_blocks`` full ones (no ``mask_mod``) in ``full_kv_indices``; ``q_*`` hold the
  same per key block (the backward's dK/dV pass). Arrays are int32 ``[Bm, Nm, blocks, blocks]`` with ``Bm`` 1 or
  B, ``Nm`` 1 or N (1: the mask does not depend on that axis). List entries past the count repeat the last valid
  one. Build it with :func:`create_block_mask`.
  """
  kv_num_blocks: jax.Array
  kv_indices: jax.Array
  full_kv_num_blocks: jax.Array
  full_kv_indices: jax.Array
  q_num_blocks: jax.Array
  q_indices: jax.Array
  full_q_num_blocks: jax.Array
  full_q_indices: jax.Array
  seq_lengths: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  mask_mod: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def from_state(cls, state: jax.Array, seq_lengths: tuple[int, int], block_size: tuple[int, int],
                 mask_mod: Any = None) -> BlockMask:
    """From int8 block states ``[Bm, Nm, nq, nk]`` (0 empty, 1 partial, 2 full)."""
    state = jnp.asarray(state, jnp.int8)
    kv_p, kv_full = _lists(state, PARTIAL), _lists(state, FULL)
    t = jnp.swapaxes(state, -1, -2)
    q_p, q_full = _lists(t, PARTIAL), _lists(t, FULL)
    return cls(*kv_p, *kv_full, *q_p, *q_full, seq_lengths=tuple(seq_lengths), block_size=tuple(block_size),
               mask_mod=mask_mod)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """``(Bm, Nm, T, S)``: the (broadcast) batch and head sizes and the sequence lengths."""
    return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

  @property
  def num_blocks(self) -> tuple[int, int]:
    return self.kv_indices.shape[-2:]

  def state(self) -> jax.Array:
    """int8 ``[Bm, Nm, nq, nk]``: 0 empty, 1 partial, 2 full."""
    nk = self.num_blocks[1]
    return jnp.maximum(_scatter_state(self.kv_num_blocks, self.kv_indices, PARTIAL, nk),
                       _scatter_state(self.full_kv_num_blocks, self.full_kv_indices, FULL, nk))

  def to_dense(self) -> jax.Array:
    """Bool ``[Bm, Nm, nq, nk]``: blocks that are computed (full or partial)."""
    return self.state() > EMPTY

  def sparsity(self) -> float:
    """Percentage of blocks skipped (over every (batch, head) the mask holds), as PyTorch reports it."""
    total = math.prod(self.kv_indices.shape)
    computed = jnp.sum(self.kv_num_blocks) + jnp.sum(self.full_kv_num_blocks)
    value = 100.0 * (1.0 - computed / max(total, 1))
    try:
      return float(value)
    except jax.errors.ConcretizationTypeError:
      return value

  def _compatible(self, other: BlockMask, op: str):
    if not isinstance(other, BlockMask):
      return NotImplemented
    if other.seq_lengths != self.seq_lengths or other.block_size != self.block_size:
      raise ValueError(f"BlockMask {op}: masks differ in (T, S)={self.seq_lengths} vs {other.seq_lengths} or "
                       f"block_size={self.block_size} vs {other.block_size}")
    for a, b in zip(self.shape[:2], other.shape[:2]):
      if a != b and 1 not in (a, b):
        raise ValueError(f"BlockMask {op}: batch/head sizes {self.shape[:2]} and {other.shape[:2]} do not broadcast")
    return None

  def __and__(self, other: BlockMask) -> BlockMask:
    """The intersection (both ``mask_mod``\\ s must allow a pair); a block is full only when full in both."""
    if self._compatible(other, "&") is NotImplemented:
      return NotImplemented
    mod = None if self.mask_mod is None and other.mask_mod is None else and_masks(
        *(m for m in (self.mask_mod, other.mask_mod) if m is not None))
    return BlockMask.from_state(jnp.minimum(self.state(), other.state()), self.seq_lengths, self.block_size, mod)

  def __or__(self, other: BlockMask) -> BlockMask:
    """The union; a block is empty only when empty in both, full when full in either."""
    if self._compatible(other, "|") is NotImplemented:
      return NotImplemented
    if self.mask_mod is None or other.mask_mod is None:
      mod = None     # a mask without mask_mod allows every pair
    else:
      mod = or_masks(self.mask_mod, other.mask_mod)
    return BlockMask.from_state(jnp.maximum(self.state(), other.state()), self.seq_lengths, self.block_size, mod)

  def coarsen(self, factor_q: int, factor_k: int) -> BlockMask:
    """The same mask on blocks ``factor_q`` / ``factor_k`` times larger: a coarse block is empty when all its
    blocks are, full when all are full and inside the sequences, partial otherwise (``mask_mod`` decides there).
    Without a ``mask_mod`` a partial block means "every pair of real positions", so only a mask with no empty
    block can be coarsened (``ValueError`` otherwise)."""
    fq, fk = positive_int("factor_q", factor_q), positive_int("factor_k", factor_k)
    state = self.state()
    if self.mask_mod is None and (isinstance(state, jax.core.Tracer) or bool(jnp.any(state == EMPTY))):
      raise ValueError("BlockMask.coarsen: a block mask without mask_mod that skips (or may skip) blocks cannot be "
                       "coarsened (its partial blocks mean every pair is visible)")
    Bm, Nm, nq, nk = state.shape
    cq, ck = -(-nq // fq), -(-nk // fk)
    padded = jnp.pad(state, ((0, 0), (0, 0), (0, cq * fq - nq), (0, ck * fk - nk)))
    blocks = padded.reshape(Bm, Nm, cq, fq, ck, fk)
    full = jnp.all(blocks == FULL, axis=(3, 5))
    state = jnp.where(full, FULL, jnp.where(jnp.any(blocks != EMPTY, axis=(3, 5)), PARTIAL, EMPTY))
    bq, bk = self.block_size
    return BlockMask.from_state(state, self.seq_lengths, (bq * fq, bk * fk), self.mask_mod)

  def picture(self, b: int = 0, n: int = 0, max_blocks: int = 48) -> str:
    """The block layout of one (batch, head) as text: ``█`` full, ``░`` partial, ``·`` empty (first blocks only)."""
    state = np.asarray(self.state()[min(b, self.shape[0] - 1), min(n, self.shape[1] - 1)])
    chars = np.array(["·", "░", "█"])
    rows = ["".join(chars[r[:max_blocks]]) + ("…" if len(r) > max_blocks else "") for r in state[:max_blocks]]
    if state.shape[0] > max_blocks:
      rows.append("⋮")
    return "\n".join(rows)

  def __repr__(self):
    Bm, Nm, T, S = self.shape
    head = (f"BlockMask(shape=(B={Bm}, N={Nm}, T={T}, S={S}), block_size={self.block_size}, "
            f"blocks={self.num_blocks}, mask_mod={self.mask_mod!r}")
    if isinstance(self.kv_num_blocks, jax.core.Tracer):
      return head + ")"
    return head + f", sparsity={self.sparsity():.2f}%)\n" + self.picture()


def _block_size(block_size) -> tuple[int, int]:
  if isinstance(block_size, (tuple, list)):
    if len(block_size) != 2:
      raise ValueError(f"block_size must be an int or (query block, key block); got {block_size!r}")
    return positive_int("block_size[0]", block_size[0]), positive_int("block_size[1]", block_size[1])
  size = positive_int("block_size", block_size)
  return size, size


def _optional_size(name: str, x) -> int:
  return 1 if x is None else positive_int(name, x)


def _outer_vmap(fn: Callable, args: Sequence[jax.Array]):
  """``fn`` of scalars evaluated on the outer product of the 1-D ``args`` (result ``[len(a) for a in args]``)."""
  for axis in reversed(range(len(args))):
    fn = jax.vmap(fn, in_axes=tuple(0 if a == axis else None for a in range(len(args))))
  return fn(*args)


def _grid_vmap(fn: Callable, sizes: Sequence[int]):
  """``fn`` of scalar int32 indices evaluated on the outer product of ``range(size)`` for each size."""
  return _outer_vmap(fn, [jnp.arange(s, dtype=jnp.int32) for s in sizes])


def create_block_mask(mask_mod: MaskModFn | None, B: int | None, N: int | None, T: int, S: int, *,
                      block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> BlockMask:
  """The :class:`BlockMask` of ``mask_mod(b, n, q_idx, kv_idx) -> bool`` (True = attend) on a ``T x S`` grid.

  ``B`` / ``N`` None: the mask does not depend on that axis (``b`` / ``n`` are 0 when it is called). ``mask_mod``
  None: every pair is visible. Works under ``jit`` with ``mask_mod`` closing over traced arrays. A
  :class:`MaskMod` with a block classifier (every mask in :mod:`attention_jax.mods`) is classified per block;
  any other function is evaluated one query block at a time (``O(Bm Nm block S)`` memory). When nothing the mask
  reads is traced, the block mask is computed eagerly even under ``jit`` (so implementations can plan on it).
  """
  if not _can_evaluate_eagerly():
    return _create_block_mask(mask_mod, B, N, T, S, block_size)
  with jax.ensure_compile_time_eval():
    return _create_block_mask(mask_mod, B, N, T, S, block_size)


def _can_evaluate_eagerly() -> bool:
  """Whether eager evaluation inside a trace can run: not under an abstract mesh (lowering for another platform),
  where nothing can execute."""
  return jax.sharding.get_abstract_mesh().empty


def _create_block_mask(mask_mod, B, N, T, S, block_size) -> BlockMask:
  Bm, Nm = _optional_size("B", B), _optional_size("N", N)
  T, S = positive_int("T", T), positive_int("S", S)
  bq, bk = _block_size(block_size)
  nq, nk = -(-T // bq), -(-S // bk)
  if mask_mod is not None:
    convert_mask_mod(mask_mod)     # checks it returns a bool scalar (ValueError otherwise)
  in_bounds = (((jnp.arange(nq) + 1) * bq <= T)[:, None] & ((jnp.arange(nk) + 1) * bk <= S)[None, :])[None, None]
  if mask_mod is None:
    state = jnp.where(in_bounds, FULL, PARTIAL)
  elif isinstance(mask_mod, MaskMod) and mask_mod.blocks is not None:
    classify = mask_mod.blocks(bq, bk, T, S)
    may, every = _grid_vmap(lambda b, n, i, j: tuple(jnp.asarray(x, bool) for x in classify(b, n, i, j)),
                            (Bm, Nm, nq, nk))
    state = jnp.where(may, jnp.where(every & in_bounds, FULL, PARTIAL), EMPTY)
  else:
    may, every = _exact_blocks(mask_mod, Bm, Nm, T, S, bq, bk)
    state = jnp.where(may, jnp.where(every & in_bounds, FULL, PARTIAL), EMPTY)
  state = jnp.broadcast_to(state, (Bm, Nm, nq, nk)).astype(jnp.int8)
  return BlockMask.from_state(state, (T, S), (bq, bk), mask_mod)


def _exact_blocks(mask_mod, Bm: int, Nm: int, T: int, S: int, bq: int, bk: int):
  """``(any, all)`` bool ``[Bm, Nm, nq, nk]`` from ``mask_mod`` evaluated one query block at a time."""
  nq, nk = -(-T // bq), -(-S // bk)
  cols = jnp.arange(nk * bk, dtype=jnp.int32)

  def row(i):
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    f = lambda b, n, qi, kj: jnp.asarray(mask_mod(b, n, qi, kj), bool)
    m = _outer_vmap(f, (jnp.arange(Bm, dtype=jnp.int32), jnp.arange(Nm, dtype=jnp.int32), rows, cols))
    m = jnp.broadcast_to(m, (Bm, Nm, bq, nk * bk))
    real = ((rows < T)[:, None] & (cols < S)[None, :])[None, None]
    may = (m & real).reshape(Bm, Nm, bq, nk, bk).any(axis=(2, 4))
    every = (m | ~real).reshape(Bm, Nm, bq, nk, bk).all(axis=(2, 4))
    return may, every

  may, every = lax.map(row, jnp.arange(nq, dtype=jnp.int32))     # [nq, Bm, Nm, nk]
  return jnp.moveaxis(may, 0, 2), jnp.moveaxis(every, 0, 2)


def dense_block_mask(T: int, S: int, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> BlockMask:
  """Every pair visible: ``create_block_mask(None, None, None, T, S)``."""
  return create_block_mask(None, None, None, T, S, block_size=block_size)


# ----------------------------------------------------------------------------------------------------------
# The call every implementation receives
# ----------------------------------------------------------------------------------------------------------


class FlexInputs(NamedTuple):
  """Validated arguments of :func:`flex_attention` (what every implementation receives).

  ``score`` / ``mask`` are the converted mods (``fn(score, b, n, q_idx, kv_idx, *consts)`` /
  ``fn(b, n, q_idx, kv_idx, *consts)``) or None; ``block_mask`` is always set (a dense one when the caller gave
  none). Implementations return ``(out [B, T, N, Hv] in the input dtype, lse [B, N, T] in the compute dtype, -inf
  on rows with no visible key)``, differentiable in q, k, v and the floating-point ``score.consts``.
  """
  query: jax.Array             # [B, T, N, H]
  key: jax.Array               # [B, S, K, H]
  value: jax.Array             # [B, S, K, Hv]
  scale: Any                   # float or a traced scalar
  score: _Converted | None
  mask: _Converted | None
  block_mask: BlockMask


def _check_block_mask(block_mask: BlockMask, B: int, N: int, T: int, S: int, shapes: str) -> None:
  if not isinstance(block_mask, BlockMask):
    raise TypeError(f"block_mask must be a BlockMask from create_block_mask; got {type(block_mask).__name__}")
  Bm, Nm, Tm, Sm = block_mask.shape
  if (Tm, Sm) != (T, S) or Bm not in (1, B) or Nm not in (1, N):
    raise ValueError(f"block_mask of shape (B={Bm}, N={Nm}, T={Tm}, S={Sm}) does not fit the call: it needs "
                     f"T={T}, S={S}, B in (1, {B}), N in (1, {N}); got {shapes}")


def prepare(query, key, value, score_mod=None, block_mask=None, *, scale=None
            ) -> tuple[FlexInputs, core.AttentionInputs]:
  """Checks and normalises :func:`flex_attention`'s arguments (``ValueError`` naming the shapes)."""
  inp = core.prepare_inputs(query, key, value, scale=scale)
  B, T, N, _ = inp.query.shape
  S = inp.key.shape[1]
  if score_mod is not None and not callable(score_mod):
    raise TypeError(f"score_mod must be callable (score, b, n, q_idx, kv_idx) -> score; got {score_mod!r}")
  if block_mask is None:
    block_mask = dense_block_mask(T, S, (min(DEFAULT_BLOCK_SIZE, T), min(DEFAULT_BLOCK_SIZE, S)))
  _check_block_mask(block_mask, B, N, T, S, inp.shapes)
  dtype = _numerics.compute_dtype(inp.query.dtype)
  flex = FlexInputs(inp.query, inp.key, inp.value, inp.scale, convert_score_mod(score_mod, dtype),
                    convert_mask_mod(block_mask.mask_mod), block_mask)
  return flex, inp


# ----------------------------------------------------------------------------------------------------------
# "reference": dense, the oracle
# ----------------------------------------------------------------------------------------------------------


def reference_impl(f: FlexInputs) -> tuple[jax.Array, jax.Array]:
  """The plain algorithm: every ``[B, N, T, S]`` logit, the mods applied element by element (the block lists are
  not used), a masked softmax. Differentiable to any order."""
  q, k, v = f.query, f.key, f.value
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  G = N // K
  dtype = _numerics.compute_dtype(q.dtype)
  prec = _numerics.matmul_precision(q.dtype)
  # Hidden non-finite entries never meet a multiply: q and k enter cleaned and exactly the logits a non-finite q
  # or k row touches become NaN (as in core.reference_core).
  q5 = _numerics.clean(q).reshape(B, T, K, G, H)
  s = jnp.einsum("btkgh,bskh->bkgts", q5, _numerics.clean(k), preferred_element_type=dtype, precision=prec)
  s = s.reshape(B, N, T, S) * jnp.asarray(f.scale, dtype)
  q_bad = jnp.swapaxes(~_numerics.finite_rows(q), 1, 2)[..., None]                       # [B, N, T, 1]
  k_bad = _per_head_v(~_numerics.finite_rows(k)[..., None], N)[..., 0][:, :, None, :]    # [B, N, 1, S]
  s = jnp.where(q_bad | k_bad, jnp.nan, s)
  b_i, n_i = jnp.arange(B, dtype=jnp.int32), jnp.arange(N, dtype=jnp.int32)
  t_i, s_i = jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
  if f.score is not None:
    g = lambda x, b, n, i, j: f.score.fn(x, b, n, i, j, *f.score.consts)
    for axis in (4, 3, 2, 1):
      g = jax.vmap(g, in_axes=(0,) + tuple(0 if a == axis else None for a in range(1, 5)))
    s = g(s, b_i, n_i, t_i, s_i).astype(dtype)
  if f.mask is not None:
    m = lambda b, n, i, j: jnp.asarray(f.mask.fn(b, n, i, j, *f.mask.consts), bool)
    Bm, Nm = f.block_mask.shape[:2]
    visible = _outer_vmap(m, (jnp.arange(Bm, dtype=jnp.int32), jnp.arange(Nm, dtype=jnp.int32), t_i, s_i))
    s = jnp.where(jnp.broadcast_to(visible, (Bm, Nm, T, S)), s, -jnp.inf)
  else:
    visible, Bm, Nm = None, 1, 1
  smax = jnp.max(s, axis=-1, keepdims=True)
  smax = lax.stop_gradient(jnp.where(jnp.isfinite(smax), smax, 0))
  e = jnp.exp(s - smax)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  has = denom > 0
  p = e / jnp.where(has, denom, 1)
  lse = jnp.where(has, smax + jnp.log(jnp.where(has, denom, 1)), -jnp.inf)[..., 0]
  p_v = jnp.einsum("bkgts,bskh->btkgh", p.reshape(B, K, G, T, S), _numerics.clean(v).astype(dtype), precision=prec)
  out = p_v.reshape(B, T, N, -1)
  v_bad = _per_head_v(~_numerics.finite_rows(v)[..., None], N)[..., 0][:, :, None, :]   # [B, N, 1, S]
  sees_bad = jnp.any(v_bad if visible is None else jnp.broadcast_to(visible, (Bm, Nm, T, S)) & v_bad, axis=-1)
  sees_bad = jnp.swapaxes(jnp.broadcast_to(sees_bad, (B, N, T)), 1, 2)[..., None]
  out = jnp.where(sees_bad, jnp.nan, out)
  return out.astype(q.dtype), lse


def _per_head_v(v: jax.Array, N: int) -> jax.Array:
  """``[B, S, K, Hv] -> [B, N, S, Hv]`` (the kv head of each query head; reference only)."""
  K = v.shape[2]
  return jnp.repeat(jnp.transpose(v, (0, 2, 1, 3)), N // K, axis=1)


# ----------------------------------------------------------------------------------------------------------
# "blockwise": pure JAX, only the listed blocks, custom VJP
# ----------------------------------------------------------------------------------------------------------


class _Static(NamedTuple):
  scale: float
  T: int
  S: int
  bq: int
  bk: int
  G: int
  score_fn: Callable | None
  mask_fn: Callable | None
  dtype: Any
  precision: Any
  mask_b: bool = True    # the block mask has a batch axis: mask_mod sees the real b (else 0, as when it was built)
  mask_n: bool = True


def _mask_tile(st: _Static, b, n, rows, cols, mc):
  """The tile's visibility: real positions that ``mask_mod`` allows."""
  visible = (rows < st.T)[:, None] & (cols < st.S)[None, :]
  if st.mask_fn is not None:
    visible = visible & tile_mask(st.mask_fn, mc, b if st.mask_b else 0, n if st.mask_n else 0, rows, cols)
  return visible


def _mm(st: _Static, spec: str, a, b):
  return _numerics.einsum(spec, a, b, dtype=st.dtype, precision=st.precision)


def _slice(x, start, size):
  return lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _tile(st: _Static, b, n, q_i, k_j, rows, cols, sc, mc, masked: bool):
  """``(s [bq, bk], raw, visible)``: scaled logits after ``score_mod`` (``-inf`` where hidden), the logits before
  it, and the tile's visibility (None for a full block)."""
  raw = _mm(st, "qh,kh->qk", q_i, k_j) * st.scale
  s = raw if st.score_fn is None else tile_scores(st.score_fn, sc, raw, b, n, rows, cols)
  visible = None
  if masked:
    visible = _mask_tile(st, b, n, rows, cols, mc)
    s = jnp.where(visible, s, -jnp.inf)
  return s, raw, visible


def _fwd_head(st: _Static, b, n, q, k, v, sc, mc, lists):
  """One (batch, head): ``q [Tp, H]``, ``k [Sp, H]``, ``v [Sp, Hv]`` -> ``(out [Tp, Hv], lse [Tp])``."""
  part_num, part_idx, full_num, full_idx = lists
  Hv = v.shape[-1]

  def q_block(i):
    rows = i * st.bq + jnp.arange(st.bq, dtype=jnp.int32)
    q_i = _slice(q, i * st.bq, st.bq)

    def step(masked, t, carry):
      m, l, acc, bad = carry
      j = (part_idx if masked else full_idx)[i, t]
      k_j, v_j = _slice(k, j * st.bk, st.bk), _slice(v, j * st.bk, st.bk)
      cols = j * st.bk + jnp.arange(st.bk, dtype=jnp.int32)
      s, _, visible = _tile(st, b, n, q_i, k_j, rows, cols, sc, mc, masked)
      if masked:   # values at hidden keys never meet a multiply; visible non-finite ones poison their rows
        bad = bad | jnp.any(visible & ~_numerics.finite_rows(v_j)[None, :], axis=1)
        v_j = _numerics.clean(v_j)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(jnp.isneginf(m_new), 0, m_new)
      p = jnp.exp(s - m_safe[:, None])
      corr = jnp.exp(m - m_safe)
      l = l * corr + jnp.sum(p, axis=1)
      acc = acc * corr[:, None] + _mm(st, "qk,kh->qh", p, v_j)
      return m_new, l, acc, bad

    carry = (jnp.full((st.bq,), -jnp.inf, st.dtype), jnp.zeros((st.bq,), st.dtype),
             jnp.zeros((st.bq, Hv), st.dtype), jnp.zeros((st.bq,), bool))
    carry = lax.fori_loop(0, full_num[i], functools.partial(step, False), carry)
    m, l, acc, bad = lax.fori_loop(0, part_num[i], functools.partial(step, True), carry)
    has = l != 0     # NaN (a row that sees a non-finite logit) stays NaN; 0: no visible key
    out = jnp.where(has[:, None], acc / jnp.where(has, l, 1)[:, None], 0)
    out = jnp.where(bad[:, None], jnp.nan, out)
    m_safe = jnp.where(jnp.isneginf(m), 0, m)
    lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, l, 1)), -jnp.inf)
    return out, lse

  out, lse = lax.map(q_block, jnp.arange(part_num.shape[0], dtype=jnp.int32))
  return out.reshape(-1, Hv), lse.reshape(-1)


def _bwd_head(st: _Static, b, n, q, k, v, do, lse, delta, sc, mc, lists):
  """One (batch, head)'s ``(dq [Tp, H], dk [Sp, H], dv [Sp, Hv], d_score_consts)`` (compute dtype)."""
  part_num, part_idx, full_num, full_idx = lists
  H, Hv = q.shape[-1], v.shape[-1]
  float_consts = [i for i, c in enumerate(sc) if jnp.issubdtype(c.dtype, jnp.floating)]

  def k_block(carry, j):
    dq, dsc = carry
    cols = j * st.bk + jnp.arange(st.bk, dtype=jnp.int32)
    k_j, v_j = _slice(k, j * st.bk, st.bk), _slice(v, j * st.bk, st.bk)

    def step(masked, t, c):
      dk, dv, dq, dsc = c
      i = (part_idx if masked else full_idx)[j, t]
      rows = i * st.bq + jnp.arange(st.bq, dtype=jnp.int32)
      q_i, do_i = _slice(q, i * st.bq, st.bq), _slice(do, i * st.bq, st.bq)
      lse_i, delta_i = _slice(lse, i * st.bq, st.bq), _slice(delta, i * st.bq, st.bq)

      def scores(raw, fc):
        consts = list(sc)
        for pos, val in zip(float_consts, fc):
          consts[pos] = val
        return tile_scores(st.score_fn, consts, raw, b, n, rows, cols)

      raw = _mm(st, "qh,kh->qk", q_i, k_j) * st.scale
      if st.score_fn is None:
        s = raw
      else:
        s, mod_vjp = jax.vjp(scores, raw, [sc[p] for p in float_consts])
      visible = None
      if masked:
        visible = _mask_tile(st, b, n, rows, cols, mc)
        s = jnp.where(visible, s, -jnp.inf)
      live = ~jnp.isneginf(lse_i)
      p = jnp.where(live[:, None], jnp.exp(s - jnp.where(live, lse_i, 0)[:, None]), 0)
      dv = dv + _mm(st, "qk,qh->kh", p, do_i)
      dp = _mm(st, "qh,kh->qk", do_i, v_j)
      ds = p * (dp - delta_i[:, None])
      if masked:
        ds = jnp.where(visible, ds, 0)
      if st.score_fn is not None:
        ds, d_fc = mod_vjp(ds)
        dsc = [a + g_.astype(a.dtype) for a, g_ in zip(dsc, d_fc)]
      ds = ds * st.scale
      q_c, k_c = (_numerics.clean(q_i), _numerics.clean(k_j)) if masked else (q_i, k_j)
      dk = dk + _mm(st, "qk,qh->kh", ds, q_c)
      dq_i = _slice(dq, i * st.bq, st.bq) + _mm(st, "qk,kh->qh", ds, k_c)
      dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * st.bq, axis=0)
      return dk, dv, dq, dsc

    c = (jnp.zeros((st.bk, H), st.dtype), jnp.zeros((st.bk, Hv), st.dtype), dq, dsc)
    c = lax.fori_loop(0, full_num[j], functools.partial(step, False), c)
    dk, dv, dq, dsc = lax.fori_loop(0, part_num[j], functools.partial(step, True), c)
    return (dq, dsc), (dk, dv)

  dsc0 = [jnp.zeros(sc[p].shape, st.dtype) for p in float_consts]
  (dq, dsc), (dk, dv) = lax.scan(k_block, (jnp.zeros((q.shape[0], H), st.dtype), dsc0),
                                 jnp.arange(part_num.shape[0], dtype=jnp.int32))
  return dq, dk.reshape(-1, H), dv.reshape(-1, Hv), dsc


def _head_lists(bm: BlockMask, transposed: bool):
  if transposed:
    return bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices
  return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices


def _map_heads(fn, B: int, K: int, G: int, per_q, per_kv, shared, lists):
  """Runs ``fn(b, n, *per_q, *per_kv, *shared, lists)`` for every (batch, query head) with nested ``vmap``.

  ``per_q`` arrays are ``[B, K, G, ...]``, ``per_kv`` ``[B, K, ...]``, ``shared`` go to every call whole and
  ``lists`` are ``[Bm, Nm, ...]`` (mapped only along the axes they have). Results come back ``[B, K, G, ...]``.
  """
  Bm, Nm = lists[0].shape[:2]
  lists = tuple(x.reshape((Bm, K, G) + x.shape[2:]) if Nm > 1 else x[:, 0] for x in lists)
  if Bm == 1:
    lists = tuple(x[0] for x in lists)
  n_q, n_kv, n_sh = len(per_q), len(per_kv), len(shared)

  def call(b, kvh, g, *args):
    rest = args[n_q + n_kv + n_sh:]
    return fn(b, kvh * G + g, *args[:n_q + n_kv + n_sh], rest)

  heads = 0 if Nm > 1 else None
  axes = lambda idx, q_ax, kv_ax, ls_ax: (idx + (q_ax,) * n_q + (kv_ax,) * n_kv + (None,) * n_sh
                                          + (ls_ax,) * len(lists))
  f = jax.vmap(call, in_axes=axes((None, None, 0), 0, None, heads))
  f = jax.vmap(f, in_axes=axes((None, 0, None), 0, 0, heads))
  f = jax.vmap(f, in_axes=axes((0, None, None), 0, 0, 0 if Bm > 1 else None))
  ar = lambda m: jnp.arange(m, dtype=jnp.int32)
  return f(ar(B), ar(K), ar(G), *per_q, *per_kv, *shared, *lists)


def _layout(st: _Static, q, k, v):
  """Padded, head-major: ``q [B, K, G, Tp, H]``, ``k [B, K, Sp, H]``, ``v [B, K, Sp, Hv]``."""
  B, T, N, H = q.shape
  K = k.shape[2]
  nq, nk = -(-st.T // st.bq), -(-st.S // st.bk)
  q = _numerics.pad_axis(q, 1, nq * st.bq)
  k, v = _numerics.pad_axis(k, 1, nk * st.bk), _numerics.pad_axis(v, 1, nk * st.bk)
  q_h = jnp.transpose(q.reshape(B, -1, K, st.G, H), (0, 2, 3, 1, 4))
  return q_h, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(st: _Static, q, k, v, sc, mc, bm):
  return _blockwise_fwd(st, q, k, v, sc, mc, bm)[0]


def _blockwise_fwd(st: _Static, q, k, v, sc, mc, bm):
  B, T, N, _ = q.shape
  K = k.shape[2]
  q_h, k_h, v_h = _layout(st, q, k, v)
  fn = lambda b, n, q_, k_, v_, sc_, mc_, ls: _fwd_head(st, b, n, q_, k_, v_, sc_, mc_, ls)
  out, lse = _map_heads(fn, B, K, st.G, (q_h,), (k_h, v_h), (tuple(sc), tuple(mc)),
                        _head_lists(bm, transposed=False))
  Hv = out.shape[-1]
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, -1, N, Hv)[:, :T].astype(q.dtype)
  lse = lse.reshape(B, N, -1)[:, :, :T]
  return (out, lse), (q, k, v, sc, mc, bm, out, lse)


def _blockwise_bwd(st: _Static, res, cts):
  q, k, v, sc, mc, bm, out, lse = res
  d_out, d_lse = cts
  B, T, N, H = q.shape
  K = k.shape[2]
  delta = _numerics.backward_delta(out, d_out, d_lse, st.dtype)              # [B, N, T]
  nq = -(-st.T // st.bq)
  pad_rows = lambda x: _numerics.pad_axis(x, 2, nq * st.bq).reshape(B, K, st.G, -1)
  lse_p = _numerics.pad_axis(lse, 2, nq * st.bq, -jnp.inf).reshape(B, K, st.G, -1)   # padded rows: no key
  delta_p = pad_rows(delta)
  q_h, k_h, v_h = _layout(st, q, k, v)
  do_h = _layout(st, d_out, k, v)[0]
  fn = lambda b, n, q_, do_, lse_, dl_, k_, v_, sc_, mc_, ls: _bwd_head(st, b, n, q_, k_, v_, do_, lse_, dl_, sc_,
                                                                        mc_, ls)
  dq, dk, dv, dsc = _map_heads(fn, B, K, st.G, (q_h, do_h, lse_p, delta_p), (k_h, v_h), (tuple(sc), tuple(mc)),
                               _head_lists(bm, transposed=True))
  dq = jnp.transpose(dq, (0, 3, 1, 2, 4)).reshape(B, -1, N, H)[:, :T].astype(q.dtype)
  dk = jnp.transpose(jnp.sum(dk, axis=2), (0, 2, 1, 3))[:, :st.S].astype(k.dtype)
  dv = jnp.transpose(jnp.sum(dv, axis=2), (0, 2, 1, 3))[:, :st.S].astype(v.dtype)
  d_sc, it = [], iter(dsc)
  for c in sc:
    if jnp.issubdtype(c.dtype, jnp.floating):
      d_sc.append(jnp.sum(next(it), axis=(0, 1, 2)).astype(c.dtype))
    else:
      d_sc.append(None)
  return dq, dk, dv, tuple(d_sc), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# The blockwise path's largest tile. Measured on a 2-core CPU (docs/BENCHMARKS.md, T = 16384, fwd+bwd): a causal
# mask runs as fast as dot_product_attention's blockwise path on 512-long tiles and 1.1-1.7x slower on the block
# mask's default 128-long ones, an element costing about 1.5-1.8x more in a 128 tile than in a 512 tile (smaller
# matmuls, more loop steps); 16 documents run 1.2x faster on 512 tiles though they compute 1.5x the elements; a
# 256-wide window is fastest on its own 128 blocks (512 tiles would compute 2.4x the elements).
MAX_TILE = 512
# Coarser tiles are taken while they compute at most this many times the elements the block mask's own blocks do.
MAX_EXTRA_WORK = 1.55


def compute_blocks(bm: BlockMask, max_tile: int = MAX_TILE, max_extra_work: float = MAX_EXTRA_WORK) -> BlockMask:
  """The block mask the blockwise path computes on: ``bm`` coarsened by the largest power-of-two factor that keeps
  tiles within ``max_tile`` and the computed elements within ``max_extra_work`` times ``bm``'s own. Only a
  concrete block mask is coarsened (a traced one keeps its blocks: tile sizes are static), and one without
  ``mask_mod`` only when it skips no block."""
  if isinstance(bm.kv_num_blocks, jax.core.Tracer) or not _can_evaluate_eagerly():
    return bm
  bq, bk = bm.block_size
  T, S = bm.seq_lengths

  def work(m: BlockMask) -> float:
    counts = np.asarray(m.kv_num_blocks, np.int64) + np.asarray(m.full_kv_num_blocks, np.int64)
    return float(counts.sum()) * m.block_size[0] * m.block_size[1]

  best, factor = bm, 2
  with jax.ensure_compile_time_eval():    # bm is concrete: plan eagerly, even under jit
    if bm.mask_mod is None and bool(np.any(np.asarray(bm.state()) == EMPTY)):
      return bm
    own = work(bm)
    while max(bq, bk) * factor <= max_tile and (bq * factor // 2 < T or bk * factor // 2 < S):
      coarse = bm.coarsen(factor, factor)
      if work(coarse) <= max_extra_work * own:
        best = coarse
      factor *= 2
  return best


def blockwise_impl(f: FlexInputs) -> tuple[jax.Array, jax.Array]:
  """``implementation="blockwise"``: online softmax over the listed key blocks of each query block (full blocks
  without ``mask_mod``), a custom VJP that walks the transposed lists. Tiles are the block mask's blocks, or
  multiples of them where that computes little more (:func:`compute_blocks`)."""
  bm = compute_blocks(f.block_mask, MAX_TILE, MAX_EXTRA_WORK)
  T, S = bm.seq_lengths
  bq, bk = bm.block_size
  scale = _numerics.static_float("scale", f.scale, path="flex_attention's blockwise path")
  st = _Static(scale, T, S, bq, bk, f.query.shape[2] // f.key.shape[2],
               None if f.score is None else f.score.fn, None if f.mask is None else f.mask.fn,
               _numerics.compute_dtype(f.query.dtype), _numerics.matmul_precision(f.query.dtype),
               bm.shape[0] > 1, bm.shape[1] > 1)
  sc = () if f.score is None else f.score.consts
  mc = () if f.mask is None else f.mask.consts
  # A non-finite q or k row makes every logit it touches NaN, whatever the sign an Inf would give it.
  q, k = _numerics.nan_rows(f.query), _numerics.nan_rows(f.key)
  return _blockwise(st, q, k, f.value, tuple(sc), tuple(mc), bm)


# ----------------------------------------------------------------------------------------------------------
# Dispatch and the public entry point
# ----------------------------------------------------------------------------------------------------------

_DISPATCH: dict[str, tuple[str, str]] = {
    "reference": ("attention_jax.flex", "reference_impl"),
    "blockwise": ("attention_jax.flex", "blockwise_impl"),
    "pallas": ("attention_jax.kernels.flex_gpu", "flex_gpu_core"),
    "pallas_tpu": ("attention_jax.kernels.flex_tpu", "flex_tpu_core"),
}
IMPLEMENTATIONS = tuple(_DISPATCH)


def resolve_implementations(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
  """The implementations to try, in order: None/"auto" -> the backend's kernel, "blockwise", "reference"."""
  kernel = {"gpu": ("pallas",), "tpu": ("pallas_tpu",)}.get(jax.default_backend(), ())
  return core.resolve_names(implementation, IMPLEMENTATIONS, kernel + ("blockwise", "reference"), "flex_attention ")


def flex_core(f: FlexInputs, implementation: str | Sequence[str] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(out [B, T, N, Hv], lse [B, N, T])`` from the first implementation that takes the call."""
  names = resolve_implementations(implementation)
  consts = () if f.score is None else f.score.consts
  if _autodiff.needs_plain_path(f.query, f.key, f.value, *consts):
    names = ("reference",)   # forward-mode / higher-order: the differentiable formula

  def call(name):
    module, function = _DISPATCH[name]
    return getattr(importlib.import_module(module), function)(f)
  return core.first_that_runs(names, call, "flex_attention ")


def flex_attention(query: jax.typing.ArrayLike, key: jax.typing.ArrayLike, value: jax.typing.ArrayLike,
                   score_mod: ScoreMod | None = None, block_mask: BlockMask | None = None, *,
                   scale: float | None = None, implementation: str | Sequence[str] | None = None,
                   return_residual: bool = False):
  """Attention with a programmable logit (``score_mod``) and a block-sparse mask (``block_mask``).

  Args:
    query: ``[*B, T, N, H]``; key: ``[*B, S, K, H]``; value: ``[*B, S, K, Hv]``; ``N % K == 0`` (GQA/MQA).
    score_mod: ``(score, b, n, q_idx, kv_idx) -> score``, applied to each scaled logit (float32) before the
      softmax; written on scalars. Arrays it closes over receive gradients.
    block_mask: from :func:`create_block_mask` (its ``mask_mod`` decides visibility); None: every pair visible.
    scale: logit scale, default ``1/sqrt(H)``.
    implementation: None/"auto", "reference", "blockwise", "pallas", "pallas_tpu", or a sequence of them.
    return_residual: also return the logsumexp ``[*B, T, N]`` (input dtype, no gradient) as jax.nn does.

  Returns:
    ``[*B, T, N, Hv]`` in the input dtype, or ``(output, logsumexp)``.
  """
  resolve_implementations(implementation)
  f, inp = prepare(query, key, value, score_mod, block_mask, scale=scale)
  if core.is_empty(inp):
    return core._empty_result(inp, return_residual, False)
  out, lse = flex_core(f, implementation)
  out = core.restore_batch(out, inp)
  return (out, core.public_residual(lse, inp)) if return_residual else out


def flex_attention_reference(query: jax.typing.ArrayLike, key: jax.typing.ArrayLike, value: jax.typing.ArrayLike,
                             score_mod: ScoreMod | None = None, block_mask: BlockMask | None = None, *,
                             scale: float | None = None, implementation: str | Sequence[str] | None = None,
                             return_residual: bool = False):
  """:func:`flex_attention`'s signature computed by the dense reference (every logit, the mods element by element,
  ``implementation`` validated and ignored). Differentiable to any order."""
  resolve_implementations(implementation)
  return flex_attention(query, key, value, score_mod, block_mask, scale=scale, implementation="reference",
                        return_residual=return_residual)
