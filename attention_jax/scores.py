"""Attention score functions: the classic ways of comparing a query with keys.

Every function maps a query ``q [..., T, Dq]`` and keys ``k [..., S, Dk]`` to logits ``[..., T, S]``.
Leading (batch / head) dimensions broadcast. Logits are accumulated and returned in float32 (float64
if the inputs are float64), whatever the input dtype, because they feed a softmax.

* :func:`dot`         Luong et al. 2015, "dot":      ``q · k``
* :func:`scaled_dot`  Vaswani et al. 2017:           ``q · k / sqrt(Dk)``
* :func:`general`     Luong et al. 2015, "general":  ``q W kᵀ``
* :func:`additive`    Bahdanau et al. 2015 / Luong "concat": ``vᵀ tanh(W q + U k)``

Parameters are plain pytrees (dicts of arrays) made by :func:`init_general` / :func:`init_additive`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _accum_dtype(*arrays: jax.Array) -> Any:
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_qk(name: str, q: jax.Array, k: jax.Array, same_depth: bool) -> tuple[jax.Array, jax.Array]:
  q, k = jnp.asarray(q), jnp.asarray(k)
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


def dot(q: jax.Array, k: jax.Array) -> jax.Array:
  """Luong "dot" score: ``logits[..., t, s] = q[..., t, :] · k[..., s, :]``."""
  q, k = _check_qk("dot", q, k, same_depth=True)
  dtype = _accum_dtype(q, k)
  return jnp.einsum("...td,...sd->...ts", q, k, precision=_HIGHEST, preferred_element_type=dtype)


def scaled_dot(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
  """Scaled dot product (Vaswani et al.): ``q · k * scale`` with ``scale=None`` meaning ``1/sqrt(Dk)``."""
  logits = dot(q, k)
  if scale is None:
    scale = 1.0 / math.sqrt(jnp.shape(k)[-1])
  return logits * jnp.asarray(scale, logits.dtype)


def init_general(rng: jax.Array, dq: int, dk: int, dtype: Any = jnp.float32) -> Params:
  """Parameters of :func:`general`: ``{"W": [dq, dk]}`` (Glorot-uniform)."""
  return {"W": jax.nn.initializers.glorot_uniform()(rng, (dq, dk), dtype)}


def general(params: Params, q: jax.Array, k: jax.Array) -> jax.Array:
  """Luong "general" (bilinear) score: ``logits[..., t, s] = q[..., t, :] W k[..., s, :]ᵀ``."""
  q, k = _check_qk("general", q, k, same_depth=False)
  w_QK = jnp.asarray(params["W"])
  if w_QK.shape != (q.shape[-1], k.shape[-1]):
    raise ValueError(f"general: W must be [Dq, Dk] = {(q.shape[-1], k.shape[-1])}; got W.shape={w_QK.shape}")
  dtype = _accum_dtype(q, k, w_QK)
  qw = jnp.einsum("...td,de->...te", q, w_QK, precision=_HIGHEST, preferred_element_type=dtype)
  return jnp.einsum("...te,...se->...ts", qw, k, precision=_HIGHEST, preferred_element_type=dtype)


def init_additive(rng: jax.Array, dq: int, dk: int, attn_dim: int, dtype: Any = jnp.float32) -> Params:
  """Parameters of :func:`additive`: ``{"W": [dq, A], "U": [dk, A], "v": [A]}`` (Glorot-uniform)."""
  rw, ru, rv = jax.random.split(rng, 3)
  glorot = jax.nn.initializers.glorot_uniform()
  return {
      "W": glorot(rw, (dq, attn_dim), dtype),
      "U": glorot(ru, (dk, attn_dim), dtype),
      "v": glorot(rv, (attn_dim, 1), dtype)[:, 0],
  }


def project_keys(params: Params, k: jax.Array) -> jax.Array:
  """``U k`` of :func:`additive`, which a decoder can compute once per source sequence."""
  k = jnp.asarray(k)
  u_KA = jnp.asarray(params["U"])
  if k.ndim < 2 or k.shape[-1] != u_KA.shape[0]:
    raise ValueError(f"additive: keys must be [..., S, Dk] with Dk = U.shape[0]; got {k.shape=} {u_KA.shape=}")
  return jnp.einsum("...sd,da->...sa", k, u_KA, precision=_HIGHEST, preferred_element_type=_accum_dtype(k, u_KA))


def additive(params: Params, q: jax.Array, k: jax.Array, *, projected_keys: jax.Array | None = None) -> jax.Array:
  """Bahdanau additive / Luong "concat" score: ``logits[..., t, s] = vᵀ tanh(W q_t + U k_s)``.

  Luong's concat form ``vᵀ tanh(W_a [q; k])`` is the same function with ``W_a = [W; U]``. The
  intermediate is ``[..., T, S, A]``, as the score itself requires. ``projected_keys`` (from
  :func:`project_keys`) skips recomputing ``U k`` when the same keys are scored many times.
  """
  q, k = _check_qk("additive", q, k, same_depth=False)
  w_QA, v_A = jnp.asarray(params["W"]), jnp.asarray(params["v"])
  attn_dim = v_A.shape[-1]
  if w_QA.shape != (q.shape[-1], attn_dim) or jnp.shape(params["U"]) != (k.shape[-1], attn_dim):
    raise ValueError(
        f"additive: expected W [Dq, A]={(q.shape[-1], attn_dim)} and U [Dk, A]={(k.shape[-1], attn_dim)};"
        f" got W.shape={w_QA.shape} U.shape={jnp.shape(params['U'])} v.shape={v_A.shape}")
  dtype = _accum_dtype(q, k, w_QA, v_A)
  wq = jnp.einsum("...td,da->...ta", q, w_QA, precision=_HIGHEST, preferred_element_type=dtype)
  uk = project_keys(params, k) if projected_keys is None else jnp.asarray(projected_keys, dtype)
  if uk.shape[-1] != attn_dim or uk.shape[-2] != k.shape[-2]:
    raise ValueError(f"additive: projected_keys must be [..., S, A]; got {uk.shape=} for {k.shape=}, A={attn_dim}")
  rank = max(wq.ndim, uk.ndim)
  wq = wq.reshape((1,) * (rank - wq.ndim) + wq.shape)
  uk = uk.reshape((1,) * (rank - uk.ndim) + uk.shape)
  hidden = jnp.tanh(wq[..., :, None, :] + uk[..., None, :, :])
  return jnp.einsum("...tsa,a->...ts", hidden, v_A.astype(dtype), precision=_HIGHEST)
