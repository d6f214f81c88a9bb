"""Pieces the Pallas flash kernels share (plain JAX; imports no Pallas backend)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# float32 constants for in-kernel selects: Python floats in ``jnp.where(c, 1.0, 0.0)`` become float64 under
# ``jax_enable_x64`` and break the kernels' float32 loop carries.
F32_0 = np.float32(0.0)
F32_1 = np.float32(1.0)

_SECOND_ORDER = ("differentiating the Pallas flash kernel's {what} (second-order or forward-mode autodiff through "
                 "a custom VJP that was computed inside a separately jitted function) is not supported; use "
                 "implementation='reference' or 'xla' for that, or differentiate outside the jit so that the "
                 "library can switch to the reference formula itself")


def not_differentiable(fn: Callable, what: str) -> Callable:
  """``fn(cfg, *arrays)`` that raises a clear ``NotImplementedError`` when differentiated (``cfg`` static).

  Pallas calls have no derivative of their own; without this, differentiating a kernel's forward or backward pass
  (e.g. ``jax.grad`` of a jitted ``jax.grad``) fails deep inside JAX with a bare ``AssertionError``.
  """

  @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
  def wrapped(cfg, *args):
    return fn(cfg, *args)

  @wrapped.defjvp
  def _jvp(cfg, primals, tangents):
    del cfg, primals, tangents
    raise NotImplementedError(_SECOND_ORDER.format(what=what))

  return wrapped


def flash_custom_vjp(forward: Callable, backward: Callable, *, with_bias: bool = False,
                     finite_residuals: bool = False) -> Callable:
  """``fn(cfg, q, k, v, aux) -> (out, lse)`` with a custom VJP that saves only q, k, v, aux, out and lse.

  ``forward(cfg, q, k, v, *aux) -> (out, lse)`` runs the forward kernel; ``backward(cfg, q, k, v, *aux, out, lse,
  d_out, d_lse) -> (dq, dk, dv)`` recomputes the probabilities from ``lse`` in the backward kernels. ``cfg`` is
  static (hashable); ``aux`` (lengths, segment ids, masks; entries may be None) gets no gradient.

  ``with_bias``: the function is ``fn(cfg, q, k, v, bias, aux)`` with a differentiable ``bias`` (or None), passed
  to ``forward(cfg, q, k, v, bias, *aux)`` and ``backward(cfg, q, k, v, bias, *aux, out, lse, d_out, d_lse) ->
  (dq, dk, dv, dbias)``.
  ``finite_residuals``: the saved ``lse`` has 0 instead of ``-inf`` on rows with no visible key (``backward`` must
  not need the ``-inf``: those rows' logits are all ``-inf``, so their probabilities are 0 either way), so that the
  residuals a jitted ``jax.grad`` returns stay finite and ``jax.debug_infs`` stays silent.

  The forward and backward passes are wrapped with :func:`not_differentiable`: differentiating them again (only
  possible when the first differentiation happened inside a separately jitted function) raises a clear
  ``NotImplementedError`` naming the reference implementations.
  """
  fwd_call = not_differentiable(forward, "forward pass")
  bwd_call = not_differentiable(backward, "backward pass")

  def residual_lse(lse):
    return jnp.where(jnp.isneginf(lse), jnp.zeros_like(lse), lse) if finite_residuals else lse

  if with_bias:
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash_b(cfg, q, k, v, bias, aux):
      return forward(cfg, q, k, v, bias, *aux)

    def flash_b_fwd(cfg, q, k, v, bias, aux):
      out, lse = fwd_call(cfg, q, k, v, bias, *aux)
      return (out, lse), (q, k, v, bias, aux, out, residual_lse(lse))

    def flash_b_bwd(cfg, res, cts):
      q, k, v, bias, aux, out, lse = res
      dq, dk, dv, dbias = bwd_call(cfg, q, k, v, bias, *aux, out, lse, *cts)
      return dq, dk, dv, dbias, None

    flash_b.defvjp(flash_b_fwd, flash_b_bwd)
    return flash_b

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, aux):
    return forward(cfg, q, k, v, *aux)

  def flash_fwd(cfg, q, k, v, aux):
    out, lse = fwd_call(cfg, q, k, v, *aux)
    return (out, lse), (q, k, v, aux, out, residual_lse(lse))

  def flash_bwd(cfg, res, cts):
    q, k, v, aux, out, lse = res
    dq, dk, dv = bwd_call(cfg, q, k, v, *aux, out, lse, *cts)
    return dq, dk, dv, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
