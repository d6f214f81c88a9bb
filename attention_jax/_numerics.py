"""Numerical pieces shared by every attention path: dtypes, non-finite handling, padding, the logsumexp merge and
the backward's ``delta``. Package-private; modules import them under these names (docs/DESIGN.md).

Everything here is plain ``jnp``. The Pallas kernels use the wrapper-level helpers (padding, ``delta``); their
in-kernel versions of ``clean`` and the matmul stay in the kernel modules, because each lowering constrains them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax._checks import UnsupportedError

HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> np.dtype:
  """Where softmax and accumulators run: float32, or float64 for float64 inputs."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def matmul_precision(dtype: Any) -> lax.Precision | None:
  """HIGHEST for float32 / float64 inputs (IEEE products, never TF32 or bf16 passes); the default for 16-bit."""
  return HIGHEST if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else None


def einsum(spec: str, a: jax.Array, b: jax.Array, *, dtype: Any, precision: lax.Precision | None) -> jax.Array:
  """A two-operand einsum accumulated in ``dtype`` (the compute dtype) at ``precision``."""
  return jnp.einsum(spec, a, b, preferred_element_type=dtype, precision=precision)


def finite_rows(x: jax.Array) -> jax.Array:
  """``[..., D] -> [...]``: True where every element of the last axis is finite."""
  return jnp.all(jnp.isfinite(x), axis=-1)


def nan_rows(x: jax.Array) -> jax.Array:
  """Rows (last axis) holding a non-finite entry become all-NaN. Applied to queries and keys before a kernel, it
  makes every logit such a row enters NaN, whatever the sign an Inf would give it: a query that sees a non-finite
  query or key entry comes out NaN, as everywhere else in the library."""
  return jnp.where(finite_rows(x)[..., None], x, jnp.full_like(x, jnp.nan))


def clean(x: jax.Array) -> jax.Array:
  """Non-finite entries replaced by 0 with a select, so hidden garbage never meets a multiply."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def round_up(n: int, m: int) -> int:
  """The smallest multiple of ``m`` that is ``>= n`` (non-negative ``n``, positive ``m``)."""
  return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
  """``x`` padded at the end of ``axis`` up to ``size`` with ``value`` (unchanged when it already has that size)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def static_float(name: str, x: Any, *, path: str) -> float | None:
  """A concrete scale or soft-cap as a Python float (a static configuration value); ``UnsupportedError`` for a
  traced one, so that dispatch moves on to an implementation that takes arrays (``path`` names the refuser)."""
  if x is None:
    return None
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise UnsupportedError(f"{path} needs a concrete {name}; got the traced value {x!r}. Use "
                           "implementation='reference' or 'xla', which take traced values") from None


def backward_delta(out: jax.Array, d_out: jax.Array, d_lse: jax.Array, dtype: Any,
                   spec: str = "btnh,btnh->bnt") -> jax.Array:
  """The backward's ``delta = rowsum(dO * O) - d_lse`` in ``dtype``.

  ``dS = P * (dP - delta)``: the row sum is the softmax's own term, and a cotangent on the logsumexp enters with
  a minus sign because ``d lse / d s = P``. ``spec`` maps ``out`` / ``d_out`` to ``d_lse``'s layout (default:
  ``[B, T, N, Hv]`` -> ``[B, N, T]``).
  """
  return jnp.einsum(spec, d_out.astype(dtype), out.astype(dtype)) - d_lse.astype(dtype)


def merge_partials(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """Softmax over disjoint key sets from per-part ``(out [B, T, N, Hv], lse [B, N, T])``.

  ``lse = log sum_c exp(lse_c)`` and ``out = sum_c exp(lse_c - lse) out_c``. Rows with no key in any part give 0
  and ``-inf``. A part's NaN (or +inf) logsumexp means its output row is NaN already: it takes a finite stand-in
  weight, so the row stays NaN while the merge's backward sends no NaN cotangent into the other parts (where it
  would reach keys that row cannot see); the merged logsumexp of such a row is NaN. A part with ``-inf`` (no key)
  gets weight exactly 0, so whatever its output holds there cannot reach the row.
  """
  lses = jnp.stack([lse for _, lse in parts])                         # [C, B, N, T]
  poisoned = jnp.isnan(lses) | jnp.isposinf(lses)
  lses = jnp.where(poisoned, jnp.zeros_like(lses), lses)
  m = lax.stop_gradient(jnp.max(lses, axis=0))
  m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
  w = jnp.exp(lses - m[None])
  denom = jnp.sum(w, axis=0)
  has_key = denom > 0
  safe = jnp.where(has_key, denom, jnp.ones_like(denom))
  w_CBTN = jnp.transpose(w / safe[None], (0, 1, 3, 2))
  # A select, not a multiply by the zero weight: a part's garbage on a row it has no key for stays out.
  live = jnp.transpose(~jnp.isneginf(lses), (0, 1, 3, 2))
  out = functools.reduce(jnp.add, (jnp.where(live[c][..., None], w_CBTN[c][..., None] * o, 0)
                                   for c, (o, _) in enumerate(parts)))
  lse = jnp.where(has_key, m + jnp.log(safe), -jnp.inf)
  return out, jnp.where(jnp.any(poisoned, axis=0), jnp.nan, lse)
