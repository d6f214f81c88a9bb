"""Functional multi-head attention (self, cross, GQA/MQA) over plain-pytree parameters.

The parameter layout is that of ``flax.nnx.MultiHeadAttention`` / ``flax.linen.MultiHeadDotProductAttention``
(``query/key/value/out`` each with ``kernel`` and ``bias``), so weights move between them unchanged::

  query.kernel [D, N, H]   key.kernel [Dkv, K, H]   value.kernel [Dkv, K, H]   out.kernel [N, H, D]

Dtypes: :func:`multi_head_attention` computes in the promoted dtype of its inputs and parameters (float32
parameters with float64 inputs under ``jax_enable_x64`` compute, and return, float64; the float32 weights are
exact in float64). ``init_multi_head(..., dtype=jnp.float64)`` makes float64 parameters. Projections use
``Precision.HIGHEST``, so float32 stays float32 on accelerators too.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import core
from attention_jax._checks import float_array, float_dtype, positive_int

Params = dict[str, dict[str, jax.Array]]

_HIGHEST = jax.lax.Precision.HIGHEST


def _head_counts(num_heads: Any, num_kv_heads: Any) -> tuple[int, int]:
  num_heads = positive_int("num_heads", num_heads)
  num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
  return num_heads, num_kv_heads


def init_multi_head(rng: jax.Array, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                    d_kv: int | None = None, *, head_dim: int | None = None, use_bias: bool = True,
                    dtype: Any = jnp.float32) -> Params:
  """Parameters for :func:`multi_head_attention`.

  Args:
    d_model: query input (and output) features D.
    num_heads: query heads N; ``num_kv_heads`` K (default N) must divide it.
    d_kv: features of the key/value input for cross-attention (default ``d_model``).
    head_dim: per-head features H (default ``d_model // num_heads``, which then must divide evenly).
    dtype: parameter dtype, a real floating dtype (float64 needs ``jax_enable_x64``).

  Every size is a positive int; anything else raises ``ValueError``.
  """
  d_model = positive_int("d_model", d_model)
  num_heads, num_kv_heads = _head_counts(num_heads, num_kv_heads)
  d_kv = d_model if d_kv is None else positive_int("d_kv", d_kv)
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} (or pass head_dim)")
    head_dim = d_model // num_heads
  head_dim = positive_int("head_dim", head_dim)
  float_dtype("dtype", dtype, context="init_multi_head")
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


def _project_in(p: Mapping[str, jax.Array], x_BTD: jax.Array, dtype: Any) -> jax.Array:
  y = jnp.einsum("btd,dnh->btnh", x_BTD.astype(dtype), p["kernel"].astype(dtype), precision=_HIGHEST)
  if "bias" in p:
    y = y + p["bias"].astype(dtype)[None, None]
  return y


def _check_params(params: Any, x_q: jax.Array, x_kv: jax.Array, num_heads: int, num_kv_heads: int) -> Params:
  """Arrays of ``params`` after checking names, dtypes and shapes against the inputs and head counts."""
  context = f"{x_q.shape=} {x_kv.shape=} num_heads={num_heads} num_kv_heads={num_kv_heads}"
  names = ("query", "key", "value", "out")
  if not isinstance(params, Mapping) or any(not isinstance(params.get(n), Mapping) or "kernel" not in params[n]
                                            for n in names):
    got = {n: sorted(p) if isinstance(p, Mapping) else type(p).__name__ for n, p in params.items()} \
        if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"params must be {{'query'|'key'|'value'|'out': {{'kernel', optional 'bias'}}}} "
                     f"(see init_multi_head); got {got}")
  arrays = {n: {leaf: float_array(f"params[{n!r}][{leaf!r}]", a) for leaf, a in params[n].items()
                if leaf in ("kernel", "bias")} for n in names}
  wq = arrays["query"]["kernel"].shape
  if len(wq) != 3 or wq[:2] != (x_q.shape[-1], num_heads):
    raise ValueError(f"params['query']['kernel'] has shape {wq}; expected ({x_q.shape[-1]}, {num_heads}, H) for "
                     f"{context}")
  head_dim = wq[2]
  for name in ("key", "value"):
    shape = arrays[name]["kernel"].shape
    if len(shape) != 3 or shape[:2] != (x_kv.shape[-1], num_kv_heads) or (name == "key" and shape[2] != head_dim):
      want = f"({x_kv.shape[-1]}, {num_kv_heads}, {head_dim if name == 'key' else 'Hv'})"
      raise ValueError(f"params[{name!r}]['kernel'] has shape {shape}; expected {want} for {context}")
  head_dim_v = arrays["value"]["kernel"].shape[2]
  wo = arrays["out"]["kernel"].shape
  if len(wo) != 3 or wo[:2] != (num_heads, head_dim_v):
    raise ValueError(f"params['out']['kernel'] has shape {wo}; expected ({num_heads}, {head_dim_v}, D_out)")
  for name, want in (("query", (num_heads, head_dim)), ("key", (num_kv_heads, head_dim)),
                     ("value", (num_kv_heads, head_dim_v)), ("out", (wo[2],))):
    if "bias" in arrays[name] and arrays[name]["bias"].shape != want:
      raise ValueError(f"params[{name!r}]['bias'] has shape {arrays[name]['bias'].shape}; expected {want}")
  return arrays


def multi_head_attention(params: Params, x_q: jax.typing.ArrayLike, x_kv: jax.typing.ArrayLike | None = None, *,
                         num_heads: int, num_kv_heads: int | None = None, mask: jax.Array | None = None,
                         is_causal: bool = False, implementation: str | None = None, return_weights: bool = False,
                         **attention_options) -> tuple[jax.Array, jax.Array | None]:
  """Multi-head attention of ``x_q [B, T, D]`` over ``x_kv [B, S, Dkv]`` (default ``x_q``: self-attention).

  ``mask`` (bool, broadcastable to ``[B, N, T, S]``), ``is_causal`` and ``attention_options`` (``scale``,
  ``local_window_size``, ``query_seq_lengths``, ``key_value_seq_lengths``, segment ids, ``logits_soft_cap``,
  ``bias``) go to :func:`attention_jax.dot_product_attention`. Computation runs in the promoted dtype of the
  inputs and parameters (float64 end to end for float64 inputs under ``jax_enable_x64``). Inputs must be real
  floating point; ranks, batch sizes, head counts and parameter shapes are checked up front (``ValueError``).

  Returns:
    ``(output [B, T, D], weights [B, N, T, S] or None)``; weights need the reference implementation
    (``implementation`` None, "auto" or "reference").
  """
  x_q = float_array("x_q", x_q)
  x_kv = x_q if x_kv is None else float_array("x_kv", x_kv)
  num_heads, num_kv_heads = _head_counts(num_heads, num_kv_heads)
  if x_q.ndim != 3 or x_kv.ndim != 3:
    raise ValueError(f"x_q must be [B, T, D] and x_kv [B, S, Dkv]; got {x_q.shape=} {x_kv.shape=}")
  if x_q.shape[0] != x_kv.shape[0]:
    raise ValueError(f"x_q and x_kv must have the same batch size B; got {x_q.shape=} {x_kv.shape=}")
  p = _check_params(params, x_q, x_kv, num_heads, num_kv_heads)
  dtype = jnp.result_type(x_q, x_kv, *jax.tree.leaves(p))
  q = _project_in(p["query"], x_q, dtype)
  k = _project_in(p["key"], x_kv, dtype)
  v = _project_in(p["value"], x_kv, dtype)
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
  out = jnp.einsum("btnh,nhd->btd", o, p["out"]["kernel"].astype(dtype), precision=_HIGHEST)
  if "bias" in p["out"]:
    out = out + p["out"]["bias"].astype(dtype)[None, None]
  return out, weights
