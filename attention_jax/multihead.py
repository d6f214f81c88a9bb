"""Functional multi-head attention (self, cross, GQA/MQA) over plain-pytree parameters.

The parameter layout is that of ``flax.nnx.MultiHeadAttention`` / ``flax.linen.MultiHeadDotProductAttention``
(``query/key/value/out`` each with ``kernel`` and ``bias``), so weights move between them unchanged::

  query.kernel [D, N, H]   key.kernel [Dkv, K, H]   value.kernel [Dkv, K, H]   out.kernel [N, H, D]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import core

Params = dict[str, dict[str, jax.Array]]


def init_multi_head(rng: jax.Array, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                    d_kv: int | None = None, *, head_dim: int | None = None, use_bias: bool = True,
                    dtype: Any = jnp.float32) -> Params:
  """Parameters for :func:`multi_head_attention`.

  Args:
    d_model: query input (and output) features D.
    num_heads: query heads N; ``num_kv_heads`` K (default N) must divide it.
    d_kv: features of the key/value input for cross-attention (default ``d_model``).
    head_dim: per-head features H (default ``d_model // num_heads``).
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  d_kv = d_model if d_kv is None else d_kv
  if num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} (or pass head_dim)")
    head_dim = d_model // num_heads
  rq, rk, rv, ro = jax.random.split(rng, 4)
  in_init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
  out_init = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)

  def dense(r, kernel_shape, bias_shape, init):
    p = {"kernel": init(r, kernel_shape, dtype)}
    if use_bias:
      p["bias"] = jnp.zeros(bias_shape, dtype)
    return p

  return {
      "query": dense(rq, (d_model, num_heads, head_dim), (num_heads, head_dim), in_init),
      "key": dense(rk, (d_kv, num_kv_heads, head_dim), (num_kv_heads, head_dim), in_init),
      "value": dense(rv, (d_kv, num_kv_heads, head_dim), (num_kv_heads, head_dim), in_init),
      "out": dense(ro, (num_heads, head_dim, d_model), (d_model,), out_init),
  }


def _project_in(p: dict[str, jax.Array], x_BTD: jax.Array, dtype: Any) -> jax.Array:
  y = jnp.einsum("btd,dnh->btnh", x_BTD.astype(dtype), p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)[None, None]
  return y


def multi_head_attention(params: Params, x_q: jax.Array, x_kv: jax.Array | None = None, *, num_heads: int,
                         num_kv_heads: int | None = None, mask: jax.Array | None = None, is_causal: bool = False,
                         implementation: str | None = None, return_weights: bool = False, **attention_options
                         ) -> tuple[jax.Array, jax.Array | None]:
  """Multi-head attention of ``x_q [B, T, D]`` over ``x_kv [B, S, Dkv]`` (default ``x_q``: self-attention).

  ``mask`` (bool, broadcastable to ``[B, N, T, S]``), ``is_causal`` and ``attention_options`` (``scale``,
  ``local_window_size``, ``query_seq_lengths``, ``key_value_seq_lengths``, segment ids, ``logits_soft_cap``,
  ``bias``) go to :func:`attention_jax.dot_product_attention`. Computation runs in the promoted dtype of the
  inputs and parameters.

  Returns:
    ``(output [B, T, D], weights [B, N, T, S] or None)``; weights need the reference implementation
    (``implementation`` None, "auto" or "reference").
  """
  x_q = jnp.asarray(x_q)
  x_kv = x_q if x_kv is None else jnp.asarray(x_kv)
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if x_q.ndim != 3 or x_kv.ndim != 3:
    raise ValueError(f"x_q must be [B, T, D] and x_kv [B, S, Dkv]; got {x_q.shape=} {x_kv.shape=}")
  wq, wk, wo = (jnp.shape(params[n]["kernel"]) for n in ("query", "key", "out"))
  expected = {"query": (x_q.shape[-1], num_heads), "key": (x_kv.shape[-1], num_kv_heads),
              "value": (x_kv.shape[-1], num_kv_heads)}
  for name, (d_in, heads) in expected.items():
    shape = jnp.shape(params[name]["kernel"])
    if len(shape) != 3 or shape[:2] != (d_in, heads) or shape[2] != wq[2]:
      raise ValueError(f"params[{name!r}]['kernel'] has shape {shape}; expected ({d_in}, {heads}, H) for "
                       f"{x_q.shape=} {x_kv.shape=} num_heads={num_heads} num_kv_heads={num_kv_heads}")
  if wo[:2] != wq[1:]:
    raise ValueError(f"params['out']['kernel'] has shape {wo}; expected {wq[1:]} + (D_out,)")
  dtype = jnp.result_type(x_q, x_kv, *jax.tree.leaves(params))
  q = _project_in(params["query"], x_q, dtype)
  k = _project_in(params["key"], x_kv, dtype)
  v = _project_in(params["value"], x_kv, dtype)
  weights = None
  if return_weights:
    if implementation not in (None, "auto", "reference"):
      raise ValueError(f"return_weights=True needs the reference implementation; implementation="
                       f"{implementation!r} never forms the attention weights")
    o, weights = core.reference_attention(q, k, v, mask=mask, is_causal=is_causal, return_weights=True,
                                          **attention_options)
  else:
    o = core.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation,
                                   **attention_options)
  out = jnp.einsum("btnh,nhd->btd", o, params["out"]["kernel"].astype(dtype))
  if "bias" in params["out"]:
    out = out + params["out"]["bias"].astype(dtype)[None, None]
  return out, weights
