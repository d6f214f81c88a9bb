"""Flax NNX modules and ``attention_fn`` adapters for ``flax.nnx`` / ``flax.linen`` attention layers.

* :func:`make_attention_fn` turns any of our implementations into an ``attention_fn=`` for
  ``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention``;
* :class:`MultiHeadAttention` is an NNX module with the parameter layout of ``flax.nnx.MultiHeadAttention``
  (weights copy across) whose backend is chosen by ``implementation=``;
* :class:`AdditiveAttention` (Bahdanau) and :class:`LuongAttention` (dot / general / concat) are the classic
  single-head attentions of RNN encoder-decoders, built on :mod:`attention_jax.scores`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import core, scores

# Implementations that form the attention weights, so they can apply attention dropout and sow weights.
_WEIGHT_IMPLEMENTATIONS = (None, "auto", "reference")
_CALL_OPTIONS = ("scale", "query_seq_lengths", "key_value_seq_lengths", "local_window_size", "q_segment_ids",
                 "kv_segment_ids", "logits_soft_cap")


def _flatten_batch(x: jax.Array | None, batch_shape: tuple[int, ...], name: str) -> jax.Array | None:
  """``[batch..., a, b, c] -> [prod(batch) or 1, a, b, c]``; broadcasts size-1 batch dims only when needed."""
  if x is None:
    return None
  x = jnp.asarray(x)
  nb = len(batch_shape)
  if x.ndim > nb + 3:
    raise ValueError(f"{name} of shape {x.shape} has more dims than [batch..., N, T, S] with batch={batch_shape}")
  x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
  lead, tail = x.shape[:nb], x.shape[nb:]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + tail)
  if any(d not in (1, b) for d, b in zip(lead, batch_shape)):
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to batch dims {batch_shape}")
  return jnp.broadcast_to(x, batch_shape + tail).reshape((math.prod(batch_shape),) + tail)


def _dropout_weights(weights_BNTS, *, rng, rate, broadcast, batch_shape, dtype):
  """Attention dropout with flax's semantics and random bits (same rng -> same mask as flax)."""
  keep_prob = 1.0 - rate
  N, T, S = weights_BNTS.shape[1:]
  # Draw with the exact shape flax draws, so the bits agree, then lay it out as [B|1, N|1, T, S].
  shape = (1,) * (len(batch_shape) + 1) + (T, S) if broadcast else batch_shape + (N, T, S)
  keep = jax.random.bernoulli(rng, keep_prob, shape)
  keep = keep.reshape((1, 1, T, S) if broadcast else weights_BNTS.shape)
  return weights_BNTS * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))


def _sow(module: Any, weights: jax.Array) -> None:
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:  # flax.linen
    module.sow("intermediates", "attention_weights", weights)


def make_attention_fn(implementation: str | None = None, **options) -> Callable[..., jax.Array]:
  """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` / ``flax.linen.MultiHeadDotProductAttention``.

  ``options`` (``scale``, ``local_window_size``, ``logits_soft_cap``, ...) are fixed for every call; per-call
  options (sequence lengths, segment ids) may be passed as keywords by a caller such as our
  :class:`MultiHeadAttention`. Flax's keywords are honoured: masks may be float (nonzero = attend) and have any
  number of batch dims; ``dtype`` casts the inputs; attention dropout (``dropout_rate`` with ``dropout_rng``
  when not ``deterministic``) and ``module=`` (sow the weights to ``intermediates``) use flax's semantics and
  need an implementation that forms the weights (None, "auto" or "reference") — any other raises
  ``ValueError``. ``precision`` is accepted; our reference already computes at the highest precision.
  """
  if implementation is not None and implementation != "auto":
    core.resolve_implementation(implementation)
  unknown = set(options) - set(_CALL_OPTIONS)
  if unknown:
    raise ValueError(f"make_attention_fn: unknown options {sorted(unknown)}; allowed: {_CALL_OPTIONS}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                   dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False, dtype=None,
                   precision=None, module=None, is_causal: bool = False, force_fp32_for_softmax: bool = True,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None, **call_options):
    del precision, force_fp32_for_softmax  # softmax is always float32, matmuls at highest precision
    bad = set(call_options) - set(_CALL_OPTIONS)
    if bad:
      raise ValueError(f"attention_fn: unsupported arguments {sorted(bad)} for implementation={implementation!r}")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("attention_fn: custom einsum modules are not supported by attention_jax backends")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate!r}")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
      raise ValueError(f"attention_fn: need [batch..., length, heads, head_dim] inputs of equal rank; got "
                       f"{query.shape=} {key.shape=} {value.shape=}")
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
      raise ValueError(f"attention_fn: batch dims differ; got {query.shape=} {key.shape=} {value.shape=}")
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    q, k, v = (jnp.asarray(x, dtype).reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
    if mask is not None:
      mask = jnp.asarray(mask)
      mask = mask if mask.dtype == jnp.bool_ else mask != 0
    mask = _flatten_batch(mask, batch_shape, "mask")
    bias = _flatten_batch(bias, batch_shape, "bias")
    kwargs = {**options, **call_options}
    needs_dropout = not deterministic and dropout_rate > 0.0
    if not (needs_dropout or module is not None):
      out = core.dot_product_attention(q, k, v, bias, mask, is_causal=is_causal, implementation=implementation,
                                       **kwargs)
      return out.reshape(query.shape)
    if implementation not in _WEIGHT_IMPLEMENTATIONS:
      what = "attention dropout (dropout_rate > 0, deterministic=False)" if needs_dropout else "sow_weights"
      raise ValueError(f"{what} needs the attention weights, which implementation={implementation!r} never "
                       "forms; use implementation='reference' or set dropout_rate=0 / deterministic=True")
    if needs_dropout and dropout_rng is None:
      raise ValueError("dropout_rng is required when dropout_rate > 0 and deterministic=False")
    inp = core.prepare_inputs(q, k, v, bias, mask, is_causal=is_causal, **kwargs)
    weights_fn = None
    if needs_dropout:
      weights_fn = lambda w: _dropout_weights(w, rng=dropout_rng, rate=dropout_rate, broadcast=broadcast_dropout,
                                              batch_shape=batch_shape, dtype=dtype)
    out, _, weights = core.reference_core(inp, weights_fn)
    if module is not None:
      _sow(module, weights.astype(dtype).reshape(batch_shape + weights.shape[1:]))
    return out.reshape(query.shape)

  attention_fn.implementation = implementation
  return attention_fn


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (self, cross, GQA/MQA) whose backend is chosen by ``implementation=``.

  Parameters match ``flax.nnx.MultiHeadAttention`` (``query``/``key``/``value``/``out`` ``LinearGeneral``), so
  a checkpoint of one loads into the other. ``attention_options`` (``scale``, ``local_window_size``,
  ``logits_soft_cap``) are fixed at construction; masks, causality, sequence lengths and segment ids are
  per call.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, *, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, implementation: str | None = None, dropout_rate: float = 0.0,
               broadcast_dropout: bool = True, deterministic: bool | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               kernel_init: Callable = jax.nn.initializers.lecun_normal(),
               bias_init: Callable = jax.nn.initializers.zeros, rngs: nnx.Rngs, **attention_options):
    qkv_features = in_features if qkv_features is None else qkv_features
    self.num_heads = num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if self.num_kv_heads <= 0 or num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if qkv_features % num_heads:
      raise ValueError(f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}")
    self.head_dim = qkv_features // num_heads
    self.in_features = in_features
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = broadcast_dropout
    self.deterministic = deterministic
    self.dtype = dtype
    self.attention_fn = make_attention_fn(implementation, **attention_options)
    dense = lambda i, o, **kw: nnx.LinearGeneral(i, o, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                                                 kernel_init=kernel_init, bias_init=bias_init, rngs=rngs, **kw)
    in_kv = in_features if in_kv_features is None else in_kv_features
    self.query = dense(in_features, (num_heads, self.head_dim))
    self.key = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.value = dense(in_kv, (self.num_kv_heads, self.head_dim))
    self.out = dense((num_heads, self.head_dim), in_features if out_features is None else out_features,
                     axis=(-2, -1))
    self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None,
               *, mask: jax.Array | None = None, bias: jax.Array | None = None, is_causal: bool = False,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None, sow_weights: bool = False,
               **call_options) -> jax.Array:
    """``inputs_q [batch..., T, in_features]`` -> ``[batch..., T, out_features]``.

    ``call_options``: ``query_seq_lengths``, ``key_value_seq_lengths``, ``q_segment_ids``, ``kv_segment_ids``.
    """
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q has {inputs_q.shape[-1]} features; the module expects {self.in_features}")
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
