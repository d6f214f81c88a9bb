"""Flax NNX modules and ``attention_fn`` adapters for ``flax.nnx`` / ``flax.linen`` attention layers.

* :func:`make_attention_fn` turns any of our implementations into an ``attention_fn=`` for
  ``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention``;
* :class:`MultiHeadAttention` is an NNX module with the parameter layout of ``flax.nnx.MultiHeadAttention``
  (weights copy across) whose backend is chosen by ``implementation=``;
* :class:`AdditiveAttention` (Bahdanau) and :class:`LuongAttention` (dot / general / concat) are the classic
  single-head attentions of RNN encoder-decoders, built on :mod:`attention_jax.scores`.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import core, scores
from attention_jax._checks import positive_int

# Implementations that form the attention weights, so they can apply attention dropout and sow weights.
_WEIGHT_IMPLEMENTATIONS = (None, "auto", "reference")
# Options fixed by make_attention_fn(..., **options) or passed per call by a caller such as our MultiHeadAttention.
_CALL_OPTIONS = tuple(name for name in core.ATTENTION_KEYWORDS if name != "is_causal")
# The scalar options among them, checked once by make_attention_fn.
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
  """
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
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if dtype is None:
      dtype = jnp.result_type(query, key, value)
    for name, dt in (("query", query.dtype), ("key", key.dtype), ("value", value.dtype), ("dtype", jnp.dtype(dtype))):
      if jnp.issubdtype(dt, jnp.complexfloating):   # refused before any cast could drop the imaginary part
        raise ValueError(f"attention_fn: {name} is complex ({dt}): softmax attention needs real logits, so "
                         "complex inputs are refused")
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    if mask is not None:
      mask = jnp.asarray(mask)
      mask = mask if mask.dtype == jnp.bool_ else mask != 0
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
  return attention_fn


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (self, cross, GQA/MQA) whose backend is chosen by ``implementation=``.

  Parameters match ``flax.nnx.MultiHeadAttention`` (``query``/``key``/``value``/``out`` ``LinearGeneral``), so
  a checkpoint of one loads into the other. ``attention_options`` (``scale``, ``local_window_size``,
  ``logits_soft_cap``) are fixed at construction; masks, causality, sequence lengths and segment ids are
  per call. Attention runs through :func:`make_attention_fn` (dropout and ``sow_weights`` need
  ``implementation`` None, "auto" or "reference"); complex inputs or parameters are refused with a ``ValueError``.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, *, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, implementation: str | None = None, dropout_rate: float = 0.0,
               broadcast_dropout: bool = True, deterministic: bool | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               kernel_init: Callable = jax.nn.initializers.lecun_normal(),
               bias_init: Callable = jax.nn.initializers.zeros, rngs: nnx.Rngs, **attention_options):
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
    self.head_dim = qkv_features // num_heads
    self.in_features = in_features
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = broadcast_dropout
    self.deterministic = deterministic
    self.dtype = dtype
    self.attention_fn = make_attention_fn(implementation, **attention_options)
    dense = lambda i, o, **kw: nnx.LinearGeneral(i, o, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                                                 kernel_init=kernel_init, bias_init=bias_init, rngs=rngs, **kw)
    self.in_kv_features = in_kv
    self.query = dense(in_features, (num_heads, self.head_dim))
    self.key = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.value = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.out = dense((num_heads, self.head_dim), out_features, axis=(-2, -1))
    self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None,
               *, mask: jax.Array | None = None, bias: jax.Array | None = None, is_causal: bool = False,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None, sow_weights: bool = False,
               **call_options) -> jax.Array:
    """``inputs_q [batch..., T, in_features]`` -> ``[batch..., T, out_features]``.

    ``call_options``: ``query_seq_lengths``, ``key_value_seq_lengths``, ``q_segment_ids``, ``kv_segment_ids``.
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
