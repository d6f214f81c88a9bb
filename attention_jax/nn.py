"""Flax NNX modules and ``attention_fn`` adapters for ``flax.nnx`` / ``flax.linen`` attention layers.

* :func:`make_attention_fn` turns any of our implementations into an ``attention_fn=`` for
  ``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention``; ``make_attention_fn("flex",
  score_mod=..., mask_mod=...)`` runs :func:`attention_jax.flex.flex_attention` with mods (ALiBi, document masks);
* :class:`MultiHeadAttention` is an NNX module with the parameter layout of ``flax.nnx.MultiHeadAttention``
  (weights copy across) whose backend is chosen by ``implementation=``, with a decode mode over a KV cache
  (``init_cache``, ``decode=True``) run by :func:`attention_jax.decode_attention`;
* :class:`AdditiveAttention` (Bahdanau) and :class:`LuongAttention` (dot / general / concat) are the classic
  single-head attentions of RNN encoder-decoders, built on :mod:`attention_jax.scores`.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import core, scores
from attention_jax import decode as decode_lib
from attention_jax._checks import positive_int

# Implementations that form the attention weights, so they can apply attention dropout and sow weights.
_WEIGHT_IMPLEMENTATIONS = (None, "auto", "reference")
# Options fixed by make_attention_fn(..., **options) or passed per call by a caller such as our MultiHeadAttention.
_CALL_OPTIONS = tuple(name for name in core.ATTENTION_KEYWORDS if name != "is_causal")
# The scalar options among them, checked once by make_attention_fn; decode mode honours exactly these.
_SCALAR_OPTIONS = ("scale", "local_window_size", "logits_soft_cap")


def _dropout_weights(weights_BNTS: jax.Array, *, rng: jax.Array, rate: float, broadcast: bool,
                     batch_shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Attention dropout with flax's semantics and random bits (same rng -> same mask as flax)."""
  keep_prob = 1.0 - rate
  N, T, S = weights_BNTS.shape[1:]
  # Draw with the exact shape flax draws, so the bits agree, then lay it out as [B|1, N|1, T, S].
  shape = (1,) * (len(batch_shape) + 1) + (T, S) if broadcast else batch_shape + (N, T, S)
  keep = jax.random.bernoulli(rng, keep_prob, shape)
  keep = keep.reshape((1, 1, T, S) if broadcast else weights_BNTS.shape)
  return weights_BNTS * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))


@functools.partial(jax.jit, static_argnames=("static", "dropout", "weights_dtype"))
def _attention_with_weights(arrays: dict, dropout_rng: jax.Array | None, *, static: tuple,
                            dropout: tuple | None, weights_dtype: Any) -> tuple[jax.Array, jax.Array]:
  """The reference algorithm with the weights ``[*B, N, T, S]`` and optional dropout, under one jit boundary.

  ``static``: the static fields of ``core.AttentionInputs``; ``dropout``: ``(rate, broadcast, dtype)`` or None.
  The boundary keeps the ``-inf`` of the masked logits internal, so ``jax.debug_infs`` sees only the outputs.
  """
  inp = core.AttentionInputs(**dict(static), **arrays)
  weights_fn = None
  if dropout is not None:
    rate, broadcast, dtype = dropout
    batch_shape = inp.query.shape[:1] if inp.batch_shape is None else inp.batch_shape
    weights_fn = functools.partial(_dropout_weights, rng=dropout_rng, rate=rate, broadcast=broadcast,
                                   batch_shape=batch_shape, dtype=dtype)
  out, _, weights = core.reference_core(inp, weights_fn)
  return core.restore_batch(out, inp), core.restore_batch(weights.astype(weights_dtype), inp)


def _weights_dtype(dtype: Any, force_fp32_for_softmax: bool) -> Any:
  """The dtype flax gives the sown weights: float32 with ``force_fp32_for_softmax`` (float64 stays float64 here,
  where flax would round it to float32), else the computation dtype."""
  return jnp.promote_types(dtype, jnp.float32) if force_fp32_for_softmax else jnp.dtype(dtype)


def _sow(module: Any, weights: jax.Array) -> None:
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  elif hasattr(module, "sow"):  # flax.linen
    module.sow("intermediates", "attention_weights", weights)
  else:
    raise TypeError(f"attention_fn: module= must be a flax.nnx or flax.linen Module (to sow the weights); "
                    f"got {type(module).__name__}")


def _check_rate(name: str, rate) -> float:
  """A concrete dropout rate in [0, 1) as a float (``ValueError`` otherwise)."""
  value = None
  if not isinstance(rate, (bool, str, bytes)):
    try:
      value = float(rate)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
      pass
  if value is None or not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1); got {rate!r}")
  return value


def _check_implementation(implementation) -> None:
  if implementation is None or isinstance(implementation, str):
    core.resolve_implementations(implementation)
    return
  if not isinstance(implementation, Sequence) or not all(isinstance(n, str) for n in implementation):
    raise TypeError(f"make_attention_fn: implementation must be None, a name or a sequence of names; got "
                    f"{implementation!r}")
  core.resolve_implementations(tuple(implementation))


def _cast_inputs(query, key, value, dtype) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """``query, key, value`` cast to ``dtype`` (default: their common dtype), complex refused before any cast."""
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  for name, dt in (("query", query.dtype), ("key", key.dtype), ("value", value.dtype), ("dtype", jnp.dtype(dtype))):
    if jnp.issubdtype(dt, jnp.complexfloating):   # refused before any cast could drop the imaginary part
      raise ValueError(f"attention_fn: {name} is complex ({dt}): softmax attention needs real logits, so "
                       "complex inputs are refused")
  return (*(x.astype(dtype) for x in (query, key, value)), dtype)


def _bool_mask(mask) -> jax.Array | None:
  """Flax masks may be float (nonzero = attend): a boolean mask, or None."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def make_attention_fn(implementation: str | Sequence[str] | None = None, **options) -> Callable[..., jax.Array]:
  """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` / ``flax.linen.MultiHeadDotProductAttention``.

  ``options`` (``scale``, ``local_window_size``, ``logits_soft_cap``, ...) are fixed for every call; per-call
  options (sequence lengths, segment ids) may be passed as keywords by a caller such as our
  :class:`MultiHeadAttention`. Everything else is :func:`attention_jax.dot_product_attention`'s: inputs
  ``[*B, T, N, H]`` with any number of batch dims (or none), GQA, a value head dim that differs, masks and biases
  of lower rank, dispatch to ``implementation`` (a name or a sequence of names, as there).

  Flax's keywords are honoured: masks may be float (nonzero = attend) and pass on as booleans; ``dtype`` casts
  the inputs (default: their common dtype); attention dropout (``dropout_rate`` with ``dropout_rng`` when not
  ``deterministic``) and ``module=`` (sow the weights ``[*B, N, T, S]`` to ``intermediates``) use flax's semantics
  and random bits and need an implementation that forms the weights (None, "auto" or "reference") -- any other
  raises ``ValueError``. The softmax always runs in float32 (float64 for float64 inputs); like flax, the sown
  weights are in ``dtype``, or float32 under ``force_fp32_for_softmax=True``. ``precision`` is accepted; our
  reference already computes at the highest precision. Rows with no visible key give zeros (flax: the mean of
  the values). Complex inputs are refused on purpose with a ``ValueError``: softmax needs real logits.

  In ``flax.nnx.MultiHeadAttention(decode=True)`` the adapter receives the whole cache ``[*B, max_length, K, H]``
  as key/value (kv heads: GQA is not repeated) and flax's float occupancy mask ``[*B, 1, 1, max_length]``; it is a
  mask like any other, so cache entries past the index stay hidden whatever they hold.

  ``implementation="flex"`` runs :func:`attention_jax.flex.flex_attention` instead, with the options
  ``score_mod(score, b, n, q_idx, kv_idx)``, ``mask_mod(b, n, q_idx, kv_idx)`` (e.g. from
  :mod:`attention_jax.mods`), ``block_size`` (default 128), ``flex_implementation`` (flex_attention's
  ``implementation``) and ``scale``. The block mask is built per call (under ``jit`` too) by
  :func:`attention_jax.flex.create_block_mask`, with tiles of at most the sequence lengths, per batch element /
  head only when a mod reads ``b`` / ``n``. What flax passes per call joins the mods: a ``mask`` array becomes a
  ``mask_mod`` reading it, ``and``-ed with ``mask_mod``; ``is_causal=True`` adds ``mods.causal()``; a ``bias``
  array is added after ``score_mod`` (as ``logits_soft_cap`` comes before ``bias`` here) and receives gradients.
  flex_attention never forms the weights: attention dropout (``dropout_rate > 0``, not ``deterministic``) and
  ``module=`` raise ``ValueError``; sequence lengths and segment ids are refused too (write them as a
  ``mask_mod``: ``mods.lengths``, ``mods.document``). A ``bias`` of ``-inf`` gives weight 0 but, unlike a mask,
  does not hide non-finite values.
  """
  if isinstance(implementation, str) and implementation == "flex":
    return _flex_attention_fn(**options)
  _check_implementation(implementation)
  unknown = set(options) - set(_CALL_OPTIONS)
  if unknown:
    raise ValueError(f"make_attention_fn: unknown options {sorted(unknown)}; allowed: {_CALL_OPTIONS}")
  x = jnp.zeros((1, 1, 1, 1), jnp.float32)
  for name in _SCALAR_OPTIONS:   # checked once here rather than at the first call
    if name in options:
      try:
        core.prepare_inputs(x, x, x, **{name: options[name]})
      except (TypeError, ValueError) as e:
        raise ValueError(f"make_attention_fn: bad {name}={options[name]!r}: {e}") from None
  weights_ok = implementation in _WEIGHT_IMPLEMENTATIONS

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                   dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False, dtype=None,
                   precision=None, module=None, is_causal: bool = False, force_fp32_for_softmax: bool = False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None, **call_options):
    del precision   # softmax in float32, matmuls at the highest precision
    bad = set(call_options) - set(_CALL_OPTIONS)
    if bad:
      raise ValueError(f"attention_fn: unsupported arguments {sorted(bad)} for implementation={implementation!r}; "
                       f"per-call options are {_CALL_OPTIONS}")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("attention_fn: custom einsum modules (qk_attn_weights_einsum / attn_weights_value_einsum) "
                       "are not supported by attention_jax backends")
    dropout_rate = _check_rate("attention_fn: dropout_rate", dropout_rate)
    query, key, value, dtype = _cast_inputs(query, key, value, dtype)
    mask = _bool_mask(mask)
    kwargs = {**options, **call_options}
    needs_dropout = not deterministic and dropout_rate > 0.0
    if not (needs_dropout or module is not None):
      return core.dot_product_attention(query, key, value, bias, mask, is_causal=is_causal,
                                        implementation=implementation, **kwargs)
    inp = core.prepare_inputs(query, key, value, bias, mask, is_causal=is_causal, **kwargs)
    if not weights_ok:
      what = "attention dropout (dropout_rate > 0, deterministic=False)" if needs_dropout else "sow_weights"
      raise ValueError(f"{what} needs the attention weights, which implementation={implementation!r} never "
                       "forms; use implementation='reference' or set dropout_rate=0 / deterministic=True")
    if needs_dropout and dropout_rng is None:
      raise ValueError("attention_fn: dropout_rng is required when dropout_rate > 0 and deterministic=False")
    weights_dtype = _weights_dtype(dtype, force_fp32_for_softmax)
    B, T, N, _ = inp.query.shape
    S, Hv = inp.value.shape[1], inp.value.shape[-1]
    if 0 in (B, T, N, S, Hv):   # nothing to attend to: zeros, as core does
      out = core.restore_batch(jnp.zeros((B, T, N, Hv), dtype), inp)
      weights = core.restore_batch(jnp.zeros((B, N, T, S), weights_dtype), inp)
    else:
      static, arrays = core.split_static(inp)
      dropout = (dropout_rate, bool(broadcast_dropout), jnp.dtype(dtype)) if needs_dropout else None
      out, weights = _attention_with_weights(arrays, dropout_rng if needs_dropout else None, static=static,
                                             dropout=dropout, weights_dtype=weights_dtype)
    if module is not None:
      _sow(module, weights)
    return out

  attention_fn.implementation = implementation
  attention_fn.options = tuple(options.items())
  return attention_fn


# Options make_attention_fn("flex", ...) takes.
_FLEX_OPTIONS = ("score_mod", "mask_mod", "block_size", "flex_implementation", "scale")


def _uses_argument(fn: Callable, num_args: int, index: int) -> bool:
  """Whether ``fn(*int32 scalars)`` reads argument ``index`` (conservatively: it appears in any equation)."""
  zero = jnp.zeros((), jnp.int32)
  jaxpr = jax.make_jaxpr(fn)(*(zero,) * num_args).jaxpr
  var = jaxpr.invars[index]
  return any(var is x for eqn in jaxpr.eqns for x in eqn.invars) or any(var is x for x in jaxpr.outvars)


def _at(array_BNTS: jax.Array, b, n, q_idx, kv_idx) -> jax.Array:
  """``array[b, n, q_idx, kv_idx]`` of a rank-4 array that may have size 1 (broadcast) along any axis."""
  idx = tuple(i if size > 1 else 0 for i, size in zip((b, n, q_idx, kv_idx), array_BNTS.shape))
  return array_BNTS[idx]


def _flex_attention_fn(*, score_mod: Callable | None = None, mask_mod: Callable | None = None,
                       block_size: int | tuple[int, int] = 128,
                       flex_implementation: str | Sequence[str] | None = None, scale: float | None = None,
                       **unknown) -> Callable[..., jax.Array]:
  """``make_attention_fn("flex", ...)``: an ``attention_fn`` running :func:`attention_jax.flex.flex_attention`
  (see :func:`make_attention_fn`)."""
  from attention_jax import flex
  if unknown:
    raise ValueError(f"make_attention_fn('flex'): unknown options {sorted(unknown)}; allowed: {_FLEX_OPTIONS}")
  if score_mod is not None and not callable(score_mod):
    raise TypeError(f"make_attention_fn('flex'): score_mod must be callable (score, b, n, q_idx, kv_idx) -> score; "
                    f"got {score_mod!r}")
  if mask_mod is not None and not callable(mask_mod):
    raise TypeError(f"make_attention_fn('flex'): mask_mod must be callable (b, n, q_idx, kv_idx) -> bool; got "
                    f"{mask_mod!r}")
  context = "make_attention_fn('flex')"
  if isinstance(block_size, (tuple, list)):
    if len(block_size) != 2:
      raise ValueError(f"{context}: block_size must be an int or (query block, key block); got {block_size!r}")
    bq, bk = (positive_int(f"block_size[{i}]", x, context=context) for i, x in enumerate(block_size))
  else:
    bq = bk = positive_int("block_size", block_size, context=context)
  flex.resolve_implementations(flex_implementation)
  if scale is not None:
    x = jnp.zeros((1, 1, 1, 1), jnp.float32)
    try:
      core.prepare_inputs(x, x, x, scale=scale)
    except (TypeError, ValueError) as e:
      raise ValueError(f"make_attention_fn('flex'): bad scale={scale!r}: {e}") from None
  # Which of (b, n) the user's mask reads, found once (a mod that reads neither is classified once per call).
  mask_reads = (False, False) if mask_mod is None else (_uses_argument(mask_mod, 4, 0),
                                                        _uses_argument(mask_mod, 4, 1))

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
                   dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None, module=None,
                   is_causal: bool = False, force_fp32_for_softmax: bool = False, qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None, **call_options):
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    if call_options:
      raise ValueError(f"attention_fn (flex): unsupported arguments {sorted(call_options)}; express sequence "
                       "lengths or segments as a mask_mod (attention_jax.mods.lengths / mods.document)")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("attention_fn: custom einsum modules (qk_attn_weights_einsum / attn_weights_value_einsum) "
                       "are not supported by attention_jax backends")
    dropout_rate = _check_rate("attention_fn: dropout_rate", dropout_rate)
    if not deterministic and dropout_rate > 0.0:
      raise ValueError(f"attention_fn (flex): attention dropout (dropout_rate={dropout_rate}, deterministic=False) "
                       "needs the attention weights, which flex_attention never forms; set dropout_rate=0 or "
                       "deterministic=True, or use implementation='reference'")
    if module is not None:
      raise ValueError("attention_fn (flex): sow_weights needs the attention weights, which flex_attention never "
                       "forms; use implementation='reference'")
    query, key, value, _ = _cast_inputs(query, key, value, dtype)
    inp = core.prepare_inputs(query, key, value, bias, _bool_mask(mask), scale=scale)
    B, T, N, _ = inp.query.shape
    S = inp.key.shape[1]
    mods_and = [] if mask_mod is None else [mask_mod]
    by_b, by_n = mask_reads
    if is_causal:
      from attention_jax import mods
      mods_and.append(mods.causal())
    if inp.mask is not None:
      mask_BNTS = inp.mask
      mods_and.append(lambda b, n, q_idx, kv_idx: _at(mask_BNTS, b, n, q_idx, kv_idx))
      by_b, by_n = by_b or mask_BNTS.shape[0] > 1, by_n or mask_BNTS.shape[1] > 1
    block_mask = None
    if mods_and:
      combined = mods_and[0] if len(mods_and) == 1 else flex.and_masks(*mods_and)
      block_mask = flex.create_block_mask(combined, B if by_b else None, N if by_n else None, T, S,
                                          block_size=(min(bq, T), min(bk, S)))
    score = score_mod
    if inp.bias is not None:
      bias_BNTS = inp.bias

      def score(s, b, n, q_idx, kv_idx):   # score_mod first, then the bias (as core: soft cap before bias)
        s = s if score_mod is None else score_mod(s, b, n, q_idx, kv_idx)
        return s + _at(bias_BNTS, b, n, q_idx, kv_idx).astype(s.dtype)
    out = flex.flex_attention(inp.query, inp.key, inp.value, score, block_mask, scale=inp.scale,
                              implementation=flex_implementation)
    return core.restore_batch(out, inp)

  attention_fn.implementation = "flex"
  return attention_fn


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (self, cross, GQA/MQA) whose backend is chosen by ``implementation=``.

  Parameters match ``flax.nnx.MultiHeadAttention`` (``query``/``key``/``value``/``out`` ``LinearGeneral``), so
  a checkpoint of one loads into the other. ``attention_options`` (``scale``, ``local_window_size``,
  ``logits_soft_cap``) are fixed at construction; masks, causality, sequence lengths and segment ids are
  per call. Attention runs through :func:`make_attention_fn` (dropout and ``sow_weights`` need
  ``implementation`` None, "auto" or "reference"); complex inputs or parameters are refused with a ``ValueError``.

  Decode mode (``decode=True`` at construction or per call, as in flax) keeps a KV cache: ``init_cache`` allocates
  ``cached_key`` / ``cached_value`` ``[batch..., max_length, num_kv_heads, head_dim]`` (kv heads, never repeated
  for GQA) and a per-row ``cache_index`` int32 ``[batch...]``. A call with ``Tq >= 1`` new tokens writes their
  keys/values at ``cache_index .. cache_index + Tq`` of each row, advances the index and runs
  :func:`attention_jax.decode_attention` (``decode_implementation``, ``decode_num_splits``) with the module's
  ``scale`` / ``local_window_size`` / ``logits_soft_cap``: each new token sees the cache up to itself. ``Tq = 1``
  is plain decoding; ``Tq > 1`` prefills in chunks or checks speculative tokens. Rows advance together, but the
  index is per row: set ``cache_index[...]`` to rewind rows (rejected speculative tokens) or to give each row its
  own length after a right-padded prefill; entries at or beyond a row's index are never read, whatever they hold.
  Writing past ``max_length`` raises ``ValueError`` when the index is concrete (eager calls); under ``jit`` it is
  traced, so the writes past the end are dropped (never clamped onto valid entries), that row's output is NaN and
  its index still advances.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, *, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, implementation: str | None = None, dropout_rate: float = 0.0,
               broadcast_dropout: bool = True, deterministic: bool | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               kernel_init: Callable = jax.nn.initializers.lecun_normal(),
               bias_init: Callable = jax.nn.initializers.zeros, decode: bool = False,
               decode_implementation: str | Sequence[str] | None = None, decode_num_splits: int | None = None,
               rngs: nnx.Rngs, **attention_options):
    qkv_features = in_features if qkv_features is None else qkv_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    in_kv = in_features if in_kv_features is None else in_kv_features
    out_features = in_features if out_features is None else out_features
    for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("in_features", in_features),
                    ("qkv_features", qkv_features), ("in_kv_features", in_kv), ("out_features", out_features)):
      positive_int(name, n, context="MultiHeadAttention")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"MultiHeadAttention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if qkv_features % num_heads:
      raise ValueError(f"MultiHeadAttention: qkv_features={qkv_features} must be divisible by num_heads={num_heads}")
    _check_rate("MultiHeadAttention: dropout_rate", dropout_rate)
    if not isinstance(decode, bool):
      raise TypeError(f"MultiHeadAttention: decode must be a bool; got {decode!r}")
    core.resolve_names(decode_implementation, decode_lib.IMPLEMENTATIONS, (), "MultiHeadAttention decode ")
    if decode_num_splits is not None:
      positive_int("decode_num_splits", decode_num_splits, context="MultiHeadAttention")
    self.head_dim = qkv_features // num_heads
    self.in_features = in_features
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = broadcast_dropout
    self.deterministic = deterministic
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.decode = decode
    self.decode_implementation = (decode_implementation if decode_implementation is None
                                  or isinstance(decode_implementation, str) else tuple(decode_implementation))
    self.decode_num_splits = decode_num_splits
    self.attention_fn = make_attention_fn(implementation, **attention_options)
    dense = lambda i, o, **kw: nnx.LinearGeneral(i, o, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                                                 kernel_init=kernel_init, bias_init=bias_init, rngs=rngs, **kw)
    self.in_kv_features = in_kv
    self.query = dense(in_features, (num_heads, self.head_dim))
    self.key = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.value = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.out = dense((num_heads, self.head_dim), out_features, axis=(-2, -1))
    self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def init_cache(self, input_shape: Sequence[int], dtype: Any = None) -> None:
    """Allocates an empty KV cache for inputs of shape ``input_shape = [batch..., max_length, in_features]``.

    ``cached_key`` / ``cached_value``: zeros ``[batch..., max_length, num_kv_heads, head_dim]`` in ``dtype``
    (default: the module's ``dtype``, else ``param_dtype``); ``cache_index``: int32 zeros ``[batch...]``. Calling
    it again starts over.
    """
    shape = tuple(input_shape) if isinstance(input_shape, (Sequence, np.ndarray)) else None
    if (shape is None or len(shape) < 2 or shape[-1] != self.in_features
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise ValueError(f"MultiHeadAttention.init_cache: input_shape must be [batch..., max_length, "
                       f"in_features={self.in_features}] of non-negative ints; got input_shape={input_shape!r}")
    positive_int("max_length", shape[-2], context="MultiHeadAttention.init_cache")
    dtype = jnp.dtype((self.param_dtype if self.dtype is None else self.dtype) if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"MultiHeadAttention.init_cache: dtype must be a real floating dtype; got {dtype}")
    shape = tuple(int(d) for d in shape)
    cache_shape = (*shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(cache_shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(cache_shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros(shape[:-2], jnp.int32))

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None,
               *, mask: jax.Array | None = None, bias: jax.Array | None = None, is_causal: bool = False,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None, sow_weights: bool = False,
               decode: bool | None = None, **call_options) -> jax.Array:
    """``inputs_q [batch..., T, in_features]`` -> ``[batch..., T, out_features]``.

    ``call_options``: ``query_seq_lengths``, ``key_value_seq_lengths``, ``q_segment_ids``, ``kv_segment_ids``.
    ``decode`` (default: the constructor's) runs one decode step over the cache (see the class docstring): the
    ``T`` new tokens attend causally to the cache and to each other, ``is_causal`` is implied; masks, biases,
    per-call options, ``sow_weights`` and attention dropout (``deterministic=False``) do not apply to a cache and
    raise ``ValueError``.
    """
    if inputs_k is None and inputs_v is not None:
      raise ValueError("MultiHeadAttention: inputs_k cannot be None when inputs_v is given (pass the same array "
                       "as inputs_k to use it for both)")
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    for name, x, features in (("inputs_q", inputs_q, self.in_features), ("inputs_k", inputs_k, self.in_kv_features),
                              ("inputs_v", inputs_v, self.in_kv_features)):
      if jnp.ndim(x) < 2 or jnp.shape(x)[-1] != features:
        raise ValueError(f"MultiHeadAttention: {name} must be [batch..., length, {features}]; got "
                         f"{name}.shape={jnp.shape(x)}")
    deterministic = self.deterministic if deterministic is None else deterministic
    decode = self.decode if decode is None else decode
    if decode:
      return self._decode_step(inputs_q, inputs_k, inputs_v, mask=mask, bias=bias, deterministic=deterministic,
                               sow_weights=sow_weights, call_options=call_options)
    dropout_rng = None
    if self.dropout_rate > 0:
      if deterministic is None:
        raise ValueError("MultiHeadAttention with dropout_rate > 0 needs deterministic= (call or constructor)")
      if not deterministic:
        stream = self.rngs if rngs is None else rngs.dropout
        if stream is None:
          raise ValueError("MultiHeadAttention needs rngs for attention dropout")
        dropout_rng = stream()
    x = self.attention_fn(
        self.query(inputs_q), self.key(inputs_k), self.value(inputs_v), bias, mask,
        broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        deterministic=bool(deterministic), dtype=self.dtype, module=self if sow_weights else None,
        is_causal=is_causal, **call_options)
    return self.out(x)

  def _decode_options(self) -> dict[str, Any]:
    """The construction options decode mode honours (``ValueError`` for any other)."""
    if getattr(self.attention_fn, "implementation", None) == "flex":
      raise ValueError("MultiHeadAttention: decode mode runs decode_attention, which takes no score_mod / mask_mod; "
                       "implementation='flex' has no decode mode (use flax.nnx.MultiHeadAttention(decode=True, "
                       "attention_fn=make_attention_fn('flex', ...)) for a cache with mods)")
    options = dict(self.attention_fn.options)
    other = sorted(set(options) - set(_SCALAR_OPTIONS))
    if other:
      raise ValueError(f"MultiHeadAttention: decode mode takes only the options {_SCALAR_OPTIONS}; the options "
                       f"{other} fixed at construction do not apply to a KV cache")
    return options

  def _decode_step(self, inputs_q: jax.Array, inputs_k: jax.Array, inputs_v: jax.Array, *, mask, bias,
                   deterministic: bool | None, sow_weights: bool, call_options: dict) -> jax.Array:
    """One decode step: write the new keys/values into the cache, attend, advance ``cache_index``."""
    refused = [name for name, given in (("mask", mask is not None), ("bias", bias is not None),
                                        ("sow_weights", sow_weights)) if given] + sorted(call_options)
    if refused:
      raise ValueError(f"MultiHeadAttention: {refused} do not apply in decode mode (each new token sees the cache "
                       "up to itself; set cache_index per row for ragged lengths)")
    if self.dropout_rate > 0 and deterministic is False:
      raise ValueError(f"MultiHeadAttention: attention dropout (dropout_rate={self.dropout_rate}, "
                       "deterministic=False) does not apply in decode mode (decode_attention never forms the "
                       "weights); pass deterministic=True")
    options = self._decode_options()
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("MultiHeadAttention: decode mode needs a KV cache; call init_cache([batch..., max_length, "
                       f"{self.in_features}]) first")
    cache_k, cache_v, index = self.cached_key[...], self.cached_value[...], self.cache_index[...]
    if (cache_k.ndim < 3 or cache_k.shape[-2:] != (self.num_kv_heads, self.head_dim)
        or cache_v.shape != cache_k.shape):
      raise ValueError(f"MultiHeadAttention: the KV cache must be [batch..., max_length, num_kv_heads="
                       f"{self.num_kv_heads}, head_dim={self.head_dim}] for keys and values alike; got "
                       f"cached_key.shape={cache_k.shape} cached_value.shape={cache_v.shape}")
    *batch, S, K, H = cache_k.shape
    batch = tuple(batch)
    Tq = jnp.shape(inputs_q)[-2]
    for name, x in (("inputs_q", inputs_q), ("inputs_k", inputs_k), ("inputs_v", inputs_v)):
      if tuple(jnp.shape(x)[:-1]) != batch + (Tq,):
        raise ValueError(f"MultiHeadAttention: in decode mode {name} must be [batch..., Tq, features] with the "
                         f"cache's batch dims {batch} and Tq={Tq} new tokens; got {name}.shape={jnp.shape(x)}, "
                         f"cached_key.shape={cache_k.shape}")
    if jnp.shape(index) not in ((), batch) or not jnp.issubdtype(jnp.asarray(index).dtype, jnp.integer):
      raise ValueError(f"MultiHeadAttention: cache_index must be an integer array [batch...]={batch} (or a scalar); "
                       f"got shape={jnp.shape(index)} dtype={jnp.asarray(index).dtype}")
    if not isinstance(index, jax.core.Tracer):
      values = jnp.broadcast_to(index, batch)
      if values.size and (int(values.min()) < 0 or int(values.max()) + Tq > S):
        raise ValueError(f"MultiHeadAttention: KV cache overflow: cache_index={values.tolist()} + Tq={Tq} new "
                         f"tokens exceeds max_length={S} (cached_key.shape={cache_k.shape}); call "
                         "init_cache with a larger max_length")
    B = math.prod(batch)
    q = self.query(inputs_q).astype(cache_k.dtype).reshape(B, Tq, self.num_heads, H)
    start_B = jnp.broadcast_to(index, batch).reshape(B).astype(jnp.int32)
    cache_k = _write_cache(cache_k.reshape(B, S, K, H), self.key(inputs_k).reshape(B, Tq, K, H), start_B)
    cache_v = _write_cache(cache_v.reshape(B, S, K, H), self.value(inputs_v).reshape(B, Tq, K, H), start_B)
    end_B = start_B + Tq
    x = decode_lib.decode_attention(q, cache_k, cache_v, kv_lengths=jnp.clip(end_B, 0, S),
                                    num_splits=self.decode_num_splits, implementation=self.decode_implementation,
                                    **options)
    # Traced overflow (index < 0 or index + Tq > max_length): writes past the cache were dropped, the row is NaN.
    x = jnp.where(((start_B < 0) | (end_B > S))[:, None, None, None], jnp.asarray(jnp.nan, x.dtype), x)
    self.cached_key[...] = cache_k.reshape(self.cached_key.shape)
    self.cached_value[...] = cache_v.reshape(self.cached_value.shape)
    self.cache_index[...] = (jnp.asarray(index) + Tq).astype(jnp.asarray(index).dtype)
    return self.out(x.reshape(*batch, Tq, self.num_heads, H))


@jax.jit
def _write_cache(cache_BSKH: jax.Array, new_BTKH: jax.Array, start_B: jax.Array) -> jax.Array:
  """``cache[b, start[b] + t] = new[b, t]`` (cast to the cache dtype); positions outside ``[0, S)`` are dropped,
  never clamped or wrapped onto valid entries."""
  B, Tq = new_BTKH.shape[:2]
  S = cache_BSKH.shape[1]
  pos_BT = start_B[:, None] + jnp.arange(Tq, dtype=jnp.int32)[None, :]
  pos_BT = jnp.where(pos_BT < 0, S, pos_BT)
  row_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, Tq))
  return cache_BSKH.at[row_BT, pos_BT].set(new_BTKH.astype(cache_BSKH.dtype), mode="drop")


def _as_params(module: nnx.Module, names: tuple[str, ...]) -> dict[str, jax.Array]:
  return {n: getattr(module, n)[...] for n in names}


class AdditiveAttention(nnx.Module):
  """Bahdanau (additive) attention: ``score(q, k_s) = vᵀ tanh(W q + U k_s)``, softmax, weighted sum.

  Call with ``query [..., T, Dq]`` (a decoder state is ``T = 1``) and ``keys [..., S, Dk]``; returns
  ``(context [..., T, Dv], weights [..., T, S])``. ``values`` defaults to ``keys``.
  """

  def __init__(self, query_features: int, key_features: int, attn_features: int, *,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    p = scores.init_additive(rngs.params(), query_features, key_features, attn_features, param_dtype)
    self.W, self.U, self.v = nnx.Param(p["W"]), nnx.Param(p["U"]), nnx.Param(p["v"])

  def score(self, query: jax.Array, keys: jax.Array, projected_keys: jax.Array | None = None) -> jax.Array:
    return scores.additive(_as_params(self, ("W", "U", "v")), query, keys, projected_keys=projected_keys)

  def project_keys(self, keys: jax.Array) -> jax.Array:
    """``U k``, computable once per source sequence and passed back as ``projected_keys``."""
    return scores.project_keys(_as_params(self, ("U",)), keys)

  def __call__(self, query: jax.Array, keys: jax.Array, values: jax.Array | None = None, *,
               mask: jax.Array | None = None, projected_keys: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    return core.attend(self.score(query, keys, projected_keys), keys if values is None else values, mask)


class LuongAttention(nnx.Module):
  """Luong et al. 2015 global attention with ``score`` one of "dot", "general", "concat" (and "scaled_dot").

  "concat" is ``vᵀ tanh(W_a [q; k])``, i.e. :func:`attention_jax.scores.additive` with ``W_a = [W; U]`` and needs
  ``attn_features``. Returns ``(context, weights)`` like :class:`AdditiveAttention`.
  """

  SCORES = ("dot", "scaled_dot", "general", "concat")

  def __init__(self, query_features: int, key_features: int | None = None, *, score: str = "dot",
               attn_features: int | None = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    key_features = query_features if key_features is None else key_features
    if score not in self.SCORES:
      raise ValueError(f"unknown Luong score={score!r}; choose one of {self.SCORES}")
    if score in ("dot", "scaled_dot") and key_features != query_features:
      raise ValueError(f"score={score!r} needs query_features == key_features; got {query_features}, {key_features}")
    if score in ("general", "concat") and rngs is None:
      raise ValueError(f"score={score!r} has parameters and needs rngs")
    self.score_name = score
    if score == "general":
      self.W = nnx.Param(scores.init_general(rngs.params(), query_features, key_features, param_dtype)["W"])
    elif score == "concat":
      if attn_features is None:
        raise ValueError("score='concat' needs attn_features")
      p = scores.init_additive(rngs.params(), query_features, key_features, attn_features, param_dtype)
      self.W, self.U, self.v = nnx.Param(p["W"]), nnx.Param(p["U"]), nnx.Param(p["v"])

  def score(self, query: jax.Array, keys: jax.Array) -> jax.Array:
    if self.score_name == "dot":
      return scores.dot(query, keys)
    if self.score_name == "scaled_dot":
      return scores.scaled_dot(query, keys)
    if self.score_name == "general":
      return scores.general(_as_params(self, ("W",)), query, keys)
    return scores.additive(_as_params(self, ("W", "U", "v")), query, keys)

  def __call__(self, query: jax.Array, keys: jax.Array, values: jax.Array | None = None, *,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    return core.attend(self.score(query, keys), keys if values is None else values, mask)
