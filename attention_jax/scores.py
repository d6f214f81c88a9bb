"""Attention score functions: the classic ways of comparing a query with keys.

Every function maps a query ``q [..., T, Dq]`` and keys ``k [..., S, Dk]`` to logits ``[..., T, S]``.
Leading (batch / head) dimensions broadcast. Logits are accumulated and returned in float32 (float64
if any input is float64, under ``jax_enable_x64``), whatever the input dtype, because they feed a softmax.
Inputs and parameters must be real floating point (integer, bool and complex arrays raise ``TypeError``);
mixed float dtypes are promoted. Zero-size inputs (T, S or a batch dim 0) give empty logits; a zero depth gives
zero logits.

* :func:`dot`         Luong et al. 2015, "dot":      ``q · k``
* :func:`scaled_dot`  Vaswani et al. 2017:           ``q · k / sqrt(Dk)``
* :func:`general`     Luong et al. 2015, "general":  ``q W kᵀ``
* :func:`additive`    Bahdanau et al. 2015 / Luong "concat": ``vᵀ tanh(W q + U k)``

Parameters are plain pytrees (dicts of arrays) made by :func:`init_general` / :func:`init_additive`.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax._checks import float_array, float_dtype, positive_int

Params = dict[str, jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _accum_dtype(*arrays: jax.Array) -> Any:
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _param(fn: str, params: Mapping[str, Any], name: str, ndim: int) -> jax.Array:
  if not isinstance(params, Mapping) or name not in params:
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"{fn}: params must be a dict with {name!r}; got {got}")
  p = float_array(name, params[name], context=fn)
  if p.ndim != ndim:
    raise ValueError(f"{fn}: {name} must have rank {ndim}; got {name}.shape={p.shape}")
  return p


def _check_qk(name: str, q: jax.Array, k: jax.Array, same_depth: bool) -> tuple[jax.Array, jax.Array]:
  q, k = float_array("q", q, context=name), float_array("k", k, context=name)
  if q.ndim < 2 or k.ndim < 2:
    raise ValueError(f"{name}: q and k need shape [..., T, D] and [..., S, D]; got {q.shape=} {k.shape=}")
  if same_depth and q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{name}: q and k must have the same last dim; got {q.shape=} {k.shape=}")
  try:
    jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2])
  except ValueError:
    raise ValueError(f"{name}: leading dims of q and k do not broadcast; got {q.shape=} {k.shape=}") from None
  # Left-pad the leading dims with ones so that einsum's ellipsis broadcasting never needs rank promotion.
  rank = max(q.ndim, k.ndim)
  q = q.reshape((1,) * (rank - q.ndim) + q.shape)
  k = k.reshape((1,) * (rank - k.ndim) + k.shape)
  return q, k


def dot(q: jax.typing.ArrayLike, k: jax.typing.ArrayLike) -> jax.Array:
  """Luong "dot" score: ``logits[..., t, s] = q[..., t, :] · k[..., s, :]``."""
  q, k = _check_qk("dot", q, k, same_depth=True)
  dtype = _accum_dtype(q, k)
  return jnp.einsum("...td,...sd->...ts", q, k, precision=_HIGHEST, preferred_element_type=dtype)


def scaled_dot(q: jax.typing.ArrayLike, k: jax.typing.ArrayLike, scale: float | None = None) -> jax.Array:
  """Scaled dot product (Vaswani et al.): ``q · k * scale`` with ``scale=None`` meaning ``1/sqrt(Dk)``
  (1 when ``Dk = 0``: the logits are then zeros)."""
  logits = dot(q, k)
  if scale is None:
    depth = jnp.shape(k)[-1]
    scale = 1.0 / math.sqrt(depth) if depth else 1.0
  return logits * jnp.asarray(scale, logits.dtype)


def init_general(rng: jax.Array, dq: int, dk: int, dtype: Any = jnp.float32) -> Params:
  """Parameters of :func:`general`: ``{"W": [dq, dk]}`` (Glorot-uniform); ``dq``, ``dk`` positive ints."""
  dq, dk = positive_int("dq", dq, context="init_general"), positive_int("dk", dk, context="init_general")
  dtype = float_dtype("dtype", dtype, context="init_general")
  return {"W": jax.nn.initializers.glorot_uniform()(rng, (dq, dk), dtype)}


def general(params: Params, q: jax.typing.ArrayLike, k: jax.typing.ArrayLike) -> jax.Array:
  """Luong "general" (bilinear) score: ``logits[..., t, s] = q[..., t, :] W k[..., s, :]ᵀ``."""
  q, k = _check_qk("general", q, k, same_depth=False)
  w_QK = _param("general", params, "W", 2)
  if w_QK.shape != (q.shape[-1], k.shape[-1]):
    raise ValueError(f"general: W must be [Dq, Dk] = {(q.shape[-1], k.shape[-1])}; got W.shape={w_QK.shape} "
                     f"for {q.shape=} {k.shape=}")
  dtype = _accum_dtype(q, k, w_QK)
  qw = jnp.einsum("...td,de->...te", q, w_QK, precision=_HIGHEST, preferred_element_type=dtype)
  return jnp.einsum("...te,...se->...ts", qw, k, precision=_HIGHEST, preferred_element_type=dtype)


def init_additive(rng: jax.Array, dq: int, dk: int, attn_dim: int, dtype: Any = jnp.float32) -> Params:
  """Parameters of :func:`additive`: ``{"W": [dq, A], "U": [dk, A], "v": [A]}`` (Glorot-uniform); dims positive
  ints."""
  dq, dk = positive_int("dq", dq, context="init_additive"), positive_int("dk", dk, context="init_additive")
  attn_dim = positive_int("attn_dim", attn_dim, context="init_additive")
  dtype = float_dtype("dtype", dtype, context="init_additive")
  rw, ru, rv = jax.random.split(rng, 3)
  glorot = jax.nn.initializers.glorot_uniform()
  return {
      "W": glorot(rw, (dq, attn_dim), dtype),
      "U": glorot(ru, (dk, attn_dim), dtype),
      "v": glorot(rv, (attn_dim, 1), dtype)[:, 0],
  }


def project_keys(params: Params, k: jax.typing.ArrayLike) -> jax.Array:
  """``U k`` of :func:`additive`, which a decoder can compute once per source sequence: ``[..., S, A]``."""
  k = float_array("k", k, context="project_keys")
  u_KA = _param("project_keys", params, "U", 2)
  if k.ndim < 2 or k.shape[-1] != u_KA.shape[0]:
    raise ValueError(f"project_keys: keys must be [..., S, Dk] with Dk = U.shape[0]; got {k.shape=} "
                     f"U.shape={u_KA.shape}")
  return jnp.einsum("...sd,da->...sa", k, u_KA, precision=_HIGHEST, preferred_element_type=_accum_dtype(k, u_KA))


def additive(params: Params, q: jax.typing.ArrayLike, k: jax.typing.ArrayLike, *,
             projected_keys: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Bahdanau additive / Luong "concat" score: ``logits[..., t, s] = vᵀ tanh(W q_t + U k_s)``.

  Luong's concat form ``vᵀ tanh(W_a [q; k])`` is the same function with ``W_a = [W; U]``. The
  intermediate is ``[..., T, S, A]``, as the score itself requires. ``projected_keys`` (from
  :func:`project_keys`, ``[..., S, A]``) skips recomputing ``U k`` when the same keys are scored many times.
  """
  q, k = _check_qk("additive", q, k, same_depth=False)
  w_QA, u_KA, v_A = (_param("additive", params, n, r) for n, r in (("W", 2), ("U", 2), ("v", 1)))
  attn_dim = v_A.shape[-1]
  if w_QA.shape != (q.shape[-1], attn_dim) or u_KA.shape != (k.shape[-1], attn_dim):
    raise ValueError(
        f"additive: expected W [Dq, A]={(q.shape[-1], attn_dim)} and U [Dk, A]={(k.shape[-1], attn_dim)};"
        f" got W.shape={w_QA.shape} U.shape={u_KA.shape} v.shape={v_A.shape} for {q.shape=} {k.shape=}")
  dtype = _accum_dtype(q, k, w_QA, u_KA, v_A)
  wq = jnp.einsum("...td,da->...ta", q, w_QA, precision=_HIGHEST, preferred_element_type=dtype)
  if projected_keys is None:
    uk = project_keys(params, k).astype(dtype)
  else:
    uk = float_array("projected_keys", projected_keys, context="additive").astype(dtype)
    if uk.ndim < 2 or uk.shape[-1] != attn_dim or uk.shape[-2] != k.shape[-2]:
      raise ValueError(f"additive: projected_keys must be [..., S, A]; got projected_keys.shape={uk.shape} for "
                       f"{k.shape=}, A={attn_dim}")
    try:
      jnp.broadcast_shapes(uk.shape[:-2], q.shape[:-2])
    except ValueError:
      raise ValueError(f"additive: leading dims of projected_keys and q do not broadcast; got "
                       f"projected_keys.shape={uk.shape} {q.shape=}") from None
  rank = max(wq.ndim, uk.ndim)
  wq = wq.reshape((1,) * (rank - wq.ndim) + wq.shape)
  uk = uk.reshape((1,) * (rank - uk.ndim) + uk.shape)
  hidden = jnp.tanh(wq[..., :, None, :] + uk[..., None, :, :])
  return jnp.einsum("...tsa,a->...ts", hidden, v_A.astype(dtype), precision=_HIGHEST)
